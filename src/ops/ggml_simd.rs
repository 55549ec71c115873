//! Vectorised decoding of GGML blocks for `matmul_ggml`: [`Simd`], the few vector operations the
//! decoders need, for AVX-512 (16 lanes) and AVX2+FMA (8 lanes), and one [`Block`] decoder per type
//! that hands its values over `LANES` at a time, in registers.
//!
//! The decoders perform the reference decoding's float operations (`quant::ggml::dequantize_row`) one
//! by one, without fusing: e.g. Q4_1 `d * q + m` is a multiply then an add, Q4_K `(d * sc) * q - dmin *
//! m` with `d * sc` and `dmin * m` computed once per sub-block as the reference does; so every decoded
//! value equals the reference's bit for bit (tested in `matmul_ggml`).
//!
//! The trait methods are `#[inline(always)]` without target features of their own: they are only ever
//! inlined into the `#[target_feature]` kernels of `matmul_ggml`, whose callers checked the CPU.

/// Vector operations over `LANES` f32 / i32 lanes.
///
/// # Safety
/// Every method needs the CPU features of its implementation (the caller checked them) and, for the
/// loads and stores, `LANES` readable / writable elements at the pointer.
pub(crate) unsafe trait Simd: Copy {
    const LANES: usize;
    type F: Copy;
    type I: Copy;
    unsafe fn zero() -> Self::F;
    unsafe fn splat(v: f32) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    unsafe fn store(p: *mut f32, v: Self::F);
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn sub(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// a * b + c, rounded once
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn sum(v: Self::F) -> f32;
    /// `LANES` bytes, zero-extended
    unsafe fn u8s(p: *const u8) -> Self::I;
    /// `LANES` bytes, sign-extended
    unsafe fn i8s(p: *const u8) -> Self::I;
    unsafe fn cvt(i: Self::I) -> Self::F;
    unsafe fn and(a: Self::I, m: i32) -> Self::I;
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn shr(a: Self::I, n: i32) -> Self::I;
    unsafe fn shl(a: Self::I, n: i32) -> Self::I;
    unsafe fn sub_i(a: Self::I, c: i32) -> Self::I;
    /// lane l: bit `first + l` of `bits`
    unsafe fn bits(bits: u32, first: u32) -> Self::I;
    /// lane l: q | 16 where bit `first + l` of `bits` is set (Q5's 5th bit)
    #[inline(always)]
    unsafe fn with_bit4(q: Self::I, bits: u32, first: u32) -> Self::I {
        Self::or(q, Self::shl(Self::bits(bits, first), 4))
    }
    /// Whether [`Simd::lut16`] / [`Simd::lut32`] are single instructions (AVX-512's `vpermps`,
    /// `vpermt2ps`): 4- and 5-bit types then look their values up in a table of the block's 16 / 32
    /// possible values (computed with the reference's operations) instead of converting each.
    const LUT: bool;
    /// 0, 1, .., LANES - 1 (as f32)
    unsafe fn iota() -> Self::F;
    /// lane l: t[idx[l] & 15] (only where LUT)
    unsafe fn lut16(t: Self::F, idx: Self::I) -> Self::F;
    /// lane l: (t0 | t1)[idx[l] & 31] (only where LUT)
    unsafe fn lut32(t0: Self::F, t1: Self::F, idx: Self::I) -> Self::F;
    /// The two little-endian f16 at `p` and `p + 2`, widened and broadcast.
    unsafe fn f16x2(p: *const u8) -> (Self::F, Self::F) {
        (Self::splat(Self::f16(p)), Self::splat(Self::f16(p.add(2))))
    }
    /// The little-endian f16 at `p`, widened (F16C: no branches, no call)
    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*p, *p.add(1)]) as i32)))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    // SAFETY: the methods use avx512f (and f16c) only; the kernels instantiating Avx512 enable them.
    unsafe impl Simd for Avx512 {
        const LANES: usize = 16;
        type F = __m512;
        type I = __m512i;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            _mm512_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn u8s(p: *const u8) -> __m512i {
            _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn i8s(p: *const u8) -> __m512i {
            _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn cvt(i: __m512i) -> __m512 {
            _mm512_cvtepi32_ps(i)
        }
        #[inline(always)]
        unsafe fn and(a: __m512i, m: i32) -> __m512i {
            _mm512_and_si512(a, _mm512_set1_epi32(m))
        }
        #[inline(always)]
        unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
            _mm512_or_si512(a, b)
        }
        #[inline(always)]
        unsafe fn shr(a: __m512i, n: i32) -> __m512i {
            _mm512_srl_epi32(a, _mm_cvtsi32_si128(n))
        }
        #[inline(always)]
        unsafe fn shl(a: __m512i, n: i32) -> __m512i {
            _mm512_sll_epi32(a, _mm_cvtsi32_si128(n))
        }
        #[inline(always)]
        unsafe fn sub_i(a: __m512i, c: i32) -> __m512i {
            _mm512_sub_epi32(a, _mm512_set1_epi32(c))
        }
        #[inline(always)]
        unsafe fn bits(bits: u32, first: u32) -> __m512i {
            _mm512_maskz_mov_epi32((bits >> first) as u16, _mm512_set1_epi32(1))
        }
        #[inline(always)]
        unsafe fn with_bit4(q: __m512i, bits: u32, first: u32) -> __m512i {
            _mm512_mask_or_epi32(q, (bits >> first) as u16, q, _mm512_set1_epi32(16))
        }
        const LUT: bool = true;
        #[inline(always)]
        unsafe fn iota() -> __m512 {
            _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.)
        }
        #[inline(always)]
        unsafe fn lut16(t: __m512, idx: __m512i) -> __m512 {
            _mm512_permutexvar_ps(idx, t)
        }
        #[inline(always)]
        unsafe fn lut32(t0: __m512, t1: __m512, idx: __m512i) -> __m512 {
            _mm512_permutex2var_ps(t0, idx, t1)
        }
        #[inline(always)]
        unsafe fn f16x2(p: *const u8) -> (__m512, __m512) {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
            (_mm512_broadcastss_ps(dm), _mm512_broadcastss_ps(_mm_movehdup_ps(dm)))
        }
    }

    // SAFETY: the methods use avx2, fma and f16c only; the kernels instantiating Avx2 enable them.
    unsafe impl Simd for Avx2 {
        const LANES: usize = 8;
        type F = __m256;
        type I = __m256i;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            _mm256_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
        }
        #[inline(always)]
        unsafe fn u8s(p: *const u8) -> __m256i {
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn i8s(p: *const u8) -> __m256i {
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn cvt(i: __m256i) -> __m256 {
            _mm256_cvtepi32_ps(i)
        }
        #[inline(always)]
        unsafe fn and(a: __m256i, m: i32) -> __m256i {
            _mm256_and_si256(a, _mm256_set1_epi32(m))
        }
        #[inline(always)]
        unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
            _mm256_or_si256(a, b)
        }
        #[inline(always)]
        unsafe fn shr(a: __m256i, n: i32) -> __m256i {
            _mm256_srl_epi32(a, _mm_cvtsi32_si128(n))
        }
        #[inline(always)]
        unsafe fn shl(a: __m256i, n: i32) -> __m256i {
            _mm256_sll_epi32(a, _mm_cvtsi32_si128(n))
        }
        #[inline(always)]
        unsafe fn sub_i(a: __m256i, c: i32) -> __m256i {
            _mm256_sub_epi32(a, _mm256_set1_epi32(c))
        }
        #[inline(always)]
        unsafe fn bits(bits: u32, first: u32) -> __m256i {
            let shifts = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let v = _mm256_srlv_epi32(_mm256_set1_epi32((bits >> first) as i32), shifts);
            _mm256_and_si256(v, _mm256_set1_epi32(1))
        }
        const LUT: bool = false;
        #[inline(always)]
        unsafe fn iota() -> __m256 {
            _mm256_setr_ps(0., 1., 2., 3., 4., 5., 6., 7.)
        }
        #[inline(always)]
        unsafe fn lut16(_: __m256, _: __m256i) -> __m256 {
            unreachable!("AVX2 has no 16-entry table lookup")
        }
        #[inline(always)]
        unsafe fn lut32(_: __m256, _: __m256, _: __m256i) -> __m256 {
            unreachable!("AVX2 has no 32-entry table lookup")
        }
    }
}

