//! Error types, one per layer, folded into the crate-level [`Error`].
//!
//! The Python bindings map each variant once to a Python exception class
//! (see `src/python/errors.rs`); nothing else converts errors.

use std::path::PathBuf;

/// Problems with `config.json` (and later the processor / generation configs).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: invalid JSON: {msg}")]
    Json { file: PathBuf, msg: String },
    #[error("{file}: missing required key '{key}'")]
    MissingKey { file: PathBuf, key: String },
    #[error("{file}: key '{key}' has a bad value: {msg}")]
    BadValue { file: PathBuf, key: String, msg: String },
    #[error("{file}: unsupported model_type '{model_type}' (supported: idefics3, smolvlm, llama)")]
    UnknownModelType { file: PathBuf, model_type: String },
}

/// Problems locating or reading weight files.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: not found{hint}")]
    NotFound { path: PathBuf, hint: String },
    #[error("model '{id}' is not in the Hugging Face cache (looked in {cache})")]
    NotCached { id: String, cache: PathBuf },
    #[error("{file}: cannot read: {msg}")]
    Io { file: PathBuf, msg: String },
    #[error("{file}: corrupt or truncated safetensors file: {msg}")]
    Corrupt { file: PathBuf, msg: String },
    #[error("tensor '{name}' is missing from {files}")]
    MissingTensor { name: String, files: String },
    #[error("tensor '{name}' in {file} has shape {found:?}, expected {expected:?}")]
    BadShape { name: String, file: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor '{name}' in {file} has unsupported dtype {dtype} (supported: F32, BF16, F16)")]
    BadDtype { name: String, file: PathBuf, dtype: String },
    /// A GGUF file whose bytes do not follow the format (truncated, bad magic, counts or offsets
    /// past the end, a row length that is not whole blocks, duplicate names, ...).
    #[error("{file}: corrupt or truncated GGUF file: {msg}")]
    Gguf { file: PathBuf, msg: String },
    /// A well-formed GGUF file using something ferrovlm does not read (version 1, big-endian, a
    /// tensor type, an architecture or a tokenizer model).
    #[error("{file}: unsupported GGUF {what}")]
    GgufUnsupported { file: PathBuf, what: String },
    /// A GGUF metadata key that is missing or holds a value of the wrong type or range.
    #[error("{file}: GGUF metadata '{key}': expected {expected}, found {found}")]
    GgufMetadata { file: PathBuf, key: String, expected: String, found: String },
}

/// Problems with the inputs of a call (shapes, token counts, ids).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Invalid(String),
}

/// Problems turning user data into model inputs (images, text, templates). Messages name the
/// sample index, file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Undecodable, empty, oversized or otherwise unusable image.
    #[error("{0}")]
    Image(String),
    /// tokenizer.json / tokenizer_config.json problems, unknown tokens.
    #[error("{0}")]
    Tokenizer(String),
    /// A chat template that fails to compile or raises.
    #[error("{0}")]
    Template(String),
    /// Inconsistent processor inputs (image/placeholder counts, unknown content types, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Crate-level error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Data(#[from] DataError),
    /// A tensor operation failed: an internal bug, not a user error.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A device that this build or this machine cannot give (CUDA without the `cuda` feature, without
    /// a driver or GPU, an unknown device name), see `crate::device`.
    #[error("{0}")]
    Device(String),
    /// The caller asked to stop (Ctrl-C in Python).
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for an [`InputError`].
pub fn input_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Input(InputError::Invalid(msg.into())))
}

/// The message a panic carried (`panic!("...")` with a literal or a formatted string), if any.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned())
}
