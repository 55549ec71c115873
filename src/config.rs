//! `config.json` of Idefics3 / SmolVLM checkpoints, with transformers' defaults for missing keys.
//!
//! Both layouts are read: the hub one (`text_config.rope_theta`) and the newer one
//! (`text_config.rope_parameters.rope_theta`). Every error names the file and the key.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::ConfigError;

/// The SigLIP vision tower (`vision_config`). Defaults: `Idefics3VisionConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    /// Patches per side of a full tile (N).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The Llama language model (`text_config`). Defaults: `LlamaConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub pad_token_id: Option<i64>,
}

/// The whole model config.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `idefics3` or `smolvlm` (same math), or `llama` for a language model alone
    /// (`LlamaForCausalLM`: no vision tower, `vision` keeps its defaults and is not used).
    pub model_type: String,
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub scale_factor: usize,
    pub image_token_id: i64,
    pub tie_word_embeddings: bool,
    /// The JSON as read, for attribute access from Python.
    pub raw: Value,
}

impl ModelConfig {
    /// A language model alone (`model_type` "llama"): no vision tower or connector.
    pub fn text_only(&self) -> bool {
        self.model_type == "llama"
    }

    /// Image tokens per frame: (N / s)^2.
    pub fn image_seq_len(&self) -> usize {
        let n = self.vision.patches_per_side() / self.scale_factor;
        n * n
    }

