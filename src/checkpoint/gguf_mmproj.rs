//! SmolVLM / Idefics3's vision tower and connector as llama.cpp's `mmproj` GGUF file (architecture
//! `clip`, projector type `idefics3`): written as llama.cpp's converter writes it (`--mmproj`, its
//! `SmolVLMModel` class) and read back under transformers' names.
//!
//! Tensors (transformers name -> mmproj name; the converter's order is the transformers names sorted):
//! - `model.vision_model.embeddings.patch_embedding.{weight,bias}` -> `v.patch_embd.*` (the Conv2d
//!   weight [D, C, P, P] as stored: ggml's ne [P, P, C, D]);
//! - `...embeddings.position_embedding.weight` -> `v.position_embd.weight`;
//! - `...encoder.layers.N.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2, self_attn.{q,k,v}_proj,
//!   self_attn.out_proj}` -> `v.blk.N.{ln1, ln2, ffn_up, ffn_down, attn_{q,k,v}, attn_out}`;
//! - `...post_layernorm` -> `v.post_ln`; `model.connector.modality_projection.proj.weight` ->
//!   `mm.model.fc.weight`.
//!
//! Types: the embeddings (patch and position) F32, every 1-D tensor F32, the other weights in the
//! method's type (Q8_0 -> F16 for rows that are not whole blocks).
//!
//! Metadata, in the converter's order: `general.architecture` "clip", `general.type` "mmproj", the
//! name keys, `general.file_type`, `clip.has_vision_encoder`, `clip.vision.{projection_dim (text
//! hidden size), image_size, patch_size, embedding_length, feed_forward_length, block_count,
//! attention.head_count, image_mean, image_std}`, `clip.projector_type`,
//! `clip.vision.attention.layer_norm_epsilon`, `clip.vision.projector.scale_factor`, `clip.use_gelu`,
//! `clip.vision.preproc_image_size` (the processor's `size.longest_edge`, else `image_size`),
//! `general.quantization_version`. `image_mean` / `image_std` and the size come from
//! `preprocessor_config.json` (and `processor_config.json`'s `image_processor`) in the assets folder,
//! else from the mmproj file the model was read from; without either, Idefics3's defaults (0.5, and
//! `image_size`) are written where the converter would stop.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::gguf::{dequantize_rows, GgufFile, GgufTensorInfo};
use super::gguf_export::QUANTIZATION_VERSION;
use super::gguf_export::{
    converter_type, encode, f32_array, general_keys, linear_source, GgufExportOptions, Item, Source,
};
use super::gguf_value::GgufValue;
use super::gguf_vocab::Kv;
use super::gguf_write::GgufWriter;
use crate::config::VisionConfig;
use crate::error::{input_err, CheckpointError, Result};
use crate::model::modules::{CONNECTOR_PROJ, VISION};
use crate::model::VlmModel;
use crate::quant::ggml::GgmlType;

/// Vision layer modules: transformers name, mmproj name.
const LAYER_MODULES: [(&str, &str); 8] = [
    ("layer_norm1", "ln1"),
    ("layer_norm2", "ln2"),
    ("mlp.fc1", "ffn_up"),
    ("mlp.fc2", "ffn_down"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.out_proj", "attn_out"),
];

/// The mmproj name of a transformers tensor name of the vision tower or connector.
pub fn mmproj_name(hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    if stem == CONNECTOR_PROJ {
        return Some(format!("mm.model.fc.{suffix}"));
    }
    let local = stem.strip_prefix(VISION)?.strip_prefix('.')?;
    match local {
        "embeddings.patch_embedding" => return Some(format!("v.patch_embd.{suffix}")),
        "embeddings.position_embedding" => return Some(format!("v.position_embd.{suffix}")),
        "post_layernorm" => return Some(format!("v.post_ln.{suffix}")),
        _ => {}
    }
    let (n, module) = local.strip_prefix("encoder.layers.")?.split_once('.')?;
    let layer: usize = n.parse().ok()?;
    let (_, g) = LAYER_MODULES.iter().find(|(h, _)| *h == module)?;
    Some(format!("v.blk.{layer}.{g}.{suffix}"))
}

/// The transformers name of an mmproj tensor name (the inverse of [`mmproj_name`]); None for
/// tensors SmolVLM does not have or blocks past `n_layers`.
pub fn hf_name(gguf: &str, n_layers: usize) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    match stem {
        "mm.model.fc" => return Some(format!("{CONNECTOR_PROJ}.{suffix}")),
        "v.patch_embd" => return Some(format!("{VISION}.embeddings.patch_embedding.{suffix}")),
        "v.position_embd" => return Some(format!("{VISION}.embeddings.position_embedding.{suffix}")),
        "v.post_ln" => return Some(format!("{VISION}.post_layernorm.{suffix}")),
        _ => {}
    }
    let (n, leaf) = stem.strip_prefix("v.blk.")?.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    let layer: usize = n.parse().ok().filter(|&l| l < n_layers)?;
    let (h, _) = LAYER_MODULES.iter().find(|(_, g)| *g == leaf)?;
    Some(format!("{VISION}.encoder.layers.{layer}.{h}.{suffix}"))
}

