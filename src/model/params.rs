//! The model's own parameters under transformers' names (`named_parameters()`), and full-parameter
//! training: making a chosen set of them trainable.
//!
//! A trainable parameter is an autograd `Var` (f32). [`VlmModel::with_trainable`] returns the copy a
//! training session runs (the chosen tensors copied once into `Var`s); [`VlmModel::detached`] of that
//! copy is what the user's model holds meanwhile: the same storage without autograd tracking, so the
//! optimizer's in-place updates are seen by inference (generate, evaluation, saving) at no cost, and
//! inference keeps its untracked fast paths. The tensors the copy replaced are left untouched: they are
//! the frozen starting point (TRL's DPO reference model without PEFT).

use std::collections::HashSet;

use candle_core::{DType, Tensor, Var};

use super::modules::{text_prefix, CONNECTOR_PROJ, LM_HEAD, VISION};
use super::resize::{relinear, tied_head};
use super::VlmModel;
use crate::error::{input_err, Result};
use crate::ops::linear::Weight;
use crate::ops::Linear;
use crate::quant::QuantWeight;

/// Where a parameter lives: a plain tensor (norm, embedding, bias) or a Linear layer's weight.
pub enum Slot<'a> {
    Tensor(&'a mut Tensor),
    Weight(&'a mut Linear),
}

/// One parameter as `named_parameters()` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    /// The checkpoint's shape (the patch embedding is a Conv2d: [D, C, P, P]).
    pub shape: Vec<usize>,
    /// How it is stored: "float32", "bfloat16", or the quantization ("bnb4bit", "bnb8bit", "gguf").
    pub storage: &'static str,
    /// Whether it is an autograd `Var` (being trained).
    pub trainable: bool,
}

type Visit<'f> = dyn FnMut(&str, Vec<usize>, Slot) -> Result<()> + 'f;

fn linear(f: &mut Visit, name: &str, lin: &mut Linear, shape: Option<Vec<usize>>) -> Result<()> {
    let shape = shape.unwrap_or_else(|| vec![lin.out_features, lin.in_features]);
    f(&format!("{name}.weight"), shape, Slot::Weight(lin))?;
    let out = lin.out_features;
    if let Some(b) = lin.bias.as_mut() {
        f(&format!("{name}.bias"), vec![out], Slot::Tensor(b))?;
    }
    Ok(())
}

fn tensor(f: &mut Visit, name: String, t: &mut Tensor) -> Result<()> {
    let shape = t.dims().to_vec();
    f(&name, shape, Slot::Tensor(t))
}

/// Visits every parameter in transformers' `named_parameters()` order. A tied head is not visited
/// (transformers lists the shared tensor once, as the embedding).
pub fn visit(m: &mut VlmModel, f: &mut Visit) -> Result<()> {
    if let Some(v) = &mut m.vision {
        let (d, c, p) = (v.cfg.hidden_size, v.cfg.num_channels, v.cfg.patch_size);
        linear(f, &format!("{VISION}.embeddings.patch_embedding"), &mut v.patch_embedding, Some(vec![d, c, p, p]))?;
        tensor(f, format!("{VISION}.embeddings.position_embedding.weight"), &mut v.position_embedding)?;
        for (i, l) in v.layers.iter_mut().enumerate() {
            let lp = format!("{VISION}.encoder.layers.{i}");
            for (n, lin) in super::vision::VisionLayer::LINEARS.iter().zip(l.linears_mut()).take(4) {
                linear(f, &format!("{lp}.{n}"), lin, None)?;
            }
            tensor(f, format!("{lp}.layer_norm1.weight"), &mut l.layer_norm1.weight)?;
            tensor(f, format!("{lp}.layer_norm1.bias"), &mut l.layer_norm1.bias)?;
            linear(f, &format!("{lp}.mlp.fc1"), &mut l.fc1, None)?;
            linear(f, &format!("{lp}.mlp.fc2"), &mut l.fc2, None)?;
            tensor(f, format!("{lp}.layer_norm2.weight"), &mut l.layer_norm2.weight)?;
            tensor(f, format!("{lp}.layer_norm2.bias"), &mut l.layer_norm2.bias)?;
        }
        tensor(f, format!("{VISION}.post_layernorm.weight"), &mut v.post_layernorm.weight)?;
        tensor(f, format!("{VISION}.post_layernorm.bias"), &mut v.post_layernorm.bias)?;
    }
    if let Some(c) = &mut m.connector {
        linear(f, CONNECTOR_PROJ, &mut c.proj, None)?;
    }
    let tp = text_prefix(&m.config);
    let t = &mut m.text;
    tensor(f, format!("{tp}.embed_tokens.weight"), &mut t.embed_tokens)?;
    for (i, l) in t.layers.iter_mut().enumerate() {
        let lp = format!("{tp}.layers.{i}");
        for (n, lin) in super::text::TextLayer::LINEARS.iter().zip(l.linears_mut()) {
            linear(f, &format!("{lp}.{n}"), lin, None)?;
        }
        tensor(f, format!("{lp}.input_layernorm.weight"), &mut l.input_layernorm)?;
        tensor(f, format!("{lp}.post_attention_layernorm.weight"), &mut l.post_attention_layernorm)?;
    }
    tensor(f, format!("{tp}.norm.weight"), &mut t.norm)?;
    if !m.config.tie_word_embeddings {
        linear(f, LM_HEAD, &mut m.lm_head, None)?;
    }
    Ok(())
}

