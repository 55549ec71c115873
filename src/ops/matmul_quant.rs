//! y = x W^T (+ b) for a quantized weight W (`crate::quant::QuantWeight`), and its backward to x.
//!
//! Reference: dequantize W whole, then a plain matmul ([`reference`]; tests only). The kernels here
//! never build that copy: they decode W a tile of output rows at a time into a per-thread buffer
//! (`TILE_ROWS x in` f32, in L2) and multiply it there:
//! * many rows (prefill, training): each parallel task decodes one tile and runs gemm on it into the
//!   tile's columns of y; in bf16 compute on a CPU with AVX512-BF16 the tiles are packed for
//!   `matmul_bf16_packed`'s kernel instead;
//! * few rows (decoding): each task decodes one weight row at a time and takes its dot products with
//!   every x row, so the weight is read once, as packed bytes.
//! * backward: dx [N, in] = g [N, out] W [out, in], tile by tile, the tiles' products summed into dx.
//!
//! bf16 compute (`bnb_4bit_compute_dtype=bfloat16`), as bitsandbytes' Linear4bit: x, the decoded
//! weight and the bias are rounded to bf16, multiplied with f32 accumulation (bf16 x bf16 products are
//! exact in f32) and the output rounded to bf16; backward: the output gradient is rounded to bf16,
//! multiplied by the bf16 weight, and dx rounded to bf16. Activations stay f32 between layers.
//!
//! GGUF weights (`QuantWeight::Ggml`) take `matmul_ggml`'s kernels: its few-rows product for
//! decoding, its vectorised tile decoding for the tile kernels and the backward.
//!
//! The frozen quantized weight never gets a gradient: [`QuantLinearOp`] is an op of x alone.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bf16::round_to_bf16;
use super::cpu::{f32_arg, parallelism, with_f32, SendPtr};
use crate::quant::QuantWeight;

/// Output rows of W decoded per tile in the many-rows kernels.
const TILE_ROWS: usize = 128;
/// Output rows of W per tile packed for the AVX512-BF16 kernel (bf16 compute, many rows).
const BF16_TILE_ROWS: usize = 256;
/// From this many rows of x on, packing W's tiles for the AVX512-BF16 kernel pays (measured with
/// examples/bench_quant.rs: 2.4x slower at 64 rows, 1.2-1.9x faster at 1024).
const BF16_PACKED_MIN_ROWS: usize = 256;
/// Up to this many rows of x, the row-at-a-time kernel (decoding) runs.
pub const FEW_ROWS: usize = 16;

thread_local! {
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    TILE.with(|cell| {
        let mut t = cell.borrow_mut();
        if t.len() < len {
            t.resize(len, 0.0);
        }
        f(&mut t[..len])
    })
}

