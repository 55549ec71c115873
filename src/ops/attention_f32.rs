//! Fused f32 attention kernel for the CPU: for each (batch, head) in parallel, scores = q k^T (gemm),
//! masked softmax in place, out = p v (gemm). One [L, S] score buffer per task instead of
//! [B, H, L, S] for the whole call. Same results as `attention::attention_reference` (tested there).
//!
//! Backward (`CustomOp3::bwd`, flash-attention style): nothing is saved by the forward beyond candle's
//! own references to q, k, v and the output o. For each (batch, kv head) in parallel, the query rows of
//! the group's heads are processed in blocks; each block recomputes its probabilities P (same gemm and
//! masked softmax as the forward), then
//!   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK += scale dS^T Q.
//! One task owns a kv head, so dK/dV of a GQA group accumulate without locks. Arguments that do not
//! track gradients (`track_op() == false`, e.g. frozen cached K/V) get `None` and their work is skipped.

use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{fully_masked_weight, Mask};
use super::cpu::{f32_arg, gemm_into, gemm_scaled_into, storage_f32, transpose, Mat};
use super::math::{exp_f32, max_f32, sum_f32};

/// Query rows per block: [QB, S] f32 scores stay in L2 for S up to a few thousand.
const QUERY_BLOCK: usize = 128;

/// KEYS_IN_PLACE: every product reads K and V [S, hd] where they lie and writes the key-side gradients
/// transposed ([hd, S], transposed once per task at the end). The gemm crate multiplies a right-hand
/// operand whose columns are contiguous (K^T read from K) without packing it, and packs a row-major
/// one (a transposed copy of K) on every call: single-threaded, at one query block's shapes (128
/// queries, 1024 keys, head dim 64) on an AMD EPYC (AVX2), q K^T ran at 75 GFLOP/s in place vs 49 on
/// a K^T copy, dV^T += dO^T P at 68 vs 57 for dV += P^T dO (`cargo run --release --example
/// profile_attn_gemm`).
const NONE: gemm::Parallelism = gemm::Parallelism::None;

struct FusedAttention {
    scale: f32,
    mask: Mask,
}

/// Where the [S, hd] block of (batch row, kv head) starts in a k/v argument's storage.
#[derive(Clone, Copy)]
struct KvBlocks {
    start: usize,
    batch_stride: usize,
    head_stride: usize,
}

impl KvBlocks {
    fn at(&self, b: usize, h: usize) -> usize {
        self.start + b * self.batch_stride + h * self.head_stride
    }
}

