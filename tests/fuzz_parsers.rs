//! Fuzzing of every parser that reads user files (proptest): safetensors headers, sharded checkpoints
//! and their index, config.json (parsed and loaded into a model), PEFT adapter weights, tokenizer
//! files, chat templates (compiled and rendered with arbitrary messages), image decoding and the image
//! processor (its preprocessor_config.json and arbitrary images).
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
//! A crash found here becomes a plain `#[test]` with that input in the `regressions` section below
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
use ferrovlm::data::image::{decode_image, process, ImageProcessorConfig, PilMode, RawImage, ResizeTarget, Transparency};
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

// ---------------------------------------------------------------------------------------------
// Harness: allocation cap, configuration, per-case checks
// ---------------------------------------------------------------------------------------------

/// Refuses single allocations over the cap, so that a giant allocation claimed by a file fails the
/// same way on every machine (whatever its memory and overcommit) instead of passing or swapping.
struct CappedAlloc;

static ALLOC_CAP: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TARGET: Cell<&'static str> = const { Cell::new("") };
}

fn alloc_cap() -> usize {
    match ALLOC_CAP.load(Ordering::Relaxed) {
        0 => usize::MAX,
        n => n,
    }
}

fn refuse(size: usize) {
    let mut buf = [0u8; 256];
    let mut w: &mut [u8] = &mut buf;
    let target = TARGET.try_with(Cell::get).ok().filter(|t| !t.is_empty()).unwrap_or("? (a worker thread)");
    let _ = write!(w, "\nfuzz_parsers: target '{target}' asked for {size} bytes at once (cap {}); rerun with FERROVLM_FUZZ_VERBOSE=1\n", alloc_cap());
    let n = 256 - w.len();
    let _ = std::io::stderr().write_all(&buf[..n]);
}

// SAFETY: forwards to the system allocator; only refuses (null) allocations over the cap.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > alloc_cap() {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > alloc_cap() {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > alloc_cap() {
            refuse(new_size);
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CappedAlloc = CappedAlloc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn cases() -> u32 {
    env_u64("FERROVLM_FUZZ_CASES", 256) as u32
}

fn verbose() -> bool {
    std::env::var("FERROVLM_FUZZ_VERBOSE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Deterministic proptest config: fixed seed per target, no persistence files.
fn config(salt: u64) -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(env_u64("FERROVLM_FUZZ_SEED", 0x5eed_f022).wrapping_mul(31).wrapping_add(salt)),
        max_shrink_time: 120_000,
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

/// Runs `test` on `cases()` inputs from `strategy`; panics (the runner catches them and shrinks the
/// input), slow cases and failed checks fail the test with the minimal input.
fn fuzz<S>(target: &'static str, salt: u64, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    ALLOC_CAP.store((env_u64("FERROVLM_FUZZ_ALLOC_GIB", 8) as usize).saturating_mul(1 << 30), Ordering::Relaxed);
    let slow = Duration::from_secs(env_u64("FERROVLM_FUZZ_SLOW_SECS", 30));
    let mut runner = TestRunner::new(config(salt));
    let start = Instant::now();
    let result = runner.run(&strategy, |input| {
        TARGET.with(|t| t.set(target));
        if verbose() {
            eprintln!("[{target}] {input:?}");
        }
        let t0 = Instant::now();
        test(input)?;
        let took = t0.elapsed();
        prop_assert!(took < slow, "{target}: one case took {took:?} (limit {slow:?}): a hang or a quadratic path");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
    eprintln!("[{target}] {} cases in {:.1?}: {}", cases(), start.elapsed(), stats_line(target));
}

/// (target, call) -> (ok, err) counts, printed after each target to show how deep the cases got.
static STATS: Mutex<BTreeMap<(&'static str, &'static str), (u32, u32)>> = Mutex::new(BTreeMap::new());

fn count(what: &'static str, ok: bool) {
    let target = TARGET.with(Cell::get);
    let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    let slot = stats.entry((target, what)).or_default();
    if ok {
        slot.0 += 1;
    } else {
        slot.1 += 1;
    }
}

fn stats_line(target: &str) -> String {
    let stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    let parts: Vec<String> = stats.iter().filter(|((t, _), _)| *t == target).map(|((_, w), (o, e))| format!("{w} {o} ok/{e} err")).collect();
    parts.join(", ")
}

/// The call returned Ok or a typed, non-empty error that is not an internal (tensor) failure.
fn check<T, E: Into<Error>>(what: &'static str, r: Result<T, E>) -> Result<Option<T>, TestCaseError> {
    count(what, r.is_ok());
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let e: Error = e.into();
            let msg = e.to_string();
            if std::env::var("FERROVLM_FUZZ_VERBOSE").is_ok_and(|v| v == "2") {
                eprintln!("  {what}: {}", msg.chars().take(300).collect::<String>());
            }
            prop_assert!(!msg.trim().is_empty(), "{what}: empty error message: {e:?}");
            prop_assert!(!matches!(e, Error::Tensor(_)), "{what}: bad input surfaced as an internal tensor error: {msg}");
            Ok(None)
        }
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let p = path.as_ref();
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Mutations: bytes
// ---------------------------------------------------------------------------------------------

/// Edge values written over 1, 2, 4 or 8 bytes.
const WORDS: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

#[derive(Clone, Debug)]
enum ByteOp {
    /// Flip one bit (index, bit); `head`: index inside the first `head` bytes of the seed.
    Flip { at: Index, bit: u8, head: bool },
    Set { at: Index, value: u8, head: bool },
    Insert { at: Index, bytes: Vec<u8>, head: bool },
    Delete { at: Index, len: usize, head: bool },
    Truncate { at: Index },
    /// Overwrite `width` bytes with an edge value (`WORDS[word]` or `random`).
    Word { at: Index, word: Option<usize>, random: u64, width: u8, big_endian: bool, head: bool },
    /// Copy a chunk of the input over another place (repeats structures).
    Splice { from: Index, to: Index, len: usize },
}

fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        (any::<Index>(), 0u8..8, any::<bool>()).prop_map(|(at, bit, head)| ByteOp::Flip { at, bit, head }),
        (any::<Index>(), any::<u8>(), any::<bool>()).prop_map(|(at, value, head)| ByteOp::Set { at, value, head }),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16), any::<bool>())
            .prop_map(|(at, bytes, head)| ByteOp::Insert { at, bytes, head }),
        (any::<Index>(), 1usize..64, any::<bool>()).prop_map(|(at, len, head)| ByteOp::Delete { at, len, head }),
        any::<Index>().prop_map(|at| ByteOp::Truncate { at }),
        (any::<Index>(), prop::option::weighted(0.8, 0..WORDS.len()), any::<u64>(), prop::sample::select(vec![1u8, 2, 4, 8]), any::<bool>(), any::<bool>())
            .prop_map(|(at, word, random, width, big_endian, head)| ByteOp::Word { at, word, random, width, big_endian, head }),
        (any::<Index>(), any::<Index>(), 1usize..256).prop_map(|(from, to, len)| ByteOp::Splice { from, to, len }),
    ]
}

fn byte_ops(max: usize) -> impl Strategy<Value = Vec<ByteOp>> {
    prop::collection::vec(byte_op(), 1..=max)
}

