//! A SmolVLM / Idefics3 model from parts: a language model alone (`LlamaForCausalLM`, from safetensors
//! or GGUF) plus a vision tower, either new (transformers' `_init_weights`, see `init.rs`) or taken from
//! another Idefics3 / SmolVLM checkpoint (with its connector when it fits), then the token embeddings
//! resized for the tokenizer's added image tokens (`resize.rs`).
//!
//! What transformers would hold after the same steps (`Idefics3ForConditionalGeneration(config)`, the
//! language model's weights loaded into `model.text_model` / `lm_head`, `resize_token_embeddings`):
//! - the text weights are the language model's exact values: GGUF blocks are dequantized (transformers
//!   reads a GGUF file dequantized to float32), so the model is dense and trainable;
//! - the config: `text_config` is the language model's config (`model_type: llama`), `vision_config`
//!   the tower's (`idefics3_vision`), `scale_factor`, `image_token_id`, `tie_word_embeddings` from
//!   the language model.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::connector::Connector;
use super::init::{random_connector, random_vision};
use super::resize::{relinear, resize_token_embeddings, text_initializer_range, tied_head, ResizeOptions};
use super::vision::VisionModel;
use super::{LoadCtx, VlmModel};
use crate::checkpoint::WeightStore;
use crate::config::{ModelConfig, VisionConfig};
use crate::error::{input_err, ConfigError, Result};

/// Where the vision tower comes from.
#[derive(Clone)]
pub enum VisionSource {
    /// A new tower for `config`, weights ~ N(0, `initializer_range`).
    Random { config: VisionConfig, initializer_range: f64 },
    /// The tower (and connector) of another Idefics3 / SmolVLM model; `raw` is its `vision_config`
    /// JSON, `origin` names it in errors.
    Pretrained {
        vision: Box<VisionModel>,
        connector: Option<Connector>,
        scale_factor: usize,
        raw: Value,
        origin: String,
    },
}

impl VisionSource {
    /// The vision tower and connector of the hub-layout checkpoint in `dir` (only those weights are read).
    pub fn from_dir(dir: &Path, ctx: &LoadCtx) -> Result<Self> {
        let file = dir.join("config.json");
        let cfg = ModelConfig::vlm_from_file(&file, "to take")?;
        let store = WeightStore::open_dir(dir)?;
        let vision = VisionModel::load(&store, super::modules::VISION, &cfg.vision, ctx)?;
        let connector = Connector::load(
            &store,
            "model.connector",
            cfg.vision.hidden_size,
            cfg.text.hidden_size,
            cfg.scale_factor,
            ctx,
        )?;
        let raw = cfg.raw.get("vision_config").cloned().unwrap_or_else(|| vision_json(&cfg.vision, None));
        Ok(VisionSource::Pretrained {
            vision: Box::new(vision),
            connector: Some(connector),
            scale_factor: cfg.scale_factor,
            raw,
            origin: file.display().to_string(),
        })
    }

    /// The vision tower and connector of a loaded model (shared, not copied).
    pub fn from_model(m: &VlmModel, origin: &str) -> Result<Self> {
        let (Some(vision), Some(connector)) = (&m.vision, &m.connector) else {
            return input_err(format!("vision_model: {origin} is a language model alone, it has no vision tower"));
        };
        let with_adapter = vision.layers.iter().flat_map(|l| l.linears()).chain([&connector.proj]);
        if with_adapter.into_iter().any(|l| l.adapter.is_some()) {
            return input_err(format!(
                "vision_model: {origin} has adapters on its vision tower; merge_and_unload() first"
            ));
        }
        let raw = m.config.raw.get("vision_config").cloned().unwrap_or_else(|| vision_json(&m.config.vision, None));
        Ok(VisionSource::Pretrained {
            vision: Box::new(vision.clone()),
            connector: Some(connector.clone()),
            scale_factor: m.config.scale_factor,
            raw,
            origin: origin.to_string(),
        })
    }
}