    /// The `LlamaConfig` transformers builds for a Llama GGUF file (its `llama.*` keys, read by
    /// `checkpoint::gguf_llama`), as config.json keys so that Python sees the same attributes.
    pub fn from_gguf_llama(
        g: &crate::checkpoint::gguf_llama::GgufLlamaConfig,
        file: &Path,
    ) -> Result<Self, ConfigError> {
        let t = &g.text;
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
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
            "tie_word_embeddings": g.tie_word_embeddings,
            "bos_token_id": g.bos_token_id,
            "eos_token_id": g.eos_token_id,
            "pad_token_id": t.pad_token_id,
        });
        Self::from_json_str(&json.to_string(), file)
    }

    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(file: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(file).map_err(|source| ConfigError::Read { file: file.to_path_buf(), source })?;
        Self::from_json_str(&text, file)
    }

    /// [`Self::from_file`] of a vision-language model: a language model alone (`model_type` "llama") is
    /// refused, the message saying it has no vision tower `for_what`.
    pub fn vlm_from_file(file: &Path, for_what: &str) -> Result<Self, ConfigError> {
        let cfg = Self::from_file(file)?;
        if cfg.text_only() {
            return Err(ConfigError::BadValue {
                file: file.to_path_buf(),
                key: "model_type".into(),
                msg: format!("'llama' is a language model alone: it has no vision tower {for_what}"),
            });
        }
        Ok(cfg)
    }

    /// Parses config JSON; `file` is only used in error messages.
    pub fn from_json_str(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::Json { file: file.to_path_buf(), msg: e.to_string() })?;
        let r = Reader { file: file.to_path_buf() };
        let top = r.object(&raw, "")?;
        let model_type = match top.get("model_type") {
            None => return Err(ConfigError::MissingKey { file: r.file.clone(), key: "model_type".into() }),
            Some(v) => r.string(v, "model_type")?,
        };
        let text_only = model_type == "llama";
        if !text_only && model_type != "idefics3" && model_type != "smolvlm" {
            return Err(ConfigError::UnknownModelType { file: r.file.clone(), model_type });
        }
        let empty = Map::new();
        let vis = match top.get("vision_config") {
            None | Some(Value::Null) => &empty,
            Some(v) => r.object(v, "vision_config")?,
        };
        let vision = VisionConfig {
            hidden_size: r.usize_or(vis, "vision_config", "hidden_size", 1152)?,
            intermediate_size: r.usize_or(vis, "vision_config", "intermediate_size", 3072)?,
            num_hidden_layers: r.usize_or(vis, "vision_config", "num_hidden_layers", 12)?,
            num_attention_heads: r.usize_or(vis, "vision_config", "num_attention_heads", 16)?,
            num_channels: r.usize_or(vis, "vision_config", "num_channels", 3)?,
            image_size: r.usize_or(vis, "vision_config", "image_size", 224)?,
            patch_size: r.usize_or(vis, "vision_config", "patch_size", 32)?,
            hidden_act: r.string_or(vis, "vision_config", "hidden_act", "gelu_pytorch_tanh")?,
            layer_norm_eps: r.f64_or(vis, "vision_config", "layer_norm_eps", 1e-6)?,
        };
        // transformers builds a default LlamaConfig with rms_norm_eps 1e-5 when text_config is absent,
        // and a plain LlamaConfig (eps 1e-6) from whatever dict is given.
        // A Llama config has the text model's keys at the top level (LlamaConfig: rms_norm_eps 1e-6).
        let (txt, default_eps, sec) = match top.get("text_config") {
            _ if text_only => (top, 1e-6, ""),
            None | Some(Value::Null) => (&empty, 1e-5, "text_config"),
            Some(v) => (r.object(v, "text_config")?, 1e-6, "text_config"),
        };
        if let Some(mt) = txt.get("model_type").filter(|_| !text_only) {
            let mt = r.string(mt, "text_config.model_type")?;
            if mt != "llama" {
                return Err(ConfigError::BadValue {
                    file: r.file.clone(),
                    key: "text_config.model_type".into(),
                    msg: format!("'{mt}' is not supported (only 'llama')"),
                });
            }
        }
        let hidden = r.usize_or(txt, sec, "hidden_size", 4096)?;
        let heads = r.usize_or(txt, sec, "num_attention_heads", 32)?;
        let kv_heads = match txt.get("num_key_value_heads") {
            None | Some(Value::Null) => heads,
            Some(v) => r.usize(v, &Reader::path(sec, "num_key_value_heads"))?,
        };
        let head_dim = match txt.get("head_dim") {
            None | Some(Value::Null) => {
                if heads == 0 || hidden % heads != 0 {
                    return Err(r.bad(
                        &Reader::path(sec, "num_attention_heads"),
                        format!("hidden_size {hidden} is not a multiple of {heads} heads"),
                    ));
                }
                hidden / heads
            }
            Some(v) => r.usize(v, &Reader::path(sec, "head_dim"))?,
        };
        let text = TextConfig {
            vocab_size: r.usize_or(txt, sec, "vocab_size", 32000)?,
            hidden_size: hidden,
            intermediate_size: r.usize_or(txt, sec, "intermediate_size", 11008)?,
            num_hidden_layers: r.usize_or(txt, sec, "num_hidden_layers", 32)?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            hidden_act: r.string_or(txt, sec, "hidden_act", "silu")?,
            max_position_embeddings: r.usize_or(txt, sec, "max_position_embeddings", 2048)?,
            rms_norm_eps: r.f64_or(txt, sec, "rms_norm_eps", default_eps)?,
            rope_theta: r.rope_theta(txt)?,
            attention_bias: r.bool_or(txt, sec, "attention_bias", false)?,
            mlp_bias: r.bool_or(txt, sec, "mlp_bias", false)?,
            pad_token_id: match txt.get("pad_token_id") {
                None | Some(Value::Null) => None,
                Some(v) => Some(r.i64(v, &Reader::path(sec, "pad_token_id"))?),
            },
        };
        let cfg = ModelConfig {
            model_type,
            scale_factor: r.usize_or(top, "", "scale_factor", 2)?,
            image_token_id: match top.get("image_token_id") {
                None | Some(Value::Null) => 128257,
                Some(v) => r.i64(v, "image_token_id")?,
            },
            tie_word_embeddings: r.bool_or(top, "", "tie_word_embeddings", false)?,
            vision,
            text,
            raw: raw.clone(),
        };
        cfg.validate(&r)?;
        Ok(cfg)
    }

    fn validate(&self, r: &Reader) -> Result<(), ConfigError> {
        let v = &self.vision;
        let t = &self.text;
        // Sizes drive allocations and shape arithmetic in the loaders: refuse values no checkpoint has
        // (a corrupt or hostile file) before they overflow a product or ask for terabytes.
        let sizes = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.head_dim", t.head_dim),
            ("scale_factor", self.scale_factor),
        ];
        for (key, n) in sizes {
            if n > MAX_SIZE {
                return Err(r.bad(key, format!("{n} is larger than any model supports (at most {MAX_SIZE})")));
            }
        }
        for (key, n) in [
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
        ] {
            if n > MAX_LAYERS {
                return Err(r.bad(key, format!("{n} layers is more than any model has (at most {MAX_LAYERS})")));
            }
        }
        let n = v.image_size / v.patch_size.max(1);
        let s = self.scale_factor;
        let weights: [(&str, &str, &[usize]); 7] = [
            (
                "vision_config.patch_size",
                "patch embedding",
                &[v.hidden_size, v.num_channels, v.patch_size, v.patch_size],
            ),
            ("vision_config.image_size", "position embedding", &[n, n, v.hidden_size]),
            ("vision_config.intermediate_size", "vision MLP", &[v.hidden_size, v.intermediate_size]),
            ("scale_factor", "connector", &[v.hidden_size, s, s, t.hidden_size]),
            ("text_config.vocab_size", "token embedding", &[t.vocab_size, t.hidden_size]),
            (
                "text_config.head_dim",
                "attention projection",
                &[t.num_attention_heads.max(t.num_key_value_heads), t.head_dim, t.hidden_size],
            ),
            ("text_config.intermediate_size", "text MLP", &[t.hidden_size, t.intermediate_size]),
        ];
        for (key, what, dims) in weights {
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&e| e <= MAX_ELEMENTS);
            if numel.is_none() {
                return Err(r.bad(
                    key,
                    format!("the {what} weight would have shape {dims:?}: too large (at most {MAX_ELEMENTS} elements)"),
                ));
            }
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(r.bad(
                "vision_config.num_attention_heads",
                format!("hidden_size {} is not a multiple of {} heads", v.hidden_size, v.num_attention_heads),
            ));
        }
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return Err(r.bad(
                "vision_config.patch_size",
                format!("patch_size {} does not fit image_size {}", v.patch_size, v.image_size),
            ));
        }
        if self.scale_factor == 0 {
            return Err(r.bad("scale_factor", "must be >= 1".into()));
        }
        if v.hidden_act != "gelu_pytorch_tanh" && v.hidden_act != "gelu_new" && v.hidden_act != "gelu" {
            return Err(r.bad("vision_config.hidden_act", format!("'{}' is not supported", v.hidden_act)));
        }
        if t.num_key_value_heads == 0 || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(r.bad(
                "text_config.num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} kv heads",
                    t.num_attention_heads, t.num_key_value_heads
                ),
            ));
        }
        if !t.head_dim.is_multiple_of(2) {
            return Err(r.bad(
                "text_config.head_dim",
                format!("{} is odd; rotary embeddings need an even head_dim", t.head_dim),
            ));
        }
        if t.hidden_act != "silu" {
            return Err(r.bad("text_config.hidden_act", format!("'{}' is not supported (only 'silu')", t.hidden_act)));
        }
        if self.image_token_id < 0 {
            return Err(r.bad("image_token_id", "must be >= 0".into()));
        }
        Ok(())
    }
}

