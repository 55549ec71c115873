//! GGML quantizers (what the GGUF export writes), byte for byte with the reference implementations:
//! - F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 as gguf-py's `gguf.quants.quantize` (numpy; for the
//!   32-value types also ggml's `quantize_row_*_ref`, which gives the same bytes);
//! - Q4_K, Q5_K, Q6_K as ggml's `quantize_row_q{4,5,6}_K_ref` (what `llama-quantize` writes without
//!   an importance matrix; gguf-py has no K-quantizer).
//!
//! Float operations are the references' own, one IEEE operation at a time in their order (Rust never
//! fuses a multiply-add): e.g. Q8_0 `q = round(x * (1 / (amax / 127)))` with halves away from zero,
//! Q4_0 `d = max / -8` (max: the value of largest magnitude, sign kept), `q = trunc(x / d + 8.5)`;
//! scales are stored as f16, rounded to nearest even. Tests: tests/ggml_quantize.rs against
//! tests/fixtures/gguf_quant (scripts/reference/gguf_quantize.py).

use super::ggml::{scale_min_k4, GgmlError, GgmlType, QK_K};

/// Quantizes one row `src` into `dst` (exactly `ty.row_bytes(src.len())` bytes).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), GgmlError> {
    let want = ty.row_bytes(src.len()).ok_or(GgmlError::RowLength { ty, n: src.len() })?;
    if dst.len() != want {
        return Err(GgmlError::DataSize { ty, expected: want, found: dst.len() });
    }
    let (bs, ts) = (ty.block_size(), ty.type_size());
    for (x, b) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(ts)) {
        match ty {
            GgmlType::F32 => b.copy_from_slice(&x[0].to_le_bytes()),
            GgmlType::F16 => b.copy_from_slice(&f16_bits_numpy(x[0]).to_le_bytes()),
            GgmlType::Bf16 => b.copy_from_slice(&bf16_bits(x[0]).to_le_bytes()),
            GgmlType::Q8_0 => q8_0(x, b),
            GgmlType::Q4_0 => q4_0(x, b),
            GgmlType::Q4_1 => q4_1(x, b),
            GgmlType::Q5_0 => q5_0(x, b),
            GgmlType::Q5_1 => q5_1(x, b),
            GgmlType::Q4K => q4_k(x, b, false),
            GgmlType::Q5K => q4_k(x, b, true),
            GgmlType::Q6K => q6_k(x, b),
        }
    }
    Ok(())
}

/// A whole [rows, cols] row-major matrix, rows quantized in parallel: rows * `ty.row_bytes(cols)` bytes.
pub fn quantize(ty: GgmlType, src: &[f32], cols: usize) -> Result<Vec<u8>, GgmlError> {
    use rayon::prelude::*;
    let rb = ty.row_bytes(cols).ok_or(GgmlError::RowLength { ty, n: cols })?;
    if cols == 0 || !src.len().is_multiple_of(cols) {
        return Err(GgmlError::RowLength { ty, n: cols });
    }
    let mut out = vec![0u8; src.len() / cols * rb];
    out.par_chunks_mut(rb).zip(src.par_chunks(cols)).try_for_each(|(d, s)| quantize_row(ty, s, d))?;
    Ok(out)
}

/// f32 -> f16 bits as numpy's `astype(np.float16)`: round to nearest even, overflow to infinity, and
/// NaN kept with the top 10 bits of its payload (a payload that would vanish becomes 1).
pub fn f16_bits_numpy(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        let sign = ((b >> 16) & 0x8000) as u16;
        let mut r = 0x7c00u16 + ((b & 0x007f_ffff) >> 13) as u16;
        if r == 0x7c00 {
            r += 1;
        }
        return sign | r;
    }
    half::f16::from_f32(x).to_bits()
}

/// f32 -> bf16 bits as ggml (`ggml_compute_fp32_to_bf16`) and gguf-py: NaN forced quiet (bit 22 set,
/// the low half dropped), otherwise round to nearest even.
pub fn bf16_bits(x: f32) -> u16 {
    let mut n = x.to_bits() as u64;
    if (n & 0x7fff_ffff) > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((n + (0x7fff + ((n >> 16) & 1))) >> 16) as u16
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The value of largest magnitude (the first one on ties), sign kept.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((x[0], x[0]), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn inv(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

// Q8_0 (34 B): d = amax / 127 (f16), q = round(x / d) as i8, halves away from zero.
fn q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inv(d);
    put_f16(b, 0, d);
    for (o, &v) in b[2..34].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// Packs 32 values of 0..15 (their low nibbles): value j < 16 in the low nibble of byte j, j + 16 high.
fn pack_nibbles(q: &[u8; 32], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = (q[j] & 0xF) | (q[j + 16] << 4);
    }
}

/// The 5th bits of 32 values as Q5's little-endian u32 `qh`.
fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

/// Symmetric 32-value block: d = max / -half, q = min(trunc(x / d + half + 0.5), 2 half - 1).
fn symmetric(x: &[f32], half: f32, top: u8) -> (f32, [u8; 32]) {
    let d = signed_absmax(x) / -half;
    let id = inv(d);
    let mut q = [0u8; 32];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = ((v * id + (half + 0.5)).trunc() as u8).min(top);
    }
    (d, q)
}

/// 32-value block with a minimum: d = (max - min) / top, q = min(trunc((x - min) / d + 0.5), top).
fn with_min(x: &[f32], top: u8) -> (f32, f32, [u8; 32]) {
    let (min, max) = min_max(x);
    let d = (max - min) / top as f32;
    let id = inv(d);
    let mut q = [0u8; 32];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (((v - min) * id + 0.5).trunc() as u8).min(top);
    }
    (d, min, q)
}