/// Where a decoder puts its values: `put(c, v)` gets the values c * LANES..(c + 1) * LANES of the
/// block. A trait with `#[inline(always)]` methods rather than a closure: closures are not always
/// inlined, and out of line they lose the kernels' target features (a call per vector).
pub(crate) trait Sink<S: Simd> {
    /// # Safety
    /// The CPU has `S`'s features; whatever the sink writes to is valid for chunk c.
    unsafe fn put(&mut self, c: usize, v: S::F);
}

/// One GGML block type: `BS` values in `TS` bytes.
pub(crate) trait Block {
    const BS: usize;
    const TS: usize;
    /// Calls `k.put(c, v)` for every chunk c in 0..BS / LANES (in any order) with v the values
    /// c * LANES.. (c + 1) * LANES of the block at `b`, decoded.
    ///
    /// # Safety
    /// `b` points at `TS` readable bytes; the CPU has `S`'s features.
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K);
}

/// The 32 nibbles at `qs` in order (value j < 16: low nibble of byte j, j + 16 its high nibble):
/// chunk c (values c * LANES..) raw, i.e. the bytes zero-extended with the value in bits 0..4 and, for
/// the low nibbles, the high nibble above it (a table lookup reads bits 0..4 only).
#[inline(always)]
unsafe fn nibbles_raw<S: Simd>(qs: *const u8, j0: usize) -> S::I {
    let q = S::u8s(qs.add(j0 % 16));
    if j0 < 16 {
        q
    } else {
        S::shr(q, 4)
    }
}