/// A k/v argument [B, Hkv, S, hd] whose [S, hd] blocks are each contiguous (a contiguous tensor, or a
/// view of the KV cache's preallocated buffers), with where each block starts.
fn kv_blocks<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(&'a [f32], KvBlocks)> {
    let (_, _, len, hd) = l.shape().dims4()?;
    let st = l.stride();
    let CpuStorage::F32(v) = s else { bail!("fused attention: {what} must be f32") };
    if st[3] != 1 || (len > 1 && st[2] != hd) {
        bail!("fused attention: {what} needs contiguous rows of head_dim values (strides {st:?})");
    }
    Ok((v, KvBlocks { start: l.start_offset(), batch_stride: st[0], head_stride: st[1] }))
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, l, hd) = l1.shape().dims4()?;
        let (_, hkv, s, _) = l2.shape().dims4()?;
        if l3.shape().dims() != l2.shape().dims() || hkv == 0 || h % hkv != 0 {
            bail!("fused attention: bad shapes q {:?} k {:?} v {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let q = f32_arg(s1, l1, "q")?;
        let ((k, kb), (v, vb)) = (kv_blocks(s2, l2, "k")?, kv_blocks(s3, l3, "v")?);
        let groups = h / hkv;
        let mut out = vec![0f32; b * h * l * hd];
        out.par_chunks_mut(l * hd).enumerate().for_each(|(bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            let (ko, vo) = (kb.at(bi, hi / groups), vb.at(bi, hi / groups));
            let (qs, ks, vs) = (&q[bh * l * hd..(bh + 1) * l * hd], &k[ko..ko + s * hd], &v[vo..vo + s * hd]);
            // Query blocks keep the [QB, S] scores in cache between the two products and the softmax.
            let mut p = vec![0f32; QUERY_BLOCK.min(l) * s]; // [QB, S]
            for i0 in (0..l).step_by(QUERY_BLOCK) {
                let qb = QUERY_BLOCK.min(l - i0);
                let pb = &mut p[..qb * s];
                // scores [qb, S] = scale q [qb, hd] K^T, K [S, hd] read in place (see KEYS_IN_PLACE)
                gemm_scaled_into(
                    pb,
                    s,
                    (qb, s, hd),
                    Mat::rows(&qs[i0 * hd..], hd),
                    Mat::transposed(ks, hd),
                    false,
                    self.scale,
                    NONE,
                );
                for (r, row) in pb.chunks_exact_mut(s).enumerate() {
                    softmax_row(row, &self.mask, bi, i0 + r, l);
                }
                // o [qb, hd] = p [qb, S] v [S, hd]
                gemm_into(&mut o[i0 * hd..], hd, (qb, hd, s), Mat::rows(pb, s), Mat::rows(vs, hd), false, NONE);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, l, hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Need { q: q.track_op(), k: k.track_op(), v: v.track_op() };
        if !(need.q || need.k || need.v) {
            return Ok((None, None, None));
        }
        let (b, h, l, hd) = q.dims4()?;
        let (_, hkv, s, _) = k.dims4()?;
        let d_o = d_o.contiguous()?;
        let (dq, dk, dv) = {
            let ((qs, ql), (ks, kl), (vs, vl)) =
                (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout());
            let ((os, ol), (gs, gl)) = (o.storage_and_layout(), d_o.storage_and_layout());
            let t = Tensors {
                q: storage_f32(&qs, ql, "q")?,
                k: storage_f32(&ks, kl, "k")?,
                v: storage_f32(&vs, vl, "v")?,
                o: storage_f32(&os, ol, "output")?,
                d_o: storage_f32(&gs, gl, "output gradient")?,
            };
            self.backward(&t, Dims { b, h, hkv, l, s, hd }, need)
        };
        let dev = Device::Cpu;
        let dq = if need.q { Some(Tensor::from_vec(dq, (b, h, l, hd), &dev)?) } else { None };
        let dk = if need.k { Some(Tensor::from_vec(dk, (b, hkv, s, hd), &dev)?) } else { None };
        let dv = if need.v { Some(Tensor::from_vec(dv, (b, hkv, s, hd), &dev)?) } else { None };
        Ok((dq, dk, dv))
    }
}

#[derive(Clone, Copy)]
struct Need {
    q: bool,
    k: bool,
    v: bool,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    l: usize,
    s: usize,
    hd: usize,
}

/// Contiguous row-major f32 data of the backward's inputs: q, o, d_o [B, H, L, hd]; k, v [B, Hkv, S, hd].
struct Tensors<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    d_o: &'a [f32],
}

impl FusedAttention {
    /// Returns (dq, dk, dv); a gradient that is not needed comes back empty.
    fn backward(&self, t: &Tensors, dims: Dims, need: Need) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims { b, h, hkv, l, s, hd } = dims;
        let groups = h / hkv;
        let need_ds = need.q || need.k;
        let tasks = b * hkv;
        let (qlen, kvlen) = (groups * l * hd, s * hd); // per task: the group's query rows, one kv head
        let alloc = |yes: bool, n: usize| if yes { vec![0f32; n] } else { Vec::new() };
        let (mut dq, mut dk, mut dv) =
            (alloc(need.q, tasks * qlen), alloc(need.k, tasks * kvlen), alloc(need.v, tasks * kvlen));
        fn chunks(x: &mut [f32], n: usize, tasks: usize) -> Vec<Option<&mut [f32]>> {
            if x.is_empty() {
                (0..tasks).map(|_| None).collect()
            } else {
                x.chunks_mut(n).map(Some).collect()
            }
        }
        let work: Vec<_> = chunks(&mut dq, qlen, tasks)
            .into_iter()
            .zip(chunks(&mut dk, kvlen, tasks))
            .zip(chunks(&mut dv, kvlen, tasks))
            .enumerate()
            .collect();
        work.into_par_iter().for_each(|(task, ((mut dq, dk), dv))| {
            let bi = task / hkv;
            let rows = groups * l; // query rows of the group: head g row i at g * l + i
            let (qs, os, gs) =
                (&t.q[task * qlen..][..qlen], &t.o[task * qlen..][..qlen], &t.d_o[task * qlen..][..qlen]);
            let (ks, vs) = (&t.k[task * kvlen..][..kvlen], &t.v[task * kvlen..][..kvlen]);
            // dK and dV accumulate transposed, [hd, S], over the query blocks (see KEYS_IN_PLACE)
            let mut dkt = if dk.is_some() { vec![0f32; kvlen] } else { Vec::new() };
            let mut dvt = if dv.is_some() { vec![0f32; kvlen] } else { Vec::new() };
            let qb_max = QUERY_BLOCK.min(rows);
            let mut p = vec![0f32; qb_max * s];
            let mut dp = if need_ds { vec![0f32; qb_max * s] } else { Vec::new() };
            for r0 in (0..rows).step_by(QUERY_BLOCK) {
                let qb = QUERY_BLOCK.min(rows - r0);
                let pb = &mut p[..qb * s];
                let (q_blk, do_blk) = (&qs[r0 * hd..], &gs[r0 * hd..]);
                // P [qb, S] = softmax(scale Q K^T), as the forward
                let (q_m, k_t) = (Mat::rows(q_blk, hd), Mat::transposed(ks, hd));
                gemm_scaled_into(pb, s, (qb, s, hd), q_m, k_t, false, self.scale, NONE);
                for (r, row) in pb.chunks_exact_mut(s).enumerate() {
                    let i = (r0 + r) % l;
                    softmax_row(row, &self.mask, bi, i, l);
                }
                if dv.is_some() {
                    // dV^T [hd, S] += dO^T [hd, qb] P [qb, S]
                    gemm_into(&mut dvt, s, (hd, s, qb), Mat::transposed(do_blk, hd), Mat::rows(pb, s), true, NONE);
                }
                if !need_ds {
                    continue;
                }
                let dpb = &mut dp[..qb * s];
                // dP [qb, S] = dO [qb, hd] V^T, V [S, hd] read in place
                gemm_into(dpb, s, (qb, s, hd), Mat::rows(do_blk, hd), Mat::transposed(vs, hd), false, NONE);
                // dS = P * (dP - rowsum(dO * O)), written over P. Masked entries have P = 0 -> dS = 0; a
                // fully masked row has uniform P like the reference's f32::MIN bias, and gets the same
                // (softmax-Jacobian) gradient the reference's autograd gives it.
                for (r, (prow, dprow)) in pb.chunks_exact_mut(s).zip(dpb.chunks_exact(s)).enumerate() {
                    let (gr, or) = (&gs[(r0 + r) * hd..][..hd], &os[(r0 + r) * hd..][..hd]);
                    let delta: f32 = gr.iter().zip(or).map(|(a, b)| a * b).sum();
                    prow.iter_mut().zip(dprow).for_each(|(x, &d)| *x *= d - delta);
                }
                if let Some(dq) = dq.as_deref_mut() {
                    // dQ [qb, hd] = scale dS [qb, S] K [S, hd]
                    let (ds, k_m) = (Mat::rows(pb, s), Mat::rows(ks, hd));
                    gemm_scaled_into(&mut dq[r0 * hd..], hd, (qb, hd, s), ds, k_m, false, self.scale, NONE);
                }
                if dk.is_some() {
                    // dK^T [hd, S] += scale Q^T [hd, qb] dS [qb, S]
                    let (q_t, ds) = (Mat::transposed(q_blk, hd), Mat::rows(pb, s));
                    gemm_scaled_into(&mut dkt, s, (hd, s, qb), q_t, ds, true, self.scale, NONE);
                }
            }
            for (dst, src) in [(dk, &dkt), (dv, &dvt)] {
                if let Some(dst) = dst {
                    dst.copy_from_slice(&transpose(src, hd, s)); // [S, hd]
                }
            }
        });
        (dq, dk, dv)
    }
}

/// In-place softmax of query row `i` (of `l`) of batch row `b` over the keys `mask` allows (others
/// become 0); a row with no allowed key follows [`fully_masked_weight`]. Without a key-validity mask the
/// allowed keys are a prefix (all of them, or the causal ones), handled with vectorised passes.
pub(crate) fn softmax_row(row: &mut [f32], mask: &Mask, b: usize, i: usize, l: usize) {
    let s = row.len();
    if mask.key_valid.is_none() {
        // causal: key j is visible when j + l <= i + s
        let visible = if mask.causal { (i + s + 1).saturating_sub(l).min(s) } else { s };
        let max = max_f32(&row[..visible]);
        if let Some(u) = fully_masked_weight(max, s) {
            row.iter_mut().for_each(|x| *x = u);
            return;
        }
        row[visible..].iter_mut().for_each(|x| *x = 0.0);
        exp_normalize(&mut row[..visible], max);
        return;
    }
    softmax_row_masked(row, |j| mask.allowed(b, i, j, l, s));
}

/// [`softmax_row`] for any mask, one key at a time.
pub(crate) fn softmax_row_masked(row: &mut [f32], allowed: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, x) in row.iter_mut().enumerate() {
        if !allowed(j) {
            *x = f32::NEG_INFINITY; // exp -> exactly 0
        } else if *x > max {
            max = *x;
        }
    }
    if let Some(u) = fully_masked_weight(max, row.len()) {
        row.iter_mut().for_each(|x| *x = u);
        return;
    }
    exp_normalize(row, max);
}

