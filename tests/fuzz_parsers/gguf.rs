//! Target: GGUF files, through the reader, the Llama mapping (config, names, Q/K rows, the text
//! model loaded from them, dequantized or with its quantized weights kept) and the tokenizer rebuilt
//! from their metadata.

use super::checkpoint::read_store;
use super::*;
use ferrovlm::checkpoint::{GgufArray, GgufFile, GgufLlama, GgufValue, GgufWriter};
use ferrovlm::data::tokenizer_gguf::tokenizer_from_gguf;
use ferrovlm::model::text::TextModel;
use ferrovlm::model::LoadCtx;
use ferrovlm::quant::ggml::GgmlType;

/// A GGUF file before writing: metadata in order and tensors (name, type, shape outermost first).
#[derive(Clone, Debug)]
pub(crate) struct Desc {
    pub meta: Vec<(String, GgufValue)>,
    pub tensors: Vec<(String, GgmlType, Vec<usize>)>,
}

/// Deterministic bytes from `seed`.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

/// Data for a tensor: small finite floats for the float types, noise blocks for the others.
fn tensor_data(ty: GgmlType, shape: &[usize], seed: u64) -> Option<Vec<u8>> {
    let row = shape.last().copied().unwrap_or(1);
    let rows = shape.iter().rev().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let n = ty.row_bytes(row)?.checked_mul(rows).filter(|&n| n <= 1 << 20)?;
    let vals = |k: usize| (0..k).map(move |i| ((i as u64 * 37 + seed) % 97) as f32 / 97.0 - 0.5);
    Some(match ty {
        GgmlType::F32 => vals(n / 4).flat_map(f32::to_le_bytes).collect(),
        GgmlType::F16 => vals(n / 2).flat_map(|x| half::f16::from_f32(x).to_le_bytes()).collect(),
        GgmlType::Bf16 => vals(n / 2).flat_map(|x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        _ => noise(n, seed),
    })
}

/// A tiny Llama (hidden 32, 4 heads, 2 KV heads, MLP 32, one layer) with a byte-level tokenizer,
/// every metadata type, and tensors of every GGML type we read.
pub(crate) fn small_gguf_desc() -> Desc {
    let s = |x: &str| GgufValue::String(x.into());
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<think>".into()];
    tokens.extend(('!'..='~').map(|c| c.to_string()));
    tokens.extend(["Ġ", "Ġa", "ab", "12"].map(String::from));
    let n_tokens = tokens.len();
    let mut types = vec![3, 3, 4];
    types.resize(n_tokens, 1);
    let merges = vec!["Ġ a".to_string(), "a b".into(), "1 2".into()];
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.alignment".into(), GgufValue::U32(32)),
        ("general.name".into(), s("fuzz")),
        ("llama.block_count".into(), GgufValue::U32(1)),
        ("llama.context_length".into(), GgufValue::U32(64)),
        ("llama.embedding_length".into(), GgufValue::U32(32)),
        ("llama.feed_forward_length".into(), GgufValue::U32(32)),
        ("llama.attention.head_count".into(), GgufValue::U32(4)),
        ("llama.attention.head_count_kv".into(), GgufValue::U32(2)),
        ("llama.rope.freq_base".into(), GgufValue::F32(10000.0)),
        ("llama.rope.dimension_count".into(), GgufValue::U32(8)),
        ("llama.attention.layer_norm_rms_epsilon".into(), GgufValue::F32(1e-5)),
        ("llama.vocab_size".into(), GgufValue::U64(n_tokens as u64)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(GgufArray::String(tokens))),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(GgufArray::I32(types))),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(GgufArray::String(merges))),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true)),
        ("tokenizer.chat_template".into(), s("{% for m in messages %}{{ m.content }}{% endfor %}")),
        ("fuzz.u8".into(), GgufValue::U8(7)),
        ("fuzz.i8".into(), GgufValue::I8(-7)),
        ("fuzz.u16".into(), GgufValue::U16(700)),
        ("fuzz.i16".into(), GgufValue::I16(-700)),
        ("fuzz.i32".into(), GgufValue::I32(-70000)),
        ("fuzz.i64".into(), GgufValue::I64(-1)),
        ("fuzz.f64".into(), GgufValue::F64(0.25)),
        ("fuzz.floats".into(), GgufValue::Array(GgufArray::F32(vec![0.5, -2.0]))),
        (
            "fuzz.nested".into(),
            GgufValue::Array(GgufArray::Array(vec![GgufArray::U64(vec![1]), GgufArray::Bool(vec![true])])),
        ),
    ];
    let l = |leaf: &str| format!("blk.0.{leaf}.weight");
    let tensors = vec![
        ("token_embd.weight".to_string(), GgmlType::Q8_0, vec![n_tokens, 32]),
        ("output_norm.weight".into(), GgmlType::F32, vec![32]),
        (l("attn_norm"), GgmlType::F32, vec![32]),
        (l("attn_q"), GgmlType::F16, vec![32, 32]),
        (l("attn_k"), GgmlType::Q4_1, vec![16, 32]),
        (l("attn_v"), GgmlType::Bf16, vec![16, 32]),
        (l("attn_output"), GgmlType::Q4_0, vec![32, 32]),
        (l("ffn_norm"), GgmlType::F32, vec![32]),
        (l("ffn_gate"), GgmlType::Q5_0, vec![32, 32]),
        (l("ffn_up"), GgmlType::Q5_1, vec![32, 32]),
        (l("ffn_down"), GgmlType::Q8_0, vec![32, 32]),
        ("extra.q4_k".into(), GgmlType::Q4K, vec![2, 256]),
        ("extra.q5_k".into(), GgmlType::Q5K, vec![1, 256]),
        ("extra.q6_k".into(), GgmlType::Q6K, vec![1, 1, 256]),
    ];
    Desc { meta, tensors }
}

