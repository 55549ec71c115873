//! GGUF export against llama.cpp's own converter (`tests/fixtures/gguf_export`, written by
//! scripts/reference/gguf_export.py with `convert_hf_to_gguf.py`): our text and mmproj files for the
//! fixture checkpoints have the converter's metadata (keys, types, values, order) and tensors (names,
//! order, shapes, types, data sha256), byte-identical files where the converter's are committed; and
//! the exports read back (text + mmproj GGUF, or the folder with its text model from GGUF) give the
//! original model's logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrovlm::checkpoint::gguf_export::{export, text_gguf, GgufExportOptions, GgufQuantMethod};
use ferrovlm::checkpoint::gguf_mmproj::mmproj_gguf;
use ferrovlm::checkpoint::{GgufArray, GgufFile, GgufValue};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};
use ferrovlm::quant::ggml::GgmlType;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("gguf_export/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(case: &str) -> VlmModel {
    VlmModel::from_dir(&fixtures().join(case).join("checkpoint"), DType::F32, &Device::Cpu).unwrap()
}

fn opts(case: &str, method: GgufQuantMethod) -> GgufExportOptions {
    GgufExportOptions {
        method,
        // the converter ran on folders named after the case, with the processor config copied in
        name_or_path: format!("/tmp/converter/{case}"),
        assets_dir: Some(fixtures().join("processor/config")),
        tokenizer_gguf: None,
        mmproj_gguf: None,
    }
}

// --- SHA-256 (FIPS 180-4), for the converter's per-tensor digests -----------------------------