/// Settings of [`compose`].
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// "idefics3" or "smolvlm".
    pub model_type: String,
    pub scale_factor: usize,
    /// The tokenizer's id of `<image>`.
    pub image_token_id: i64,
    /// The embedding resize (`new_num_tokens`: the tokenizer's length with the image tokens).
    pub resize: ResizeOptions,
    /// Use a pretrained source's connector: Some(true) requires it to fit, Some(false) makes a new one,
    /// None uses it when it fits (same scale factor, output size = the text hidden size).
    pub reuse_connector: Option<bool>,
    /// Seeds the new weights (vision tower, connector, added embedding rows).
    pub seed: u64,
}

/// What errors about the composition name as their file.
const ORIGIN: &str = "from_text_model";

fn bad(key: &str, msg: String) -> crate::error::Error {
    ConfigError::BadValue { file: ORIGIN.into(), key: key.into(), msg }.into()
}

/// `vision_config` JSON of `v` (with `initializer_range` when given).
pub fn vision_json(v: &VisionConfig, initializer_range: Option<f64>) -> Value {
    let mut j = json!({
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
    });
    if let (Some(r), Some(o)) = (initializer_range, j.as_object_mut()) {
        o.insert("initializer_range".into(), r.into());
    }
    j
}

/// The language model's config as a `text_config` (without the keys of a top-level file).
fn text_json(text: &VlmModel) -> Value {
    let mut t = text.config.raw.clone();
    if let Some(o) = t.as_object_mut() {
        for k in
            ["architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "quantization_config"]
        {
            o.remove(k);
        }
        o.insert("model_type".into(), "llama".into());
        o.insert("tie_word_embeddings".into(), text.config.tie_word_embeddings.into());
    }
    t
}

/// The VLM of `text` (a language model alone) and `vision` (see the module docs).
pub fn compose(text: &VlmModel, vision: VisionSource, opts: &ComposeOptions) -> Result<VlmModel> {
    if !text.config.text_only() || text.vision.is_some() {
        return input_err(
            "from_text_model needs a language model alone (LlamaForCausalLM); this one already has a vision tower",
        );
    }
    if text.quant.is_some() {
        return input_err(
            "from_text_model: the language model is quantized with bitsandbytes; load it without quantization_config",
        );
    }
    if text.linears().iter().any(|(_, l)| l.adapter.is_some()) {
        return input_err("from_text_model: the language model has adapters; merge_and_unload() first");
    }
    let (model_type, s) = (opts.model_type.as_str(), opts.scale_factor);
    if model_type != "idefics3" && model_type != "smolvlm" {
        return Err(bad("model_type", format!("'{model_type}' is not one of idefics3, smolvlm")));
    }
    let ctx = LoadCtx {
        dtype: text.dtype,
        device: text.device.clone(),
        bf16_storage: false,
        bf16_compute: text.bf16_compute,
        quant: None,
    };
    let th = text.config.text.hidden_size;
    let (vcfg, vraw, reuse) = match &vision {
        VisionSource::Random { config, initializer_range } => {
            (config.clone(), vision_json(config, Some(*initializer_range)), None)
        }
        VisionSource::Pretrained { vision, connector, scale_factor, raw, origin } => {
            let fits = connector.as_ref().filter(|c| *scale_factor == s && c.proj.out_features == th);
            if opts.reuse_connector == Some(true) && fits.is_none() {
                let why = if *scale_factor != s {
                    format!("its scale_factor is {scale_factor}, not {s}")
                } else {
                    let out = connector.as_ref().map_or(0, |c| c.proj.out_features);
                    format!("it outputs {out} features, the language model's hidden_size is {th}")
                };
                return Err(bad("reuse_connector", format!("the connector of {origin} does not fit: {why}")));
            }
            let reuse = if opts.reuse_connector == Some(false) { None } else { fits.cloned() };
            (vision.cfg.clone(), raw.clone(), reuse)
        }
    };
    let mut vraw = vraw;
    if let Some(o) = vraw.as_object_mut() {
        o.insert("model_type".into(), format!("{model_type}_vision").into());
    }
    let config_json = json!({
        "architectures": [if model_type == "smolvlm" { "SmolVLMForConditionalGeneration" } else { "Idefics3ForConditionalGeneration" }],
        "model_type": model_type,
        "image_token_id": opts.image_token_id,
        "scale_factor": s,
        "tie_word_embeddings": text.config.tie_word_embeddings,
        "use_cache": true,
        "pad_token_id": text.config.text.pad_token_id,
        "text_config": text_json(text),
        "vision_config": vraw,
    });
    let config = ModelConfig::from_json_str(&config_json.to_string(), Path::new(ORIGIN))?;
    let n = vcfg.patches_per_side();
    if n == 0 || !n.is_multiple_of(s) {
        return Err(bad(
            "scale_factor",
            format!(
                "{s} does not divide the {n}x{n} patch grid (image_size {} / patch_size {})",
                vcfg.image_size, vcfg.patch_size
            ),
        ));
    }
    let tower = match vision {
        VisionSource::Random { config, initializer_range } => {
            random_vision(&config, initializer_range, opts.seed, &ctx)?
        }
        VisionSource::Pretrained { vision, .. } => *vision,
    };
    let connector = match reuse {
        Some(c) => c,
        None => {
            let std = text_initializer_range(text);
            random_connector(vcfg.hidden_size, th, s, std, opts.seed, &ctx)?
        }
    };
    // The text model with GGUF blocks dequantized (exact values), the head rebuilt when tied.
    let mut text_model = text.text.clone();
    for layer in &mut text_model.layers {
        for l in layer.linears_mut() {
            if l.quant().is_some() {
                *l = relinear(l, l.dense_weight()?, l.bias.clone(), ctx.dtype)?;
            }
        }
    }
    let lm_head = if text.config.tie_word_embeddings {
        tied_head(&text_model.embed_tokens, ctx.dtype, ctx.bf16_compute)?
    } else if text.lm_head.quant().is_some() {
        relinear(&text.lm_head, text.lm_head.dense_weight()?, text.lm_head.bias.clone(), ctx.dtype)?
    } else {
        text.lm_head.clone()
    };
    let mut model = VlmModel {
        config,
        vision: Some(tower),
        connector: Some(connector),
        text: text_model,
        lm_head,
        dtype: ctx.dtype,
        device: ctx.device.clone(),
        switch: Arc::default(),
        bf16_compute: ctx.bf16_compute,
        quant: None,
        saved: Arc::default(),
    };
    let rows = resize_token_embeddings(&mut model, &opts.resize)?;
    if opts.image_token_id < 0 || opts.image_token_id as usize >= rows {
        return Err(bad(
            "image_token_id",
            format!("{} is outside the resized vocabulary of {rows} rows", opts.image_token_id),
        ));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{no_interrupt, ForwardInput};
    use candle_core::{DType, Device, Tensor};

    fn llama() -> VlmModel {
        VlmModel::from_dir(Path::new("tests/fixtures/llama_tiny/checkpoint"), DType::F32, &Device::Cpu).unwrap()
    }

    fn vcfg() -> VisionConfig {
        VisionConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 32,
            patch_size: 8,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }

    fn opts(vocab: usize, image: i64) -> ComposeOptions {
        ComposeOptions {
            model_type: "idefics3".into(),
            scale_factor: 2,
            image_token_id: image,
            resize: ResizeOptions {
                new_num_tokens: Some(vocab),
                pad_to_multiple_of: None,
                mean_resizing: true,
                seed: 0,
            },
            reuse_connector: None,
            seed: 0,
        }
    }

    fn logits(m: &VlmModel, ids: &[i64], px: Option<&Tensor>) -> Vec<Vec<f32>> {
        let input = ForwardInput {
            input_ids: ids,
            batch: 1,
            seq_len: ids.len(),
            attention_mask: None,
            pixel_values: px,
            pixel_attention_mask: None,
            labels: None,
            logits_to_keep: 0,
        };
        m.forward(&input, &no_interrupt).unwrap().logits.squeeze(0).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn random_tower_on_a_language_model() {
        let lm = llama();
        let src = VisionSource::Random { config: vcfg(), initializer_range: 0.02 };
        let m = compose(&lm, src, &opts(340, 338)).unwrap();
        assert_eq!(m.config.model_type, "idefics3");
        assert_eq!((m.config.text.vocab_size, m.config.image_token_id, m.config.image_seq_len()), (340, 338, 4));
        assert_eq!(m.text.embed_tokens.dims(), &[340, 48]);
        assert_eq!(m.config.raw["text_config"]["vocab_size"], 340);
        assert_eq!(m.config.raw["vision_config"]["model_type"], "idefics3_vision");
        // text alone: the language model's logits on its own vocabulary
        let ids = [1i64, 5, 9, 200, 17];
        let (a, b) = (logits(&lm, &ids, None), logits(&m, &ids, None));
        for (ra, rb) in a.iter().zip(&b) {
            assert_eq!(ra[..], rb[..300]);
        }
        // an image: 4 image tokens per 32x32 frame
        let px = Tensor::randn(0f32, 1.0, (1, 1, 3, 32, 32), &Device::Cpu).unwrap();
        let out = logits(&m, &[1, 337, 338, 338, 338, 338, 337, 5], Some(&px));
        assert_eq!(out.len(), 8);
        assert!(out.iter().flatten().all(|v| v.is_finite()));
    }

    #[test]
    fn pretrained_tower_and_connector() {
        let lm = llama();
        let ctx =
            LoadCtx { dtype: DType::F32, device: Device::Cpu, bf16_storage: false, bf16_compute: false, quant: None };
        let dir = Path::new("tests/fixtures/idefics3_gqa/checkpoint");
        let src = VisionSource::from_dir(dir, &ctx).unwrap();
        let donor = VlmModel::from_dir(dir, DType::F32, &Device::Cpu).unwrap();
        let m = compose(&lm, src.clone(), &opts(310, 300)).unwrap();
        let w = |l: &crate::ops::Linear| l.dense_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (mv, dv) = (m.vision.as_ref().unwrap(), donor.vision.as_ref().unwrap());
        assert_eq!(w(&mv.layers[1].fc2), w(&dv.layers[1].fc2));
        assert_eq!(w(&m.connector.as_ref().unwrap().proj), w(&donor.connector.as_ref().unwrap().proj));
        // a new connector when asked, or when the scale factor differs; an error when it must fit
        let fresh =
            compose(&lm, src.clone(), &ComposeOptions { reuse_connector: Some(false), ..opts(310, 300) }).unwrap();
        assert_ne!(w(&fresh.connector.as_ref().unwrap().proj), w(&donor.connector.as_ref().unwrap().proj));
        let e = compose(
            &lm,
            src.clone(),
            &ComposeOptions { reuse_connector: Some(true), scale_factor: 4, ..opts(310, 300) },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("reuse_connector") && e.contains("scale_factor is 2"), "{e}");
        let other = compose(&lm, src, &ComposeOptions { scale_factor: 4, ..opts(310, 300) }).unwrap();
        assert_eq!(other.config.image_seq_len(), 1);
        // a VLM is not a language model alone
        let e = compose(&donor, VisionSource::Random { config: vcfg(), initializer_range: 0.02 }, &opts(310, 300));
        assert!(e.err().unwrap().to_string().contains("language model alone"));
    }

    #[test]
    fn bad_settings_name_the_field() {
        let lm = llama();
        let src = || VisionSource::Random { config: vcfg(), initializer_range: 0.02 };
        let e = compose(&lm, src(), &ComposeOptions { scale_factor: 3, ..opts(340, 338) }).err().unwrap().to_string();
        assert!(e.contains("'scale_factor'") && e.contains("4x4"), "{e}");
        let e = compose(&lm, src(), &opts(340, 345)).err().unwrap().to_string();
        assert!(e.contains("'image_token_id'") && e.contains("340 rows"), "{e}");
        let bad_heads = VisionConfig { num_attention_heads: 5, ..vcfg() };
        let e = compose(&lm, VisionSource::Random { config: bad_heads, initializer_range: 0.02 }, &opts(340, 338));
        assert!(e.err().unwrap().to_string().contains("vision_config.num_attention_heads"));
        let e = compose(&lm, src(), &ComposeOptions { model_type: "llava".into(), ..opts(340, 338) });
        assert!(e.err().unwrap().to_string().contains("llava"));
    }
}
