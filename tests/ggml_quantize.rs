//! GGML quantizers (`quant::ggml_quantize`) against the references (fixture from
//! scripts/reference/gguf_quantize.py): gguf-py's `quants.quantize` byte for byte for F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; ggml's C `quantize_row_q{4,5,6}_K_ref` byte for byte for the
//! K-quants, whose round trip also stays within error bounds.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use ferrovlm::quant::ggml::{dequantize_row, GgmlError, GgmlType, GgmlWeight, QK_K};
use ferrovlm::quant::ggml_quantize::{quantize, quantize_row};

fn fixture() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quant/quant.npz");
    Tensor::read_npz(&path).unwrap().into_iter().collect()
}

fn first_difference(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first different byte {i}: {:#04x} vs {:#04x}", got[i], want[i]);
    }
}

fn inputs(fx: &HashMap<String, Tensor>) -> Vec<(&'static str, Vec<f32>, usize)> {
    ["512", "576"]
        .into_iter()
        .map(|tag| {
            let t = &fx[&format!("x{tag}")];
            let cols = t.dims2().unwrap().1;
            (tag, t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), cols)
        })
        .collect()
}

#[test]
fn quantizers_equal_gguf_py_byte_for_byte() {
    let fx = fixture();
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        for (tag, x, cols) in inputs(&fx) {
            let got = quantize(ty, &x, cols).unwrap();
            let want: Vec<u8> = match fx.get(&format!("q_{}_{tag}", ty.name())) {
                Some(t) => t.to_vec1().unwrap(),
                None => x.iter().flat_map(|v| v.to_le_bytes()).collect(), // F32: the input itself
            };
            first_difference(&got, &want, &format!("{} {tag}", ty.name()));
            // row by row gives the same bytes
            let rb = ty.row_bytes(cols).unwrap();
            let mut row = vec![0u8; rb];
            quantize_row(ty, &x[cols..2 * cols], &mut row).unwrap();
            assert_eq!(row, got[rb..2 * rb]);
        }
    }
}

#[test]
fn float_types_round_nan_infinities_and_ties_as_gguf_py() {
    let fx = fixture();
    let sp: Vec<f32> = fx["special"].to_vec1().unwrap();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Bf16] {
        let got = quantize(ty, &sp, sp.len()).unwrap();
        let want: Vec<u8> = fx[&format!("q_{}_special", ty.name())].to_vec1().unwrap();
        first_difference(&got, &want, &format!("{} special values", ty.name()));
    }
}

#[test]
fn k_quants_equal_ggml_c_reference_byte_for_byte() {
    let fx = fixture();
    let x: Vec<f32> = fx["x512"].flatten_all().unwrap().to_vec1().unwrap();
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        let got = quantize(ty, &x, 512).unwrap();
        let want: Vec<u8> = fx[&format!("ggml_{}_512", ty.name())].to_vec1().unwrap();
        first_difference(&got, &want, ty.name());
    }
}

/// Deterministic weight-like values: uniform in [-0.1, 0.1] with a few larger ones.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let v = (s as f32 / u32::MAX as f32 - 0.5) * 0.2;
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn round_trip_error_stays_within_each_types_bound() {
    // per 32 or 16 values: the error of a level is at most half a step plus the scales' 6-bit / f16
    // rounding; bounds relative to the block's range, with slack for the scale search.
    for (ty, rel) in [
        (GgmlType::Q8_0, 0.5 / 127.0 + 1e-3),
        (GgmlType::Q4_0, 1.0 / 16.0 + 1e-3),
        (GgmlType::Q4_1, 0.5 / 15.0 + 2e-3),
        (GgmlType::Q5_0, 1.0 / 32.0 + 1e-3),
        (GgmlType::Q5_1, 0.5 / 31.0 + 2e-3),
        (GgmlType::Q4K, 0.09),
        (GgmlType::Q5K, 0.045),
        (GgmlType::Q6K, 0.025),
    ] {
        let x = values(4 * QK_K, ty as u32);
        let q = quantize(ty, &x, x.len()).unwrap();
        let mut back = vec![0f32; x.len()];
        dequantize_row(ty, &q, &mut back);
        let sub = if ty == GgmlType::Q6K { 16 } else { 32 };
        let mut sq = (0f64, 0f64);
        for (xs, bs) in x.chunks(sub).zip(back.chunks(sub)) {
            let range = xs.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
            for (a, b) in xs.iter().zip(bs) {
                assert!((a - b).abs() <= rel * range + 1e-6, "{}: {a} -> {b} (range {range})", ty.name());
                sq.0 += ((a - b) as f64).powi(2);
                sq.1 += (*a as f64).powi(2);
            }
        }
        let rmse = (sq.0 / sq.1).sqrt();
        println!("{}: relative RMS error {rmse:.4}", ty.name());
        // measured 0.0090, 0.126, 0.092, 0.064, 0.043, 0.086, 0.039, 0.026: a K-quant is more accurate
        // than the 32-value type of as many bits
        let cap = match ty {
            GgmlType::Q8_0 => 0.012,
            GgmlType::Q4_0 => 0.14,
            GgmlType::Q4_1 => 0.1,
            GgmlType::Q5_0 => 0.07,
            GgmlType::Q5_1 => 0.05,
            GgmlType::Q4K => 0.09,
            GgmlType::Q5K => 0.042,
            _ => 0.03,
        };
        assert!(rmse < cap, "{}: relative RMS error {rmse}", ty.name());
    }
}

#[test]
fn bad_lengths_are_typed_errors() {
    let x = vec![0.5f32; 576];
    assert_eq!(quantize(GgmlType::Q4K, &x, 576), Err(GgmlError::RowLength { ty: GgmlType::Q4K, n: 576 }));
    let mut small = vec![0u8; 10];
    assert!(matches!(quantize_row(GgmlType::Q8_0, &x, &mut small), Err(GgmlError::DataSize { .. })));
    assert_eq!(GgmlType::Q4K.fallback_for_row(576), GgmlType::Q5_0);
    assert_eq!(GgmlType::Q6K.fallback_for_row(576), GgmlType::Q8_0);
    assert_eq!(GgmlType::Q5K.fallback_for_row(576), GgmlType::Q5_1);
    assert_eq!(GgmlType::Q4K.fallback_for_row(512), GgmlType::Q4K);
    assert_eq!(GgmlType::Q4K.fallback_for_row(100), GgmlType::F16);
    assert!(GgmlWeight::from_vec(GgmlType::Q8_0, (2, 64), vec![0; 4 * 34 - 1]).is_err());
    assert!(GgmlWeight::from_vec(GgmlType::Q8_0, (2, 64), vec![0; 4 * 34]).is_ok());
    assert!(GgmlWeight::quantize(GgmlType::Q8_0, &x, (2, 64)).is_err());
}
