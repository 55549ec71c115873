//! Fused ops with hand-written backward against their candle reference compositions:
//! (a) forward equal, (b) autograd gradients equal, (c) gradients equal central finite differences,
//! (d) frozen (non-Var) weights get no gradient entry while Var weights get the right one.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use ferrovlm::ops::activation::{gelu_tanh, gelu_tanh_reference, swiglu, swiglu_reference};
use ferrovlm::ops::cross_entropy::{cross_entropy_rows, cross_entropy_rows_reference, entropy_reference, token_stats};
use ferrovlm::ops::gradcheck::{finite_diff, max_rel_err, to_f64, weighted_sum};
use ferrovlm::ops::linear::{Linear, Weight};
use ferrovlm::ops::norm::{layer_norm, layer_norm_reference, rms_norm, rms_norm_reference};
use ferrovlm::ops::rope::{apply_rotary, apply_rotary_reference, Rope};

const CPU: Device = Device::Cpu;

/// Deterministic uniform values in [-scale, scale] (64-bit LCG).
fn rnd(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &CPU).unwrap()
}

fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

/// Backward of sum(y * wt).
fn backward(y: &Tensor, wt: &Tensor) -> GradStore {
    (y * wt).unwrap().sum_all().unwrap().backward().unwrap()
}

fn grad(g: &GradStore, t: &Tensor) -> Vec<f64> {
    to_f64(g.get(t).unwrap_or_else(|| panic!("no gradient for tensor {:?}", t.id()))).unwrap()
}

/// max |a - b| / max |b|: a scale-aware error for gradients.
fn norm_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// Elementwise relative error, with values below 1% of the largest one compared relative to that 1%
/// (sums that cancel to near zero carry the rounding of their terms, not of their value).
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let e = max_rel_err(got, want, 1e-2 * scale + 1e-12);
    assert!(e < tol, "{what}: max rel err {e} >= {tol}");
}

fn assert_grad_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = norm_err(got, want);
    assert!(e < tol, "{what}: gradient err {e} >= {tol}");
}

/// Finite differences of sum(f(x) * wt) with respect to x, compared with `ag` (autograd).
fn check_fd(what: &str, f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, wt: &Tensor, ag: &[f64]) {
    let fd = finite_diff(&|t| weighted_sum(&f(t)?, wt), x, 1e-2).unwrap();
    let e = norm_err(ag, &fd);
    assert!(e < 1e-2, "{what}: autograd vs finite differences err {e}");
}

// ------------------------------------------------------------------------------------------------
// RMSNorm

