//! The integer kernels behind [`super::resample`]: Pillow's fixed-point filter weights, the
//! vertical pass (8 columns at a time, AVX2 when available), the horizontal pass (the vertical
//! kernel on the transposed rows: same sums, wide SIMD), and buffer management (huge-page hints
//! and a bounded pool of large scratch buffers, at most 64 MiB kept).

use rayon::prelude::*;

use super::resample::{Filter, ImageView};

/// Fractional bits of the fixed-point coefficients (`32 - 8 - 2`, as Pillow for 8-bit images).
pub(crate) const PRECISION_BITS: u32 = 22;

/// Fixed-point filter weights for one axis: output `i` reads inputs `start[i] .. start[i] + len[i]`
/// with weights `k[i * stride ..][.. len[i]]` (`stride` = Pillow's `ksize`).
pub(crate) struct Coeffs {
    stride: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
    pub(crate) fn new(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
        // Pillow passes the box as C floats: `(double)(in1 - in0) / outSize`.
        let scale = (in_size as f32 as f64) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let stride = ksize;
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * stride];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = 0.0 + (xx as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = ((xmax - xmin).max(0) as usize).min(ksize);
            let mut ww = 0.0f64;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let v = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *wx = v;
                ww += v;
            }
            let row = &mut k[xx * stride..xx * stride + n];
            for (dst, &v) in row.iter_mut().zip(&w[..n]) {
                let v = if ww != 0.0 { v / ww } else { v };
                let f = v * (1i64 << PRECISION_BITS) as f64;
                *dst = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
            }
            start.push((xmin as usize).min(in_size));
            len.push(n);
        }
        Coeffs { stride, start, len, k }
    }

    /// First and one-past-last input index any output reads.
    pub(crate) fn span(&self) -> (usize, usize) {
        let n = self.start.len();
        if n == 0 {
            return (0, 0);
        }
        (self.start[0], self.start[n - 1] + self.len[n - 1])
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (self.start[i], &self.k[i * self.stride..i * self.stride + self.len[i]])
    }
}

#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// The vertical kernel: one output row from the weighted source rows, compiled twice (plain and
/// with AVX2, chosen at run time). Integer results are identical (wrapping `i32` sums do not
/// depend on the order); AVX2 only makes the multiply-adds 8 wide.
type RowKernel = fn(&mut [u8], &[&[u8]], &[i32]);

fn row_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return vrow_avx2;
        }
    }
    vrow_any
}

#[cfg(target_arch = "x86_64")]
fn vrow_avx2(dst: &mut [u8], rows: &[&[u8]], k: &[i32]) {
    #[target_feature(enable = "avx2")]
    unsafe fn inner(dst: &mut [u8], rows: &[&[u8]], k: &[i32]) {
        vrow_any(dst, rows, k)
    }
    // SAFETY: only selected by `row_kernel()` after detecting AVX2.
    unsafe { inner(dst, rows, k) }
}

/// `dst[i] = clip8(HALF + sum_t rows[t][i] * k[t])`, 8 columns at a time in registers.
#[inline(always)]
fn vrow_any(dst: &mut [u8], rows: &[&[u8]], k: &[i32]) {
    let n = dst.len();
    let full = n / 8 * 8;
    for (ci, d) in dst[..full].chunks_exact_mut(8).enumerate() {
        let i = ci * 8;
        let mut acc = [HALF; 8];
        for (row, &kv) in rows.iter().zip(k) {
            let Ok(r) = <&[u8; 8]>::try_from(&row[i..i + 8]) else { continue };
            for j in 0..8 {
                acc[j] = acc[j].wrapping_add((r[j] as i32).wrapping_mul(kv));
            }
        }
        for j in 0..8 {
            d[j] = clip8(acc[j]);
        }
    }
    for (i, d) in dst.iter_mut().enumerate().skip(full) {
        let mut acc = HALF;
        for (row, &kv) in rows.iter().zip(k) {
            acc = acc.wrapping_add((row[i] as i32).wrapping_mul(kv));
        }
        *d = clip8(acc);
    }
}

/// Horizontal pass over `rows` (`[n_rows, in_w, c]`) -> `[n_rows, out_w, c]`, computed as the
/// vertical kernel on the transposed image (the same sums, in wide SIMD), then transposed back.
pub(crate) fn horizontal(rows: &[u8], in_w: usize, c: usize, co: &Coeffs) -> Vec<u8> {
    let out_w = co.start.len();
    let n_rows = if in_w == 0 { 0 } else { rows.len() / (in_w * c) };
    if n_rows == 0 || out_w == 0 {
        return Vec::new();
    }
    let t = transpose(rows, n_rows, in_w, c);
    let filtered = vertical(ImageView { width: n_rows, height: in_w, channels: c, data: &t }, co, 0);
    recycle_u8(t);
    let out = transpose(&filtered, out_w, n_rows, c);
    recycle_u8(filtered);
    out
}

