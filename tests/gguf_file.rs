//! The GGUF reader: the real SmolLM2 file (when `SMOLLM2_GGUF` names it), files assembled byte by
//! byte here (independently of our writer), and every malformed-input case as a typed error.

use std::path::{Path, PathBuf};

use ferrovlm::checkpoint::{GgufArray, GgufFile, GgufValue, GgufWriter};
use ferrovlm::error::CheckpointError;
use ferrovlm::quant::ggml::GgmlType;

/// The real file, or `None` (with a note) when `SMOLLM2_GGUF` is unset or names no file.
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
// A byte-level builder (not our writer), so that malformed files can be made too.
// ---------------------------------------------------------------------------------------------

fn string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

/// A metadata entry: key, type id, value bytes.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = string(key);
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(value);
    b
}

/// A tensor info: name, ne (innermost first), type id, offset.
fn info(name: &str, ne: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut b = string(name);
    b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
    for d in ne {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b
}

/// magic, version, counts, entries, infos, padding to 32, data.
fn file(version: u32, kvs: &[Vec<u8>], infos: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(infos.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    kvs.iter().chain(infos).for_each(|x| b.extend_from_slice(x));
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend_from_slice(data);
    b
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One F32 [2, 3] tensor "w" (values 0..6) and one string entry.
fn small(version: u32) -> Vec<u8> {
    let data = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
    file(version, &[kv("general.architecture", 8, &string("llama"))], &[info("w", &[3, 2], 0, 0)], &data)
}

/// Exact f64 copies (every f32 is an f64), so that literals printed by numpy compare exactly.
fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, CheckpointError> {
    GgufFile::from_bytes(bytes, "test.gguf")
}

fn err(bytes: Vec<u8>) -> String {
    let e = parse(bytes).expect_err("the file must be refused");
    e.to_string()
}

// ---------------------------------------------------------------------------------------------
// Valid files
// ---------------------------------------------------------------------------------------------

#[test]
fn reads_versions_2_and_3() {
    for v in [2, 3] {
        let f = parse(small(v)).unwrap();
        assert_eq!(f.version(), v);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        let t = f.tensor("w").unwrap();
        assert_eq!((t.info.ty, t.info.shape(), t.info.dims.clone()), (GgmlType::F32, vec![2, 3], vec![3, 2]));
        assert_eq!(f.dequantize("w").unwrap(), vec![0., 1., 2., 3., 4., 5.]);
    }
}

#[test]
fn reads_every_metadata_type() {
    let arr = |ty: u32, n: u64, items: &[u8]| {
        let mut b = ty.to_le_bytes().to_vec();
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(items);
        b
    };
    let mut strings = string("a");
    strings.extend(string("é"));
    let mut nested = arr(5, 2, &[1, 0, 0, 0, 2, 0, 0, 0]);
    nested.extend(arr(8, 1, &string("x")));
    let kvs = [
        kv("u8", 0, &[200]),
        kv("i8", 1, &[0xff]),
        kv("u16", 2, &60000u16.to_le_bytes()),
        kv("i16", 3, &(-3i16).to_le_bytes()),
        kv("u32", 4, &7u32.to_le_bytes()),
        kv("i32", 5, &(-7i32).to_le_bytes()),
        kv("f32", 6, &1.5f32.to_le_bytes()),
        kv("bool", 7, &[1]),
        kv("str", 8, &string("hello")),
        kv("u64", 10, &u64::MAX.to_le_bytes()),
        kv("i64", 11, &i64::MIN.to_le_bytes()),
        kv("f64", 12, &0.1f64.to_le_bytes()),
        kv("strs", 9, &arr(8, 2, &strings)),
        kv("nested", 9, &arr(9, 2, &nested)),
        kv("empty", 9, &arr(6, 0, &[])),
    ];
    let f = parse(file(3, &kvs, &[], &[])).unwrap();
    let m = |k: &str| f.metadata(k).unwrap().clone();
    assert_eq!(m("u8"), GgufValue::U8(200));
    assert_eq!(m("i8"), GgufValue::I8(-1));
    assert_eq!(m("u16"), GgufValue::U16(60000));
    assert_eq!(m("i16"), GgufValue::I16(-3));
    assert_eq!(m("u32"), GgufValue::U32(7));
    assert_eq!(m("i32"), GgufValue::I32(-7));
    assert_eq!(m("f32"), GgufValue::F32(1.5));
    assert_eq!(m("bool"), GgufValue::Bool(true));
    assert_eq!(m("str"), GgufValue::String("hello".into()));
    assert_eq!(m("u64"), GgufValue::U64(u64::MAX));
    assert_eq!(m("i64"), GgufValue::I64(i64::MIN));
    assert_eq!(m("f64"), GgufValue::F64(0.1));
    assert_eq!(m("strs"), GgufValue::Array(GgufArray::String(vec!["a".into(), "é".into()])));
    assert_eq!(
        m("nested"),
        GgufValue::Array(GgufArray::Array(vec![GgufArray::I32(vec![1, 2]), GgufArray::String(vec!["x".into()])]))
    );
    assert_eq!(m("empty"), GgufValue::Array(GgufArray::F32(vec![])));
    let keys: Vec<&str> = f.metadata_entries().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys[..3], ["u8", "i8", "u16"]); // file order
    assert_eq!(f.get_usize("u32").unwrap(), 7);
    assert_eq!(f.get_f64("f32").unwrap(), 1.5);
}

#[test]
fn honours_general_alignment() {
    let kvs = [kv("general.alignment", 4, &64u32.to_le_bytes())];
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&kvs[0]);
    b.extend(info("a", &[1], 0, 0));
    b.extend(info("b", &[2], 0, 64));
    b.resize(b.len().div_ceil(64) * 64, 0);
    let start = b.len();
    b.extend(f32_bytes(&[9.0]));
    b.resize(start + 64, 0);
    b.extend(f32_bytes(&[1.0, 2.0]));
    let f = parse(b).unwrap();
    assert_eq!((f.alignment(), f.data_offset()), (64, start));
    assert_eq!(f.dequantize("b").unwrap(), vec![1.0, 2.0]);
}

#[test]
fn real_file_header_and_tensors() {
    let Some(path) = smollm2() else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!((f.version(), f.alignment()), (3, 32));
    assert_eq!(f.metadata_entries().len(), 33); // gguf-py also lists GGUF.version and the two counts
    assert_eq!(f.tensor_infos().len(), 272);
    // gguf-py: data_offset 1785664, where token_embd.weight (offset 0) starts.
    assert_eq!(f.data_offset(), 1785664);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_usize("llama.embedding_length").unwrap(), 576);
    let tokens = f.get("tokenizer.ggml.tokens", GgufValue::as_str_array).unwrap();
    assert_eq!((tokens.len(), tokens[1].as_str()), (49152, "<|im_start|>"));
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!((emb.info.ty, emb.info.shape()), (GgmlType::Q8_0, vec![49152, 576]));
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.info.ty, q.info.shape(), q.data.len()), (GgmlType::Q4_1, vec![576, 576], 576 * 18 * 20));
    // Values from gguf-py: dequantize(t.data, t.tensor_type) of blk.0.attn_q.weight (stored, i.e.
    // still permuted), row 5, and the f64 sum of the whole tensor; token_embd row 1234.
    let w = f.dequantize("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        f64s(&w[5 * 576..5 * 576 + 6]),
        [0.076171875, -0.274658203125, -0.040771484375, 0.894775390625, -0.859375, 0.427001953125]
    );
    let sum: f64 = w.iter().map(|&x| x as f64).sum();
    assert!((sum - 59.22322082519531).abs() < 1e-6, "{sum}");
    let e = f.dequantize("token_embd.weight").unwrap();
    assert_eq!(
        f64s(&e[1234 * 576..1234 * 576 + 4]),
        [-0.0171661376953125, -0.0858306884765625, -0.0457763671875, 0.011444091796875]
    );
    assert_eq!(f64s(&f.dequantize("output_norm.weight").unwrap()[..4]), [1.7578125, 1.8203125, 1.78125, 1.6015625]);
}

