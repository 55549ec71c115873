//! Attention of the bf16 compute mode (inference, no mask but hidden keys): q, k, v and the
//! probabilities rounded to bf16, products with `vdpbf16ps` (f32 accumulation), softmax in f32.
//!
//! Reads q | k | v straight from the fused projection output (bf16 rows `[F * S, 3 * H * hd]`, head h
//! at columns `h * hd` of each part) and writes bf16 rows `[F * S, H * hd]` for out_proj: no head
//! transposes. K of each (frame, head) is packed once as a weight panel (`[S, hd]` as `[out, k]`), V
//! as the transpose (`[hd, S]`); then per (frame, head, chunk of queries) task and block of queries
//!   scores = scale * q k^T (f32)  ->  e = bf16(exp(scores - max)) with hidden keys at 0
//!   out = bf16((e v) / sum(e))
//! (exp to about 3e-6 relative, as the value is rounded to bf16 next). A query whose keys are all hidden
//! follows `attention::fully_masked_weight`.
//! [`attention_qkv_bf16_portable`] computes the same on any CPU.

use rayon::prelude::*;

use super::attention::fully_masked_weight;
use super::bf16::{f32_to_bf16_bits, Bf16Rows};
use super::math::exp_f32;
use super::matmul_bf16_fused::available;
use super::matmul_bf16_packed::MR;

/// Query rows per block (a multiple of MR): `[QB, S]` f32 scores stay in L2.
const QB: usize = 8 * MR;
/// Query rows per parallel task.
const QCHUNK: usize = 2 * QB;

fn check(qkv: &Bf16Rows, frames: usize, heads: usize, hd: usize, key_valid: Option<&[bool]>, out: &Bf16Rows) -> usize {
    let d = heads * hd;
    assert!(hd > 0 && hd.is_multiple_of(2), "attention_bf16: head dim {hd} must be even and positive");
    assert!(frames > 0 && qkv.n().is_multiple_of(frames), "attention_bf16: {} rows for {frames} frames", qkv.n());
    assert_eq!(qkv.k(), 3 * d, "attention_bf16: qkv width {} vs 3 * {heads} * {hd}", qkv.k());
    assert!(out.n() == qkv.n() && out.k() == d, "attention_bf16: output {}x{} vs {}x{d}", out.n(), out.k(), qkv.n());
    assert!(key_valid.is_none_or(|m| m.len() == qkv.n()), "attention_bf16: key mask length");
    qkv.n() / frames
}

/// Additive key bias per frame and key: 0 where visible, -inf where hidden. [F * S]
fn key_bias(key_valid: Option<&[bool]>) -> Option<Vec<f32>> {
    key_valid.map(|m| m.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }).collect())
}

