//! f32 x bf16 matmul with the AVX512-BF16 dot-product instructions (detected at run time).
//!
//! `y[n, out] = x[n, k] @ w[out, k]^T` where `w` is a PyTorch-layout weight in bf16 and `x` is f32,
//! rounded to bf16 (round-to-nearest-even, like torch's `.to(torch.bfloat16)`); the products are
//! accumulated in f32 by `vdpbf16ps` (each instruction adds two products per f32 lane).
//!
//! Layouts:
//! * The weight is packed once ([`pack`]) into panels of [`NR`] output columns; inside a panel, for
//!   each pair of input positions `(2p, 2p+1)`, the `NR` columns follow each other as bf16 pairs
//!   (one `u32` each), so one 64-byte load gives 16 columns x 2 k-positions, the `b` operand of
//!   `vdpbf16ps`. Columns past `out` and the odd k tail are zero.
//! * `x` is converted once per call to rows of bf16 pairs (`[n, ceil(k/2)]` u32); a pair is broadcast
//!   to the 16 lanes as the `a` operand.
//!
//! The microkernel keeps an `MR x NR` tile of `y` in `MR * NR / 16` zmm accumulators. Work is split
//! into tasks of `MC` rows x `NC` columns (rayon), and each task walks k in blocks of `KC` pairs so the
//! block of the weight it streams stays in L2 while an `MR`-row strip of `x` stays in L1.
//!
//! On a CPU with AMX (`matmul_bf16_amx::amx_usable`) [`matmul_packed`] runs the tile kernel of
//! `matmul_bf16_amx.rs` on the same packed panels instead.
//!
//! Without AVX512-BF16 the same function runs a portable path (same rounding of `x`, f32 products
//! through the `gemm` crate).

use half::bf16;
use rayon::prelude::*;

use super::bf16::{pack_x, round_to_bf16};

/// Output columns per packed weight panel (the microkernel's tile width).
pub const NR: usize = 64;
/// Rows of `x` per microkernel tile.
pub(crate) const MR: usize = 6;
/// Zmm registers per tile row.
pub(crate) const NV: usize = NR / 16;
/// Rows per parallel task (a multiple of MR).
pub(crate) const MC: usize = 96;
/// Packed panels (of NR columns) per parallel task.
pub(crate) const NCP: usize = 4;
/// k pairs per cache block.
pub(crate) const KC: usize = 256;

/// Whether the fast AVX512-BF16 kernel can run on this CPU.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A bf16 weight `[out, k]` packed for [`matmul_packed`] (pack once at load time).
#[derive(Clone)]
pub struct PackedBf16 {
    out: usize,
    k: usize,
    /// ceil(k / 2): bf16 pairs per column.
    kp2: usize,
    /// ceil(out / NR) panels of `kp2 * NR` u32 (bf16 pairs), 64-byte aligned.
    data: AlignedU32,
}

/// One cache line of u32.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A zeroed u32 buffer starting on a cache line: the kernels' 64-byte loads of packed panels then
/// never straddle two lines.
#[derive(Clone, Default)]
pub(crate) struct AlignedU32 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedU32 {
    pub(crate) fn zeros(len: usize) -> Self {
        AlignedU32 { lines: vec![Line::default(); len.div_ceil(16)], len }
    }
}

impl std::ops::Deref for AlignedU32 {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: `lines` holds at least `len` contiguous u32 (Line is repr(C) [u32; 16]).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u32, self.len) }
    }
}

impl std::ops::DerefMut for AlignedU32 {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in deref, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u32, self.len) }
    }
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16 {{ out: {}, k: {} }}", self.out, self.k)
    }
}

impl PackedBf16 {
    /// Output features (rows of the PyTorch weight).
    pub fn out_features(&self) -> usize {
        self.out
    }
    /// Input features (columns of the PyTorch weight).
    pub fn in_features(&self) -> usize {
        self.k
    }
    /// The packed panels: ceil(out / NR) panels of `ceil(k/2) * NR` bf16 pairs.
    pub(crate) fn panels(&self) -> &[u32] {
        &self.data
    }
    /// The transposed weight `W^T` (`[k, out]` as a PyTorch-layout weight) packed, for products with `W`
    /// itself: `matmul_packed(g, n, out, &w.transposed())` is `bf16(g) [n, out] @ W [out, k]`, the
    /// backward to the input of `x W^T` as autocast computes it (both factors in bf16).
    pub fn transposed(&self) -> PackedBf16 {
        let w = self.unpack(); // [out, k]
        let mut t = vec![bf16::ZERO; w.len()]; // [k, out]
        if self.k > 0 {
            t.par_chunks_mut(self.out.max(1)).enumerate().for_each(|(i, row)| {
                row.iter_mut().enumerate().for_each(|(j, v)| *v = w[j * self.k + i]);
            });
        }
        pack(&t, self.k, self.out)
    }

