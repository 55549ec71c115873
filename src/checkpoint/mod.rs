//! Weight files: locating a checkpoint (local dir or Hugging Face cache), reading safetensors and
//! GGUF files, and writing them.

pub mod gguf;
mod gguf_chat_template;
pub mod gguf_export;
pub mod gguf_llama;
pub mod gguf_mmproj;
pub mod gguf_naming;
pub mod gguf_value;
pub mod gguf_vocab;
pub mod gguf_write;
pub mod hub;
pub mod peft;
pub mod safetensors;
pub mod save;
pub mod shard;
pub mod store;

pub use self::gguf::{GgufFile, GgufTensorInfo};
pub use self::gguf_export::{GgufExportOptions, GgufQuantMethod};
pub use self::gguf_llama::{GgufLlama, GgufLlamaConfig, GgufRows};
pub use self::gguf_mmproj::GgufClip;
pub use self::gguf_value::{GgufArray, GgufValue, GgufValueType};
pub use self::gguf_write::GgufWriter;
pub use self::hub::{resolve_dir, resolve_model_dir, HubCache};
pub use self::store::WeightStore;
