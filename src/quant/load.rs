//! Quantizing while loading (`from_pretrained(..., quantization_config=...)`), as transformers'
//! bitsandbytes integration does: every Linear except the skipped ones is quantized from its values
//! in the load dtype; a checkpoint saved quantized is read as stored, never quantized again.

use std::sync::Arc;

use candle_core::{DType, Device};

use super::{serialize, QuantWeight};
use crate::checkpoint::WeightStore;
use crate::error::CheckpointError;
use crate::model::LoadCtx;

/// The quantized weight of the Linear `prefix` ([out, in] = `shape`), or None when it stays dense.
pub fn linear(
    store: &WeightStore,
    prefix: &str,
    shape: (usize, usize),
    ctx: &LoadCtx,
) -> Result<Option<Arc<QuantWeight>>, CheckpointError> {
    let Some(cfg) = &ctx.quant else { return Ok(None) };
    if let Some(mut q) = serialize::read(store, prefix, shape, cfg.int8_threshold)? {
        if let QuantWeight::Int8(w) = &mut q {
            w.training = cfg.training.clone();
        }
        return Ok(Some(Arc::new(q)));
    }
    if cfg.prequantized || cfg.skips(prefix) {
        return Ok(None);
    }
    let (dt, name) = if ctx.bf16_compute {
        (DType::BF16, "bfloat16")
    } else {
        match ctx.dtype {
            DType::BF16 => (DType::BF16, "bfloat16"),
            DType::F16 => (DType::F16, "float16"),
            _ => (DType::F32, "float32"),
        }
    };
    let wname = format!("{prefix}.weight");
    let w: Vec<f32> = store
        .get(&wname, &[shape.0, shape.1], dt, &Device::Cpu)?
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| CheckpointError::Io { file: "<memory>".into(), msg: format!("tensor '{wname}': {e}") })?;
    Ok(Some(QuantWeight::quantize(&w, shape, cfg, name)))
}

/// The Linear `prefix`'s weight ([out, in] = `shape`) of a GGUF file when it is stored quantized:
/// kept in its blocks as [`QuantWeight::Ggml`] (products decode it tile by tile, with the exact
/// dequantized values). None for a safetensors store or a float type (those load dense).
pub fn gguf_linear(
    store: &WeightStore,
    prefix: &str,
    shape: (usize, usize),
) -> Result<Option<Arc<QuantWeight>>, CheckpointError> {
    use crate::quant::ggml::{GgmlType, GgmlWeight};
    let Some(g) = store.gguf() else { return Ok(None) };
    let name = format!("{prefix}.weight");
    let Some(info) = g.info(&name) else { return Ok(None) }; // missing: the dense path reports it
    if matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16) {
        return Ok(None);
    }
    let file = g.file().path().to_path_buf();
    if info.shape() != [shape.0, shape.1] {
        return Err(CheckpointError::BadShape { name, file, expected: vec![shape.0, shape.1], found: info.shape() });
    }
    let rows = g.rows(&name)?;
    g.release(&name);
    let w = GgmlWeight::from_vec(rows.ty, shape, rows.data)
        .map_err(|e| CheckpointError::Gguf { file, msg: format!("tensor '{name}': {e}") })?;
    Ok(Some(Arc::new(QuantWeight::Ggml(w))))
}

/// Whether a checkpoint holds bitsandbytes-quantized tensors.
pub fn store_is_prequantized(store: &WeightStore) -> bool {
    store.names().any(|n| n.ends_with(".SCB") || n.contains(".weight.quant_state.bitsandbytes__"))
}