fn item(hf: String, shape: Vec<usize>, src: Source) -> Result<Item> {
    let gguf = mmproj_name(&hf).ok_or_else(|| CheckpointError::Io {
        file: "<export>".into(),
        msg: format!("tensor '{hf}' has no mmproj name"),
    })?;
    Ok(Item { hf, gguf, shape, src, heads: None })
}

/// The vision tower's and connector's tensors in the converter's order.
fn mmproj_items(model: &VlmModel) -> Result<Vec<Item>> {
    let (Some(v), Some(c)) = (&model.vision, &model.connector) else {
        return input_err("the model has no vision tower: there is no mmproj file to write");
    };
    let (d, ch, p) = (v.cfg.hidden_size, v.cfg.num_channels, v.cfg.patch_size);
    let dense = |t: &candle_core::Tensor| Source::Dense(t.clone());
    let mut items = Vec::new();
    let pe = format!("{VISION}.embeddings.patch_embedding");
    items.push(item(format!("{pe}.weight"), vec![d, ch, p, p], linear_source(&v.patch_embedding)?)?);
    if let Some(b) = &v.patch_embedding.bias {
        items.push(item(format!("{pe}.bias"), b.dims().to_vec(), dense(b))?);
    }
    let pos = &v.position_embedding;
    items.push(item(format!("{VISION}.embeddings.position_embedding.weight"), pos.dims().to_vec(), dense(pos))?);
    let ln = |items: &mut Vec<Item>, name: String, n: &crate::model::vision::LayerNorm| -> Result<()> {
        items.push(item(format!("{name}.weight"), n.weight.dims().to_vec(), dense(&n.weight))?);
        items.push(item(format!("{name}.bias"), n.bias.dims().to_vec(), dense(&n.bias))?);
        Ok(())
    };
    for (i, l) in v.layers.iter().enumerate() {
        let lp = format!("{VISION}.encoder.layers.{i}");
        ln(&mut items, format!("{lp}.layer_norm1"), &l.layer_norm1)?;
        ln(&mut items, format!("{lp}.layer_norm2"), &l.layer_norm2)?;
        for (name, lin) in crate::model::vision::VisionLayer::LINEARS.iter().zip(l.linears()) {
            items.push(item(
                format!("{lp}.{name}.weight"),
                vec![lin.out_features, lin.in_features],
                linear_source(lin)?,
            )?);
            if let Some(b) = &lin.bias {
                items.push(item(format!("{lp}.{name}.bias"), b.dims().to_vec(), dense(b))?);
            }
        }
    }
    ln(&mut items, format!("{VISION}.post_layernorm"), &v.post_layernorm)?;
    let proj = &c.proj;
    items.push(item(
        format!("{CONNECTOR_PROJ}.weight"),
        vec![proj.out_features, proj.in_features],
        linear_source(proj)?,
    )?);
    if let Some(b) = &proj.bias {
        items.push(item(format!("{CONNECTOR_PROJ}.bias"), b.dims().to_vec(), dense(b))?);
    }
    items.sort_by(|a, b| a.hf.cmp(&b.hf));
    Ok(items)
}