/// `[h, w, c]` -> `[w, h, c]`, in cache-sized tiles, in parallel over output rows.
fn transpose(src: &[u8], h: usize, w: usize, c: usize) -> Vec<u8> {
    match c {
        1 => transpose_c::<1>(src, h, w),
        2 => transpose_c::<2>(src, h, w),
        3 => transpose_c::<3>(src, h, w),
        _ => transpose_c::<4>(src, h, w),
    }
}

fn transpose_c<const C: usize>(src: &[u8], h: usize, w: usize) -> Vec<u8> {
    const TILE: usize = 64;
    let mut dst = scratch_u8(h * w * C);
    dst.par_chunks_mut(TILE * h * C).enumerate().for_each(|(bx, block)| {
        let x0 = bx * TILE;
        let nx = block.len() / (h * C);
        for y0 in (0..h).step_by(TILE) {
            let y1 = (y0 + TILE).min(h);
            for x in 0..nx {
                let out = &mut block[(x * h + y0) * C..(x * h + y1) * C];
                for (y, o) in (y0..y1).zip(out.chunks_exact_mut(C)) {
                    let i = (y * w + x0 + x) * C;
                    o.copy_from_slice(&src[i..i + C]);
                }
            }
        }
    });
    dst
}

/// Asks Linux to back a large, not yet touched buffer with transparent huge pages: first-touch
/// page faults dominate the cost of filling fresh multi-megabyte buffers otherwise. No-op
/// elsewhere and for small buffers; purely a hint (contents and ownership are unaffected).
pub(crate) fn hint_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        let bytes = std::mem::size_of_val(buf);
        if bytes < 2 * HUGE {
            return;
        }
        let p = buf.as_mut_ptr() as usize;
        let (start, end) = (p.div_ceil(HUGE) * HUGE, (p + bytes) / HUGE * HUGE);
        if end > start {
            // SAFETY: [start, end) lies inside `buf`, which we borrow mutably; MADV_HUGEPAGE only
            // changes how the kernel backs those pages, never their contents.
            unsafe {
                madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE);
            }
        }
    }
}

/// A zeroed `u8` buffer, huge-page backed when large (see [`hint_huge_pages`]).
fn alloc_u8(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    hint_huge_pages(&mut v);
    v
}

/// Large intermediate buffers kept for reuse (at most [`POOL_BYTES`] in all): refilling warm
/// memory is much cheaper than faulting in fresh pages for every pass of every image.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
const POOL_BYTES: usize = 64 << 20;

/// A buffer of length `n` whose contents are unspecified: callers overwrite every byte.
pub(crate) fn scratch_u8(n: usize) -> Vec<u8> {
    if let Ok(mut pool) = POOL.lock() {
        let best = (0..pool.len()).filter(|&i| pool[i].capacity() >= n).min_by_key(|&i| pool[i].capacity());
        if let Some(i) = best {
            let mut b = pool.swap_remove(i);
            drop(pool);
            if b.len() >= n {
                b.truncate(n);
            } else {
                b.resize(n, 0);
            }
            return b;
        }
    }
    alloc_u8(n)
}

/// Returns a buffer for reuse by [`scratch_u8`] (dropped if small or the pool is full).
pub(crate) fn recycle_u8(v: Vec<u8>) {
    if v.capacity() < (1 << 20) {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if held + v.capacity() <= POOL_BYTES {
            pool.push(v);
        }
    }
}

/// Vertical pass: output row `yy` combines rows `start - offset ..` of `src`.
pub(crate) fn vertical(src: ImageView<'_>, co: &Coeffs, offset: usize) -> Vec<u8> {
    let row_len = src.width * src.channels;
    let out_h = co.start.len();
    let mut out = scratch_u8(out_h * row_len);
    if out.is_empty() {
        return out;
    }
    let kern = row_kernel();
    out.par_chunks_mut(row_len).enumerate().for_each(|(yy, dst)| {
        let (ymin, k) = co.taps(yy);
        let rows: Vec<&[u8]> =
            (0..k.len()).map(|t| ymin + t - offset).map(|r| &src.data[r * row_len..(r + 1) * row_len]).collect();
        kern(dst, &rows, k);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_and_transpose_round_trips() {
        let rows_data: Vec<Vec<u8>> =
            (0..5).map(|r| (0..37).map(|i| ((i * 91 + r * 17) % 256) as u8).collect()).collect();
        let rows: Vec<&[u8]> = rows_data.iter().map(Vec::as_slice).collect();
        let k = [-300_000, 1_500_000, 3_000_000, 1_500_000, -200_000];
        let (mut a, mut b) = (vec![0u8; 37], vec![0u8; 37]);
        vrow_any(&mut a, &rows, &k);
        row_kernel()(&mut b, &rows, &k);
        assert_eq!(a, b);
        let x: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let t = transpose(&x, 5, 7, 3);
        assert_eq!(&t[3..6], &x[21..24]); // (x=0, y=1)
        assert_eq!(transpose(&t, 7, 5, 3), x);
    }
}
