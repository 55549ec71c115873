//! The tokenizer rebuilt from GGUF metadata: SmolLM2's file against the hub-layout SmolVLM
//! tokenizer.json (built from the same vocabulary with SmolLM2's pre-tokenizer) and against
//! transformers' GGUF tokenizer; small files written here for each rule and each error.

use std::path::{Path, PathBuf};

use ferrovlm::checkpoint::{GgufArray, GgufFile, GgufValue, GgufWriter};
use ferrovlm::data::tokenizer::Tokenizer;
use ferrovlm::data::tokenizer_gguf::{byte_alphabet, tokenizer_from_gguf, GgufTokenizer};
use ferrovlm::Error;

fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("SMOLLM2_GGUF").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            eprintln!("note: skipped: SMOLLM2_GGUF is {other:?}, not the path of SmolLM2-135M-Instruct.Q4_1.gguf");
            None
        }
    }
}

fn hub_tokenizer() -> tokenizers::Tokenizer {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/smolvlm/tokenizer.json");
    tokenizers::Tokenizer::from_file(p).unwrap()
}

/// Texts and transformers' GGUF ids for them (transformers 5.24 in refenv:
/// `AutoTokenizer.from_pretrained(dir, gguf_file=...)(text)["input_ids"]`). `None`: transformers
/// differs from the hub tokenizer there (see `transformers_differs_before_digits`).
const TEXTS: [(&str, Option<&[u32]>); 18] = [
    ("Hello world", Some(&[19556, 905])),
    (" Hello world", Some(&[38699, 905])),
    ("12345 apples and 3.14159", Some(&[33, 34, 35, 36, 37, 13855, 284, 216, 35, 30, 33, 36, 33, 37, 41])),
    ("a  1", None),
    ("x   42 y", None),
    (
        "héllo 🌍 日本語 naïve café",
        Some(&[88, 2756, 31394, 15107, 230, 231, 17097, 241, 115, 40993, 179, 120, 248, 15486, 46494, 37366]),
    ),
    (
        "  two  spaces\t\ttabs\n\n\nnewlines\r\n",
        Some(&[216, 827, 216, 5600, 197, 197, 100, 7366, 1116, 198, 2241, 5110, 2738]),
    ),
    (
        "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
        Some(&[1, 4093, 198, 26843, 665, 17, 2, 198, 1, 520, 9531, 198]),
    ),
    ("<|endoftext|><repo_name>x<file_sep>", Some(&[0, 3, 104, 5])),
    (
        "Don't you think it's 'quoted'? YOU'LL see",
        Some(&[8084, 982, 346, 1510, 357, 506, 637, 385, 5036, 46859, 12246, 23, 16421, 963]),
    ),
    (
        "def f(x):\n    return x**2  # comment\n",
        Some(&[1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5189, 198]),
    ),
    ("", Some(&[])),
    (" ", Some(&[216])),
    ("2024-01-01T12:00:00Z", Some(&[34, 32, 34, 36, 29, 32, 33, 29, 32, 33, 68, 33, 34, 42, 32, 32, 42, 32, 32, 74])),
    ("<|im_start <|im_end|x", Some(&[44, 108, 306, 79, 3738, 2067, 108, 306, 79, 486, 108, 104])),
    (
        "Ωmega ∑ ∞ 👨\u{200d}👩\u{200d}👧",
        Some(&[
            153, 119, 93, 9005, 19995, 235, 19995, 248, 15107, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813,
            235, 117,
        ]),
    ),
    ("   \n  7", None),
    ("price:  $1,000  or  2", None),
];

#[test]
fn smollm2_tokenizer_equals_the_hub_tokenizer() {
    let Some(path) = smollm2() else { return };
    let g = Tokenizer::from_gguf(&path).unwrap();
    let hub = hub_tokenizer();
    for (text, tf) in TEXTS {
        let ours = g.tokenizer.encode(text, true).unwrap();
        let want = hub.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ours, want, "{text:?}");
        if let Some(tf) = tf {
            assert_eq!(ours, tf, "{text:?}: transformers' GGUF tokenizer");
        }
        assert_eq!(g.tokenizer.decode(&ours, false, None).unwrap(), text);
    }
    // The same pipeline and vocabulary: model (vocab + merges), pre-tokenizer, decoder, normalizer
    // serialize identically; SmolLM2's 17 control tokens are the hub's first 17 added tokens.
    let ser = |t: &tokenizers::Tokenizer| -> serde_json::Value {
        serde_json::from_str(&t.to_string(false).unwrap()).unwrap()
    };
    let (ours, hub) = (ser(g.tokenizer.inner()), ser(&hub));
    for part in ["model", "pre_tokenizer", "decoder", "normalizer"] {
        assert!(ours[part] == hub[part], "{part} differs");
    }
    let added = ours["added_tokens"].as_array().unwrap();
    assert_eq!(added.len(), 17);
    assert_eq!(added[..], hub["added_tokens"].as_array().unwrap()[..17]);
}