/// The image processor values the mmproj file carries: (image_mean, image_std, longest edge), from
/// the processor configs in `assets`, else from the mmproj file `source`, else Idefics3's defaults.
fn preprocessor(assets: Option<&Path>, source: Option<&Path>) -> Result<(Vec<f32>, Vec<f32>, Option<usize>)> {
    let mut cfg = serde_json::Map::new();
    for file in ["preprocessor_config.json", "processor_config.json"] {
        let Some(v) = assets
            .map(|d| d.join(file))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        else {
            continue;
        };
        let Value::Object(mut o) = v else { continue };
        let nested = if file == "processor_config.json" { o.get("image_processor").cloned() } else { None };
        if let Some(Value::Object(ip)) = nested {
            o.extend(ip);
        }
        cfg.extend(o);
    }
    let src = source.map(GgufFile::open).transpose()?;
    let floats = |k: &str| -> Result<Vec<f32>> {
        let v: Option<Vec<f32>> =
            cfg.get(k).and_then(Value::as_array).and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect());
        if let Some(v) = v {
            return Ok(v);
        }
        let key = format!("clip.vision.{k}");
        let from_src = match &src {
            Some(f) => f.get_opt(&key, GgufValue::as_array)?.and_then(|a| match a {
                super::gguf_value::GgufArray::F32(v) => Some(v.clone()),
                _ => None,
            }),
            None => None,
        };
        Ok(from_src.unwrap_or_else(|| vec![0.5; 3]))
    };
    let size = match cfg.get("size").and_then(|s| s.get("longest_edge")).and_then(Value::as_u64) {
        Some(x) => Some(x as usize),
        None => match &src {
            Some(f) => f.get_opt("clip.vision.preproc_image_size", GgufValue::as_usize)?,
            None => None,
        },
    };
    Ok((floats("image_mean")?, floats("image_std")?, size))
}

/// The mmproj GGUF file of a VLM (see the module doc).
pub fn mmproj_gguf(model: &VlmModel, opts: &GgufExportOptions) -> Result<GgufWriter> {
    super::gguf_export::check_no_adapters(model)?;
    let items = mmproj_items(model)?;
    let method = opts.method.mmproj_method();
    let total: usize = items.iter().map(Item::n_elements).sum();
    let v = &model.config.vision;
    let mut kv = Kv::default();
    kv.set("general.architecture", GgufValue::String("clip".into()));
    general_keys(&mut kv, "mmproj", opts, total);
    let (mean, std, size) = preprocessor(opts.assets_dir.as_deref(), opts.mmproj_gguf.as_deref())?;
    let u = |x: usize| GgufValue::U32(x as u32);
    let keys = [
        ("general.file_type", u(method.file_type() as usize)),
        ("clip.has_vision_encoder", GgufValue::Bool(true)),
        ("clip.vision.projection_dim", u(model.config.text.hidden_size)),
        ("clip.vision.image_size", u(v.image_size)),
        ("clip.vision.patch_size", u(v.patch_size)),
        ("clip.vision.embedding_length", u(v.hidden_size)),
        ("clip.vision.feed_forward_length", u(v.intermediate_size)),
        ("clip.vision.block_count", u(v.num_hidden_layers)),
        ("clip.vision.attention.head_count", u(v.num_attention_heads)),
        ("clip.vision.image_mean", f32_array(&mean)),
        ("clip.vision.image_std", f32_array(&std)),
        ("clip.projector_type", GgufValue::String("idefics3".into())),
        ("clip.vision.attention.layer_norm_epsilon", GgufValue::F32(v.layer_norm_eps as f32)),
        ("clip.vision.projector.scale_factor", u(model.config.scale_factor)),
        ("clip.use_gelu", GgufValue::Bool(true)),
        ("clip.vision.preproc_image_size", u(size.unwrap_or(v.image_size))),
        ("general.quantization_version", GgufValue::U32(QUANTIZATION_VERSION)),
    ];
    for (k, val) in keys {
        kv.set(k, val);
    }
    let mut w = GgufWriter::new();
    for (k, val) in kv.0 {
        w.add_metadata(k, val)?;
    }
    for it in &items {
        let forced = it.hf.contains(".embeddings.").then_some(GgmlType::F32);
        let ty = converter_type(it, method, forced);
        w.add_tensor(it.gguf.clone(), ty, &it.shape, encode(it, ty)?)?;
    }
    Ok(w)
}

/// What an Idefics3 mmproj file says about the model: the vision config, the connector's scale
/// factor and the text hidden size it projects to.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vision: VisionConfig,
    pub scale_factor: usize,
    pub projection_dim: usize,
}

/// Largest size accepted from a file, as for config.json.
const MAX_SIZE: usize = 1 << 24;

