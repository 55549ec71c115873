//! f32 attention straight from a fused q | k | v projection (inference, no autograd), for the
//! vision tower's fused f32 layers (`model::vision_fast_f32`).
//!
//! qkv: rows `[F * S, 3 * H * hd]` (frame f's S tokens, then q | k | v, head h at columns `h * hd` of
//! each part); out: rows `[F * S, H * hd]` in the layout out_proj reads, so no head transposes. Per
//! (frame, head, block of queries) task:
//!   scores = scale q k^T     [QB, S]   gemm reading q and k in place (row stride 3 H hd)
//!   p = softmax(scores) over the keys `key_valid` leaves visible
//!   out[rows, head] = p v    [QB, hd]  gemm reading v in place, writing the head's columns
//! The same arithmetic as [`super::attention::attention`] on the transposed heads, up to the order of
//! float sums (tested against it below).

use rayon::prelude::*;

use super::attention::fully_masked_weight;
use super::attention_f32::{exp_normalize, softmax_row_masked};
use super::cpu::{gemm_into, gemm_scaled_into, Mat, SendPtr};
use super::math::max_f32;

/// Query rows per task: a [QB, S] score block (512 KB at S = 1024) stays in L2; 128 rows pack each
/// head's keys for the scores gemm half as often as 64 (about 15% faster on an AMD EPYC, AVX2).
const QB: usize = 128;

/// See the module doc. `key_valid` [F * S] hides keys (false) of each frame; `scale` multiplies the
/// scores. Panics when the buffers do not have the stated sizes (a caller bug).
pub fn attention_qkv_f32(
    qkv: &[f32],
    frames: usize,
    heads: usize,
    hd: usize,
    key_valid: Option<&[bool]>,
    scale: f32,
    out: &mut [f32],
) {
    let d = heads * hd;
    let n = out.len() / d.max(1);
    assert!(
        frames > 0 && n.is_multiple_of(frames) && qkv.len() == 3 * n * d && out.len() == n * d,
        "attention_qkv_f32: qkv {}, out {}, {frames} frames, {heads} heads x {hd}",
        qkv.len(),
        out.len()
    );
    assert!(key_valid.is_none_or(|kv| kv.len() == n), "attention_qkv_f32: key_valid of the wrong length");
    let s = n / frames;
    let blocks = s.div_ceil(QB);
    let dst = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    (0..frames * heads * blocks).into_par_iter().for_each_init(
        || vec![0f32; QB * s],
        |scores, t| {
            let (f, h, blk) = (t / (heads * blocks), (t / blocks) % heads, t % blocks);
            let (i0, rows) = (blk * QB, QB.min(s - blk * QB));
            let base = f * s * 3 * d; // frame f's first qkv row
            let q = &qkv[base + i0 * 3 * d + h * hd..];
            let k = &qkv[base + d + h * hd..];
            let v = &qkv[base + 2 * d + h * hd..];
            let sc = &mut scores[..rows * s];
            let none = gemm::Parallelism::None;
            // the scale folded into the product (gemm's alpha: the same single rounding as a separate pass)
            gemm_scaled_into(sc, s, (rows, s, hd), Mat::rows(q, 3 * d), Mat::transposed(k, 3 * d), false, scale, none);
            let kv = key_valid.map(|kv| &kv[f * s..(f + 1) * s]);
            for row in sc.chunks_exact_mut(s) {
                match kv {
                    None => {
                        let max = max_f32(row);
                        match fully_masked_weight(max, s) {
                            Some(u) => row.fill(u),
                            None => exp_normalize(row, max),
                        }
                    }
                    Some(kv) => softmax_row_masked(row, |j| kv[j]),
                }
            }
            // SAFETY: task (f, h, blk) writes only rows f*s+i0.. f*s+i0+rows, columns h*hd..(h+1)*hd of
            // `out`, disjoint from every other task's; `out` outlives the parallel loop.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.get(), out_len) };
            let o = &mut o[(f * s + i0) * d + h * hd..];
            gemm_into(o, d, (rows, hd, s), Mat::rows(sc, s), Mat::rows(v, 3 * d), false, none);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::attention;
    use crate::ops::Mask;
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    #[test]
    fn matches_attention_on_transposed_heads() {
        let (f, s, heads, hd) = (2, 70, 3, 8);
        let d = heads * hd;
        let qkv = Tensor::randn(0f32, 1.0, (f, s, 3 * d), &Device::Cpu).unwrap();
        let split = |i: usize| {
            qkv.narrow(2, i * d, d).unwrap().reshape((f, s, heads, hd)).unwrap().transpose(1, 2).unwrap().contiguous()
        };
        let (q, k, v) = (split(0).unwrap(), split(1).unwrap(), split(2).unwrap());
        let flat: Vec<f32> = qkv.flatten_all().unwrap().to_vec1().unwrap();
        let kv: Vec<bool> = (0..f * s).map(|i| i % 5 != 2).collect();
        for key_valid in [None, Some(kv)] {
            let mask = Mask { causal: false, key_valid: key_valid.clone().map(Arc::new) };
            let want = attention(&q, &k, &v, &mask, 0.3).unwrap().transpose(1, 2).unwrap(); // [F, S, H, hd]
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let mut got = vec![f32::NAN; f * s * d];
            attention_qkv_f32(&flat, f, heads, hd, key_valid.as_deref(), 0.3, &mut got);
            let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "max abs diff {err}");
        }
    }
}
