//! A GGUF-quantized Linear weight (`QuantWeight::Ggml`) through `ops::matmul_quant`: the tracked op
//! `quant_linear` gives x W^T and, backward, dx = g W with W the reference dequantization
//! (`ggml::dequantize_row`), checked against autograd through the dequantized weight and against
//! finite differences, for every GGML type, on odd shapes and row counts (decoding and prefill).

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use ferrovlm::ops::matmul_quant::{self, quant_linear};
use ferrovlm::quant::ggml::{GgmlType, GgmlWeight};
use ferrovlm::quant::QuantWeight;

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(99);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

fn f32v(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Max |a - b| over the scale of the products (sum_k |x| |w| of each output, or of each dx value):
/// what reordering an f32 sum can change.
fn assert_close(a: &[f32], b: &[f32], scale: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, ((x, y), s)) in a.iter().zip(b).zip(scale).enumerate() {
        assert!((x - y).abs() <= tol * s.max(1e-30), "{what}: [{i}] {x} vs {y} (scale {s})");
    }
}

fn weight(ty: GgmlType, o: usize, k: usize, seed: u32) -> Arc<QuantWeight> {
    let w = values(o * k, seed, 0.2);
    Arc::new(QuantWeight::Ggml(GgmlWeight::quantize(ty, &w, (o, k)).unwrap()))
}

/// |x| |W|^T: [n, o]
fn abs_products(x: &[f32], n: usize, w: &[f32], o: usize, k: usize) -> Vec<f32> {
    let mut fy = vec![0f32; n * o];
    for r in 0..n {
        for j in 0..o {
            fy[r * o + j] = (0..k).map(|c| (x[r * k + c] * w[j * k + c]).abs()).sum();
        }
    }
    fy
}

#[test]
fn tracked_op_forward_and_input_gradient_equal_the_dequantized_weight() {
    for ty in GgmlType::ALL {
        let shapes: &[(usize, usize)] =
            if ty.block_size() == 256 { &[(37, 512), (5, 256)] } else { &[(37, 96), (130, 64)] };
        for &(o, k) in shapes {
            let q = weight(ty, o, k, ty as u32 + 1);
            let wd = q.dequantize(); // [o, k]
            for n in [1, 2, 7, 33] {
                let xs = values(n * k, 7 + n as u32, 4.0);
                let x = Var::from_vec(xs.clone(), (n, k), &Device::Cpu).unwrap();
                let bias = Tensor::from_vec(values(o, 3, 1.0), o, &Device::Cpu).unwrap();
                let y = quant_linear(x.as_tensor(), &q, Some(&bias), false).unwrap();
                let r = matmul_quant::reference(x.as_tensor(), &q, Some(&bias), false).unwrap();
                let fy = abs_products(&xs, n, &wd, o, k);
                let fy: Vec<f32> = fy.iter().map(|v| v + 1.0).collect(); // + |bias|
                let what = format!("{} [{o}x{k}] n={n}", q.kind());
                assert_close(&f32v(&y), &f32v(&r), &fy, 1e-5, &format!("forward {what}"));
                // dx = g W (autograd through the op) against autograd through the dequantized weight
                let g = Tensor::from_vec(values(n * o, 5, 2.0), (n, o), &Device::Cpu).unwrap();
                let dy = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dr = (r * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let (a, b) = (f32v(dy.get(x.as_tensor()).unwrap()), f32v(dr.get(x.as_tensor()).unwrap()));
                let gv = f32v(&g);
                let mut fdx = vec![0f32; n * k];
                for rr in 0..n {
                    for c in 0..k {
                        fdx[rr * k + c] = (0..o).map(|j| (gv[rr * o + j] * wd[j * k + c]).abs()).sum();
                    }
                }
                assert_close(&a, &b, &fdx, 1e-5, &format!("dx {what}"));
            }
        }
    }
}

#[test]
fn input_gradient_equals_finite_differences() {
    let (o, k, n) = (11, 256, 3);
    for ty in [GgmlType::Q4_1, GgmlType::Q6K] {
        let q = weight(ty, o, k, 1);
        let xs: Vec<f64> = values(n * k, 2, 1.0).iter().map(|&v| v as f64).collect();
        let g: Vec<f32> = values(n * o, 4, 1.0);
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
        for i in [0, 5, 255, 300, 767] {
            let (mut p, mut m) = (xs.clone(), xs.clone());
            p[i] += 1e-2;
            m[i] -= 1e-2;
            let fd = (loss(&p) - loss(&m)) / 2e-2;
            assert!((fd - dx[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()), "{ty:?} x[{i}]: {fd} vs {}", dx[i]);
        }
    }
}

#[test]
fn ggml_weight_reports_its_kind_and_bytes_and_stays_dense_after_a_merge() {
    let q = weight(GgmlType::Q4_1, 4, 64, 9);
    assert_eq!(q.kind(), "gguf Q4_1");
    assert_eq!(q.nbytes(), 4 * 2 * 20);
    assert_eq!(q.shape(), (4, 64));
    assert!(q.requantize(&vec![0.0; 4 * 64]).is_none(), "a merged GGUF layer is dense, as in transformers");
    // as a Linear layer: [.., in] -> [.., out], the same as the op
    let lin = ferrovlm::ops::Linear::quantized(q.clone(), None, false);
    let x = Tensor::from_vec(values(2 * 3 * 64, 1, 1.0), (2, 3, 64), &Device::Cpu).unwrap();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 4]);
    let want = quant_linear(&x.reshape((6, 64)).unwrap(), &q, None, false).unwrap();
    assert_eq!(f32v(&y), f32v(&want));
}