fn storage_name(w: &Weight) -> &'static str {
    match w {
        Weight::Dense(t) | Weight::Autocast { w: t, .. } if t.dtype() == DType::F32 => "float32",
        Weight::Quant { q, .. } => match q.as_ref() {
            QuantWeight::FourBit(_) => "bnb4bit",
            QuantWeight::Int8(_) => "bnb8bit",
            QuantWeight::Ggml(_) => "gguf",
        },
        _ => "bfloat16",
    }
}

/// `t` as a fresh f32 `Var` (a copy: the tensor it came from stays as it was).
fn new_var(t: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?.as_tensor().clone())
}

impl VlmModel {
    /// Every parameter (name, checkpoint shape, storage, trainable) in `named_parameters()` order.
    pub fn param_infos(&self) -> Vec<ParamInfo> {
        let mut m = self.clone();
        let mut out = Vec::new();
        let r = visit(&mut m, &mut |name, shape, slot| {
            let (storage, trainable) = match slot {
                Slot::Tensor(t) => (if t.dtype() == DType::F32 { "float32" } else { "bfloat16" }, t.is_variable()),
                Slot::Weight(l) => (storage_name(&l.weight), l.weight_tensor().is_some_and(|w| w.is_variable())),
            };
            out.push(ParamInfo { name: name.to_string(), shape, storage, trainable });
            Ok(())
        });
        debug_assert!(r.is_ok()); // the closure never fails
        out
    }

    /// The trainable (`Var`) parameters with their names and checkpoint shapes, in `named_parameters()`
    /// order.
    pub fn param_vars(&self) -> Vec<(String, Var, Vec<usize>)> {
        let mut m = self.clone();
        let mut out = Vec::new();
        let _ = visit(&mut m, &mut |name, shape, slot| {
            let t = match slot {
                Slot::Tensor(t) => Some(t.clone()),
                Slot::Weight(l) => l.weight_tensor().cloned(),
            };
            if let Some(t) = t.filter(|t| t.is_variable()) {
                if let Ok(v) = Var::from_tensor(&t) {
                    out.push((name.to_string(), v, shape)); // shares the storage: `t` is a variable
                }
            }
            Ok(())
        });
        out
    }

