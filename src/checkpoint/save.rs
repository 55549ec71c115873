//! Writing a whole model as a transformers checkpoint (`model.safetensors`, transformers' keys):
//! dense tensors in the model's dtype, quantized Linears in bitsandbytes' serialized form
//! (`crate::quant::serialize`), so transformers + bitsandbytes load it. Written atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use half::{bf16, f16};
use safetensors::Dtype as St;

use crate::error::{CheckpointError, Result};
use crate::model::VlmModel;
use crate::ops::Linear;
use crate::quant::serialize::{self, RawTensor};

fn raw(name: String, t: &Tensor, dtype: DType, shape: Vec<usize>) -> Result<RawTensor> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(match dtype {
        DType::BF16 => (name, St::BF16, shape, v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()),
        DType::F16 => (name, St::F16, shape, v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()),
        _ => (name, St::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    })
}

fn linear(
    out: &mut Vec<RawTensor>,
    prefix: &str,
    l: &Linear,
    dtype: DType,
    weight_shape: Option<Vec<usize>>,
) -> Result<()> {
    match l.quant() {
        Some(q) => out.extend(serialize::write(prefix, q)),
        None => {
            let w = l.dense_weight()?;
            let shape = weight_shape.unwrap_or_else(|| w.dims().to_vec());
            out.push(raw(format!("{prefix}.weight"), &w, dtype, shape)?);
        }
    }
    if let Some(b) = &l.bias {
        out.push(raw(format!("{prefix}.bias"), b, dtype, b.dims().to_vec())?);
    }
    Ok(())
}

/// Every tensor of `model` under transformers' names (adapters excluded: merge them first).
pub fn state_tensors(model: &VlmModel) -> Result<Vec<RawTensor>> {
    let dt = model.reported_dtype();
    let mut out = Vec::new();
    let ln = |out: &mut Vec<RawTensor>, name: String, n: &crate::model::vision::LayerNorm| -> Result<()> {
        out.push(raw(format!("{name}.weight"), &n.weight, dt, n.weight.dims().to_vec())?);
        out.push(raw(format!("{name}.bias"), &n.bias, dt, n.bias.dims().to_vec())?);
        Ok(())
    };
    if let Some(v) = &model.vision {
        let vp = "model.vision_model";
        let (d, c, p) = (v.cfg.hidden_size, v.cfg.num_channels, v.cfg.patch_size);
        linear(&mut out, &format!("{vp}.embeddings.patch_embedding"), &v.patch_embedding, dt, Some(vec![d, c, p, p]))?;
        out.push(raw(
            format!("{vp}.embeddings.position_embedding.weight"),
            &v.position_embedding,
            dt,
            v.position_embedding.dims().to_vec(),
        )?);
        for (i, l) in v.layers.iter().enumerate() {
            let lp = format!("{vp}.encoder.layers.{i}");
            ln(&mut out, format!("{lp}.layer_norm1"), &l.layer_norm1)?;
            ln(&mut out, format!("{lp}.layer_norm2"), &l.layer_norm2)?;
        }
        ln(&mut out, format!("{vp}.post_layernorm"), &v.post_layernorm)?;
    }
    let t = &model.text;
    let tp = crate::model::modules::text_prefix(&model.config);
    out.push(raw(format!("{tp}.embed_tokens.weight"), &t.embed_tokens, dt, t.embed_tokens.dims().to_vec())?);
    for (i, l) in t.layers.iter().enumerate() {
        let lp = format!("{tp}.layers.{i}");
        out.push(raw(
            format!("{lp}.input_layernorm.weight"),
            &l.input_layernorm,
            dt,
            l.input_layernorm.dims().to_vec(),
        )?);
        out.push(raw(
            format!("{lp}.post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
            dt,
            l.post_attention_layernorm.dims().to_vec(),
        )?);
    }
    out.push(raw(format!("{tp}.norm.weight"), &t.norm, dt, t.norm.dims().to_vec())?);
    for (name, lin) in model.linears() {
        if name == "lm_head" && model.config.tie_word_embeddings {
            continue;
        }
        linear(&mut out, &name, lin, dt, None)?;
    }
    Ok(out)
}

/// Writes `tensors` to `path` as safetensors (metadata `format: pt`), through a temporary file.
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let io = |msg: String| CheckpointError::Io { file: path.to_path_buf(), msg };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| io(e.to_string()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| io(e.to_string()))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| CheckpointError::Io { file: tmp.clone(), msg: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| io(e.to_string()))?;
    Ok(())
}

/// `model.safetensors` of `model` in `dir` (created if needed).
pub fn save_model(model: &VlmModel, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::Io { file: dir.to_path_buf(), msg: e.to_string() })?;
    write_safetensors(&dir.join("model.safetensors"), &state_tensors(model)?)
}
