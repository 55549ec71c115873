//! bitsandbytes quantization (`crate::quant`) and the quantized matmul (`ops::matmul_quant`):
//! bit-for-bit against bitsandbytes 0.50 on CPU (tests/fixtures/bnb/quant.npz, written by
//! scripts/reference/bnb_quant.py), and the kernels against their reference composition.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use ferrovlm::ops::matmul_quant::{self, quant_linear};
use ferrovlm::quant::four_bit::{self, FourBitType};
use ferrovlm::quant::{Absmax, FourBit, Int8, QuantWeight};

fn fixtures() -> HashMap<String, Tensor> {
    Tensor::read_npz("tests/fixtures/bnb/quant.npz").expect("quant.npz").into_iter().collect()
}

fn f32v(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn u8v(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

const CASES: [&str; 3] = ["a", "b", "c"];

/// Asserts equal f32 bit patterns, naming the first difference. bitsandbytes' CPU paths disagree on the
/// sign of FP4's zero code 8 (-0 in its scalar kernel, +0 in its vectorised one and its Python
/// fallback): for FP4 the sign of a zero may differ, nothing else.
fn same_bits(got: &[f32], want: &[f32], what: &str) {
    same_bits_opt(got, want, what, what.contains("fp4"))
}

fn same_bits_opt(got: &[f32], want: &[f32], what: &str, signed_zero_free: bool) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits() && !(signed_zero_free && *a == 0.0 && *b == 0.0))
    {
        panic!(
            "{what}: first difference at [{i}]: {} ({:#x}) vs {} ({:#x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

#[test]
fn four_bit_codes_absmax_and_dequantized_values_equal_bitsandbytes() {
    let fx = fixtures();
    for case in CASES {
        let w = &fx[&format!("{case}/w")];
        let (o, k) = w.dims2().unwrap();
        let wv = f32v(w);
        for (ty, tn) in [(FourBitType::Nf4, "nf4"), (FourBitType::Fp4, "fp4")] {
            // Without double quantization: everything bit for bit.
            let tag = format!("{case}/{tn}");
            let q = FourBit::quantize(&wv, (o, k), ty, false, "float32");
            assert_eq!(q.packed, u8v(&fx[&format!("{tag}/packed")]), "{tag}: packed codes");
            let Absmax::Plain(a) = &q.absmax else { panic!() };
            same_bits(a, &f32v(&fx[&format!("{tag}/absmax")]), &format!("{tag}: absmax"));
            let d = QuantWeight::FourBit(q).dequantize();
            same_bits(&d, &f32v(&fx[&format!("{tag}/dequant")]), &format!("{tag}: dequantized"));

            // Double quantization: the 4-bit codes, the offset and the nested absmax bit for bit.
            // bitsandbytes' native CPU kernel rounds a few absmax codes lying within a few % of a midpoint
            // of the dynamic map to the larger neighbour (not reproducible: it is not the nearest
            // code); those may differ by one step, nothing else.
            let tag = format!("{case}/{tn}_dq");
            let q = FourBit::quantize(&wv, (o, k), ty, true, "float32");
            assert_eq!(q.packed, u8v(&fx[&format!("{tag}/packed")]), "{tag}: packed codes");
            let Absmax::Nested { codes, nested_absmax, nested_map, offset, .. } = &q.absmax else { panic!() };
            assert_eq!(
                offset.to_bits(),
                f32v(&fx[&format!("{tag}/offset")])[0].to_bits(),
                "{tag}: offset (torch's f32 mean)"
            );
            assert_eq!(nested_absmax, &f32v(&fx[&format!("{tag}/nested_absmax")]), "{tag}: nested absmax");
            assert_eq!(nested_map, &f32v(&fx[&format!("{tag}/nested_map")]), "{tag}: dynamic map");
            let want = u8v(&fx[&format!("{tag}/absmax")]);
            let plain = f32v(&fx[&format!("{case}/{tn}/absmax")]);
            for (i, (&a, &b)) in codes.iter().zip(&want).enumerate() {
                if a != b {
                    let (lo, hi) = (nested_map[a.min(b) as usize], nested_map[a.max(b) as usize]);
                    let v = (plain[i] - offset) / nested_absmax[i / 256];
                    let pos = (v - lo) / (hi - lo);
                    assert!(
                        (a as i32 - b as i32).abs() == 1 && (pos - 0.5).abs() < 0.05,
                        "{tag}: absmax code [{i}] {a} vs {b} (v at {pos} of its interval)"
                    );
                }
            }
            // Dequantizing bitsandbytes' own state gives its values bit for bit.
            let theirs = FourBit::from_parts(
                ty,
                (o, k),
                u8v(&fx[&format!("{tag}/packed")]),
                Absmax::Nested {
                    codes: want,
                    nested_absmax: nested_absmax.clone(),
                    nested_map: nested_map.clone(),
                    nested_blocksize: 256,
                    offset: *offset,
                },
                64,
                "float32".into(),
            );
            let d = QuantWeight::FourBit(theirs).dequantize();
            same_bits(&d, &f32v(&fx[&format!("{tag}/dequant")]), &format!("{tag}: dequantized"));
        }
    }
}

#[test]
fn int8_weights_equal_bitsandbytes() {
    let fx = fixtures();
    for case in CASES {
        let w = &fx[&format!("{case}/w")];
        let (o, k) = w.dims2().unwrap();
        let q = Int8::quantize(&f32v(w), (o, k), 6.0);
        let cb: Vec<i8> = fx[&format!("{case}/int8/cb")]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .map(|v| v.into_iter().map(|x| x as i8).collect())
            .unwrap_or_else(|_| u8v(&fx[&format!("{case}/int8/cb")]).into_iter().map(|x| x as i8).collect());
        assert_eq!(q.cb, cb, "{case}: CB");
        assert_eq!(q.scb, f32v(&fx[&format!("{case}/int8/scb")]), "{case}: SCB");
    }
}

fn close(got: &[f32], want: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= atol + rtol * b.abs(), "{what}: [{i}] {a} vs {b}");
    }
}

#[test]
fn linear_outputs_equal_bitsandbytes_linear_layers() {
    let fx = fixtures();
    for case in CASES {
        let w = &fx[&format!("{case}/w")];
        let (o, k) = w.dims2().unwrap();
        let wv = f32v(w);
        let bias = Tensor::from_vec(
            (0..o).map(|i| if o == 1 { -0.5 } else { -0.5 + i as f32 / (o - 1) as f32 }).collect::<Vec<f32>>(),
            o,
            &Device::Cpu,
        )
        .unwrap();
        let bias = Tensor::new(
            f32v(&Tensor::arange(0f32, o as f32, &Device::Cpu).unwrap())
                .iter()
                .map(|_| 0f32)
                .collect::<Vec<_>>()
                .as_slice(),
            &Device::Cpu,
        )
        .unwrap()
        .add(&bias)
        .unwrap();
        for (ty, tn) in [(FourBitType::Nf4, "nf4"), (FourBitType::Fp4, "fp4")] {
            for dq in [false, true] {
                let tag = format!("{case}/{tn}{}", if dq { "_dq" } else { "" });
                let q = Arc::new(QuantWeight::FourBit(FourBit::quantize(&wv, (o, k), ty, dq, "float32")));
                for (cd, bf16) in [("float32", false), ("bfloat16", true)] {
                    let x = &fx[&format!("{tag}/{cd}/x")];
                    let lin = ferrovlm::ops::Linear::quantized(q.clone(), Some(bias.clone()), bf16);
                    let y = f32v(&lin.forward(x).unwrap());
                    let want = f32v(&fx[&format!("{tag}/{cd}/y")]);
                    // f32: summation order only; bf16: one bf16 rounding of the output (2^-8).
                    let (rtol, atol) = if bf16 { (8e-3, 1e-2) } else { (1e-5, 1e-5) };
                    if !dq {
                        close(&y, &want, rtol, atol, &format!("{tag} {cd}"));
                    }
                }
            }
        }
        // LLM.int8: inference (outlier columns apart) and training (dequantize + matmul).
        let q = Int8::quantize(&wv, (o, k), 6.0);
        let training = q.training.clone();
        let lin = ferrovlm::ops::Linear::quantized(Arc::new(QuantWeight::Int8(q)), Some(bias.clone()), false);
        let x = &fx[&format!("{case}/int8/x")];
        close(
            &f32v(&lin.forward(x).unwrap()),
            &f32v(&fx[&format!("{case}/int8/y_eval")]),
            1e-5,
            1e-5,
            &format!("{case} int8 eval"),
        );
        training.store(true, std::sync::atomic::Ordering::SeqCst);
        close(
            &f32v(&lin.forward(x).unwrap()),
            &f32v(&fx[&format!("{case}/int8/y_train")]),
            1e-5,
            1e-5,
            &format!("{case} int8 train"),
        );
    }
}

/// A 4-bit / int8 weight of [out, k] from a deterministic pseudo-random matrix.
fn weights(o: usize, k: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..o * k)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 0.4
        })
        .collect()
}

