//! Normalisations, computed in f32 whatever the storage dtype (like transformers).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::bf16::{f32_to_bf16_bits, Bf16Rows};
use super::cpu::{f32_arg, rows_per_task, with_f32};

/// Whether the fused CPU kernels apply (see `ops::fused_on`): f32 CPU x [.., H] and f32 CPU per-feature params [H].
fn fused_ok(x: &Tensor, params: &[&Tensor]) -> bool {
    let h = x.dims().last().copied();
    super::fused_f32(x)
        && x.rank() >= 1
        && params.iter().all(|p| super::fused_f32(p) && p.rank() == 1 && Some(p.dims()[0]) == h)
}

/// Sum with 8 independent accumulators (vectorises).
#[inline]
fn sum8(it: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0f32; 8];
    for (i, v) in it.enumerate() {
        acc[i & 7] += v;
    }
    acc.iter().sum()
}

/// Runs `row(x_rows, g_rows, dx_rows, dparams)` over parallel chunks of rows of [N, H] tensors; each
/// chunk gets its own zeroed `n_params` x [H] accumulators (when `need_dp`), summed at the end.
/// Returns (dx or empty, the summed accumulators or empty).
#[allow(clippy::type_complexity)]
fn rowwise_bwd(
    x: &[f32],
    g: &[f32],
    h: usize,
    need_dx: bool,
    n_params: usize,
    need_dp: bool,
    f: &(dyn Fn(&[f32], &[f32], Option<&mut [f32]>, Option<&mut [f32]>) + Sync),
) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / h.max(1);
    let chunk = rows_per_task(n, h) * h;
    let acc_len = if need_dp { n_params * h } else { 0 };
    let run = |ci: usize, dx: Option<&mut [f32]>| -> Vec<f32> {
        let (a, b) = (ci * chunk, ((ci + 1) * chunk).min(x.len()));
        let mut acc = vec![0f32; acc_len];
        f(&x[a..b], &g[a..b], dx, need_dp.then_some(&mut acc[..]));
        acc
    };
    let mut dx = if need_dx { vec![0f32; x.len()] } else { Vec::new() };
    let parts: Vec<Vec<f32>> = if need_dx {
        dx.par_chunks_mut(chunk.max(1)).enumerate().map(|(ci, d)| run(ci, Some(d))).collect()
    } else {
        (0..x.len().div_ceil(chunk.max(1))).into_par_iter().map(|ci| run(ci, None)).collect()
    };
    let mut dp = vec![0f32; acc_len];
    for p in &parts {
        dp.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (dx, dp)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// Llama RMSNorm: x / sqrt(mean(x^2) + eps) in f32, cast back to x's dtype, times `weight`.
/// x: [.., H], weight: [H]. f32 on the CPU runs a fused kernel with a hand-written backward (dw only
/// when `weight` is tracked); other inputs run [`rms_norm_reference`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x, &[weight]) {
        x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })
    } else {
        rms_norm_reference(x, weight, eps)
    }
}

/// candle composition of [`rms_norm`] (autograd through candle's own ops).
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?; // [.., H]
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
    let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dt)?.broadcast_mul(weight)
}

struct RmsNormOp {
    eps: f32,
}

/// 1 / sqrt(mean(x^2) + eps) of one row.
#[inline]
pub(crate) fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    let ss = sum8(x.iter().map(|v| v * v));
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// Forward: y = x r w with r = 1/sqrt(mean(x^2) + eps).   x, y: [N, H], w: [H]
fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut y = vec![0f32; x.len()]; // [N, H]
    let chunk = rows_per_task(x.len() / h.max(1), h) * h;
    y.par_chunks_mut(chunk.max(1)).zip(x.par_chunks(chunk.max(1))).for_each(|(y, x)| {
        for (y, x) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let r = rms_rstd(x, eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        }
    });
    y
}

