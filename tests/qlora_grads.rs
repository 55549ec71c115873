//! QLoRA: LoRA / DoRA gradients through a frozen quantized base equal those through its dequantized
//! f32 copy (the backward through a quantized Linear to its input is exact for the dequantized
//! weight), and the base gets no gradient buffer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ferrovlm::lora::{attach, AdapterPlan, LoraInit, LoraSpec};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};
use ferrovlm::ops::Linear;
use ferrovlm::quant::{FourBitType, QuantConfig, QuantMethod};
use ferrovlm::train::{run_objective, trainable_params, HeadOut, StepCtx, StepOptions};

fn base_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb/base")
}

fn quantized(method: QuantMethod) -> VlmModel {
    let cfg = QuantConfig { method, int8_threshold: 6.0, ..Default::default() };
    VlmModel::from_dir_quantized(&base_dir(), DType::F32, &Device::Cpu, Some(cfg)).unwrap()
}

/// The same model with every quantized Linear replaced by its dequantized f32 weight.
fn dequantized_copy(m: &VlmModel) -> VlmModel {
    let mut d = m.clone();
    for (_, l) in d.linears_mut() {
        if l.quant().is_some() {
            *l = Linear::new(l.dense_weight().unwrap(), l.bias.clone()).unwrap();
        }
    }
    d
}

fn with_adapters(mut m: VlmModel, dora: bool) -> VlmModel {
    let targets = m.linears().into_iter().map(|(n, _)| n).filter(|n| n != "lm_head").collect();
    let spec =
        LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, use_dora: dora, use_rslora: false, init: LoraInit::Random, seed: 7 };
    attach(&mut m, &AdapterPlan { lora_targets: targets, spec, modules_to_save: vec![], saved_params: vec![] })
        .unwrap();
    m
}

fn grads(m: &VlmModel, checkpointing: bool) -> (f64, Vec<Vec<f32>>) {
    let inp: HashMap<String, Tensor> = Tensor::read_npz(base_dir().join("inputs.npz")).unwrap().into_iter().collect();
    let ids: Vec<i64> = inp["input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let mask: Vec<i64> = inp["attention_mask"].flatten_all().unwrap().to_vec1().unwrap();
    let labels: Vec<i64> = inp["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let pam: Vec<bool> =
        inp["pixel_attention_mask"].flatten_all().unwrap().to_vec1::<u8>().unwrap().iter().map(|&v| v != 0).collect();
    let (b, l) = inp["input_ids"].dims2().unwrap();
    let input = ForwardInput {
        input_ids: &ids,
        batch: b,
        seq_len: l,
        attention_mask: Some(&mask),
        pixel_values: Some(&inp["pixel_values"]),
        pixel_attention_mask: Some(&pam),
        labels: Some(&labels),
        logits_to_keep: 0,
    };
    let params = trainable_params(m);
    let mut acc = vec![None; params.len()];
    let mut value = 0f64;
    let mut obj = |h: &HeadOut| -> ferrovlm::Result<Tensor> {
        let (lp, _) = ferrovlm::train::dpo::sequence_logps(h, false)?; // [B]
        let loss = lp.sum_all()?;
        value = loss.to_scalar::<f32>()? as f64;
        Ok(loss)
    };
    let opts = StepOptions { gradient_checkpointing: checkpointing, dropout_seed: 3, backward: true, paired: false };
    run_objective(
        &StepCtx { model: m, params: &params, cache: None, interrupt: &no_interrupt },
        &input,
        &opts,
        &mut acc,
        &mut obj,
    )
    .unwrap();
    (
        value,
        acc.iter()
            .map(|g| {
                g.as_ref().expect("every adapter tensor gets a gradient").flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect(),
    )
}

fn assert_close(q: &(f64, Vec<Vec<f32>>), d: &(f64, Vec<Vec<f32>>), what: &str) {
    assert!((q.0 - d.0).abs() <= 1e-5 * d.0.abs().max(1.0), "{what}: objective {} vs {}", q.0, d.0);
    assert_eq!(q.1.len(), d.1.len());
    for (i, (a, b)) in q.1.iter().zip(&d.1).enumerate() {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: gradient {i} differs by {diff} (scale {scale})");
    }
}

#[test]
fn lora_and_dora_gradients_through_a_quantized_base_equal_the_dequantized_copy() {
    for method in [
        QuantMethod::FourBit { ty: FourBitType::Nf4, double_quant: true },
        QuantMethod::FourBit { ty: FourBitType::Fp4, double_quant: false },
        QuantMethod::Int8,
    ] {
        let q = quantized(method);
        assert!(
            q.linears().iter().filter(|(n, _)| n != "lm_head").all(|(_, l)| l.quant().is_some()),
            "every Linear but the head is quantized"
        );
        assert!(q.lm_head.quant().is_none());
        let d = dequantized_copy(&q);
        q.set_training(true); // int8: bitsandbytes' training product (dequantize, then f32)
        for dora in [false, true] {
            let (qa, da) = (with_adapters(q.clone(), dora), with_adapters(d.clone(), dora));
            let what = format!("{method:?} dora={dora}");
            assert_close(&grads(&qa, false), &grads(&da, false), &what);
            assert_close(&grads(&qa, true), &grads(&da, false), &format!("{what} + checkpointing"));
            // Only adapter tensors are trainable: the quantized base has no gradient buffer.
            assert!(trainable_params(&qa).iter().all(|p| p.name.contains("lora_")), "{what}");
        }
    }
}

#[test]
fn merging_into_a_quantized_layer_quantizes_the_merged_weight_again() {
    let q = with_adapters(quantized(QuantMethod::FourBit { ty: FourBitType::Nf4, double_quant: false }), false);
    let name = "model.text_model.layers.0.self_attn.q_proj";
    let lin = q.linears().into_iter().find(|(n, _)| n == name).unwrap().1.clone();
    let (merged, _) = lin.adapter.as_ref().unwrap().merged_weight(&lin).unwrap();
    let mut m = q.clone();
    ferrovlm::lora::detach(&mut m, true).unwrap();
    let after = m.linears().into_iter().find(|(n, _)| n == name).unwrap().1.clone();
    let qw = after.quant().expect("still quantized, as PEFT's merge into a bitsandbytes layer");
    let want = ferrovlm::quant::QuantWeight::FourBit(ferrovlm::quant::FourBit::quantize(
        &merged.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        qw.shape(),
        FourBitType::Nf4,
        false,
        "float32",
    ));
    assert_eq!(qw.dequantize(), want.dequantize());
    let _ = Arc::clone(qw);
}
