//! The SmolVLM / Idefics3 model: SigLIP vision tower, pixel-shuffle connector, Llama text model.

pub mod cache;
pub mod connector;
pub mod text;
pub mod vision;
pub mod vlm;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightStore;
use crate::error::{CheckpointError, Error, Result};

pub use vlm::{ForwardInput, ForwardOutput, VlmModel};

/// Where and in which dtype weights are materialised.
#[derive(Debug, Clone)]
pub struct LoadCtx {
    pub dtype: DType,
    pub device: Device,
}

impl LoadCtx {
    pub fn get(&self, store: &WeightStore, name: &str, shape: &[usize]) -> Result<Tensor, CheckpointError> {
        store.get(name, shape, self.dtype, &self.device)
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