    /// The weight back in PyTorch layout `[out, k]`.
    pub fn unpack(&self) -> Vec<bf16> {
        let mut w = vec![bf16::ZERO; self.out * self.k];
        for j in 0..self.out {
            let (panel, c) = (j / NR, j % NR);
            let base = panel * self.kp2 * NR + c;
            for i in 0..self.k {
                let pair = self.data[base + (i / 2) * NR];
                let bits = if i % 2 == 0 { pair & 0xffff } else { pair >> 16 };
                w[j * self.k + i] = bf16::from_bits(bits as u16);
            }
        }
        w
    }
}

/// Packs a PyTorch-layout bf16 weight `w` (`[out, k]` row-major) for [`matmul_packed`].
pub fn pack(w: &[bf16], out: usize, k: usize) -> PackedBf16 {
    assert_eq!(w.len(), out * k, "matmul_bf16_packed::pack: w has {} values, expected out*k = {}", w.len(), out * k);
    let kp2 = k.div_ceil(2);
    let panels = out.div_ceil(NR);
    let mut data = AlignedU32::zeros(panels * kp2 * NR);
    if kp2 > 0 {
        data.par_chunks_mut(kp2 * NR).enumerate().for_each(|(pi, panel)| {
            let j0 = pi * NR;
            for c in 0..NR.min(out - j0) {
                let row = &w[(j0 + c) * k..(j0 + c + 1) * k];
                for p in 0..k / 2 {
                    panel[p * NR + c] = row[2 * p].to_bits() as u32 | (row[2 * p + 1].to_bits() as u32) << 16;
                }
                if k % 2 == 1 {
                    panel[(kp2 - 1) * NR + c] = row[k - 1].to_bits() as u32;
                }
            }
        });
    }
    PackedBf16 { out, k, kp2, data }
}

/// `y[n, out] = bf16(x)[n, k] @ w[out, k]^T` with f32 accumulation. Packs `w` on every call: models
/// should [`pack`] once and call [`matmul_packed`].
pub fn matmul_f32_bf16(x: &[f32], n: usize, k: usize, w: &[bf16], out: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * k, "matmul_bf16_packed: x has {} values, expected n*k = {}", x.len(), n * k);
    assert_eq!(w.len(), out * k, "matmul_bf16_packed: w has {} values, expected out*k = {}", w.len(), out * k);
    if !available() {
        return matmul_portable(x, n, k, w, out);
    }
    matmul_packed(x, n, k, &pack(w, out, k))
}

/// `y[n, out] = bf16(x)[n, k] @ W^T` for a packed weight.
pub fn matmul_packed(x: &[f32], n: usize, k: usize, w: &PackedBf16) -> Vec<f32> {
    assert_eq!(k, w.k, "matmul_bf16_packed: x has k = {k} but the weight has {} input features", w.k);
    assert_eq!(x.len(), n * k, "matmul_bf16_packed: x has {} values, expected n*k = {}", x.len(), n * k);
    let out = w.out;
    if n == 0 || out == 0 || k == 0 {
        return vec![0.0; n * out];
    }
    if super::matmul_bf16_amx::amx_usable() {
        return super::matmul_bf16_amx::matmul_packed_amx(x, n, k, w);
    }
    matmul_packed_avx512bf16(x, n, k, w)
}