/// Whether the AVX512 kernel runs here (AVX512-BF16 and the byte/word stores of AVX512BW).
fn fast_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// qkv: bf16 rows `[F * S, 3 * heads * hd]`; key_valid: `[F * S]` (false hides key j of a frame from
/// that frame's queries) -> out: bf16 rows `[F * S, heads * hd]`. The AVX512-BF16 kernel where
/// available, else [`attention_qkv_bf16_portable`].
pub fn attention_qkv_bf16(
    qkv: &Bf16Rows,
    frames: usize,
    heads: usize,
    hd: usize,
    key_valid: Option<&[bool]>,
    scale: f32,
    out: &mut Bf16Rows,
) {
    if !fast_ok() {
        return attention_qkv_bf16_portable(qkv, frames, heads, hd, key_valid, scale, out);
    }
    let s = check(qkv, frames, heads, hd, key_valid, out);
    #[cfg(target_arch = "x86_64")]
    {
        let kb = key_bias(key_valid);
        // K and V of every (frame, head), packed once as weight panels.
        let (klen, vlen) = fast::pack_lens(s, hd);
        let mut packs = super::matmul_bf16_packed::AlignedU32::zeros(frames * heads * (klen + vlen));
        packs
            .par_chunks_mut(klen + vlen)
            .enumerate()
            .for_each(|(fh, buf)| fast::pack_kv(qkv, s, heads, hd, fh / heads, fh % heads, buf));
        let chunks = s.div_ceil(QCHUNK);
        let op = out.pairs_mut().as_mut_ptr() as usize;
        (0..frames * heads * chunks).into_par_iter().for_each(|t| {
            let (fh, c) = (t / chunks, t % chunks);
            let (f, h) = (fh / heads, fh % heads);
            let q0 = c * QCHUNK;
            let kbf = kb.as_ref().map(|b| &b[f * s..(f + 1) * s]);
            let kv = &packs[fh * (klen + vlen)..][..klen + vlen];
            // SAFETY: the CPU has avx512f/bw + avx512bf16 (fast_ok()); check() validated the shapes;
            // each task writes only rows q0.. of its frame, columns of its head.
            unsafe { fast::task(qkv, s, heads, hd, f, h, q0, QCHUNK.min(s - q0), kbf, kv, scale, op as *mut u16) };
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod fast {
    use std::cell::RefCell;

    use super::super::attention::fully_masked_weight;
    use super::super::bf16::Bf16Rows;
    use super::super::matmul_bf16_fused::{tile, Epi};
    use super::super::matmul_bf16_packed::{MR, NR};
    use super::super::simd::x86::lanes;
    use super::QB;
    use core::arch::x86_64::*;

    /// Per-thread buffers of a task: scores, probabilities, 1 / row sums.
    #[derive(Default)]
    struct Scratch {
        scores: Vec<f32>,
        p: Vec<u32>,
        rs: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    fn fit<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
        if v.len() < n {
            v.resize(n, T::default());
        }
    }

    /// u32 lengths of the packed K and V of one head.
    pub(super) fn pack_lens(s: usize, hd: usize) -> (usize, usize) {
        (s.div_ceil(NR) * (hd / 2) * NR, hd.div_ceil(NR) * s.div_ceil(2) * NR)
    }

    /// Packs K of (f, h) (`[S, hd]` as a weight `[out = S, k = hd]`) then V (`[hd, S]`: pairs of
    /// keys) into `buf` (zeroed, [`pack_lens`] long).
    pub(super) fn pack_kv(qkv: &Bf16Rows, s: usize, heads: usize, hd: usize, f: usize, h: usize, buf: &mut [u32]) {
        let (d, hp, ldq, sp2) = (heads * hd, hd / 2, qkv.kp2(), s.div_ceil(2));
        let (kpack, vpack) = buf.split_at_mut(pack_lens(s, hd).0);
        let src = qkv.pairs();
        for j in 0..s {
            let krow = &src[(f * s + j) * ldq + (d + h * hd) / 2..][..hp];
            let base = (j / NR) * hp * NR + j % NR;
            for (p, &v) in krow.iter().enumerate() {
                kpack[base + p * NR] = v;
            }
        }
        let bits = qkv.bits();
        let vrow = |j: usize| &bits[(f * s + j) * 2 * ldq + 2 * d + h * hd..][..hd];
        let zeros = vec![0u16; hd];
        for p in 0..sp2 {
            let (lo, hi) = (vrow(2 * p), if 2 * p + 1 < s { vrow(2 * p + 1) } else { &zeros[..] });
            for dp in 0..hd.div_ceil(NR) {
                let cols = NR.min(hd - dp * NR);
                let dst = &mut vpack[(dp * sp2 + p) * NR..][..cols];
                for ((o, &l), &u) in dst.iter_mut().zip(&lo[dp * NR..][..cols]).zip(&hi[dp * NR..][..cols]) {
                    *o = l as u32 | (u as u32) << 16;
                }
            }
        }
    }

    /// Queries q0..q0+nq of frame f, head h, with the packed K | V of that head in `kv`.
    ///
    /// # Safety
    /// avx512f/bw + avx512bf16; shapes as checked by `check`; `out` is the output's bf16 data.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn task(
        qkv: &Bf16Rows,
        s: usize,
        heads: usize,
        hd: usize,
        f: usize,
        h: usize,
        q0: usize,
        nq: usize,
        kb: Option<&[f32]>,
        kv: &[u32],
        scale: f32,
        out: *mut u16,
    ) {
        SCRATCH.with(|sc| {
            let sc = &mut *sc.borrow_mut();
            let (d, hp, ldq, sp2) = (heads * hd, hd / 2, qkv.kp2(), s.div_ceil(2));
            let (kpack, vpack) = kv.split_at(pack_lens(s, hd).0);
            let (kpanels, vpanels) = (s.div_ceil(NR), hd.div_ceil(NR));
            let src = qkv.pairs();
            let row0 = f * s;
            fit(&mut sc.scores, QB * s);
            fit(&mut sc.p, QB * sp2);
            fit(&mut sc.rs, QB);
            let (scores, pbuf, rs) = (sc.scores.as_mut_ptr(), sc.p.as_mut_ptr(), sc.rs.as_mut_ptr());
            let ldo = 2 * d.div_ceil(2);
            for i0 in (q0..q0 + nq).step_by(QB) {
                let qb = QB.min(q0 + nq - i0);
                for ir in (0..qb).step_by(MR) {
                    let rows = MR.min(qb - ir);
                    let a = src.as_ptr().add((row0 + i0 + ir) * ldq + h * hp);
                    for jp in 0..kpanels {
                        let epi = Epi {
                            dst: scores.add(ir * s + jp * NR) as *mut u8,
                            ld: s,
                            bf16: false,
                            accumulate: false,
                            scale,
                            row_scale: std::ptr::null(),
                            bias: std::ptr::null(),
                            gelu: false,
                        };
                        tile(
                            hp,
                            a,
                            ldq,
                            rows,
                            kpack.as_ptr().add(jp * hp * NR),
                            NR.min(s - jp * NR),
                            std::ptr::null(),
                            std::ptr::null_mut(),
                            0,
                            &epi,
                        );
                    }
                }
                for r in 0..qb {
                    let row = std::slice::from_raw_parts(scores.add(r * s), s);
                    *rs.add(r) = softmax_row(row, kb, pbuf.add(r * sp2) as *mut u16, sp2);
                }
                for ir in (0..qb).step_by(MR) {
                    let rows = MR.min(qb - ir);
                    for dp in 0..vpanels {
                        let dst = out.add((row0 + i0 + ir) * ldo + h * hd + dp * NR);
                        let epi = Epi {
                            dst: dst as *mut u8,
                            ld: ldo,
                            bf16: true,
                            accumulate: false,
                            scale: 1.0,
                            row_scale: rs.add(ir),
                            bias: std::ptr::null(),
                            gelu: false,
                        };
                        tile(
                            sp2,
                            pbuf.add(ir * sp2),
                            sp2,
                            rows,
                            vpack.as_ptr().add(dp * sp2 * NR),
                            NR.min(hd - dp * NR),
                            std::ptr::null(),
                            std::ptr::null_mut(),
                            0,
                            &epi,
                        );
                    }
                }
            }
        });
    }

    /// exp(x) for x <= 0 (or -inf), relative error below 3e-6 (the result is rounded to bf16):
    /// 2^t = 2^n 2^f, f in [-1/2, 1/2], degree-5 Taylor polynomial of 2^f; exactly 0 below 2^-126.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_nonpos(x: __m512) -> __m512 {
        let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(t, _mm512_set1_ps(-126.0));
        let t = _mm512_max_ps(t, _mm512_set1_ps(-127.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let fr = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(1.333_355_8e-3);
        for c in [9.618_129e-3f32, 5.550_411e-2, 2.402_265e-1, 6.931_472e-1, 1.0] {
            p = _mm512_fmadd_ps(p, fr, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(!tiny, _mm512_scalef_ps(p, n))
    }

    /// e = bf16(exp(row + kb - max)) written to `p` (2 * sp2 bf16, the odd tail 0); returns 1 / sum(e).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn softmax_row(row: &[f32], kb: Option<&[f32]>, p: *mut u16, sp2: usize) -> f32 {
        let s = row.len();
        let load = |j: usize| -> (__m512, __mmask16) {
            let m = lanes(s.saturating_sub(j));
            let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, row.as_ptr().add(j));
            match kb {
                Some(kb) => (_mm512_add_ps(v, _mm512_maskz_loadu_ps(m, kb.as_ptr().add(j))), m),
                None => (v, m),
            }
        };
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..s).step_by(16) {
            mx = _mm512_max_ps(mx, load(j).0);
        }
        let max = _mm512_reduce_max_ps(mx);
        if 2 * sp2 > s {
            *p.add(s) = 0;
        }
        if let Some(u) = fully_masked_weight(max, s) {
            // every key hidden: e = 1 for every key, then the sum's inverse 1 / S
            for j in 0..s {
                *p.add(j) = 0x3f80; // bf16 1.0
            }
            return u;
        }
        let (mv, mut sum) = (_mm512_set1_ps(max), _mm512_setzero_ps());
        for j in (0..s).step_by(32) {
            let ((v0, m0), (v1, m1)) = (load(j), load(j + 16));
            let (e0, e1) = (exp_nonpos(_mm512_sub_ps(v0, mv)), exp_nonpos(_mm512_sub_ps(v1, mv)));
            sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_maskz_mov_ps(m0, e0), _mm512_maskz_mov_ps(m1, e1)));
            let bf = _mm512_cvtne2ps_pbh(e1, e0); // e0 -> elements 0..16, e1 -> 16..32
            let m = m0 as u32 | (m1 as u32) << 16;
            _mm512_mask_storeu_epi16(p.add(j) as *mut _, m, core::mem::transmute::<__m512bh, __m512i>(bf));
        }
        1.0 / _mm512_reduce_add_ps(sum)
    }
}

/// [`attention_qkv_bf16`] on any CPU: the same roundings, f32 sums in plain loops.
pub fn attention_qkv_bf16_portable(
    qkv: &Bf16Rows,
    frames: usize,
    heads: usize,
    hd: usize,
    key_valid: Option<&[bool]>,
    scale: f32,
    out: &mut Bf16Rows,
) {
    let s = check(qkv, frames, heads, hd, key_valid, out);
    let d = heads * hd;
    let x = qkv.to_f32(); // [F * S, 3D], exact
    let kb = key_bias(key_valid);
    let mut res = vec![0f32; qkv.n() * d]; // [F * S, D]
    res.par_chunks_mut(s * d).enumerate().for_each(|(f, o)| {
        let at = |j: usize, part: usize, h: usize| &x[(f * s + j) * 3 * d + part * d + h * hd..][..hd];
        let mut e = vec![0f32; s];
        for h in 0..heads {
            for i in 0..s {
                let q = at(i, 0, h);
                let mut max = f32::NEG_INFINITY;
                for (j, ej) in e.iter_mut().enumerate() {
                    let dot: f32 = q.iter().zip(at(j, 1, h)).map(|(a, b)| a * b).sum();
                    *ej = dot * scale + kb.as_ref().map_or(0.0, |b| b[f * s + j]);
                    max = max.max(*ej);
                }
                let inv = if let Some(u) = fully_masked_weight(max, s) {
                    e.iter_mut().for_each(|v| *v = 1.0);
                    u
                } else {
                    e.iter_mut().for_each(|v| *v = exp_f32(*v - max));
                    let inv = 1.0 / e.iter().sum::<f32>();
                    e.iter_mut().for_each(|v| *v = f32::from_bits((f32_to_bf16_bits(*v) as u32) << 16));
                    inv
                };
                let orow = &mut o[i * d + h * hd..][..hd];
                for (j, &ej) in e.iter().enumerate() {
                    orow.iter_mut().zip(at(j, 2, h)).for_each(|(o, v)| *o += ej * v);
                }
                orow.iter_mut().for_each(|o| *o *= inv);
            }
        }
    });
    *out = Bf16Rows::from_f32(&res, qkv.n(), d);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::matmul_bf16_packed::tests::rng_vec;

    /// f64 softmax attention on the bf16-rounded q, k, v (probabilities not rounded).
    fn reference(
        x: &[f32],
        frames: usize,
        s: usize,
        heads: usize,
        hd: usize,
        key_valid: Option<&[bool]>,
        scale: f64,
    ) -> Vec<f64> {
        let d = heads * hd;
        let mut out = vec![0f64; frames * s * d];
        for f in 0..frames {
            for h in 0..heads {
                let at = |j: usize, part: usize, c: usize| x[(f * s + j) * 3 * d + part * d + h * hd + c] as f64;
                for i in 0..s {
                    let ok = |j: usize| key_valid.is_none_or(|m| m[f * s + j]);
                    let any = (0..s).any(ok);
                    let sc: Vec<f64> =
                        (0..s).map(|j| (0..hd).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f64>() * scale).collect();
                    let max = (0..s).filter(|&j| ok(j)).map(|j| sc[j]).fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = (0..s)
                        .map(|j| {
                            if !any {
                                1.0
                            } else if ok(j) {
                                (sc[j] - max).exp()
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        out[(f * s + i) * d + h * hd + c] = (0..s).map(|j| e[j] * at(j, 2, c)).sum::<f64>() / z;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_bf16_matches_f64_reference() {
        // (frames, S, heads, hd, mask): odd S, S across NR / QB / QCHUNK, hd below NR, hidden keys,
        // a frame with every key hidden.
        for (ci, &(frames, s, heads, hd, masked)) in [
            (1usize, 7usize, 1usize, 64usize, false),
            (2, 77, 3, 32, true),
            (2, 300, 2, 64, true),
            (1, 129, 2, 80, false),
        ]
        .iter()
        .enumerate()
        {
            let d = heads * hd;
            let x: Vec<f32> = rng_vec(frames * s * 3 * d, 40 + ci as u64).into_iter().map(|v| v * 2.0).collect();
            let qkv = Bf16Rows::from_f32(&x, frames * s, 3 * d);
            let xr = qkv.to_f32();
            let mut kv: Vec<bool> = (0..frames * s).map(|i| i % 5 != 2).collect();
            if frames > 1 {
                kv[s..].iter_mut().for_each(|v| *v = false);
            }
            let key_valid = masked.then_some(&kv[..]);
            let scale = (hd as f32).powf(-0.5);
            let want = reference(&xr, frames, s, heads, hd, key_valid, scale as f64);
            let mut fast = Bf16Rows::zeros(frames * s, d);
            attention_qkv_bf16(&qkv, frames, heads, hd, key_valid, scale, &mut fast);
            let mut port = Bf16Rows::zeros(frames * s, d);
            attention_qkv_bf16_portable(&qkv, frames, heads, hd, key_valid, scale, &mut port);
            for (name, got) in [("fast", fast.to_f32()), ("portable", port.to_f32())] {
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    // p rounded to bf16 (2^-9 relative) times |v| <= 2, plus the output's own rounding
                    assert!((g as f64 - w).abs() <= 8e-3 + 8e-3 * w.abs(), "case {ci} {name}: out[{i}] {g} vs {w}");
                }
            }
            for (i, (u, v)) in fast.to_f32().iter().zip(port.to_f32()).enumerate() {
                assert!((u - v).abs() <= 8e-3 + 8e-3 * v.abs(), "case {ci}: fast {u} vs portable {v} at {i}");
            }
        }
    }
}
