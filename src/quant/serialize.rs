//! bitsandbytes' serialized form of quantized Linear weights (what `save_pretrained` of a
//! transformers model loaded in 4 or 8 bits writes), read and written.
//!
//! 4-bit, per module `<m>`: `<m>.weight` U8 [(N*K+1)/2, 1] (packed codes), `<m>.weight.absmax` (F32
//! [blocks], or U8 when nested), `<m>.weight.quant_map` F32 [16], nested only:
//! `<m>.weight.nested_absmax` F32 and `<m>.weight.nested_quant_map` F32 [256]; and one
//! `<m>.weight.quant_state.bitsandbytes__<nf4|fp4>`: U8 bytes of a JSON dict (quant_type, blocksize,
//! dtype, shape, and nested_blocksize, nested_dtype, nested_offset when nested).
//! 8-bit: `<m>.weight` I8 [N, K], `<m>.SCB` F32 [N], `<m>.weight_format` U8 scalar 0.

use safetensors::Dtype as St;

use super::four_bit::{Absmax, FourBitType};
use super::{FourBit, Int8, QuantWeight};
use crate::checkpoint::WeightStore;
use crate::error::CheckpointError;

/// A tensor to write: name, safetensors dtype, shape, little-endian bytes.
pub type RawTensor = (String, St, Vec<usize>, Vec<u8>);

fn corrupt(store_file: &std::path::Path, msg: String) -> CheckpointError {
    CheckpointError::Corrupt { file: store_file.to_path_buf(), msg }
}

