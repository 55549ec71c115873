//! transformers' module names of `Idefics3ForConditionalGeneration`, written once.
//!
//! Each layer type lists its Linear layers as `"name" => field` in one place (the `linears!` macro
//! below), which gives both the shared and the mutable views; [`VlmModel::linears`] prefixes them,
//! and [`module_names`] builds the whole `named_modules()` tree (parents, norms, embeddings) from the
//! same lists for PEFT's name matching (exported to Python as `_core.module_names`).

use super::text::TextLayer;
use super::vision::VisionLayer;
use super::VlmModel;
use crate::ops::Linear;

pub const VISION: &str = "model.vision_model";
pub const CONNECTOR_PROJ: &str = "model.connector.modality_projection.proj";
pub const TEXT: &str = "model.text_model";
/// The language model's prefix in `LlamaForCausalLM` (a text-only model).
pub const TEXT_ONLY: &str = "model";
pub const LM_HEAD: &str = "lm_head";

/// `impl $layer { LINEARS, linears(), linears_mut() }` from one `"name" => field` list.
macro_rules! linears {
    ($layer:ty, $n:literal, [$($name:literal => $field:ident),* $(,)?]) => {
        impl $layer {
            /// Names of the layer's Linear layers (relative to the layer), in module order.
            pub const LINEARS: [&'static str; $n] = [$($name),*];
            /// The Linear layers, in the order of [`Self::LINEARS`].
            pub fn linears(&self) -> [&Linear; $n] {
                [$(&self.$field),*]
            }
            /// [`Self::linears`], mutable.
            pub fn linears_mut(&mut self) -> [&mut Linear; $n] {
                [$(&mut self.$field),*]
            }
        }
    };
}

linears!(VisionLayer, 6, [
    "self_attn.k_proj" => k_proj,
    "self_attn.v_proj" => v_proj,
    "self_attn.q_proj" => q_proj,
    "self_attn.out_proj" => out_proj,
    "mlp.fc1" => fc1,
    "mlp.fc2" => fc2,
]);

linears!(TextLayer, 7, [
    "self_attn.q_proj" => q_proj,
    "self_attn.k_proj" => k_proj,
    "self_attn.v_proj" => v_proj,
    "self_attn.o_proj" => o_proj,
    "mlp.gate_proj" => gate_proj,
    "mlp.up_proj" => up_proj,
    "mlp.down_proj" => down_proj,
]);

fn vision_layer(i: usize) -> String {
    format!("{VISION}.encoder.layers.{i}")
}

/// Where the language model lives: `model.text_model` in the VLM, `model` in `LlamaForCausalLM`.
pub fn text_prefix(config: &crate::config::ModelConfig) -> &'static str {
    if config.text_only() {
        TEXT_ONLY
    } else {
        TEXT
    }
}

fn text_layer(prefix: &str, i: usize) -> String {
    format!("{prefix}.layers.{i}")
}

impl VlmModel {
    /// Every Linear layer with its transformers module name (`model.text_model.layers.0.self_attn.q_proj`,
    /// ..., `lm_head`), in module order. The vision patch embedding is a Conv2d there and is not listed.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.vision.iter().flat_map(|v| v.layers.iter().enumerate()) {
            out.extend(
                VisionLayer::LINEARS.iter().zip(l.linears()).map(|(n, lin)| (format!("{}.{n}", vision_layer(i)), lin)),
            );
        }
        if let Some(c) = &self.connector {
            out.push((CONNECTOR_PROJ.to_string(), &c.proj));
        }
        let tp = text_prefix(&self.config);
        for (i, l) in self.text.layers.iter().enumerate() {
            out.extend(
                TextLayer::LINEARS.iter().zip(l.linears()).map(|(n, lin)| (format!("{}.{n}", text_layer(tp, i)), lin)),
            );
        }
        out.push((LM_HEAD.to_string(), &self.lm_head));
        out
    }

    /// [`Self::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.vision.iter_mut().flat_map(|v| v.layers.iter_mut().enumerate()) {
            out.extend(
                VisionLayer::LINEARS
                    .iter()
                    .zip(l.linears_mut())
                    .map(|(n, lin)| (format!("{}.{n}", vision_layer(i)), lin)),
            );
        }
        if let Some(c) = &mut self.connector {
            out.push((CONNECTOR_PROJ.to_string(), &mut c.proj));
        }
        let tp = text_prefix(&self.config);
        for (i, l) in self.text.layers.iter_mut().enumerate() {
            out.extend(
                TextLayer::LINEARS
                    .iter()
                    .zip(l.linears_mut())
                    .map(|(n, lin)| (format!("{}.{n}", text_layer(tp, i)), lin)),
            );
        }
        out.push((LM_HEAD.to_string(), &mut self.lm_head));
        out
    }

    /// A copy of this model for `bf16=True` training (transformers' CPU autocast): every frozen f32
    /// Linear weight also gets a bf16 packed copy that its products use ([`Linear::with_bf16_autocast`]).
    /// Adapters, norms, embeddings and attention are shared with `self` and stay f32; trainable tensors
    /// are the same `Var`s, so the optimizer's updates are seen by both models.
    pub fn with_bf16_autocast(&self) -> candle_core::Result<VlmModel> {
        let mut m = self.clone();
        for (_, lin) in m.linears_mut() {
            *lin = lin.with_bf16_autocast()?;
        }
        Ok(m)
    }

    /// Whether an adapter sits on a Linear of the vision tower or the connector, or a `modules_to_save`
    /// copy replaces one of their parameters (image features then depend on the adapter).
    pub fn vision_side_has_adapters(&self) -> bool {
        let tp = format!("{}.", text_prefix(&self.config));
        let vision_side = |n: &str| !n.starts_with(&tp) && n != LM_HEAD && !n.starts_with("lm_head.");
        self.vision.is_some()
            && (self.linears().iter().any(|(n, l)| l.adapter.is_some() && vision_side(n))
                || self.saved.originals.iter().any(|(n, _)| vision_side(n)))
    }
}