// ---------------------------------------------------------------------------------------------
// Malformed files: typed errors that say what is wrong
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_files_are_refused_at_every_length() {
    let full = small(3);
    for n in 0..full.len() {
        let e = parse(full[..n].to_vec()).expect_err("truncated");
        assert!(matches!(e, CheckpointError::Gguf { .. }), "{n}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("test.gguf") && (msg.contains("truncated") || msg.contains("past the end")), "{msg}");
    }
}

#[test]
fn bad_magic() {
    let mut b = small(3);
    b[..4].copy_from_slice(b"GGML");
    assert!(err(b).contains("bad magic"));
}

#[test]
fn version_1_and_others_are_unsupported() {
    for (v, what) in [(1u32, "version 1 "), (4, "version 4 "), (0x0300_0000, "big-endian")] {
        let e = parse(small(v)).unwrap_err();
        assert!(matches!(e, CheckpointError::GgufUnsupported { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
}

#[test]
fn unsupported_tensor_type_names_the_tensor_and_id() {
    let b = file(3, &[], &[info("blk.0.attn_q.weight", &[32], 10, 0)], &[0; 64]); // 10 = Q2_K
    let e = parse(b).unwrap_err();
    assert!(matches!(e, CheckpointError::GgufUnsupported { .. }));
    let msg = e.to_string();
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("type id 10"), "{msg}");
}

#[test]
fn tensor_data_past_the_end() {
    let b = file(3, &[], &[info("w", &[3, 2], 0, 0)], &f32_bytes(&[0.0; 5]));
    let msg = err(b);
    assert!(msg.contains("'w'") && msg.contains("past the end"), "{msg}");
    let b = file(3, &[], &[info("w", &[1], 0, u64::MAX - 31)], &f32_bytes(&[0.0]));
    assert!(err(b).contains("'w'"));
}

#[test]
fn bad_tensor_infos() {
    let data = vec![0u8; 4096];
    let cases: [(Vec<u8>, &str); 6] = [
        (info("w", &[1, 1, 1, 1, 1], 0, 0), "5 dimensions"),
        (info("w", &[33], 8, 0), "not a multiple of the Q8_0 block size 32"),
        (info("w", &[1 << 62, 1 << 62], 0, 0), "overflow"),
        (info("w", &[u64::MAX], 0, 0), "too large"),
        (info("w", &[1], 0, 4), "not a multiple of the alignment"),
        (info("w", &[1 << 40], 0, 0), "past the end"),
    ];
    for (i, want) in cases {
        let msg = err(file(3, &[], &[i], &data));
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let dup = file(3, &[], &[info("w", &[1], 0, 0), info("w", &[1], 0, 32)], &data);
    assert!(err(dup).contains("'w' appears twice"));
}

#[test]
fn bad_metadata() {
    let dup = file(3, &[kv("k", 4, &[0; 4]), kv("k", 4, &[0; 4])], &[], &[]);
    assert!(err(dup).contains("'k' appears twice"));
    let unknown = file(3, &[kv("k", 13, &[0; 4])], &[], &[]);
    assert!(err(unknown).contains("unknown value type id 13"));
    let bad_bool = file(3, &[kv("k", 7, &[2])], &[], &[]);
    assert!(err(bad_bool).contains("neither 0 nor 1"));
    let mut long = string("k");
    long.extend_from_slice(&8u32.to_le_bytes());
    long.extend_from_slice(&(1u64 << 40).to_le_bytes());
    long.extend_from_slice(b"abc");
    let msg = err(file(3, &[long], &[], &[]));
    assert!(msg.contains("string length 1099511627776") && msg.contains("past the end"), "{msg}");
    let bad_utf8 = file(3, &[kv("k", 8, &[1, 0, 0, 0, 0, 0, 0, 0, 0xff])], &[], &[]);
    assert!(err(bad_utf8).contains("UTF-8"));
    for (align, want) in [
        (kv("general.alignment", 4, &48u32.to_le_bytes()), "power of two"),
        (kv("general.alignment", 10, &[32, 0, 0, 0, 0, 0, 0, 0]), "expected UINT32"),
    ] {
        let msg = err(file(3, &[align], &[], &[]));
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn huge_counts_do_not_allocate() {
    // Counts claim far more entries than the file can hold: refused before any allocation.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    assert!(err(b.clone()).contains("tensor infos cannot fit"));
    b[8..16].copy_from_slice(&0u64.to_le_bytes());
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(err(b).contains("metadata entries cannot fit"));
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 61).to_le_bytes());
    let msg = err(file(3, &[kv("k", 9, &arr)], &[], &[]));
    assert!(msg.contains("elements of type UINT32 in metadata 'k' cannot fit"), "{msg}");
    // Arrays nested deeper than we read.
    let mut deep = Vec::new();
    for _ in 0..20 {
        deep.extend_from_slice(&9u32.to_le_bytes());
        deep.extend_from_slice(&1u64.to_le_bytes());
    }
    deep.extend_from_slice(&0u32.to_le_bytes());
    deep.extend_from_slice(&0u64.to_le_bytes());
    assert!(err(file(3, &[kv("k", 9, &deep)], &[], &[])).contains("nested"));
}

#[test]
fn typed_getters_name_key_and_types() {
    let f = parse(small(3)).unwrap();
    let e = f.get_usize("general.architecture").unwrap_err();
    assert!(matches!(e, CheckpointError::GgufMetadata { .. }));
    assert_eq!(
        e.to_string(),
        "test.gguf: GGUF metadata 'general.architecture': expected a non-negative integer, found STRING"
    );
    let e = f.get_str("llama.block_count").unwrap_err().to_string();
    assert!(e.contains("'llama.block_count'") && e.contains("absent"), "{e}");
    assert!(matches!(f.tensor("nope"), Err(CheckpointError::MissingTensor { .. })));
}

#[test]
fn open_reports_missing_files() {
    let e = GgufFile::open(Path::new("/nonexistent/x.gguf")).unwrap_err();
    assert!(matches!(e, CheckpointError::NotFound { .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The writer, read back
// ---------------------------------------------------------------------------------------------

/// Deterministic bytes (a tiny LCG), for tensor data whose values do not matter.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

fn all_values() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("u8", GgufValue::U8(255)),
        ("i8", GgufValue::I8(-128)),
        ("u16", GgufValue::U16(65535)),
        ("i16", GgufValue::I16(-32768)),
        ("u32", GgufValue::U32(u32::MAX)),
        ("i32", GgufValue::I32(i32::MIN)),
        ("f32", GgufValue::F32(-0.25)),
        ("bool", GgufValue::Bool(false)),
        ("string", GgufValue::String("héllo\nwörld <|im_start|>".into())),
        ("u64", GgufValue::U64(u64::MAX)),
        ("i64", GgufValue::I64(i64::MIN)),
        ("f64", GgufValue::F64(std::f64::consts::PI)),
        ("a.u8", GgufValue::Array(GgufArray::U8(vec![1, 2, 3]))),
        ("a.i8", GgufValue::Array(GgufArray::I8(vec![-1]))),
        ("a.u16", GgufValue::Array(GgufArray::U16(vec![7, 8]))),
        ("a.i16", GgufValue::Array(GgufArray::I16(vec![-7]))),
        ("a.u32", GgufValue::Array(GgufArray::U32(vec![1, 2]))),
        ("a.i32", GgufValue::Array(GgufArray::I32(vec![1, 3, 4]))),
        ("a.f32", GgufValue::Array(GgufArray::F32(vec![0.5, -1.0]))),
        ("a.bool", GgufValue::Array(GgufArray::Bool(vec![true, false]))),
        ("a.string", GgufValue::Array(GgufArray::String(vec!["Ġt".into(), String::new(), "日本".into()]))),
        ("a.u64", GgufValue::Array(GgufArray::U64(vec![u64::MAX]))),
        ("a.i64", GgufValue::Array(GgufArray::I64(vec![-5, 5]))),
        ("a.f64", GgufValue::Array(GgufArray::F64(vec![1e300]))),
        ("a.empty", GgufValue::Array(GgufArray::String(vec![]))),
        (
            "a.nested",
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::I32(vec![1, 2]),
                GgufArray::Array(vec![GgufArray::String(vec!["deep".into()])]),
                GgufArray::F32(vec![]),
            ])),
        ),
    ]
}

/// (name, type, shape outermost first) of the tensors the round trip writes.
const TENSORS: [(&str, GgmlType, &[usize]); 7] = [
    ("f32", GgmlType::F32, &[3, 5]),
    ("f16", GgmlType::F16, &[7]),
    ("bf16", GgmlType::Bf16, &[2, 1, 3]),
    ("q8_0", GgmlType::Q8_0, &[4, 64]),
    ("q4_1", GgmlType::Q4_1, &[3, 32]),
    ("q4_k", GgmlType::Q4K, &[2, 256]),
    ("q6_k", GgmlType::Q6K, &[1, 1, 1, 256]),
];

fn tensor_bytes(ty: GgmlType, shape: &[usize], seed: u64) -> Vec<u8> {
    let row = *shape.last().unwrap();
    let rows: usize = shape[..shape.len() - 1].iter().product();
    noise(ty.row_bytes(row).unwrap() * rows, seed)
}

#[test]
fn writer_round_trips_every_type() {
    let mut w = GgufWriter::new();
    for (k, v) in all_values() {
        w.add_metadata(k, v).unwrap();
    }
    for (i, (name, ty, shape)) in TENSORS.iter().enumerate() {
        w.add_tensor(*name, *ty, shape, tensor_bytes(*ty, shape, i as u64)).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("out.gguf");
    w.write_to_path(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), w.to_bytes());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!((f.version(), f.alignment()), (3, 32));
    assert_eq!(f.data_offset() % 32, 0);
    let got: Vec<(&str, &GgufValue)> = f.metadata_entries().iter().map(|(k, v)| (k.as_str(), v)).collect();
    let want = all_values();
    assert_eq!(got, want.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>());
    for (i, (name, ty, shape)) in TENSORS.iter().enumerate() {
        let t = f.tensor(name).unwrap();
        assert_eq!((t.info.ty, t.info.shape()), (*ty, shape.to_vec()), "{name}");
        assert_eq!(t.data, tensor_bytes(*ty, shape, i as u64), "{name}");
        assert_eq!(t.info.offset % 32, 0);
    }
    let names: Vec<&str> = f.tensor_infos().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, TENSORS.iter().map(|t| t.0).collect::<Vec<_>>());
}

#[test]
fn writer_matches_the_byte_layout() {
    // The independent byte builder above and the writer produce the same file.
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into())).unwrap();
    w.add_tensor("w", GgmlType::F32, &[2, 3], f32_bytes(&[0., 1., 2., 3., 4., 5.])).unwrap();
    let mut want = small(3);
    want.resize(want.len().div_ceil(32) * 32, 0); // the writer pads the last tensor too, as gguf-py does
    assert_eq!(w.to_bytes(), want);
}

#[test]
fn writer_with_alignment_64() {
    let mut w = GgufWriter::new().with_alignment(64).unwrap();
    w.add_tensor("a", GgmlType::F32, &[1], f32_bytes(&[1.0])).unwrap();
    w.add_tensor("b", GgmlType::F16, &[3], noise(6, 1)).unwrap();
    let f = parse(w.to_bytes()).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.metadata("general.alignment"), Some(&GgufValue::U32(64)));
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert!(GgufWriter::new().with_alignment(48).is_err());
}