#[test]
fn kernels_equal_the_dequantize_then_matmul_reference_with_backward() {
    for (o, k) in [(37, 100), (130, 64), (9, 33)] {
        let wv = weights(o, k, 3);
        let kinds = [
            QuantWeight::FourBit(FourBit::quantize(&wv, (o, k), FourBitType::Nf4, true, "float32")),
            QuantWeight::FourBit(FourBit::quantize(&wv, (o, k), FourBitType::Fp4, false, "float32")),
            QuantWeight::Int8(Int8::quantize(&wv, (o, k), 0.0)),
        ];
        for q in kinds {
            let q = Arc::new(q);
            for n in [1, 3, matmul_quant::FEW_ROWS + 1, 70, 300] {
                for bf16 in [false, true] {
                    let xs = weights(n, k, 9 + n as u32).iter().map(|v| v * 10.0).collect::<Vec<_>>();
                    let x = Var::from_vec(xs, (n, k), &Device::Cpu).unwrap();
                    let bias = Tensor::from_vec((0..o).map(|i| i as f32 * 0.01).collect::<Vec<f32>>(), o, &Device::Cpu)
                        .unwrap();
                    // forward
                    let y = quant_linear(x.as_tensor(), &q, Some(&bias), bf16).unwrap();
                    let r = matmul_quant::reference(x.as_tensor(), &q, Some(&bias), bf16).unwrap();
                    // bf16 outputs are rounded to bf16 after f32 sums whose order differs from the
                    // reference's (AVX512-BF16 or AMX kernels): one bf16 step (2^-7 relative) apart at most.
                    let rtol = if bf16 { 1.0 / 128.0 } else { 1e-5 };
                    close(&f32v(&y), &f32v(&r), rtol, 1e-4, &format!("forward {} n={n} bf16={bf16}", q.kind()));
                    // backward to x, against autograd through the reference
                    let g = Tensor::from_vec(weights(n, o, 5), (n, o), &Device::Cpu).unwrap();
                    let dy = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    let dr = (r * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    let (a, b) = (dy.get(x.as_tensor()).unwrap(), dr.get(x.as_tensor()).unwrap());
                    close(&f32v(a), &f32v(b), 1e-5, 1e-5, &format!("dx {} n={n} bf16={bf16}", q.kind()));
                }
            }
        }
    }
}

#[test]
fn backward_equals_finite_differences() {
    let (o, k, n) = (11, 70, 4);
    let q = Arc::new(QuantWeight::FourBit(FourBit::quantize(
        &weights(o, k, 1),
        (o, k),
        FourBitType::Nf4,
        false,
        "float32",
    )));
    let xs: Vec<f64> = weights(n, k, 2).iter().map(|&v| v as f64).collect();
    let g: Vec<f32> = weights(n, o, 4);
    let loss = |x: &[f64]| -> f64 {
        let t = Tensor::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), (n, k), &Device::Cpu).unwrap();
        let y = f32v(&quant_linear(&t, &q, None, false).unwrap());
        y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let x = Var::from_vec(xs.iter().map(|&v| v as f32).collect::<Vec<_>>(), (n, k), &Device::Cpu).unwrap();
    let y = quant_linear(x.as_tensor(), &q, None, false).unwrap();
    let grads = (y * Tensor::from_vec(g.clone(), (n, o), &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = f32v(grads.get(x.as_tensor()).unwrap());
    for i in [0, 5, 69, 140, 279] {
        let (mut p, mut m) = (xs.clone(), xs.clone());
        p[i] += 1e-2;
        m[i] -= 1e-2;
        let fd = (loss(&p) - loss(&m)) / 2e-2;
        assert!(
            (fd - dx[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
            "x[{i}]: finite difference {fd} vs backward {}",
            dx[i]
        );
    }
}

#[test]
fn decode_range_handles_any_start_and_length() {
    let (o, k) = (5, 37); // blocks and bytes cross rows
    let q = FourBit::quantize(&weights(o, k, 8), (o, k), FourBitType::Nf4, false, "float32");
    let whole = QuantWeight::FourBit(q.clone()).dequantize();
    for r0 in 0..o {
        for rows in 1..=(o - r0) {
            let mut dst = vec![0f32; rows * k];
            q.decode_rows(r0, rows, &mut dst);
            assert_eq!(dst, whole[r0 * k..(r0 + rows) * k], "rows {r0}..{}", r0 + rows);
        }
    }
    let mut one = vec![0f32; 3];
    four_bit::decode_range(&q.packed, &q.scales, FourBitType::Nf4.table(), 64, 63, &mut one);
    assert_eq!(one, whole[63..66]);
}

#[test]
fn double_quant_offset_is_torchs_f32_mean() {
    // tests/fixtures/bnb/torch_mean.npz: x<n> and torch's x.mean() (torch 2.15, CPU) for many n
    let fx: HashMap<String, Tensor> =
        Tensor::read_npz("tests/fixtures/bnb/torch_mean.npz").unwrap().into_iter().collect();
    let mut n_checked = 0;
    for (k, x) in &fx {
        if let Some(n) = k.strip_prefix('x') {
            let want = f32v(&fx[&format!("m{n}")])[0];
            let got = ferrovlm::quant::dynamic::mean_f32(&f32v(x));
            assert_eq!(got.to_bits(), want.to_bits(), "n = {n}: {got} vs torch {want}");
            n_checked += 1;
        }
    }
    assert!(n_checked >= 20);
}