/// row <- exp(row - max) / sum, vectorised with AVX512 or AVX2 when the CPU has it (the same exp in
/// every case, see `simd.rs`; only the order of the sum differs).
pub(crate) fn exp_normalize(row: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512() {
        // SAFETY: the CPU supports avx512f (checked just above).
        unsafe { exp_normalize_avx512(row, max) };
        return;
    }
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_normalize_avx512(row: &mut [f32], max: f32) {
    use super::simd::x86::{exp, lanes};
    use core::arch::x86_64::*;
    let (n, p) = (row.len(), row.as_mut_ptr());
    let (mv, mut sum) = (_mm512_set1_ps(max), _mm512_setzero_ps());
    for j in (0..n).step_by(16) {
        let m = lanes(n - j);
        let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(j)), mv));
        _mm512_mask_storeu_ps(p.add(j), m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for j in (0..n).step_by(16) {
        let m = lanes(n - j);
        _mm512_mask_storeu_ps(p.add(j), m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(j)), inv));
    }
}

/// q: [B, H, L, hd], k/v: [B, Hkv, S, hd] f32 -> [B, H, L, hd].
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Result<Tensor> {
    let op = FusedAttention { scale: scale as f32, mask: mask.clone() };
    // K and V views of the KV cache keep their strides (their [S, hd] blocks are contiguous): no copy
    // of the past keys per decoding step. Tracked ones (training) are made contiguous for the backward.
    let kv = |t: &Tensor| if t.track_op() || !rows_contiguous(t) { t.contiguous() } else { Ok(t.clone()) };
    q.contiguous()?.apply_op3(&kv(k)?, &kv(v)?, op)
}

/// Whether t [B, Hkv, S, hd] has contiguous rows of hd values, consecutive within each (b, head).
fn rows_contiguous(t: &Tensor) -> bool {
    let (dims, st) = (t.dims(), t.stride());
    dims.len() == 4 && st[3] == 1 && (dims[2] <= 1 || st[2] == dims[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every vectorised exp_normalize gives the plain one's values (same exp; the sum's order only).
    #[test]
    fn exp_normalize_paths_agree() {
        for n in [2usize, 15, 16, 17, 100, 1031] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.03 - 15.0).collect();
            let mut want = row.clone();
            want[n / 2] = f32::NEG_INFINITY; // a masked entry
            let max = want.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut got = want.clone();
            exp_normalize_plain(&mut want, max);
            exp_normalize(&mut got, max);
            assert_eq!(got[n / 2], 0.0);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * w.abs() + 1e-30, "n={n}: {g} vs {w}");
            }
        }
    }
}
