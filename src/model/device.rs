//! Moving a model between devices (`model.to("cuda")`): every weight, the RoPE table and the tied head
//! go to the new device; what only the CPU kernels can use is rebuilt for the device it lands on.

use candle_core::{DType, Device};

use super::params::{visit, Slot};
use super::VlmModel;
use crate::error::{Error, Result};
use crate::ops::linear::Weight;
use crate::ops::Linear;

/// `lin`'s weight on `dev`. Packed bf16 copies (the CPU's bf16 kernels) do not travel: the bf16 weight
/// does, and is packed again when it comes back to a CPU in the bf16 compute mode. Quantized weights
/// stay in host memory in their blocks (their products dequantize onto the input's device).
fn move_linear(lin: &mut Linear, dev: &Device, bf16_compute: bool) -> Result<()> {
    if lin.adapter.is_some() {
        return Err(Error::Device(
            "move the model to its device before attaching adapters (call .to(...) or load with device_map= \
             before get_peft_model / the trainer), or merge them first"
                .into(),
        ));
    }
    let bias = lin.bias.as_ref().map(|b| b.to_device(dev)).transpose()?;
    let moved = match &lin.weight {
        Weight::Quant { .. } => Linear { bias, ..lin.clone() },
        Weight::Dense(w) => Linear { weight: Weight::Dense(w.to_device(dev)?), bias, ..lin.clone() },
        Weight::Bf16(w) | Weight::PackedBf16 { w, .. } | Weight::Autocast { w, .. } => {
            let w = w.to_device(dev)?;
            if dev.is_cpu() && bf16_compute {
                Linear::bf16_compute(w, bias)?
            } else if w.dtype() == DType::BF16 {
                Linear { weight: Weight::Bf16(w), bias, ..lin.clone() }
            } else {
                Linear { weight: Weight::Dense(w), bias, ..lin.clone() }
            }
        }
    };
    *lin = moved;
    Ok(())
}

impl VlmModel {
    /// This model on `dev` (a copy of every tensor; the same model when it is there already). A model
    /// with adapters or trainable parameters is refused: move it before attaching them, as the
    /// trainers' device comes from the model.
    pub fn to_device(&self, dev: &Device) -> Result<VlmModel> {
        if self.device.same_device(dev) {
            return Ok(self.clone());
        }
        if !self.saved.is_empty() || self.param_infos().iter().any(|p| p.trainable) {
            return Err(Error::Device(
                "a model with trainable parameters (modules_to_save, full fine-tuning) cannot change device; \
                 move it before training"
                    .into(),
            ));
        }
        let mut m = self.clone();
        let bf16_compute = m.bf16_compute;
        visit(&mut m, &mut |_, _, slot| {
            match slot {
                Slot::Tensor(t) => *t = t.to_device(dev)?,
                Slot::Weight(lin) => move_linear(lin, dev, bf16_compute)?,
            }
            Ok(())
        })?;
        // The tied head shares the embedding (not visited above): it shares the moved one.
        if m.config.tie_word_embeddings && m.lm_head.quant().is_none() {
            let emb = m.text.embed_tokens.clone();
            m.lm_head = if dev.is_cpu() && bf16_compute {
                Linear::bf16_compute(emb, None)?
            } else {
                Linear::with_compute_dtype(emb, None, m.dtype)?
            };
        }
        m.text.rope = m.text.rope.to_device(dev)?;
        m.device = dev.clone();
        Ok(m)
    }
}
