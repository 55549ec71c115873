//! The Llama architecture of a GGUF file (SmolLM2, SmolVLM's text model): its config from the
//! `llama.*` keys, its tensors under Hugging Face names, and llama.cpp's Q/K row permutation undone.
//!
//! What transformers' GGUF loader does, and this module mirrors (`modeling_gguf_pytorch_utils.py`,
//! `integrations/ggml.py`):
//! - config: `llama.embedding_length` -> hidden_size, `block_count` -> num_hidden_layers,
//!   `feed_forward_length` -> intermediate_size, `attention.head_count(_kv)` -> num_(key_value_)heads,
//!   `rope.dimension_count` -> head_dim (else hidden / heads), `rope.freq_base` -> rope_theta (else
//!   10000), `attention.layer_norm_rms_epsilon` -> rms_norm_eps (the f32 value widened, else 1e-6),
//!   `context_length` -> max_position_embeddings (else 2048), `vocab_size` (else the number of
//!   `tokenizer.ggml.tokens`), `tokenizer.ggml.padding_token_id` -> pad_token_id;
//!   tie_word_embeddings when the file has no `output.weight`.
//! - tensors: `token_embd` -> `embed_tokens`, `blk.N.attn_norm` -> `layers.N.input_layernorm`,
//!   `attn_{q,k,v,output}` -> `self_attn.{q,k,v,o}_proj`, `ffn_norm` -> `post_attention_layernorm`,
//!   `ffn_{gate,up,down}` -> `mlp.{gate,up,down}_proj`, `output_norm` -> `norm`, `output` ->
//!   `lm_head`. Other tensors are ignored.
//! - llama.cpp's converter stores the rows of Q (per attention head) and K (per KV head) with the
//!   two RoPE halves interleaved: within a head of `2 * half` rows, Hugging Face row `t * half + d`
//!   (t = 0, 1) is stored at row `2 * d + t` (transformers' `_reverse_permute_weights`). Whole rows
//!   move, so quantized rows are reordered as blocks, without dequantizing.
//!
//! Differences from transformers: a file with `attn_q.bias` tensors gets attention_bias (transformers
//! ignores the biases), and scaled RoPE (`llama.rope.scaling.type`, `rope_freqs.weight`) is refused
//! rather than computed as plain RoPE.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use super::gguf::{dequantize_rows, GgufFile, GgufTensorInfo};
use super::gguf_value::GgufValue;
use crate::config::TextConfig;
use crate::error::CheckpointError;
use crate::quant::ggml::GgmlType;

/// Largest size accepted from a file (hidden size, vocabulary, heads...), as for config.json.
const MAX_SIZE: usize = 1 << 24;
/// Largest layer count accepted.
const MAX_LAYERS: usize = 1 << 16;

/// The model config a Llama GGUF file describes.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLlamaConfig {
    pub text: TextConfig,
    /// No `output.weight` in the file: the output head is the token embedding.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `general.name`.
    pub name: Option<String>,
}