/// The file of `d` (tensors whose data cannot be made, e.g. a row that is not whole blocks, are
/// written with their original type and shape instead).
pub(crate) fn write_desc(d: &Desc, fallback: &Desc) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in &d.meta {
        let _ = w.add_metadata(k.clone(), v.clone());
    }
    for (i, (name, ty, shape)) in d.tensors.iter().enumerate() {
        let seed = i as u64;
        match tensor_data(*ty, shape, seed) {
            Some(data) => {
                let _ = w.add_tensor(name.clone(), *ty, shape, data);
            }
            None => {
                if let Some((_, fty, fshape)) = fallback.tensors.iter().find(|t| &t.0 == name) {
                    if let Some(data) = tensor_data(*fty, fshape, seed) {
                        let _ = w.add_tensor(name.clone(), *fty, fshape, data);
                    }
                }
            }
        }
    }
    w.to_bytes()
}

/// Keys a metadata edit targets besides the seed's own.
const GGUF_KEYS: [&str; 6] = [
    "llama.rope.scaling.type",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_eos_token",
    "general.alignment",
    "llama.vocab_size",
    "tokenizer.ggml.pre",
];

/// Values that break typed readers: other types, edge numbers, odd strings and arrays.
fn gguf_values() -> Vec<GgufValue> {
    let strs = |v: &[&str]| GgufValue::Array(GgufArray::String(v.iter().map(|s| s.to_string()).collect()));
    vec![
        GgufValue::U32(0),
        GgufValue::U32(1),
        GgufValue::U32(3),
        GgufValue::U32(7),
        GgufValue::U32(64),
        GgufValue::U32(u32::MAX),
        GgufValue::U64(u64::MAX),
        GgufValue::U64(1 << 40),
        GgufValue::I32(-1),
        GgufValue::I64(i64::MIN),
        GgufValue::U8(255),
        GgufValue::F32(f32::NAN),
        GgufValue::F32(-1.0),
        GgufValue::F32(0.0),
        GgufValue::F64(1e300),
        GgufValue::Bool(true),
        GgufValue::Bool(false),
        GgufValue::String(String::new()),
        GgufValue::String("llama".into()),
        GgufValue::String("gpt2".into()),
        GgufValue::String("llama-bpe".into()),
        GgufValue::String("qwen2".into()),
        GgufValue::String("yarn".into()),
        GgufValue::String("{{ raise_exception('x') }}".into()),
        strs(&[]),
        strs(&["a b"]),
        strs(&["", " ", "<|im_start|>", "a:b $A", "\u{0}"]),
        strs(&["a b c", "Ġ a"]),
        GgufValue::Array(GgufArray::I32(vec![-1, 3, 4, 5, 99])),
        GgufValue::Array(GgufArray::I32(vec![3; 70])),
        GgufValue::Array(GgufArray::U8(vec![0; 300])),
        GgufValue::Array(GgufArray::Array(vec![GgufArray::String(vec!["x".into()])])),
    ]
}