/// Decodes rows r0..r0+rows of w into dst, rounded to bf16 when `bf16`.
fn decode(w: &QuantWeight, r0: usize, rows: usize, dst: &mut [f32], bf16: bool) {
    if let QuantWeight::Ggml(g) = w {
        super::matmul_ggml::decode_rows(g, r0, rows, dst);
        if bf16 {
            dst[..rows * g.shape.1].iter_mut().for_each(|v| *v = round_to_bf16(*v));
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let QuantWeight::FourBit(q) = w {
        if q.blocksize == 64 && q.shape.1 % 64 == 0 && super::simd::avx512() {
            // SAFETY: avx512f checked; rows of whole 64-value blocks.
            unsafe { decode_4bit_avx512(q, r0, rows, dst) };
            if bf16 {
                dst[..rows * q.shape.1].iter_mut().for_each(|v| *v = round_to_bf16(*v));
            }
            return;
        }
    }
    w.decode_rows(r0, rows, dst);
    if bf16 {
        dst.iter_mut().for_each(|v| *v = round_to_bf16(*v));
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// y [n, out] = x [n, k] W^T (+ bias).
pub fn forward(x: &[f32], n: usize, w: &QuantWeight, bias: Option<&[f32]>, bf16: bool) -> Vec<f32> {
    let (out, k) = w.shape();
    debug_assert!(x.len() == n * k && bias.is_none_or(|b| b.len() == out));
    let xr: Option<Vec<f32>> = bf16.then(|| x.iter().map(|&v| round_to_bf16(v)).collect());
    let x = xr.as_deref().unwrap_or(x);
    let mut y = vec![0f32; n * out]; // [n, out]
    if n == 0 || out == 0 {
        return y;
    }
    if let Some(b) = bias {
        y.chunks_mut(out)
            .for_each(|r| r.iter_mut().zip(b).for_each(|(y, &b)| *y = if bf16 { round_to_bf16(b) } else { b }));
    }
    if let QuantWeight::Ggml(g) = w {
        // GGUF blocks, f32 compute: read straight from the blocks (decoding)
        if n <= FEW_ROWS && !bf16 && super::matmul_ggml::few_rows(x, n, g, &mut y) {
            return y;
        }
    }
    let yp = SendPtr(y.as_mut_ptr());
    if n <= FEW_ROWS {
        if let QuantWeight::FourBit(q) = w {
            #[cfg(target_arch = "x86_64")]
            if q.blocksize == 64 && k % 64 == 0 && super::simd::avx512() {
                // SAFETY: avx512f checked; shapes as the kernel requires (k a multiple of the 64-value blocks).
                unsafe { few_rows_4bit_avx512(x, n, q, bf16, &mut y) };
                if bf16 {
                    y.iter_mut().for_each(|v| *v = round_to_bf16(*v));
                }
                return y;
            }
            if !bf16 && k % q.blocksize == 0 && q.blocksize % 2 == 0 && q.blocksize <= 256 {
                few_rows_4bit(x, n, q, &mut y);
                return y;
            }
        }
    }
    if n <= FEW_ROWS {
        // Decoding: one weight row at a time, dotted with every x row.
        const ROWS_PER_TASK: usize = 32;
        (0..out.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(move |t| {
            let yp = yp;
            with_tile(k, |row| {
                for o in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(out) {
                    decode(w, o, 1, row, bf16);
                    for r in 0..n {
                        // SAFETY: y[r, o] is written by this task only (it owns rows o of W).
                        unsafe { *yp.0.add(r * out + o) += dot(&x[r * k..(r + 1) * k], row) };
                    }
                }
            })
        });
    } else if bf16 && n >= BF16_PACKED_MIN_ROWS && super::matmul_bf16_packed::available() {
        // bf16 compute on a CPU with AVX512-BF16: each tile of W, decoded and rounded to bf16, is packed
        // for the bf16 dot-product kernel (x rounded to bf16, f32 accumulation), one tile at a time (the
        // kernel runs in parallel itself).
        let rows = BF16_TILE_ROWS.min(out);
        let mut tile = vec![0f32; rows * k]; // [rows, k]
        let mut tb = vec![half::bf16::ZERO; rows * k];
        let mut o0 = 0;
        while o0 < out {
            let ob = rows.min(out - o0);
            tile[..ob * k]
                .par_chunks_mut(k * 8)
                .enumerate()
                .for_each(|(i, d)| decode(w, o0 + i * 8, d.len() / k, d, true));
            tb[..ob * k].par_iter_mut().zip(tile[..ob * k].par_iter()).for_each(|(b, &v)| *b = half::bf16::from_f32(v)); // exact
            let packed = super::matmul_bf16_packed::pack(&tb[..ob * k], ob, k);
            let part = super::matmul_bf16_packed::matmul_packed(x, n, k, &packed); // [n, ob]
            y.par_chunks_mut(out)
                .zip(part.par_chunks(ob))
                .for_each(|(yr, pr)| yr[o0..o0 + ob].iter_mut().zip(pr).for_each(|(y, p)| *y += p));
            o0 += ob;
        }
    } else {
        (0..out.div_ceil(TILE_ROWS)).into_par_iter().for_each(move |t| {
            let yp = yp;
            let o0 = t * TILE_ROWS;
            let ob = TILE_ROWS.min(out - o0);
            with_tile(ob * k, |tile| {
                decode(w, o0, ob, tile, bf16);
                // SAFETY: the destination is the column block y[:, o0..o0+ob] (row stride out), written
                // by this task only; x is [n, k] row-major; the tile [ob, k] is read as its transpose.
                unsafe {
                    gemm::gemm(
                        n,
                        ob,
                        k,
                        yp.0.add(o0),
                        1,
                        out as isize,
                        bias.is_some(),
                        x.as_ptr(),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        k as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            })
        });
    }
    if bf16 {
        y.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|v| *v = round_to_bf16(*v)));
    }
    y
}

/// Rows r0..r0+rows of a 4-bit weight (rows of whole 64-value blocks) dequantized into dst with
/// AVX-512: per block the table scaled by its absmax (`table * s`: the dequantized values exactly),
/// `vpermps` lookups of the 64 codes, and the high / low nibble halves interleaved back in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_4bit_avx512(q: &crate::quant::FourBit, r0: usize, rows: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = q.shape.1;
    let tab = _mm512_loadu_ps(q.ty.table().as_ptr());
    // result[2i] = a[i], result[2i + 1] = b[i]: lanes 0..7 of a and b, then lanes 8..15
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let e0 = r0 * k;
    let blocks = rows * k / 64;
    assert!(dst.len() >= rows * k);
    for bi in 0..blocks {
        let e = e0 + bi * 64;
        let st = _mm512_mul_ps(tab, _mm512_set1_ps(q.scales[e / 64]));
        let bp = q.packed.as_ptr().add(e / 2);
        let c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(bp as *const __m128i));
        let c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(bp.add(16) as *const __m128i));
        let (h0, h1) =
            (_mm512_permutexvar_ps(_mm512_srli_epi32(c0, 4), st), _mm512_permutexvar_ps(_mm512_srli_epi32(c1, 4), st));
        let (l0, l1) = (_mm512_permutexvar_ps(c0, st), _mm512_permutexvar_ps(c1, st));
        let d = dst.as_mut_ptr().add(bi * 64);
        _mm512_storeu_ps(d, _mm512_permutex2var_ps(h0, lo, l0));
        _mm512_storeu_ps(d.add(16), _mm512_permutex2var_ps(h0, hi, l0));
        _mm512_storeu_ps(d.add(32), _mm512_permutex2var_ps(h1, lo, l1));
        _mm512_storeu_ps(d.add(48), _mm512_permutex2var_ps(h1, hi, l1));
    }
}

/// Decoding with a 4-bit weight (AVX-512): per block of 64, the table scaled by the block's absmax
/// (`table * s`, rounded to bf16 in bf16 compute: exactly the dequantized values) stays in one
/// register and `vpermps` looks the 64 codes up, 16 at a time, straight from the packed bytes; x is
/// reordered once per call so that the even positions (high nibbles) and the odd ones (low nibbles)
/// are contiguous. Reads half a byte per weight. y [n, out] holds the bias already (rounded to bf16
/// in bf16 compute); it is rounded after by the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn few_rows_4bit_avx512(x: &[f32], n: usize, q: &crate::quant::FourBit, bf16: bool, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let (out, k) = q.shape;
    // x per block of 64: [x0 x2 .. x30 | x32 .. x62 | x1 x3 .. x31 | x33 .. x63], rounded to bf16 in bf16 compute
    let mut xp = vec![0f32; n * k];
    for (src, dst) in x.chunks_exact(64).zip(xp.chunks_exact_mut(64)) {
        for j in 0..32 {
            let (e, o) = (src[2 * j], src[2 * j + 1]);
            let (e, o) = if bf16 { (round_to_bf16(e), round_to_bf16(o)) } else { (e, o) };
            dst[j] = e; // byte j's high nibble
            dst[32 + j] = o; // its low nibble
        }
    }
    let table = q.ty.table();
    let yp = SendPtr(y.as_mut_ptr());
    let xp = &xp;
    const ROWS_PER_TASK: usize = 32;
    (0..out.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(move |t| {
        let yp = yp;
        // SAFETY: avx512f is available (checked by the caller); every load is inside packed, scales and xp.
        unsafe {
            let tab = _mm512_loadu_ps(table.as_ptr());
            let round_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
            for o in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(out) {
                let e0 = o * k;
                // the 64 table values of block bi (dequantized), as (even, even, odd, odd) positions
                let block = |bi: usize| {
                    let mut st = _mm512_mul_ps(tab, _mm512_set1_ps(*q.scales.get_unchecked(e0 / 64 + bi)));
                    if bf16 {
                        // round to nearest even at bit 16: bits + 0x7fff + ((bits >> 16) & 1), low half cleared
                        let b = _mm512_castps_si512(st);
                        let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
                        let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
                        st = _mm512_castsi512_ps(_mm512_and_si512(r, round_mask));
                    }
                    let bp = q.packed.as_ptr().add((e0 + bi * 64) / 2);
                    let c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(bp as *const __m128i)); // bytes 0..15
                    let c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(bp.add(16) as *const __m128i)); // bytes 16..31
                    [
                        _mm512_permutexvar_ps(_mm512_srli_epi32(c0, 4), st), // elements 0, 2, .., 30
                        _mm512_permutexvar_ps(_mm512_srli_epi32(c1, 4), st), // 32, .., 62
                        _mm512_permutexvar_ps(c0, st), // 1, 3, .., 31 (vpermps reads the low 4 bits)
                        _mm512_permutexvar_ps(c1, st), // 33, .., 63
                    ]
                };
                if n == 1 {
                    // decoding one token: four register accumulators, no FMA latency chain
                    let (mut a0, mut a1, mut a2, mut a3) =
                        (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
                    for bi in 0..k / 64 {
                        let v = block(bi);
                        let xb = xp.as_ptr().add(bi * 64);
                        a0 = _mm512_fmadd_ps(v[0], _mm512_loadu_ps(xb), a0);
                        a1 = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(xb.add(16)), a1);
                        a2 = _mm512_fmadd_ps(v[2], _mm512_loadu_ps(xb.add(32)), a2);
                        a3 = _mm512_fmadd_ps(v[3], _mm512_loadu_ps(xb.add(48)), a3);
                    }
                    // SAFETY: y[0, o] is written by this task only (it owns rows o of W).
                    *yp.0.add(o) += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
                    continue;
                }
                let mut acc = [_mm512_setzero_ps(); FEW_ROWS];
                for bi in 0..k / 64 {
                    let v = block(bi);
                    for (r, a) in acc[..n].iter_mut().enumerate() {
                        let xb = xp.as_ptr().add(r * k + bi * 64);
                        *a = _mm512_fmadd_ps(v[0], _mm512_loadu_ps(xb), *a);
                        *a = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(xb.add(16)), *a);
                        *a = _mm512_fmadd_ps(v[2], _mm512_loadu_ps(xb.add(32)), *a);
                        *a = _mm512_fmadd_ps(v[3], _mm512_loadu_ps(xb.add(48)), *a);
                    }
                }
                for (r, a) in acc[..n].iter().enumerate() {
                    // SAFETY: y[r, o] is written by this task only (it owns rows o of W).
                    *yp.0.add(r * out + o) += _mm512_reduce_add_ps(*a);
                }
            }
        }
    });
}