#[test]
fn smollm2_special_tokens_and_template() {
    let Some(path) = smollm2() else { return };
    let g = Tokenizer::from_gguf(&path).unwrap();
    let t = &g.tokenizer;
    let named: Vec<(&str, &str)> = t.config().named_special.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        named,
        [
            ("bos_token", "<|im_start|>"),
            ("eos_token", "<|im_end|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|im_end|>")
        ]
    );
    assert!(!g.add_bos_token && !g.add_eos_token);
    assert_eq!(t.inner().get_vocab_size(true), 49152);
    assert_eq!(t.decode(&[1, 4093, 198, 2], true, None).unwrap(), "user\n"); // control tokens are special
    let tpl = g.chat_template.as_deref().unwrap();
    assert!(tpl.starts_with("{% for message in messages %}") && tpl.contains("'<|im_start|>assistant\n'"));
    assert!(tpl.contains("You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
}

#[test]
fn transformers_differs_before_digits() {
    // transformers maps tokenizer.ggml.pre "smollm" to GPT-2's plain ByteLevel, so a run of spaces
    // before a digit splits differently from SmolLM2's hub tokenizer (Digits first) and llama.cpp.
    // transformers' ids, then ours (= the hub tokenizer.json's).
    let Some(path) = smollm2() else { return };
    let g = Tokenizer::from_gguf(&path).unwrap();
    let cases: [(&str, &[u32], &[u32]); 4] = [
        ("a  1", &[81, 216, 216, 33], &[81, 256, 33]),
        ("x   42 y", &[104, 256, 216, 36, 34, 329], &[104, 333, 36, 34, 329]),
        ("   \n  7", &[333, 3805, 216, 39], &[333, 11181, 39]),
        (
            "price:  $1,000  or  2",
            &[17517, 42, 216, 1885, 33, 28, 32, 32, 32, 216, 355, 216, 216, 34],
            &[17517, 42, 216, 1885, 33, 28, 32, 32, 32, 216, 355, 256, 34],
        ),
    ];
    for (text, transformers, ours) in cases {
        let got = g.tokenizer.encode(text, false).unwrap();
        assert_eq!(got, ours, "{text:?}");
        assert_ne!(got, transformers);
    }
}

// ---------------------------------------------------------------------------------------------
// Small vocabularies written here
// ---------------------------------------------------------------------------------------------

/// Tokens: `<s>` `</s>` (control), the 256 byte characters, "Ġa", "ab", "<think>" (user defined),
/// " odd" (control but spelled with a space: skipped), "12", "123"; merges "Ġ a", "a b", "1 2", "12 3".
fn tiny(edit: impl FnOnce(&mut Vec<(String, GgufValue)>)) -> GgufFile {
    let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![3, 3];
    for c in byte_alphabet() {
        tokens.push(c.to_string());
        types.push(1);
    }
    for (t, ty) in [("Ġa", 1), ("ab", 1), ("<think>", 4), (" odd", 3), ("12", 1), ("123", 1)] {
        tokens.push(t.into());
        types.push(ty);
    }
    let merges: Vec<String> = ["Ġ a", "a b", "1 2", "12 3"].iter().map(|s| s.to_string()).collect();
    let s = |x: &str| GgufValue::String(x.into());
    let mut meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(GgufArray::String(tokens))),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(GgufArray::I32(types))),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(GgufArray::String(merges))),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.chat_template".into(), s("{{ messages }}")),
    ];
    edit(&mut meta);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k, v).unwrap();
    }
    GgufFile::from_bytes(w.to_bytes(), "tok.gguf").unwrap()
}

fn set(meta: &mut Vec<(String, GgufValue)>, key: &str, v: GgufValue) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.into(), v));
}

fn build(edit: impl FnOnce(&mut Vec<(String, GgufValue)>)) -> Result<GgufTokenizer, Error> {
    tokenizer_from_gguf(&tiny(edit))
}

fn id(g: &GgufTokenizer, t: &str) -> u32 {
    g.tokenizer.inner().token_to_id(t).unwrap()
}

#[test]
fn builds_bpe_with_added_tokens() {
    let g = build(|_| {}).unwrap();
    let t = &g.tokenizer;
    // 2 + 256 + 6 tokens; " odd" is re-spelled "Ġodd" in the vocabulary and not added.
    assert_eq!(t.inner().get_vocab_size(true), 264);
    assert_eq!(id(&g, "Ġodd"), 261);
    let ids = t.encode("<s> a ab<think>x</s>", false).unwrap();
    // " ab": "Ġ a" is the best merge, so "Ġa" + "b".
    assert_eq!(ids, [0, id(&g, "Ġa"), id(&g, "Ġa"), id(&g, "b"), 260, id(&g, "x"), 1]);
    assert_eq!(t.encode("ab", false).unwrap(), [259]);
    // Control tokens are special (skipped when decoding with skip_special_tokens); <think> is not.
    assert_eq!(t.decode(&ids, true, None).unwrap(), " a ab<think>x");
    let specs: Vec<(u32, &str, bool)> =
        t.config().added_tokens_decoder.iter().map(|s| (s.id, s.content.as_str(), s.special)).collect();
    assert_eq!(specs, [(0, "<s>", true), (1, "</s>", true), (260, "<think>", false)]);
    assert_eq!(g.chat_template.as_deref(), Some("{{ messages }}"));
    // "smollm": digits one by one, never merged.
    assert_eq!(t.encode("123", false).unwrap(), [id(&g, "1"), id(&g, "2"), id(&g, "3")]);
}