// Q4_0 (18 B): d, nibbles.
fn q4_0(x: &[f32], b: &mut [u8]) {
    let (d, q) = symmetric(x, 8.0, 15);
    put_f16(b, 0, d);
    pack_nibbles(&q, &mut b[2..18]);
}

// Q4_1 (20 B): d, m, nibbles.
fn q4_1(x: &[f32], b: &mut [u8]) {
    let (d, m, q) = with_min(x, 15);
    put_f16(b, 0, d);
    put_f16(b, 2, m);
    pack_nibbles(&q, &mut b[4..20]);
}

// Q5_0 (22 B): d, qh, nibbles.
fn q5_0(x: &[f32], b: &mut [u8]) {
    let (d, q) = symmetric(x, 16.0, 31);
    put_f16(b, 0, d);
    b[2..6].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut b[6..22]);
}

// Q5_1 (24 B): d, m, qh, nibbles.
fn q5_1(x: &[f32], b: &mut [u8]) {
    let (d, m, q) = with_min(x, 31);
    put_f16(b, 0, d);
    put_f16(b, 2, m);
    b[4..8].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut b[8..24]);
}

/// ggml's `nearest_int`: round to nearest even through the float adder (|x| < 2^22; larger values
/// give what ggml's bit trick gives).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants`: a scale and a minimum for `x` with levels 0..=nmax minimizing the
/// weighted squared error, searching `nstep + 1` candidate scales around (nmax + rmin + rdelta i) /
/// (max - min). Writes the levels into `l`; returns (scale, -min).
fn make_qkx2_quants(nmax: i32, x: &[f32], w: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, nmax) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let lf = li as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

// Q4_K (144 B: d, dmin, 12 B of 6-bit scales and mins, 128 B of nibbles) and Q5_K (176 B: as Q4_K
// with qh[32] before the nibbles), as ggml's quantize_row_q{4,5}_K_ref: per sub-block of 32 a scale
// and a min by make_qkx2_quants (weights av + |x|, av the RMS of the sub-block); both quantized to 6
// bits against their maxima (d = max_scale / 63, dmin = max_min / 63, f16); the levels recomputed
// with the stored scales (a sub-block whose scale is 0 keeps its first levels).
fn q4_k(x: &[f32], b: &mut [u8], five: bool) {
    let nmax = if five { 31 } else { 15 };
    let (rmin, nstep) = if five { (-0.5, 15) } else { (-1.0, 20) };
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (w, &v) in w.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &w, &mut l[32 * j..32 * j + 32], rmin, 0.1, nstep);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(b, 0, max_scale / 63.0);
    put_f16(b, 2, max_min / 63.0);
    b[4..16].copy_from_slice(&sc);
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let dl = d * s as f32;
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dl).clamp(0, nmax) as u8;
        }
    }
    let qs = if five { &mut b[48..176] } else { &mut b[16..144] };
    for (c, q) in qs.chunks_exact_mut(32).enumerate() {
        for i in 0..32 {
            q[i] = (l[64 * c + i] & 0xF) | ((l[64 * c + i + 32] & 0xF) << 4);
        }
    }
    if five {
        let qh = &mut b[16..48];
        qh.iter_mut().for_each(|v| *v = 0);
        for c in 0..4 {
            for i in 0..32 {
                qh[i] |= ((l[64 * c + i] >> 4) & 1) << (2 * c);
                qh[i] |= ((l[64 * c + i + 32] >> 4) & 1) << (2 * c + 1);
            }
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type` 1 (weights x^2) and no importance weights: a scale for
/// symmetric levels -nmax..nmax-1 (stored + nmax in `l`) from 19 candidate scales around -nmax / max.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let lf = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    for (o, &v) in l.iter_mut().zip(x) {
        *o = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&i| i != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &v) in l.iter_mut().zip(x) {
                *o = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

// Q6_K (210 B: ql[128], qh[64], i8 scales[16], d), as ggml's quantize_row_q6_K_ref: per sub-block of
// 16 a scale by make_qx_quants (nmax 32); the scales quantized to i8 against the one of largest
// magnitude (d = max_scale / -128, f16), the levels recomputed with the stored scales.
fn q6_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        b.iter_mut().for_each(|v| *v = 0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(b, 208, 1.0 / iscale);
    for (ib, &s) in scales.iter().enumerate() {
        b[192 + ib] = nearest_int(iscale * s).min(127) as i8 as u8;
    }
    let d = f16_at(b, 208);
    for j in 0..16 {
        let dl = d * (b[192 + j] as i8) as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dl).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, rest) = b.split_at_mut(128);
    let qh = &mut rest[..64];
    for h in 0..2 {
        let (l, ql, qh) = (&l[128 * h..], &mut ql[64 * h..], &mut qh[32 * h..]);
        for i in 0..32 {
            let q = |k: usize| l[i + 32 * k] as u8;
            ql[i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            ql[i + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 3.49].map(nearest_int), [0, 2, 2, 0, -2, 3]);
    }

    #[test]
    fn bf16_and_f16_bits() {
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0); // NaN made quiet
        assert_eq!(f16_bits_numpy(f32::from_bits(0x7f80_0001)), 0x7c01);
        assert_eq!(f16_bits_numpy(65520.0), 0x7c00);
    }
}