    /// A copy of this model in which the parameters named in `names` (transformers' names, see
    /// [`Self::param_infos`]) are f32 autograd `Var`s, copied from their current values, and every other
    /// parameter is not. bf16-stored weights are widened (exact); GGUF-quantized Linears are dequantized
    /// (as transformers does when it loads a GGUF file); bitsandbytes-quantized ones are refused, as
    /// transformers' Trainer refuses them. A tied head follows the embedding.
    pub fn with_trainable(&self, names: &[String]) -> Result<VlmModel> {
        let want: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut m = self.detached()?;
        let mut seen = HashSet::new();
        visit(&mut m, &mut |name, _, slot| {
            if !want.contains(name) {
                return Ok(());
            }
            seen.insert(name.to_string());
            match slot {
                Slot::Tensor(t) => *t = new_var(t)?,
                Slot::Weight(l) => {
                    if let Weight::Quant { q, .. } = &l.weight {
                        if !matches!(q.as_ref(), QuantWeight::Ggml(_)) {
                            return input_err(format!(
                                "'{name}' is quantized with bitsandbytes: quantized weights cannot be trained (attach \
                                 adapters with peft_config or get_peft_model, or freeze it: requires_grad = False)"
                            ));
                        }
                    }
                    l.weight = Weight::Dense(new_var(&l.dense_weight()?)?);
                }
            }
            Ok(())
        })?;
        if let Some(missing) = names.iter().find(|n| !seen.contains(n.as_str())) {
            return input_err(format!("the model has no parameter '{missing}' (see named_parameters())"));
        }
        // A tied head follows the trained embedding, unless the embedding is a `modules_to_save` copy: PEFT
        // copies the embedding module alone, the head keeps the original weight.
        let embed = format!("{}.embed_tokens.weight", text_prefix(&m.config));
        if m.config.tie_word_embeddings && m.text.embed_tokens.is_variable() && !m.saved.contains(&embed) {
            let (out, inp) = (m.lm_head.out_features, m.lm_head.in_features);
            m.lm_head.weight = Weight::Dense(m.text.embed_tokens.clone());
            (m.lm_head.out_features, m.lm_head.in_features) = (out, inp);
        }
        Ok(m)
    }

    /// A copy of this model without autograd tracking: every `Var` parameter becomes a plain tensor over
    /// the same storage (updates made through the `Var` stay visible).
    pub fn detached(&self) -> Result<VlmModel> {
        let mut m = self.clone();
        visit(&mut m, &mut |_, _, slot| {
            match slot {
                Slot::Tensor(t) if t.is_variable() => *t = t.detach(),
                Slot::Weight(l) => {
                    if let Weight::Dense(w) = &l.weight {
                        if w.is_variable() {
                            l.weight = Weight::Dense(w.detach());
                        }
                    }
                }
                Slot::Tensor(_) => {}
            }
            Ok(())
        })?;
        if m.config.tie_word_embeddings {
            if let Weight::Dense(w) = &m.lm_head.weight {
                if w.is_variable() {
                    m.lm_head.weight = Weight::Dense(m.text.embed_tokens.clone());
                }
            }
        }
        Ok(m)
    }

    /// The parameter `name` (see [`Self::param_infos`]) in f32 with its checkpoint shape, detached.
    pub fn param_value(&self, name: &str) -> Result<Tensor> {
        let mut m = self.clone();
        let mut found = None;
        visit(&mut m, &mut |n, shape, slot| {
            if n == name {
                let t = match slot {
                    Slot::Tensor(t) => t.clone(),
                    Slot::Weight(l) => l.dense_weight()?,
                };
                found = Some(t.detach().to_dtype(DType::F32)?.reshape(shape)?);
            }
            Ok(())
        })?;
        match found {
            Some(t) => Ok(t),
            None => input_err(format!("the model has no parameter '{name}' (see named_parameters())")),
        }
    }