/// Largest accepted size in a config (hidden sizes, vocabulary, heads, image size, ...): far above any
/// real checkpoint, small enough that products of a few of them cannot overflow.
const MAX_SIZE: usize = 1 << 24;
/// Largest accepted layer count.
const MAX_LAYERS: usize = 1 << 16;
/// Largest accepted element count of one weight (4 TiB in f32).
const MAX_ELEMENTS: usize = 1 << 40;

/// Typed access to JSON values with errors naming the file and key path.
struct Reader {
    file: PathBuf,
}

impl Reader {
    fn bad(&self, key: &str, msg: String) -> ConfigError {
        ConfigError::BadValue { file: self.file.clone(), key: key.to_string(), msg }
    }
    fn path(section: &str, key: &str) -> String {
        if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        }
    }
    fn object<'a>(&self, v: &'a Value, key: &str) -> Result<&'a Map<String, Value>, ConfigError> {
        v.as_object()
            .ok_or_else(|| self.bad(if key.is_empty() { "<root>" } else { key }, "expected a JSON object".into()))
    }
    fn string(&self, v: &Value, key: &str) -> Result<String, ConfigError> {
        v.as_str().map(str::to_string).ok_or_else(|| self.bad(key, format!("expected a string, got {v}")))
    }
    fn usize(&self, v: &Value, key: &str) -> Result<usize, ConfigError> {
        // Some configs store integers as floats ("16.0"); accept exact ones.
        match v {
            Value::Number(n) if n.as_u64().is_some() => Ok(n.as_u64().unwrap_or(0) as usize),
            Value::Number(n) => match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 => Ok(f as usize),
                _ => Err(self.bad(key, format!("expected a non-negative integer, got {v}"))),
            },
            Value::Array(a) if a.len() == 2 && a[0] == a[1] => self.usize(&a[0], key),
            _ => Err(self.bad(key, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn i64(&self, v: &Value, key: &str) -> Result<i64, ConfigError> {
        match v.as_i64() {
            Some(i) => Ok(i),
            None => match v.as_array() {
                // eos/pad ids may be lists; the first one is the canonical id.
                Some(a) if !a.is_empty() => self.i64(&a[0], key),
                _ => Err(self.bad(key, format!("expected an integer, got {v}"))),
            },
        }
    }
    fn f64(&self, v: &Value, key: &str) -> Result<f64, ConfigError> {
        v.as_f64().ok_or_else(|| self.bad(key, format!("expected a number, got {v}")))
    }
    fn usize_or(&self, m: &Map<String, Value>, sec: &str, key: &str, d: usize) -> Result<usize, ConfigError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => self.usize(v, &Self::path(sec, key)),
        }
    }
    fn f64_or(&self, m: &Map<String, Value>, sec: &str, key: &str, d: f64) -> Result<f64, ConfigError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => self.f64(v, &Self::path(sec, key)),
        }
    }
    fn bool_or(&self, m: &Map<String, Value>, sec: &str, key: &str, d: bool) -> Result<bool, ConfigError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => {
                v.as_bool().ok_or_else(|| self.bad(&Self::path(sec, key), format!("expected true/false, got {v}")))
            }
        }
    }
    fn string_or(&self, m: &Map<String, Value>, sec: &str, key: &str, d: &str) -> Result<String, ConfigError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(d.to_string()),
            Some(v) => self.string(v, &Self::path(sec, key)),
        }
    }
    /// `rope_parameters.rope_theta` (new layout) or `rope_theta` (hub layout), default 10000.
    /// Scaled RoPE variants are refused rather than silently computed wrong.
    fn rope_theta(&self, txt: &Map<String, Value>) -> Result<f64, ConfigError> {
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(p) = txt.get(key).filter(|v| !v.is_null()) {
                let p = self.object(p, &format!("text_config.{key}"))?;
                let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(self.bad(
                        &format!("text_config.{key}.rope_type"),
                        format!("'{kind}' is not supported (only 'default')"),
                    ));
                }
                if let Some(t) = p.get("rope_theta").filter(|v| !v.is_null()) {
                    return self.f64(t, &format!("text_config.{key}.rope_theta"));
                }
            }
        }
        self.f64_or(txt, "text_config", "rope_theta", 10000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(r#"{"model_type": "idefics3"}"#).unwrap();
        assert_eq!(c.vision.hidden_size, 1152);
        assert_eq!(c.vision.patch_size, 32);
        assert_eq!(c.text.rms_norm_eps, 1e-5); // default text_config gets 1e-5
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.image_token_id, 128257);
        assert_eq!(c.scale_factor, 2);
        assert!(!c.tie_word_embeddings);
        let c = parse(r#"{"model_type": "smolvlm", "text_config": {"hidden_size": 64, "num_attention_heads": 4}}"#)
            .unwrap();
        assert_eq!(c.text.rms_norm_eps, 1e-6); // a given dict is a plain LlamaConfig
        assert_eq!(c.text.head_dim, 16);
    }

    #[test]
    fn rope_theta_in_both_layouts() {
        let a = parse(r#"{"model_type": "idefics3", "text_config": {"rope_theta": 100000}}"#).unwrap();
        let b = parse(r#"{"model_type": "idefics3", "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}}"#).unwrap();
        assert_eq!(a.text.rope_theta, 100000.0);
        assert_eq!(b.text.rope_theta, 100000.0);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(r#"{"vision_config": {}}"#).unwrap_err().to_string();
        assert!(e.contains("model_type"), "{e}");
        let e = parse(r#"{"model_type": "llava"}"#).unwrap_err().to_string();
        assert!(e.contains("llava"), "{e}");
        let e = parse(r#"{"model_type": "idefics3", "text_config": {"hidden_size": "big"}}"#).unwrap_err().to_string();
        assert!(e.contains("text_config.hidden_size"), "{e}");
        let e = parse(r#"{"model_type": "idefics3", "text_config": {"rope_scaling": {"rope_type": "yarn"}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
        let e = parse("{not json").unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }
}
