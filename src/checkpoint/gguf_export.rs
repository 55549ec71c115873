//! Exporting a model to GGUF for llama.cpp: the text model as an `arch llama` file, laid out as
//! llama.cpp's converter (`convert_hf_to_gguf.py`) writes it for the same checkpoint, and for a VLM the
//! vision tower + connector as an `mmproj` file (`gguf_mmproj`).
//!
//! What matches the converter (`tests/fixtures/gguf_export`, `tests/gguf_export.rs`):
//! - metadata keys, value types, values and order: `general.*` (names from `gguf_naming`), `llama.*`,
//!   `general.file_type`, `general.quantization_version`, then the tokenizer (`gguf_vocab`);
//! - tensors: the converter's names, in its order for a single-file checkpoint (Hugging Face names
//!   sorted as strings: `lm_head` first, then `embed_tokens`, the layers, `norm`), Q and K rows
//!   permuted for llama.cpp's RoPE (`gguf_llama::permute_order`), and the types of `--outtype`:
//!   norms and other 1-D tensors F32; `f32` F32, `f16` F16, `q8_0` Q8_0 where the row length is a
//!   multiple of 32, else F16 (gguf-py's `QuantError` fallback). Values are encoded by gguf-py's
//!   rules (`quant::ggml_quantize`), so an export equals the converter's bytes.
//! - `q4_k_m` is what `llama-quantize ... Q4_K_M` writes from the `f32` export: its tensor order
//!   (blocks in layer order, names sorted within), its type choices (`llama_tensor_get_type`: Q4_K,
//!   Q6_K for `attn_v` and `ffn_down` in the layers `use_more_bits` picks, the output head Q6_K - or
//!   Q8_0 when its rows are not whole 256-blocks; for a tied head the token embedding takes that role),
//!   the fallback of rows a K-quant cannot hold (`GgmlType::fallback_for_row`), `general.file_type` 15
//!   and the two keys it re-sets moved to the end. ggml's reference quantizers give its bytes.
//!
//! A model read from GGUF exports its quantized Linear weights' blocks unchanged when the target type
//! is theirs; other tensors are encoded from their f32 values. Adapters must be merged first.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::gguf_llama::{gguf_name, permute_order};
use super::gguf_naming::GeneralNames;
use super::gguf_value::{GgufArray, GgufValue};
use super::gguf_vocab::{self, Kv};
use super::gguf_write::GgufWriter;
use super::GgufFile;
use crate::error::{input_err, CheckpointError, Error, Result};
use crate::model::VlmModel;
use crate::ops::Linear;
use crate::quant::ggml::{GgmlType, GgmlWeight, QK_K};
use crate::quant::ggml_quantize::quantize;
use crate::quant::QuantWeight;

/// `general.quantization_version` (ggml's GGML_QNT_VERSION).
pub const QUANTIZATION_VERSION: u32 = 2;

/// The `quantization_method` of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuantMethod {
    F32,
    F16,
    Q8_0,
    /// llama.cpp's `Q4_K_M` mixture.
    Q4KM,
}

impl GgufQuantMethod {
    pub const ALL: [GgufQuantMethod; 4] =
        [GgufQuantMethod::F16, GgufQuantMethod::Q8_0, GgufQuantMethod::Q4KM, GgufQuantMethod::F32];

    /// "f16", "q8_0", "q4_k_m", "f32" (any case); an error lists the allowed names.
    pub fn parse(s: &str) -> Result<Self> {
        let l = s.to_ascii_lowercase();
        match Self::ALL.into_iter().find(|m| m.name() == l) {
            Some(m) => Ok(m),
            None => {
                let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                input_err(format!("unknown quantization_method '{s}' (allowed: {})", names.join(", ")))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufQuantMethod::F32 => "f32",
            GgufQuantMethod::F16 => "f16",
            GgufQuantMethod::Q8_0 => "q8_0",
            GgufQuantMethod::Q4KM => "q4_k_m",
        }
    }

    /// The file-name part and llama.cpp's ftype name: "F32", "F16", "Q8_0", "Q4_K_M".
    pub fn output_type(self) -> &'static str {
        match self {
            GgufQuantMethod::F32 => "F32",
            GgufQuantMethod::F16 => "F16",
            GgufQuantMethod::Q8_0 => "Q8_0",
            GgufQuantMethod::Q4KM => "Q4_K_M",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufQuantMethod::F32 => 0,
            GgufQuantMethod::F16 => 1,
            GgufQuantMethod::Q8_0 => 7,
            GgufQuantMethod::Q4KM => 15,
        }
    }

