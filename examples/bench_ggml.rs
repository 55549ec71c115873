//! GGUF-block matmuls (`ops::matmul_ggml` through `matmul_quant::forward`) against the dense f32 and bf16
//! kernels, on SmolLM2-135M's shapes (dev only):
//! `cargo run --release --example bench_ggml [-- --quick] [--model] [--outside] [--crossover] [--rows N]` (--model: part 2 only;
//! --outside: the calls from the main thread rather than from a thread of rayon's pool)
//!
//! Part 1: each shape alone, decode-like (n = 1) and prefill-like (n = 79): time per call, GB/s of
//! weight bytes read, GFLOP/s. One weight repeated stays in the caches, so these are upper bounds.
//! Part 2: one decoding step of the whole model's Linears (30 layers x q, k, v, o, gate, up, down, each a
//! distinct weight, plus the 49152 x 576 head as Q8_0): the weights stream from memory as in real
//! decoding; tokens/s counts these matmuls only.

use std::time::Instant;

use ferrovlm::ops::matmul_bf16_skinny::{gemv_bf16, matmul_bf16_wide};
use ferrovlm::ops::matmul_quant;
use ferrovlm::quant::ggml::{GgmlType, GgmlWeight};
use ferrovlm::quant::QuantWeight;

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

/// Seconds per call: the fastest of many short batches (about 3 ms each) within `budget` seconds, so
/// that batches slowed by other processes on the machine do not count.
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((3e-3 / once) as usize).clamp(1, 100_000);
    let start = Instant::now();
    let mut best = f64::INFINITY;
    while start.elapsed().as_secs_f64() < budget || best == f64::INFINITY {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn f32_matmul(x: &[f32], n: usize, k: usize, w: &[f32], o: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * o];
    // SAFETY: y [n, o], x [n, k], w [o, k] read as its transpose.
    unsafe {
        gemm::gemm(
            n,
            o,
            k,
            y.as_mut_ptr(),
            1,
            o as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    };
    y
}

fn report(what: &str, secs: f64, bytes: usize, flops: f64) {
    println!(
        "  {what:<10} {:>9.1} us {:>7.1} GB/s {:>7.1} GFLOP/s",
        secs * 1e6,
        bytes as f64 / secs / 1e9,
        flops / secs / 1e9
    );
}

fn main() {
    // Called from outside rayon's pool, every parallel kernel hands its work to the pool and sleeps
    // until it is done (tens of us per call on this machine); inside the pool a call costs well under
    // a us. `--outside` measures the first, the default the second (the calls run on a pool thread).
    if std::env::args().any(|a| a == "--outside") {
        run();
    } else {
        rayon::scope(|_| run());
    }
}

fn run() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = if quick { 0.1 } else { 0.5 };
    let model_only = std::env::args().any(|a| a == "--model");
    if std::env::args().any(|a| a == "--crossover") {
        crossover(budget);
        return;
    }
    println!("threads: {}, cpu: {:?}", rayon::current_num_threads(), ferrovlm::ops::simd::CpuFeatures::detect());
    let types = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K];
    // (out, in): q/o, k/v, gate/up, down, head
    let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)];
    if !model_only {
        // the quantizers of the GGUF export (all rows in parallel)
        let (o, k) = (1536, 1536);
        let w = values(o * k, 4, 0.1);
        print!("== quantizers, [{o} x {k}]:");
        for ty in [GgmlType::F16, GgmlType::Bf16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0]
            .into_iter()
            .chain([GgmlType::Q5_1, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K])
        {
            let t = time(budget, || drop(ferrovlm::quant::ggml_quantize::quantize(ty, &w, k)));
            print!(" {} {:.0} M/s", ty.name(), (o * k) as f64 / t / 1e6);
        }
        println!(" (values per second)");
    }
    println!("== part 1: one weight, repeated (cache-warm for the small ones)");
    for (o, k) in shapes {
        if model_only {
            break;
        }
        let w = values(o * k, 1, 0.1);
        let wb: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        for n in [1usize, 79] {
            println!("[{o} x {k}] n={n}");
            let x = values(n * k, 2 + n as u32, 2.0);
            let flops = 2.0 * (n * o * k) as f64;
            report("f32", time(budget, || drop(f32_matmul(&x, n, k, &w, o))), 4 * o * k, flops);
            let tb = if n <= 16 {
                time(budget, || drop(gemv_bf16(&x, n, k, &wb, o)))
            } else {
                time(budget, || drop(matmul_bf16_wide(&x, n, k, &wb, o, None)))
            };
            report("bf16", tb, 2 * o * k, flops);
            for ty in types {
                if o == 49152 && ty != GgmlType::Q8_0 && ty != GgmlType::Q4_1 {
                    continue;
                }
                let Ok(g) = GgmlWeight::quantize(ty, &w, (o, k)) else {
                    println!("  {:<10} (rows of {k} do not fit)", ty.name());
                    continue;
                };
                let bytes = g.data().len();
                let q = QuantWeight::Ggml(g);
                report(ty.name(), time(budget, || drop(matmul_quant::forward(&x, n, &q, None, false))), bytes, flops);
            }
        }
    }
    println!("== part 2: a decoding step of SmolLM2-135M's Linears (30 layers, distinct weights, streamed)");
    let layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    // rows of x (--rows N: a batch of N sequences decoding together)
    let nx: usize = std::env::args().skip_while(|a| a != "--rows").nth(1).and_then(|v| v.parse().ok()).unwrap_or(1);
    let x576 = values(576 * nx, 5, 2.0);
    let x1536 = values(1536 * nx, 6, 2.0);
    let head_w = values(49152 * 576, 9, 0.1);
    let head = QuantWeight::Ggml(GgmlWeight::quantize(GgmlType::Q8_0, &head_w, (49152, 576)).unwrap());
    for (name, ty) in [
        ("Q8_0", Some(GgmlType::Q8_0)),
        ("Q4_1", Some(GgmlType::Q4_1)),
        ("Q4_0", Some(GgmlType::Q4_0)),
        ("Q5_0", Some(GgmlType::Q5_0)),
        ("bf16", None),
    ] {
        let mut bytes = 0usize;
        let mut ws: Vec<Result<QuantWeight, Vec<u16>>> = Vec::new();
        for l in 0..30 {
            for (i, &(o, k)) in layer.iter().enumerate() {
                let w = values(o * k, (l * 7 + i) as u32 + 100, 0.1);
                ws.push(match ty {
                    Some(t) => {
                        let g = GgmlWeight::quantize(t, &w, (o, k)).unwrap();
                        bytes += g.data().len();
                        Ok(QuantWeight::Ggml(g))
                    }
                    None => {
                        bytes += 2 * o * k;
                        Err(w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect())
                    }
                });
            }
        }
        let head_bytes = if ty.is_some() { head.nbytes() } else { 2 * 49152 * 576 };
        let head_bf16: Vec<u16> =
            if ty.is_none() { head_w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect() } else { vec![] };
        let secs = time(budget * 4.0, || {
            for (i, w) in ws.iter().enumerate() {
                let (o, k) = layer[i % 7];
                let x = if k == 576 { &x576 } else { &x1536 };
                drop(match w {
                    Ok(q) => matmul_quant::forward(x, nx, q, None, false),
                    Err(b) => gemv_bf16(x, nx, k, b, o),
                });
            }
            drop(if ty.is_some() {
                matmul_quant::forward(&x576, nx, &head, None, false)
            } else {
                gemv_bf16(&x576, nx, 576, &head_bf16, 49152)
            });
        });
        let total = bytes + head_bytes;
        println!(
            "  {name:<5} layers + {} head: {:.2} ms/token ({:.0} tokens/s), {:.1} MB, {:.1} GB/s",
            if ty.is_some() { "Q8_0" } else { "bf16" },
            secs * 1e3,
            1.0 / secs,
            total as f64 / 1e6,
            total as f64 / secs / 1e9
        );
    }
}

/// `--crossover`: the few-rows kernel against matmul_quant's tile path (tiles decoded, then gemm) for
/// growing n, to place `matmul_quant::FEW_ROWS`.
fn crossover(budget: f64) {
    use ferrovlm::ops::matmul_ggml;
    let (o, k) = (1536, 576);
    let w = values(o * k, 1, 0.1);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0, GgmlType::Q5_0] {
        let g = GgmlWeight::quantize(ty, &w, (o, k)).unwrap();
        for n in [1usize, 2, 4, 8, 12, 16, 24, 32] {
            let x = values(n * k, 3, 2.0);
            let few = time(budget, || {
                let mut y = vec![0f32; n * o];
                matmul_ggml::few_rows(&x, n, &g, &mut y);
                drop(y)
            });
            let tile = time(budget, || {
                let mut wd = vec![0f32; o * k];
                matmul_ggml::decode_rows(&g, 0, o, &mut wd);
                drop(f32_matmul(&x, n, k, &wd, o))
            });
            println!(
                "[{o} x {k}] {} n={n}: few rows {:.1} us, decode + gemm {:.1} us",
                ty.name(),
                few * 1e6,
                tile * 1e6
            );
        }
    }
}