/// Per-layer tensors: GGUF leaf name, Hugging Face module name, and which head count permutes it.
const LAYER_TENSORS: [(&str, &str, Permute); 9] = [
    ("attn_norm", "input_layernorm", Permute::No),
    ("attn_q", "self_attn.q_proj", Permute::Heads),
    ("attn_k", "self_attn.k_proj", Permute::KvHeads),
    ("attn_v", "self_attn.v_proj", Permute::No),
    ("attn_output", "self_attn.o_proj", Permute::No),
    ("ffn_norm", "post_attention_layernorm", Permute::No),
    ("ffn_gate", "mlp.gate_proj", Permute::No),
    ("ffn_up", "mlp.up_proj", Permute::No),
    ("ffn_down", "mlp.down_proj", Permute::No),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Permute {
    No,
    Heads,
    KvHeads,
}

/// The Hugging Face name of GGUF tensor `name` (`prefix` is the text model's module path, "model"
/// for `LlamaForCausalLM`, "model.text_model" inside SmolVLM), and whether it is a Q or K tensor.
/// `None` for tensors the Llama model does not have (or blocks past `n_layers`).
fn hf_name(name: &str, prefix: &str, n_layers: usize) -> Option<(String, Permute)> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let plain = |s: &str| Some((s.to_string(), Permute::No));
    match stem {
        "token_embd" => return plain(&format!("{prefix}.embed_tokens.{suffix}")),
        "output_norm" => return plain(&format!("{prefix}.norm.{suffix}")),
        "output" => return plain(&format!("lm_head.{suffix}")),
        _ => {}
    }
    let rest = stem.strip_prefix("blk.")?;
    let (n, leaf) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    let layer: usize = n.parse().ok().filter(|&l| l < n_layers)?;
    let (_, hf, permute) = LAYER_TENSORS.iter().find(|(g, _, _)| *g == leaf)?;
    Some((format!("{prefix}.layers.{layer}.{hf}.{suffix}"), *permute))
}

