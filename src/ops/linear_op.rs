//! The tracked Linear: y = x W^T + b as a candle custom op whose backward computes a gradient only
//! for the tracked arguments (a frozen weight never gets one), with its CPU kernels (gemm for f32
//! weights, the bf16 kernels for bf16 ones, the packed bf16 kernel in `bf16=True` training).
//! [`super::linear::Linear::forward_base`] calls [`linear_tracked`] when autograd tracks the product.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::cpu::{add_bias_rows, f32_arg, parallelism, rows_per_task, with_f32};
use super::linear::GEMV_MAX_ROWS;
use super::matmul_bf16_packed;

/// The weight of a [`LinearOp`] argument: f32 values or bf16 bits, [out, in] row-major.
pub(super) enum WSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

pub(super) fn w_arg<'a>(s: &'a CpuStorage, l: &Layout) -> Result<WSlice<'a>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(WSlice::F32(&v[a..b])),
        (CpuStorage::BF16(v), Some((a, b))) => Ok(WSlice::Bf16(v[a..b].reinterpret_cast())),
        _ => candle_core::bail!("linear: the CPU kernel needs a contiguous f32 or bf16 weight"),
    }
}

/// Rows of a bf16 weight widened at once in the backward (bounds the f32 scratch to ~8 MB).
const WIDEN_BLOCK_ELEMS: usize = 1 << 21;

