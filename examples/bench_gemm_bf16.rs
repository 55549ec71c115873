//! GFLOP/s of the AVX512-BF16 gemm (`ops::matmul_bf16_packed`) vs candle's f32 matmul on the same shapes.
//!
//! `cargo run --release --example bench_gemm_bf16`
use std::time::Instant;

use candle_core::{Device, Tensor};
use ferrovlm::ops::matmul_bf16_packed;
use half::bf16;

/// Median seconds per call over `iters` calls after one warm-up.
fn time<T>(iters: usize, mut f: impl FnMut() -> T) -> f64 {
    std::hint::black_box(f());
    let mut ts: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[iters / 2]
}

/// GFLOP/s of a register-only `vdpbf16ps` loop on every rayon thread: what this machine gives now
/// (other load included), to read the table against.
#[cfg(target_arch = "x86_64")]
fn peak_now() -> Option<f64> {
    use core::arch::x86_64::*;
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn spin(iters: usize) -> f32 {
        let b: __m512bh = core::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
        let mut a = [_mm512_setzero_ps(); 24];
        for _ in 0..iters {
            for acc in a.iter_mut() {
                *acc = _mm512_dpbf16_ps(*acc, b, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for acc in a {
            s = _mm512_add_ps(s, acc);
        }
        _mm512_reduce_add_ps(s)
    }
    if !matmul_bf16_packed::available() {
        return None;
    }
    use rayon::prelude::*;
    let (iters, th) = (5_000_000usize, rayon::current_num_threads());
    let t = Instant::now();
    // SAFETY: `spin` needs avx512f, which the caller checked before calling this function.
    let s: f32 = (0..th).into_par_iter().map(|_| unsafe { spin(iters) }).sum();
    std::hint::black_box(s);
    Some((th * iters * 24 * 64) as f64 / t.elapsed().as_secs_f64() / 1e9)
}
#[cfg(not(target_arch = "x86_64"))]
fn peak_now() -> Option<f64> {
    None
}

fn main() {
    let shapes: &[(usize, usize, usize)] =
        &[(1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768), (348, 576, 1536), (1024, 12288, 576)];
    let dev = Device::Cpu;
    if let Some(p) = peak_now() {
        println!("register-only vdpbf16ps peak right now (all threads): {p:.1} GFLOP/s");
    }
    println!(
        "avx512bf16 kernel available: {}; rayon threads: {}",
        matmul_bf16_packed::available(),
        rayon::current_num_threads()
    );
    println!(
        "{:>22} | {:>12} {:>12} {:>12} | {:>10} | {:>8}",
        "n x k x out", "bf16 packed", "bf16+pack", "candle f32", "speedup", "max|d|"
    );
    for &(n, k, out) in shapes {
        let flop = 2.0 * (n * k * out) as f64;
        let iters = ((20e9 / flop) as usize).clamp(5, 50);
        let xt = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.02, (out, k), &dev).unwrap();
        let x: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<bf16> =
            wt.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(bf16::from_f32).collect();
        let packed = matmul_bf16_packed::pack(&w, out, k);

        let wtt = wt.t().unwrap();
        // Rounds interleave the three so a shared, busy machine slows them alike.
        let (mut tp, mut tf, mut tc) = (vec![], vec![], vec![]);
        for _ in 0..3 {
            tp.push(time(iters, || matmul_bf16_packed::matmul_packed(&x, n, k, &packed)));
            tf.push(time(iters, || matmul_bf16_packed::matmul_f32_bf16(&x, n, k, &w, out)));
            tc.push(time(iters, || xt.matmul(&wtt).unwrap()));
        }
        let best = |v: &Vec<f64>| v.iter().cloned().fold(f64::INFINITY, f64::min);
        let (t_packed, t_full, t_candle) = (best(&tp), best(&tf), best(&tc));

        let y = matmul_bf16_packed::matmul_packed(&x, n, k, &packed);
        let yc: Vec<f32> = xt.matmul(&wtt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let maxd = y.iter().zip(&yc).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let g = |t: f64| flop / t / 1e9;
        println!(
            "{:>22} | {:>12.1} {:>12.1} {:>12.1} | {:>9.2}x | {:>8.2e}",
            format!("{n} x {k} x {out}"),
            g(t_packed),
            g(t_full),
            g(t_candle),
            t_candle / t_packed,
            maxd
        );
    }
    if let Some(p) = peak_now() {
        println!("register-only vdpbf16ps peak right now (all threads): {p:.1} GFLOP/s");
    }
    println!("(GFLOP/s, best of 3 interleaved rounds of the median of repeated calls; bf16 packed = weight packed once; bf16+pack = packs per call)");
}
