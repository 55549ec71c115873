//! PEFT adapter files: `adapter_model.safetensors` with PEFT's keys
//! (`base_model.model.<module>.lora_A.weight`, ...). Written atomically: a temporary file renamed into
//! place, so a crash never leaves a truncated file under the final name.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::WeightStore;
use crate::error::CheckpointError;

/// Writes f32 tensors to a safetensors file (metadata `format: pt`, like PEFT).
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let io = |msg: String| CheckpointError::Io { file: path.to_path_buf(), msg };
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| io(e.to_string()))?;
        owned.push((name.clone(), t.dims().to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| io(e.to_string()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| io(e.to_string()))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| CheckpointError::Io { file: tmp.clone(), msg: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| io(e.to_string()))
}

/// Every tensor of a safetensors file, as f32.
pub fn load_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::NotFound { path: path.to_path_buf(), hint: String::new() });
    }
    let store = WeightStore::open_files(&[path.to_path_buf()])?;
    let mut names: Vec<String> = store.names().map(str::to_string).collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let shape = store.shape(&n).unwrap_or_default();
        out.push((n.clone(), store.get(&n, &shape, DType::F32, &Device::Cpu)?));
    }
    Ok(out)
}
