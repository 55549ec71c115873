//! GFLOP/s of the bf16 matmul on AMX tiles (`ops::matmul_bf16_amx`) vs the AVX512-BF16 kernel
//! (`ops::matmul_bf16_packed`) on the SmolLM2-135M shapes, same packed weight, alternating the two.
//!
//! `cargo run --release --example bench_amx` (AMX needs a Sapphire Rapids or later Xeon; elsewhere both
//! columns run the same AVX512-BF16 / portable path). Prints the load average next to the numbers: on a
//! shared machine compare the two columns of one run, not runs.
use std::time::Instant;

use ferrovlm::ops::{matmul_bf16_amx, matmul_bf16_packed};
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
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[iters / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() {
    println!(
        "AMX usable: {}; AVX512-BF16: {}; rayon threads: {}; load average: {}",
        matmul_bf16_amx::amx_usable(),
        matmul_bf16_packed::available(),
        rayon::current_num_threads(),
        loadavg()
    );
    if let Some(p) = matmul_bf16_amx::amx_peak_gflops(2_000_000) {
        println!("register-only tdpbf16ps peak right now (all threads): {p:.0} GFLOP/s");
    }
    println!("{:>18} | {:>11} {:>11} | {:>7} | {:>8}", "n x k x out", "avx512bf16", "amx", "speedup", "max|d|");
    let (mut sum_a, mut sum_b) = (0.0, 0.0);
    for &(k, out) in &[(576usize, 576usize), (576, 192), (576, 1536), (1536, 576)] {
        let w: Vec<bf16> = values(out * k, 7).into_iter().map(|v| bf16::from_f32(v * 0.05)).collect();
        let packed = matmul_bf16_packed::pack(&w, out, k);
        for &n in &[16usize, 64, 128, 256, 512] {
            let x = values(n * k, n as u64);
            let flop = 2.0 * (n * k * out) as f64;
            let iters = ((2e9 / flop) as usize).clamp(5, 200);
            // Rounds alternate the two so that other load on a shared machine slows both alike.
            let (mut ta, mut tb) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                ta = ta.min(time(iters, || matmul_bf16_packed::matmul_packed_avx512bf16(&x, n, k, &packed)));
                tb = tb.min(time(iters, || matmul_bf16_amx::matmul_packed_amx(&x, n, k, &packed)));
            }
            let ya = matmul_bf16_packed::matmul_packed_avx512bf16(&x, n, k, &packed);
            let yb = matmul_bf16_amx::matmul_packed_amx(&x, n, k, &packed);
            let maxd = ya.iter().zip(&yb).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let g = |t: f64| flop / t / 1e9;
            sum_a += ta;
            sum_b += tb;
            println!(
                "{:>18} | {:>11.1} {:>11.1} | {:>6.2}x | {:>8.1e}",
                format!("{n} x {k} x {out}"),
                g(ta),
                g(tb),
                ta / tb,
                maxd
            );
        }
    }
    println!(
        "all shapes, total time: avx512bf16 {:.2} ms, amx {:.2} ms ({:.2}x)",
        sum_a * 1e3,
        sum_b * 1e3,
        sum_a / sum_b
    );
    println!(
        "load average: {} (GFLOP/s: best of 3 alternating rounds of the median of repeated calls, x included)",
        loadavg()
    );
}