    /// The type of a plain 2-D weight before any per-tensor rule.
    pub fn base_type(self) -> GgmlType {
        match self {
            GgufQuantMethod::F32 => GgmlType::F32,
            GgufQuantMethod::F16 => GgmlType::F16,
            GgufQuantMethod::Q8_0 => GgmlType::Q8_0,
            GgufQuantMethod::Q4KM => GgmlType::Q4K,
        }
    }

    /// The method of the mmproj file: the same, except `q4_k_m` (llama-quantize does not quantize
    /// mmproj files; they ship in F16 next to K-quantized text files).
    pub fn mmproj_method(self) -> GgufQuantMethod {
        match self {
            GgufQuantMethod::Q4KM => GgufQuantMethod::F16,
            m => m,
        }
    }
}

/// What an export needs besides the model.
#[derive(Debug, Clone)]
pub struct GgufExportOptions {
    pub method: GgufQuantMethod,
    /// The name the model was loaded under (a hub id or a folder path): `general.name`, ... and the
    /// file names, by the converter's heuristics.
    pub name_or_path: String,
    /// The converter's model folder for everything that is not a weight: tokenizer files, chat
    /// templates, `preprocessor_config.json` / `processor_config.json`, `generation_config.json`.
    pub assets_dir: Option<PathBuf>,
    /// A GGUF file whose `tokenizer.*` keys are copied (a model read from GGUF); used when
    /// `assets_dir` has no `tokenizer.json`.
    pub tokenizer_gguf: Option<PathBuf>,
    /// An mmproj file whose image settings (`clip.vision.image_mean`, `image_std`,
    /// `preproc_image_size`) are kept where `assets_dir` has no processor config (a model read from
    /// GGUF files).
    pub mmproj_gguf: Option<PathBuf>,
}

/// Where an exported tensor's values come from.
#[derive(Clone)]
pub(crate) enum Source {
    Dense(Tensor),
    Blocks(GgmlWeight),
}

/// One tensor of an export, in Hugging Face layout.
#[derive(Clone)]
pub(crate) struct Item {
    pub hf: String,
    pub gguf: String,
    /// Outermost first.
    pub shape: Vec<usize>,
    pub src: Source,
    /// Rows permuted for llama.cpp's RoPE over this many heads (Q, K).
    pub heads: Option<usize>,
}

impl Item {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

fn err(msg: String) -> Error {
    Error::Checkpoint(CheckpointError::Io { file: "<export>".into(), msg })
}

/// f32 values of a tensor, row-major.
pub(crate) fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// The weight of `lin` as an export source: its GGUF blocks, or its dense (dequantized) values.
pub(crate) fn linear_source(lin: &Linear) -> Result<Source> {
    if let Some(q) = lin.quant() {
        if let QuantWeight::Ggml(w) = &**q {
            return Ok(Source::Blocks(w.clone()));
        }
    }
    Ok(Source::Dense(lin.dense_weight()?))
}

/// Moves whole rows: output row `g` is input row `order[g]` (`row` values or bytes each).
fn permute_rows<T: Copy>(data: &[T], row: usize, order: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row..(r + 1) * row]);
    }
    out
}

/// The bytes of `item` in type `ty` (Q/K rows permuted).
pub(crate) fn encode(item: &Item, ty: GgmlType) -> Result<Vec<u8>> {
    let outer = item.shape.first().copied().unwrap_or(1);
    let n = item.n_elements();
    let order = match item.heads {
        Some(h) => Some(permute_order(outer, h).ok_or_else(|| {
            err(format!("tensor '{}': {outer} rows are not a whole number of {h} heads of an even size", item.hf))
        })?),
        None => None,
    };
    if let Source::Blocks(w) = &item.src {
        if w.ty == ty {
            let rb = w.row_bytes();
            return Ok(match &order {
                Some(o) => permute_rows(w.data(), rb, o),
                None => w.data().to_vec(),
            });
        }
    }
    let mut values = match &item.src {
        Source::Dense(t) => f32_values(t)?,
        Source::Blocks(w) => {
            let mut v = vec![0f32; w.shape.0 * w.shape.1];
            w.decode_rows(0, w.shape.0, &mut v);
            v
        }
    };
    if values.len() != n {
        return Err(err(format!("tensor '{}': {} values for shape {:?}", item.hf, values.len(), item.shape)));
    }
    if let Some(o) = &order {
        values = permute_rows(&values, n / outer.max(1), o);
    }
    let cols = item.shape.last().copied().unwrap_or(1);
    quantize(ty, &values, cols).map_err(|e| err(format!("tensor '{}' as {}: {e}", item.hf, ty.name())))
}

