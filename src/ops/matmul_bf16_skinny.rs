//! Skinny matmul for decoding: y[m, n] = sum_k x[m, k] w[n, k] with few rows m, f32 activations and
//! bf16 (raw bits) or f32 weights, accumulating in f32. Decoding reads every weight once per token, so
//! it is bound by memory bandwidth: bf16 storage halves the bytes. bf16 -> f32 is exact, so for weights
//! that were bf16 in the checkpoint the products equal the f32 computation's (only the summation order
//! differs, as between any two BLAS libraries).

use rayon::prelude::*;

use super::bf16::bf16_to_f32;
use super::cpu::{transpose, SendPtr};

/// A weight element the skinny kernels read: bf16 bits (widened on the fly) or f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// 16 consecutive weights from `p` as one AVX-512 vector.
    ///
    /// # Safety
    /// `p` points at 16 readable values and the CPU has avx512f.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl WeightElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; bf16 -> f32 is a 16-bit left shift of the bits.
        unsafe {
            let v = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        }
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

/// Dot product with 16 independent accumulators so that it vectorises.
#[inline(always)]
fn dot<W: WeightElem>(x: &[f32], w: &[W], fused: bool) -> f32 {
    let mut acc = [0f32; 16];
    let (xc, wc) = (x.chunks_exact(16), w.chunks_exact(16));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (xs, ws) in xc.zip(wc) {
        for i in 0..16 {
            let p = ws[i].to_f32();
            acc[i] = if fused { xs[i].mul_add(p, acc[i]) } else { xs[i] * p + acc[i] };
        }
    }
    let mut tail = 0f32;
    for (a, b) in xr.iter().zip(wr) {
        tail += a * b.to_f32();
    }
    acc.iter().sum::<f32>() + tail
}

/// One block of output columns for all rows: out_t is [cols_in_block, m].
#[inline(always)]
fn block<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n0: usize, out_t: &mut [f32], fused: bool) {
    for (j, o) in out_t.chunks_exact_mut(m).enumerate() {
        let wrow = &w[(n0 + j) * k..(n0 + j + 1) * k];
        for (r, v) in o.iter_mut().enumerate() {
            *v = dot(&x[r * k..(r + 1) * k], wrow, fused);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n0: usize, out_t: &mut [f32]) {
    block(x, m, k, w, n0, out_t, true)
}

/// Weight rows per step of the AVX-512 kernel: each x chunk loaded once feeds this many independent
/// accumulators (which also hides the FMA latency).
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 4;

/// The AVX-512 block: `ROWS` weight rows at a time, 16 weights per load, one accumulator per row; the
/// rest of the block and of each row as in [`block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_avx512<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n0: usize, out_t: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = out_t.len() / m;
    let k16 = k - k % 16;
    let mut j = 0;
    while j + ROWS <= cols {
        let wr: [&[W]; ROWS] = std::array::from_fn(|q| &w[(n0 + j + q) * k..(n0 + j + q + 1) * k]);
        // The next ROWS rows (contiguous after these) are prefetched while these are read: one step
        // of 16 weights per row prefetches the same number of bytes of the next group.
        let next = (j + 2 * ROWS <= cols).then(|| w.as_ptr().wrapping_add((n0 + j + ROWS) * k) as *const i8);
        let step_bytes = ROWS * 16 * std::mem::size_of::<W>();
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [_mm512_setzero_ps(); ROWS];
            let mut i = 0;
            while i < k16 {
                if let (0, Some(p)) = (r, next) {
                    let p = p.wrapping_add(i / 16 * step_bytes);
                    for line in (0..step_bytes).step_by(64) {
                        // A prefetch never faults; the address is only computed (wrapping).
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line));
                    }
                }
                // SAFETY: i + 16 <= k16 <= k, the length of xr and of each wr[q]; avx512f (this fn's target).
                unsafe {
                    let xv = _mm512_loadu_ps(xr.as_ptr().add(i));
                    for q in 0..ROWS {
                        acc[q] = _mm512_fmadd_ps(xv, W::load16(wr[q].as_ptr().add(i)), acc[q]);
                    }
                }
                i += 16;
            }
            for q in 0..ROWS {
                let tail: f32 = xr[k16..].iter().zip(&wr[q][k16..]).map(|(a, b)| a * b.to_f32()).sum();
                out_t[(j + q) * m + r] = _mm512_reduce_add_ps(acc[q]) + tail;
            }
        }
        j += ROWS;
    }
    block(x, m, k, w, n0 + j, &mut out_t[j * m..], true);
}

/// Columns n0 .. n0 + out_t.len() / m of x W^T (x [m, k], W [n, k]) for every row, into out_t
/// [cols, m] (column-major): one block of the products above, for callers that split the columns
/// over threads themselves (`model/text_decode.rs`). A kernel the CPU lacks falls back to a slower one.
pub fn columns<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n0: usize, out_t: &mut [f32], kernel: Kernel) {
    match kernel.supported() {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            // SAFETY: the CPU supports avx512f, avx2 and fma (Kernel::supported).
            unsafe { block_avx512(x, m, k, w, n0, out_t) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            // SAFETY: the CPU supports avx2 and fma (Kernel::supported).
            unsafe { block_avx2(x, m, k, w, n0, out_t) }
        }
        _ => block(x, m, k, w, n0, out_t, false),
    }
}

/// Output columns per parallel task: a few tasks per thread, so that both load balancing and the
/// per-task overhead stay small (decode runs hundreds of these products per token).
fn block_columns(n: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 2;
    n.div_ceil(tasks).next_multiple_of(16).clamp(16, 4096)
}

