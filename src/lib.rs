//! ferrovlm: SmolVLM / Idefics3 inference and fine-tuning in Rust.
//!
//! The core has no Python in it; the `python` feature adds the bindings (`src/python/`), which mirror
//! these modules one to one.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod generate;
pub mod lora;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod quant;
pub mod trace;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
