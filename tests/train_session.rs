//! The training session in the core, without Python: LoRA on the tiny checkpoint's text model, a few
//! AdamW steps on one batch with gradient accumulation over two micro-batches, and the loss falls.
//! Also: the optimizer state round-trips, and a state that does not fit is refused without changes.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use ferrovlm::lora::{attach, AdapterPlan, LoraInit, LoraSpec};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};
use ferrovlm::ops::linear::Weight;
use ferrovlm::optim::AdamWConfig;
use ferrovlm::train::{SessionConfig, StepOptions, TrainSession};

fn session() -> TrainSession {
    session_with(false)
}

fn session_with(bf16_autocast: bool) -> TrainSession {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/idefics3_gqa/checkpoint");
    let mut m = VlmModel::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let targets = m.linears().into_iter().map(|(n, _)| n).filter(|n| n.contains("text_model")).collect();
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_dora: false,
        use_rslora: false,
        init: LoraInit::Default,
        seed: 1,
    };
    attach(&mut m, &AdapterPlan { lora_targets: targets, spec, modules_to_save: vec![], saved_params: vec![] })
        .unwrap();
    let cfg = SessionConfig {
        adam: AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() },
        no_decay: vec![],
        feature_cache_bytes: 0,
        bf16_autocast,
    };
    TrainSession::new(Arc::new(m), &cfg).unwrap()
}

/// Two text-only rows of 12 tokens (the second right-padded), labels on the last half.
fn rows() -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (r, n) in [12usize, 9].into_iter().enumerate() {
        for t in 0..12 {
            let id = 5 + ((r * 31 + t * 7) % 60) as i64;
            ids.push(if t < n { id } else { 2 });
            mask.push((t < n) as i64);
            labels.push(if t >= 6 && t < n { id } else { -100 });
        }
    }
    (ids, mask, labels)
}

fn micro<'a>(r: usize, ids: &'a [i64], mask: &'a [i64], labels: &'a [i64]) -> ForwardInput<'a> {
    ForwardInput {
        input_ids: &ids[r * 12..][..12],
        batch: 1,
        seq_len: 12,
        attention_mask: Some(&mask[r * 12..][..12]),
        pixel_values: None,
        pixel_attention_mask: None,
        labels: Some(&labels[r * 12..][..12]),
        logits_to_keep: 0,
    }
}

#[test]
fn a_few_steps_make_the_loss_fall() {
    let mut s = session();
    let (ids, mask, labels) = rows();
    let micro = |r: usize| micro(r, &ids, &mask, &labels);
    let tokens = labels.iter().filter(|&&y| y != -100).count() as f64;
    let opts = StepOptions { backward: true, ..StepOptions::default() };
    let mut losses = Vec::new();
    for _ in 0..6 {
        let mut sum = 0.0;
        for r in 0..2 {
            sum += s.forward_backward(&micro(r), &opts, 1.0 / tokens, &no_interrupt).unwrap().loss_sum;
        }
        assert_eq!(s.grads().len(), s.params().len(), "every adapter tensor has a gradient after the micro-batches");
        let norm = s.optimizer_step(1e-2, 1.0).unwrap();
        assert!(norm.is_finite() && norm > 0.0);
        assert!(s.grads().is_empty(), "the step clears the gradients");
        losses.push(sum / tokens);
    }
    assert!(losses[5] < 0.8 * losses[0], "loss did not fall: {losses:?}");
    let eval = s.evaluate(&micro(0), &no_interrupt).unwrap();
    assert!(eval.loss_sum.is_finite() && eval.num_label_tokens == 6);
    assert!(s.grads().is_empty(), "evaluation adds no gradient");

    let state = s.optimizer_state();
    assert_eq!(state.step, 6);
    let mut fresh = session();
    fresh.load_optimizer_state(&state).unwrap();
    assert_eq!(fresh.optimizer_state(), state);
    let mut bad = state.clone();
    bad.moments[0].shape.push(1);
    let before = fresh.optimizer_state();
    assert!(fresh.load_optimizer_state(&bad).unwrap_err().to_string().contains("has shape"));
    assert_eq!(fresh.optimizer_state(), before, "a refused state changes nothing");
}

/// `bf16=True` (autocast): on a CPU with AVX512-BF16 every frozen Linear's product runs in bf16, so the
/// loss and the gradients move by a bf16-sized amount from the f32 session's and no more; the tracked
/// pass (forward_backward) and the untracked one (evaluate) compute the same loss, because both multiply
/// by the same packed bf16 weights. Elsewhere the option changes nothing.
#[test]
fn bf16_autocast_moves_the_numbers_by_a_bf16_amount() {
    let (ids, mask, labels) = rows();
    let input = micro(1, &ids, &mask, &labels);
    let opts = StepOptions { backward: true, ..StepOptions::default() };
    let (mut f32s, mut bf16s) = (session_with(false), session_with(true));
    let l32 = f32s.forward_backward(&input, &opts, 1.0, &no_interrupt).unwrap().loss_sum;
    let l16 = bf16s.forward_backward(&input, &opts, 1.0, &no_interrupt).unwrap().loss_sum;
    let eval16 = bf16s.evaluate(&input, &no_interrupt).unwrap().loss_sum;
    let packed = bf16s.model().linears().iter().filter(|(_, l)| matches!(l.weight, Weight::Autocast { .. })).count();
    if !ferrovlm::ops::matmul_bf16_packed::available() {
        assert_eq!(packed, 0);
        assert_eq!(l16, l32, "without AVX512-BF16 bf16=True computes in f32");
        return;
    }
    assert_eq!(packed, bf16s.model().linears().len(), "every frozen Linear is multiplied in bf16");
    let rel = (l16 - l32).abs() / l32.abs();
    assert!(rel > 0.0 && rel < 1e-2, "loss f32 {l32} vs bf16 {l16}");
    assert!((eval16 - l16).abs() <= 1e-6 * l16.abs(), "tracked {l16} vs untracked {eval16}");
    assert_eq!(f32s.grads().len(), bf16s.grads().len());
    for ((n32, g32), (n16, g16)) in f32s.grads().into_iter().zip(bf16s.grads()) {
        assert_eq!(n32, n16);
        let diff = (g32 - g16).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let norm = g32.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(diff <= 5e-2 * norm + 1e-6, "gradient of {n32} moved by {diff} (norm {norm})");
    }
}
