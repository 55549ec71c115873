//! bf16 values on the CPU: conversions (round to nearest even, as torch's `.to(bfloat16)`) and
//! [`Bf16Rows`], rows of bf16 values packed in pairs: the input operand of the bf16 kernels
//! (`matmul_bf16_packed`, `matmul_bf16_fused`, `attention_bf16`).

use rayon::prelude::*;

/// f32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN), as torch's `.to(bfloat16)`.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// f32 rounded to the nearest bf16 value, returned as f32.
#[inline(always)]
pub fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits((f32_to_bf16_bits(x) as u32) << 16)
}

#[inline(always)]
/// bf16 bits -> f32 (exact).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to bf16, as rows of bf16 pairs `[n, ceil(k/2)]` (low half = even position).
pub(crate) fn pack_x(x: &[f32], n: usize, k: usize) -> Vec<u32> {
    let kp2 = k.div_ceil(2);
    let mut xa = vec![0u32; n * kp2];
    xa.par_chunks_mut(kp2 * 16).zip(x.par_chunks(k * 16)).for_each(|(dst, src)| {
        for (d, s) in dst.chunks_mut(kp2).zip(src.chunks(k)) {
            for (dp, sp) in d.iter_mut().zip(s.chunks_exact(2)) {
                *dp = f32_to_bf16_bits(sp[0]) as u32 | (f32_to_bf16_bits(sp[1]) as u32) << 16;
            }
            if k % 2 == 1 {
                d[kp2 - 1] = f32_to_bf16_bits(s[k - 1]) as u32;
            }
        }
    });
    xa
}

/// Rows of bf16 values as bf16 pairs `[n, ceil(k/2)]` u32 (low half = even position, the odd tail's
/// high half zero): the `a` operand of the kernels. In memory, a row is its bf16 values in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Bf16Rows {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) data: Vec<u32>,
}

impl Bf16Rows {
    /// `n` rows of `k` zeros.
    pub fn zeros(n: usize, k: usize) -> Self {
        Bf16Rows { n, k, data: vec![0; n * k.div_ceil(2)] }
    }
    /// x `[n, k]` rounded to bf16 (round to nearest even).
    pub fn from_f32(x: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(x.len(), n * k, "Bf16Rows: {} values, expected {n} x {k}", x.len());
        Bf16Rows { n, k, data: pack_x(x, n, k) }
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// bf16 pairs per row.
    pub fn kp2(&self) -> usize {
        self.k.div_ceil(2)
    }
    /// `[n, kp2]` bf16 pairs.
    pub fn pairs(&self) -> &[u32] {
        &self.data
    }
    /// `[n, 2 * kp2]` bf16 bits (the pairs' halves in order on a little-endian CPU).
    #[cfg(target_endian = "little")]
    pub(crate) fn bits(&self) -> &[u16] {
        // SAFETY: u16 has a smaller alignment than u32 and twice as many fit in the same bytes.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u16, 2 * self.data.len()) }
    }
    pub(crate) fn pairs_mut(&mut self) -> &mut [u32] {
        &mut self.data
    }
    /// The values widened to f32 `[n, k]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            for c in 0..self.k {
                out.push(f32::from_bits((self.get_bits(r, c) as u32) << 16));
            }
        }
        out
    }
    /// The bf16 bits at (r, c).
    pub fn get_bits(&self, r: usize, c: usize) -> u16 {
        let pair = self.data[r * self.kp2() + c / 2];
        (if c.is_multiple_of(2) { pair & 0xffff } else { pair >> 16 }) as u16
    }
    pub(crate) fn set_bits(&mut self, r: usize, c: usize, bits: u16) {
        let i = r * self.kp2() + c / 2;
        let pair = self.data[i];
        self.data[i] = if c.is_multiple_of(2) {
            (pair & 0xffff_0000) | bits as u32
        } else {
            (pair & 0xffff) | (bits as u32) << 16
        };
    }
}
