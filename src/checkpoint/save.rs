//! Writing a whole model as a transformers checkpoint (`model.safetensors` or shards, transformers' keys):
//! dense tensors in the model's dtype, quantized Linears in bitsandbytes' serialized form
//! (`crate::quant::serialize`), so transformers + bitsandbytes load it. Written atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use half::{bf16, f16};
use safetensors::Dtype as St;

use crate::error::{CheckpointError, Result};
use crate::model::VlmModel;
use crate::quant::serialize::{self, RawTensor};

fn raw(name: String, t: &Tensor, dtype: DType, shape: Vec<usize>) -> Result<RawTensor> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(match dtype {
        DType::BF16 => (name, St::BF16, shape, v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()),
        DType::F16 => (name, St::F16, shape, v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()),
        _ => (name, St::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    })
}

/// Every tensor of `model` under transformers' names, in transformers' `state_dict()` order (the order
/// its shards are filled in); adapters excluded (merge them first), a tied head left out as transformers
/// leaves it out. A quantized Linear's extra tensors (bitsandbytes' scales and quant state) follow its
/// bias, as `Linear4bit` / `Linear8bitLt` write them.
pub fn state_tensors(model: &VlmModel) -> Result<Vec<RawTensor>> {
    let dt = model.reported_dtype();
    let mut m = model.clone();
    let mut out = Vec::new();
    // The extra tensors of the last quantized Linear, written after its bias (if any).
    let mut pending: Option<(String, Vec<RawTensor>)> = None;
    crate::model::params::visit(&mut m, &mut |name, shape, slot| {
        if let Some((bias, _)) = &pending {
            if name != bias {
                out.extend(pending.take().map(|(_, x)| x).unwrap_or_default());
            }
        }
        match slot {
            crate::model::params::Slot::Tensor(t) => {
                out.push(raw(name.to_string(), t, dt, shape)?);
                if pending.as_ref().is_some_and(|(b, _)| b == name) {
                    out.extend(pending.take().map(|(_, x)| x).unwrap_or_default());
                }
            }
            crate::model::params::Slot::Weight(l) => match l.quant() {
                Some(q) => {
                    let prefix = name.strip_suffix(".weight").unwrap_or(name);
                    let mut all = serialize::write(prefix, q).into_iter();
                    out.extend(all.next());
                    pending = Some((format!("{prefix}.bias"), all.collect()));
                }
                None => out.push(raw(name.to_string(), &l.dense_weight()?, dt, shape)?),
            },
        }
        Ok(())
    })?;
    out.extend(pending.take().map(|(_, x)| x).unwrap_or_default());
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

/// `model` in `dir` (created if needed) as transformers' `save_pretrained(max_shard_size=max_shard_size)`
/// writes it after `from_pretrained` (tensors sorted by transformers' `dot_natural_key`): `model.safetensors`,
/// or shards and `model.safetensors.index.json` (see [`super::shard`]).
/// Returns the weight files written.
pub fn save_model(model: &VlmModel, dir: &Path, max_shard_size: i64) -> Result<Vec<String>> {
    let mut tensors = state_tensors(model)?;
    super::shard::sort_like_transformers(&mut tensors);
    super::shard::save_sharded(dir, &tensors, max_shard_size, model.num_parameters())
}