/// Backward, per row with xh = x r, gw = g w:
///   dx = r (gw - xh mean(gw xh))        [N, H]
///   dw = sum over rows of g xh          [H]
fn rms_norm_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32, need_dx: bool, need_dw: bool) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    rowwise_bwd(x, g, h, need_dx, 1, need_dw, &|x, g, mut dx, mut dw| {
        for (ri, (x, g)) in x.chunks_exact(h).zip(g.chunks_exact(h)).enumerate() {
            let r = rms_rstd(x, eps);
            if let Some(dw) = dw.as_deref_mut() {
                for ((dw, x), g) in dw.iter_mut().zip(x).zip(g) {
                    *dw += g * x * r;
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                let c = sum8(x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x)) * r / h as f32; // mean(gw xh)
                let dx = &mut dx[ri * h..(ri + 1) * h];
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = r * (g * w - x * r * c);
                }
            }
        }
    })
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(xs, xl, "rms-norm")?; // [.., H]
        let w = f32_arg(ws, wl, "rms-norm")?; // [H]
        Ok((CpuStorage::F32(rms_norm_fwd(x, w, self.eps)), xl.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        let g = g.contiguous()?;
        let (dx, dw) = with_f32(x, |xv| {
            with_f32(w, |wv| with_f32(&g, |gv| rms_norm_bwd(xv, wv, gv, self.eps, need_dx, need_dw)))
        })???;
        let dx = if need_dx { Some(Tensor::from_vec(dx, x.shape(), x.device())?) } else { None };
        let dw = if need_dw { Some(Tensor::from_vec(dw, w.shape(), w.device())?) } else { None };
        Ok((dx, dw))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm with bias over the last dim, statistics in f32 (biased variance, like torch).
/// x: [.., D], weight, bias: [D]. f32 on the CPU runs a fused kernel with a hand-written backward
/// (dw, db only for tracked params); other inputs run [`layer_norm_reference`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x, &[weight, bias]) {
        x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps: eps as f32 })
    } else {
        layer_norm_reference(x, weight, bias, eps)
    }
}

/// candle composition of [`layer_norm`].
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?; // [.., D]
    let mean = xf.mean_keepdim(D::Minus1)?; // [.., 1]
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let w = weight.to_dtype(DType::F32)?;
    let b = bias.to_dtype(DType::F32)?;
    y.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dt)
}

struct LayerNormOp {
    eps: f32,
}

/// (mean, 1/sqrt(var + eps)) of one row, biased variance computed around the mean (two passes).
#[inline]
fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mu = sum8(x.iter().copied()) / d;
    let var = sum8(x.iter().map(|v| (v - mu) * (v - mu))) / d;
    (mu, 1.0 / (var + eps).sqrt())
}

/// Forward: y = (x - mu) r w + b.   x, y: [N, D], w, b: [D]
fn layer_norm_fwd(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()]; // [N, D]
    layer_norm_into(x, w, b, eps, &mut y);
    y
}

/// The forward of [`layer_norm`] (same arithmetic) on x [N, D] f32 into y [N, D] (in parallel).
pub fn layer_norm_into(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let h = w.len();
    assert!(b.len() == h && x.len() == y.len(), "layer_norm_into: x {}, y {}, w {h}, b {}", x.len(), y.len(), b.len());
    let chunk = rows_per_task(x.len() / h.max(1), h) * h;
    y.par_chunks_mut(chunk.max(1)).zip(x.par_chunks(chunk.max(1))).for_each(|(y, x)| {
        for (y, x) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let (mu, r) = ln_stats(x, eps);
            for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mu) * r * w + b;
            }
        }
    });
}

/// The forward of [`layer_norm`] (same arithmetic) on x [N, D] f32, written rounded to bf16 as the
/// input rows of a following bf16 gemm (inference in the bf16 compute mode).
pub fn layer_norm_bf16(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut Bf16Rows) {
    let h = w.len();
    assert!(
        b.len() == h && out.k() == h && x.len() == out.n() * h,
        "layer_norm_bf16: x {}, w {h}, b {}, out {}x{}",
        x.len(),
        b.len(),
        out.n(),
        out.k()
    );
    if h == 0 || out.n() == 0 {
        return;
    }
    let kp2 = out.kp2();
    let rows = rows_per_task(out.n(), h);
    out.pairs_mut().par_chunks_mut(rows * kp2).zip(x.par_chunks(rows * h)).for_each(|(o, x)| {
        for (o, x) in o.chunks_exact_mut(kp2).zip(x.chunks_exact(h)) {
            let (mu, r) = ln_stats(x, eps);
            let y = |i: usize| f32_to_bf16_bits((x[i] - mu) * r * w[i] + b[i]) as u32;
            for (p, o) in o.iter_mut().enumerate().take(h / 2) {
                *o = y(2 * p) | y(2 * p + 1) << 16;
            }
            if h % 2 == 1 {
                o[kp2 - 1] = y(h - 1);
            }
        }
    });
}

