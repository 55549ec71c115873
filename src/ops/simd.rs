//! AVX512 versions of the scalar helpers in `math.rs`, `activation.rs` and `matmul_bf16_packed.rs`, written
//! with the same operations in the same order (no FMA contraction), so each lane gives bit for bit
//! what the scalar function gives (tested below). Callers check [`avx512`] first.

/// Whether the CPU has AVX512F (the helpers below need nothing else).
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2 (cached by std's feature detection).
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instruction-set extensions the kernels choose by, detected at run time, and the kernel each
/// kind of product then runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bf16: bool,
    /// AMX tiles usable for bf16 products ([`super::matmul_bf16_amx::amx_usable`]: CPU, OS permission,
    /// not turned off by `FERROVLM_NO_AMX=1`).
    pub amx: bool,
}

impl CpuFeatures {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                avx512bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
                amx: super::matmul_bf16_amx::amx_usable(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures { avx2: false, fma: false, avx512f: false, avx512bf16: false, amx: false }
        }
    }

    /// (product, kernel) pairs: f32 matmuls go through the gemm crate, which picks its AVX-512 kernels
    /// when the CPU has AVX512F (the crate's `x86-v4` feature), else AVX2+FMA, else scalar; bf16
    /// products (the bf16 compute mode, `bf16=True` training) use our AMX tile kernels where usable, else
    /// our AVX512-BF16 kernels, else f32 products of bf16-rounded values.
    pub fn kernels(&self) -> Vec<(&'static str, &'static str)> {
        let f32 = if self.avx512f {
            "gemm avx512f"
        } else if self.avx2 && self.fma {
            "gemm avx2+fma"
        } else {
            "gemm scalar"
        };
        let bf16 = if self.amx {
            "amx tiles"
        } else if self.avx512f && self.avx512bf16 {
            "avx512bf16 packed"
        } else {
            "f32 fallback"
        };
        vec![("f32_matmul", f32), ("bf16_matmul", bf16)]
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use core::arch::x86_64::*;

    /// 16 lanes of [`crate::ops::math::exp_f32`] (same result in every lane).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp(x: __m512) -> __m512 {
        let (lo, hi) = (_mm512_set1_ps(-87.3), _mm512_set1_ps(88.7));
        // clamp with NaN propagation (min/max return the second operand when one is NaN)
        let xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
        let magic = _mm512_set1_ps(12_582_912.0);
        let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)), magic), magic);
        let r = _mm512_sub_ps(
            _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693_359_4))),
            _mm512_mul_ps(n, _mm512_set1_ps(-2.121_944_4e-4)),
        );
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3f32, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)));
        let scaled = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo);
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi);
        let s = _mm512_mask_blend_ps(under, scaled, _mm512_setzero_ps());
        _mm512_mask_blend_ps(over, s, _mm512_set1_ps(f32::INFINITY))
    }

    /// 16 lanes of the tanh-approximated GELU of `activation.rs`: x / (1 + exp(-2u)),
    /// u = sqrt(2/pi) (x + 0.044715 x^3).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_tanh(x: __m512) -> __m512 {
        let x3 = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715), x), x), x);
        let u = _mm512_mul_ps(_mm512_set1_ps(crate::ops::activation::SQRT_2_OVER_PI), _mm512_add_ps(x, x3));
        let e = exp(_mm512_mul_ps(_mm512_set1_ps(-2.0), u));
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }

    /// 16 lanes of `bf16::f32_to_bf16_bits` (round to nearest even, NaN -> quiet NaN): the bf16
    /// bits in the low half of each 32-bit lane, zero above.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bf16_bits(x: __m512) -> __m512i {
        let b = _mm512_castps_si512(x);
        let nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff)),
            _mm512_set1_epi32(0x7f80_0000),
        );
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// Stores the lanes of `m` of [`bf16_bits`]`(x)` as consecutive bf16 at `dst`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store_bf16(dst: *mut u16, m: __mmask16, x: __m512) {
        _mm512_mask_cvtepi32_storeu_epi16(dst as *mut _, m, bf16_bits(x));
    }

    /// Mask of the first `n` (<= 16) lanes.
    #[inline(always)]
    pub fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::x86;
    use core::arch::x86_64::*;

    fn lanes16(xs: &[f32], f: unsafe fn(__m512) -> __m512) -> Vec<f32> {
        let mut out = Vec::new();
        for c in xs.chunks(16) {
            let mut buf = [0f32; 16];
            buf[..c.len()].copy_from_slice(c);
            let mut o = [0f32; 16];
            // SAFETY: the tests run only where avx512() is true; buffers are 16 floats.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), f(_mm512_loadu_ps(buf.as_ptr()))) };
            out.extend_from_slice(&o[..c.len()]);
        }
        out
    }

    fn samples() -> Vec<f32> {
        let mut v: Vec<f32> = (-20000..20000).map(|i| i as f32 * 0.00731).collect();
        v.extend([
            -1000.0,
            -87.31,
            -87.3,
            -87.29,
            88.69,
            88.7,
            88.71,
            1000.0,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
        ]);
        v
    }

    #[test]
    fn simd_exp_and_gelu_equal_scalar_bitwise() {
        if !super::avx512() {
            return;
        }
        let xs = samples();
        let e = lanes16(&xs, x86::exp);
        let g = lanes16(&xs, x86::gelu_tanh);
        for (i, &x) in xs.iter().enumerate() {
            assert_eq!(e[i].to_bits(), crate::ops::math::exp_f32(x).to_bits(), "exp({x})");
            assert_eq!(g[i].to_bits(), crate::ops::activation::gelu_tanh_scalar(x).to_bits(), "gelu({x})");
        }
        let nan = lanes16(&[f32::NAN], x86::exp);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn simd_bf16_rounding_equals_scalar() {
        if !super::avx512() {
            return;
        }
        let mut xs = samples();
        xs.extend([
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::MAX,
            f32::NAN,
            f32::from_bits(0x0000_8001),
        ]);
        for c in xs.chunks(16) {
            let mut buf = [0f32; 16];
            buf[..c.len()].copy_from_slice(c);
            let mut o = [0u16; 16];
            // SAFETY: avx512 checked; 16-element buffers.
            unsafe { x86::store_bf16(o.as_mut_ptr(), x86::lanes(c.len()), _mm512_loadu_ps(buf.as_ptr())) };
            for (x, b) in c.iter().zip(o) {
                assert_eq!(b, crate::ops::bf16::f32_to_bf16_bits(*x), "{x:e}");
            }
        }
    }
}
