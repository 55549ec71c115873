//! The Rust core alone reproduces transformers' outputs on the fixture checkpoints
//! (values written by scripts/make_reference.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};
use ferrovlm::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn npz(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_npz(path).unwrap().into_iter().collect()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn check_case(case: &str, suffix: &str) {
    let dir = fixtures().join(case);
    let model = VlmModel::from_dir(&dir.join("checkpoint"), DType::F32, &Device::Cpu).unwrap();
    let inp = npz(&dir.join(format!("inputs{suffix}.npz")));
    let exp = npz(&dir.join(format!("expected{suffix}.npz")));
    let (b, l) = inp["input_ids"].dims2().unwrap();
    let ids = i64s(&inp["input_ids"]);
    let am = i64s(&inp["attention_mask"]);
    let labels = i64s(&inp["labels"]);
    let pam: Vec<bool> =
        inp["pixel_attention_mask"].flatten_all().unwrap().to_vec1::<u8>().unwrap().iter().map(|&v| v != 0).collect();
    let input = ForwardInput {
        input_ids: &ids,
        batch: b,
        seq_len: l,
        attention_mask: Some(&am),
        pixel_values: Some(&inp["pixel_values"]),
        pixel_attention_mask: Some(&pam),
        labels: Some(&labels),
        logits_to_keep: 0,
    };
    let out = model.forward(&input, &no_interrupt).unwrap();
    let got = out.logits.to_vec3::<f32>().unwrap();
    let want = exp["logits"].to_vec3::<f32>().unwrap();
    let (mut diff, mut scale) = (0f32, 0f32);
    for bi in 0..b {
        for t in 0..l {
            if am[bi * l + t] == 0 {
                continue; // padded positions mean nothing
            }
            for (g, w) in got[bi][t].iter().zip(&want[bi][t]) {
                diff = diff.max((g - w).abs());
                scale = scale.max(w.abs());
            }
        }
    }
    assert!(diff <= 1e-4 * scale, "{case}{suffix}: logits diff {diff} vs scale {scale}");
    let want_loss = exp["loss"].to_scalar::<f32>().unwrap();
    let loss = out.loss.unwrap();
    assert!((loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "{case}{suffix}: loss {loss} vs {want_loss}");
}

#[test]
fn idefics3_batch_with_padding_and_two_images() {
    check_case("idefics3_gqa", "");
    check_case("idefics3_gqa", "_leftpad");
}

#[test]
fn idefics3_masked_patch_grid() {
    check_case("idefics3_gqa", "_patchmask");
}

#[test]
fn smolvlm_tied_sharded_bf16_checkpoint() {
    check_case("smolvlm_tied", "");
    check_case("smolvlm_tied", "_patchmask");
}

#[test]
fn image_token_count_mismatch_is_an_input_error() {
    let dir = fixtures().join("idefics3_gqa");
    let model = VlmModel::from_dir(&dir.join("checkpoint"), DType::F32, &Device::Cpu).unwrap();
    let inp = npz(&dir.join("inputs.npz"));
    let (b, l) = inp["input_ids"].dims2().unwrap();
    let mut ids = i64s(&inp["input_ids"]);
    let first_image = ids.iter().position(|&t| t == 290).unwrap();
    ids[first_image] = 5; // one image token short
    let input = ForwardInput {
        input_ids: &ids,
        batch: b,
        seq_len: l,
        attention_mask: None,
        pixel_values: Some(&inp["pixel_values"]),
        pixel_attention_mask: None,
        labels: None,
        logits_to_keep: 0,
    };
    match model.forward(&input, &no_interrupt) {
        Err(Error::Input(e)) => assert!(e.to_string().contains("11 image tokens"), "{e}"),
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("accepted a mismatched image-token count"),
    }
}

#[test]
fn interrupt_stops_between_layers() {
    let dir = fixtures().join("idefics3_gqa");
    let model = VlmModel::from_dir(&dir.join("checkpoint"), DType::F32, &Device::Cpu).unwrap();
    let ids = vec![5i64; 8];
    let input = ForwardInput {
        input_ids: &ids,
        batch: 1,
        seq_len: 8,
        attention_mask: None,
        pixel_values: None,
        pixel_attention_mask: None,
        labels: None,
        logits_to_keep: 0,
    };
    let stop = || true;
    assert!(matches!(model.forward(&input, &stop), Err(Error::Interrupted)));
}