/// y [N, out] = x [N, in] W^T (+ b): gemm for f32 weights, the bf16 kernels of `matmul_bf16_skinny` for bf16 ones.
pub(super) fn linear_fwd_kernel(
    x: &[f32],
    n: usize,
    k: usize,
    w: &WSlice,
    out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    match w {
        WSlice::F32(w) => {
            let mut y = vec![0f32; n * out]; // [N, out]
            if let Some(b) = bias {
                y.par_chunks_mut(out.max(1)).for_each(|r| r.copy_from_slice(b));
            }
            // SAFETY: y is [n, out] row-major; x is [n, k] row-major; W^T is read from W [out, k]
            // with row stride 1 and column stride k.
            unsafe {
                gemm::gemm(
                    n,
                    out,
                    k,
                    y.as_mut_ptr(),
                    1,
                    out as isize,
                    bias.is_some(),
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
            y
        }
        WSlice::Bf16(w) => {
            let mut y = if n <= GEMV_MAX_ROWS {
                super::matmul_bf16_skinny::gemv_bf16(x, n, k, w, out)
            } else {
                super::matmul_bf16_skinny::matmul_bf16_wide(x, n, k, w, out, None)
            };
            if let Some(b) = bias {
                add_bias_rows(&mut y, b);
            }
            y
        }
    }
}

/// dx [N, in] = g [N, out] W [out, in]. A bf16 weight is widened block of rows by block of rows into
/// a scratch buffer and the blocks' products accumulate in dx.
pub(super) fn linear_dx_kernel(g: &[f32], n: usize, k: usize, w: &WSlice, out: usize) -> Vec<f32> {
    let mut dx = vec![0f32; n * k]; // [N, in]
    match w {
        WSlice::F32(w) => unsafe {
            // SAFETY: dx [n, k], g [n, out], W [out, k], all row-major and of those sizes.
            gemm::gemm(
                n,
                k,
                out,
                dx.as_mut_ptr(),
                1,
                k as isize,
                false,
                g.as_ptr(),
                1,
                out as isize,
                w.as_ptr(),
                1,
                k as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        },
        WSlice::Bf16(w) => {
            let rows = (WIDEN_BLOCK_ELEMS / k.max(1)).clamp(1, out.max(1));
            let mut scratch = vec![0f32; rows * k]; // [rows, in]
            let mut o0 = 0;
            while o0 < out {
                let ob = rows.min(out - o0);
                scratch[..ob * k].par_chunks_mut(4096).zip(w[o0 * k..(o0 + ob) * k].par_chunks(4096)).for_each(
                    |(d, s)| {
                        d.iter_mut().zip(s).for_each(|(d, &b)| *d = f32::from_bits((b as u32) << 16));
                    },
                );
                // SAFETY: dx [n, k]; lhs is the [n, ob] column block g[:, o0..o0+ob] (row stride out);
                // rhs is scratch [ob, k] row-major.
                unsafe {
                    gemm::gemm(
                        n,
                        k,
                        ob,
                        dx.as_mut_ptr(),
                        1,
                        k as isize,
                        o0 > 0,
                        g.as_ptr().add(o0),
                        1,
                        out as isize,
                        scratch.as_ptr(),
                        1,
                        k as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism(),
                    );
                }
                o0 += ob;
            }
        }
    }
    dx
}

/// dW [out, in] = g^T [out, N] x [N, in].
fn linear_dw_kernel(g: &[f32], x: &[f32], n: usize, k: usize, out: usize) -> Vec<f32> {
    let mut dw = vec![0f32; out * k];
    // SAFETY: dw [out, k] row-major; g^T is read from g [n, out] (row stride 1, column stride out);
    // x [n, k] row-major.
    unsafe {
        gemm::gemm(
            out,
            k,
            n,
            dw.as_mut_ptr(),
            1,
            k as isize,
            false,
            g.as_ptr(),
            out as isize,
            1,
            x.as_ptr(),
            1,
            k as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
    dw
}

/// db [out] = sum over rows of g [N, out].
fn linear_db_kernel(g: &[f32], n: usize, out: usize) -> Vec<f32> {
    let rows = rows_per_task(n, out);
    g.par_chunks(rows * out.max(1))
        .map(|c| {
            let mut acc = vec![0f32; out];
            for r in c.chunks_exact(out) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .reduce(
            || vec![0f32; out],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// y = x W^T (+ b) as a custom op on (x [N, in], W [out, in] f32 or bf16[, b [out] f32]).
/// Its backward returns a gradient only for the tracked arguments. With `packed` (the weight of
/// [`Weight::Autocast`]), the forward product runs on the packed bf16 weight (x rounded to bf16, as the
/// untracked pass does, so tracked and untracked passes compute the same numbers) and the backward to x
/// on the transposed packed weight (`packed_t`, built on first use: g rounded to bf16, W in bf16, f32
/// sums, as autocast's bf16 `linear` backward; the AMX or AVX512-BF16 kernels of `matmul_packed`); the
/// weight's and bias's gradients (of a trained weight, never autocast's) use the f32 values.
struct LinearOp {
    packed: Option<Packed>,
}

/// The packed bf16 weight of a [`Weight::Autocast`] and its lazily built transpose.
pub(crate) type Packed = (Arc<matmul_bf16_packed::PackedBf16>, Arc<OnceLock<matmul_bf16_packed::PackedBf16>>);

impl LinearOp {
    fn forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(xs, xl, "linear")?; // [N, in]
        let w = w_arg(ws, wl)?; // [out, in]
        let (n, k) = xl.shape().dims2()?;
        let (out, k2) = wl.shape().dims2()?;
        if k != k2 || b.is_some_and(|b| b.len() != out) {
            candle_core::bail!(
                "linear: x {:?}, weight {:?}, bias {:?} do not match",
                xl.shape(),
                wl.shape(),
                b.map(|b| b.len())
            );
        }
        let y = match self.packed.as_ref().map(|(p, _)| p) {
            Some(p) if p.in_features() == k && p.out_features() == out => {
                let mut y = matmul_bf16_packed::matmul_packed(x, n, k, p); // [N, out]
                if let Some(b) = b {
                    add_bias_rows(&mut y, b);
                }
                y
            }
            Some(p) => candle_core::bail!(
                "linear: packed weight [{}, {}] does not match weight {:?}",
                p.out_features(),
                p.in_features(),
                wl.shape()
            ),
            None => linear_fwd_kernel(x, n, k, &w, out, b),
        };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    /// (dx, dW, db), each only where its argument is tracked.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let out = w.dim(0)?;
        let dev = x.device();
        let g = g.contiguous()?; // [N, out]
        let dx = if let (true, Some((p, pt))) = (x.track_op(), &self.packed) {
            let pt = pt.get_or_init(|| p.transposed()); // W^T packed: [in, out] as a PyTorch weight
            let dx = with_f32(&g, |g| matmul_bf16_packed::matmul_packed(g, n, out, pt))?; // [N, in]
            Some(Tensor::from_vec(dx, (n, k), dev)?)
        } else if x.track_op() {
            let w = w.contiguous()?;
            let (ws, wl) = w.storage_and_layout();
            let ws = match &*ws {
                Storage::Cpu(s) => s,
                _ => candle_core::bail!("linear: the CPU backward needs a CPU weight"),
            };
            let wsl = w_arg(ws, wl)?;
            let dx = with_f32(&g, |g| linear_dx_kernel(g, n, k, &wsl, out))?;
            Some(Tensor::from_vec(dx, (n, k), dev)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = with_f32(&g, |g| with_f32(x, |x| linear_dw_kernel(g, x, n, k, out)))??;
            Some(Tensor::from_vec(dw, (out, k), dev)?.to_dtype(w.dtype())?)
        } else {
            None
        };
        let db = match b {
            Some(b) if b.track_op() => {
                Some(Tensor::from_vec(with_f32(&g, |g| linear_db_kernel(g, n, out))?, out, dev)?.to_dtype(b.dtype())?)
            }
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(xs, xl, ws, wl, None)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, None, g)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bias"
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
        let b = f32_arg(bs, bl, "linear")?;
        self.forward(xs, xl, ws, wl, Some(b))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, Some(b), g)
    }
}

/// x [N, in] f32 CPU, w [out, in] f32 or bf16, b [out] f32 -> [N, out] through [`LinearOp`]
/// (`packed`: see there).
pub(crate) fn linear_tracked(x: &Tensor, w: &Tensor, b: Option<&Tensor>, packed: Option<Packed>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let op = LinearOp { packed };
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}
