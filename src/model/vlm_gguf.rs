//! A SmolVLM / Idefics3 model read from GGUF files: the text model from a Llama GGUF file (quantized
//! Linear weights kept in their blocks, as `VlmModel::from_gguf` does for a language model alone) and
//! the vision tower + connector from an mmproj GGUF file (dequantized), or from the safetensors of a
//! hub-layout folder whose text model is replaced by the GGUF file.
//!
//! The config: a `config.json` when one is given (its values are kept; the files must agree with it),
//! otherwise built from the files' metadata (`llama.*`, `clip.*`), with `image_token_id` the id of
//! SmolVLM's `<image>` token in the text file's vocabulary.

use std::path::Path;

use candle_core::{DType, Device};

use super::{LoadCtx, VlmModel};
use crate::checkpoint::gguf_llama::GgufLlamaConfig;
use crate::checkpoint::gguf_mmproj::{ClipConfig, GgufClip};
use crate::checkpoint::{GgufValue, WeightStore};
use crate::config::{ModelConfig, TextConfig, VisionConfig};
use crate::error::{CheckpointError, ConfigError, Result};

fn mismatch(config: &Path, key: &str, want: String, file: &Path, found: String) -> ConfigError {
    ConfigError::BadValue {
        file: config.to_path_buf(),
        key: key.into(),
        msg: format!("{want} here, but {} says {found}", file.display()),
    }
}

/// The text config of a GGUF file must be the one of `config.json`.
fn check_text(cfg: &ModelConfig, config: &Path, g: &GgufLlamaConfig, file: &Path) -> Result<(), ConfigError> {
    let (a, b) = (&cfg.text, &g.text);
    let sizes: [(&str, usize, usize); 7] = [
        ("vocab_size", a.vocab_size, b.vocab_size),
        ("hidden_size", a.hidden_size, b.hidden_size),
        ("intermediate_size", a.intermediate_size, b.intermediate_size),
        ("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers),
        ("num_attention_heads", a.num_attention_heads, b.num_attention_heads),
        ("num_key_value_heads", a.num_key_value_heads, b.num_key_value_heads),
        ("head_dim", a.head_dim, b.head_dim),
    ];
    for (key, want, found) in sizes {
        if want != found {
            return Err(mismatch(config, &format!("text_config.{key}"), want.to_string(), file, found.to_string()));
        }
    }
    if cfg.tie_word_embeddings != g.tie_word_embeddings {
        let say = |t: bool| if t { "tied (no output.weight)" } else { "untied (output.weight)" }.to_string();
        return Err(mismatch(
            config,
            "tie_word_embeddings",
            cfg.tie_word_embeddings.to_string(),
            file,
            say(g.tie_word_embeddings),
        ));
    }
    Ok(())
}

/// The vision config and scale factor of an mmproj file must be those of `config.json`.
fn check_vision(cfg: &ModelConfig, config: &Path, c: &ClipConfig, file: &Path) -> Result<(), ConfigError> {
    let (a, b): (&VisionConfig, &VisionConfig) = (&cfg.vision, &c.vision);
    let sizes: [(&str, usize, usize); 8] = [
        ("vision_config.hidden_size", a.hidden_size, b.hidden_size),
        ("vision_config.intermediate_size", a.intermediate_size, b.intermediate_size),
        ("vision_config.num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers),
        ("vision_config.num_attention_heads", a.num_attention_heads, b.num_attention_heads),
        ("vision_config.image_size", a.image_size, b.image_size),
        ("vision_config.patch_size", a.patch_size, b.patch_size),
        ("scale_factor", cfg.scale_factor, c.scale_factor),
        ("text_config.hidden_size", cfg.text.hidden_size, c.projection_dim),
    ];
    for (key, want, found) in sizes {
        if want != found {
            return Err(mismatch(config, key, want.to_string(), file, found.to_string()));
        }
    }
    Ok(())
}

fn text_json(t: &TextConfig, g: &GgufLlamaConfig) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias,
        "bos_token_id": g.bos_token_id,
        "eos_token_id": g.eos_token_id,
        "pad_token_id": t.pad_token_id,
    })
}