/// As [`nibbles_raw`], masked to the value.
#[inline(always)]
unsafe fn nibbles<S: Simd>(qs: *const u8, j0: usize) -> S::I {
    let q = nibbles_raw::<S>(qs, j0);
    if j0 < 16 {
        S::and(q, 0xF)
    } else {
        q
    }
}

/// The 16 values a * q + b of q = 0..15 (a * q, then + b: the reference's operations), as LANES-wide
/// halves for the lookups (AVX-512: one register).
#[inline(always)]
unsafe fn table16<S: Simd>(a: S::F, b: S::F) -> S::F {
    S::add(S::mul(a, S::iota()), b)
}

pub(crate) struct Q8_0;
pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q4K;
pub(crate) struct Q5K;
pub(crate) struct Q6K;

// Every decoder reads inside the TS bytes of its block only, as laid out in quant::ggml.
impl Block for Q8_0 {
    const BS: usize = 32;
    const TS: usize = 34;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        let d = S::splat(S::f16(b));
        for c in 0..32 / S::LANES {
            k.put(c, S::mul(S::cvt(S::i8s(b.add(2 + c * S::LANES))), d)); // q * d
        }
    }
}

/// Q4_0 (`m` None: d * (q - 8)) and Q4_1 (d * q + m) at `qs`.
#[inline(always)]
unsafe fn four<S: Simd, K: Sink<S>>(d: S::F, m: Option<S::F>, qs: *const u8, k: &mut K) {
    if S::LUT {
        let t = match m {
            Some(m) => table16::<S>(d, m),
            None => S::mul(d, S::sub(S::iota(), S::splat(8.0))), // d * (q - 8), q - 8 exact
        };
        for c in 0..32 / S::LANES {
            k.put(c, S::lut16(t, nibbles_raw::<S>(qs, c * S::LANES)));
        }
        return;
    }
    for c in 0..32 / S::LANES {
        let q = nibbles::<S>(qs, c * S::LANES);
        k.put(
            c,
            match m {
                Some(m) => S::add(S::mul(d, S::cvt(q)), m),
                None => S::mul(d, S::cvt(S::sub_i(q, 8))),
            },
        );
    }
}

impl Block for Q4_0 {
    const BS: usize = 32;
    const TS: usize = 18;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        four::<S, K>(S::splat(S::f16(b)), None, b.add(2), k)
    }
}

impl Block for Q4_1 {
    const BS: usize = 32;
    const TS: usize = 20;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        let (d, m) = S::f16x2(b);
        four::<S, K>(d, Some(m), b.add(4), k)
    }
}

