//! Times the vision tower and the whole forward of a checkpoint dir (dev aid):
//! cargo run --release --example profile_model -- /path/to/checkpoint
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};

fn main() {
    let dir = std::env::args().nth(1).expect("checkpoint dir");
    let t = Instant::now();
    let m = VlmModel::from_dir(std::path::Path::new(&dir), DType::F32, &Device::Cpu).unwrap();
    println!("load {:.3}s", t.elapsed().as_secs_f64());
    let size = m.config.vision.image_size;
    let px = Tensor::randn(0f32, 0.5, (1, 1, 3, size, size), &Device::Cpu).unwrap();
    let tpi = m.config.image_seq_len();
    let mut ids: Vec<i64> = (0..8).map(|i| 100 + i).collect();
    ids.extend(std::iter::repeat_n(m.config.image_token_id, tpi));
    ids.extend((0..56).map(|i| 200 + i));
    for _ in 0..2 {
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
            logits_to_keep: 0,
        };
        let t = Instant::now();
        m.forward(&input, &no_interrupt).unwrap();
        println!("vision {:.3}s, full forward {:.3}s", tv, t.elapsed().as_secs_f64());
    }
}