fn f32s(store: &WeightStore, name: &str, len: usize) -> Result<Vec<f32>, CheckpointError> {
    let (dt, shape, bytes, file) = store.raw(name)?;
    if dt != St::F32 || shape.iter().product::<usize>() != len {
        return Err(CheckpointError::BadShape {
            name: name.into(),
            file: file.into(),
            expected: vec![len],
            found: shape,
        });
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn u8s(store: &WeightStore, name: &str, len: usize) -> Result<Vec<u8>, CheckpointError> {
    let (dt, shape, bytes, file) = store.raw(name)?;
    if dt != St::U8 || shape.iter().product::<usize>() != len {
        return Err(CheckpointError::BadShape {
            name: name.into(),
            file: file.into(),
            expected: vec![len],
            found: shape,
        });
    }
    Ok(bytes.to_vec())
}

/// Whether `prefix` (a Linear module) is stored pre-quantized by bitsandbytes.
pub fn is_prequantized(store: &WeightStore, prefix: &str) -> bool {
    store.contains(&format!("{prefix}.SCB"))
        || ["nf4", "fp4"].iter().any(|t| store.contains(&format!("{prefix}.weight.quant_state.bitsandbytes__{t}")))
}

/// Reads a pre-quantized Linear `prefix` of shape [out, in]; None when it is not stored quantized.
pub fn read(
    store: &WeightStore,
    prefix: &str,
    shape: (usize, usize),
    int8_threshold: f32,
) -> Result<Option<QuantWeight>, CheckpointError> {
    let (o, k) = shape;
    if store.contains(&format!("{prefix}.SCB")) {
        let name = format!("{prefix}.weight");
        let (dt, s, bytes, file) = store.raw(&name)?;
        if dt != St::I8 || s != [o, k] {
            return Err(CheckpointError::BadShape { name, file: file.into(), expected: vec![o, k], found: s });
        }
        let cb = bytes.iter().map(|&b| b as i8).collect();
        let scb = f32s(store, &format!("{prefix}.SCB"), o)?;
        return Ok(Some(QuantWeight::Int8(Int8 {
            shape,
            cb,
            scb,
            threshold: int8_threshold,
            training: Default::default(),
        })));
    }
    let Some(ty) =
        ["nf4", "fp4"].into_iter().find(|t| store.contains(&format!("{prefix}.weight.quant_state.bitsandbytes__{t}")))
    else {
        return Ok(None);
    };
    let state_name = format!("{prefix}.weight.quant_state.bitsandbytes__{ty}");
    let (_, _, state_bytes, file) = store.raw(&state_name)?;
    let file = file.to_path_buf();
    let state: serde_json::Value =
        serde_json::from_slice(state_bytes).map_err(|e| corrupt(&file, format!("'{state_name}' is not JSON: {e}")))?;
    let field = |key: &str| state.get(key).ok_or_else(|| corrupt(&file, format!("'{state_name}' lacks '{key}'")));
    let quant_type = field("quant_type")?.as_str().unwrap_or_default().to_string();
    let ty = FourBitType::parse(&quant_type)
        .ok_or_else(|| corrupt(&file, format!("'{state_name}': unknown quant_type '{quant_type}' (nf4, fp4)")))?;
    let blocksize = field("blocksize")?
        .as_u64()
        .filter(|&b| b > 0)
        .ok_or_else(|| corrupt(&file, format!("'{state_name}': bad blocksize")))? as usize;
    let stored: Vec<usize> = field("shape")?
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
        .unwrap_or_default();
    if stored != [o, k] {
        return Err(CheckpointError::BadShape { name: state_name, file, expected: vec![o, k], found: stored });
    }
    let dtype = field("dtype")?.as_str().unwrap_or("float32").trim_start_matches("torch.").to_string();
    let n = o * k;
    let blocks = n.div_ceil(blocksize);
    let wname = format!("{prefix}.weight");
    let (dt, s, bytes, wfile) = store.raw(&wname)?;
    if dt != St::U8 || s.iter().product::<usize>() != n.div_ceil(2) {
        return Err(CheckpointError::BadShape {
            name: wname,
            file: wfile.into(),
            expected: vec![n.div_ceil(2), 1],
            found: s,
        });
    }
    let packed = bytes.to_vec();
    let quant_map = f32s(store, &format!("{prefix}.weight.quant_map"), 16)?;
    if quant_map.iter().zip(ty.table()).any(|(a, b)| a.to_bits() != b.to_bits() && a != b) {
        return Err(corrupt(&file, format!("'{prefix}.weight.quant_map' is not bitsandbytes' {quant_type} table")));
    }
    let absmax = if state.get("nested_offset").is_some() {
        let nb = state
            .get("nested_blocksize")
            .and_then(|v| v.as_u64())
            .filter(|&b| b > 0)
            .ok_or_else(|| corrupt(&file, format!("'{state_name}' lacks 'nested_blocksize'")))?
            as usize;
        let offset = state
            .get("nested_offset")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| corrupt(&file, format!("'{state_name}': bad nested_offset")))? as f32;
        let codes = u8s(store, &format!("{prefix}.weight.absmax"), blocks)?;
        let nested_absmax = f32s(store, &format!("{prefix}.weight.nested_absmax"), blocks.div_ceil(nb))?;
        let nested_map = f32s(store, &format!("{prefix}.weight.nested_quant_map"), 256)?;
        Absmax::Nested { codes, nested_absmax, nested_map, nested_blocksize: nb, offset }
    } else {
        Absmax::Plain(f32s(store, &format!("{prefix}.weight.absmax"), blocks)?)
    };
    Ok(Some(QuantWeight::FourBit(FourBit::from_parts(ty, shape, packed, absmax, blocksize, dtype))))
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors bitsandbytes writes for the quantized Linear `prefix`. A GGUF weight is written as
/// transformers holds it: `{prefix}.weight` dequantized, F32.
pub fn write(prefix: &str, w: &QuantWeight) -> Vec<RawTensor> {
    match w {
        QuantWeight::Ggml(q) => {
            vec![(format!("{prefix}.weight"), St::F32, vec![q.shape.0, q.shape.1], le_f32(&w.dequantize()))]
        }
        QuantWeight::Int8(q) => vec![
            (format!("{prefix}.weight"), St::I8, vec![q.shape.0, q.shape.1], q.cb.iter().map(|&c| c as u8).collect()),
            (format!("{prefix}.SCB"), St::F32, vec![q.shape.0], le_f32(&q.scb)),
            (format!("{prefix}.weight_format"), St::U8, vec![], vec![0]),
        ],
        QuantWeight::FourBit(q) => {
            // The JSON text exactly as bitsandbytes writes it (Python's json.dumps: its key order, ", "
            // and ": " separators, shortest float repr).
            let mut state = format!(
                r#"{{"quant_type": "{}", "blocksize": {}, "dtype": "{}", "shape": [{}, {}]"#,
                q.ty.name(),
                q.blocksize,
                q.dtype,
                q.shape.0,
                q.shape.1
            );
            let mut out = vec![
                (format!("{prefix}.weight"), St::U8, vec![q.packed.len(), 1], q.packed.clone()),
                (format!("{prefix}.weight.quant_map"), St::F32, vec![16], le_f32(&q.ty.quant_map())),
            ];
            match &q.absmax {
                Absmax::Plain(a) => out.push((format!("{prefix}.weight.absmax"), St::F32, vec![a.len()], le_f32(a))),
                Absmax::Nested { codes, nested_absmax, nested_map, nested_blocksize, offset } => {
                    let off = serde_json::Value::from(*offset as f64).to_string();
                    let off = if off.contains(['.', 'e', 'E']) { off } else { format!("{off}.0") };
                    state.push_str(&format!(
                        r#", "nested_blocksize": {nested_blocksize}, "nested_dtype": "float32", "nested_offset": {off}"#
                    ));
                    out.push((format!("{prefix}.weight.absmax"), St::U8, vec![codes.len()], codes.clone()));
                    out.push((
                        format!("{prefix}.weight.nested_absmax"),
                        St::F32,
                        vec![nested_absmax.len()],
                        le_f32(nested_absmax),
                    ));
                    out.push((
                        format!("{prefix}.weight.nested_quant_map"),
                        St::F32,
                        vec![nested_map.len()],
                        le_f32(nested_map),
                    ));
                }
            }
            state.push('}');
            let json = state.into_bytes();
            out.push((
                format!("{prefix}.weight.quant_state.bitsandbytes__{}", q.ty.name()),
                St::U8,
                vec![json.len()],
                json,
            ));
            out
        }
    }
}