/// Q5_0 (`m` None: d * (q - 16)) and Q5_1 (d * q + m): nibbles at `qs`, 5th bits in the u32 at `qh`.
#[inline(always)]
unsafe fn five<S: Simd, K: Sink<S>>(d: S::F, m: Option<S::F>, qh: *const u8, qs: *const u8, k: &mut K) {
    let h = u32::from_le_bytes([*qh, *qh.add(1), *qh.add(2), *qh.add(3)]);
    // (no closure here: it would not be inlined into the target-feature kernel)
    let tables = if S::LUT {
        let hi = S::add(S::iota(), S::splat(16.0));
        Some(match m {
            Some(m) => (table16::<S>(d, m), S::add(S::mul(d, hi), m)),
            None => (S::mul(d, S::sub(S::iota(), S::splat(16.0))), S::mul(d, S::iota())), // d * (q - 16)
        })
    } else {
        None
    };
    for c in 0..32 / S::LANES {
        let j0 = c * S::LANES;
        let q = S::with_bit4(nibbles::<S>(qs, j0), h, j0 as u32);
        k.put(
            c,
            match (tables, m) {
                (Some((t0, t1)), _) => S::lut32(t0, t1, q),
                (None, Some(m)) => S::add(S::mul(d, S::cvt(q)), m),
                (None, None) => S::mul(d, S::cvt(S::sub_i(q, 16))),
            },
        );
    }
}

impl Block for Q5_0 {
    const BS: usize = 32;
    const TS: usize = 22;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        five::<S, K>(S::splat(S::f16(b)), None, b.add(2), b.add(6), k)
    }
}

impl Block for Q5_1 {
    const BS: usize = 32;
    const TS: usize = 24;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        let (d, m) = S::f16x2(b);
        five::<S, K>(d, Some(m), b.add(4), b.add(8), k)
    }
}

/// Q4_K / Q5_K: sub-block I (32 values) is `(d * sc) * q - dmin * m`; its nibbles are the low
/// (I even) or high (I odd) halves of the 32 bytes (I / 2) * 32.. of the quants; Q5_K's 5th bit is
/// bit I of qh[l]. `dl[I]` = d * sc, `ml[8 + I]` = dmin * m. I is a constant so that every chunk
/// index is one after inlining (the kernels' accumulators then stay in registers).
#[inline(always)]
unsafe fn k4_sub<S: Simd, K: Sink<S>, const FIVE: bool, const I: usize>(
    b: *const u8,
    dl: &[f32; 16],
    ml: &[f32; 16],
    k: &mut K,
) {
    let (dl, ml) = (S::splat(dl[I]), S::splat(ml[8 + I]));
    let (qh, qs) = if FIVE { (b.add(16), b.add(48)) } else { (b, b.add(16)) };
    for c in 0..32 / S::LANES {
        let l0 = c * S::LANES;
        let raw = S::u8s(qs.add((I / 2) * 32 + l0));
        let v = if S::LUT && !FIVE {
            S::lut16(S::sub(S::mul(dl, S::iota()), ml), if I.is_multiple_of(2) { raw } else { S::shr(raw, 4) })
        } else {
            let mut q = if I.is_multiple_of(2) { S::and(raw, 0xF) } else { S::shr(raw, 4) };
            if FIVE {
                q = S::or(q, S::shl(S::and(S::shr(S::u8s(qh.add(l0)), I as i32), 1), 4));
            }
            if S::LUT {
                let t0 = S::sub(S::mul(dl, S::iota()), ml);
                let t1 = S::sub(S::mul(dl, S::add(S::iota(), S::splat(16.0))), ml);
                S::lut32(t0, t1, q)
            } else {
                S::sub(S::mul(dl, S::cvt(q)), ml)
            }
        };
        k.put(I * (32 / S::LANES) + c, v);
    }
}

