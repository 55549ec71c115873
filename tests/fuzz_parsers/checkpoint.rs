//! Targets: safetensors files and shards, config.json, PEFT adapter weights.

use super::*;

// ---------------------------------------------------------------------------------------------
// Safetensors files
// ---------------------------------------------------------------------------------------------

/// A small valid safetensors file with every float dtype, an int tensor, a scalar and an empty tensor.
pub(crate) fn small_safetensors() -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype as D;
    let f32s: Vec<u8> = (0..12).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let bf16s: Vec<u8> = (0..6).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..4).flat_map(|i| half::f16::from_f32(-(i as f32)).to_le_bytes()).collect();
    let i64s: Vec<u8> = (0..3i64).flat_map(|i| i.to_le_bytes()).collect();
    let scalar: Vec<u8> = 7f32.to_le_bytes().to_vec();
    let u8s: Vec<u8> = vec![1, 2, 3, 4, 5];
    let empty: Vec<u8> = Vec::new();
    let views = vec![
        ("a.weight".to_string(), TensorView::new(D::F32, vec![3, 4], &f32s).unwrap()),
        ("b.weight".to_string(), TensorView::new(D::BF16, vec![2, 3], &bf16s).unwrap()),
        ("c.bias".to_string(), TensorView::new(D::F16, vec![4], &f16s).unwrap()),
        ("ids".to_string(), TensorView::new(D::I64, vec![3], &i64s).unwrap()),
        ("scalar".to_string(), TensorView::new(D::F32, vec![], &scalar).unwrap()),
        ("bytes".to_string(), TensorView::new(D::U8, vec![5], &u8s).unwrap()),
        ("empty".to_string(), TensorView::new(D::F32, vec![0, 3], &empty).unwrap()),
    ];
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta)).unwrap()
}

/// (header JSON, data) of a safetensors file.
pub(crate) fn split_safetensors(b: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&b[8..8 + n]).unwrap(), b[8 + n..].to_vec())
}

pub(crate) const ST_KEYS: [&str; 6] = ["dtype", "shape", "data_offsets", "__metadata__", "a.weight", "format"];

