//! PEFT's `modules_to_save` for modules that are not (only) Linear layers: token embeddings, RMSNorm /
//! LayerNorm weights and biases, the vision embeddings (patch Conv2d, position embedding), whole decoder
//! layers... (Linear layers in `modules_to_save` get a trainable copy as their adapter, `crate::lora`.)
//!
//! PEFT's `ModulesToSaveWrapper` keeps the `original_module` frozen and runs a trainable copy while the
//! adapter is on. Here the model's parameter slots hold the copies (new storage: the originals are never
//! written), and [`SavedModules`] keeps the original tensors by transformers' parameter name. The copies
//! train like any unfrozen parameter (full-parameter training's machinery: a session makes them `Var`s);
//! with the adapters switched off (`disable_adapter()`, DPO's reference) [`VlmModel::active`] gives the
//! model with the originals back in place. `merge_and_unload` keeps the copies, `unload` restores the
//! originals. A tied head keeps the original embedding (PEFT copies the embedding module alone, so the head
//! still uses the original weight).

use candle_core::{DType, Tensor};

use super::params::{visit, Slot};
use super::VlmModel;
use crate::error::{input_err, Result};
use crate::ops::linear::Weight;

/// An original parameter: a plain tensor (norm, embedding, bias) or a Linear layer's weight.
#[derive(Clone)]
pub enum Original {
    Tensor(Tensor),
    Weight(Weight),
}

/// The original tensors of the parameters in `modules_to_save`, by transformers' name, in
/// `named_parameters()` order.
#[derive(Clone, Default)]
pub struct SavedModules {
    pub originals: Vec<(String, Original)>,
}

impl SavedModules {
    pub fn is_empty(&self) -> bool {
        self.originals.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.originals.iter().any(|(n, _)| n == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.originals.iter().map(|(n, _)| n.clone()).collect()
    }
}

fn put_back(m: &mut VlmModel, originals: &[(String, Original)]) -> Result<()> {
    visit(m, &mut |name, _, slot| {
        if let Some((_, o)) = originals.iter().find(|(n, _)| n == name) {
            match (slot, o) {
                (Slot::Tensor(t), Original::Tensor(o)) => *t = o.clone(),
                (Slot::Weight(l), Original::Weight(o)) => l.weight = o.clone(),
                _ => return input_err(format!("modules_to_save: '{name}' changed kind")),
            }
        }
        Ok(())
    })
}

impl VlmModel {
    /// Gives the parameters `names` (transformers' names, see `param_infos`) trainable copies, PEFT's
    /// `modules_to_save`: each slot gets a copy in new storage, the original is kept. Replaces an earlier
    /// set (its originals are put back first). Quantized (bitsandbytes) weights are refused.
    pub fn save_copies(&mut self, names: &[String]) -> Result<()> {
        self.restore_originals()?;
        let mut originals = Vec::new();
        visit(self, &mut |name, _, slot| {
            if !names.iter().any(|n| n == name) {
                return Ok(());
            }
            match slot {
                Slot::Tensor(t) => {
                    originals.push((name.to_string(), Original::Tensor(t.clone())));
                    *t = t.copy()?;
                }
                Slot::Weight(l) => {
                    if l.quant().is_some() {
                        return input_err(format!(
                            "modules_to_save: '{name}' is quantized; a trainable copy needs a dense weight"
                        ));
                    }
                    originals.push((name.to_string(), Original::Weight(l.weight.clone())));
                    l.weight = Weight::Dense(l.dense_weight()?.copy()?);
                }
            }
            Ok(())
        })?;
        if let Some(missing) = names.iter().find(|n| !originals.iter().any(|(o, _)| o == *n)) {
            return input_err(format!("modules_to_save: the model has no parameter '{missing}'"));
        }
        self.saved = std::sync::Arc::new(SavedModules { originals });
        Ok(())
    }

    /// PEFT's `unload()` for `modules_to_save`: the original tensors go back in place, the copies are
    /// dropped.
    pub fn restore_originals(&mut self) -> Result<()> {
        if self.saved.is_empty() {
            return Ok(());
        }
        let saved = self.saved.clone();
        put_back(self, &saved.originals)?;
        self.saved = Default::default();
        Ok(())
    }

    /// PEFT's `merge_and_unload()` for `modules_to_save`: the copies stay, the originals are dropped.
    pub fn drop_originals(&mut self) {
        self.saved = Default::default();
    }

