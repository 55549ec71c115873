//! GFLOP/s of the AVX512-BF16 gemm (`ops::gemm_bf16`) vs candle's f32 matmul on the same shapes.
//!
//! `CARGO_TARGET_DIR=/work/target-bf16 cargo run --release --example bench_gemm_bf16`
use std::time::Instant;

use candle_core::{Device, Tensor};
use ferrovlm::ops::gemm_bf16;
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

fn main() {
    let shapes: &[(usize, usize, usize)] = &[(1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768), (348, 576, 1536), (1024, 12288, 576)];
    let dev = Device::Cpu;
    println!("avx512bf16 kernel available: {}; rayon threads: {}", gemm_bf16::available(), rayon::current_num_threads());
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
        let w: Vec<bf16> = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(bf16::from_f32).collect();
        let packed = gemm_bf16::pack(&w, out, k);

        let t_packed = time(iters, || gemm_bf16::matmul_packed(&x, n, k, &packed));
        let t_full = time(iters, || gemm_bf16::matmul_f32_bf16(&x, n, k, &w, out));
        let wtt = wt.t().unwrap();
        let t_candle = time(iters, || xt.matmul(&wtt).unwrap());

        let y = gemm_bf16::matmul_packed(&x, n, k, &packed);
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
    println!("(GFLOP/s, median of repeated calls; bf16 packed = weight packed once; bf16+pack = packs per call)");
}
