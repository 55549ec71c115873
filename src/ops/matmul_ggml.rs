//! y = x W^T for a weight kept in GGML blocks (`quant::ggml::GgmlWeight`): the fast kernels behind
//! `matmul_quant`'s dispatch for `QuantWeight::Ggml`.
//!
//! Activations stay f32 and every weight is decoded to exactly its reference value
//! (`ggml::dequantize_row`, see `ggml_simd`), so results equal the dequantized math up to the order of
//! the f32 sums (llama.cpp instead quantizes x to 8 bits and takes integer dot products).
//! * few rows of x (decoding, [`few_rows`]): each task owns a range of output rows and reads their
//!   blocks straight from the packed bytes, one row after the other, decoding them in registers and
//!   taking their dot products with up to 4 rows of x at once; more rows of x go in groups of 4 over
//!   the same (cached) blocks;
//! * many rows (prefill, training, backward): [`decode_rows`] decodes a tile of W into f32, and
//!   `matmul_quant` runs gemm on it.
//!
//! Types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, with AVX-512 (16 lanes) or AVX2+FMA (8
//! lanes) chosen at run time; other types and other CPUs take `matmul_quant`'s generic path (the
//! reference decoding row by row, then f32 dot products). [`reference`]: dequantize all, then a plain
//! matmul (tests).

use rayon::prelude::*;

use super::cpu::SendPtr;
#[cfg(target_arch = "x86_64")]
use super::ggml_simd::{Avx2, Avx512};
use super::ggml_simd::{Block, Simd, Sink, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0};
use crate::quant::ggml::{GgmlType, GgmlWeight};

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
}

/// The best [`Isa`] of this CPU, None without AVX2+FMA+F16C.
pub(crate) fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if !has!("f16c") {
            return None;
        }
        if has!("avx512f") && has!("avx2") && has!("fma") {
            return Some(Isa::Avx512);
        }
        if has!("avx2") && has!("fma") {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// Whether `ty` has fast kernels here.
pub fn fast(ty: GgmlType) -> bool {
    isa().is_some() && block_type(ty)
}

fn block_type(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// Calls `$f::<Block type>` for a GGML type with fast kernels, else evaluates `$else`.
macro_rules! with_block {
    ($ty:expr, $f:ident, ($($arg:expr),*), $else:expr) => {
        match $ty {
            GgmlType::Q8_0 => $f::<Q8_0>($($arg),*),
            GgmlType::Q4_0 => $f::<Q4_0>($($arg),*),
            GgmlType::Q4_1 => $f::<Q4_1>($($arg),*),
            GgmlType::Q5_0 => $f::<Q5_0>($($arg),*),
            GgmlType::Q5_1 => $f::<Q5_1>($($arg),*),
            GgmlType::Q4K => $f::<Q4K>($($arg),*),
            GgmlType::Q5K => $f::<Q5K>($($arg),*),
            GgmlType::Q6K => $f::<Q6K>($($arg),*),
            _ => $else,
        }
    };
}

/// y [n, out] += x [n, in] W^T, read straight from the blocks (n of any size; meant for few rows).
/// Returns false, touching nothing, when there is no fast kernel for the type on this CPU.
pub fn few_rows(x: &[f32], n: usize, w: &GgmlWeight, y: &mut [f32]) -> bool {
    match isa() {
        Some(i) if block_type(w.ty) => {
            few_rows_with(i, x, n, w, y);
            true
        }
        _ => false,
    }
}

pub(crate) fn few_rows_with(isa: Isa, x: &[f32], n: usize, w: &GgmlWeight, y: &mut [f32]) {
    let (out, k) = w.shape;
    assert!(x.len() >= n * k && y.len() >= n * out && block_type(w.ty));
    if n == 0 || out == 0 {
        return;
    }
    // A few tasks per thread (balance when a thread is held up), each at least 16 rows.
    let per_task = out.div_ceil(4 * rayon::current_num_threads()).max(16).next_multiple_of(4);
    let (wp, xp, yp) =
        (SendPtr(w.data().as_ptr() as *mut u8), SendPtr(x.as_ptr() as *mut f32), SendPtr(y.as_mut_ptr()));
    let rb = w.row_bytes();
    let ty = w.ty;
    par_tasks(out.div_ceil(per_task), &move |t| {
        let (wp, xp, yp) = (wp, xp, yp);
        let (o0, o1) = (t * per_task, ((t + 1) * per_task).min(out));
        let a = Args { w: wp.0, rb, x: xp.0, n, k, out, y: yp.0, o0, o1 };
        // SAFETY: the CPU has the features of `isa` (checked by the caller); W holds out rows of rb
        // bytes (GgmlWeight::new), x n rows of k, y n rows of out; this task writes only the columns
        // o0..o1 of y.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => with_block!(ty, task_avx512, (a), ()),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => with_block!(ty, task_avx2, (a), ()),
                #[cfg(not(target_arch = "x86_64"))]
                _ => {}
            }
        }
    });
}