#[test]
fn writer_refuses_inconsistent_tensors() {
    let mut w = GgufWriter::new();
    let e = w.add_tensor("x", GgmlType::Q8_0, &[2, 33], vec![0; 68]).unwrap_err().to_string();
    assert!(e.contains("'x'") && e.contains("block size 32"), "{e}");
    let e = w.add_tensor("x", GgmlType::Q8_0, &[2, 32], vec![0; 67]).unwrap_err().to_string();
    assert!(e.contains("takes 68 bytes, 67 given"), "{e}");
    let e = w.add_tensor("x", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4]).unwrap_err().to_string();
    assert!(e.contains("5 dimensions"), "{e}");
    w.add_tensor("x", GgmlType::F32, &[1], vec![0; 4]).unwrap();
    assert!(w.add_tensor("x", GgmlType::F32, &[1], vec![0; 4]).is_err());
    w.add_metadata("k", GgufValue::Bool(true)).unwrap();
    assert!(w.add_metadata("k", GgufValue::Bool(true)).is_err());
}

#[test]
fn real_file_rewritten_byte_for_byte() {
    // Everything read from llama.cpp's file, written again by our writer: the same bytes.
    let Some(path) = smollm2() else { return };
    let f = GgufFile::open(&path).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata_entries() {
        w.add_metadata(k.clone(), v.clone()).unwrap();
    }
    for t in f.tensor_infos() {
        w.add_tensor(t.name.clone(), t.ty, &t.shape(), f.data(t).to_vec()).unwrap();
    }
    let ours = w.to_bytes();
    let theirs = std::fs::read(&path).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "first difference at byte {:?}", ours.iter().zip(&theirs).position(|(a, b)| a != b));
}
