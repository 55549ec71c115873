//! Fuzzing of every parser that reads user files (proptest): safetensors headers, sharded checkpoints
//! and their index, GGUF files (the reader, the Llama mapping and the tokenizer built from them),
//! config.json (parsed and loaded into a model), PEFT adapter weights, tokenizer files, chat
//! templates (compiled and rendered with arbitrary messages), image decoding and the image processor
//! (its preprocessor_config.json and arbitrary images).
//!
//! Every target starts from VALID seeds (fixtures or files written here) and mutates them: bytes
//! flipped / inserted / deleted / truncated, words overwritten with edge values, JSON values replaced
//! by other types, huge or negative numbers, keys removed or added, unicode, deep nesting. Each case
//! must return `Ok` or a typed error with a message: a panic, an internal tensor error, a case slower
//! than `FERROVLM_FUZZ_SLOW_SECS` or an allocation over `FERROVLM_FUZZ_ALLOC_GIB` fails the test
//! (the last one aborts the process with the target's name: rerun with `FERROVLM_FUZZ_VERBOSE=1` to
//! see each input before it runs).
//!
//! Environment:
//! - `FERROVLM_FUZZ_CASES`: cases per target (default 256: the whole file runs in about 10 s in the
//!   debug test profile on 2 cores, as CI runs it);
//! - `FERROVLM_FUZZ_SEED`: base seed (default fixed, so CI is reproducible; no failure files are
//!   written into the repository);
//! - `FERROVLM_FUZZ_SLOW_SECS` (default 30), `FERROVLM_FUZZ_ALLOC_GIB` (default 8),
//!   `FERROVLM_FUZZ_VERBOSE=1`.
//!
//! Longer developer run (a new seed finds new cases):
//! `FERROVLM_FUZZ_CASES=20000 FERROVLM_FUZZ_SEED=$RANDOM cargo test --release --test fuzz_parsers`
//!
//! A crash found here becomes a plain `#[test]` with that input in the `regressions.rs`
//! (and a typed error in the parser).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use ferrovlm::checkpoint::{peft, WeightStore};
use ferrovlm::config::ModelConfig;
use ferrovlm::data::chat_template::{ChatTemplate, ChatTemplates, RenderOptions};
use ferrovlm::data::chat_template_value::TemplateValue;
use ferrovlm::data::image::{
    decode_image, process, ImageProcessorConfig, PilMode, RawImage, ResizeTarget, Transparency,
};
use ferrovlm::data::resample::{resize, Filter, ImageView};
use ferrovlm::data::tokenizer::Tokenizer;
use ferrovlm::data::tokenizer_batch::{EncodeOptions, Padding};
use ferrovlm::lora::{self, AdapterPlan, LoraInit, LoraSpec};
use ferrovlm::model::VlmModel;
use ferrovlm::Error;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{json, Value};

mod chat_template;
mod checkpoint;
mod gguf;
mod harness;
mod images;
mod mutate;
mod regressions;
mod tokenizer;

use harness::*;
use mutate::*;
