//! GGML block decoding (`quant::ggml::dequantize_row`) against gguf-py's dequantization of random
//! blocks of every supported type (fixture from scripts/reference/gguf_blocks.py): bit for bit.

use std::path::Path;

use candle_core::Tensor;
use ferrovlm::quant::ggml::{dequantize_row, GgmlType};

#[test]
fn every_type_decodes_like_gguf_py_bit_for_bit() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_blocks/blocks.npz");
    let npz: std::collections::HashMap<String, Tensor> = Tensor::read_npz(&path).unwrap().into_iter().collect();
    for ty in GgmlType::ALL {
        let raw: Vec<u8> = npz[&format!("raw_{}", ty.name())].to_vec1().unwrap();
        let want: Vec<f32> = npz[&format!("deq_{}", ty.name())].to_vec1().unwrap();
        let mut got = vec![f32::NAN; want.len()];
        dequantize_row(ty, &raw, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{} value {i}: {g} vs {w}", ty.name());
        }
    }
}
