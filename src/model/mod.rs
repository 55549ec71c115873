//! The SmolVLM / Idefics3 model: SigLIP vision tower, pixel-shuffle connector, Llama text model.

pub mod cache;
pub mod compose;
pub mod connector;
mod device;
pub mod init;
pub mod modules;
pub mod params;
pub mod resize;
pub mod saved;
pub mod text;
mod text_decode;
pub mod vision;
mod vision_fast;
mod vision_fast_f32;
pub mod vlm;
mod vlm_gguf;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightStore;
use crate::error::{CheckpointError, Error, Result};

pub use vlm::{ForwardInput, ForwardOutput, VlmModel};

/// Where and in which dtype weights are materialised.
#[derive(Debug, Clone)]
pub struct LoadCtx {
    /// The compute dtype.
    pub dtype: DType,
    pub device: Device,
    /// Keep weights that are bf16 on disk in bf16 when computing in f32 (exact; see `Weight::Bf16`).
    pub bf16_storage: bool,
    /// The bf16 compute mode (a model loaded with dtype bfloat16 on the CPU): `dtype` is f32 for
    /// activations, norms, softmax, ...; every Linear weight is stored in bf16 (rounded when f32 on
    /// disk) and multiplied with the AVX512-BF16 kernel (see `Weight::PackedBf16`).
    pub bf16_compute: bool,
    /// Quantize Linear weights while loading (bitsandbytes 4-bit / 8-bit), see `crate::quant::load`.
    pub quant: Option<std::sync::Arc<crate::quant::QuantConfig>>,
}

impl LoadCtx {
    /// A tensor in the compute dtype.
    pub fn get(&self, store: &WeightStore, name: &str, shape: &[usize]) -> Result<Tensor, CheckpointError> {
        store.get(name, shape, self.dtype, &self.device)
    }

    /// A tensor in its storage dtype: bf16 when it is bf16 on disk, the compute dtype is f32 and
    /// `bf16_storage` is on; otherwise the compute dtype.
    pub fn get_storage(&self, store: &WeightStore, name: &str, shape: &[usize]) -> Result<Tensor, CheckpointError> {
        let keep = self.bf16_storage && self.dtype == DType::F32 && store.is_bf16(name);
        store.get(name, shape, if keep { DType::BF16 } else { self.dtype }, &self.device)
    }

    /// The same context with bf16 storage switched on or off.
    pub fn with_bf16_storage(&self, on: bool) -> Self {
        LoadCtx { bf16_storage: on, ..self.clone() }
    }
}

/// Polled between layers; returning true stops the computation with [`Error::Interrupted`]
/// (the Python bindings answer it from Ctrl-C).
pub type Interrupt<'a> = &'a (dyn Fn() -> bool + Sync);

/// Never interrupts.
pub fn no_interrupt() -> bool {
    false
}

pub fn check(interrupt: Interrupt) -> Result<()> {
    if interrupt() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