/// The 8 6-bit scales then the 8 mins of a Q4_K / Q5_K block (`ggml::scale_min_k4` for all j at once,
/// on 32-bit words).
#[inline(always)]
unsafe fn scales_mins_k4(q: *const u8) -> [u8; 16] {
    let w = |i: usize| u32::from_le_bytes([*q.add(i), *q.add(i + 1), *q.add(i + 2), *q.add(i + 3)]);
    let (a, b, c) = (w(0), w(4), w(8));
    let sc_lo = a & 0x3f3f_3f3f;
    let m_lo = b & 0x3f3f_3f3f;
    let sc_hi = (c & 0x0f0f_0f0f) | (((a >> 6) & 0x0303_0303) << 4);
    let m_hi = ((c >> 4) & 0x0f0f_0f0f) | (((b >> 6) & 0x0303_0303) << 4);
    let mut out = [0u8; 16];
    for (i, v) in [sc_lo, sc_hi, m_lo, m_hi].into_iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

#[inline(always)]
unsafe fn k4<S: Simd, K: Sink<S>, const FIVE: bool>(b: *const u8, k: &mut K) {
    let (d, dmin) = (S::f16(b), S::f16(b.add(2)));
    // d * sc for the 8 sub-blocks (lanes 0..8 of dl) and dmin * m (lanes 8..16 of ml), vectorised
    let sm = scales_mins_k4(b.add(4));
    let (mut dl, mut ml) = ([0f32; 16], [0f32; 16]);
    for c in 0..16 / S::LANES {
        let v = S::cvt(S::u8s(sm.as_ptr().add(c * S::LANES)));
        S::store(dl.as_mut_ptr().add(c * S::LANES), S::mul(S::splat(d), v));
        S::store(ml.as_mut_ptr().add(c * S::LANES), S::mul(S::splat(dmin), v));
    }
    k4_sub::<S, K, FIVE, 0>(b, &dl, &ml, k);
    k4_sub::<S, K, FIVE, 1>(b, &dl, &ml, k);
    k4_sub::<S, K, FIVE, 2>(b, &dl, &ml, k);
    k4_sub::<S, K, FIVE, 3>(b, &dl, &ml, k);
    k4_sub::<S, K, FIVE, 4>(b, &dl, &ml, k);
    k4_sub::<S, K, FIVE, 5>(b, &dl, &ml, k);
    k4_sub::<S, K, FIVE, 6>(b, &dl, &ml, k);
    k4_sub::<S, K, FIVE, 7>(b, &dl, &ml, k);
}

impl Block for Q4K {
    const BS: usize = 256;
    const TS: usize = 144;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        k4::<S, K, false>(b, k)
    }
}

impl Block for Q5K {
    const BS: usize = 256;
    const TS: usize = 176;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        k4::<S, K, true>(b, k)
    }
}

// Q6_K: per half H (128 values; ql 64 B, qh 32 B, 8 scales), value l + 32 J (l < 32, J < 4) is
// (d * sc[l / 16 + 2 J]) * (q - 32), q = 4 bits of ql[l + 32 (J % 2)] (low for J < 2, high after) |
// bits 2J, 2J + 1 of qh[l] << 4. H and J are constants (see `k4_sub`).
#[inline(always)]
unsafe fn q6_part<S: Simd, K: Sink<S>, const H: usize, const J: usize>(b: *const u8, s: &[f32; 16], k: &mut K) {
    let (ql, qh) = (b.add(64 * H + 32 * (J % 2)), b.add(128 + 32 * H));
    for c in 0..32 / S::LANES {
        let l0 = c * S::LANES;
        let src = S::u8s(ql.add(l0));
        let low = if J < 2 { S::and(src, 0xF) } else { S::shr(src, 4) };
        let q = S::or(low, S::shl(S::and(S::shr(S::u8s(qh.add(l0)), 2 * J as i32), 3), 4));
        let s = S::splat(s[8 * H + l0 / 16 + 2 * J]);
        k.put((128 * H + l0 + 32 * J) / S::LANES, S::mul(s, S::cvt(S::sub_i(q, 32))));
    }
}

impl Block for Q6K {
    const BS: usize = 256;
    const TS: usize = 210;
    #[inline(always)]
    unsafe fn decode<S: Simd, K: Sink<S>>(b: *const u8, k: &mut K) {
        // the 16 scales d * sc, vectorised
        let d = S::splat(S::f16(b.add(208)));
        let mut s = [0f32; 16];
        for c in 0..16 / S::LANES {
            S::store(s.as_mut_ptr().add(c * S::LANES), S::mul(d, S::cvt(S::i8s(b.add(192 + c * S::LANES)))));
        }
        // kept in memory: a lane broadcast from memory is one load, from a register two shuffles
        // (measured: 15% faster here; slower for Q4_K's tables)
        let s = std::hint::black_box(s);
        q6_part::<S, K, 0, 0>(b, &s, k);
        q6_part::<S, K, 0, 1>(b, &s, k);
        q6_part::<S, K, 0, 2>(b, &s, k);
        q6_part::<S, K, 0, 3>(b, &s, k);
        q6_part::<S, K, 1, 0>(b, &s, k);
        q6_part::<S, K, 1, 1>(b, &s, k);
        q6_part::<S, K, 1, 2>(b, &s, k);
        q6_part::<S, K, 1, 3>(b, &s, k);
    }
}