/// The config of a VLM made of a text GGUF file and an mmproj file, from their metadata alone.
fn config_from_files(
    model_type: &str,
    g: &GgufLlamaConfig,
    text: &crate::checkpoint::GgufFile,
    c: &ClipConfig,
    mmproj: &Path,
) -> Result<ModelConfig> {
    let tokens = text.get_opt("tokenizer.ggml.tokens", GgufValue::as_str_array)?.unwrap_or(&[]);
    let image = tokens.iter().position(|t| t == "<image>").ok_or_else(|| CheckpointError::GgufMetadata {
        file: text.path().to_path_buf(),
        key: "tokenizer.ggml.tokens".into(),
        expected: "a vocabulary holding SmolVLM's '<image>' token (or give a config.json for the image token id)"
            .into(),
        found: format!("{} tokens without it", tokens.len()),
    })?;
    if c.projection_dim != g.text.hidden_size {
        return Err(ConfigError::BadValue {
            file: mmproj.to_path_buf(),
            key: "clip.vision.projection_dim".into(),
            msg: format!(
                "{} does not match the text model's embedding_length {} in {}",
                c.projection_dim,
                g.text.hidden_size,
                text.path().display()
            ),
        }
        .into());
    }
    let v = &c.vision;
    let json = serde_json::json!({
        "architectures": [if model_type == "smolvlm" { "SmolVLMForConditionalGeneration" } else { "Idefics3ForConditionalGeneration" }],
        "model_type": model_type,
        "image_token_id": image,
        "scale_factor": c.scale_factor,
        "tie_word_embeddings": g.tie_word_embeddings,
        "text_config": text_json(&g.text, g),
        "vision_config": {
            "model_type": if model_type == "smolvlm" { "smolvlm_vision" } else { "idefics3_vision" },
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": v.hidden_act,
            "layer_norm_eps": v.layer_norm_eps,
        },
    });
    Ok(ModelConfig::from_json_str(&json.to_string(), text.path())?)
}

fn ctx(dtype: DType, device: &Device) -> LoadCtx {
    let bf16_compute = dtype == DType::BF16 && device.is_cpu();
    let dtype = if bf16_compute { DType::F32 } else { dtype };
    LoadCtx { dtype, device: device.clone(), bf16_storage: false, bf16_compute, quant: None }
}

impl VlmModel {
    /// SmolVLM from a text GGUF file and an mmproj GGUF file (llama.cpp's pair). `config_dir`: a
    /// folder whose `config.json` is the model config (the files must agree with it); without it the
    /// config comes from the files (`model_type` "idefics3" or "smolvlm").
    pub fn from_gguf_mmproj(
        text: &Path,
        mmproj: &Path,
        config_dir: Option<&Path>,
        model_type: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let text_store = WeightStore::open_gguf_with_prefix(text, super::modules::TEXT)?;
        let clip = GgufClip::open(mmproj)?;
        let g = text_store.gguf().ok_or_else(|| not_llama(text))?;
        let config = match config_dir {
            Some(dir) => {
                let file = dir.join("config.json");
                let cfg = ModelConfig::vlm_from_file(&file, "for an mmproj file")?;
                check_text(&cfg, &file, g.config(), text)?;
                check_vision(&cfg, &file, clip.config(), mmproj)?;
                cfg
            }
            None => config_from_files(model_type, g.config(), g.file(), clip.config(), mmproj)?,
        };
        let store = WeightStore::layered(vec![text_store, WeightStore::from_clip(clip)]);
        Self::load(config, &store, &ctx(dtype, device))
    }

    /// SmolVLM from a hub-layout folder (`config.json`, the vision tower and connector in its
    /// safetensors) whose text model is replaced by the Llama GGUF file `text`.
    pub fn from_dir_gguf_text(dir: &Path, text: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let file = dir.join("config.json");
        let config = ModelConfig::from_file(&file)?;
        let text_store = WeightStore::open_gguf_with_prefix(text, super::modules::text_prefix(&config))?;
        let g = text_store.gguf().ok_or_else(|| not_llama(text))?;
        check_text(&config, &file, g.config(), text)?;
        let store = if config.text_only() {
            text_store
        } else {
            WeightStore::layered(vec![text_store, WeightStore::open_dir(dir)?])
        };
        Self::load(config, &store, &ctx(dtype, device))
    }
}

/// A GGUF store always has its file; this only keeps the error path typed.
fn not_llama(path: &Path) -> CheckpointError {
    CheckpointError::Gguf { file: path.to_path_buf(), msg: "not read as a Llama GGUF file".into() }
}
