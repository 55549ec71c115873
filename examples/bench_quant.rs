//! Micro-benchmark of the quantized matmul kernels against the bf16 skinny kernel (dev only):
//! `cargo run --release --example bench_quant`
use std::time::Instant;

use ferrovlm::ops::matmul_bf16_skinny::gemv_bf16;
use ferrovlm::ops::matmul_quant;
use ferrovlm::quant::{FourBit, FourBitType, QuantWeight};

fn main() {
    for (o, k) in [(1536, 576), (576, 1536), (576, 576)] {
        let w: Vec<f32> = (0..o * k).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
        let wb: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let q = QuantWeight::FourBit(FourBit::quantize(&w, (o, k), FourBitType::Nf4, true, "float32"));
        for n in [1usize, 64, 1024] {
            let x: Vec<f32> = (0..n * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let reps = if n == 1 {
                2000
            } else if n == 64 {
                50
            } else {
                5
            };
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(matmul_quant::forward(&x, n, &q, None, false));
            }
            let tq = t.elapsed().as_secs_f64() / reps as f64;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(matmul_quant::forward(&x, n, &q, None, true));
            }
            let tq16 = t.elapsed().as_secs_f64() / reps as f64;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(if n <= 16 {
                    gemv_bf16(&x, n, k, &wb, o)
                } else {
                    ferrovlm::ops::matmul_bf16_skinny::matmul_bf16_wide(&x, n, k, &wb, o, None)
                });
            }
            let tb = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "[{o}x{k}] n={n}: nf4 {:.1} us, nf4 with bf16 compute {:.1} us, bf16 weights {:.1} us",
                tq * 1e6,
                tq16 * 1e6,
                tb * 1e6
            );
        }
    }
}