fn sha256(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([chunk[4 * i], chunk[4 * i + 1], chunk[4 * i + 2], chunk[4 * i + 3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7].wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [t1.wrapping_add(t2), v[0], v[1], v[2], v[3].wrapping_add(t1), v[4], v[5], v[6]];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_known_answer() {
    assert_eq!(sha256(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(sha256(&[0u8; 64])[..16], *"f5a5fd42d16a2030");
}

// --- comparing a file with the converter's description ----------------------------------------

fn value_json(v: &GgufValue) -> (String, Value) {
    let f = |x: f32| Value::from(x as f64);
    match v {
        GgufValue::U32(x) => ("UINT32".into(), Value::from(*x)),
        GgufValue::I32(x) => ("INT32".into(), Value::from(*x)),
        GgufValue::F32(x) => ("FLOAT32".into(), f(*x)),
        GgufValue::Bool(x) => ("BOOL".into(), Value::from(*x)),
        GgufValue::String(s) => ("STRING".into(), Value::from(s.clone())),
        GgufValue::Array(a) => {
            let items: Vec<Value> = match a {
                GgufArray::F32(v) => v.iter().map(|x| f(*x)).collect(),
                GgufArray::I32(v) => v.iter().map(|x| Value::from(*x)).collect(),
                GgufArray::String(v) => v.iter().map(|x| Value::from(x.clone())).collect(),
                other => panic!("unexpected array {other:?}"),
            };
            let n = items.len();
            let summary = serde_json::json!({
                "element_type": a.elem_type().name(), "length": n,
                "first": items[..n.min(5)], "last": items[n.saturating_sub(5)..],
            });
            ("ARRAY".into(), summary)
        }
        other => panic!("unexpected value {other:?}"),
    }
}

/// The converter's tensor order for a checkpoint folder: shard files sorted, names sorted within each
/// (gguf-py's `SafetensorsLocal`); as Hugging Face names.
fn converter_read_order(ckpt: &Path) -> Vec<String> {
    let index = ckpt.join("model.safetensors.index.json");
    let mut parts: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    if index.is_file() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
        for (name, file) in v["weight_map"].as_object().unwrap() {
            parts.entry(file.as_str().unwrap().to_string()).or_default().push(name.clone());
        }
    }
    parts
        .into_values()
        .flat_map(|mut names| {
            names.sort();
            names
        })
        .collect()
}

/// Our file `bytes` has exactly the keys and tensors the converter's `want` describes. `order`: the
/// converter read a sharded checkpoint, whose tensor order (shard by shard) ours - the order of a
/// single-file checkpoint, which is what `save_pretrained` writes - differs from: compare by name.
fn assert_like_converter(what: &str, bytes: Vec<u8>, want: &Value, same_order: bool) {
    let f = GgufFile::from_bytes(bytes.clone(), what).unwrap();
    let keys = want["keys"].as_array().unwrap();
    let ours = f.metadata_entries();
    let names: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
    let theirs: Vec<&str> = keys.iter().map(|k| k["key"].as_str().unwrap()).collect();
    assert_eq!(names, theirs, "{what}: metadata keys");
    for ((k, v), w) in ours.iter().zip(keys) {
        let (ty, val) = value_json(v);
        assert_eq!(ty, w["type"].as_str().unwrap(), "{what}: type of {k}");
        if ty == "ARRAY" {
            for field in ["element_type", "length", "first", "last"] {
                assert_eq!(val[field], w[field], "{what}: {k}.{field}");
            }
        } else {
            assert_eq!(val, w["value"], "{what}: value of {k}");
        }
    }
    let tensors = want["tensors"].as_array().unwrap();
    let infos = f.tensor_infos();
    let names: Vec<&str> = infos.iter().map(|t| t.name.as_str()).collect();
    let mut theirs: Vec<&str> = tensors.iter().map(|t| t["name"].as_str().unwrap()).collect();
    if !same_order {
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap_or(usize::MAX);
        theirs.sort_by_key(|n| pos(n));
    }
    assert_eq!(names, theirs, "{what}: tensor order");
    for t in infos {
        let w = tensors.iter().find(|w| w["name"] == t.name.as_str()).unwrap();
        let ne: Vec<u64> = w["ne"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(t.dims.iter().map(|&d| d as u64).collect::<Vec<_>>(), ne, "{what}: ne of {}", t.name);
        assert_eq!(t.ty.name(), w["type"].as_str().unwrap(), "{what}: type of {}", t.name);
        assert_eq!(t.n_bytes as u64, w["n_bytes"].as_u64().unwrap(), "{what}: bytes of {}", t.name);
        let digest = sha256(f.data(t));
        assert_eq!(&digest[..16], w["sha256_16"].as_str().unwrap(), "{what}: data of {}", t.name);
    }
    assert_eq!(bytes.len() as u64, want["file_bytes"].as_u64().unwrap(), "{what}: file size");
    assert_eq!(f.data_offset() as u64, want["tensor_data_offset"].as_u64().unwrap(), "{what}: data offset");
}

fn method(name: &str) -> GgufQuantMethod {
    GgufQuantMethod::parse(name).unwrap()
}

#[test]
fn text_and_mmproj_files_equal_the_converters() {
    let exp = expected();
    for case in ["smolvlm_tied", "idefics3_gqa"] {
        let model = load(case);
        let ckpt = fixtures().join(case).join("checkpoint");
        let sharded = ckpt.join("model.safetensors.index.json").is_file();
        for m in ["f32", "f16", "q8_0"] {
            let o = opts(case, method(m));
            let text = text_gguf(&model, &o).unwrap().to_bytes();
            let mm = mmproj_gguf(&model, &o).unwrap().to_bytes();
            for (part, bytes) in [("text", text), ("mmproj", mm)] {
                let what = format!("{case} {part} {m}");
                let want = &exp["cases"][case][format!("{part}.{m}")];
                // smolvlm_tied's shards happen to keep the text tensors in sorted order
                let same_order = !sharded || part == "text";
                assert_like_converter(&what, bytes.clone(), want, same_order);
                let committed = fixtures().join(format!("gguf_export/{case}.{part}.{m}.gguf"));
                if !committed.is_file() {
                    continue;
                }
                let theirs = GgufFile::open(&committed).unwrap();
                if same_order {
                    assert!(std::fs::read(&committed).unwrap() == bytes, "{what}: not byte-identical");
                } else {
                    let ours = GgufFile::from_bytes(bytes, &what).unwrap();
                    assert_eq!(ours.metadata_entries(), theirs.metadata_entries(), "{what}: metadata");
                    for t in ours.tensor_infos() {
                        let w = theirs.tensor_info(&t.name).unwrap();
                        assert!(ours.data(t) == theirs.data(w), "{what}: data of {}", t.name);
                    }
                }
            }
        }
        if sharded {
            // the converter's order is the shards' (checked against its mmproj output)
            let order: Vec<String> = converter_read_order(&ckpt)
                .iter()
                .filter_map(|n| ferrovlm::checkpoint::gguf_mmproj::mmproj_name(n))
                .collect();
            let theirs: Vec<String> = exp["cases"][case]["mmproj.f16"]["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(order, theirs, "{case}: the converter reads shard by shard");
        }
    }
}

fn npz(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_npz(path).unwrap().into_iter().collect()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

/// Logits of `model` on the case's fixture inputs (image batch), and the attention mask.
fn logits(model: &VlmModel, case: &str) -> (Vec<Vec<Vec<f32>>>, Vec<i64>, usize) {
    let inp = npz(&fixtures().join(case).join("inputs.npz"));
    let (b, l) = inp["input_ids"].dims2().unwrap();
    let ids = i64s(&inp["input_ids"]);
    let am = i64s(&inp["attention_mask"]);
    let pam: Vec<bool> =
        inp["pixel_attention_mask"].flatten_all().unwrap().to_vec1::<u8>().unwrap().iter().map(|&v| v != 0).collect();
    let input = ForwardInput {
        input_ids: &ids,
        batch: b,
        seq_len: l,
        attention_mask: Some(&am),
        pixel_values: Some(&inp["pixel_values"]),
        pixel_attention_mask: Some(&pam),
        labels: None,
        logits_to_keep: 0,
    };
    (model.forward(&input, &no_interrupt).unwrap().logits.to_vec3::<f32>().unwrap(), am, l)
}

/// Largest |a - b| over unpadded positions, and the largest |a|.
fn diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], am: &[i64], l: usize) -> (f32, f32) {
    let (mut d, mut s) = (0f32, 0f32);
    for (bi, (x, y)) in a.iter().zip(b).enumerate() {
        for t in 0..l {
            if am[bi * l + t] == 0 {
                continue;
            }
            for (p, q) in x[t].iter().zip(&y[t]) {
                d = d.max((p - q).abs());
                s = s.max(p.abs());
            }
        }
    }
    (d, s)
}

#[test]
fn exports_read_back_with_the_original_logits() {
    for case in ["idefics3_gqa", "smolvlm_tied"] {
        let model = load(case);
        let (want, am, l) = logits(&model, case);
        let ckpt = fixtures().join(case).join("checkpoint");
        for (m, tol) in [("f32", 1e-5f32), ("f16", 2e-2), ("q8_0", 5e-2)] {
            let dir = tempfile::tempdir().unwrap();
            let files = export(&model, dir.path(), &opts(case, method(m))).unwrap();
            let mmproj = files.mmproj.clone().unwrap();
            // text + mmproj GGUF, config.json for the image token id
            let back =
                VlmModel::from_gguf_mmproj(&files.text, &mmproj, Some(&ckpt), "idefics3", DType::F32, &Device::Cpu)
                    .unwrap();
            let (got, _, _) = logits(&back, case);
            let (d, s) = diff(&got, &want, &am, l);
            assert!(d <= tol * s.max(1.0), "{case} {m} (text + mmproj): logits differ by {d} (scale {s})");
            // the hub folder with its text model replaced by the GGUF file
            let back = VlmModel::from_dir_gguf_text(&ckpt, &files.text, DType::F32, &Device::Cpu).unwrap();
            let (got, _, _) = logits(&back, case);
            let (d2, _) = diff(&got, &want, &am, l);
            assert!(d2 <= tol * s.max(1.0), "{case} {m} (folder + text GGUF): logits differ by {d2} (scale {s})");
            eprintln!("{case} {m}: max |logit diff| {d:.3e} (two GGUF files), {d2:.3e} (folder + GGUF), scale {s:.2}");
        }
    }
}

#[test]
fn export_names_files_as_the_converter_does() {
    let model = load("smolvlm_tied");
    let dir = tempfile::tempdir().unwrap();
    let files = export(&model, dir.path(), &opts("smolvlm_tied", GgufQuantMethod::Q4KM)).unwrap();
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(name(&files.text), "Smolvlm_Tied-29K-Q4_K_M.gguf");
    assert_eq!(name(files.mmproj.as_ref().unwrap()), "mmproj-Smolvlm_Tied-F16.gguf");
}

#[test]
fn q4_k_m_falls_back_where_k_quants_do_not_fit() {
    // smolvlm_tied: rows of 32 (Q4_K -> Q5_0) and 56 (-> F16); the tied embedding is the output head:
    // Q6_K -> Q8_0 since 32 is not a multiple of 256; layer 1 of 2 gets more bits (attn_v, ffn_down).
    let model = load("smolvlm_tied");
    let o = opts("smolvlm_tied", GgufQuantMethod::Q4KM);
    let f = GgufFile::from_bytes(text_gguf(&model, &o).unwrap().to_bytes(), "q4_k_m").unwrap();
    let ty = |n: &str| f.tensor_info(n).unwrap().ty;
    assert_eq!(f.tensor_infos()[0].name, "output_norm.weight");
    assert_eq!(ty("token_embd.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.ffn_gate.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::F16);
    assert_eq!(ty("blk.1.attn_norm.weight"), GgmlType::F32);
    let keys: Vec<&str> = f.metadata_entries().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(&keys[keys.len() - 2..], ["general.quantization_version", "general.file_type"]);
    assert_eq!(f.get_usize("general.file_type").unwrap(), 15);
}

#[test]
fn models_with_adapters_are_refused_and_llama_models_have_no_mmproj() {
    let model = load("idefics3_gqa");
    let text_only = VlmModel { vision: None, connector: None, ..model.clone() };
    let e = mmproj_gguf(&text_only, &opts("x", GgufQuantMethod::F16)).err().unwrap().to_string();
    assert!(e.contains("no vision tower"), "{e}");
    let mut m = model;
    let spec = ferrovlm::lora::LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_dora: false,
        use_rslora: false,
        init: ferrovlm::lora::LoraInit::Default,
        seed: 0,
    };
    let plan = ferrovlm::lora::AdapterPlan {
        lora_targets: vec!["model.text_model.layers.0.self_attn.q_proj".into()],
        spec,
        modules_to_save: vec![],
        saved_params: vec![],
    };
    ferrovlm::lora::attach(&mut m, &plan).unwrap();
    let e = text_gguf(&m, &opts("x", GgufQuantMethod::F16)).err().unwrap().to_string();
    assert!(e.contains("merge_and_unload"), "{e}");
}

#[test]
fn tokenizer_keys_equal_the_converters_for_smolvlms_vocabulary() {
    // the converter on a tiny SmolVLM with SmolVLM's tokenizer files (vocab_size 49280)
    let exp = expected();
    let want: Vec<&Value> = exp["cases"]["smolvlm_tiny_fullvocab"]["text.f16"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["key"].as_str().unwrap().starts_with("tokenizer."))
        .collect();
    let config = serde_json::json!({"text_config": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}});
    let kv =
        ferrovlm::checkpoint::gguf_vocab::from_tokenizer_dir(&fixtures().join("tokenizer/smolvlm"), 49280, &config)
            .unwrap();
    let names: Vec<&str> = kv.0.iter().map(|(k, _)| k.as_str()).collect();
    let theirs: Vec<&str> = want.iter().map(|k| k["key"].as_str().unwrap()).collect();
    assert_eq!(names, theirs);
    for ((k, v), w) in kv.0.iter().zip(want) {
        let (ty, val) = value_json(v);
        assert_eq!(ty, w["type"].as_str().unwrap(), "type of {k}");
        if ty == "ARRAY" {
            for field in ["element_type", "length", "first", "last"] {
                assert_eq!(val[field], w[field], "{k}.{field}");
            }
        } else {
            assert_eq!(val, w["value"], "value of {k}");
        }
    }
    // SmolVLM's image tokens are in the vocabulary, by their text (llama.cpp finds them so)
    let Some(GgufValue::Array(GgufArray::String(tokens))) = kv.get("tokenizer.ggml.tokens") else { panic!() };
    for t in ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<image>"] {
        assert!(tokens.iter().any(|x| x == t), "{t}");
    }
}

#[test]
fn bad_mmproj_files_and_mismatched_configs_give_typed_errors() {
    use ferrovlm::checkpoint::gguf_mmproj::GgufClip;
    use ferrovlm::checkpoint::GgufWriter;
    use ferrovlm::error::{CheckpointError, ConfigError, Error};
    type Kv = Vec<(&'static str, GgufValue)>;
    let clip = |edit: &dyn Fn(&mut Kv)| {
        let s = |x: &str| GgufValue::String(x.into());
        let mut kv: Kv = vec![
            ("general.architecture", s("clip")),
            ("clip.projector_type", s("idefics3")),
            ("clip.vision.embedding_length", GgufValue::U32(32)),
            ("clip.vision.feed_forward_length", GgufValue::U32(64)),
            ("clip.vision.block_count", GgufValue::U32(1)),
            ("clip.vision.attention.head_count", GgufValue::U32(2)),
            ("clip.vision.image_size", GgufValue::U32(32)),
            ("clip.vision.patch_size", GgufValue::U32(8)),
            ("clip.vision.projector.scale_factor", GgufValue::U32(2)),
            ("clip.vision.projection_dim", GgufValue::U32(32)),
        ];
        edit(&mut kv);
        let mut w = GgufWriter::new();
        for (k, v) in kv {
            w.add_metadata(k, v).unwrap();
        }
        GgufClip::from_file(GgufFile::from_bytes(w.to_bytes(), "bad.gguf").unwrap())
    };
    assert!(clip(&|_| {}).is_ok());
    let e = clip(&|kv| kv[1].1 = GgufValue::String("llava".into())).unwrap_err();
    assert!(matches!(&e, CheckpointError::GgufUnsupported { what, .. } if what.contains("'llava'")), "{e}");
    let e = clip(&|kv| kv[0].1 = GgufValue::String("llama".into())).unwrap_err();
    assert!(matches!(&e, CheckpointError::GgufUnsupported { .. }), "{e}");
    let e = clip(&|kv| {
        kv.remove(4);
    })
    .unwrap_err();
    assert!(matches!(&e, CheckpointError::GgufMetadata { key, .. } if key == "clip.vision.block_count"), "{e}");
    let e = clip(&|kv| kv[6].1 = GgufValue::U32(0)).unwrap_err();
    assert!(matches!(&e, CheckpointError::GgufMetadata { key, .. } if key == "clip.vision.image_size"), "{e}");
    let e = clip(&|kv| kv[3].1 = GgufValue::String("64".into())).unwrap_err();
    assert!(matches!(&e, CheckpointError::GgufMetadata { key, .. } if key == "clip.vision.feed_forward_length"), "{e}");

    // files that do not belong to the config.json they are read with
    let dir = tempfile::tempdir().unwrap();
    let files = export(&load("idefics3_gqa"), dir.path(), &opts("idefics3_gqa", GgufQuantMethod::F32)).unwrap();
    let other = fixtures().join("smolvlm_tied/checkpoint");
    let mm = files.mmproj.unwrap();
    let e =
        VlmModel::from_gguf_mmproj(&files.text, &mm, Some(&other), "idefics3", DType::F32, &Device::Cpu).err().unwrap();
    assert!(matches!(&e, Error::Config(ConfigError::BadValue { key, .. }) if key == "text_config.hidden_size"), "{e}");
    let e = VlmModel::from_dir_gguf_text(&other, &files.text, DType::F32, &Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("text_config."), "{e}");
    // without a config.json the image token must be in the vocabulary (this file has none)
    let e = VlmModel::from_gguf_mmproj(&files.text, &mm, None, "idefics3", DType::F32, &Device::Cpu).err().unwrap();
    assert!(
        matches!(&e, Error::Checkpoint(CheckpointError::GgufMetadata { key, .. }) if key == "tokenizer.ggml.tokens"),
        "{e}"
    );
    // a text file given as the mmproj file
    let e =
        VlmModel::from_gguf_mmproj(&files.text, &files.text, None, "idefics3", DType::F32, &Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("architecture 'llama'"), "{e}");
}