/// Every module name of the transformers model (`""`, parents, Linear layers, norms, embeddings), for
/// PEFT's name matching; a parent comes just before its first child. `vision_layers` None: a
/// language model alone (`LlamaForCausalLM`, its layers under `model.`).
pub fn module_names(vision_layers: Option<usize>, text_layers: usize) -> Vec<String> {
    let mut names = vec![String::new()];
    let mut seen = std::collections::HashSet::from([String::new()]);
    let mut add = |n: &str| {
        let mut end = 0;
        for part in n.split('.') {
            end += part.len();
            let p = &n[..end];
            if seen.insert(p.to_string()) {
                names.push(p.to_string());
            }
            end += 1; // the dot
        }
    };
    if let Some(vision_layers) = vision_layers {
        add(&format!("{VISION}.embeddings.patch_embedding"));
        add(&format!("{VISION}.embeddings.position_embedding"));
        for i in 0..vision_layers {
            let p = vision_layer(i);
            add(&format!("{p}.layer_norm1"));
            for n in VisionLayer::LINEARS {
                add(&format!("{p}.{n}"));
                if n.ends_with("out_proj") {
                    add(&format!("{p}.layer_norm2"));
                }
            }
        }
        add(&format!("{VISION}.post_layernorm"));
        add(CONNECTOR_PROJ);
    }
    let tp = if vision_layers.is_some() { TEXT } else { TEXT_ONLY };
    add(&format!("{tp}.embed_tokens"));
    for i in 0..text_layers {
        let p = text_layer(tp, i);
        for n in TextLayer::LINEARS {
            add(&format!("{p}.{n}"));
        }
        add(&format!("{p}.input_layernorm"));
        add(&format!("{p}.post_attention_layernorm"));
    }
    add(&format!("{tp}.norm"));
    add(&format!("{tp}.rotary_emb"));
    add(LM_HEAD);
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_tree_has_parents_before_children_and_every_linear() {
        let names = module_names(Some(1), 1);
        assert_eq!(&names[..4], ["", "model", "model.vision_model", "model.vision_model.embeddings"]);
        for n in VisionLayer::LINEARS {
            assert!(names.contains(&format!("model.vision_model.encoder.layers.0.{n}")), "{n}");
        }
        for n in TextLayer::LINEARS {
            assert!(names.contains(&format!("model.text_model.layers.0.{n}")), "{n}");
        }
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("model.text_model.layers.0") < pos("model.text_model.layers.0.self_attn.q_proj"));
        assert_eq!(names.last().map(String::as_str), Some("lm_head"));
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn a_language_model_alone_has_llama_names() {
        let names = module_names(None, 2);
        assert_eq!(&names[..4], ["", "model", "model.embed_tokens", "model.layers"]);
        assert!(names.contains(&"model.layers.1.mlp.down_proj".to_string()));
        assert!(!names.iter().any(|n| n.contains("vision") || n.contains("connector") || n.contains("text_model")));
        assert_eq!(names.last().map(String::as_str), Some("lm_head"));
    }
}
