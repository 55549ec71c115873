//! Fused f32 attention kernel for the CPU: for each (batch, head) in parallel, scores = q k^T (gemm),
//! masked softmax in place, out = p v (gemm). One [L, S] score buffer per task instead of
//! [B, H, L, S] for the whole call. Same results as `attention::attention_reference` (tested there).
//! No backward yet: a backward pass through it fails loudly (candle's BackwardNotSupported) instead of
//! cutting gradients; the training path adds one.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::attention::Mask;
use super::math::{exp_f32, sum_f32};

/// Query rows per block: [QB, S] f32 scores stay in L2 for S up to a few thousand.
const QUERY_BLOCK: usize = 128;

struct FusedAttention {
    scale: f32,
    mask: Mask,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("fused attention: {what} must be contiguous"),
        _ => bail!("fused attention: {what} must be f32"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, l, hd) = l1.shape().dims4()?;
        let (_, hkv, s, _) = l2.shape().dims4()?;
        if l3.shape().dims() != l2.shape().dims() || hkv == 0 || h % hkv != 0 {
            bail!("fused attention: bad shapes q {:?} k {:?} v {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let (q, k, v) = (f32_slice(s1, l1, "q")?, f32_slice(s2, l2, "k")?, f32_slice(s3, l3, "v")?);
        let groups = h / hkv;
        let mut out = vec![0f32; b * h * l * hd];
        out.par_chunks_mut(l * hd).enumerate().for_each(|(bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            let kv_off = (bi * hkv + hi / groups) * s * hd;
            let (qs, ks, vs) = (&q[bh * l * hd..(bh + 1) * l * hd], &k[kv_off..kv_off + s * hd], &v[kv_off..kv_off + s * hd]);
            // K^T [hd, S] row-major: gemm then streams both operands along rows.
            let mut kt = vec![0f32; hd * s];
            for (j, krow) in ks.chunks_exact(hd).enumerate() {
                for (d, &val) in krow.iter().enumerate() {
                    kt[d * s + j] = val;
                }
            }
            // Query blocks keep the [QB, S] scores in cache between the two products and the softmax.
            let mut p = vec![0f32; QUERY_BLOCK.min(l) * s]; // [QB, S]
            for i0 in (0..l).step_by(QUERY_BLOCK) {
                let qb = QUERY_BLOCK.min(l - i0);
                let pb = &mut p[..qb * s];
                // SAFETY: qs rows i0.. [qb, hd] row-major, kt [hd, S] row-major, pb [qb, S]; all in bounds.
                unsafe {
                    gemm(qb, s, hd, pb.as_mut_ptr(), 1, s as isize, false, qs[i0 * hd..].as_ptr(), 1, hd as isize, kt.as_ptr(), 1, s as isize, 0.0, self.scale, false, false, false, Parallelism::None);
                }
                for (r, row) in pb.chunks_exact_mut(s).enumerate() {
                    softmax_row(row, |j| self.mask.allowed(bi, i0 + r, j, l, s));
                }
                // SAFETY: pb [qb, S], vs [S, hd], o rows i0.. [qb, hd]; all row-major and in bounds.
                unsafe {
                    gemm(qb, hd, s, o[i0 * hd..].as_mut_ptr(), 1, hd as isize, false, pb.as_ptr(), 1, s as isize, vs.as_ptr(), 1, hd as isize, 0.0, 1.0, false, false, false, Parallelism::None);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, l, hd))))
    }
}

/// In-place softmax over the allowed entries (others become 0). A row with no allowed entry gets
/// uniform weights, as an additive f32::MIN mask gives in transformers' eager attention.
fn softmax_row(row: &mut [f32], allowed: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, x) in row.iter_mut().enumerate() {
        if !allowed(j) {
            *x = f32::NEG_INFINITY; // exp -> exactly 0
        } else if *x > max {
            max = *x;
        }
    }
    if max == f32::NEG_INFINITY {
        let u = 1.0 / row.len() as f32;
        row.iter_mut().for_each(|x| *x = u);
        return;
    }
    exp_normalize(row, max);
}

/// row <- exp(row - max) / sum, vectorised with AVX2 when the CPU has it.
fn exp_normalize(row: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports avx2 and fma (checked just above).
        unsafe { exp_normalize_avx2(row, max) };
        return;
    }
    exp_normalize_plain(row, max)
}

#[inline(always)]
fn exp_normalize_plain(row: &mut [f32], max: f32) {
    row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
    let inv = 1.0 / sum_f32(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_normalize_avx2(row: &mut [f32], max: f32) {
    exp_normalize_plain(row, max)
}

/// q: [B, H, L, hd], k/v: [B, Hkv, S, hd] f32 -> [B, H, L, hd].
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Result<Tensor> {
    let op = FusedAttention { scale: scale as f32, mask: mask.clone() };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}
