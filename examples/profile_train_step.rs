//! Times one LoRA training micro-batch of the text model (forward, recompute, backward) on a
//! checkpoint dir, text-only rows shaped like the DPO bench (dev aid):
//! cargo run --release --example profile_train_step -- /path/to/checkpoint [reps] [paired 0|1] [ckpt 0|1]
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrovlm::lora::{attach, AdapterPlan, LoraInit, LoraSpec};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};
use ferrovlm::train::{run_objective, trainable_params, HeadOut, StepCtx, StepOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("checkpoint dir");
    let reps: usize = args.next().map_or(3, |s| s.parse().unwrap());
    let paired = args.next().is_none_or(|s| s == "1");
    let checkpointing = args.next().is_none_or(|s| s == "1");
    let mut m = VlmModel::from_dir(std::path::Path::new(&dir), DType::F32, &Device::Cpu).unwrap();
    let targets = m.linears().into_iter().map(|(n, _)| n).filter(|n| n.contains("text_model")).collect();
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        use_dora: false,
        use_rslora: false,
        init: LoraInit::Random,
        seed: 1,
    };
    attach(&mut m, &AdapterPlan { lora_targets: targets, spec, modules_to_save: vec![], saved_params: vec![] })
        .unwrap();
    let params = trainable_params(&m);
    // 4 pairs: an 88-token prompt, completions of 14 and 10 tokens, right-padded to 102.
    let (p, lp, l) = (4usize, 88usize, 102usize);
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for row in 0..2 * p {
        let n = lp + if row < p { 14 } else { 10 };
        for t in 0..l {
            let id = if t < lp { 100 + ((row % p) * 7 + t) as i64 % 900 } else { 1000 + (row * 13 + t) as i64 % 500 };
            ids.push(if t < n { id } else { 2 });
            mask.push((t < n) as i64);
            labels.push(if t >= lp && t < n { id } else { -100 });
        }
    }
    let input = ForwardInput {
        input_ids: &ids,
        batch: 2 * p,
        seq_len: l,
        attention_mask: Some(&mask),
        pixel_values: None,
        pixel_attention_mask: None,
        labels: Some(&labels),
        logits_to_keep: 0,
    };
    for _ in 0..reps {
        let mut acc = vec![None; params.len()];
        let mut obj = |h: &HeadOut| -> ferrovlm::Result<Tensor> {
            let (lp, _) = ferrovlm::train::dpo::sequence_logps(h, false)?;
            Ok(lp.sum_all()?)
        };
        let t = Instant::now();
        let opts = StepOptions { gradient_checkpointing: checkpointing, dropout_seed: 0, backward: false, paired };
        run_objective(
            &StepCtx { model: &m, params: &params, cache: None, interrupt: &no_interrupt },
            &input,
            &opts,
            &mut acc,
            &mut obj,
        )
        .unwrap();
        let tf = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let opts = StepOptions { backward: true, ..opts };
        run_objective(
            &StepCtx { model: &m, params: &params, cache: None, interrupt: &no_interrupt },
            &input,
            &opts,
            &mut acc,
            &mut obj,
        )
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        // A fingerprint of the gradients: equal digits run to run when the step is deterministic.
        let fp: f64 =
            acc.iter().flatten().map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64).sum();
        println!("paired {paired} checkpointing {checkpointing}: no-grad forward {tf:.3}s, forward+backward {secs:.3}s, sum g^2 {fp:.12e}");
    }
}