pub(crate) fn st_extra() -> Vec<Value> {
    let mut v: Vec<Value> =
        ["F32", "BF16", "F16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "F4", "E8M0", "f32", "Q4"]
            .iter()
            .map(|s| json!(s))
            .collect();
    v.extend([
        json!([0, 0]),
        json!([0, 48]),
        json!([48, 0]),
        json!([0, u64::MAX]),
        json!([u64::MAX, u64::MAX]),
        json!([4294967296u64, 4294967296u64]),
        json!([3, 4, 5]),
        json!([0]),
        json!([1u64 << 31, 1u64 << 31, 4]),
        json!([4611686018427387904u64, 4]),
        json!([18446744073709551615u64]),
        json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
        json!({"dtype": "F32", "shape": [1u64 << 40], "data_offsets": [0, 4]}),
    ]);
    v
}

/// How a safetensors seed is corrupted: header JSON edits (re-serialized with a correct length, or
/// a wrong one), or raw bytes anywhere / in the header.
#[derive(Clone, Debug)]
pub(crate) enum StMut {
    Header {
        json: JsonMut,
        pad: u8,
        length: Option<ByteOp>,
    },
    Bytes(Vec<ByteOp>),
    /// Consistent edits that still pass safetensors' validation: a tensor gets another dtype and
    /// shape with the same byte size, or two tensors swap names.
    Retag {
        tensor: Index,
        dtype: Index,
        split: Index,
        swap_with: Option<Index>,
    },
}

pub(crate) fn st_mut() -> impl Strategy<Value = StMut> {
    prop_oneof![
        2 => (any::<Index>(), any::<Index>(), any::<Index>(), prop::option::weighted(0.3, any::<Index>()))
            .prop_map(|(tensor, dtype, split, swap_with)| StMut::Retag { tensor, dtype, split, swap_with }),
        3 => (json_mut(), 0u8..9, prop::option::weighted(0.15, byte_op()))
            .prop_map(|(json, pad, length)| StMut::Header { json, pad, length }),
        2 => byte_ops(4).prop_map(StMut::Bytes),
    ]
}

pub(crate) fn apply_st(seed: &[u8], m: &StMut) -> Vec<u8> {
    match m {
        StMut::Header { json, pad, length } => {
            let (header, data) = split_safetensors(seed);
            let mut h = apply_json(&header, json, &ST_KEYS, &st_extra());
            h.extend(std::iter::repeat_n(b' ', *pad as usize));
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(data);
            match length {
                Some(op) => mutate_bytes(out, std::slice::from_ref(op), 8),
                None => out,
            }
        }
        StMut::Bytes(ops) => {
            let head = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
            mutate_bytes(seed.to_vec(), ops, head)
        }
        StMut::Retag { tensor, dtype, split, swap_with } => {
            let (mut header, data) = split_safetensors(seed);
            let names: Vec<String> =
                header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
            if !names.is_empty() {
                let name = &names[tensor.index(names.len())];
                let entry = &mut header[name.as_str()];
                let off = &entry["data_offsets"];
                let bytes = (off[1].as_u64().unwrap() - off[0].as_u64().unwrap()) as usize;
                const DTYPES: [(&str, usize); 13] = [
                    ("F32", 4),
                    ("I32", 4),
                    ("U32", 4),
                    ("BF16", 2),
                    ("F16", 2),
                    ("I16", 2),
                    ("U16", 2),
                    ("F64", 8),
                    ("I64", 8),
                    ("U8", 1),
                    ("I8", 1),
                    ("BOOL", 1),
                    ("F8_E4M3", 1),
                ];
                let fits: Vec<(&str, usize)> =
                    DTYPES.iter().copied().filter(|(_, size)| bytes.is_multiple_of(*size)).collect();
                let (dt, size) = fits[dtype.index(fits.len())];
                let numel = bytes / size;
                let divisors: Vec<usize> = (1..=numel.max(1)).filter(|d| numel.is_multiple_of(*d)).collect();
                let a = divisors[split.index(divisors.len())];
                let shape = match split.index(4) {
                    _ if numel == 0 => json!([0, 7]),
                    0 if numel == 1 => json!([]),
                    1 => json!([numel]),
                    _ => json!([a, numel / a]),
                };
                entry["dtype"] = json!(dt);
                entry["shape"] = shape;
                if let Some(other) = swap_with {
                    let b = names[other.index(names.len())].clone();
                    let obj = header.as_object_mut().unwrap();
                    let (x, y) = (obj.remove(name).unwrap(), obj.remove(&b));
                    if let Some(y) = y {
                        obj.insert(name.clone(), y);
                    }
                    obj.insert(b, x);
                }
            }
            let h = serde_json::to_vec(&header).unwrap();
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(data);
            out
        }
    }
}

/// Reads every tensor the way the loaders do: shape, raw bytes, and as F32 / BF16 / F16.
pub(crate) fn read_store(store: &WeightStore) -> Result<(), TestCaseError> {
    let mut names: Vec<String> = store.names().map(str::to_string).collect();
    names.sort();
    for n in names {
        let shape = store.shape(&n).unwrap();
        if let Some((_, s, bytes, _)) = check("raw", store.raw(&n))? {
            prop_assert_eq!(&s, &shape);
            let _ = bytes.iter().fold(0u8, |a, b| a ^ b);
        }
        for dt in [DType::F32, DType::BF16, DType::F16, DType::U8] {
            if let Some(t) = check("get", store.get(&n, &shape, dt, &Device::Cpu))? {
                prop_assert_eq!(t.dims(), shape.as_slice());
            }
        }
        // A wrong expected shape is a BadShape error, not a panic.
        let mut other = shape.clone();
        other.push(1);
        prop_assert!(store.get(&n, &other, DType::F32, &Device::Cpu).is_err());
    }
    prop_assert!(store.get("no such tensor", &[1], DType::F32, &Device::Cpu).is_err());
    Ok(())
}

pub(crate) fn model_dir() -> PathBuf {
    fixtures().join("idefics3_gqa/checkpoint")
}

#[test]
pub(crate) fn fuzz_safetensors_header() {
    let seeds = [small_safetensors(), read(fixtures().join("lora/text/adapter/adapter_model.safetensors"))];
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    fuzz("safetensors_header", 1, (0..seeds.len(), st_mut()), |(s, m)| {
        let bytes = apply_st(&seeds[s], &m);
        std::fs::write(&path, &bytes).unwrap();
        if let Some(store) = check("open_files", WeightStore::open_files(std::slice::from_ref(&path)))? {
            read_store(&store)?;
        }
        Ok(())
    });
}

/// A whole model loaded from a checkpoint whose model.safetensors header is corrupted: every
/// loader (vision, connector, text, head, and the bitsandbytes 4-bit / 8-bit ones for the
/// pre-quantized checkpoints) checks names, shapes, dtypes and the quantization blobs.
#[test]
pub(crate) fn fuzz_safetensors_model_load() {
    let dirs = [model_dir(), fixtures().join("bnb/nf4_dq/checkpoint"), fixtures().join("bnb/int8/checkpoint")];
    let seeds: Vec<Vec<u8>> = dirs.iter().map(|d| read(d.join("model.safetensors"))).collect();
    let tmp = tempfile::tempdir().unwrap();
    // Header edits only: raw data bytes are just numbers (except quantization state blobs, which
    // the Retag edits reinterpret).
    let header = (json_mut(), prop::option::weighted(0.1, byte_op())).prop_map(|(json, length)| StMut::Header {
        json,
        pad: 0,
        length,
    });
    let retag = (any::<Index>(), any::<Index>(), any::<Index>(), prop::option::weighted(0.3, any::<Index>()))
        .prop_map(|(tensor, dtype, split, swap_with)| StMut::Retag { tensor, dtype, split, swap_with });
    let strategy = (0..dirs.len(), prop_oneof![header, retag], any::<bool>());
    fuzz("safetensors_model_load", 2, strategy, |(s, m, bf16)| {
        std::fs::copy(dirs[s].join("config.json"), tmp.path().join("config.json")).unwrap();
        std::fs::write(tmp.path().join("model.safetensors"), apply_st(&seeds[s], &m)).unwrap();
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        check("VlmModel::from_dir", VlmModel::from_dir(tmp.path(), dtype, &Device::Cpu))?;
        Ok(())
    });
}

/// Two shards and `model.safetensors.index.json`; the index is edited (file names that escape,
/// are missing, are directories, non-strings...) and sometimes a shard is corrupted.
#[test]
pub(crate) fn fuzz_safetensors_index_and_shards() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype as D;
    let f: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let shard = |names: &[&str]| {
        let views: Vec<(String, TensorView<'_>)> =
            names.iter().map(|n| (n.to_string(), TensorView::new(D::F32, vec![2, 4], &f).unwrap())).collect();
        safetensors::tensor::serialize(views, None).unwrap()
    };
    let shards = [shard(&["x.weight", "y.weight"]), shard(&["z.weight"])];
    let index = json!({
        "metadata": {"total_size": 96},
        "weight_map": {
            "x.weight": "model-00001-of-00002.safetensors",
            "y.weight": "model-00001-of-00002.safetensors",
            "z.weight": "model-00002-of-00002.safetensors",
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(dir.join("subdir")).unwrap();
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let extra: Vec<Value> = vec![
        json!("model-00001-of-00002.safetensors"),
        json!("model-00002-of-00002.safetensors"),
        json!("missing.safetensors"),
        json!("subdir"),
        json!("."),
        json!(".."),
        json!("../ckpt/model-00001-of-00002.safetensors"),
        json!("/dev/null"),
        json!("/"),
        json!("config.json"),
        json!("model.safetensors.index.json"),
    ];
    let keys = ["weight_map", "metadata", "x.weight", "w.weight", "total_size"];
    let strategy = (json_mut(), prop::option::weighted(0.3, (0usize..2, st_mut())));
    fuzz("safetensors_index_and_shards", 3, strategy, |(m, bad_shard)| {
        for (i, n) in names.iter().enumerate() {
            let bytes = match &bad_shard {
                Some((k, sm)) if *k == i => apply_st(&shards[i], sm),
                _ => shards[i].clone(),
            };
            std::fs::write(dir.join(n), bytes).unwrap();
        }
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("model.safetensors.index.json"), apply_json(&index, &m, &keys, &extra)).unwrap();
        if let Some(store) = check("open_dir", WeightStore::open_dir(&dir))? {
            read_store(&store)?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

pub(crate) const CONFIG_KEYS: [&str; 24] = [
    "model_type",
    "vision_config",
    "text_config",
    "scale_factor",
    "image_token_id",
    "tie_word_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "pad_token_id",
    "quantization_config",
];

pub(crate) fn config_extra() -> Vec<Value> {
    vec![
        json!("idefics3"),
        json!("smolvlm"),
        json!("llama"),
        json!("silu"),
        json!("gelu"),
        json!({"rope_type": "default", "rope_theta": 1e30}),
        json!({"rope_type": "yarn"}),
        json!([8, 8]),
        json!(16.0),
        json!(1e20),
        json!(48),
        json!(65536),
    ]
}

/// config.json parsed (`ModelConfig`) and a whole model built from it with the fixture's weights:
/// config values drive allocations and shape arithmetic in every loader.
#[test]
pub(crate) fn fuzz_config_json() {
    let seeds: Vec<Value> = [model_dir().join("config.json"), fixtures().join("smolvlm_tied/checkpoint/config.json")]
        .iter()
        .map(|p| serde_json::from_slice(&read(p)).unwrap())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(model_dir().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let extra = config_extra();
    fuzz("config_json", 4, (0..seeds.len(), json_mut(), any::<bool>()), |(s, m, load)| {
        let text = apply_json(&seeds[s], &m, &CONFIG_KEYS, &extra);
        let parsed = match std::str::from_utf8(&text) {
            Ok(t) => check("from_json_str", ModelConfig::from_json_str(t, Path::new("config.json")))?,
            Err(_) => None,
        };
        if let Some(c) = &parsed {
            // The derived sizes the model uses must not overflow or divide by zero.
            let _ = (c.image_seq_len(), c.vision.patches_per_side(), c.vision.head_dim());
        }
        if load || parsed.is_some() {
            std::fs::write(tmp.path().join("config.json"), &text).unwrap();
            check("VlmModel::from_dir", VlmModel::from_dir(tmp.path(), DType::F32, &Device::Cpu))?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// PEFT adapter weights
// ---------------------------------------------------------------------------------------------

/// `adapter_model.safetensors` read back (`peft::load_tensors`) and loaded into a model with LoRA
/// (DoRA) adapters and a `modules_to_save` copy (`lora::load_state`), as `PeftModel.from_pretrained`
/// does. (adapter_config.json is parsed on the Python side.)
#[test]
pub(crate) fn fuzz_adapter_files() {
    let mut model = VlmModel::from_dir(&model_dir(), DType::F32, &Device::Cpu).unwrap();
    let names: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
    let lora_targets: Vec<String> = names.iter().filter(|n| n.contains("text_model.layers.0.")).cloned().collect();
    let modules_to_save: Vec<String> = names.iter().filter(|n| n.contains("connector")).cloned().collect();
    let spec =
        LoraSpec { r: 2, alpha: 4.0, dropout: 0.0, use_dora: true, use_rslora: false, init: LoraInit::Random, seed: 1 };
    lora::attach(&mut model, &AdapterPlan { lora_targets, spec, modules_to_save, saved_params: vec![] }).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("adapter_model.safetensors");
    peft::save_tensors(&path, &lora::state(&model).unwrap()).unwrap();
    let seeds = [read(&path), read(fixtures().join("lora/dora/adapter/adapter_model.safetensors"))];
    fuzz("adapter_files", 5, (0..seeds.len(), st_mut(), any::<bool>()), |(s, m, strict)| {
        std::fs::write(&path, apply_st(&seeds[s], &m)).unwrap();
        if let Some(tensors) = check("peft::load_tensors", peft::load_tensors(&path))? {
            check("lora::load_state", lora::load_state(&model, &tensors, strict))?;
        }
        Ok(())
    });
}