#[test]
fn rms_norm_forward_and_grads() {
    let (x, w) = (rnd(&[2, 3, 37], 1, 2.0), (rnd(&[37], 2, 0.5) + 1.0).unwrap());
    let wt = rnd(&[2, 3, 37], 3, 1.0);
    // (a) forward, and against an independent f64 computation
    let y = to_f64(&rms_norm(&x, &w, 1e-5).unwrap()).unwrap();
    assert_close("rms fwd", &y, &to_f64(&rms_norm_reference(&x, &w, 1e-5).unwrap()).unwrap(), 1e-5);
    let (xv, wv) = (to_f64(&x).unwrap(), to_f64(&w).unwrap());
    let mut want = vec![0f64; xv.len()];
    for (r, row) in xv.chunks(37).enumerate() {
        let rms = (row.iter().map(|v| v * v).sum::<f64>() / 37.0 + 1e-5).sqrt();
        for j in 0..37 {
            want[r * 37 + j] = row[j] / rms * wv[j];
        }
    }
    assert_close("rms fwd f64", &y, &want, 1e-5);
    // (b) grads of x and w (both Vars) against the reference composition
    let (xv, wv) = (var(&x), var(&w));
    let g = backward(&rms_norm(&xv, &wv, 1e-5).unwrap(), &wt);
    let gr = backward(&rms_norm_reference(&xv, &wv, 1e-5).unwrap(), &wt);
    assert_grad_close("rms dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
    assert_grad_close("rms dw", &grad(&g, &wv), &grad(&gr, &wv), 1e-5);
    // (c) finite differences
    check_fd("rms dx fd", &|t| rms_norm(t, &w, 1e-5), &x, &wt, &grad(&g, &xv));
    check_fd("rms dw fd", &|t| rms_norm(&x, t, 1e-5), &w, &wt, &grad(&g, &wv));
    // (d) frozen weight: no entry, same dx
    let g2 = backward(&rms_norm(&xv, &w, 1e-5).unwrap(), &wt);
    assert!(g2.get(&w).is_none(), "frozen rms weight got a gradient");
    assert_grad_close("rms dx frozen w", &grad(&g2, &xv), &grad(&gr, &xv), 1e-5);
    // only the weight tracked: no dx entry for a plain input
    let g3 = backward(&rms_norm(&x, &wv, 1e-5).unwrap(), &wt);
    assert!(g3.get(&x).is_none());
    assert_grad_close("rms dw only", &grad(&g3, &wv), &grad(&gr, &wv), 1e-5);
}

// ------------------------------------------------------------------------------------------------
// LayerNorm

#[test]
fn layer_norm_forward_and_grads() {
    let x = (rnd(&[3, 2, 29], 4, 2.0) + 0.7).unwrap();
    let (w, b) = ((rnd(&[29], 5, 0.5) + 1.0).unwrap(), rnd(&[29], 6, 0.5));
    let wt = rnd(&[3, 2, 29], 7, 1.0);
    let eps = 1e-6;
    let y = to_f64(&layer_norm(&x, &w, &b, eps).unwrap()).unwrap();
    assert_close("ln fwd", &y, &to_f64(&layer_norm_reference(&x, &w, &b, eps).unwrap()).unwrap(), 1e-5);
    let (xv, wv, bv) = (var(&x), var(&w), var(&b));
    let g = backward(&layer_norm(&xv, &wv, &bv, eps).unwrap(), &wt);
    let gr = backward(&layer_norm_reference(&xv, &wv, &bv, eps).unwrap(), &wt);
    assert_grad_close("ln dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
    assert_grad_close("ln dw", &grad(&g, &wv), &grad(&gr, &wv), 1e-5);
    assert_grad_close("ln db", &grad(&g, &bv), &grad(&gr, &bv), 1e-5);
    check_fd("ln dx fd", &|t| layer_norm(t, &w, &b, eps), &x, &wt, &grad(&g, &xv));
    check_fd("ln dw fd", &|t| layer_norm(&x, t, &b, eps), &w, &wt, &grad(&g, &wv));
    check_fd("ln db fd", &|t| layer_norm(&x, &w, t, eps), &b, &wt, &grad(&g, &bv));
    // frozen weight and bias
    let g2 = backward(&layer_norm(&xv, &w, &b, eps).unwrap(), &wt);
    assert!(g2.get(&w).is_none() && g2.get(&b).is_none(), "frozen ln params got a gradient");
    assert_grad_close("ln dx frozen", &grad(&g2, &xv), &grad(&gr, &xv), 1e-5);
    // only the bias tracked
    let g3 = backward(&layer_norm(&xv, &w, &bv, eps).unwrap(), &wt);
    assert!(g3.get(&w).is_none());
    assert_grad_close("ln db only", &grad(&g3, &bv), &grad(&gr, &bv), 1e-5);
}

// ------------------------------------------------------------------------------------------------
// RoPE

#[test]
fn rotary_forward_and_grads() {
    let (b, h, l, hd) = (2, 3, 5, 8);
    let rope = Rope::new(hd, 10000.0, &CPU).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4], [7, 8, 9, 20, 100]], &CPU).unwrap();
    let (cos, sin) = rope.cos_sin(&pos, DType::F32).unwrap();
    let x = rnd(&[b, h, l, hd], 8, 1.5);
    let wt = rnd(&[b, h, l, hd], 9, 1.0);
    let y = to_f64(&apply_rotary(&x, &cos, &sin).unwrap()).unwrap();
    assert_close("rope fwd", &y, &to_f64(&apply_rotary_reference(&x, &cos, &sin).unwrap()).unwrap(), 1e-5);
    // a rotation keeps the norm of each (i, i + hd/2) pair
    let xs = to_f64(&x).unwrap();
    for (yr, xr) in y.chunks(hd).zip(xs.chunks(hd)) {
        for i in 0..hd / 2 {
            let (ny, nx) = (yr[i].hypot(yr[i + hd / 2]), xr[i].hypot(xr[i + hd / 2]));
            assert!((ny - nx).abs() < 1e-5);
        }
    }
    let xv = var(&x);
    let g = backward(&apply_rotary(&xv, &cos, &sin).unwrap(), &wt);
    let gr = backward(&apply_rotary_reference(&xv, &cos, &sin).unwrap(), &wt);
    assert_grad_close("rope dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-6);
    check_fd("rope dx fd", &|t| apply_rotary(t, &cos, &sin), &x, &wt, &grad(&g, &xv));
    // a transposed (non-contiguous) input, cos/sin with batch 1 broadcast
    let (c1, s1) = (cos.narrow(0, 1, 1).unwrap(), sin.narrow(0, 1, 1).unwrap());
    let xt = x.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap(); // same values, strided
    let y1 = to_f64(&apply_rotary(&xt, &c1, &s1).unwrap()).unwrap();
    assert_close("rope fwd bcast", &y1, &to_f64(&apply_rotary_reference(&x, &c1, &s1).unwrap()).unwrap(), 1e-5);
    let g1 = backward(&apply_rotary(&xv, &c1, &s1).unwrap(), &wt);
    let gr1 = backward(&apply_rotary_reference(&xv, &c1, &s1).unwrap(), &wt);
    assert_grad_close("rope dx bcast", &grad(&g1, &xv), &grad(&gr1, &xv), 1e-6);
    // cos/sin are never differentiated even when they are Vars
    let (cv, sv) = (var(&cos), var(&sin));
    let g2 = backward(&apply_rotary(&xv, &cv, &sv).unwrap(), &wt);
    assert!(g2.get(&cv).is_none() && g2.get(&sv).is_none());
}

