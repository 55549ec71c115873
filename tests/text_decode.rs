//! The decoding fast path (`TextModel::decode_step`: one token per row on plain slices, four skinny
//! products per layer) equals the graph path (`TextModel::forward` with a KV cache) step by step, for
//! f32 weights and for the bf16 compute mode's bf16 weights, with a padded row and with GQA.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ferrovlm::model::cache::KvCache;
use ferrovlm::model::{no_interrupt, VlmModel};
use ferrovlm::ops::Mask;

fn model(dtype: DType) -> VlmModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/idefics3_gqa/checkpoint");
    VlmModel::from_dir(&dir, dtype, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Prefills two rows (row 1 left-padded by 2) through the graph path into two caches, then decodes
/// `steps` tokens, one cache by each path, and compares the hidden states of every step.
fn check(m: &VlmModel, tol: f32) {
    let text = &m.text;
    assert!(text.decode_usable(), "the fast path should take this model");
    let dev = Device::Cpu;
    let (b, l, h) = (2, 6, text.cfg.hidden_size);
    let pad = 2;
    let x = Tensor::randn(0f32, 1.0, (b, l, h), &dev).unwrap();
    let pos: Vec<i64> = (0..l as i64).chain((0..l as i64).map(|p| (p - pad as i64).max(1))).collect();
    let mut valid: Vec<bool> = (0..b * l).map(|i| i < l || i - l >= pad).collect();
    let mask = |valid: &[bool]| Mask { causal: true, key_valid: Some(Arc::new(valid.to_vec())) };
    let (mut plain, mut fast) = (KvCache::with_capacity(text.layers.len(), 16), KvCache::new(text.layers.len()));
    let pos_t = Tensor::from_vec(pos, (b, l), &dev).unwrap();
    let h0 = text.forward(&x, &pos_t, &mask(&valid), Some(&mut plain), &no_interrupt).unwrap();
    let h1 = text.forward(&x, &pos_t, &mask(&valid), Some(&mut fast), &no_interrupt).unwrap();
    assert_eq!(max_diff(&h0, &h1), 0.0);
    let mut next = [l as i64, (l - pad) as i64];
    for step in 0..5 {
        let s = l + step + 1;
        valid = (0..b * s)
            .map(|i| {
                let (r, j) = (i / s, i % s);
                r == 0 || j >= pad
            })
            .collect();
        let xt = Tensor::randn(0f32, 1.0, (b, 1, h), &dev).unwrap();
        let pt = Tensor::from_vec(next.to_vec(), (b, 1), &dev).unwrap();
        let want = text.forward(&xt, &pt, &mask(&valid), Some(&mut plain), &no_interrupt).unwrap();
        let got = text.decode_step(&xt, &next, &mask(&valid), &mut fast, &no_interrupt).unwrap();
        assert_eq!(got.dims(), want.dims());
        let d = max_diff(&got, &want);
        assert!(d < tol, "step {step}: max difference {d}");
        next = [next[0] + 1, next[1] + 1];
    }
    // Without a key mask (no padding anywhere) too.
    let mut plain = KvCache::new(text.layers.len());
    let mut fast = KvCache::new(text.layers.len());
    let x1 = x.narrow(0, 0, 1).unwrap();
    let p1 = pos_t.narrow(0, 0, 1).unwrap();
    let nomask = Mask { causal: true, key_valid: None };
    text.forward(&x1, &p1, &nomask, Some(&mut plain), &no_interrupt).unwrap();
    text.forward(&x1, &p1, &nomask, Some(&mut fast), &no_interrupt).unwrap();
    let xt = Tensor::randn(0f32, 1.0, (1, 1, h), &dev).unwrap();
    let pt = Tensor::from_vec(vec![l as i64], (1, 1), &dev).unwrap();
    let want = text.forward(&xt, &pt, &nomask, Some(&mut plain), &no_interrupt).unwrap();
    let got = text.decode_step(&xt, &[l as i64], &nomask, &mut fast, &no_interrupt).unwrap();
    assert!(max_diff(&got, &want) < tol);
}

#[test]
fn decode_step_equals_the_graph_path_f32() {
    check(&model(DType::F32), 2e-5);
}

#[test]
fn decode_step_equals_the_graph_path_bf16_weights() {
    let m = model(DType::BF16);
    assert_eq!(m.text.dtype, DType::F32, "the bf16 compute mode keeps f32 activations");
    check(&m, 2e-5);
}

#[test]
fn adapters_and_bf16_activations_take_the_graph_path() {
    let m = model(DType::BF16);
    assert!(m.text.decode_usable());
    let mut lin = m.text.layers[0].q_proj.clone();
    lin.adapter = Some(Arc::new(ferrovlm::lora::Adapter::full_copy(&lin, m.switch.clone()).unwrap()));
    let mut t = m.text.clone();
    t.layers[0].q_proj = lin;
    assert!(!t.decode_usable());
}

#[test]
fn decode_step_refuses_more_than_one_token_per_row() {
    let m = model(DType::F32);
    let mut cache = KvCache::new(m.text.layers.len());
    let x = Tensor::zeros((1, 2, m.text.cfg.hidden_size), DType::F32, &Device::Cpu).unwrap();
    let nomask = Mask { causal: true, key_valid: None };
    let err = m.text.decode_step(&x, &[0], &nomask, &mut cache, &no_interrupt).unwrap_err();
    assert!(err.to_string().contains("one token per row"), "{err}");
    assert_eq!(cache.seq_len(), 0, "nothing written on a refused step");
}