/// x: [m, k] f32 row-major, w: [n, k] bf16 bits row-major -> [m, n] f32.
pub fn gemv_bf16(x: &[f32], m: usize, k: usize, w: &[u16], n: usize) -> Vec<f32> {
    gemv_with(x, m, k, w, n, Kernel::best())
}

/// x: [m, k] f32 row-major, w: [n, k] f32 row-major -> [m, n] f32.
pub fn gemv_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    gemv_with(x, m, k, w, n, Kernel::best())
}

/// Which block kernel [`gemv_with`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Avx2,
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// `self`, or the best one below it that this CPU runs.
    fn supported(self) -> Kernel {
        match (self, Kernel::best()) {
            (_, Kernel::Portable) | (Kernel::Portable, _) => Kernel::Portable,
            (Kernel::Avx512, best) => best,
            (k, _) => k,
        }
    }
}

/// The skinny product with a given kernel (falls back to a slower one where the CPU lacks it).
pub fn gemv_with<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, kernel: Kernel) -> Vec<f32> {
    debug_assert!(x.len() == m * k && w.len() == n * k);
    let mut out_t = vec![0f32; n * m]; // [n, m]
    let bn = block_columns(n);
    out_t.par_chunks_mut(bn * m).enumerate().for_each(|(bi, o)| columns(x, m, k, w, bi * bn, o, kernel));
    transpose(&out_t, n, m)
}

thread_local! {
    /// Per-thread buffer for widened weight blocks (reused: no allocation or page faults per call).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Output features per block of the wide product: the block's weights, widened to f32 (at most
/// 128 x in_features x 4 bytes), stay in L2 while gemm runs over them.
const WIDE_BLOCK_N: usize = 128;

/// x: [m, k] f32, w: [n, k] bf16 bits -> [m, n] f32, for many rows (prefill): each parallel task
/// widens one block of weight rows into a reused buffer and multiplies it with gemm. No weight-sized
/// temporary is ever allocated.
pub fn matmul_bf16_wide(x: &[f32], m: usize, k: usize, w: &[u16], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    debug_assert!(x.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    let mut y = vec![0f32; m * n]; // [m, n]
    let yp = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(WIDE_BLOCK_N)).into_par_iter().for_each(move |bi| {
        let yp = yp;
        SCRATCH.with(|cell| {
            let mut wf = cell.borrow_mut();
            if wf.len() < WIDE_BLOCK_N * k {
                wf.resize(WIDE_BLOCK_N * k, 0.0);
            }
            let n0 = bi * WIDE_BLOCK_N;
            let nb = WIDE_BLOCK_N.min(n - n0);
            for (dst, &b) in wf[..nb * k].iter_mut().zip(&w[n0 * k..(n0 + nb) * k]) {
                *dst = bf16_to_f32(b);
            }
            // SAFETY: the destination is the column block y[:, n0..n0+nb] (row stride n), written by
            // this task only; x is [m, k] row-major; wf holds [nb, k] row-major, read as its
            // transpose [k, nb] (row stride 1, column stride k).
            unsafe {
                gemm::gemm(
                    m,
                    nb,
                    k,
                    yp.0.add(n0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    wf.as_ptr(),
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
            // The bias is added to the finished products (not preloaded into gemm's accumulator, which
            // adds it before the later depth blocks): the same rounding as the tracked linear op's
            // `x W^T + b`, so a layer gives the same numbers with or without autograd.
            if let Some(b) = bias {
                for r in 0..m {
                    // SAFETY: row r of this task's column block, as written by gemm above.
                    let row = unsafe { std::slice::from_raw_parts_mut(yp.0.add(r * n + n0), nb) };
                    row.iter_mut().zip(&b[n0..n0 + nb]).for_each(|(y, b)| *y += b);
                }
            }
        })
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn matches_f64_reference() {
        for (m, k, n) in [(3, 37, 130), (40, 65, 300), (1, 576, 1536), (2, 1536, 579)] {
            check(m, k, n);
        }
    }

    fn check(m: usize, k: usize, n: usize) {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let wf: Vec<f32> = (0..n * k).map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0).collect();
        let w: Vec<u16> = wf.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let y = gemv_bf16(&x, m, k, &w, n);
        let wr: Vec<f32> = w.iter().map(|&b| bf16_to_f32(b)).collect(); // the same weights in f32
        for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
            let yk = gemv_with(&x, m, k, &w, n, kernel);
            let yf = gemv_with(&x, m, k, &wr, n, kernel);
            for ((a, b), c) in yk.iter().zip(&y).zip(&yf) {
                assert!((a - b).abs() < 1e-4 && (c - b).abs() < 1e-4, "{kernel:?} {m}x{k}x{n}: {a}, {c} vs {b}");
            }
        }
        let yf32 = gemv_f32(&x, m, k, &wr, n);
        for (a, b) in yf32.iter().zip(&y) {
            assert!((a - b).abs() < 1e-4, "gemv_f32 {m}x{k}x{n}: {a} vs {b}");
        }
        let wide = matmul_bf16_wide(&x, m, k, &w, n, None);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.5).collect();
        let wide_b = matmul_bf16_wide(&x, m, k, &w, n, Some(&bias));
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * bf16::from_bits(w[j * k + i]).to_f64()).sum();
                assert!((y[r * n + j] as f64 - want).abs() < 1e-4, "{r},{j}");
                assert!((wide[r * n + j] as f64 - want).abs() < 1e-4, "wide {r},{j}");
                assert!((wide_b[r * n + j] as f64 - want - bias[j] as f64).abs() < 1e-4, "wide + bias {r},{j}");
            }
        }
    }
}
