//! Times the vision-layer building blocks at SmolVLM-256M sizes (dev aid).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrovlm::ops::{self, attention::softmax_last, Linear};

fn time<T>(name: &str, n: usize, mut f: impl FnMut() -> T) {
    f();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!("{name:30} {:8.2} ms", t.elapsed().as_secs_f64() * 1000.0 / n as f64);
}

fn main() {
    bf16_ops();
    text_ops();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 1024, 768), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.02, (3072, 768), &dev).unwrap();
    let b = Tensor::zeros(3072, DType::F32, &dev).unwrap();
    let lin = Linear::new(w.clone(), Some(b)).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    let x2 = x.reshape((1024, 768)).unwrap();
    time("linear 768->3072 (w.t())", 5, || lin.forward(&x).unwrap());
    time("matmul contiguous wT", 5, || x2.matmul(&wt).unwrap());
    let h = lin.forward(&x).unwrap();
    time("gelu 1024x3072", 5, || ops::gelu_tanh(&h).unwrap());
    let g = Tensor::ones(768, DType::F32, &dev).unwrap();
    let bb = Tensor::zeros(768, DType::F32, &dev).unwrap();
    time("layer_norm 1024x768", 5, || ops::layer_norm(&x, &g, &bb, 1e-6).unwrap());
    let s = Tensor::randn(0f32, 1.0, (1, 12, 1024, 1024), &dev).unwrap();
    time("softmax 12x1024x1024", 3, || softmax_last(&s).unwrap());
    let q = Tensor::randn(0f32, 1.0, (1, 12, 1024, 64), &dev).unwrap();
    time("attention 12x1024x64", 3, || ops::attention(&q, &q, &q, &ops::Mask::none(), 0.125).unwrap());
    time("scores matmul", 3, || q.matmul(&q.t().unwrap()).unwrap());
    let qkv: Vec<f32> = (0..1024 * 3 * 768).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut out = vec![0f32; 1024 * 768];
    time("attention_qkv_f32 12x1024x64", 5, || {
        ops::attention_qkv_f32::attention_qkv_f32(&qkv, 1, 12, 64, None, 0.125, &mut out)
    });
    time("transpose+contig", 5, || {
        x.reshape((1, 1024, 12, 64)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
    });
}

#[allow(dead_code)]
fn text_ops() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 73, 576), &dev).unwrap();
    for (i, o) in [(576usize, 576usize), (576, 192), (576, 1536), (1536, 576), (576, 49280)] {
        let lin = Linear::new(Tensor::randn(0f32, 0.02, (o, i), &dev).unwrap(), None).unwrap();
        let xi = Tensor::randn(0f32, 1.0, (1, 73, i), &dev).unwrap();
        time(&format!("text linear {i}->{o}"), 20, || lin.forward(&xi).unwrap());
    }
    let g = Tensor::ones(576, DType::F32, &dev).unwrap();
    time("rms_norm 73x576", 20, || ops::rms_norm(&x, &g, 1e-5).unwrap());
    let rope = ops::Rope::new(64, 1e5, &dev).unwrap();
    let pos = Tensor::arange(0u32, 73, &dev).unwrap().reshape((1, 73)).unwrap();
    let (c, s) = rope.cos_sin(&pos, DType::F32).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, 9, 73, 64), &dev).unwrap();
    time("rope q", 20, || ops::rope::apply_rotary(&q, &c, &s).unwrap());
    let k = Tensor::randn(0f32, 1.0, (1, 3, 73, 64), &dev).unwrap();
    let m = ops::Mask { causal: true, key_valid: None };
    time("attention 9x73 gqa", 20, || ops::attention(&q, &k, &k, &m, 0.125).unwrap());
    let h = Tensor::randn(0f32, 1.0, (1, 73, 1536), &dev).unwrap();
    time("silu*up", 20, || (ops::silu(&h).unwrap() * &h).unwrap());
}

#[allow(dead_code)]
fn bf16_ops() {
    let dev = Device::Cpu;
    for (i, o) in [(576usize, 1536usize), (576, 49280)] {
        let w = Tensor::randn(0f32, 0.02, (o, i), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let lin = Linear::with_compute_dtype(w, None, DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 73, i), &dev).unwrap();
        time(&format!("bf16 linear 73x{i}->{o}"), 10, || lin.forward(&x).unwrap());
        let x1 = Tensor::randn(0f32, 1.0, (1, 1, i), &dev).unwrap();
        time(&format!("bf16 gemv 1x{i}->{o}"), 10, || lin.forward(&x1).unwrap());
    }
}
