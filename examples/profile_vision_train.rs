//! Times the pieces of one trained SigLIP encoder layer at SmolVLM-256M size (four 512x512 images:
//! [4, 1024, 768], 12 heads, MLP 3072), forward with autograd and backward, every weight a `Var`
//! (full fine-tuning; dev aid): cargo run --release --example profile_vision_train [frames]
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use ferrovlm::model::vision::{LayerNorm, VisionLayer};
use ferrovlm::ops::{self, Linear, Mask};

fn time<T>(name: &str, gflop: f64, n: usize, mut f: impl FnMut() -> T) -> T {
    let mut out = f();
    let t = Instant::now();
    for _ in 0..n {
        out = f();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!("{name:34} {:9.1} ms {:7.1} GFLOP/s", s * 1e3, gflop / s);
    out
}

fn main() {
    let frames: usize = std::env::args().nth(1).map_or(4, |s| s.parse().unwrap());
    let (np, d, heads, inter) = (1024usize, 768usize, 12usize, 3072usize);
    let n = (frames * np) as f64;
    let dev = Device::Cpu;
    let var = |t: Tensor| Var::from_tensor(&t).unwrap().as_tensor().clone();
    let lin = |o: usize, i: usize| {
        let w = var(Tensor::randn(0f32, (i as f32).powf(-0.5), (o, i), &dev).unwrap());
        Linear::new(w, Some(var(Tensor::randn(0f32, 0.1, o, &dev).unwrap()))).unwrap()
    };
    let ln = || LayerNorm {
        weight: var(Tensor::randn(1f32, 0.1, d, &dev).unwrap()),
        bias: var(Tensor::randn(0f32, 0.1, d, &dev).unwrap()),
        eps: 1e-6,
    };
    let layer = VisionLayer {
        layer_norm1: ln(),
        q_proj: lin(d, d),
        k_proj: lin(d, d),
        v_proj: lin(d, d),
        out_proj: lin(d, d),
        layer_norm2: ln(),
        fc1: lin(inter, d),
        fc2: lin(d, inter),
    };
    let x = var(Tensor::randn(0f32, 1.0, (frames, np, d), &dev).unwrap());
    let mask = Mask::none();
    let lin_gf = |i: usize, o: usize| 2.0 * n * (i * o) as f64 / 1e9;
    let att_gf = 4.0 * frames as f64 * (np * np * d) as f64 / 1e9;
    let layer_gf = lin_gf(d, d) * 4.0 + lin_gf(d, inter) * 2.0 + att_gf;
    let h = time("layer_norm1", 0.0, 3, || layer.layer_norm1.forward(&x).unwrap());
    let q = time("q_proj (768->768)", lin_gf(d, d), 3, || layer.q_proj.forward(&h).unwrap());
    let m = time("fc1 (768->3072)", lin_gf(d, inter), 3, || layer.fc1.forward(&h).unwrap());
    let g = time("gelu", 0.0, 3, || ops::gelu_tanh(&m).unwrap());
    time("fc2 (3072->768)", lin_gf(inter, d), 3, || layer.fc2.forward(&g).unwrap());
    let split =
        |t: Tensor| t.reshape((frames, np, heads, d / heads)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let qh = split(q);
    let a = time("attention", att_gf, 3, || ops::attention(&qh, &qh, &qh, &mask, 0.125).unwrap());
    time("attention backward", 2.0 * att_gf, 3, || a.sum_all().unwrap().backward().unwrap());
    let y = time("fc1 alone backward", 2.0 * lin_gf(d, inter), 3, || {
        layer.fc1.forward(&h.detach()).unwrap().sum_all().unwrap().backward().unwrap()
    });
    drop(y);
    let out = time("layer forward (tracked)", layer_gf, 3, || layer.forward(&x, &mask, heads).unwrap());
    let loss = out.sqr().unwrap().sum_all().unwrap();
    time("layer backward", 2.0 * layer_gf, 3, || loss.backward().unwrap());
}