/// Decoding with a 4-bit weight whose rows are whole blocks: per block, its 64 codes are looked up
/// two at a time (one byte, [`four_bit::pair_table`]) into the table values, dotted with each x row,
/// and the sum scaled once by the block's absmax: y += s_b * sum_j table[q_j] x_j. Reads the packed
/// bytes only (half a byte per weight). y [n, out] holds the bias already.
fn few_rows_4bit(x: &[f32], n: usize, q: &crate::quant::FourBit, y: &mut [f32]) {
    let (out, k) = q.shape;
    let bs = q.blocksize;
    let lut = crate::quant::four_bit::pair_table(q.ty);
    let yp = SendPtr(y.as_mut_ptr());
    const ROWS_PER_TASK: usize = 16;
    (0..out.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(move |t| {
        let yp = yp;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports avx2 and fma (checked above).
            unsafe {
                few_rows_4bit_task_avx2(
                    x,
                    n,
                    q,
                    lut,
                    t * ROWS_PER_TASK,
                    ((t + 1) * ROWS_PER_TASK).min(out),
                    k,
                    bs,
                    out,
                    yp,
                )
            };
            return;
        }
        few_rows_4bit_task(x, n, q, lut, t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(out), k, bs, out, yp);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows_4bit_task_avx2(
    x: &[f32],
    n: usize,
    q: &crate::quant::FourBit,
    lut: &[[f32; 2]; 256],
    o0: usize,
    o1: usize,
    k: usize,
    bs: usize,
    out: usize,
    yp: SendPtr<f32>,
) {
    few_rows_4bit_task(x, n, q, lut, o0, o1, k, bs, out, yp)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn few_rows_4bit_task(
    x: &[f32],
    n: usize,
    q: &crate::quant::FourBit,
    lut: &[[f32; 2]; 256],
    o0: usize,
    o1: usize,
    k: usize,
    bs: usize,
    out: usize,
    yp: SendPtr<f32>,
) {
    let mut vals = [0f32; 256]; // one block's table values (bs <= 256 on this path)
    let mut acc = [0f32; FEW_ROWS];
    for o in o0..o1 {
        acc[..n].iter_mut().for_each(|a| *a = 0.0);
        let e0 = o * k;
        for (bi, kk) in (0..k).step_by(bs).enumerate() {
            let bytes = &q.packed[(e0 + kk) / 2..(e0 + kk + bs) / 2];
            let v = &mut vals[..bs];
            for (pair, &b) in v.chunks_exact_mut(2).zip(bytes) {
                pair.copy_from_slice(&lut[b as usize]);
            }
            let s = q.scales[e0 / bs + bi];
            for (r, a) in acc[..n].iter_mut().enumerate() {
                *a += s * dot(&x[r * k + kk..r * k + kk + bs], v);
            }
        }
        for (r, a) in acc[..n].iter().enumerate() {
            // SAFETY: y[r, o] is written by this task only (it owns rows o0..o1 of W).
            unsafe { *yp.0.add(r * out + o) += a };
        }
    }
}

/// dx [n, k] = g [n, out] W [out, k] (the gradient of x W^T with respect to x).
pub fn backward_input(g: &[f32], n: usize, w: &QuantWeight, bf16: bool) -> Vec<f32> {
    let (out, k) = w.shape();
    debug_assert_eq!(g.len(), n * out);
    let mut dx = vec![0f32; n * k]; // [n, k]
    if n == 0 || k == 0 {
        return dx;
    }
    let gr: Option<Vec<f32>> = bf16.then(|| g.iter().map(|&v| round_to_bf16(v)).collect());
    let g = gr.as_deref().unwrap_or(g);
    let rows = TILE_ROWS.max((1 << 20) / k.max(1)).min(out.max(1));
    let mut tile = vec![0f32; rows * k]; // [rows, k]
    let mut o0 = 0;
    while o0 < out {
        let ob = rows.min(out - o0);
        tile[..ob * k].par_chunks_mut(k * 8).enumerate().for_each(|(i, d)| {
            let r = d.len() / k;
            decode(w, o0 + i * 8, r, d, bf16);
        });
        // SAFETY: dx [n, k]; lhs is the column block g[:, o0..o0+ob] (row stride out); rhs is the
        // tile [ob, k] row-major.
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
                tile.as_ptr(),
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
    if bf16 {
        dx.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|v| *v = round_to_bf16(*v)));
    }
    dx
}

/// The reference composition: W dequantized whole, then candle's matmul; with `bf16`, x, W, the bias
/// and the output pass through bf16 casts (whose backward rounds the gradients as bitsandbytes'
/// bf16 autograd does). Autograd through it gives dx. x: [n, k] f32 -> [n, out]. What runs off the CPU
/// kernels (a GPU, or `ops::reference_ops`): W is dequantized on the host and copied to x's device per call.
pub fn reference(x: &Tensor, w: &QuantWeight, bias: Option<&Tensor>, bf16: bool) -> Result<Tensor> {
    let (out, k) = w.shape();
    let mut wd = w.dequantize();
    let mut x = x.clone();
    if bf16 {
        wd.iter_mut().for_each(|v| *v = round_to_bf16(*v));
        x = x.to_dtype(candle_core::DType::BF16)?.to_dtype(candle_core::DType::F32)?;
    }
    let wt = Tensor::from_vec(wd, (out, k), x.device())?; // [out, k]
    let y = x.matmul(&wt.t()?)?; // [n, out]
    let y = match bias {
        Some(b) if bf16 => {
            y.broadcast_add(&b.to_dtype(candle_core::DType::BF16)?.to_dtype(candle_core::DType::F32)?)?
        }
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    if bf16 {
        y.to_dtype(candle_core::DType::BF16)?.to_dtype(candle_core::DType::F32)
    } else {
        Ok(y)
    }
}

/// y = x W^T (+ b) on x alone: W and b are frozen constants of the op. Backward: dx only.
pub struct QuantLinearOp {
    pub weight: Arc<QuantWeight>,
    /// [out]
    pub bias: Option<Vec<f32>>,
    pub bf16: bool,
}

impl CustomOp1 for QuantLinearOp {
    fn name(&self) -> &'static str {
        "quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(s, l, "quant-linear")?; // [N, in]
        let (n, k) = l.shape().dims2()?;
        let (out, kw) = self.weight.shape();
        if k != kw {
            candle_core::bail!("quant-linear: x {:?} does not match the weight [{out}, {kw}]", l.shape());
        }
        Ok((CpuStorage::F32(forward(x, n, &self.weight, self.bias.as_deref(), self.bf16)), Shape::from((n, out))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = x.dims2()?;
        let dx = with_f32(&g.contiguous()?, |g| backward_input(g, n, &self.weight, self.bf16))?;
        Ok(Some(Tensor::from_vec(dx, (n, k), x.device())?))
    }
}

/// x [N, in] f32 CPU -> [N, out] through [`QuantLinearOp`] (tracked or not).
pub fn quant_linear(x: &Tensor, w: &Arc<QuantWeight>, bias: Option<&Tensor>, bf16: bool) -> Result<Tensor> {
    let bias = bias.map(|b| b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()).transpose()?;
    x.contiguous()?.apply_op1(QuantLinearOp { weight: w.clone(), bias, bf16 })
}