    /// The model a pass runs: with the adapters switched off and `modules_to_save` copies present, a copy of
    /// this model with the original tensors in place (PEFT's wrapper runs `original_module` then); else
    /// None (run `self`).
    pub fn active(&self) -> Result<Option<VlmModel>> {
        if self.saved.is_empty() || self.switch.enabled() {
            return Ok(None);
        }
        let mut m = self.clone();
        put_back(&mut m, &self.saved.originals)?;
        Ok(Some(m))
    }

    /// Sets the current value of the `modules_to_save` copy `name` (its checkpoint shape) in place: the
    /// storage the model shares with a training session's tensors, so the session sees it too.
    pub fn set_saved_value(&self, name: &str, value: &Tensor) -> Result<()> {
        if !self.saved.contains(name) {
            return input_err(format!("'{name}' is not in modules_to_save"));
        }
        let mut m = self.clone();
        let mut done = false;
        visit(&mut m, &mut |n, shape, slot| {
            if n != name {
                return Ok(());
            }
            if value.dims() != shape.as_slice() {
                return input_err(format!(
                    "adapter tensor 'base_model.model.{name}' has shape {:?}, this model's modules_to_save copy \
                     expects {shape:?}",
                    value.dims()
                ));
            }
            let t = match slot {
                Slot::Tensor(t) => t.clone(),
                Slot::Weight(l) => match &l.weight {
                    Weight::Dense(w) => w.clone(),
                    _ => return input_err(format!("modules_to_save: '{name}' holds no dense copy")),
                },
            };
            let v = value.to_dtype(t.dtype())?.reshape(t.dims())?.contiguous()?;
            t.slice_set(&v, 0, 0)?;
            done = true;
            Ok(())
        })?;
        if !done {
            return input_err(format!("the model has no parameter '{name}'"));
        }
        Ok(())
    }

    /// The current values of the `modules_to_save` copies (float32, checkpoint shapes), by name.
    pub fn saved_values(&self) -> Result<Vec<(String, Tensor)>> {
        self.saved.originals.iter().map(|(n, _)| Ok((n.clone(), self.param_value(n)?.to_dtype(DType::F32)?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_vlm() -> VlmModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smolvlm_tied/checkpoint");
        VlmModel::from_dir(&dir, DType::F32, &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn copies_are_separate_and_switch_with_the_adapters() {
        let mut m = tiny_vlm();
        let norm = "model.text_model.norm.weight".to_string();
        let embed = "model.text_model.embed_tokens.weight".to_string();
        m.save_copies(&[norm.clone(), embed.clone()]).unwrap();
        let before: Vec<f32> = m.text.norm.to_vec1().unwrap();
        let ones = Tensor::ones(before.len(), DType::F32, &candle_core::Device::Cpu).unwrap();
        m.set_saved_value(&norm, &ones).unwrap();
        assert!(m.text.norm.to_vec1::<f32>().unwrap().iter().all(|&x| x == 1.0));
        // the original is untouched and comes back with the adapters off
        m.switch.set_enabled(false);
        let off = m.active().unwrap().unwrap();
        assert_eq!(off.text.norm.to_vec1::<f32>().unwrap(), before);
        m.switch.set_enabled(true);
        assert!(m.active().unwrap().is_none());
        // the tied head keeps the original embedding
        let head = m.lm_head.dense_weight().unwrap();
        let dt = m.text.embed_tokens.dtype(); // bf16 as stored in the fixture
        let row = Tensor::ones((1, 32), dt, &candle_core::Device::Cpu).unwrap();
        m.text.embed_tokens.slice_set(&row, 0, 0).unwrap(); // [1, H] into row 0 of the copy
        let row0 = |t: &Tensor| t.get(0).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row0(&m.text.embed_tokens), vec![1.0; 32]);
        assert_ne!(row0(&m.text.embed_tokens), row0(&head));
        let err = m.set_saved_value(&norm, &Tensor::ones(3, DType::F32, &candle_core::Device::Cpu).unwrap());
        assert!(err.unwrap_err().to_string().contains("[3]"));
        m.restore_originals().unwrap();
        assert_eq!(m.text.norm.to_vec1::<f32>().unwrap(), before);
        assert!(m.save_copies(&["model.nope".to_string()]).unwrap_err().to_string().contains("model.nope"));
    }
}