const SHAPES: [&[usize]; 10] =
    [&[32, 32], &[16, 32], &[32], &[70, 32], &[2, 256], &[1], &[0, 32], &[3, 5, 2, 32], &[32, 33], &[64, 32]];

#[derive(Clone, Debug)]
pub(crate) enum GgufEdit {
    /// Set (or add) a metadata key to an edge value.
    Meta {
        key: Index,
        value: Index,
    },
    Remove(Index),
    /// Give a tensor another type and/or shape (its data regenerated to fit).
    Tensor {
        tensor: Index,
        ty: Index,
        shape: Option<Index>,
    },
    /// Drop or rename a tensor.
    DropTensor(Index),
    RenameTensor {
        tensor: Index,
        to: Index,
    },
}

fn gguf_edit() -> impl Strategy<Value = GgufEdit> {
    prop_oneof![
        4 => (any::<Index>(), any::<Index>()).prop_map(|(key, value)| GgufEdit::Meta { key, value }),
        1 => any::<Index>().prop_map(GgufEdit::Remove),
        3 => (any::<Index>(), any::<Index>(), prop::option::weighted(0.5, any::<Index>()))
            .prop_map(|(tensor, ty, shape)| GgufEdit::Tensor { tensor, ty, shape }),
        1 => any::<Index>().prop_map(GgufEdit::DropTensor),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(tensor, to)| GgufEdit::RenameTensor { tensor, to }),
    ]
}

pub(crate) fn apply_edits(seed: &Desc, edits: &[GgufEdit]) -> Desc {
    let mut d = seed.clone();
    let values = gguf_values();
    for e in edits {
        match e {
            GgufEdit::Meta { key, value } => {
                let n = d.meta.len() + GGUF_KEYS.len();
                let k = key.index(n);
                let name = if k < d.meta.len() { d.meta[k].0.clone() } else { GGUF_KEYS[k - d.meta.len()].to_string() };
                let v = values[value.index(values.len())].clone();
                match d.meta.iter_mut().find(|(kk, _)| *kk == name) {
                    Some(slot) => slot.1 = v,
                    None => d.meta.push((name, v)),
                }
            }
            GgufEdit::Remove(i) if !d.meta.is_empty() => {
                d.meta.remove(i.index(d.meta.len()));
            }
            GgufEdit::Tensor { tensor, ty, shape } if !d.tensors.is_empty() => {
                let i = tensor.index(d.tensors.len());
                let t = &mut d.tensors[i];
                t.1 = GgmlType::ALL[ty.index(GgmlType::ALL.len())];
                if let Some(s) = shape {
                    t.2 = SHAPES[s.index(SHAPES.len())].to_vec();
                }
            }
            GgufEdit::DropTensor(i) if !d.tensors.is_empty() => {
                d.tensors.remove(i.index(d.tensors.len()));
            }
            GgufEdit::RenameTensor { tensor, to } if !d.tensors.is_empty() => {
                let names: Vec<String> = seed.tensors.iter().map(|t| t.0.clone()).collect();
                let n = d.tensors.len();
                let new = match to.index(names.len() + 3) {
                    i if i < names.len() => names[i].clone(),
                    i if i == names.len() => "blk.7.attn_q.weight".into(),
                    i if i == names.len() + 1 => "rope_freqs.weight".into(),
                    _ => "blk.00.attn_k.weight".into(),
                };
                d.tensors[tensor.index(n)].0 = new;
            }
            _ => {}
        }
    }
    d
}