/// The converter's type for a tensor (`prepare_tensors`): 1-D tensors, norms and non-weights F32,
/// `forced` when a model class forces one, else the method's type with Q8_0 -> F16 for rows that are
/// not whole blocks.
pub(crate) fn converter_type(item: &Item, method: GgufQuantMethod, forced: Option<GgmlType>) -> GgmlType {
    if item.shape.len() <= 1 || item.gguf.ends_with("_norm.weight") || !item.gguf.ends_with(".weight") {
        return GgmlType::F32;
    }
    if let Some(t) = forced {
        return t;
    }
    let t = method.base_type();
    let row = item.shape.last().copied().unwrap_or(1);
    if !row.is_multiple_of(t.block_size()) {
        GgmlType::F16
    } else {
        t
    }
}

/// llama-quantize's order: tensors outside the blocks first, then block by block, names sorted
/// within each (`weight_name_comparer`).
fn quantize_order(a: &str, b: &str) -> std::cmp::Ordering {
    let layer = |s: &str| -> i64 {
        s.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<i64>().ok()).unwrap_or(-1)
    };
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)` (the subtraction only runs when i >= n / 8).
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Types of `items` (already in llama-quantize's order) under `Q4_K_M`, as `llama_tensor_get_type`
/// chooses them for a Llama model of `n_layer` blocks, then `tensor_type_fallback`.
fn q4_k_m_types(items: &[Item], n_layer: usize) -> Vec<GgmlType> {
    let tied = !items.iter().any(|i| i.gguf == "output.weight");
    let n_attn_v = items.iter().filter(|i| i.gguf.contains("attn_v.weight")).count();
    let (mut i_attn_v, mut i_ffn_down) = (0, 0);
    items
        .iter()
        .map(|it| {
            let name = it.gguf.as_str();
            let quantizable = it.shape.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight");
            if !quantizable {
                return GgmlType::F32;
            }
            let nx = it.shape.last().copied().unwrap_or(1);
            let mut t = GgmlType::Q4K;
            if name == "output.weight" || (tied && name == "token_embd.weight") {
                t = if !nx.is_multiple_of(QK_K) { GgmlType::Q8_0 } else { GgmlType::Q6K };
            } else if name.contains("attn_v.weight") {
                if use_more_bits(i_attn_v, n_attn_v) {
                    t = GgmlType::Q6K;
                }
                i_attn_v += 1;
            } else if name.contains("ffn_down") {
                if use_more_bits(i_ffn_down, n_layer) {
                    t = GgmlType::Q6K;
                }
                i_ffn_down += 1;
            }
            t.fallback_for_row(nx)
        })
        .collect()
}

/// The text model's tensors under Hugging Face names, sorted as the converter reads a single-file
/// checkpoint, with their GGUF names.
pub(crate) fn text_items(model: &VlmModel) -> Result<Vec<Item>> {
    let tp = crate::model::modules::text_prefix(&model.config);
    let t = &model.text;
    let cfg = &model.config.text;
    let mut items = Vec::new();
    let mut push = |hf: String, shape: Vec<usize>, src: Source, heads: Option<usize>| -> Result<()> {
        let g = gguf_name(&hf, tp).ok_or_else(|| err(format!("tensor '{hf}' has no GGUF name")))?;
        items.push(Item { hf, gguf: g, shape, src, heads });
        Ok(())
    };
    let tied = model.config.tie_word_embeddings;
    let embed_src = match (tied, model.lm_head.quant().map(|q| &**q)) {
        (true, Some(QuantWeight::Ggml(w))) => Source::Blocks(w.clone()),
        _ => Source::Dense(t.embed_tokens.clone()),
    };
    push(format!("{tp}.embed_tokens.weight"), t.embed_tokens.dims().to_vec(), embed_src, None)?;
    for (i, l) in t.layers.iter().enumerate() {
        let lp = format!("{tp}.layers.{i}");
        for (name, norm) in
            [("input_layernorm", &l.input_layernorm), ("post_attention_layernorm", &l.post_attention_layernorm)]
        {
            push(format!("{lp}.{name}.weight"), norm.dims().to_vec(), Source::Dense(norm.clone()), None)?;
        }
        for (name, lin) in crate::model::text::TextLayer::LINEARS.iter().zip(l.linears()) {
            let heads = match *name {
                "self_attn.q_proj" => Some(cfg.num_attention_heads),
                "self_attn.k_proj" => Some(cfg.num_key_value_heads),
                _ => None,
            };
            push(format!("{lp}.{name}.weight"), vec![lin.out_features, lin.in_features], linear_source(lin)?, heads)?;
            if let Some(b) = &lin.bias {
                push(format!("{lp}.{name}.bias"), b.dims().to_vec(), Source::Dense(b.clone()), heads)?;
            }
        }
    }
    push(format!("{tp}.norm.weight"), t.norm.dims().to_vec(), Source::Dense(t.norm.clone()), None)?;
    if !tied {
        let h = &model.lm_head;
        push("lm_head.weight".into(), vec![h.out_features, h.in_features], linear_source(h)?, None)?;
        if let Some(b) = &h.bias {
            push("lm_head.bias".into(), b.dims().to_vec(), Source::Dense(b.clone()), None)?;
        }
    }
    items.sort_by(|a, b| a.hf.cmp(&b.hf));
    Ok(items)
}

/// Refuses a model with adapters attached (their weights would be missing from the file).
pub fn check_no_adapters(model: &VlmModel) -> Result<()> {
    let with: Vec<String> = model.linears().into_iter().filter(|(_, l)| l.adapter.is_some()).map(|(n, _)| n).collect();
    if let Some(first) = with.first() {
        return input_err(format!(
            "the model has adapters attached ({} layers, e.g. '{first}'): merge them first (merge_and_unload()) \
             or export the PeftModel, which merges a copy",
            with.len()
        ));
    }
    Ok(())
}

/// `general.sampling.*` from `generation_config.json` in the assets folder, as the converter reads it.
pub(crate) fn sampling_keys(assets: Option<&Path>) -> Kv {
    let mut kv = Kv::default();
    let Some(path) = assets.map(|d| d.join("generation_config.json")).filter(|p| p.is_file()) else { return kv };
    let Ok(json) = std::fs::read_to_string(&path).map(|t| serde_json::from_str::<serde_json::Value>(&t)) else {
        return kv;
    };
    let Ok(g) = json else { return kv };
    let keys: [(&[&str], &str, char); 12] = [
        (&["sequence"], "sequence", 's'),
        (&["top_k"], "top_k", 'i'),
        (&["top_p"], "top_p", 'f'),
        (&["min_p"], "min_p", 'f'),
        (&["xtc_probability"], "xtc_probability", 'f'),
        (&["xtc_threshold"], "xtc_threshold", 'f'),
        (&["temperature"], "temp", 'f'),
        (&["penalty_last_n"], "penalty_last_n", 'i'),
        (&["penalty_repeat", "repetition_penalty"], "penalty_repeat", 'f'),
        (&["mirostat"], "mirostat", 'i'),
        (&["mirostat_tau"], "mirostat_tau", 'f'),
        (&["mirostat_eta"], "mirostat_eta", 'f'),
    ];
    for (json_keys, key, kind) in keys {
        let Some(v) = json_keys.iter().find_map(|k| g.get(*k).filter(|v| !v.is_null())) else { continue };
        let value = match kind {
            's' => v.as_str().map(|s| GgufValue::String(s.into())),
            'i' => v.as_i64().and_then(|x| i32::try_from(x).ok()).map(GgufValue::I32),
            _ => v.as_f64().map(|x| GgufValue::F32(x as f32)),
        };
        if let Some(value) = value {
            kv.set(&format!("general.sampling.{key}"), value);
        }
    }
    kv
}

/// `general.type`, sampling keys, name keys and size label, in the converter's order.
pub(crate) fn general_keys(kv: &mut Kv, ty: &str, opts: &GgufExportOptions, total_params: usize) {
    kv.set("general.type", GgufValue::String(ty.into()));
    for (k, v) in sampling_keys(opts.assets_dir.as_deref()).0 {
        kv.set(&k, v);
    }
    let n = GeneralNames::from_name_or_path(&opts.name_or_path, total_params as u64);
    kv.set("general.name", GgufValue::String(n.name.clone()));
    let opt = [
        ("general.version", &n.version),
        ("general.organization", &n.organization),
        ("general.finetune", &n.finetune),
        ("general.basename", &n.basename),
        ("general.size_label", &n.size_label),
    ];
    for (k, v) in opt {
        if let Some(v) = v {
            kv.set(k, GgufValue::String(v.clone()));
        }
    }
}

/// The tokenizer keys of an export: from `tokenizer.json` in the assets folder, else from
/// `tokenizer_gguf`, else none (llama.cpp then cannot load the file).
fn tokenizer_keys(model: &VlmModel, opts: &GgufExportOptions) -> Result<Kv> {
    if let Some(dir) = opts.assets_dir.as_deref().filter(|d| d.join("tokenizer.json").is_file()) {
        return gguf_vocab::from_tokenizer_dir(dir, model.config.text.vocab_size, &model.config.raw);
    }
    if let Some(g) = &opts.tokenizer_gguf {
        return Ok(gguf_vocab::from_gguf(&GgufFile::open(g)?));
    }
    Ok(Kv::default())
}

/// The text GGUF file of `model` (see the module doc).
pub fn text_gguf(model: &VlmModel, opts: &GgufExportOptions) -> Result<GgufWriter> {
    Ok(text_gguf_counted(model, opts)?.0)
}

/// [`text_gguf`] and the number of values it holds (the size label's count).
fn text_gguf_counted(model: &VlmModel, opts: &GgufExportOptions) -> Result<(GgufWriter, usize)> {
    check_no_adapters(model)?;
    let mut items = text_items(model)?;
    let method = opts.method;
    let types: Vec<GgmlType> = if method == GgufQuantMethod::Q4KM {
        items.sort_by(|a, b| quantize_order(&a.gguf, &b.gguf));
        q4_k_m_types(&items, model.config.text.num_hidden_layers)
    } else {
        items.iter().map(|i| converter_type(i, method, None)).collect()
    };
    let total: usize = items.iter().map(Item::n_elements).sum();
    let t = &model.config.text;
    let mut kv = Kv::default();
    kv.set("general.architecture", GgufValue::String("llama".into()));
    general_keys(&mut kv, "model", opts, total);
    let u = |x: usize| GgufValue::U32(x as u32);
    let llama = [
        ("llama.block_count", u(t.num_hidden_layers)),
        ("llama.context_length", u(t.max_position_embeddings)),
        ("llama.embedding_length", u(t.hidden_size)),
        ("llama.feed_forward_length", u(t.intermediate_size)),
        ("llama.attention.head_count", u(t.num_attention_heads)),
        ("llama.attention.head_count_kv", u(t.num_key_value_heads)),
        ("llama.rope.freq_base", GgufValue::F32(t.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(t.rms_norm_eps as f32)),
        ("llama.attention.key_length", u(t.head_dim)),
        ("llama.attention.value_length", u(t.head_dim)),
    ];
    for (k, v) in llama {
        kv.set(k, v);
    }
    // the converter's own file type; llama-quantize re-sets it (at the end) for q4_k_m
    let conv_ft = if method == GgufQuantMethod::Q4KM { GgufQuantMethod::F32 } else { method };
    kv.set("general.file_type", GgufValue::U32(conv_ft.file_type()));
    kv.set("llama.vocab_size", u(t.vocab_size));
    kv.set("llama.rope.dimension_count", u(t.head_dim));
    kv.set("general.quantization_version", GgufValue::U32(QUANTIZATION_VERSION));
    for (k, v) in tokenizer_keys(model, opts)?.0 {
        kv.set(&k, v);
    }
    if method == GgufQuantMethod::Q4KM {
        kv.0.retain(|(k, _)| k != "general.quantization_version" && k != "general.file_type");
        kv.set("general.quantization_version", GgufValue::U32(QUANTIZATION_VERSION));
        kv.set("general.file_type", GgufValue::U32(method.file_type()));
    }
    let mut w = GgufWriter::new();
    for (k, v) in kv.0 {
        w.add_metadata(k, v)?;
    }
    for (item, ty) in items.iter().zip(types) {
        w.add_tensor(item.gguf.clone(), ty, &item.shape, encode(item, ty)?)?;
    }
    Ok((w, total))
}

/// Writes `w` to `path` through a temporary file next to it.
pub fn write_file(w: &GgufWriter, path: &Path) -> Result<()> {
    let tmp = path.with_extension("gguf.tmp");
    w.write_to_path(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| CheckpointError::Io { file: path.to_path_buf(), msg: e.to_string() })?;
    Ok(())
}

/// The files an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedFiles {
    pub text: PathBuf,
    pub mmproj: Option<PathBuf>,
}

/// Writes the text GGUF (and for a VLM the mmproj GGUF) of `model` into `dir` (created if needed),
/// named as llama.cpp's converter names its outputs: `<Name>[-<size>][-<finetune>][-<version>]-<TYPE>.gguf`
/// and `mmproj-<Name>[-<finetune>][-<version>]-<TYPE>.gguf` (`gguf_naming`).
pub fn export(model: &VlmModel, dir: &Path, opts: &GgufExportOptions) -> Result<ExportedFiles> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::Io { file: dir.to_path_buf(), msg: e.to_string() })?;
    let (text, total) = text_gguf_counted(model, opts)?;
    let names = GeneralNames::from_name_or_path(&opts.name_or_path, total as u64);
    let text_path = dir.join(format!("{}.gguf", names.file_stem(true, opts.method.output_type())));
    write_file(&text, &text_path)?;
    drop(text);
    let mmproj = if model.vision.is_some() {
        let w = super::gguf_mmproj::mmproj_gguf(model, opts)?;
        let mm = opts.method.mmproj_method();
        let path = dir.join(format!("mmproj-{}.gguf", names.file_stem(false, mm.output_type())));
        write_file(&w, &path)?;
        Some(path)
    } else {
        None
    };
    Ok(ExportedFiles { text: text_path, mmproj })
}

/// Helper for tests and bindings: an F32 array value.
pub(crate) fn f32_array(v: &[f32]) -> GgufValue {
    GgufValue::Array(GgufArray::F32(v.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_name_their_files() {
        assert_eq!(GgufQuantMethod::parse("Q4_K_M").unwrap(), GgufQuantMethod::Q4KM);
        let e = GgufQuantMethod::parse("q5_k").unwrap_err().to_string();
        assert!(e.contains("f16, q8_0, q4_k_m, f32"), "{e}");
        assert_eq!(GgufQuantMethod::Q8_0.output_type(), "Q8_0");
        assert_eq!(GgufQuantMethod::Q4KM.mmproj_method(), GgufQuantMethod::F16);
    }

    #[test]
    fn llama_quantize_order_and_more_bits() {
        let mut names = vec![
            "blk.10.attn_k.weight",
            "output_norm.weight",
            "blk.2.attn_v.weight",
            "token_embd.weight",
            "blk.2.attn_k.weight",
        ];
        names.sort_by(|a, b| quantize_order(a, b));
        assert_eq!(
            names,
            [
                "output_norm.weight",
                "token_embd.weight",
                "blk.2.attn_k.weight",
                "blk.2.attn_v.weight",
                "blk.10.attn_k.weight"
            ]
        );
        // SmolLM2-135M (30 layers): llama.cpp's Q4_K_M puts Q6_K ffn_down in layers 0-2, 5, 8, ...
        let more: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert!(!use_more_bits(0, 2) && use_more_bits(1, 2));
    }

    #[test]
    fn permuting_rows_moves_whole_rows() {
        let data = [0, 0, 1, 1, 2, 2, 3, 3];
        assert_eq!(permute_rows(&data, 2, &[0, 2, 1, 3]), [0, 0, 2, 2, 1, 1, 3, 3]);
    }
}