/// Runs `f(t)` for t in 0..tasks on the calling thread and rayon's threads, each task once.
///
/// On a thread of rayon's pool this is a plain parallel loop. From outside the pool (how the model
/// calls its kernels), a parallel loop hands the whole job to the pool and sleeps until it is done,
/// ~8 us per call (measured with examples/bench_ggml.rs --outside: 1.8 ms of a 4.3 ms decoding step
/// of SmolLM2-135M's matmuls); here the calling thread works too and the pool's threads join in
/// through `rayon::spawn`: every participant claims tasks from one counter, and the caller waits,
/// spinning, until all claimed tasks are done. A helper that starts late finds no task left and
/// touches nothing but the shared counters (on the heap). `f` must not panic (a helper's panic would
/// leave the caller waiting).
fn par_tasks(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let threads = rayon::current_num_threads();
    if tasks <= 1 || threads <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    if rayon::current_thread_index().is_some() {
        (0..tasks).into_par_iter().for_each(f);
        return;
    }
    struct Shared {
        next: AtomicUsize,
        done: AtomicUsize,
        tasks: usize,
        f: *const (dyn Fn(usize) + Sync + 'static),
    }
    // SAFETY: `f` is Sync, and dereferenced only for a claimed task, while the caller (which keeps
    // it alive) waits for that task to be done; the counters are atomics.
    unsafe impl Send for Shared {}
    // SAFETY: as for Send.
    unsafe impl Sync for Shared {}
    impl Shared {
        fn work(&self) {
            loop {
                let t = self.next.fetch_add(1, Ordering::Relaxed);
                if t >= self.tasks {
                    return;
                }
                // SAFETY: t was claimed before all tasks were done, so the caller still waits and
                // `f` is alive (see `par_tasks`).
                unsafe { (*self.f)(t) };
                self.done.fetch_add(1, Ordering::Release);
            }
        }
    }
    // SAFETY: only the lifetime is erased; see Shared.
    let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
    let shared = Arc::new(Shared { next: AtomicUsize::new(0), done: AtomicUsize::new(0), tasks, f });
    for _ in 1..threads.min(tasks) {
        let s = shared.clone();
        rayon::spawn(move || s.work());
    }
    shared.work();
    let mut spins = 0u32;
    while shared.done.load(Ordering::Acquire) < tasks {
        spins += 1;
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// One task's share of [`few_rows`]: output rows o0..o1.
#[derive(Clone, Copy)]
struct Args {
    w: *const u8,
    rb: usize,
    x: *const f32,
    n: usize,
    k: usize,
    out: usize,
    y: *mut f32,
    o0: usize,
    o1: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn task_avx512<B: Block>(a: Args) {
    task::<Avx512, B>(a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2<B: Block>(a: Args) {
    task::<Avx2, B>(a)
}

#[inline(always)]
unsafe fn task<S: Simd, B: Block>(a: Args) {
    let mut r0 = 0;
    while r0 < a.n {
        let g = (a.n - r0).min(4);
        for o in a.o0..a.o1 {
            match g {
                1 => dot::<S, B, 1>(&a, o, r0),
                2 => dot::<S, B, 2>(&a, o, r0),
                3 => dot::<S, B, 3>(&a, o, r0),
                _ => dot::<S, B, 4>(&a, o, r0),
            }
        }
        r0 += g;
    }
}

/// The dot products of decoded chunks with N rows of x: `acc[r][chain]` += v x[r, base + c LANES..].
struct Dot<S: Simd, const N: usize, const CHAINS: usize> {
    acc: [[S::F; 4]; N],
    x: *const f32,
    k: usize,
    base: usize,
    /// chain of chunk c: (first + c) % CHAINS
    first: usize,
}

impl<S: Simd, const N: usize, const CHAINS: usize> Sink<S> for Dot<S, N, CHAINS> {
    #[inline(always)]
    unsafe fn put(&mut self, c: usize, v: S::F) {
        let chain = (self.first + c) % CHAINS;
        for (r, acc) in self.acc.iter_mut().enumerate() {
            let xv = S::load(self.x.add(r * self.k + self.base + c * S::LANES));
            acc[chain] = S::fma(v, xv, acc[chain]);
        }
    }
}

/// y[r0 + r, o] += x[r0 + r] . W[o] for r < N: the blocks of weight row o decoded in registers, with
/// 4 accumulator chains per row of x for N <= 2 (the multiply-add latency), 2 above (registers); the
/// 32-value blocks go two at a time so that each chain gets every fourth chunk. Every chain index is
/// a constant after inlining (the decoders' chunk loops unroll), so the accumulators stay in
/// registers. One weight row at a time: the task reads its rows as one sequential stream (decoding
/// two or four rows side by side, so that x is loaded once for them, was 2-4x slower on weights
/// streamed from memory: measured with examples/bench_ggml.rs).
#[inline(always)]
unsafe fn dot<S: Simd, B: Block, const N: usize>(a: &Args, o: usize, r0: usize) {
    if N <= 2 {
        dot_chains::<S, B, N, 4>(a, o, r0)
    } else {
        dot_chains::<S, B, N, 2>(a, o, r0)
    }
}

#[inline(always)]
unsafe fn dot_chains<S: Simd, B: Block, const N: usize, const CHAINS: usize>(a: &Args, o: usize, r0: usize) {
    let per_block = B::BS / S::LANES; // chunks per block
    let unroll = if B::BS == 32 { 2 } else { 1 };
    let mut d = Dot::<S, N, CHAINS> { acc: [[S::zero(); 4]; N], x: a.x.add(r0 * a.k), k: a.k, base: 0, first: 0 };
    let row = a.w.add(o * a.rb);
    let blocks = a.k / B::BS;
    let mut bi = 0;
    while bi + unroll <= blocks {
        for u in 0..unroll {
            d.base = (bi + u) * B::BS;
            d.first = u * per_block;
            B::decode::<S, _>(row.add((bi + u) * B::TS), &mut d);
        }
        bi += unroll;
    }
    if bi < blocks {
        d.base = bi * B::BS;
        d.first = 0;
        B::decode::<S, _>(row.add(bi * B::TS), &mut d);
    }
    for (r, acc) in d.acc.iter().enumerate() {
        let s = S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]));
        *a.y.add((r0 + r) * a.out + o) += S::sum(s);
    }
}

/// Rows r0..r0 + rows of W dequantized into dst ([rows, in]): vectorised where the type has fast
/// kernels (the same values bit for bit), else the reference decoding.
pub fn decode_rows(w: &GgmlWeight, r0: usize, rows: usize, dst: &mut [f32]) {
    match isa() {
        Some(i) if block_type(w.ty) => decode_rows_with(i, w, r0, rows, dst),
        _ => w.decode_rows(r0, rows, dst),
    }
}

pub(crate) fn decode_rows_with(isa: Isa, w: &GgmlWeight, r0: usize, rows: usize, dst: &mut [f32]) {
    let (out, k) = w.shape;
    assert!(r0 + rows <= out && dst.len() >= rows * k && block_type(w.ty));
    let rb = w.row_bytes();
    let src = w.data()[r0 * rb..(r0 + rows) * rb].as_ptr();
    let ty = w.ty;
    // SAFETY: the CPU has the features of `isa` (checked by the caller); src holds `rows` rows of rb
    // bytes, dst `rows` rows of k values.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => with_block!(ty, decode_avx512, (src, rb, k, rows, dst.as_mut_ptr()), ()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => with_block!(ty, decode_avx2, (src, rb, k, rows, dst.as_mut_ptr()), ()),
            #[cfg(not(target_arch = "x86_64"))]
            _ => {}
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn decode_avx512<B: Block>(src: *const u8, rb: usize, k: usize, rows: usize, dst: *mut f32) {
    decode::<Avx512, B>(src, rb, k, rows, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_avx2<B: Block>(src: *const u8, rb: usize, k: usize, rows: usize, dst: *mut f32) {
    decode::<Avx2, B>(src, rb, k, rows, dst)
}

/// Stores decoded chunks at `d`.
struct Store(*mut f32);

impl<S: Simd> Sink<S> for Store {
    #[inline(always)]
    unsafe fn put(&mut self, c: usize, v: S::F) {
        S::store(self.0.add(c * S::LANES), v)
    }
}

#[inline(always)]
unsafe fn decode<S: Simd, B: Block>(src: *const u8, rb: usize, k: usize, rows: usize, dst: *mut f32) {
    for r in 0..rows {
        for bi in 0..k / B::BS {
            B::decode::<S, _>(src.add(r * rb + bi * B::TS), &mut Store(dst.add(r * k + bi * B::BS)));
        }
    }
}

/// The reference: W dequantized whole (`GgmlWeight::decode_rows`), then y [n, out] = x W^T with f64
/// sums. Tests and benchmarks only.
pub fn reference(x: &[f32], n: usize, w: &GgmlWeight) -> Vec<f32> {
    let (out, k) = w.shape;
    let mut wd = vec![0f32; out * k]; // [out, k]
    w.decode_rows(0, out, &mut wd);
    let mut y = vec![0f32; n * out];
    for r in 0..n {
        for o in 0..out {
            let s: f64 =
                x[r * k..(r + 1) * k].iter().zip(&wd[o * k..(o + 1) * k]).map(|(a, b)| *a as f64 * *b as f64).sum();
            y[r * out + o] = s as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: [GgmlType; 8] = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * scale
            })
            .collect()
    }

    /// Random blocks: every byte random except finite f16 scales of realistic size.
    fn random_weight(ty: GgmlType, o: usize, k: usize, seed: u32) -> GgmlWeight {
        let w = values(o * k, seed, 0.3);
        let mut data = crate::quant::ggml_quantize::quantize(ty, &w, k).unwrap();
        let noise = values(data.len(), seed + 1, 2.0);
        let scale_at: &[usize] = match ty {
            GgmlType::Q6K => &[208],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            _ => &[0],
        };
        let ts = ty.type_size();
        for (i, b) in data.iter_mut().enumerate() {
            let off = i % ts;
            if !scale_at.iter().any(|&s| off == s || off == s + 1) {
                *b = ((noise[i] + 1.0) * 127.9) as u8; // every quant bit pattern, scales kept
            }
        }
        GgmlWeight::from_vec(ty, (o, k), data).unwrap()
    }

    fn isas() -> Vec<Isa> {
        match isa() {
            Some(Isa::Avx512) => vec![Isa::Avx512, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        }
    }

    #[test]
    fn par_tasks_runs_every_task_once_inside_and_outside_the_pool() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for tasks in [0, 1, 2, 7, 100] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            par_tasks(tasks, &|t| {
                counts[t].fetch_add(1, Ordering::Relaxed);
            });
            rayon::scope(|_| {
                par_tasks(tasks, &|t| {
                    counts[t].fetch_add(1, Ordering::Relaxed);
                })
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 2), "{tasks} tasks");
        }
    }

    #[test]
    fn vectorised_decoding_equals_the_reference_bit_for_bit() {
        for isa in isas() {
            for ty in TYPES {
                let k = if ty.block_size() == 256 { 512 } else { 96 };
                let w = random_weight(ty, 5, k, ty as u32);
                let mut want = vec![0f32; 3 * k];
                w.decode_rows(1, 3, &mut want);
                let mut got = vec![f32::NAN; 3 * k];
                decode_rows_with(isa, &w, 1, 3, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} {} value {i}: {a} vs {b}", ty.name());
                }
            }
        }
    }

    #[test]
    fn few_rows_kernels_equal_the_reference_up_to_summation_order() {
        for isa in isas() {
            for ty in TYPES {
                let k = if ty.block_size() == 256 { 768 } else { 160 };
                for o in [1, 6, 37] {
                    let w = random_weight(ty, o, k, 3 + o as u32);
                    let mut wd = vec![0f32; o * k];
                    w.decode_rows(0, o, &mut wd);
                    for n in [1, 2, 3, 4, 5, 7, 16] {
                        let x = values(n * k, 11 + n as u32, 4.0);
                        let want = reference(&x, n, &w);
                        let mut got = vec![0.5f32; n * o]; // the kernels add to y (the bias)
                        few_rows_with(isa, &x, n, &w, &mut got);
                        for r in 0..n {
                            for j in 0..o {
                                let scale: f32 = (0..k).map(|c| (x[r * k + c] * wd[j * k + c]).abs()).sum();
                                let (g, e) = (got[r * o + j] - 0.5, want[r * o + j]);
                                assert!(
                                    (g - e).abs() <= 1e-5 * scale + 1e-6,
                                    "{isa:?} {} [{o}x{k}] n={n} y[{r}, {j}]: {g} vs {e} (scale {scale})",
                                    ty.name()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
