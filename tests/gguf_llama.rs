//! Llama GGUF files: the config from `llama.*`, tensors under Hugging Face names with llama.cpp's
//! Q/K row permutation undone, `WeightStore` over a GGUF file, and the real SmolLM2 file compared
//! with transformers' GGUF loader.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ferrovlm::checkpoint::gguf_llama::{gguf_name, permute_order, unpermute_order};
use ferrovlm::checkpoint::{GgufArray, GgufFile, GgufLlama, GgufValue, GgufWriter, WeightStore};
use ferrovlm::error::CheckpointError;
use ferrovlm::quant::ggml::GgmlType;

fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("SMOLLM2_GGUF").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            eprintln!("note: skipped: SMOLLM2_GGUF is {other:?}, not the path of SmolLM2-135M-Instruct.Q4_1.gguf");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny Llama written here: hidden 32, 4 heads, 2 KV heads (head_dim 8), 2 layers, MLP 64,
// 10 tokens, tied head.
// ---------------------------------------------------------------------------------------------

const H: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const FF: usize = 64;
const LAYERS: usize = 2;
const VOCAB: usize = 10;

/// llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), written the way it reads:
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)`.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for d in 0..half {
            for t in 0..2 {
                let src = (h * 2 + t) * half + d; // index [h, t, d] of the reshaped source
                let dst = (h * half + d) * 2 + t; // index [h, d, t] after the swap
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Hugging Face values of `name` [rows, cols]: distinct per tensor, row and column.
fn hf_values(seed: usize, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| (seed * 10000 + (i / cols) * 100 + i % cols) as f32 * 1e-3).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Q8_0 rows whose GGUF row g holds the values (3g + j) as i8, scale 1.
fn q8_rows(rows: usize, cols: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for g in 0..rows {
        for b in 0..cols / 32 {
            out.extend_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            out.extend((0..32).map(|j| (3 * g + 32 * b + j) as u8));
        }
    }
    out
}

fn tiny_llama(extra: impl FnOnce(&mut GgufWriter)) -> Vec<u8> {
    let mut w = GgufWriter::new();
    let s = |x: &str| GgufValue::String(x.into());
    w.add_metadata("general.architecture", s("llama")).unwrap();
    // The test's own entries first: the defaults below then skip the keys it set.
    extra(&mut w);
    let mut add = |k: &str, v: GgufValue| {
        let _ = w.add_metadata(k, v);
    };
    add("general.name", s("tiny"));
    for (k, v) in [
        ("llama.block_count", LAYERS),
        ("llama.embedding_length", H),
        ("llama.feed_forward_length", FF),
        ("llama.attention.head_count", HEADS),
        ("llama.attention.head_count_kv", KV),
        ("llama.context_length", 512),
    ] {
        add(k, GgufValue::U32(v as u32));
    }
    add("llama.rope.freq_base", GgufValue::F32(5e4));
    add("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5));
    let tokens = (0..VOCAB).map(|i| format!("t{i}")).collect();
    add("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens)));
    add("tokenizer.ggml.padding_token_id", GgufValue::U32(2));
    let f32_tensor = |w: &mut GgufWriter, name: &str, shape: &[usize], v: Vec<f32>| {
        w.add_tensor(name, GgmlType::F32, shape, f32_bytes(&v)).unwrap();
    };
    f32_tensor(&mut w, "token_embd.weight", &[VOCAB, H], hf_values(1, VOCAB, H));
    f32_tensor(&mut w, "output_norm.weight", &[H], hf_values(2, 1, H));
    for l in 0..LAYERS {
        let seed = 10 * (l + 1);
        let n = |leaf: &str| format!("blk.{l}.{leaf}.weight");
        f32_tensor(&mut w, &n("attn_norm"), &[H], hf_values(seed, 1, H));
        f32_tensor(&mut w, &n("ffn_norm"), &[H], hf_values(seed + 1, 1, H));
        let q = llama_cpp_permute(&hf_values(seed + 2, HEADS * 8, H), HEADS * 8, H, HEADS);
        f32_tensor(&mut w, &n("attn_q"), &[HEADS * 8, H], q);
        if l == 0 {
            let k = llama_cpp_permute(&hf_values(seed + 3, KV * 8, H), KV * 8, H, KV);
            f32_tensor(&mut w, &n("attn_k"), &[KV * 8, H], k);
        } else {
            w.add_tensor(n("attn_k"), GgmlType::Q8_0, &[KV * 8, H], q8_rows(KV * 8, H)).unwrap();
        }
        f32_tensor(&mut w, &n("attn_v"), &[KV * 8, H], hf_values(seed + 4, KV * 8, H));
        f32_tensor(&mut w, &n("attn_output"), &[H, H], hf_values(seed + 5, H, H));
        f32_tensor(&mut w, &n("ffn_gate"), &[FF, H], hf_values(seed + 6, FF, H));
        f32_tensor(&mut w, &n("ffn_up"), &[FF, H], hf_values(seed + 7, FF, H));
        f32_tensor(&mut w, &n("ffn_down"), &[H, FF], hf_values(seed + 8, H, FF));
    }
    w.to_bytes()
}

fn open(bytes: Vec<u8>, prefix: &str) -> Result<GgufLlama, CheckpointError> {
    GgufLlama::from_file(GgufFile::from_bytes(bytes, "tiny.gguf")?, prefix)
}

fn get(store: &WeightStore, name: &str, shape: &[usize]) -> Vec<f32> {
    store.get(name, shape, DType::F32, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn config_from_llama_keys() {
    let g = open(tiny_llama(|_| {}), "model").unwrap();
    let c = g.config();
    let t = &c.text;
    assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (H, FF, LAYERS));
    assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim), (HEADS, KV, 8)); // 32 / 4
    assert_eq!(t.vocab_size, VOCAB); // no llama.vocab_size: the number of tokens
    assert_eq!((t.rope_theta, t.rms_norm_eps), (5e4, 1e-5f32 as f64));
    assert_eq!((t.max_position_embeddings, t.pad_token_id, t.hidden_act.as_str()), (512, Some(2), "silu"));
    assert!(c.tie_word_embeddings && !t.attention_bias);
    assert_eq!(c.name.as_deref(), Some("tiny"));
}

#[test]
fn names_follow_transformers() {
    let g = open(tiny_llama(|_| {}), "model").unwrap();
    let mut names: Vec<&str> = g.names().collect();
    names.sort();
    assert_eq!(names.len(), 2 + 9 * LAYERS);
    for (hf, gg) in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("model.layers.1.input_layernorm.weight", "blk.1.attn_norm.weight"),
        ("model.layers.1.post_attention_layernorm.weight", "blk.1.ffn_norm.weight"),
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
        ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
        ("model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight"),
        ("model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight"),
        ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
        ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
    ] {
        assert_eq!(g.info(hf).map(|i| i.name.as_str()), Some(gg), "{hf}");
        assert_eq!(gguf_name(hf, "model").as_deref(), Some(gg));
    }
    assert_eq!(gguf_name("lm_head.weight", "model").as_deref(), Some("output.weight"));
    assert!(!g.contains("lm_head.weight")); // tied: not in the file
                                            // Inside SmolVLM the text model sits under another prefix.
    let g = open(tiny_llama(|_| {}), "model.text_model").unwrap();
    assert!(g.contains("model.text_model.layers.1.mlp.down_proj.weight"));
}

#[test]
fn permutation_orders_are_inverse() {
    for (rows, heads) in [(576, 9), (192, 3), (8, 1), (32, 4), (2, 1), (0, 3)] {
        let un = unpermute_order(rows, heads).unwrap();
        let re = permute_order(rows, heads).unwrap();
        for r in 0..rows {
            assert_eq!(re[un[r]], r);
            assert_eq!(un[re[r]], r);
        }
    }
    // Within a head of 2 * half rows, HF row t * half + d sits at row 2d + t (transformers' map
    // for SmolLM2's q_proj: HF rows 1, 31, 32, 33 are GGUF rows 2, 62, 1, 3).
    let un = unpermute_order(576, 9).unwrap();
    assert_eq!([un[0], un[1], un[31], un[32], un[33], un[63], un[64], un[575]], [0, 2, 62, 1, 3, 63, 64, 575]);
    assert!(unpermute_order(10, 3).is_none() && unpermute_order(6, 2).is_none() && unpermute_order(4, 0).is_none());
}

#[test]
fn weight_store_undoes_the_permutation() {
    let store = WeightStore::from_gguf(open(tiny_llama(|_| {}), "model").unwrap());
    // llama.cpp's permutation applied when writing, undone when reading: the Hugging Face values.
    assert_eq!(get(&store, "model.layers.0.self_attn.q_proj.weight", &[32, H]), hf_values(12, 32, H));
    assert_eq!(get(&store, "model.layers.0.self_attn.k_proj.weight", &[16, H]), hf_values(13, 16, H));
    assert_eq!(get(&store, "model.layers.1.self_attn.q_proj.weight", &[32, H]), hf_values(22, 32, H));
    // Not permuted.
    assert_eq!(get(&store, "model.layers.0.self_attn.v_proj.weight", &[16, H]), hf_values(14, 16, H));
    assert_eq!(get(&store, "model.layers.1.mlp.down_proj.weight", &[H, FF]), hf_values(28, H, FF));
    assert_eq!(get(&store, "model.norm.weight", &[H]), hf_values(2, 1, H));
    assert_eq!(store.shape("model.embed_tokens.weight"), Some(vec![VOCAB, H]));
    // Other dtypes.
    let bf = store.get("model.norm.weight", &[H], DType::BF16, &Device::Cpu).unwrap();
    let want: Vec<half::bf16> = hf_values(2, 1, H).into_iter().map(half::bf16::from_f32).collect();
    assert_eq!(bf.to_vec1::<half::bf16>().unwrap(), want);
    assert!(store.get("model.norm.weight", &[H], DType::U8, &Device::Cpu).is_err());
}

#[test]
fn quantized_rows_move_as_blocks() {
    let store = WeightStore::from_gguf(open(tiny_llama(|_| {}), "model").unwrap());
    let name = "model.layers.1.self_attn.k_proj.weight";
    let rows = store.gguf_rows(name).unwrap().unwrap();
    assert_eq!((rows.ty, rows.shape.clone()), (GgmlType::Q8_0, vec![16, H]));
    let un = unpermute_order(16, KV).unwrap();
    let stored = q8_rows(16, H);
    for (r, &g) in un.iter().enumerate() {
        assert_eq!(rows.data[r * 34..(r + 1) * 34], stored[g * 34..(g + 1) * 34], "row {r}");
    }
    // Dequantized through the store: HF row r holds GGUF row g's values (3g + j) as i8.
    let v = get(&store, name, &[16, H]);
    for (r, &g) in un.iter().enumerate() {
        let want: Vec<f32> = (0..H).map(|j| (3 * g + j) as u8 as i8 as f32).collect();
        assert_eq!(v[r * H..(r + 1) * H], want, "row {r}");
    }
    // Safetensors stores have no GGUF rows; raw safetensors access to a GGUF store is refused.
    assert!(store.raw(name).is_err());
}

#[test]
fn store_errors_name_the_tensor() {
    let store = WeightStore::from_gguf(open(tiny_llama(|_| {}), "model").unwrap());
    let e = store.get("model.norm.weight", &[H + 1], DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, CheckpointError::BadShape { .. }), "{e}");
    let e = store.get("lm_head.weight", &[VOCAB, H], DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, CheckpointError::MissingTensor { .. }), "{e}");
    assert!(store.gguf_rows("nope").is_err());
}

/// An edit of the tiny model's metadata or tensors.
type Edit = Box<dyn Fn(&mut GgufWriter)>;

#[test]
fn bad_llama_files_are_typed_errors() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("gemma".into())).unwrap();
    let e = open(w.to_bytes(), "model").unwrap_err();
    assert!(matches!(e, CheckpointError::GgufUnsupported { .. }) && e.to_string().contains("'gemma'"), "{e}");

    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|w| w.add_metadata("llama.vocab_size", GgufValue::String("big".into())).unwrap()),
            "'llama.vocab_size': expected a non-negative integer, found STRING",
        ),
        (
            Box::new(|w| w.add_metadata("llama.rope.dimension_count", GgufValue::U32(7)).unwrap()),
            "'llama.rope.dimension_count': expected an even head size, found 7",
        ),
        (
            Box::new(|w| w.add_metadata("llama.rope.scaling.type", GgufValue::String("yarn".into())).unwrap()),
            "RoPE scaling 'yarn'",
        ),
        (
            Box::new(|w| w.add_metadata("llama.rope.freq_base", GgufValue::U32(1)).unwrap()),
            "'llama.rope.freq_base': expected FLOAT32 or FLOAT64, found UINT32 1",
        ),
        (
            Box::new(|w| w.add_tensor("rope_freqs.weight", GgmlType::F32, &[4], vec![0; 16]).unwrap()),
            "rope_freqs.weight",
        ),
    ];
    for (edit, want) in cases {
        let e = open(tiny_llama(edit), "model").unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    // Q rows that are not whole heads: the permutation cannot be undone.
    let mut w = GgufWriter::new();
    for (k, v) in [
        ("llama.block_count", 1u32),
        ("llama.embedding_length", 32),
        ("llama.feed_forward_length", 32),
        ("llama.attention.head_count", 4),
        ("llama.vocab_size", 1),
    ] {
        w.add_metadata(k, GgufValue::U32(v)).unwrap();
    }
    w.add_metadata("general.architecture", GgufValue::String("llama".into())).unwrap();
    w.add_tensor("blk.0.attn_q.weight", GgmlType::F32, &[12, 32], vec![0; 12 * 32 * 4]).unwrap();
    let e = open(w.to_bytes(), "model").unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("12 rows"), "{e}");
    // A missing required key.
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into())).unwrap();
    let e = open(w.to_bytes(), "model").unwrap_err().to_string();
    assert!(e.contains("'llama.embedding_length'") && e.contains("absent"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The real file against transformers
// ---------------------------------------------------------------------------------------------

/// sum over rows r and columns c of (r + 1) * (c % 7 + 1) * W[r, c]: depends on the row order.
fn checksum(w: &[f32], cols: usize) -> f64 {
    w.iter().enumerate().map(|(i, &x)| ((i / cols + 1) * (i % cols % 7 + 1)) as f64 * x as f64).sum()
}

#[test]
fn real_file_matches_transformers() {
    let Some(path) = smollm2() else { return };
    let store = WeightStore::open_gguf(&path).unwrap();
    let g = store.gguf().unwrap();
    let c = g.config();
    let t = &c.text;
    assert_eq!((t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads), (576, 30, 9, 3));
    assert_eq!((t.vocab_size, t.head_dim, t.intermediate_size, t.max_position_embeddings), (49152, 64, 1536, 8192));
    assert_eq!((t.rope_theta, t.rms_norm_eps, t.pad_token_id), (100000.0, 9.999999747378752e-06, Some(2)));
    assert!(c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
    assert_eq!(store.names().count(), 272);

    // Values from transformers 5.24 (refenv): AutoModelForCausalLM.from_pretrained(dir,
    // gguf_file=..., dtype=torch.float32).state_dict(), printed with .tolist() / repr(float).
    let q = get(&store, "model.layers.0.self_attn.q_proj.weight", &[576, 576]);
    let row = |w: &[f32], r: usize, n: usize| w[r * 576..r * 576 + n].iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_eq!(
        row(&q, 32, 6),
        [-0.1173095703125, -0.1173095703125, -0.19281005859375, 0.26019287109375, -0.49481201171875, 0.1846923828125]
    );
    assert_eq!(row(&q, 1, 4), [-0.1591796875, 0.39794921875, -0.0198974609375, -1.2734375]);
    let k = get(&store, "model.layers.29.self_attn.k_proj.weight", &[192, 576]);
    assert_eq!(row(&k, 1, 4), [0.05859375, -0.02734375, 0.1015625, -0.11328125]);
    let e = store.get("model.embed_tokens.weight", &[49152, 576], DType::F32, &Device::Cpu).unwrap();
    let e_row: Vec<f64> = e.get(19556).unwrap().to_vec1::<f32>().unwrap()[..4].iter().map(|&x| x as f64).collect();
    assert_eq!(e_row, [-0.0512237548828125, 0.0398406982421875, 0.0, 0.0853729248046875]);
    // Row-order checksums over whole tensors (transformers: the same sum in float64).
    for (name, rows, cols, want) in [
        ("model.layers.0.self_attn.q_proj.weight", 576, 576, 119344.08212280273),
        ("model.layers.0.self_attn.k_proj.weight", 192, 576, 54914.887268066406),
        ("model.layers.17.self_attn.q_proj.weight", 576, 576, -325612.07682418823),
        ("model.layers.29.self_attn.k_proj.weight", 192, 576, 51850.53535461426),
        ("model.layers.3.mlp.down_proj.weight", 576, 1536, 343570.89836120605),
    ] {
        let got = checksum(&get(&store, name, &[rows, cols]), cols);
        assert!((got - want).abs() <= 1e-9 * want.abs(), "{name}: {got} vs {want}");
    }
}

#[test]
fn real_file_rows_repermute_to_the_file() {
    // Un-permuting the raw Q/K rows and permuting them again gives back the file's bytes; the
    // un-permuted rows dequantize to what `get` returns.
    let Some(path) = smollm2() else { return };
    let store = WeightStore::open_gguf(&path).unwrap();
    let g = store.gguf().unwrap();
    for (name, heads) in [("model.layers.0.self_attn.q_proj.weight", 9), ("model.layers.5.self_attn.k_proj.weight", 3)]
    {
        let rows = store.gguf_rows(name).unwrap().unwrap();
        let info = g.info(name).unwrap();
        let stored = g.file().data(info);
        let rb = info.row_bytes();
        let perm = permute_order(rows.shape[0], heads).unwrap();
        let mut back = vec![0u8; stored.len()];
        for (gr, &hf) in perm.iter().enumerate() {
            back[gr * rb..(gr + 1) * rb].copy_from_slice(&rows.data[hf * rb..(hf + 1) * rb]);
        }
        assert!(back == stored, "{name}");
        let mut deq = vec![0f32; rows.shape[0] * rows.shape[1]];
        for (r, dst) in deq.chunks_exact_mut(rows.shape[1]).enumerate() {
            ferrovlm::quant::ggml::dequantize_row(rows.ty, &rows.data[r * rb..(r + 1) * rb], dst);
        }
        assert_eq!(deq, get(&store, name, &rows.shape), "{name}");
    }
}

#[test]
fn real_file_runs_in_the_text_model() {
    // The existing loader over the GGUF store: last-position logits of a chat prompt equal
    // transformers' (fp32, eager; prompt = the chat template on "What is the capital of France?").
    let Some(path) = smollm2() else { return };
    use ferrovlm::model::text::TextModel;
    use ferrovlm::model::LoadCtx;
    use ferrovlm::ops::Mask;
    let store = WeightStore::open_gguf(&path).unwrap();
    let cfg = store.gguf().unwrap().config().text.clone();
    let ctx = LoadCtx { dtype: DType::F32, device: Device::Cpu, bf16_storage: false, bf16_compute: false, quant: None };
    let model = TextModel::load(&store, "model", &cfg, &ctx).unwrap();
    let ids: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
        198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ];
    let l = ids.len();
    let ids_t = Tensor::from_vec(ids, (1, l), &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, l as u32, &Device::Cpu).unwrap().reshape((1, l)).unwrap();
    let x = model.embed(&ids_t).unwrap();
    let mask = Mask { causal: true, key_valid: None };
    let h = model.forward(&x, &pos, &mask, None, &ferrovlm::model::no_interrupt).unwrap();
    let last = h.get(0).unwrap().get(l - 1).unwrap(); // [576]
    let logits: Vec<f32> =
        model.embed_tokens.matmul(&last.unsqueeze(1).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert_eq!(order[..5], [504, 60, 15319, 2219, 7026]);
    let want = [25.325389862060547, 25.243297576904297, 24.94241714477539, 24.401674270629883, 24.31463623046875];
    for (i, w) in order[..5].iter().zip(want) {
        assert!((logits[*i] as f64 - w).abs() < 2e-3, "{i}: {} vs {w}", logits[*i]);
    }
}