#[test]
fn pre_tokenizer_follows_tokenizer_ggml_pre() {
    let digits = |pre: Option<&str>| {
        let g = build(|m| match pre {
            Some(p) => set(m, "tokenizer.ggml.pre", GgufValue::String(p.into())),
            None => m.retain(|(k, _)| k != "tokenizer.ggml.pre"),
        })
        .unwrap();
        let ids = g.tokenizer.encode("123", false).unwrap();
        ids.iter().map(|&i| g.tokenizer.inner().id_to_token(i).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(digits(Some("smollm")), ["1", "2", "3"]);
    assert_eq!(digits(None), ["123"]); // GPT-2's regex keeps digit runs together
    assert_eq!(digits(Some("gpt2")), ["123"]);
    assert_eq!(digits(Some("llama-bpe")), ["123"]); // \p{N}{1,3}
    assert_eq!(digits(Some("qwen2")), ["1", "2", "3"]); // \p{N}
    let e = build(|m| set(m, "tokenizer.ggml.pre", GgufValue::String("chatglm-bpe".into()))).unwrap_err();
    assert!(e.to_string().contains("pre-tokenizer 'chatglm-bpe'"), "{e}");
}

#[test]
fn add_bos_token_adds_bos() {
    let g = build(|m| set(m, "tokenizer.ggml.add_bos_token", GgufValue::Bool(true))).unwrap();
    assert!(g.add_bos_token);
    assert_eq!(g.tokenizer.encode("ab", true).unwrap(), [0, id(&g, "ab")]);
    assert_eq!(g.tokenizer.encode("ab", false).unwrap(), [id(&g, "ab")]);
    // Any token text works as BOS/EOS, even one with a space (" odd", id 261).
    let g = build(|m| {
        set(m, "tokenizer.ggml.add_bos_token", GgufValue::Bool(true));
        set(m, "tokenizer.ggml.add_eos_token", GgufValue::Bool(true));
        set(m, "tokenizer.ggml.bos_token_id", GgufValue::U32(261));
    })
    .unwrap();
    assert_eq!(g.tokenizer.encode("ab", true).unwrap(), [261, id(&g, "ab"), 1]);
}

#[test]
fn bad_tokenizer_metadata_is_a_typed_error() {
    type Edit = fn(&mut Vec<(String, GgufValue)>);
    let cases: [(Edit, &str); 8] = [
        (|m| set(m, "tokenizer.ggml.model", GgufValue::String("llama".into())), "tokenizer model 'llama'"),
        (|m| m.retain(|(k, _)| k != "tokenizer.ggml.model"), "'tokenizer.ggml.model'"),
        (|m| set(m, "tokenizer.ggml.tokens", GgufValue::U32(3)), "'tokenizer.ggml.tokens': expected ARRAY of STRING"),
        (|m| set(m, "tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(vec![1]))), "one type per token"),
        (
            |m| set(m, "tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(vec!["a b c".into()]))),
            "'tokenizer.ggml.merges[0]'",
        ),
        (
            |m| set(m, "tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(vec!["a zz".into()]))),
            "cannot build the BPE model",
        ),
        (
            |m| set(m, "tokenizer.ggml.bos_token_id", GgufValue::U32(100000)),
            "'tokenizer.ggml.bos_token_id': expected a token id below 264",
        ),
        (|m| set(m, "tokenizer.ggml.add_bos_token", GgufValue::U8(1)), "'tokenizer.ggml.add_bos_token': expected BOOL"),
    ];
    for (edit, want) in cases {
        let e = build(edit).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("tok.gguf"), "{want}: {e}");
    }
}

#[test]
fn odd_control_tokens_do_not_break_the_build() {
    // Empty, whitespace-only and duplicate tokens, all marked control: built, and usable.
    let tokens = ["", " ", "a", "a", "<s>", "\u{0}"].map(|s| s.to_string()).to_vec();
    let g = build(|m| {
        set(m, "tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens)));
        set(m, "tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(vec![3; 6])));
        set(m, "tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(vec![])));
    })
    .unwrap();
    let ids = g.tokenizer.encode("a <s> b", true).unwrap();
    g.tokenizer.decode(&ids, false, None).unwrap();
}