/// Applies `ops`; "head" indexes fall in the first `head` bytes (the header of a file).
fn mutate_bytes(mut b: Vec<u8>, ops: &[ByteOp], head: usize) -> Vec<u8> {
    let pos = |b: &Vec<u8>, at: &Index, in_head: bool, extra: usize| {
        let n = if in_head { b.len().min(head.max(1)) } else { b.len() } + extra;
        at.index(n.max(1))
    };
    for op in ops {
        match op {
            ByteOp::Flip { at, bit, head } if !b.is_empty() => {
                let i = pos(&b, at, *head, 0).min(b.len() - 1);
                b[i] ^= 1 << bit;
            }
            ByteOp::Set { at, value, head } if !b.is_empty() => {
                let i = pos(&b, at, *head, 0).min(b.len() - 1);
                b[i] = *value;
            }
            ByteOp::Insert { at, bytes, head } => {
                let i = pos(&b, at, *head, 1).min(b.len());
                b.splice(i..i, bytes.iter().copied());
            }
            ByteOp::Delete { at, len, head } if !b.is_empty() => {
                let i = pos(&b, at, *head, 0).min(b.len() - 1);
                let end = (i + len).min(b.len());
                b.drain(i..end);
            }
            ByteOp::Truncate { at } => {
                let i = at.index(b.len() + 1);
                b.truncate(i);
            }
            ByteOp::Word { at, word, random, width, big_endian, head } => {
                let w = *width as usize;
                if b.len() >= w {
                    let i = pos(&b, at, *head, 0).min(b.len() - w);
                    let v = word.map_or(*random, |k| WORDS[k]);
                    let bytes = if *big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
                    let bytes = if *big_endian { &bytes[8 - w..] } else { &bytes[..w] };
                    b[i..i + w].copy_from_slice(bytes);
                }
            }
            ByteOp::Splice { from, to, len } if !b.is_empty() => {
                let f = from.index(b.len());
                let chunk: Vec<u8> = b[f..(f + len).min(b.len())].to_vec();
                let t = to.index(b.len());
                let end = (t + chunk.len()).min(b.len());
                b.splice(t..end, chunk);
            }
            _ => {}
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Mutations: JSON
// ---------------------------------------------------------------------------------------------

/// Values that break typed readers: wrong types, edge numbers, odd strings, deep nesting.
fn interesting(k: usize, random: i64, extra: &[Value]) -> Value {
    let deep = |n: usize| (0..n).fold(json!(1), |v, _| json!([v]));
    let base: Vec<Value> = vec![
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(-1),
        json!(-2147483648i64),
        json!(16),
        json!(2147483648u64),
        json!(4294967295u64),
        json!(4294967296u64),
        json!(9007199254740993u64),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(-0.0),
        json!(1e308),
        json!(-1e308),
        json!(1e-320),
        json!(3.0),
        json!(1e19),
        json!(""),
        json!("a"),
        json!("\u{0}"),
        json!("é💥\u{202e}\u{ffff}"),
        json!("-1"),
        json!("1e999"),
        json!("null"),
        json!([]),
        json!([0]),
        json!([1, 2, 3]),
        json!(["x", null]),
        json!([u64::MAX, -1]),
        json!({}),
        json!({"a": 1}),
        json!(random),
        json!(random as f64 / 7.0),
        json!(random.rem_euclid(64)),
        deep(40),
        json!("x".repeat(5000)),
    ];
    let all = base.len() + extra.len();
    let k = k % all;
    if k < base.len() { base[k].clone() } else { extra[k - base.len()].clone() }
}

#[derive(Clone, Debug)]
enum JsonOp {
    Replace { path: Vec<Index>, value: usize, random: i64 },
    Remove { path: Vec<Index> },
    Insert { path: Vec<Index>, key: Index, value: usize, random: i64 },
    Retype { path: Vec<Index> },
    /// Wrap the node in `depth` arrays.
    Nest { path: Vec<Index>, depth: usize },
}

fn json_path() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..5)
}

fn json_op() -> impl Strategy<Value = JsonOp> {
    prop_oneof![
        4 => (json_path(), any::<usize>(), any::<i64>()).prop_map(|(path, value, random)| JsonOp::Replace { path, value, random }),
        2 => json_path().prop_map(|path| JsonOp::Remove { path }),
        2 => (json_path(), any::<Index>(), any::<usize>(), any::<i64>())
            .prop_map(|(path, key, value, random)| JsonOp::Insert { path, key, value, random }),
        2 => json_path().prop_map(|path| JsonOp::Retype { path }),
        1 => (json_path(), prop::sample::select(vec![1usize, 2, 140])).prop_map(|(path, depth)| JsonOp::Nest { path, depth }),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    At(usize),
}

/// The steps `path` selects: at each level an object key or an array element (stops at a leaf).
fn steps(v: &Value, path: &[Index]) -> Vec<Step> {
    let mut out = Vec::new();
    let mut cur = v;
    for ix in path {
        match cur {
            Value::Object(m) if !m.is_empty() => {
                let (k, next) = m.iter().nth(ix.index(m.len())).unwrap();
                out.push(Step::Key(k.clone()));
                cur = next;
            }
            Value::Array(a) if !a.is_empty() => {
                let i = ix.index(a.len());
                out.push(Step::At(i));
                cur = &a[i];
            }
            _ => break,
        }
    }
    out
}

fn node<'a>(mut v: &'a mut Value, steps: &[Step]) -> &'a mut Value {
    for s in steps {
        v = match s {
            Step::Key(k) => v.get_mut(k.as_str()).unwrap(),
            Step::At(i) => v.get_mut(*i).unwrap(),
        };
    }
    v
}

/// Applies JSON mutations; `keys` are names worth inserting (known fields), `extra` more values.
fn mutate_json(mut v: Value, ops: &[JsonOp], keys: &[&str], extra: &[Value]) -> Value {
    for op in ops {
        match op {
            JsonOp::Replace { path, value, random } => {
                let s = steps(&v, path);
                *node(&mut v, &s) = interesting(*value, *random, extra);
            }
            JsonOp::Remove { path } => {
                let s = steps(&v, path);
                if let Some((last, parent)) = s.split_last() {
                    match (node(&mut v, parent), last) {
                        (Value::Object(m), Step::Key(k)) => {
                            m.remove(k);
                        }
                        (Value::Array(a), Step::At(i)) => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            JsonOp::Insert { path, key, value, random } => {
                let s = steps(&v, path);
                let val = interesting(*value, *random, extra);
                let n = node(&mut v, &s);
                let key_name = if keys.is_empty() { "x".to_string() } else { keys[key.index(keys.len())].to_string() };
                match n {
                    Value::Object(m) => {
                        m.insert(key_name, val);
                    }
                    Value::Array(a) => {
                        let i = key.index(a.len() + 1);
                        a.insert(i, val);
                    }
                    other => *other = json!({ key_name: val }),
                }
            }
            JsonOp::Retype { path } => {
                let s = steps(&v, path);
                let n = node(&mut v, &s);
                *n = match n.take() {
                    Value::Number(x) => Value::String(x.to_string()),
                    Value::String(x) => x.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(json!(x.len()), Value::Number),
                    Value::Bool(b) => json!(b as i64),
                    Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
                    Value::Array(_) => Value::Null,
                    Value::Object(m) => Value::Array(m.into_iter().map(|(_, x)| x).collect()),
                    Value::Null => json!({}),
                };
            }
            JsonOp::Nest { path, depth } => {
                let s = steps(&v, path);
                let n = node(&mut v, &s);
                let mut inner = n.take();
                for _ in 0..*depth {
                    inner = json!([inner]);
                }
                *n = inner;
            }
        }
    }
    v
}

/// A mutated JSON file: JSON-level edits, then (sometimes) raw text corruption.
#[derive(Clone, Debug)]
struct JsonMut {
    ops: Vec<JsonOp>,
    bytes: Vec<ByteOp>,
}

fn json_mut() -> impl Strategy<Value = JsonMut> {
    (
        prop_oneof![3 => prop::collection::vec(json_op(), 1..=1), 1 => prop::collection::vec(json_op(), 2..5)],
        prop_oneof![4 => Just(Vec::new()), 1 => byte_ops(3)],
    )
        .prop_map(|(ops, bytes)| JsonMut { ops, bytes })
}

fn apply_json(seed: &Value, m: &JsonMut, keys: &[&str], extra: &[Value]) -> Vec<u8> {
    let v = mutate_json(seed.clone(), &m.ops, keys, extra);
    let text = serde_json::to_vec_pretty(&v).unwrap();
    if m.bytes.is_empty() { text } else { mutate_bytes(text, &m.bytes, usize::MAX) }
}

// ---------------------------------------------------------------------------------------------
// Safetensors files
// ---------------------------------------------------------------------------------------------

/// A small valid safetensors file with every float dtype, an int tensor, a scalar and an empty tensor.
fn small_safetensors() -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype as D;
    let f32s: Vec<u8> = (0..12).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let bf16s: Vec<u8> = (0..6).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..4).flat_map(|i| half::f16::from_f32(-(i as f32)).to_le_bytes()).collect();
    let i64s: Vec<u8> = (0..3i64).flat_map(|i| i.to_le_bytes()).collect();
    let scalar: Vec<u8> = 7f32.to_le_bytes().to_vec();
    let u8s: Vec<u8> = vec![1, 2, 3, 4, 5];
    let empty: Vec<u8> = Vec::new();
    let views = vec![
        ("a.weight".to_string(), TensorView::new(D::F32, vec![3, 4], &f32s).unwrap()),
        ("b.weight".to_string(), TensorView::new(D::BF16, vec![2, 3], &bf16s).unwrap()),
        ("c.bias".to_string(), TensorView::new(D::F16, vec![4], &f16s).unwrap()),
        ("ids".to_string(), TensorView::new(D::I64, vec![3], &i64s).unwrap()),
        ("scalar".to_string(), TensorView::new(D::F32, vec![], &scalar).unwrap()),
        ("bytes".to_string(), TensorView::new(D::U8, vec![5], &u8s).unwrap()),
        ("empty".to_string(), TensorView::new(D::F32, vec![0, 3], &empty).unwrap()),
    ];
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta)).unwrap()
}

/// (header JSON, data) of a safetensors file.
fn split_safetensors(b: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&b[8..8 + n]).unwrap(), b[8 + n..].to_vec())
}

const ST_KEYS: [&str; 6] = ["dtype", "shape", "data_offsets", "__metadata__", "a.weight", "format"];

