//! The gemm crate's f32 rate at the text model's shapes next to a large square product, interleaved
//! (dev aid): cargo run --release --example profile_gemm_shapes
use std::time::Instant;

use candle_core::{Device, Tensor};

fn rate(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let bt = b.t().unwrap();
    a.matmul(&bt).unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        a.matmul(&bt).unwrap();
    }
    2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    for round in 0..4 {
        let big = rate(2048, 2048, 2048, 3);
        let shapes = [(400, 576, 1536), (400, 1536, 576), (400, 576, 576), (320, 576, 1536), (4096, 768, 3072)];
        let r: Vec<String> = shapes.iter().map(|&(m, k, n)| format!("{m}x{k}x{n} {:.0}", rate(m, k, n, 20))).collect();
        println!("round {round}: 2048^3 {big:.0} | {}", r.join(" | "));
    }
}