/// Everything a loader does with a parsed file: typed getters, every tensor decoded, the
/// tokenizer built and used, the Llama mapping, every mapped tensor read and the text model loaded.
/// `path` is where the bytes are also written, for `VlmModel::from_gguf` (the model loader that keeps
/// quantized weights in their blocks).
pub(crate) fn exercise_gguf(bytes: Vec<u8>, path: &Path) -> Result<(), TestCaseError> {
    std::fs::write(path, &bytes).unwrap();
    let Some(f) = check("GgufFile::from_bytes", GgufFile::from_bytes(bytes, "fuzz.gguf"))? else { return Ok(()) };
    for (_, v) in f.metadata_entries() {
        let _ = (v.as_u32(), v.as_u64(), v.as_i64(), v.as_f64(), v.as_bool(), v.as_str(), v.as_str_array());
        let _ = (v.as_int_array(), v.describe());
    }
    for info in f.tensor_infos() {
        if let Some(values) = check("dequantize", f.dequantize(&info.name))? {
            prop_assert_eq!(values.len(), info.n_elements());
        }
    }
    if let Some(t) = check("tokenizer_from_gguf", tokenizer_from_gguf(&f))? {
        for text in ["Hello 123  456 <|im_start|>x<think>", "", "é💥\u{0} ab"] {
            if let Some(mut ids) = check("encode", t.tokenizer.encode(text, true))? {
                ids.extend([u32::MAX, 0]);
                check("decode", t.tokenizer.decode(&ids, true, None))?;
            }
        }
    }
    if let Some(g) = check("GgufLlama::from_file", GgufLlama::from_file(f, "model"))? {
        let cfg = g.config().text.clone();
        let store = WeightStore::from_gguf(g);
        read_store(&store)?;
        let names: Vec<String> = store.names().map(str::to_string).collect();
        for n in &names {
            if let Some(Some(rows)) = check("gguf_rows", store.gguf_rows(n))? {
                prop_assert_eq!(Some(rows.shape), store.shape(n));
            }
        }
        let ctx =
            LoadCtx { dtype: DType::F32, device: Device::Cpu, bf16_storage: false, bf16_compute: false, quant: None };
        check("TextModel::load", TextModel::load(&store, "model", &cfg, &ctx))?;
        check("VlmModel::from_gguf", VlmModel::from_gguf(path, DType::F32, &Device::Cpu))?;
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub(crate) struct GgufCase {
    edits: Vec<GgufEdit>,
    bytes: Option<Vec<ByteOp>>,
}

/// A small valid GGUF (every metadata type, tensors of every type, a Llama with a tokenizer)
/// edited consistently (metadata values, tensor types and shapes) and/or corrupted byte-wise.
#[test]
pub(crate) fn fuzz_gguf() {
    let seed = small_gguf_desc();
    let valid = write_desc(&seed, &seed);
    // The seed itself loads all the way.
    let f = GgufFile::from_bytes(valid.clone(), "seed.gguf").unwrap();
    tokenizer_from_gguf(&f).unwrap();
    let store = WeightStore::from_gguf(GgufLlama::from_file(f, "model").unwrap());
    let cfg = store.gguf().unwrap().config().text.clone();
    let ctx = LoadCtx { dtype: DType::F32, device: Device::Cpu, bf16_storage: false, bf16_compute: false, quant: None };
    TextModel::load(&store, "model", &cfg, &ctx).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("seed.gguf"), &valid).unwrap();
    VlmModel::from_gguf(&tmp.path().join("seed.gguf"), DType::F32, &Device::Cpu).unwrap();

    let head = GgufFile::from_bytes(valid, "seed.gguf").unwrap().data_offset();
    let strategy = (prop::collection::vec(gguf_edit(), 0..=3), prop::option::weighted(0.5, byte_ops(4)))
        .prop_map(|(edits, bytes)| GgufCase { edits, bytes });
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.gguf");
    fuzz("gguf", 12, strategy, |case| {
        let d = apply_edits(&seed, &case.edits);
        let mut bytes = write_desc(&d, &seed);
        if let Some(ops) = &case.bytes {
            // "head" byte positions fall in the metadata and tensor infos.
            bytes = mutate_bytes(bytes, ops, head);
        }
        exercise_gguf(bytes, &path)
    });
}
