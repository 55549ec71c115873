//! Prefill (TTFT-like) of one image + text in f32 mode vs the bf16 compute mode (dev aid):
//! cargo run --release --example bench_bf16_mode -- /path/to/checkpoint [reps] [f32|bf16]
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("checkpoint dir");
    let reps: usize = args.next().map_or(3, |s| s.parse().unwrap());
    println!("avx512-bf16 kernel available: {}", ferrovlm::ops::matmul_bf16_packed::available());
    let only = args.next();
    for dtype in [DType::F32, DType::BF16] {
        if only.as_deref().is_some_and(|o| o != if dtype == DType::F32 { "f32" } else { "bf16" }) {
            continue;
        }
        let t = Instant::now();
        let m = VlmModel::from_dir(std::path::Path::new(&dir), dtype, &Device::Cpu).unwrap();
        println!("{dtype:?}: load {:.3}s", t.elapsed().as_secs_f64());
        let size = m.config.vision.image_size;
        let px = Tensor::randn(0f32, 0.5, (1, 1, 3, size, size), &Device::Cpu).unwrap();
        let tpi = m.config.image_seq_len();
        let mut ids: Vec<i64> = (0..8).map(|i| 100 + i).collect();
        ids.extend(std::iter::repeat_n(m.config.image_token_id, tpi));
        ids.extend((0..7).map(|i| 200 + i));
        let (mut best_v, mut best_f) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            let t = Instant::now();
            m.image_features(&px, None, &no_interrupt).unwrap();
            let tv = t.elapsed().as_secs_f64();
            let input = ForwardInput {
                input_ids: &ids,
                batch: 1,
                seq_len: ids.len(),
                attention_mask: None,
                pixel_values: Some(&px),
                pixel_attention_mask: None,
                labels: None,
                logits_to_keep: 1,
            };
            let t = Instant::now();
            m.forward(&input, &no_interrupt).unwrap();
            let tf = t.elapsed().as_secs_f64();
            println!("  {dtype:?} ({} tokens, {tpi} image tokens): vision {tv:.3}s, full forward {tf:.3}s", ids.len());
            best_v = best_v.min(tv);
            best_f = best_f.min(tf);
        }
        println!("{dtype:?} best of {reps}: vision {best_v:.3}s, full forward {best_f:.3}s");
    }
}