/// [`matmul_packed`] on the AVX512-BF16 kernel even where AMX is usable (benchmarks, tests); the
/// portable path without AVX512-BF16.
pub fn matmul_packed_avx512bf16(x: &[f32], n: usize, k: usize, w: &PackedBf16) -> Vec<f32> {
    assert_eq!(k, w.k, "matmul_bf16_packed: x has k = {k} but the weight has {} input features", w.k);
    assert_eq!(x.len(), n * k, "matmul_bf16_packed: x has {} values, expected n*k = {}", x.len(), n * k);
    let out = w.out;
    if n == 0 || out == 0 || k == 0 {
        return vec![0.0; n * out];
    }
    if !available() {
        return matmul_portable(x, n, k, &w.unpack(), out);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let xa = pack_x(x, n, k);
        let mut y = vec![0.0f32; n * out];
        // SAFETY: available() checked avx512f + avx512bf16; xa is [n, kp2], y is [n, out].
        unsafe { fast::run(&xa, n, w, &mut y) };
        y
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// The portable path: `x` rounded to bf16 exactly as the fast path does, `w` widened to f32, one f32
/// gemm (so results agree with the fast path up to f32 summation order). Runs on any CPU.
pub fn matmul_portable(x: &[f32], n: usize, k: usize, w: &[bf16], out: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * k, "matmul_bf16_packed: x has {} values, expected n*k = {}", x.len(), n * k);
    assert_eq!(w.len(), out * k, "matmul_bf16_packed: w has {} values, expected out*k = {}", w.len(), out * k);
    let mut y = vec![0.0f32; n * out];
    if n == 0 || out == 0 || k == 0 {
        return y;
    }
    let xr: Vec<f32> = x.par_iter().map(|&v| round_to_bf16(v)).collect();
    let wf: Vec<f32> = w.par_iter().map(|v| v.to_f32()).collect();
    // SAFETY: y is [n, out] row-major (row stride out); xr is [n, k] row-major; wf is [out, k]
    // row-major, read as its transpose [k, out] (row stride 1, column stride k).
    unsafe {
        gemm::gemm(
            n,
            out,
            k,
            y.as_mut_ptr(),
            1,
            out as isize,
            false,
            xr.as_ptr(),
            1,
            k as isize,
            wf.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    y
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod fast {
    use super::super::cpu::SendPtr;
    use super::{PackedBf16, KC, MC, MR, NCP, NR, NV};
    use core::arch::x86_64::*;
    use rayon::prelude::*;

    /// # Safety
    /// Needs avx512f + avx512bf16; `xa` is `[n, w.kp2]`, `y` is `[n, w.out]`.
    pub(super) unsafe fn run(xa: &[u32], n: usize, w: &PackedBf16, y: &mut [f32]) {
        let (out, kp2) = (w.out, w.kp2);
        let panels = out.div_ceil(NR);
        let tiles_r = n.div_ceil(MC);
        let tiles_c = panels.div_ceil(NCP);
        let yp = SendPtr(y.as_mut_ptr());
        let xp = xa.as_ptr() as usize;
        let wp = w.data.as_ptr() as usize;
        (0..tiles_r * tiles_c).into_par_iter().for_each(move |t| {
            let yp = yp;
            let (tr, tc) = (t / tiles_c, t % tiles_c);
            let (r0, r1) = (tr * MC, (tr * MC + MC).min(n));
            let (p0, p1) = (tc * NCP, (tc * NCP + NCP).min(panels));
            let mut kb = 0;
            while kb < kp2 {
                let kc = KC.min(kp2 - kb);
                let mut ir = r0;
                while ir < r1 {
                    let rows = MR.min(r1 - ir);
                    for jp in p0..p1 {
                        let cols = NR.min(out - jp * NR);
                        kernel(
                            kc,
                            (xp as *const u32).add(ir * kp2 + kb),
                            kp2,
                            rows,
                            (wp as *const u32).add(jp * kp2 * NR + kb * NR),
                            yp.0.add(ir * out + jp * NR),
                            out,
                            cols,
                            kb > 0,
                        );
                    }
                    ir += MR;
                }
                kb += kc;
            }
        });
    }

    /// The `MR x NR` products of one tile over `kc` k-pairs, `a[rows, kc pairs] . b[kc pairs, NR]`, in
    /// `MR * NV` zmm accumulators (rows past `rows` repeat the last row: computed, never stored). The
    /// microkernel shared by [`kernel`] and the fused gemm's tile.
    ///
    /// # Safety
    /// Needs avx512f + avx512bf16; `1 <= rows <= MR`; `a` valid for `rows` rows of `kc` pairs (stride
    /// `lda`), `b` for `kc * NR` pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    pub(crate) unsafe fn dot_tile(
        kc: usize,
        a: *const u32,
        lda: usize,
        rows: usize,
        b: *const u32,
    ) -> [[__m512; NV]; MR] {
        // Rows past the end repeat the last row (computed, never stored).
        let mut ap = [a; MR];
        for (i, p) in ap.iter_mut().enumerate() {
            *p = a.add(i.min(rows - 1) * lda);
        }
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut bp = b;
        for p in 0..kc {
            let mut bv = [core::mem::zeroed::<__m512bh>(); NV];
            for (v, r) in bv.iter_mut().enumerate() {
                *r = core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(v * 16) as *const _));
            }
            for i in 0..MR {
                let av = core::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*ap[i].add(p) as i32));
                for v in 0..NV {
                    acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
                }
            }
            bp = bp.add(NR);
        }
        acc
    }

    /// One `MR x NR` tile over `kc` k-pairs: `c[rows, cols] (+)= a[rows, kc pairs] . b[kc pairs, NR]`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        a: *const u32,
        lda: usize,
        rows: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let acc = dot_tile(kc, a, lda, rows, b);
        for (i, row) in acc.iter().enumerate().take(rows) {
            let crow = c.add(i * ldc);
            for (v, &r) in row.iter().enumerate() {
                let c0 = v * 16;
                if c0 >= cols {
                    break;
                }
                let m: __mmask16 = if cols - c0 >= 16 { 0xffff } else { (1u16 << (cols - c0)) - 1 };
                let ptr = crow.add(c0);
                let r = if accumulate { _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, ptr)) } else { r };
                _mm512_mask_storeu_ps(ptr, m, r);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::bf16::f32_to_bf16_bits;

    /// Deterministic values in [-1, 1) (an LCG), shared by the bf16 kernels' tests.
    pub(crate) fn rng_vec(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn weights(out: usize, k: usize, seed: u64) -> Vec<bf16> {
        rng_vec(out * k, seed).into_iter().map(bf16::from_f32).collect()
    }

    /// Checks y against an f64 reference on bf16-rounded x and w: |err| <= 1e-5 * |x_r| * |w_j|.
    fn check(y: &[f32], x: &[f32], n: usize, k: usize, w: &[bf16], out: usize) {
        assert_eq!(y.len(), n * out);
        let xr: Vec<f64> = x.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect();
        let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
        for r in 0..n {
            let xrow = &xr[r * k..(r + 1) * k];
            let xn = xrow.iter().map(|v| v * v).sum::<f64>().sqrt();
            for j in 0..out {
                let wrow = &wf[j * k..(j + 1) * k];
                let wn = wrow.iter().map(|v| v * v).sum::<f64>().sqrt();
                let refv: f64 = xrow.iter().zip(wrow).map(|(a, b)| a * b).sum();
                let err = (y[r * out + j] as f64 - refv).abs();
                assert!(
                    err <= 1e-5 * xn * wn + 1e-30,
                    "n={n} k={k} out={out}: y[{r},{j}] = {} vs {refv} (err {err})",
                    y[r * out + j]
                );
            }
        }
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 7, 5),
        (3, 33, 31),
        (17, 100, 65),
        (1, 100, 31),
        (17, 7, 65),
        (3, 1, 1),
        (7, 2, 64),
        (13, 64, 128),
        (100, 577, 129),  // crosses MC and several k blocks with an odd tail
        (200, 1100, 300), // several tasks in both directions, 3 k blocks
        (64, 576, 1536),
    ];

    #[test]
    fn gemm_bf16_matches_f64_reference() {
        for (si, &(n, k, out)) in SHAPES.iter().enumerate() {
            let x = rng_vec(n * k, 11 + si as u64);
            let w = weights(out, k, 101 + si as u64);
            let y = matmul_f32_bf16(&x, n, k, &w, out);
            check(&y, &x, n, k, &w, out);
            let packed = pack(&w, out, k);
            let y2 = matmul_packed(&x, n, k, &packed);
            assert_eq!(y, y2, "matmul_packed differs from matmul_f32_bf16 for {n}x{k}x{out}");
        }
    }

    #[test]
    fn gemm_bf16_portable_matches_f64_reference() {
        for (si, &(n, k, out)) in SHAPES.iter().enumerate() {
            let x = rng_vec(n * k, 21 + si as u64);
            let w = weights(out, k, 201 + si as u64);
            let y = matmul_portable(&x, n, k, &w, out);
            check(&y, &x, n, k, &w, out);
        }
    }

    #[test]
    fn gemm_bf16_fast_agrees_with_portable() {
        let (n, k, out) = (37, 333, 97);
        let x = rng_vec(n * k, 5);
        let w = weights(out, k, 6);
        let a = matmul_f32_bf16(&x, n, k, &w, out);
        let b = matmul_portable(&x, n, k, &w, out);
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{u} vs {v}");
        }
    }

    #[test]
    fn gemm_bf16_pack_roundtrip() {
        for &(out, k) in &[(5, 7), (65, 33), (128, 64), (1, 1)] {
            let w = weights(out, k, (out * 1000 + k) as u64);
            assert_eq!(pack(&w, out, k).unpack(), w);
        }
    }

    #[test]
    fn gemm_bf16_rounding_is_rne_like_torch() {
        // Matches half's round-to-nearest-even on ties, normals, denormals, inf and NaN.
        let vals = [
            1.0f32,
            -2.5,
            f32::from_bits(0x3f80_8000), // tie, even below -> down
            f32::from_bits(0x3f81_8000), // tie, odd below -> up
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x0000_8001), // denormal
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -0.0,
        ];
        for &v in &vals {
            assert_eq!(f32_to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
        }
        assert!(round_to_bf16(f32::NAN).is_nan());
        for v in rng_vec(10000, 3) {
            let v = v * 1e3;
            assert_eq!(f32_to_bf16_bits(v), bf16::from_f32(v).to_bits());
        }
    }

    #[test]
    fn gemm_bf16_empty_shapes() {
        assert!(matmul_f32_bf16(&[], 0, 4, &weights(3, 4, 1), 3).is_empty());
        assert_eq!(matmul_f32_bf16(&[], 2, 0, &[], 3), vec![0.0; 6]);
        assert!(matmul_portable(&[], 0, 4, &weights(3, 4, 1), 3).is_empty());
    }
}