// ------------------------------------------------------------------------------------------------
// Activations

#[test]
fn gelu_tanh_grads() {
    let x = rnd(&[4, 33], 10, 4.0);
    let wt = rnd(&[4, 33], 11, 1.0);
    assert_close(
        "gelu fwd",
        &to_f64(&gelu_tanh(&x).unwrap()).unwrap(),
        &to_f64(&gelu_tanh_reference(&x).unwrap()).unwrap(),
        1e-5,
    );
    let xv = var(&x);
    let g = backward(&gelu_tanh(&xv).unwrap(), &wt);
    let gr = backward(&gelu_tanh_reference(&xv).unwrap(), &wt);
    assert_grad_close("gelu dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
    check_fd("gelu dx fd", &|t| gelu_tanh(t), &x, &wt, &grad(&g, &xv));
    // against the derivative of the formula in f64
    let (xs, ws, gs) = (to_f64(&x).unwrap(), to_f64(&wt).unwrap(), grad(&g, &xv));
    let a = (2.0 / std::f64::consts::PI).sqrt();
    for ((x, w), g) in xs.iter().zip(&ws).zip(&gs) {
        let f = |x: f64| 0.5 * x * (1.0 + (a * (x + 0.044715 * x * x * x)).tanh());
        let d = (f(x + 1e-6) - f(x - 1e-6)) / 2e-6;
        assert!((g - w * d).abs() < 1e-5, "gelu' at {x}: {g} vs {}", w * d);
    }
}

#[test]
fn swiglu_forward_and_grads() {
    let gate = rnd(&[2, 3, 21], 12, 5.0);
    let up = rnd(&[2, 3, 21], 13, 2.0);
    let wt = rnd(&[2, 3, 21], 14, 1.0);
    assert_close(
        "swiglu fwd",
        &to_f64(&swiglu(&gate, &up).unwrap()).unwrap(),
        &to_f64(&swiglu_reference(&gate, &up).unwrap()).unwrap(),
        1e-5,
    );
    let (gv, uv) = (var(&gate), var(&up));
    let g = backward(&swiglu(&gv, &uv).unwrap(), &wt);
    let gr = backward(&swiglu_reference(&gv, &uv).unwrap(), &wt);
    assert_grad_close("swiglu dgate", &grad(&g, &gv), &grad(&gr, &gv), 1e-5);
    assert_grad_close("swiglu dup", &grad(&g, &uv), &grad(&gr, &uv), 1e-5);
    check_fd("swiglu dgate fd", &|t| swiglu(t, &up), &gate, &wt, &grad(&g, &gv));
    check_fd("swiglu dup fd", &|t| swiglu(&gate, t), &up, &wt, &grad(&g, &uv));
    let g2 = backward(&swiglu(&gv, &up).unwrap(), &wt);
    assert!(g2.get(&up).is_none());
    assert_grad_close("swiglu dgate only", &grad(&g2, &gv), &grad(&gr, &gv), 1e-5);
    // extreme gates stay finite
    let big = Tensor::new(&[-200f32, -90.0, 0.0, 90.0, 200.0], &CPU).unwrap();
    let one = Tensor::ones(5, DType::F32, &CPU).unwrap();
    let bv = var(&big);
    let g3 = backward(&swiglu(&bv, &one).unwrap(), &one);
    assert!(grad(&g3, &bv).iter().all(|v| v.is_finite()));
}

// ------------------------------------------------------------------------------------------------
// Linear

fn bf16_round(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn linear_frozen_dense_weight_leading_dims() {
    let (bsz, l, i, o) = (2, 3, 40, 24);
    let (x, w, b) = (rnd(&[bsz, l, i], 20, 1.0), rnd(&[o, i], 21, 0.3), rnd(&[o], 22, 0.5));
    let wt = rnd(&[bsz, l, o], 23, 1.0);
    let lin = Linear::new(w.clone(), Some(b.clone())).unwrap();
    // untracked forward (inference path) and tracked forward agree with the reference
    let want = to_f64(&lin.forward_reference(&x).unwrap()).unwrap();
    let y0 = lin.forward(&x).unwrap();
    assert!(!y0.track_op());
    assert_close("linear fwd untracked", &to_f64(&y0).unwrap(), &want, 1e-5);
    let xv = var(&x);
    let y = lin.forward(&xv).unwrap();
    assert_eq!(y.dims(), &[bsz, l, o]);
    assert_close("linear fwd tracked", &to_f64(&y).unwrap(), &want, 1e-5);
    // against an independent f64 product
    let (xs, ws, bs) = (to_f64(&x).unwrap(), to_f64(&w).unwrap(), to_f64(&b).unwrap());
    let mut yd = vec![0f64; bsz * l * o];
    for n in 0..bsz * l {
        for j in 0..o {
            yd[n * o + j] = bs[j] + (0..i).map(|k| xs[n * i + k] * ws[j * i + k]).sum::<f64>();
        }
    }
    assert_close("linear fwd f64", &to_f64(&y).unwrap(), &yd, 1e-5);
    let g = backward(&y, &wt);
    assert!(g.get(&w).is_none() && g.get(&b).is_none(), "frozen linear weight/bias got a gradient");
    let gr = backward(&lin.forward_reference(&xv).unwrap(), &wt);
    assert_grad_close("linear dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
    check_fd("linear dx fd", &|t| lin.forward(&var(t)), &x, &wt, &grad(&g, &xv));
}

#[test]
fn linear_trainable_weight_and_bias() {
    let (n, i, o) = (7, 19, 11);
    let (x, w, b) = (rnd(&[n, i], 24, 1.0), rnd(&[o, i], 25, 0.3), rnd(&[o], 26, 0.5));
    let wt = rnd(&[n, o], 27, 1.0);
    let (xv, wv, bv) = (var(&x), var(&w), var(&b));
    let lin = Linear::new(wv.as_tensor().clone(), Some(bv.as_tensor().clone())).unwrap();
    let g = backward(&lin.forward(&xv).unwrap(), &wt);
    let gr = backward(&lin.forward_reference(&xv).unwrap(), &wt);
    assert_grad_close("linear dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
    assert_grad_close("linear dw", &grad(&g, &wv), &grad(&gr, &wv), 1e-5);
    assert_grad_close("linear db", &grad(&g, &bv), &grad(&gr, &bv), 1e-5);
    // dW and db against explicit sums: dW = wt^T x, db = sum rows of wt
    let (xs, ws) = (to_f64(&x).unwrap(), to_f64(&wt).unwrap());
    let dw: Vec<f64> = (0..o * i).map(|e| (0..n).map(|r| ws[r * o + e / i] * xs[r * i + e % i]).sum()).collect();
    let db: Vec<f64> = (0..o).map(|j| (0..n).map(|r| ws[r * o + j]).sum()).collect();
    assert_grad_close("linear dw f64", &grad(&g, &wv), &dw, 1e-5);
    assert_grad_close("linear db f64", &grad(&g, &bv), &db, 1e-5);
    // weight trainable, input a plain tensor (no dx entry), no bias
    let lin2 = Linear::new(wv.as_tensor().clone(), None).unwrap();
    let g2 = backward(&lin2.forward(&x).unwrap(), &wt);
    assert!(g2.get(&x).is_none());
    assert_grad_close("linear dw no x", &grad(&g2, &wv), &dw, 1e-5);
    check_fd(
        "linear dw fd",
        &|t| Linear::new(var(t).as_tensor().clone(), Some(b.clone()))?.forward(&x),
        &w,
        &wt,
        &grad(&g, &wv),
    );
    // only the bias trainable
    let lin3 = Linear::new(w.clone(), Some(bv.as_tensor().clone())).unwrap();
    let g3 = backward(&lin3.forward(&x).unwrap(), &wt);
    assert!(g3.get(&w).is_none() && g3.get(&x).is_none());
    assert_grad_close("linear db only", &grad(&g3, &bv), &db, 1e-5);
}

#[test]
fn linear_bf16_weight() {
    // few rows (skinny kernel) and many rows (widened gemm), with and without bias
    for (bsz, l) in [(1, 3), (2, 13)] {
        let (i, o) = (48, 40);
        let x = rnd(&[bsz, l, i], 30, 1.0);
        let w32 = bf16_round(&rnd(&[o, i], 31, 0.3));
        let b = rnd(&[o], 32, 0.5);
        let wt = rnd(&[bsz, l, o], 33, 1.0);
        let lin = Linear::with_compute_dtype(w32.to_dtype(DType::BF16).unwrap(), Some(b.clone()), DType::F32).unwrap();
        assert!(matches!(lin.weight, Weight::Bf16(_)));
        let dense = Linear::new(w32.clone(), Some(b.clone())).unwrap();
        let xv = var(&x);
        let y = lin.forward(&xv).unwrap();
        assert_eq!(y.dims(), &[bsz, l, o]);
        let want = to_f64(&dense.forward_reference(&x).unwrap()).unwrap();
        assert_close("bf16 fwd tracked", &to_f64(&y).unwrap(), &want, 1e-5);
        assert_close("bf16 fwd untracked", &to_f64(&lin.forward(&x).unwrap()).unwrap(), &want, 1e-5);
        let g = backward(&y, &wt);
        assert!(g.get(lin.weight_tensor().expect("dense")).is_none() && g.get(&b).is_none());
        let gr = backward(&dense.forward_reference(&xv).unwrap(), &wt);
        assert_grad_close("bf16 dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
        check_fd("bf16 dx fd", &|t| lin.forward(&var(t)), &x, &wt, &grad(&g, &xv));
        let nob = Linear::with_compute_dtype(w32.to_dtype(DType::BF16).unwrap(), None, DType::F32).unwrap();
        let g2 = backward(&nob.forward(&xv).unwrap(), &wt);
        let gr2 = backward(&Linear::new(w32.clone(), None).unwrap().forward_reference(&xv).unwrap(), &wt);
        assert_grad_close("bf16 dx no bias", &grad(&g2, &xv), &grad(&gr2, &xv), 1e-5);
    }
}

#[test]
fn lora_training_op_forward_and_grads() {
    // A training pass runs LoRA as one op (ops/linear_lora.rs); its reference is the composition.
    use ferrovlm::lora::{Adapter, AdapterSwitch, LoraInit, LoraSpec};
    use std::sync::Arc;
    let (bsz, l, i, o, r) = (2, 5, 24, 18, 4);
    for (bf16, with_bias, dropout) in [(false, true, 0.0), (true, false, 0.0), (false, true, 0.3), (true, true, 0.5)] {
        let w = bf16_round(&rnd(&[o, i], 40, 0.3));
        let b = with_bias.then(|| rnd(&[o], 41, 0.5));
        let base = if bf16 {
            Linear::with_compute_dtype(w.to_dtype(DType::BF16).unwrap(), b.clone(), DType::F32).unwrap()
        } else {
            Linear::new(w.clone(), b.clone()).unwrap()
        };
        let switch = Arc::new(AdapterSwitch::default());
        switch.set_training(true); // dropout active, and the fused op in use
        switch.set_seed(7);
        let spec =
            LoraSpec { r, alpha: 8.0, dropout, use_dora: false, use_rslora: false, init: LoraInit::Random, seed: 3 };
        let ad = Arc::new(Adapter::lora(&base, &spec, 5, switch.clone(), &CPU).unwrap());
        let mut lin = base.clone();
        lin.adapter = Some(ad.clone());
        let (x, wt) = (rnd(&[bsz, l, i], 42, 1.0), rnd(&[bsz, l, o], 43, 1.0));
        let xv = var(&x);
        let what = format!("lora (bf16 {bf16}, bias {with_bias}, dropout {dropout})");
        let y = lin.forward(&xv).unwrap();
        let yr = ad.forward_reference(&lin, &xv).unwrap();
        assert_close(&format!("{what} fwd"), &to_f64(&y).unwrap(), &to_f64(&yr).unwrap(), 1e-5);
        let (g, gr) = (backward(&y, &wt), backward(&yr, &wt));
        assert!(g.get(lin.weight_tensor().expect("dense")).is_none(), "{what}: the frozen weight got a gradient");
        assert_grad_close(&format!("{what} dx"), &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
        for (name, p) in ad.params() {
            assert_grad_close(&format!("{what} {name}"), &grad(&g, p.as_tensor()), &grad(&gr, p.as_tensor()), 1e-5);
        }
        check_fd(&format!("{what} dx fd"), &|t| lin.forward(&var(t)), &x, &wt, &grad(&g, &xv));
        // an untracked input: gradients for A and B only
        let g2 = backward(&lin.forward(&x).unwrap(), &wt);
        assert!(g2.get(&x).is_none());
        for (name, p) in ad.params() {
            assert_grad_close(
                &format!("{what} {name}, x untracked"),
                &grad(&g2, p.as_tensor()),
                &grad(&gr, p.as_tensor()),
                1e-5,
            );
        }
    }
}

#[test]
fn linear_bf16_weight_wide_output_blocks() {
    // out * in above the widening block (2^21 values): dx accumulates over several weight blocks
    let (n, i, o) = (5, 64, 40_000);
    let x = rnd(&[n, i], 34, 1.0);
    let w32 = bf16_round(&rnd(&[o, i], 35, 0.2));
    let wt = rnd(&[n, o], 36, 1.0);
    let lin = Linear::with_compute_dtype(w32.to_dtype(DType::BF16).unwrap(), None, DType::F32).unwrap();
    let xv = var(&x);
    let g = backward(&lin.forward(&xv).unwrap(), &wt);
    let gr = backward(&Linear::new(w32, None).unwrap().forward_reference(&xv).unwrap(), &wt);
    assert_grad_close("bf16 wide dx", &grad(&g, &xv), &grad(&gr, &xv), 1e-5);
}

// ------------------------------------------------------------------------------------------------
// Cross-entropy and token statistics

#[test]
fn cross_entropy_forward_and_grads() {
    let (n, v) = (6, 17);
    let logits = (rnd(&[n, v], 40, 4.0) + 30.0).unwrap(); // an offset that a naive softmax would feel
    let targets = [0u32, 16, 3, 3, 9, 12];
    let wt = rnd(&[n], 41, 1.0);
    let y = to_f64(&cross_entropy_rows(&logits, &targets).unwrap()).unwrap();
    assert_close("ce fwd", &y, &to_f64(&cross_entropy_rows_reference(&logits, &targets).unwrap()).unwrap(), 1e-5);
    let ls = to_f64(&logits).unwrap();
    for (r, row) in ls.chunks(v).enumerate() {
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        assert!((y[r] - (lse - row[targets[r] as usize])).abs() < 1e-5);
    }
    let lv = var(&logits);
    let g = backward(&cross_entropy_rows(&lv, &targets).unwrap(), &wt);
    let gr = backward(&cross_entropy_rows_reference(&lv, &targets).unwrap(), &wt);
    assert_grad_close("ce dlogits", &grad(&g, &lv), &grad(&gr, &lv), 1e-5);
    check_fd("ce fd", &|t| cross_entropy_rows(t, &targets), &logits, &wt, &grad(&g, &lv));
    // the gradient of each row sums to zero (softmax - onehot)
    for row in grad(&g, &lv).chunks(v) {
        assert!(row.iter().sum::<f64>().abs() < 1e-6);
    }
}

#[test]
fn token_stats_entropy_and_argmax() {
    let (n, v) = (5, 23);
    let mut l = to_f64(&(rnd(&[n, v], 42, 6.0) - 50.0).unwrap()).unwrap();
    l[v + 4] = 100.0; // row 1: a tie, the first index wins
    l[v + 9] = 100.0;
    let logits = Tensor::from_vec(l.iter().map(|&x| x as f32).collect::<Vec<f32>>(), (n, v), &CPU).unwrap();
    let (ent, am) = token_stats(&logits).unwrap();
    let ent_ref = to_f64(&entropy_reference(&logits).unwrap()).unwrap();
    for (r, row) in l.chunks(v).enumerate() {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
        let h: f64 = -row.iter().map(|x| (x - m).exp() / z * ((x - m) - z.ln())).sum::<f64>();
        assert!((ent[r] as f64 - h).abs() < 1e-5, "row {r}: entropy {} vs {h}", ent[r]);
        // the reference subtracts two sums of size |logits|: it carries their rounding
        let tol_ref = 32.0 * f32::EPSILON as f64 * row.iter().fold(1f64, |a, x| a.max(x.abs()));
        assert!(
            (ent[r] as f64 - ent_ref[r]).abs() < tol_ref,
            "row {r}: entropy {} vs reference {}",
            ent[r],
            ent_ref[r]
        );
        let first_max = row.iter().position(|&x| x == m).unwrap();
        assert_eq!(am[r] as usize, first_max, "row {r}");
    }
    assert_eq!(am[1], 4);
    // bf16 logits are accepted
    let (e2, a2) = token_stats(&logits.to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(e2.len(), n);
    assert_eq!(a2[1], 4);
}

// ------------------------------------------------------------------------------------------------
// Timings (cargo test --release --test ops_grad -- --ignored --nocapture)

#[test]
#[ignore]
fn bench_fused_ops() {
    use std::time::Instant;
    fn time(what: &str, reps: usize, f: &dyn Fn()) {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        println!("{what}: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
    }
    let (n, h, o) = (348, 576, 1536);
    let x = rnd(&[n, h], 50, 1.0);
    let w = (rnd(&[h], 51, 0.2) + 1.0).unwrap();
    let wt = rnd(&[n, h], 52, 1.0);
    let xv = var(&x);
    time("loss + backward overhead (y = 2x)", 50, &|| drop(backward(&xv.affine(2.0, 0.0).unwrap(), &wt)));
    time("rms_norm fwd (untracked)", 50, &|| drop(rms_norm(&x, &w, 1e-5).unwrap()));
    time("rms_norm fwd+bwd (x Var)", 50, &|| drop(backward(&rms_norm(&xv, &w, 1e-5).unwrap(), &wt)));
    time("rms_norm_reference fwd+bwd", 50, &|| drop(backward(&rms_norm_reference(&xv, &w, 1e-5).unwrap(), &wt)));
    let lw = rnd(&[o, h], 53, 0.1);
    let lwt = rnd(&[n, o], 54, 1.0);
    let lin = Linear::new(lw.clone(), None).unwrap();
    let lin_bf16 = Linear::with_compute_dtype(lw.to_dtype(DType::BF16).unwrap(), None, DType::F32).unwrap();
    let wv = var(&lw);
    let lin_train = Linear::new(wv.as_tensor().clone(), None).unwrap();
    time("linear fwd untracked", 50, &|| drop(lin.forward(&x).unwrap()));
    time("linear fwd tracked", 50, &|| drop(lin.forward(&xv).unwrap()));
    time("linear fwd+bwd (frozen W)", 50, &|| drop(backward(&lin.forward(&xv).unwrap(), &lwt)));
    time("linear_reference fwd+bwd (frozen W)", 50, &|| drop(backward(&lin.forward_reference(&xv).unwrap(), &lwt)));
    time("linear fwd+bwd (W Var)", 50, &|| drop(backward(&lin_train.forward(&xv).unwrap(), &lwt)));
    time("linear bf16 fwd untracked", 50, &|| drop(lin_bf16.forward(&x).unwrap()));
    time("linear bf16 fwd+bwd (frozen W)", 50, &|| drop(backward(&lin_bf16.forward(&xv).unwrap(), &lwt)));
}
