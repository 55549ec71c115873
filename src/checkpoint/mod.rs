//! Weight files: locating a checkpoint (local dir or Hugging Face cache) and reading safetensors.

pub mod hub;
pub mod peft;
pub mod safetensors;
pub mod save;

pub use self::hub::{resolve_dir, resolve_model_dir, HubCache};
pub use self::safetensors::WeightStore;