    /// Sets the parameter `name` (see [`Self::param_infos`]) to `value`, given in its checkpoint shape and
    /// stored as the parameter is (f32, bf16, bf16 packed): `param.copy_(value)` under `torch.no_grad()`.
    /// An adapter on the Linear stays; a tied head follows the embedding. Quantized weights are refused.
    pub fn set_param_value(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let (dtype, device) = (self.dtype, self.device.clone());
        let mut found = false;
        visit(self, &mut |n, shape, slot| {
            if n != name {
                return Ok(());
            }
            found = true;
            if value.dims() != shape.as_slice() {
                return input_err(format!(
                    "'{name}' has shape {shape:?}; the value given has shape {:?}",
                    value.dims()
                ));
            }
            let v = value.to_device(&device)?;
            match slot {
                Slot::Tensor(t) => *t = v.to_dtype(t.dtype())?,
                Slot::Weight(l) => {
                    if l.quant().is_some() {
                        return input_err(format!(
                            "'{name}' is stored quantized ({}): it cannot be set; load the model unquantized",
                            storage_name(&l.weight)
                        ));
                    }
                    let w = v.reshape((l.out_features, l.in_features))?;
                    let mut new = relinear(l, w, l.bias.clone(), dtype)?;
                    new.adapter = l.adapter.take();
                    *l = new;
                }
            }
            Ok(())
        })?;
        if !found {
            return input_err(format!("the model has no parameter '{name}' (see named_parameters())"));
        }
        let embed = format!("{}.embed_tokens.weight", text_prefix(&self.config));
        if name == embed && self.config.tie_word_embeddings && self.lm_head.quant().is_none() {
            let mut head = tied_head(&self.text.embed_tokens, self.dtype, self.bf16_compute)?;
            head.adapter = self.lm_head.adapter.take();
            self.lm_head = head;
        }
        Ok(())
    }

    /// Whether any parameter of the vision tower or the connector is trainable (image features then
    /// change with training: no cache by pixels).
    pub fn vision_side_trains(&self) -> bool {
        self.param_infos()
            .iter()
            .any(|p| p.trainable && (p.name.starts_with(VISION) || p.name.starts_with("model.connector.")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixtures' tiny checkpoints: smolvlm_tied (tied embeddings, bf16 on disk) or idefics3_gqa.
    fn tiny_vlm(tied: bool) -> VlmModel {
        let name = if tied { "smolvlm_tied" } else { "idefics3_gqa" };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).join("checkpoint");
        VlmModel::from_dir(&dir, DType::F32, &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn lists_named_parameters_in_transformers_order() {
        let m = tiny_vlm(true);
        let names: Vec<String> = m.param_infos().into_iter().map(|p| p.name).collect();
        assert_eq!(names[0], "model.vision_model.embeddings.patch_embedding.weight");
        assert_eq!(names[3], "model.vision_model.encoder.layers.0.self_attn.k_proj.weight");
        assert!(names.contains(&"model.connector.modality_projection.proj.weight".to_string()));
        assert_eq!(names.last().map(String::as_str), Some("model.text_model.norm.weight")); // tied: no lm_head
        let untied = tiny_vlm(false);
        assert_eq!(untied.param_infos().last().map(|p| p.name.as_str()), Some("lm_head.weight"));
    }

    #[test]
    fn trainable_copy_shares_storage_with_its_detached_view() {
        let m = tiny_vlm(true);
        let names = vec!["model.text_model.embed_tokens.weight".to_string(), "model.text_model.norm.weight".into()];
        let t = m.with_trainable(&names).unwrap();
        let vars = t.param_vars();
        assert_eq!(vars.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>(), names);
        // the tied head is the embedding's Var
        assert!(t.lm_head.weight_tensor().unwrap().is_variable());
        let view = t.detached().unwrap();
        assert!(view.param_vars().is_empty());
        let (_, norm, _) = &vars[1];
        norm.set(&norm.as_tensor().ones_like().unwrap().affine(3.0, 0.0).unwrap()).unwrap();
        let seen: Vec<f32> = view.text.norm.to_vec1().unwrap();
        assert!(seen.iter().all(|&x| x == 3.0));
        // the original model is untouched
        let orig: Vec<f32> = m.text.norm.to_vec1().unwrap();
        assert!(orig.iter().all(|&x| x != 3.0));
        let err = m.with_trainable(&["model.nope".to_string()]).err().unwrap().to_string();
        assert!(err.contains("model.nope"), "{err}");
    }
}
