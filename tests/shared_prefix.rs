//! Paired rows (DPO: a prompt with its chosen and rejected completion) run their shared prefix once.
//! The objective and every adapter gradient must equal the full-row computation, with and without
//! gradient checkpointing, with the vision tower training or frozen.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrovlm::lora::{attach, AdapterPlan, LoraInit, LoraSpec};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};
use ferrovlm::train::rows::Rows;
use ferrovlm::train::{run_objective, trainable_params, HeadOut, StepCtx, StepOptions};

const PAD: i64 = 2;

struct Batch {
    ids: Vec<i64>,
    mask: Vec<i64>,
    labels: Vec<i64>,
    pixels: Tensor,
    pixel_mask: Vec<bool>,
    b: usize,
    l: usize,
}

/// Two pairs from the fixture's first prompt (one image): pair 0 keeps 18 prompt tokens and its
/// completions agree on their first 2 tokens; pair 1 keeps 16 and they differ at once. The shared
/// prefix of the batch is therefore 16 tokens.
fn batch() -> Batch {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/idefics3_gqa");
    let inp: std::collections::HashMap<String, Tensor> =
        Tensor::read_npz(dir.join("inputs.npz")).unwrap().into_iter().collect();
    let row0: Vec<i64> = inp["input_ids"].get(0).unwrap().to_vec1().unwrap();
    let l = 26;
    let (p0, p1) = (&row0[..18], &row0[..16]);
    let rows: [(&[i64], Vec<i64>); 4] = [
        (p0, vec![10, 11, 12, 13, 14]),     // chosen 0
        (p1, vec![20, 21, 22, 23, 24, 25]), // chosen 1
        (p0, vec![10, 11, 40, 41]),         // rejected 0
        (p1, vec![30, 31, 32]),             // rejected 1
    ];
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (prompt, completion) in &rows {
        let n = prompt.len() + completion.len();
        ids.extend(prompt.iter().chain(completion).copied().chain(std::iter::repeat_n(PAD, l - n)));
        mask.extend(std::iter::repeat_n(1, n).chain(std::iter::repeat_n(0, l - n)));
        labels.extend(
            std::iter::repeat_n(-100, prompt.len())
                .chain(completion.iter().copied())
                .chain(std::iter::repeat_n(-100, l - n)),
        );
    }
    let px = inp["pixel_values"].get(0).unwrap().unsqueeze(0).unwrap(); // [1, F, C, H, W]
    let pixels = Tensor::cat(&[&px, &px, &px, &px], 0).unwrap();
    let pm: Vec<bool> = inp["pixel_attention_mask"]
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .iter()
        .map(|&v| v != 0)
        .collect();
    let pixel_mask = pm.iter().chain(&pm).chain(&pm).chain(&pm).copied().collect();
    Batch { ids, mask, labels, pixels, pixel_mask, b: 4, l }
}

fn model(vision_too: bool) -> VlmModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/idefics3_gqa/checkpoint");
    let mut m = VlmModel::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let targets = m
        .linears()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| {
            n.contains("text_model") || (vision_too && n.contains("vision_model.encoder.layers.0.self_attn.q_proj"))
        })
        .collect();
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_dora: false,
        use_rslora: false,
        init: LoraInit::Random,
        seed: 7,
    };
    attach(&mut m, &AdapterPlan { lora_targets: targets, spec, modules_to_save: vec![], saved_params: vec![] })
        .unwrap();
    m
}

/// A DPO-like objective: per-row sums of log p over the completion tokens, weighted per row.
fn run(m: &VlmModel, bt: &Batch, paired: bool, checkpointing: bool) -> (f64, Vec<Vec<f32>>) {
    let params = trainable_params(m);
    let input = ForwardInput {
        input_ids: &bt.ids,
        batch: bt.b,
        seq_len: bt.l,
        attention_mask: Some(&bt.mask),
        pixel_values: Some(&bt.pixels),
        pixel_attention_mask: Some(&bt.pixel_mask),
        labels: Some(&bt.labels),
        logits_to_keep: 0,
    };
    let mut acc = vec![None; params.len()];
    let mut value = 0f64;
    let mut obj = |h: &HeadOut| -> ferrovlm::Result<Tensor> {
        let (lp, _) = ferrovlm::train::dpo::sequence_logps(h, false)?; // [B]
        let w = Tensor::new(&[1.0f32, -0.5, 2.0, 0.25], &Device::Cpu)?;
        let loss = (lp * w)?.sum_all()?;
        value = loss.to_scalar::<f32>()? as f64;
        Ok(loss)
    };
    let opts = StepOptions { gradient_checkpointing: checkpointing, dropout_seed: 3, backward: true, paired };
    run_objective(
        &StepCtx { model: m, params: &params, cache: None, interrupt: &no_interrupt },
        &input,
        &opts,
        &mut acc,
        &mut obj,
    )
    .unwrap();
    let grads = acc
        .iter()
        .map(|g| {
            g.as_ref().expect("every adapter tensor gets a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect();
    (value, grads)
}

fn assert_same(a: &(f64, Vec<Vec<f32>>), b: &(f64, Vec<Vec<f32>>), what: &str) {
    assert!((a.0 - b.0).abs() <= 1e-5 * a.0.abs().max(1.0), "{what}: objective {} vs {}", a.0, b.0);
    assert_eq!(a.1.len(), b.1.len());
    let scale = a.1.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0);
    for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        let d = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(d <= 1e-4 * scale, "{what}: gradient {i} differs by {d} (scale {scale})");
    }
}

#[test]
fn the_batch_shares_a_sixteen_token_prefix() {
    let (m, bt) = (model(false), batch());
    let x0 = m
        .text
        .embed(
            &Tensor::from_vec(bt.ids.iter().map(|&v| v as u32).collect::<Vec<u32>>(), (bt.b, bt.l), &Device::Cpu)
                .unwrap(),
        )
        .unwrap();
    let input = ForwardInput {
        input_ids: &bt.ids,
        batch: bt.b,
        seq_len: bt.l,
        attention_mask: Some(&bt.mask),
        pixel_values: None,
        pixel_attention_mask: None,
        labels: None,
        logits_to_keep: 0,
    };
    assert_eq!(Rows::new(&m.text, &input, &x0, true).unwrap().shared_prefix(), 16);
    assert_eq!(Rows::new(&m.text, &input, &x0, false).unwrap().shared_prefix(), 0);
}

#[test]
fn shared_prefix_equals_full_rows() {
    let (m, bt) = (model(false), batch());
    let full = run(&m, &bt, false, false);
    assert_same(&full, &run(&m, &bt, true, false), "paired");
    assert_same(&full, &run(&m, &bt, true, true), "paired + checkpointing");
}

#[test]
fn shared_prefix_equals_full_rows_when_the_vision_tower_trains() {
    let (m, bt) = (model(true), batch());
    let full = run(&m, &bt, false, true);
    assert_same(&full, &run(&m, &bt, true, true), "paired, vision LoRA");
}

#[test]
fn a_step_with_images_is_bitwise_reproducible() {
    let (m, bt) = (model(true), batch());
    let first = run(&m, &bt, true, true);
    for _ in 0..3 {
        let again = run(&m, &bt, true, true);
        assert_eq!(first.0.to_bits(), again.0.to_bits());
        assert!(first.1 == again.1, "gradients differ between identical runs");
    }
}
