//! CPU helpers shared by the kernels: f32 views of tensors and custom-op arguments, how to split rows
//! over rayon's threads, the gemm crate's parallelism, and one raw-pointer wrapper for disjoint
//! parallel writes.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Runs `f` on t's values as one contiguous f32 CPU slice: no copy when t already is one, else a
/// converted copy.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (s, l) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*s, l.contiguous_offsets()) {
            return Ok(f(&v[a..b]));
        }
    }
    let v: Vec<f32> = t.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1()?;
    Ok(f(&v))
}

/// The contiguous f32 values of a custom op's CPU argument.
pub(crate) fn f32_arg<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: the CPU kernel needs contiguous f32 arguments"),
    }
}

/// The contiguous f32 values of a custom op's argument (CPU only).
pub(crate) fn storage_f32<'a>(s: &'a Storage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_arg(c, l, op),
        _ => candle_core::bail!("{op}: the CPU kernel needs CPU tensors"),
    }
}

/// Rows per parallel task for row-wise kernels over `n` rows of `h` values: a few tasks per thread,
/// at least ~16k values each.
pub(crate) fn rows_per_task(n: usize, h: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    n.div_ceil(tasks).max(16_384usize.div_ceil(h.max(1))).max(1)
}

/// y [rows, out] += b [out] on every row (in parallel).
pub(crate) fn add_bias_rows(y: &mut [f32], b: &[f32]) {
    use rayon::prelude::*;
    y.par_chunks_mut(b.len().max(1)).for_each(|r| r.iter_mut().zip(b).for_each(|(y, b)| *y += b));
}

/// The gemm crate's parallelism over rayon's threads (none on one thread).
pub(crate) fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    }
}

/// [rows, cols] -> [cols, rows]
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for (i, row) in a.chunks_exact(cols).enumerate() {
        for (j, v) in row.iter().enumerate() {
            out[j * rows + i] = *v;
        }
    }
    out
}

/// A raw pointer into an output buffer that parallel tasks write to, each task its own disjoint
/// part. Whoever creates one keeps the buffer alive (and unmoved) until every task has finished.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: the pointer is only dereferenced for disjoint writes (see the type's doc), so sharing it
// between threads cannot create a data race; the buffer outlives the tasks by the creator's contract.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for Send: tasks never touch the same elements.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `SendPtr`, not its field).
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// A read-only f32 matrix view for [`gemm_into`]: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major rows of length >= cols, `rs` apart.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }
    /// The transpose of row-major rows `rs` apart: element (i, j) is row j's value i (x W^T reads
    /// the weight [out, in] this way).
    pub fn transposed(data: &'a [f32], rs: usize) -> Self {
        Mat { data, rs: 1, cs: rs }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// dst [m, n] (rows `dst_rs` apart) = a [m, k] b [k, n], or += when `accumulate`: the gemm crate
/// with the given parallelism. Panics when a view is too short for its shape (a caller bug).
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    mnk: (usize, usize, usize),
    a: Mat,
    b: Mat,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    gemm_scaled_into(dst, dst_rs, mnk, a, b, accumulate, 1.0, par)
}

/// [`gemm_into`] with the product scaled: dst = scale a b, or dst += scale a b.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_scaled_into(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: Mat,
    b: Mat,
    accumulate: bool,
    scale: f32,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_rs >= n && (m - 1) * dst_rs + n <= dst.len() && a.fits(m, k) && b.fits(k, n),
        "gemm_into: views too short for [{m}, {k}] x [{k}, {n}]"
    );
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: every index the gemm reads or writes lies inside the slices (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}