/// The GGUF name of a Hugging Face tensor name (the inverse of the mapping above), for writers.
pub fn gguf_name(hf: &str, prefix: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    if stem == "lm_head" {
        return Some(format!("output.{suffix}"));
    }
    let local = stem.strip_prefix(prefix)?.strip_prefix('.')?;
    match local {
        "embed_tokens" => return Some(format!("token_embd.{suffix}")),
        "norm" => return Some(format!("output_norm.{suffix}")),
        _ => {}
    }
    let (n, module) = local.strip_prefix("layers.")?.split_once('.')?;
    let layer: usize = n.parse().ok()?;
    let (g, _, _) = LAYER_TENSORS.iter().find(|(_, h, _)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// For each Hugging Face row of a Q/K tensor with `rows` rows over `n_head` heads, the GGUF row
/// that holds it. `None` when `rows` is not a whole number of heads of an even size.
pub fn unpermute_order(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return None;
    }
    let half = rows / n_head / 2;
    Some(
        (0..rows)
            .map(|r| {
                let (head, t, d) = (r / (2 * half), (r % (2 * half)) / half, r % half);
                head * 2 * half + 2 * d + t
            })
            .collect(),
    )
}

/// For each GGUF row, the Hugging Face row it stores (llama.cpp's permutation, for writers):
/// the inverse of [`unpermute_order`].
pub fn permute_order(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    let un = unpermute_order(rows, n_head)?;
    let mut order = vec![0; rows];
    for (hf, &g) in un.iter().enumerate() {
        order[g] = hf;
    }
    Some(order)
}

/// Raw rows of a tensor in its GGUF encoding, in Hugging Face order (Q/K un-permuted).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufRows {
    pub ty: GgmlType,
    /// Outermost first: `[out, in]` for a Linear weight.
    pub shape: Vec<usize>,
    /// `shape[0]` rows (all outer dims flattened) of `ty.row_bytes(row length)` bytes each.
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Mapped {
    tensor: usize,
    /// The head count whose permutation is undone, for Q and K.
    heads: Option<usize>,
}

/// A Llama GGUF file with its tensors under Hugging Face names.
#[derive(Debug)]
pub struct GgufLlama {
    file: GgufFile,
    config: GgufLlamaConfig,
    map: HashMap<String, Mapped>,
}

impl GgufLlama {
    /// Opens `path`; tensors are named under `prefix` ("model" for `LlamaForCausalLM`).
    pub fn open(path: impl AsRef<Path>, prefix: &str) -> Result<Self, CheckpointError> {
        Self::from_file(GgufFile::open(path)?, prefix)
    }

    /// Reads the config of `file` and maps its tensors.
    pub fn from_file(file: GgufFile, prefix: &str) -> Result<Self, CheckpointError> {
        let config = llama_config(&file)?;
        let t = &config.text;
        let mut map = HashMap::new();
        for (i, info) in file.tensor_infos().iter().enumerate() {
            if info.name == "rope_freqs.weight" {
                return Err(CheckpointError::GgufUnsupported {
                    file: file.path().to_path_buf(),
                    what: "scaled RoPE (the file has rope_freqs.weight): only plain RoPE is computed".into(),
                });
            }
            let Some((hf, permute)) = hf_name(&info.name, prefix, t.num_hidden_layers) else { continue };
            let heads = match permute {
                Permute::No => None,
                Permute::Heads => Some(t.num_attention_heads),
                Permute::KvHeads => Some(t.num_key_value_heads),
            };
            if let Some(h) = heads {
                let rows = info.shape().first().copied().unwrap_or(1);
                if unpermute_order(rows, h).is_none() {
                    return Err(CheckpointError::Gguf {
                        file: file.path().to_path_buf(),
                        msg: format!(
                            "tensor '{}' has {rows} rows, not a whole number of {h} heads of an even size \
                             (llama.cpp's Q/K row order cannot be undone)",
                            info.name
                        ),
                    });
                }
            }
            map.insert(hf, Mapped { tensor: i, heads });
        }
        Ok(GgufLlama { file, config, map })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn config(&self) -> &GgufLlamaConfig {
        &self.config
    }

    /// The Hugging Face names of the mapped tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn contains(&self, hf: &str) -> bool {
        self.map.contains_key(hf)
    }

    /// The GGUF tensor stored under Hugging Face name `hf`.
    pub fn info(&self, hf: &str) -> Option<&GgufTensorInfo> {
        self.map.get(hf).map(|m| &self.file.tensor_infos()[m.tensor])
    }

    fn mapped(&self, hf: &str) -> Result<(&Mapped, &GgufTensorInfo), CheckpointError> {
        let m = self.map.get(hf).ok_or_else(|| CheckpointError::MissingTensor {
            name: hf.into(),
            files: self.file.path().display().to_string(),
        })?;
        Ok((m, &self.file.tensor_infos()[m.tensor]))
    }

    /// Hugging Face row `i` is stored at `order[i]`.
    fn order(m: &Mapped, info: &GgufTensorInfo) -> Vec<usize> {
        let rows = info.n_rows();
        match m.heads.and_then(|h| unpermute_order(rows, h)) {
            Some(o) => o,
            None => (0..rows).collect(),
        }
    }

    /// `hf` decoded to f32 in Hugging Face layout (Q/K rows un-permuted), with its shape.
    pub fn dequantize(&self, hf: &str) -> Result<(Vec<f32>, Vec<usize>), CheckpointError> {
        let (m, info) = self.mapped(hf)?;
        if info.n_elements() == 0 {
            return Ok((Vec::new(), info.shape()));
        }
        let values = dequantize_rows(info, self.file.data(info), &Self::order(m, info));
        Ok((values, info.shape()))
    }

    /// `hf`'s stored rows in Hugging Face order, still in their GGUF encoding.
    pub fn rows(&self, hf: &str) -> Result<GgufRows, CheckpointError> {
        let (m, info) = self.mapped(hf)?;
        let (data, rb) = (self.file.data(info), info.row_bytes());
        let mut out = vec![0u8; info.n_bytes];
        if rb > 0 {
            let order = Self::order(m, info);
            out.par_chunks_mut(rb).zip(order.par_iter()).for_each(|(dst, &r)| {
                dst.copy_from_slice(&data[r * rb..(r + 1) * rb]);
            });
        }
        Ok(GgufRows { ty: info.ty, shape: info.shape(), data: out })
    }

    /// Lets the kernel drop the mapped pages of `hf` once it has been decoded.
    pub fn release(&self, hf: &str) {
        if let Some(info) = self.info(hf) {
            self.file.release(info);
        }
    }
}

/// The `TextConfig` (and tie/bos/eos) of a Llama GGUF file. Errors name the key.
pub fn llama_config(f: &GgufFile) -> Result<GgufLlamaConfig, CheckpointError> {
    let arch = f.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(CheckpointError::GgufUnsupported {
            file: f.path().to_path_buf(),
            what: format!("architecture '{arch}' (only 'llama' text models are read)"),
        });
    }
    if let Some(kind) = f.get_opt("llama.rope.scaling.type", GgufValue::as_str)? {
        if kind != "none" {
            return Err(CheckpointError::GgufUnsupported {
                file: f.path().to_path_buf(),
                what: format!("RoPE scaling '{kind}' (llama.rope.scaling.type; only plain RoPE is computed)"),
            });
        }
    }
    let bad = |key: &str, expected: String, found: String| CheckpointError::GgufMetadata {
        file: f.path().to_path_buf(),
        key: key.into(),
        expected,
        found,
    };
    let size = |key: &str, default: Option<usize>| -> Result<usize, CheckpointError> {
        let v = match (f.get_opt(key, GgufValue::as_usize)?, default) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => f.get_usize(key)?,
        };
        if v > MAX_SIZE {
            return Err(bad(key, format!("at most {MAX_SIZE}"), v.to_string()));
        }
        Ok(v)
    };
    let hidden = size("llama.embedding_length", None)?;
    let heads = size("llama.attention.head_count", None)?;
    if heads == 0 {
        return Err(bad("llama.attention.head_count", "at least 1".into(), "0".into()));
    }
    let kv_heads = size("llama.attention.head_count_kv", Some(heads))?;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(bad(
            "llama.attention.head_count_kv",
            format!("a divisor of the {heads} attention heads"),
            kv_heads.to_string(),
        ));
    }
    let head_dim = match f.get_opt("llama.rope.dimension_count", GgufValue::as_usize)? {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(bad(
                "llama.rope.dimension_count",
                format!("a head size (embedding_length {hidden} is not a multiple of {heads} heads)"),
                "nothing (the key is absent)".into(),
            ))
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > MAX_SIZE {
        return Err(bad("llama.rope.dimension_count", "an even head size".into(), head_dim.to_string()));
    }
    let layers = f.get_usize("llama.block_count")?;
    if layers > MAX_LAYERS {
        return Err(bad("llama.block_count", format!("at most {MAX_LAYERS}"), layers.to_string()));
    }
    let vocab = match f.get_opt("llama.vocab_size", GgufValue::as_usize)? {
        Some(v) => v,
        None if f.metadata("tokenizer.ggml.tokens").is_some() => {
            f.get("tokenizer.ggml.tokens", GgufValue::as_array)?.len()
        }
        None => {
            return Err(bad(
                "llama.vocab_size",
                "the vocabulary size (or a tokenizer.ggml.tokens array)".into(),
                "nothing (the key is absent)".into(),
            ))
        }
    };
    if vocab > MAX_SIZE {
        return Err(bad("llama.vocab_size", format!("at most {MAX_SIZE}"), vocab.to_string()));
    }
    let id = |key: &str| f.get_opt(key, GgufValue::as_u32);
    let text = TextConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: size("llama.feed_forward_length", None)?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        hidden_act: "silu".into(),
        max_position_embeddings: f.get_opt("llama.context_length", GgufValue::as_usize)?.unwrap_or(2048),
        rms_norm_eps: f.get_opt("llama.attention.layer_norm_rms_epsilon", GgufValue::as_f64)?.unwrap_or(1e-6),
        rope_theta: f.get_opt("llama.rope.freq_base", GgufValue::as_f64)?.unwrap_or(10000.0),
        attention_bias: f.tensor_info("blk.0.attn_q.bias").is_some(),
        mlp_bias: false,
        pad_token_id: id("tokenizer.ggml.padding_token_id")?.map(i64::from),
    };
    Ok(GgufLlamaConfig {
        text,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: id("tokenizer.ggml.eos_token_id")?,
        name: f.get_opt("general.name", GgufValue::as_str)?.map(str::to_string),
    })
}