/// The [`ClipConfig`] of an mmproj file; errors name the key.
pub fn clip_config(f: &GgufFile) -> Result<ClipConfig, CheckpointError> {
    let unsupported = |what: String| CheckpointError::GgufUnsupported { file: f.path().to_path_buf(), what };
    let arch = f.get_str("general.architecture")?;
    if arch != "clip" {
        return Err(unsupported(format!("architecture '{arch}' for a vision file (an mmproj file is 'clip')")));
    }
    let proj = f.get_str("clip.projector_type")?;
    if proj != "idefics3" {
        return Err(unsupported(format!("projector type '{proj}' (only 'idefics3': SmolVLM / Idefics3 are read)")));
    }
    if f.get_opt("clip.has_vision_encoder", GgufValue::as_bool)? == Some(false) {
        return Err(unsupported("mmproj file without a vision encoder".into()));
    }
    let size = |key: &str| -> Result<usize, CheckpointError> {
        let v = f.get_usize(key)?;
        if v == 0 || v > MAX_SIZE {
            return Err(CheckpointError::GgufMetadata {
                file: f.path().to_path_buf(),
                key: key.into(),
                expected: format!("a size in 1..={MAX_SIZE}"),
                found: v.to_string(),
            });
        }
        Ok(v)
    };
    let vision = VisionConfig {
        hidden_size: size("clip.vision.embedding_length")?,
        intermediate_size: size("clip.vision.feed_forward_length")?,
        num_hidden_layers: size("clip.vision.block_count")?,
        num_attention_heads: size("clip.vision.attention.head_count")?,
        num_channels: 3,
        image_size: size("clip.vision.image_size")?,
        patch_size: size("clip.vision.patch_size")?,
        hidden_act: "gelu_pytorch_tanh".into(),
        layer_norm_eps: f.get_opt("clip.vision.attention.layer_norm_epsilon", GgufValue::as_f64)?.unwrap_or(1e-6),
    };
    Ok(ClipConfig {
        vision,
        scale_factor: size("clip.vision.projector.scale_factor")?,
        projection_dim: size("clip.vision.projection_dim")?,
    })
}

/// An mmproj file with its tensors under transformers' names.
#[derive(Debug)]
pub struct GgufClip {
    file: GgufFile,
    config: ClipConfig,
    map: HashMap<String, usize>,
}

impl GgufClip {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        Self::from_file(GgufFile::open(path)?)
    }

    pub fn from_file(file: GgufFile) -> Result<Self, CheckpointError> {
        let config = clip_config(&file)?;
        let n = config.vision.num_hidden_layers;
        let map =
            file.tensor_infos().iter().enumerate().filter_map(|(i, t)| hf_name(&t.name, n).map(|h| (h, i))).collect();
        Ok(GgufClip { file, config, map })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn contains(&self, hf: &str) -> bool {
        self.map.contains_key(hf)
    }

    pub fn info(&self, hf: &str) -> Option<&GgufTensorInfo> {
        self.map.get(hf).map(|&i| &self.file.tensor_infos()[i])
    }

    /// `hf` decoded to f32 (rows in file order, which is transformers' order), with its shape.
    pub fn dequantize(&self, hf: &str) -> Result<(Vec<f32>, Vec<usize>), CheckpointError> {
        let info = self.info(hf).ok_or_else(|| CheckpointError::MissingTensor {
            name: hf.into(),
            files: self.file.path().display().to_string(),
        })?;
        let rows: Vec<usize> = (0..info.n_rows()).collect();
        let values =
            if info.n_elements() == 0 { Vec::new() } else { dequantize_rows(info, self.file.data(info), &rows) };
        Ok((values, info.shape()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("model.vision_model.embeddings.patch_embedding.weight", "v.patch_embd.weight"),
            ("model.vision_model.embeddings.position_embedding.weight", "v.position_embd.weight"),
            ("model.vision_model.encoder.layers.1.self_attn.out_proj.bias", "v.blk.1.attn_out.bias"),
            ("model.vision_model.encoder.layers.0.mlp.fc1.weight", "v.blk.0.ffn_up.weight"),
            ("model.vision_model.encoder.layers.0.layer_norm2.weight", "v.blk.0.ln2.weight"),
            ("model.vision_model.post_layernorm.bias", "v.post_ln.bias"),
            ("model.connector.modality_projection.proj.weight", "mm.model.fc.weight"),
        ];
        for (hf, g) in pairs {
            assert_eq!(mmproj_name(hf).as_deref(), Some(g), "{hf}");
            assert_eq!(hf_name(g, 2).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(hf_name("v.blk.2.ln1.weight", 2), None);
        assert_eq!(hf_name("v.blk.01.ln1.weight", 2), None);
        assert_eq!(hf_name("mm.input_norm.weight", 2), None);
    }
}