fn st_extra() -> Vec<Value> {
    let mut v: Vec<Value> = ["F32", "BF16", "F16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "F4", "E8M0", "f32", "Q4"]
        .iter()
        .map(|s| json!(s))
        .collect();
    v.extend([
        json!([0, 0]),
        json!([0, 48]),
        json!([48, 0]),
        json!([0, u64::MAX]),
        json!([u64::MAX, u64::MAX]),
        json!([4294967296u64, 4294967296u64]),
        json!([3, 4, 5]),
        json!([0]),
        json!([1u64 << 31, 1u64 << 31, 4]),
        json!([4611686018427387904u64, 4]),
        json!([18446744073709551615u64]),
        json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
        json!({"dtype": "F32", "shape": [1u64 << 40], "data_offsets": [0, 4]}),
    ]);
    v
}

/// How a safetensors seed is corrupted: header JSON edits (re-serialized with a correct length, or
/// a wrong one), or raw bytes anywhere / in the header.
#[derive(Clone, Debug)]
enum StMut {
    Header { json: JsonMut, pad: u8, length: Option<ByteOp> },
    Bytes(Vec<ByteOp>),
    /// Consistent edits that still pass safetensors' validation: a tensor gets another dtype and
    /// shape with the same byte size, or two tensors swap names.
    Retag { tensor: Index, dtype: Index, split: Index, swap_with: Option<Index> },
}

fn st_mut() -> impl Strategy<Value = StMut> {
    prop_oneof![
        2 => (any::<Index>(), any::<Index>(), any::<Index>(), prop::option::weighted(0.3, any::<Index>()))
            .prop_map(|(tensor, dtype, split, swap_with)| StMut::Retag { tensor, dtype, split, swap_with }),
        3 => (json_mut(), 0u8..9, prop::option::weighted(0.15, byte_op()))
            .prop_map(|(json, pad, length)| StMut::Header { json, pad, length }),
        2 => byte_ops(4).prop_map(StMut::Bytes),
    ]
}

fn apply_st(seed: &[u8], m: &StMut) -> Vec<u8> {
    match m {
        StMut::Header { json, pad, length } => {
            let (header, data) = split_safetensors(seed);
            let mut h = apply_json(&header, json, &ST_KEYS, &st_extra());
            h.extend(std::iter::repeat_n(b' ', *pad as usize));
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(data);
            match length {
                Some(op) => mutate_bytes(out, std::slice::from_ref(op), 8),
                None => out,
            }
        }
        StMut::Bytes(ops) => {
            let head = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
            mutate_bytes(seed.to_vec(), ops, head)
        }
        StMut::Retag { tensor, dtype, split, swap_with } => {
            let (mut header, data) = split_safetensors(seed);
            let names: Vec<String> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
            if !names.is_empty() {
                let name = &names[tensor.index(names.len())];
                let entry = &mut header[name.as_str()];
                let off = &entry["data_offsets"];
                let bytes = (off[1].as_u64().unwrap() - off[0].as_u64().unwrap()) as usize;
                const DTYPES: [(&str, usize); 13] = [
                    ("F32", 4), ("I32", 4), ("U32", 4), ("BF16", 2), ("F16", 2), ("I16", 2), ("U16", 2),
                    ("F64", 8), ("I64", 8), ("U8", 1), ("I8", 1), ("BOOL", 1), ("F8_E4M3", 1),
                ];
                let fits: Vec<(&str, usize)> = DTYPES.iter().copied().filter(|(_, size)| bytes % size == 0).collect();
                let (dt, size) = fits[dtype.index(fits.len())];
                let numel = bytes / size;
                let divisors: Vec<usize> = (1..=numel.max(1)).filter(|d| numel % d == 0).collect();
                let a = divisors[split.index(divisors.len())];
                let shape = match split.index(4) {
                    _ if numel == 0 => json!([0, 7]),
                    0 if numel == 1 => json!([]),
                    1 => json!([numel]),
                    _ => json!([a, numel / a]),
                };
                entry["dtype"] = json!(dt);
                entry["shape"] = shape;
                if let Some(other) = swap_with {
                    let b = names[other.index(names.len())].clone();
                    let obj = header.as_object_mut().unwrap();
                    let (x, y) = (obj.remove(name).unwrap(), obj.remove(&b));
                    if let Some(y) = y {
                        obj.insert(name.clone(), y);
                    }
                    obj.insert(b, x);
                }
            }
            let h = serde_json::to_vec(&header).unwrap();
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(data);
            out
        }
    }
}

/// Reads every tensor the way the loaders do: shape, raw bytes, and as F32 / BF16 / F16.
fn read_store(store: &WeightStore) -> Result<(), TestCaseError> {
    let mut names: Vec<String> = store.names().map(str::to_string).collect();
    names.sort();
    for n in names {
        let shape = store.shape(&n).unwrap();
        if let Some((_, s, bytes, _)) = check("raw", store.raw(&n))? {
            prop_assert_eq!(&s, &shape);
            let _ = bytes.iter().fold(0u8, |a, b| a ^ b);
        }
        for dt in [DType::F32, DType::BF16, DType::F16, DType::U8] {
            if let Some(t) = check("get", store.get(&n, &shape, dt, &Device::Cpu))? {
                prop_assert_eq!(t.dims(), shape.as_slice());
            }
        }
        // A wrong expected shape is a BadShape error, not a panic.
        let mut other = shape.clone();
        other.push(1);
        prop_assert!(store.get(&n, &other, DType::F32, &Device::Cpu).is_err());
    }
    prop_assert!(store.get("no such tensor", &[1], DType::F32, &Device::Cpu).is_err());
    Ok(())
}

fn model_dir() -> PathBuf {
    fixtures().join("idefics3_gqa/checkpoint")
}

#[test]
fn fuzz_safetensors_header() {
    let seeds = vec![small_safetensors(), read(fixtures().join("lora/text/adapter/adapter_model.safetensors"))];
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    fuzz("safetensors_header", 1, (0..seeds.len(), st_mut()), |(s, m)| {
        let bytes = apply_st(&seeds[s], &m);
        std::fs::write(&path, &bytes).unwrap();
        if let Some(store) = check("open_files", WeightStore::open_files(&[path.clone()]))? {
            read_store(&store)?;
        }
        Ok(())
    });
}

/// A whole model loaded from a checkpoint whose model.safetensors header is corrupted: every
/// loader (vision, connector, text, head, and the bitsandbytes 4-bit / 8-bit ones for the
/// pre-quantized checkpoints) checks names, shapes, dtypes and the quantization blobs.
#[test]
fn fuzz_safetensors_model_load() {
    let dirs = [model_dir(), fixtures().join("bnb/nf4_dq/checkpoint"), fixtures().join("bnb/int8/checkpoint")];
    let seeds: Vec<Vec<u8>> = dirs.iter().map(|d| read(d.join("model.safetensors"))).collect();
    let tmp = tempfile::tempdir().unwrap();
    // Header edits only: raw data bytes are just numbers (except quantization state blobs, which
    // the Retag edits reinterpret).
    let header = (json_mut(), prop::option::weighted(0.1, byte_op())).prop_map(|(json, length)| StMut::Header { json, pad: 0, length });
    let retag = (any::<Index>(), any::<Index>(), any::<Index>(), prop::option::weighted(0.3, any::<Index>()))
        .prop_map(|(tensor, dtype, split, swap_with)| StMut::Retag { tensor, dtype, split, swap_with });
    let strategy = (0..dirs.len(), prop_oneof![header, retag], any::<bool>());
    fuzz("safetensors_model_load", 2, strategy, |(s, m, bf16)| {
        std::fs::copy(dirs[s].join("config.json"), tmp.path().join("config.json")).unwrap();
        std::fs::write(tmp.path().join("model.safetensors"), apply_st(&seeds[s], &m)).unwrap();
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        check("VlmModel::from_dir", VlmModel::from_dir(tmp.path(), dtype, &Device::Cpu))?;
        Ok(())
    });
}

/// Two shards and `model.safetensors.index.json`; the index is edited (file names that escape,
/// are missing, are directories, non-strings...) and sometimes a shard is corrupted.
#[test]
fn fuzz_safetensors_index_and_shards() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype as D;
    let f: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let shard = |names: &[&str]| {
        let views: Vec<(String, TensorView<'_>)> =
            names.iter().map(|n| (n.to_string(), TensorView::new(D::F32, vec![2, 4], &f).unwrap())).collect();
        safetensors::tensor::serialize(views, None).unwrap()
    };
    let shards = [shard(&["x.weight", "y.weight"]), shard(&["z.weight"])];
    let index = json!({
        "metadata": {"total_size": 96},
        "weight_map": {
            "x.weight": "model-00001-of-00002.safetensors",
            "y.weight": "model-00001-of-00002.safetensors",
            "z.weight": "model-00002-of-00002.safetensors",
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(dir.join("subdir")).unwrap();
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let extra: Vec<Value> = vec![
        json!("model-00001-of-00002.safetensors"),
        json!("model-00002-of-00002.safetensors"),
        json!("missing.safetensors"),
        json!("subdir"),
        json!("."),
        json!(".."),
        json!("../ckpt/model-00001-of-00002.safetensors"),
        json!("/dev/null"),
        json!("/"),
        json!("config.json"),
        json!("model.safetensors.index.json"),
    ];
    let keys = ["weight_map", "metadata", "x.weight", "w.weight", "total_size"];
    let strategy = (json_mut(), prop::option::weighted(0.3, (0usize..2, st_mut())));
    fuzz("safetensors_index_and_shards", 3, strategy, |(m, bad_shard)| {
        for (i, n) in names.iter().enumerate() {
            let bytes = match &bad_shard {
                Some((k, sm)) if *k == i => apply_st(&shards[i], sm),
                _ => shards[i].clone(),
            };
            std::fs::write(dir.join(n), bytes).unwrap();
        }
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("model.safetensors.index.json"), apply_json(&index, &m, &keys, &extra)).unwrap();
        if let Some(store) = check("open_dir", WeightStore::open_dir(&dir))? {
            read_store(&store)?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

const CONFIG_KEYS: [&str; 24] = [
    "model_type",
    "vision_config",
    "text_config",
    "scale_factor",
    "image_token_id",
    "tie_word_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "pad_token_id",
    "quantization_config",
];

fn config_extra() -> Vec<Value> {
    vec![
        json!("idefics3"),
        json!("smolvlm"),
        json!("llama"),
        json!("silu"),
        json!("gelu"),
        json!({"rope_type": "default", "rope_theta": 1e30}),
        json!({"rope_type": "yarn"}),
        json!([8, 8]),
        json!(16.0),
        json!(1e20),
        json!(48),
        json!(65536),
    ]
}

/// config.json parsed (`ModelConfig`) and a whole model built from it with the fixture's weights:
/// config values drive allocations and shape arithmetic in every loader.
#[test]
fn fuzz_config_json() {
    let seeds: Vec<Value> = [model_dir().join("config.json"), fixtures().join("smolvlm_tied/checkpoint/config.json")]
        .iter()
        .map(|p| serde_json::from_slice(&read(p)).unwrap())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(model_dir().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let extra = config_extra();
    fuzz("config_json", 4, (0..seeds.len(), json_mut(), any::<bool>()), |(s, m, load)| {
        let text = apply_json(&seeds[s], &m, &CONFIG_KEYS, &extra);
        let parsed = match std::str::from_utf8(&text) {
            Ok(t) => check("from_json_str", ModelConfig::from_json_str(t, Path::new("config.json")))?,
            Err(_) => None,
        };
        if let Some(c) = &parsed {
            // The derived sizes the model uses must not overflow or divide by zero.
            let _ = (c.image_seq_len(), c.vision.patches_per_side(), c.vision.head_dim());
        }
        if load || parsed.is_some() {
            std::fs::write(tmp.path().join("config.json"), &text).unwrap();
            check("VlmModel::from_dir", VlmModel::from_dir(tmp.path(), DType::F32, &Device::Cpu))?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// PEFT adapter weights
// ---------------------------------------------------------------------------------------------

/// `adapter_model.safetensors` read back (`peft::load_tensors`) and loaded into a model with LoRA
/// (DoRA) adapters and a `modules_to_save` copy (`lora::load_state`), as `PeftModel.from_pretrained`
/// does. (adapter_config.json is parsed on the Python side.)
#[test]
fn fuzz_adapter_files() {
    let mut model = VlmModel::from_dir(&model_dir(), DType::F32, &Device::Cpu).unwrap();
    let names: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
    let lora_targets: Vec<String> = names.iter().filter(|n| n.contains("text_model.layers.0.")).cloned().collect();
    let modules_to_save: Vec<String> = names.iter().filter(|n| n.contains("connector")).cloned().collect();
    let spec = LoraSpec { r: 2, alpha: 4.0, dropout: 0.0, use_dora: true, use_rslora: false, init: LoraInit::Random, seed: 1 };
    lora::attach(&mut model, &AdapterPlan { lora_targets, spec, modules_to_save }).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("adapter_model.safetensors");
    peft::save_tensors(&path, &lora::state(&model)).unwrap();
    let seeds = vec![read(&path), read(fixtures().join("lora/dora/adapter/adapter_model.safetensors"))];
    fuzz("adapter_files", 5, (0..seeds.len(), st_mut(), any::<bool>()), |(s, m, strict)| {
        std::fs::write(&path, apply_st(&seeds[s], &m)).unwrap();
        if let Some(tensors) = check("peft::load_tensors", peft::load_tensors(&path))? {
            check("lora::load_state", lora::load_state(&model, &tensors, strict))?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Tokenizer files
// ---------------------------------------------------------------------------------------------

/// The fixture's tokenizer.json cut to its first 400 ids (and the merges among them): the same
/// pipeline, small enough to parse on every case.
fn small_tokenizer_json() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| {
        let mut v: Value = serde_json::from_slice(&read(fixtures().join("tokenizer/smolvlm/tokenizer.json"))).unwrap();
        let model = v.get_mut("model").unwrap();
        let vocab: serde_json::Map<String, Value> = model["vocab"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, id)| id.as_u64().unwrap() < 400)
            .map(|(k, id)| (k.clone(), id.clone()))
            .collect();
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                let (a, b) = match m {
                    Value::String(s) => match s.split_once(' ') {
                        Some((a, b)) => (a.to_string(), b.to_string()),
                        None => return false,
                    },
                    Value::Array(p) => (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()),
                    _ => return false,
                };
                vocab.contains_key(&a) && vocab.contains_key(&b) && vocab.contains_key(&format!("{a}{b}"))
            })
            .cloned()
            .collect();
        model["vocab"] = Value::Object(vocab);
        model["merges"] = Value::Array(merges);
        v
    })
}

const TOKENIZER_KEYS: [&str; 20] = [
    "added_tokens_decoder",
    "added_tokens",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "additional_special_tokens",
    "extra_special_tokens",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "clean_up_tokenization_spaces",
    "split_special_tokens",
    "add_prefix_space",
    "tokenizer_class",
    "chat_template",
    "content",
    "special",
    "id",
    "auto_map",
];

fn tokenizer_extra() -> Vec<Value> {
    vec![
        json!("<image>"),
        json!("<|endoftext|>"),
        json!("left"),
        json!("right"),
        json!("GPT2Tokenizer"),
        json!("PreTrainedTokenizerFast"),
        json!({"content": "<x>", "special": true}),
        json!({"content": "", "lstrip": true, "rstrip": true, "single_word": true, "normalized": true, "special": false}),
        json!({"__type": "AddedToken", "content": "<image>", "special": true}),
        json!({"4294967295": {"content": "<big>", "special": true}}),
        json!({"-1": {"content": "<neg>", "special": true}}),
        json!([{"name": "default", "template": "{{ messages }}"}]),
        json!("{% for m in messages %}{{ m.role }}{% endfor %}"),
        json!({"type": "BPE", "vocab": {}, "merges": []}),
        json!({"type": "WordPiece", "vocab": {"a": 0}}),
        json!({"type": "Sequence", "pretokenizers": []}),
    ]
}

#[derive(Clone, Debug)]
enum TokFile {
    /// 0 tokenizer.json, 1 tokenizer_config.json, 2 special_tokens_map.json, 3 config.json.
    Json(usize, JsonMut),
    Bytes(usize, Vec<ByteOp>),
    Missing(usize),
}

/// tokenizer.json, tokenizer_config.json, special_tokens_map.json (and config.json's model_type):
/// one or two of them corrupted; a loaded tokenizer then encodes, decodes and renders its template.
#[test]
fn fuzz_tokenizer_files() {
    let dir = fixtures().join("tokenizer/smolvlm");
    let seeds: Vec<Value> = vec![
        small_tokenizer_json().clone(),
        serde_json::from_slice(&read(dir.join("tokenizer_config.json"))).unwrap(),
        serde_json::from_slice(&read(dir.join("special_tokens_map.json"))).unwrap(),
        json!({"model_type": "idefics3"}),
    ];
    let file_names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"];
    let tmp = tempfile::tempdir().unwrap();
    let extra = tokenizer_extra();
    let tok_file = prop_oneof![
        6 => (0usize..4, json_mut()).prop_map(|(f, m)| TokFile::Json(f, m)),
        1 => (0usize..4, byte_ops(3)).prop_map(|(f, m)| TokFile::Bytes(f, m)),
        1 => (0usize..4).prop_map(TokFile::Missing),
    ];
    let texts = prop::sample::select(vec![
        "Hello <image> world 123  456\n\tend",
        "",
        "<|endoftext|><|endoftext|>",
        "é💥\u{0}\u{202e} x",
        "<fake_token_around_image><global-img><image><image>",
    ]);
    let strategy = (prop::collection::vec(tok_file, 1..=2), texts, any::<u32>());
    fuzz("tokenizer_files", 6, strategy, |(files, text, id)| {
        let mut contents: Vec<Option<Vec<u8>>> = seeds.iter().map(|s| Some(serde_json::to_vec(s).unwrap())).collect();
        for f in &files {
            match f {
                TokFile::Json(i, m) => contents[*i] = Some(apply_json(&seeds[*i], m, &TOKENIZER_KEYS, &extra)),
                TokFile::Bytes(i, ops) => contents[*i] = contents[*i].take().map(|b| mutate_bytes(b, ops, 256)),
                TokFile::Missing(i) => contents[*i] = None,
            }
        }
        for (name, c) in file_names.iter().zip(&contents) {
            let p = tmp.path().join(name);
            match c {
                Some(b) => std::fs::write(&p, b).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        if let Some(tok) = check("Tokenizer::from_dir", Tokenizer::from_dir(tmp.path()))? {
            if let Some(ids) = check("encode", tok.encode(text, true))? {
                let mut ids = ids;
                ids.extend([id, u32::MAX, 0]);
                check("decode", tok.decode(&ids, false, Some(true)))?;
                check("decode", tok.decode(&ids, true, None))?;
                let _ = tok.convert_ids_to_tokens(&ids, true);
            }
            check("tokenize", tok.tokenize(text))?;
            let _ = (tok.template_variables(), tok.all_special_ids(), tok.convert_tokens_to_ids(text), tok.len());
            let opts = EncodeOptions { padding: Padding::Longest, truncation: true, max_length: Some(5), ..EncodeOptions::default() };
            check("encode_with", tok.encode_with(&[text, "a b"], &opts))?;
        }
        if let Some(Some(t)) = check("ChatTemplates::for_tokenizer", ChatTemplates::for_tokenizer(tmp.path()))? {
            if let Some(ct) = check("compile", t.compile(None, false))? {
                let msgs = json!([{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]);
                check("render", ct.render(&msgs, &RenderOptions::new(true, &[])))?;
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// A template using what Hugging Face templates use: loops, namespaces, macros, filters, tojson,
/// slicing, generation tags, raise_exception, strftime_now.
const RICH_TEMPLATE: &str = r#"{%- set ns = namespace(n=0, sys='') -%}
{%- macro render(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for b in c -%}{%- if b.type == 'text' -%}{{ b.text | trim }}{%- elif b.type == 'image' -%}<image>{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.sys = messages[0]['content'] -%}{%- endif -%}
{%- if tools is not none -%}Tools: {{ tools | tojson(indent=2) }}{%- endif -%}
{%- for message in messages[ns.sys and 1 or 0:] -%}
  {%- set ns.n = ns.n + 1 -%}
  {%- if message.role not in ['user', 'assistant', 'system', 'tool'] -%}{{ raise_exception('bad role ' ~ message.role) }}{%- endif -%}
  <|im_start|>{{ message['role'] | capitalize }}{{ loop.index }}/{{ loop.length }}:
  {%- if message.role == 'assistant' -%}{% generation %}{{ render(message.content) }}{% endgeneration %}
  {%- else -%}{{ render(message.content) }}{%- endif -%}
  {%- if message.thinking is defined -%}[{{ message.thinking }}]{%- endif -%}
  {{ message.get('name', '') | upper }}{{ message | length }}{{ message.items() | list | length }}
  <end_of_utterance>
{% endfor -%}
{%- if add_generation_prompt -%}Assistant:{%- endif -%}{{ strftime_now('%Y-%m-%d') | length }}{{ bos_token }}"#;

/// Jinja fragments spliced into templates: syntax pieces, deep nesting, recursion, long loops,
/// huge repeats, bad calls.
const FRAGMENTS: [&str; 40] = [
    "{%",
    "%}",
    "{{",
    "}}",
    "{#",
    "{% endfor %}",
    "{% endif %}",
    "{% for m in messages %}",
    "{% if messages %}",
    "{% else %}",
    "{% generation %}",
    "{% endgeneration %}",
    "{{ messages }}",
    "{{ messages[0]['content'][-1] }}",
    "{{ messages[99] }}",
    "{{ messages[0].content[0].type.upper() }}",
    "{{ 1 / 0 }}",
    "{{ 1 // 0 }}",
    "{{ 1 % 0 }}",
    "{{ 9223372036854775807 + 1 }}",
    "{{ -9223372036854775808 * -1 }}",
    "{{ 'a' * 100000000000 }}",
    "{{ 'ab' * 1000000 | length }}",
    "{{ ([1, 2] * 10000000000000000000) | length }}",
    "{{ ([1, 2] * 4611686018427387904) | length }}",
    "{{ range(100000) | list | length }}",
    "{{ range(10000000000) | length }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "{% set x = [] %}{% for i in range(100) %}{% set x = x + x + [i] %}{% endfor %}{{ x | length }}",
    "{{ ((((((((((((((((((((1)))))))))))))))))))) }}",
    "{{ raise_exception('boom') }}",
    "{{ messages | tojson(indent=-5, separators=[1]) }}",
    "{{ messages | tojson(indent=9999999999) }}",
    "{{ strftime_now('%Q%-%') }}",
    "{{ messages | map(attribute='content') | join(', ') }}",
    "{{ ' '.join(['a', 1, none]) }}",
    "{{ messages[0].content | string | replace('', 'x') }}",
    "{{ messages.pop() }}{{ messages.append(1) }}",
    "{% include 'x' %}{% import 'y' as z %}{% extends 'w' %}",
];

#[derive(Clone, Debug)]
enum TplOp {
    InsertFragment { at: Index, fragment: usize },
    /// Insert a fragment at a tag boundary (start, end, right after `%}` / `}}`): it stays parseable.
    InsertAtTag { at: Index, fragment: usize },
    /// Deeply nested `{% if %}` / `(` / `[` at one place.
    Nest { at: Index, depth: usize, kind: u8 },
    Bytes(Vec<ByteOp>),
}

fn tpl_op() -> impl Strategy<Value = TplOp> {
    prop_oneof![
        2 => (any::<Index>(), 0..FRAGMENTS.len()).prop_map(|(at, fragment)| TplOp::InsertFragment { at, fragment }),
        6 => (any::<Index>(), 0..FRAGMENTS.len()).prop_map(|(at, fragment)| TplOp::InsertAtTag { at, fragment }),
        1 => (any::<Index>(), prop::sample::select(vec![10usize, 100, 500, 5000]), 0u8..3).prop_map(|(at, depth, kind)| TplOp::Nest { at, depth, kind }),
        2 => byte_ops(3).prop_map(TplOp::Bytes),
    ]
}

fn char_floor(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate_template(seed: &str, ops: &[TplOp]) -> String {
    let mut s = seed.to_string();
    for op in ops {
        match op {
            TplOp::InsertFragment { at, fragment } => {
                let i = char_floor(&s, at.index(s.len() + 1));
                s.insert_str(i, FRAGMENTS[*fragment]);
            }
            TplOp::InsertAtTag { at, fragment } => {
                let mut spots: Vec<usize> = vec![0, s.len()];
                spots.extend(s.match_indices("%}").chain(s.match_indices("}}")).map(|(i, _)| i + 2));
                let i = spots[at.index(spots.len())];
                s.insert_str(i, FRAGMENTS[*fragment]);
            }
            TplOp::Nest { at, depth, kind } => {
                let i = char_floor(&s, at.index(s.len() + 1));
                let body = match kind {
                    0 => format!("{}x{}", "{% if true %}".repeat(*depth), "{% endif %}".repeat(*depth)),
                    1 => format!("{{{{ {}1{} }}}}", "(".repeat(*depth), ")".repeat(*depth)),
                    _ => format!("{{{{ {}1{} }}}}", "[".repeat(*depth), "]".repeat(*depth)),
                };
                s.insert_str(i, &body);
            }
            TplOp::Bytes(ops) => s = String::from_utf8_lossy(&mutate_bytes(s.into_bytes(), ops, usize::MAX)).into_owned(),
        }
    }
    s
}

/// Arbitrary template values (messages, tools, documents, variables).
fn template_value() -> impl Strategy<Value = TemplateValue> {
    let leaf = prop_oneof![
        Just(TemplateValue::Null),
        any::<bool>().prop_map(TemplateValue::Bool),
        prop_oneof![any::<i64>(), Just(i64::MAX), Just(i64::MIN), Just(0)].prop_map(TemplateValue::Int),
        prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e300)].prop_map(TemplateValue::Float),
        prop_oneof![
            Just("user".to_string()),
            Just("assistant".to_string()),
            Just("system".to_string()),
            Just("text".to_string()),
            Just("image".to_string()),
            Just("image_url".to_string()),
            Just(String::new()),
            ".{0,12}",
            Just("CONTINUE_FINAL_MESSAGE_TAG {{ }} {% %}".to_string()),
        ]
        .prop_map(TemplateValue::Str),
    ];
    let keys = prop_oneof![
        Just("role".to_string()),
        Just("content".to_string()),
        Just("type".to_string()),
        Just("text".to_string()),
        Just("image_url".to_string()),
        Just("url".to_string()),
        Just("thinking".to_string()),
        Just("reasoning_content".to_string()),
        Just("name".to_string()),
        "[a-z]{0,6}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(TemplateValue::List),
            prop::collection::vec((keys.clone(), inner), 0..6).prop_map(TemplateValue::Map),
        ]
    })
}

/// Mostly message lists of the usual shape, with arbitrary values inside; sometimes anything.
fn messages() -> impl Strategy<Value = TemplateValue> {
    let content = prop_oneof![
        ".{0,20}".prop_map(TemplateValue::Str),
        prop::collection::vec(
            prop_oneof![
                ".{0,10}".prop_map(|t| TemplateValue::Map(vec![("type".into(), "text".into()), ("text".into(), TemplateValue::Str(t))])),
                Just(TemplateValue::Map(vec![("type".into(), "image".into())])),
                Just(TemplateValue::Map(vec![
                    ("type".into(), "image_url".into()),
                    ("image_url".into(), TemplateValue::Map(vec![("url".into(), "http://x".into())])),
                ])),
                template_value(),
            ],
            0..4
        )
        .prop_map(TemplateValue::List),
        template_value(),
    ];
    let role = prop_oneof![Just("user"), Just("assistant"), Just("system"), Just("tool"), Just("")].prop_map(TemplateValue::from);
    let message = (role, content, prop::option::of(template_value())).prop_map(|(role, content, extra)| {
        let mut m = vec![("role".to_string(), role), ("content".to_string(), content)];
        if let Some(x) = extra {
            m.push(("thinking".to_string(), x));
        }
        TemplateValue::Map(m)
    });
    prop_oneof![
        8 => prop::collection::vec(message, 1..5).prop_map(TemplateValue::List),
        1 => Just(TemplateValue::List(Vec::new())),
        1 => template_value(),
    ]
}

#[derive(Clone, Debug)]
struct RenderInput {
    add_generation_prompt: bool,
    continue_final_message: Option<String>,
    normalize_image_urls: bool,
    tools: Option<TemplateValue>,
    documents: Option<TemplateValue>,
    variables: Vec<(String, TemplateValue)>,
}

fn render_input() -> impl Strategy<Value = RenderInput> {
    let cont = prop::option::weighted(0.3, prop_oneof![Just("content".to_string()), Just("thinking".to_string()), Just("text".to_string()), "[a-z]{0,5}"]);
    let var = (prop_oneof![Just("bos_token".to_string()), Just("eos_token".to_string()), Just("messages".to_string()), "[a-z_]{1,8}"], template_value());
    (any::<bool>(), cont, any::<bool>(), prop::option::of(template_value()), prop::option::of(template_value()), prop::collection::vec(var, 0..3)).prop_map(
        |(add_generation_prompt, continue_final_message, normalize_image_urls, tools, documents, variables)| RenderInput {
            add_generation_prompt,
            continue_final_message,
            normalize_image_urls,
            tools,
            documents,
            variables,
        },
    )
}

/// Templates compiled from mutated sources and rendered with arbitrary messages and options.
#[test]
fn fuzz_chat_template() {
    let smolvlm = std::fs::read_to_string(fixtures().join("tokenizer/template_jinja/chat_template.jinja")).unwrap();
    let seeds = [smolvlm, RICH_TEMPLATE.to_string(), String::new()];
    let strategy = (0..seeds.len(), prop::collection::vec(tpl_op(), 0..4), messages(), render_input());
    fuzz("chat_template", 7, strategy, |(s, ops, msgs, r)| {
        let source = mutate_template(&seeds[s], &ops);
        if let Some(t) = check("ChatTemplate::with_origin", ChatTemplate::with_origin(source, "fuzz.jinja"))? {
            let options = RenderOptions {
                add_generation_prompt: r.add_generation_prompt,
                continue_final_message: r.continue_final_message.clone(),
                normalize_image_urls: r.normalize_image_urls,
                tools: r.tools.clone(),
                documents: r.documents.clone(),
                variables: r.variables.clone(),
            };
            check("render_value", t.render_value(&msgs, &options))?;
            let json = serde_json::to_string(&template_json(&msgs)).unwrap();
            check("render_json", t.render_json(&json, &options))?;
        }
        Ok(())
    });
}

fn template_json(v: &TemplateValue) -> Value {
    match v {
        TemplateValue::Null => Value::Null,
        TemplateValue::Bool(b) => json!(b),
        TemplateValue::Int(i) => json!(i),
        TemplateValue::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        TemplateValue::Str(s) => json!(s),
        TemplateValue::List(l) => Value::Array(l.iter().map(template_json).collect()),
        TemplateValue::Map(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), template_json(v))).collect()),
    }
}

/// The template files of a processor folder (processor_config.json, chat_template.json,
/// chat_template.jinja, additional_chat_templates/) with one of them corrupted.
#[test]
fn fuzz_chat_template_files() {
    let cfg_dir = fixtures().join("processor/config");
    let seeds: Vec<Value> = vec![
        serde_json::from_slice(&read(cfg_dir.join("processor_config.json"))).unwrap(),
        serde_json::from_slice(&read(cfg_dir.join("chat_template.json"))).unwrap(),
        json!({"chat_template": [{"name": "default", "template": "{{ messages | length }}"}, {"name": "tool_use", "template": "{{ tools }}"}]}),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let extra = vec![json!("{{ messages }}"), json!([{"name": "default"}]), json!([{"name": 1, "template": 2}]), json!("{% for %}")];
    let keys = ["chat_template", "name", "template", "image_seq_len"];
    let strategy = (0usize..3, json_mut(), any::<bool>(), any::<bool>(), prop::option::of("[a-z_]{0,8}"));
    fuzz("chat_template_files", 8, strategy, |(which, m, jinja, extra_dir, name)| {
        let d = tmp.path();
        let _ = std::fs::remove_dir_all(d.join("additional_chat_templates"));
        for f in ["processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json"] {
            let _ = std::fs::remove_file(d.join(f));
        }
        let text = apply_json(&seeds[which], &m, &keys, &extra);
        match which {
            0 => std::fs::write(d.join("processor_config.json"), &text).unwrap(),
            1 => std::fs::write(d.join("chat_template.json"), &text).unwrap(),
            _ => std::fs::write(d.join("tokenizer_config.json"), &text).unwrap(),
        }
        if jinja {
            std::fs::write(d.join("chat_template.jinja"), "{{ messages[0].content }}").unwrap();
        }
        if extra_dir {
            std::fs::create_dir_all(d.join("additional_chat_templates")).unwrap();
            std::fs::write(d.join("additional_chat_templates/tool_use.jinja"), "{{ tools | tojson }}").unwrap();
            std::fs::write(d.join("additional_chat_templates/.jinja"), b"\xff\xfe").unwrap();
        }
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for loaded in [ChatTemplates::for_processor(d), ChatTemplates::for_tokenizer(d)] {
            if let Some(Some(t)) = check("ChatTemplates", loaded)? {
                if let Some(ct) = check("compile", t.compile(name.as_deref(), extra_dir))? {
                    check("render", ct.render(&msgs, &RenderOptions::default()))?;
                }
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Image decoding
// ---------------------------------------------------------------------------------------------

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Recomputes the CRC of every complete PNG chunk, so that edited chunks reach the decoder's
/// parsing instead of its checksum test.
fn fix_png_crcs(b: &mut [u8]) {
    let mut i = 8;
    while i + 12 <= b.len() {
        let len = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        let Some(end) = (i + 8).checked_add(len).filter(|&e| e + 4 <= b.len()) else { break };
        let crc = crc32(&b[i + 4..end]);
        b[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        i = end + 4;
    }
}

/// Seeds: fixture files (PNG in every mode, EXIF, 16-bit, JPEG, CMYK TIFF) and files encoded here
/// (GIF, BMP, WebP, TIFF, a 1xN PNG).
fn image_seeds() -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join("processor_images/images");
    let mut seeds: Vec<(String, Vec<u8>)> = [
        "exif6_30x20.png",
        "i16_23x19.png",
        "jpeg_64x48.jpg",
        "l_key_27x15.png",
        "la_33x20.png",
        "one_29x31.png",
        "p_key_25x20.png",
        "p_trns_40x30.png",
        "rgb_1x1.png",
        "cmyk_40x24.tiff",
    ]
    .iter()
    .map(|n| (n.to_string(), read(dir.join(n))))
    .collect();
    let img = image::RgbaImage::from_fn(9, 7, |x, y| image::Rgba([(x * 28) as u8, (y * 36) as u8, 99, (x * y) as u8]));
    let dynamic = image::DynamicImage::ImageRgba8(img);
    for (name, fmt, im) in [
        ("enc.gif", image::ImageFormat::Gif, dynamic.clone()),
        ("enc.bmp", image::ImageFormat::Bmp, dynamic.clone()),
        ("enc.webp", image::ImageFormat::WebP, dynamic.clone()),
        ("enc.tiff", image::ImageFormat::Tiff, dynamic.to_rgb8().into()),
        ("enc_1x13.png", image::ImageFormat::Png, dynamic.resize_exact(1, 13, image::imageops::FilterType::Nearest)),
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        im.write_to(&mut out, fmt).unwrap();
        seeds.push((name.to_string(), out.into_inner()));
    }
    seeds
}

/// Where an image format stores its size: (offset, bytes, big endian), found in the seed.
fn dim_fields(b: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let find = |pat: &[u8]| b.windows(pat.len()).position(|w| w == pat);
    if b.starts_with(b"\x89PNG") {
        out.extend([(16, 4, true), (20, 4, true)]);
    } else if b.starts_with(b"BM") {
        out.extend([(18, 4, false), (22, 4, false)]);
    } else if b.starts_with(b"GIF") {
        out.extend([(6, 2, false), (8, 2, false)]);
        if let Some(i) = b.iter().skip(13).position(|&x| x == 0x2c).map(|i| i + 13) {
            out.extend([(i + 5, 2, false), (i + 7, 2, false)]);
        }
    } else if b.starts_with(&[0xff, 0xd8]) {
        for sof in [[0xffu8, 0xc0], [0xff, 0xc2], [0xff, 0xc1]] {
            if let Some(i) = find(&sof) {
                out.extend([(i + 5, 2, true), (i + 7, 2, true)]);
            }
        }
    } else if b.starts_with(b"RIFF") {
        if let Some(i) = find(b"VP8L") {
            out.push((i + 9, 4, false));
        }
        if let Some(i) = find(b"VP8X") {
            out.extend([(i + 12, 3, false), (i + 15, 3, false)]);
        }
        if let Some(i) = find(b"VP8 ") {
            out.extend([(i + 14, 2, false), (i + 16, 2, false)]);
        }
    } else if b.starts_with(b"II*\0") {
        // IFD entries ImageWidth (256) / ImageLength (257), SHORT or LONG, count 1: value at +8.
        for i in 0..b.len().saturating_sub(12) {
            if (b[i] == 0 || b[i] == 1) && b[i + 1] == 1 && (b[i + 2] == 3 || b[i + 2] == 4) && b[i + 3] == 0 && b[i + 4..i + 8] == [1, 0, 0, 0] {
                out.push((i + 8, if b[i + 2] == 3 { 2 } else { 4 }, false));
            }
        }
    }
    out.retain(|&(o, n, _)| o + n <= b.len());
    out
}

const DIMS: [u64; 12] = [0, 1, 2, 3, 13000, 50000, 0x7fff, 0xffff, 0x1_0000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

/// Encoded images corrupted (headers claiming huge or zero sizes, truncation, flipped bits) decode
/// to an image or a typed error, under the default pixel limit and a small one.
#[test]
fn fuzz_image_decode() {
    let seeds = image_seeds();
    for (name, b) in &seeds {
        assert!(!dim_fields(b).is_empty(), "{name}: size fields not found in {:?}", &b[..b.len().min(48)]);
    }
    let max_pixels = prop_oneof![6 => Just(None), 3 => Just(Some(1u64 << 20)), 1 => prop::sample::select(vec![Some(0u64), Some(1), Some(300)])];
    let ops = prop_oneof![3 => byte_ops(1), 1 => byte_ops(4)];
    let dims = prop::collection::vec((any::<Index>(), 0..DIMS.len()), 0..=2);
    let ops = prop_oneof![2 => Just(Vec::new()), 1 => ops];
    let strategy = (0..seeds.len(), dims, ops, prop::bool::weighted(0.8), max_pixels);
    fuzz("image_decode", 9, strategy, |(s, dims, ops, fix_crc, max_pixels)| {
        let (name, seed) = &seeds[s];
        let mut bytes = seed.clone();
        let fields = dim_fields(&bytes);
        if !fields.is_empty() {
            for (at, d) in &dims {
                let (o, n, be) = fields[at.index(fields.len())];
                let v = if be { DIMS[*d].to_be_bytes() } else { DIMS[*d].to_le_bytes() };
                bytes[o..o + n].copy_from_slice(if be { &v[8 - n..] } else { &v[..n] });
            }
        }
        let mut bytes = mutate_bytes(bytes, &ops, 40);
        if fix_crc && name.ends_with(".png") {
            fix_png_crcs(&mut bytes);
        }
        if let Some(img) = check("decode_image", decode_image(&bytes, max_pixels))? {
            prop_assert!(img.width > 0 && img.height > 0);
            prop_assert!(max_pixels.is_none_or(|m| (img.width * img.height) as u64 <= m));
            check("validate", img.validate())?;
            // What a decoded file goes through next.
            check("to_rgb", img.to_rgb())?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Image processor
// ---------------------------------------------------------------------------------------------

const MODES: [PilMode; 11] = [
    PilMode::One,
    PilMode::L,
    PilMode::La,
    PilMode::P,
    PilMode::Pa,
    PilMode::Rgb,
    PilMode::Rgba,
    PilMode::Rgbx,
    PilMode::Cmyk,
    PilMode::I16,
    PilMode::I16B,
];

/// Sizes: small, 1xN / Nx1 strips, 1x1, and zero.
fn image_size() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        4 => (1usize..=40, 1usize..=40),
        2 => (Just(1usize), 1usize..=300),
        2 => (1usize..=300, Just(1usize)),
        1 => Just((1usize, 1usize)),
        1 => (0usize..=2, 0usize..=2),
    ]
}

fn lcg_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// An image as a caller builds it: mostly consistent (a palette for "P"/"PA", a transparency that
/// fits the mode), sometimes with a wrong buffer length, palette or transparency.
fn raw_image() -> impl Strategy<Value = RawImage> {
    let transparency = prop_oneof![
        Just(0i64),
        Just(-1),
        Just(255),
        Just(65535),
        Just(1 << 40),
        any::<i64>()
    ];
    (0..MODES.len(), image_size(), any::<u64>(), 0u8..14, transparency, -2i64..=2, 0usize..1100).prop_map(
        |(m, (w, h), seed, corrupt, tv, delta, bad_len)| {
            let mode = MODES[m];
            let n = (w * h * mode.bytes_per_pixel()) as i64 + if corrupt == 0 { delta } else { 0 };
            let mut data = lcg_bytes(seed, n.max(0) as usize);
            if mode == PilMode::One {
                data.iter_mut().for_each(|v| *v = if *v & 1 == 1 { 255 } else { 0 });
            }
            let palette_len = match corrupt {
                1 => Some(bad_len),
                2 => None,
                _ if matches!(mode, PilMode::P | PilMode::Pa) => Some((seed as usize % 257) * 4),
                _ => None,
            };
            let palette = palette_len.map(|len| lcg_bytes(seed ^ 0x55, len));
            let transparency = match (corrupt, mode) {
                (3, _) => Some(Transparency::Rgb(tv, 0, 255)),
                (4..=6, PilMode::One | PilMode::L | PilMode::I16 | PilMode::I16B) => Some(Transparency::Value(tv)),
                (4 | 5, PilMode::P) => Some(Transparency::Value(tv)),
                (6, PilMode::P) => Some(Transparency::PaletteAlpha(lcg_bytes(seed, bad_len % 300))),
                (4..=6, PilMode::Rgb) => Some(Transparency::Rgb(tv, (seed & 0xff) as i64, 7)),
                (4..=6, _) => Some(Transparency::Value(tv)),
                _ => None,
            };
            // A size that claims far more pixels than the buffer holds.
            let (w, h) = match corrupt {
                7 => (usize::MAX / 2 + (seed as usize & 7), h),
                8 => (w, 1 << 40),
                _ => (w, h),
            };
            RawImage { mode, width: w, height: h, data, palette, transparency }
        },
    )
}

/// Processor configs with every field drawn, sizes kept small enough to run quickly in debug (the
/// huge ones are in the JSON target).
fn processor_config() -> impl Strategy<Value = ImageProcessorConfig> {
    let size = prop_oneof![
        (0usize..=120).prop_map(ResizeTarget::LongestEdge),
        (0usize..=64, 0usize..=64).prop_map(|(height, width)| ResizeTarget::Exact { height, width }),
    ];
    let float = prop_oneof![Just(0.0f64), Just(0.5), Just(-1.0), Just(f64::NAN), Just(1e300), -2.0f64..2.0];
    let floats = prop_oneof![
        4 => prop::collection::vec(float.clone(), 3),
        2 => prop::collection::vec(float.clone(), 1),
        1 => prop::collection::vec(float, 0..=4),
    ];
    let flags = prop::collection::vec(any::<bool>(), 7);
    (flags, size, 0i64..6, 0usize..=48, prop_oneof![Just(1.0 / 255.0), Just(0.0), Just(f64::INFINITY), any::<f64>()], floats.clone(), floats).prop_map(
        |(f, size, resample, max_image_size, rescale_factor, image_mean, image_std)| ImageProcessorConfig {
            do_convert_rgb: f[0],
            do_resize: f[1],
            size,
            resample: Filter::from_pil(resample).unwrap(),
            do_image_splitting: f[2],
            max_image_size,
            do_rescale: f[3],
            rescale_factor,
            do_normalize: f[4],
            image_mean,
            image_std,
            do_pad: f[5] || f[6],
        },
    )
}

fn check_batch(images: &[Vec<RawImage>], cfg: &ImageProcessorConfig) -> Result<(), TestCaseError> {
    if let Some(out) = check("process", process(images, cfg))? {
        let plane = out.height * out.width;
        prop_assert_eq!(out.pixel_values.len(), out.batch * out.max_frames * 3 * plane);
        if let Some(mask) = &out.pixel_attention_mask {
            prop_assert_eq!(mask.len(), out.batch * out.max_frames * plane);
        }
        prop_assert_eq!(out.rows.len(), images.len());
    }
    Ok(())
}

/// Arbitrary images (every PIL mode, 1xN strips, zero sizes, wrong buffers) through processor
/// configs with every option drawn; plus `RawImage::from_pil` and `resize` on the same sizes.
#[test]
fn fuzz_image_processor() {
    let batch = prop_oneof![
        6 => prop::collection::vec(prop::collection::vec(raw_image(), 1..3), 1..3),
        1 => prop::collection::vec(prop::collection::vec(raw_image(), 0..3), 0..3),
    ];
    let pil = (
        prop_oneof![
            8 => prop::sample::select(vec!["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "I;16", "I;16B", "I;16L"]),
            1 => prop::sample::select(vec!["YCbCr", "F", "", "rgb"]),
        ],
        image_size(),
        any::<u64>(),
        prop_oneof![6 => Just(0i64), 1 => -2i64..=2],
        prop::option::of(prop_oneof![3 => (0usize..=256).prop_map(|n| n * 3), 1 => 0usize..1100]),
        prop::option::of(prop::sample::select(vec!["RGB", "RGBA", "L", "x"])),
    );
    let rs = (image_size(), prop_oneof![8 => 1usize..=4, 1 => 0usize..=6], 0usize..=80, 0usize..=80, 0i64..6);
    fuzz("image_processor", 10, (batch, processor_config(), pil, rs), |(images, cfg, pil, rs)| {
        check_batch(&images, &cfg)?;
        let (mode, (w, h), seed, delta, palette, palette_mode) = pil;
        let bpp = match mode {
            "1" => 0,
            "L" | "P" | "" | "YCbCr" | "F" => 1,
            "LA" | "PA" | "I;16" | "I;16B" | "I;16L" => 2,
            "RGB" => 3,
            _ => 4,
        };
        let n = if bpp == 0 { w.div_ceil(8) * h } else { w * h * bpp } as i64 + delta;
        let palette = palette.map(|len| lcg_bytes(seed, len));
        if let Some(img) = check("from_pil", RawImage::from_pil(mode, w, h, lcg_bytes(seed, n.max(0) as usize), palette, palette_mode))? {
            check("to_rgb", img.to_rgb())?;
            check("to_rgb_plain", img.to_rgb_plain())?;
            check("convert_rgb", img.convert_rgb())?;
        }
        let ((w, h), c, nw, nh, f) = rs;
        let data = lcg_bytes(seed, w * h * c);
        if let Some(view) = check("ImageView::new", ImageView::new(w, h, c, &data))? {
            if let Some(out) = check("resize", resize(view, nw, nh, Filter::from_pil(f).unwrap()))? {
                prop_assert_eq!(out.data.len(), nw * nh * c);
            }
        }
        Ok(())
    });
}

const PREPROCESSOR_KEYS: [&str; 17] = [
    "image_processor",
    "do_convert_rgb",
    "do_resize",
    "size",
    "longest_edge",
    "shortest_edge",
    "height",
    "width",
    "resample",
    "do_image_splitting",
    "max_image_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_pad",
];

/// preprocessor_config.json corrupted, then (when the sizes it asks for are cheap to produce in a
/// debug build, or so huge they must be refused at once) used on a small batch.
#[test]
fn fuzz_preprocessor_config() {
    let seeds: Vec<Value> = vec![
        serde_json::from_slice(&read(fixtures().join("processor/config/preprocessor_config.json"))).unwrap(),
        json!({"image_processor": {"size": [48, 32], "max_image_size": {"longest_edge": 16}, "do_image_splitting": false, "resample": 3}}),
        ImageProcessorConfig::default().to_json(),
    ];
    let extra = vec![
        json!({"longest_edge": 64}),
        json!({"height": 20, "width": 30}),
        json!({"shortest_edge": 10, "longest_edge": 0}),
        json!({"max_height": 5, "max_width": 5}),
        json!({"longest_edge": 4294967295u64}),
        json!({"longest_edge": 4294967296u64}),
        json!({"height": 1, "width": 268435456}),
        json!([1, 268435456]),
        json!([3, 2, 1]),
        json!(5),
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(4),
        json!(5),
    ];
    let images = prop::collection::vec(prop::collection::vec(raw_image(), 1..3), 1..3);
    fuzz("preprocessor_config", 11, (0..seeds.len(), json_mut(), images), |(s, m, images)| {
        let text = apply_json(&seeds[s], &m, &PREPROCESSOR_KEYS, &extra);
        let Ok(v) = serde_json::from_slice::<Value>(&text) else { return Ok(()) };
        if let Some(cfg) = check("ImageProcessorConfig::from_json", ImageProcessorConfig::from_json(&v))? {
            // Sizes in between (a 4096 px edge, 20000 px tiles) are legal and merely slow.
            let ok = |n: usize| n <= 128 || n >= 1 << 28;
            let target = match cfg.size {
                _ if !cfg.do_resize => true,
                ResizeTarget::LongestEdge(l) => l <= 128,
                ResizeTarget::Exact { height, width } => ok(height) && ok(width) && (height >= 1 << 28 || width >= 1 << 28 || height * width <= 128 * 128),
            };
            if target && ok(cfg.max_image_size) {
                check_batch(&images, &cfg)?;
            }
            prop_assert_eq!(ImageProcessorConfig::from_json(&cfg.to_json()).ok(), Some(cfg));
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Regressions: inputs the fuzzer found, each a plain test
// ---------------------------------------------------------------------------------------------

mod regressions {
    use super::*;

    fn render(source: &str) -> ferrovlm::Result<String> {
        let t = ChatTemplate::with_origin(source, "regression.jinja")?;
        t.render(&json!([{"role": "user", "content": "hi"}]), &RenderOptions::default())
    }

    fn template_error(r: ferrovlm::Result<String>) -> String {
        match r {
            Err(e @ Error::Data(ferrovlm::error::DataError::Template(_))) => e.to_string(),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    /// config_json: `scale_factor` 2^32 overflowed `hidden * s * s` in the connector loader (panic).
    #[test]
    fn config_huge_scale_factor_is_a_bad_value() {
        let mut v: Value = serde_json::from_slice(&read(model_dir().join("config.json"))).unwrap();
        v["scale_factor"] = json!(4294967296u64);
        let e = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("scale_factor"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(model_dir().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
        let e = VlmModel::from_dir(tmp.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("scale_factor"), "{e}");
    }

    /// safetensors index (found by review, not by a crash): shard names were deduplicated with a
    /// linear search per entry, quadratic in the entries of weight_map (minutes for 10^5 names).
    #[test]
    fn index_with_many_shard_names_fails_fast() {
        let tmp = tempfile::tempdir().unwrap();
        let map: serde_json::Map<String, Value> = (0..100_000).map(|i| (format!("t{i}"), json!(format!("shard-{i}.safetensors")))).collect();
        std::fs::write(tmp.path().join("model.safetensors.index.json"), json!({ "weight_map": map }).to_string()).unwrap();
        let t0 = Instant::now();
        let e = WeightStore::open_dir(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("shard-0.safetensors"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }

    /// tokenizer_files: a `decoder` nested 140 deep in tokenizer.json made the tokenizers library
    /// panic (`expect("Helper")` on serde_json's recursion limit).
    #[test]
    fn deeply_nested_tokenizer_decoder_is_a_tokenizer_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut v = small_tokenizer_json().clone();
        v["decoder"] = (0..140).fold(v["decoder"].take(), |x, _| json!([x]));
        std::fs::write(tmp.path().join("tokenizer.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        match Tokenizer::from_dir(tmp.path()) {
            Err(e @ Error::Data(ferrovlm::error::DataError::Tokenizer(_))) => assert!(e.to_string().contains("tokenizer.json"), "{e}"),
            other => panic!("expected a tokenizer error, got {:?}", other.map(|_| ())),
        }
    }

    /// chat_template: `tojson(indent=9999999999)` allocated 10 GB for the indent string (abort).
    #[test]
    fn tojson_huge_indent_is_a_template_error() {
        let e = template_error(render("{{ messages | tojson(indent=9999999999) }}"));
        assert!(e.contains("indent") && e.contains("regression.jinja"), "{e}");
        assert_eq!(render("{{ [1] | tojson(indent=2) }}").unwrap(), "[\n  1\n]");
    }

    /// chat_template: a sequence repeated 10^19 times overflows inside minijinja (a panic in debug
    /// builds): a template error, not a crash.
    #[test]
    fn sequence_repeat_overflow_does_not_panic() {
        if let Err(e) = render("{{ ([1, 2] * 10000000000000000000) | length }}") {
            assert!(e.to_string().contains("regression.jinja"), "{e}");
        }
    }

    /// chat_template: `tojson` collected a lazy sequence of 10^11 items before writing it (abort).
    #[test]
    fn tojson_of_a_huge_lazy_sequence_is_a_template_error() {
        let e = template_error(render("{{ ([1] * 100000000000) | tojson }}"));
        assert!(e.contains("longer than"), "{e}");
    }

    /// chat_template: an endless loop ran for ever (no fuel limit): now it stops with an error.
    #[test]
    fn endless_template_loop_runs_out_of_fuel() {
        let e = template_error(render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"));
        assert!(e.contains("instructions"), "{e}");
    }
}