/// Backward, per row with xh = (x - mu) r, gw = g w:
///   dx = r (gw - mean(gw) - xh mean(gw xh))    [N, D]
///   dw = sum over rows of g xh                 [D]
///   db = sum over rows of g                    [D]
/// Returns (dx or empty, [dw; db] concatenated or empty).
fn layer_norm_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32, need_dx: bool, need_dp: bool) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    rowwise_bwd(x, g, h, need_dx, 2, need_dp, &|x, g, mut dx, mut dp| {
        for (ri, (x, g)) in x.chunks_exact(h).zip(g.chunks_exact(h)).enumerate() {
            let (mu, r) = ln_stats(x, eps);
            if let Some(dp) = dp.as_deref_mut() {
                let (dw, db) = dp.split_at_mut(h);
                for (((dw, db), x), g) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(g) {
                    *dw += g * (x - mu) * r;
                    *db += g;
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                let m1 = sum8(g.iter().zip(w).map(|(g, w)| g * w)) / h as f32; // mean(gw)
                let m2 = sum8(x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * (x - mu))) * r / h as f32; // mean(gw xh)
                let dx = &mut dx[ri * h..(ri + 1) * h];
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = r * (g * w - m1 - (x - mu) * r * m2);
                }
            }
        }
    })
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(xs, xl, "layer-norm")?; // [.., D]
        let w = f32_arg(ws, wl, "layer-norm")?; // [D]
        let b = f32_arg(bs, bl, "layer-norm")?; // [D]
        Ok((CpuStorage::F32(layer_norm_fwd(x, w, b, self.eps)), xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_dw, need_db) = (x.track_op(), w.track_op(), b.track_op());
        let g = g.contiguous()?;
        let (dx, dp) = with_f32(x, |xv| {
            with_f32(w, |wv| with_f32(&g, |gv| layer_norm_bwd(xv, wv, gv, self.eps, need_dx, need_dw || need_db)))
        })???;
        let h = w.elem_count();
        let dx = if need_dx { Some(Tensor::from_vec(dx, x.shape(), x.device())?) } else { None };
        let dw = if need_dw { Some(Tensor::from_vec(dp[..h].to_vec(), w.shape(), w.device())?) } else { None };
        let db = if need_db { Some(Tensor::from_vec(dp[h..].to_vec(), b.shape(), b.device())?) } else { None };
        Ok((dx, dw, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_zero_mean_unit_var() {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let y = layer_norm(&x, &w, &b, 0.0).unwrap().to_vec2::<f32>().unwrap();
        let m: f32 = y[0].iter().sum::<f32>() / 4.0;
        let v: f32 = y[0].iter().map(|a| a * a).sum::<f32>() / 4.0;
        assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-5);
    }

    #[test]
    fn layer_norm_bf16_is_the_rounded_forward() {
        let (n, h) = (37, 45);
        let x = Tensor::randn(0f32, 2.0, (n, h), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.2, h, &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.2, h, &Device::Cpu).unwrap();
        let want = layer_norm(&x, &w, &b, 1e-6).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = Bf16Rows::zeros(n, h);
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        layer_norm_bf16(&v(&x), &v(&w), &v(&b), 1e-6, &mut out);
        assert_eq!(out, Bf16Rows::from_f32(&want, n, h));
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = Tensor::new(&[[1.0f32, -2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 1.0, 1.0, 2.0], &Device::Cpu).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap().to_vec2::<f32>().unwrap();
        let rms = ((1.0 + 4.0 + 9.0 + 36.0) / 4.0f32).sqrt();
        assert!((y[0][0] - 1.0 / rms).abs() < 1e-6 && (y[0][3] - 12.0 / rms).abs() < 1e-5);
    }
}
