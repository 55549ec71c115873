//! Target: tokenizer files.

use super::*;

// ---------------------------------------------------------------------------------------------
// Tokenizer files
// ---------------------------------------------------------------------------------------------

/// The fixture's tokenizer.json cut to its first 400 ids (and the merges among them): the same
/// pipeline, small enough to parse on every case.
pub(crate) fn small_tokenizer_json() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| {
        let mut v: Value = serde_json::from_slice(&read(fixtures().join("tokenizer/smolvlm/tokenizer.json"))).unwrap();
        let model = v.get_mut("model").unwrap();
        let vocab: serde_json::Map<String, Value> = model["vocab"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, id)| id.as_u64().unwrap() < 400)
            .map(|(k, id)| (k.clone(), id.clone()))
            .collect();
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                let (a, b) = match m {
                    Value::String(s) => match s.split_once(' ') {
                        Some((a, b)) => (a.to_string(), b.to_string()),
                        None => return false,
                    },
                    Value::Array(p) => (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()),
                    _ => return false,
                };
                vocab.contains_key(&a) && vocab.contains_key(&b) && vocab.contains_key(&format!("{a}{b}"))
            })
            .cloned()
            .collect();
        model["vocab"] = Value::Object(vocab);
        model["merges"] = Value::Array(merges);
        v
    })
}

pub(crate) const TOKENIZER_KEYS: [&str; 20] = [
    "added_tokens_decoder",
    "added_tokens",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "additional_special_tokens",
    "extra_special_tokens",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "clean_up_tokenization_spaces",
    "split_special_tokens",
    "add_prefix_space",
    "tokenizer_class",
    "chat_template",
    "content",
    "special",
    "id",
    "auto_map",
];

pub(crate) fn tokenizer_extra() -> Vec<Value> {
    vec![
        json!("<image>"),
        json!("<|endoftext|>"),
        json!("left"),
        json!("right"),
        json!("GPT2Tokenizer"),
        json!("PreTrainedTokenizerFast"),
        json!({"content": "<x>", "special": true}),
        json!({"content": "", "lstrip": true, "rstrip": true, "single_word": true, "normalized": true, "special": false}),
        json!({"__type": "AddedToken", "content": "<image>", "special": true}),
        json!({"4294967295": {"content": "<big>", "special": true}}),
        json!({"-1": {"content": "<neg>", "special": true}}),
        json!([{"name": "default", "template": "{{ messages }}"}]),
        json!("{% for m in messages %}{{ m.role }}{% endfor %}"),
        json!({"type": "BPE", "vocab": {}, "merges": []}),
        json!({"type": "WordPiece", "vocab": {"a": 0}}),
        json!({"type": "Sequence", "pretokenizers": []}),
    ]
}

#[derive(Clone, Debug)]
pub(crate) enum TokFile {
    /// 0 tokenizer.json, 1 tokenizer_config.json, 2 special_tokens_map.json, 3 config.json.
    Json(usize, JsonMut),
    Bytes(usize, Vec<ByteOp>),
    Missing(usize),
}

/// tokenizer.json, tokenizer_config.json, special_tokens_map.json (and config.json's model_type):
/// one or two of them corrupted; a loaded tokenizer then encodes, decodes and renders its template.
#[test]
pub(crate) fn fuzz_tokenizer_files() {
    let dir = fixtures().join("tokenizer/smolvlm");
    let seeds: Vec<Value> = vec![
        small_tokenizer_json().clone(),
        serde_json::from_slice(&read(dir.join("tokenizer_config.json"))).unwrap(),
        serde_json::from_slice(&read(dir.join("special_tokens_map.json"))).unwrap(),
        json!({"model_type": "idefics3"}),
    ];
    let file_names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"];
    let tmp = tempfile::tempdir().unwrap();
    let extra = tokenizer_extra();
    let tok_file = prop_oneof![
        6 => (0usize..4, json_mut()).prop_map(|(f, m)| TokFile::Json(f, m)),
        1 => (0usize..4, byte_ops(3)).prop_map(|(f, m)| TokFile::Bytes(f, m)),
        1 => (0usize..4).prop_map(TokFile::Missing),
    ];
    let texts = prop::sample::select(vec![
        "Hello <image> world 123  456\n\tend",
        "",
        "<|endoftext|><|endoftext|>",
        "é💥\u{0}\u{202e} x",
        "<fake_token_around_image><global-img><image><image>",
    ]);
    let strategy = (prop::collection::vec(tok_file, 1..=2), texts, any::<u32>());
    fuzz("tokenizer_files", 6, strategy, |(files, text, id)| {
        let mut contents: Vec<Option<Vec<u8>>> = seeds.iter().map(|s| Some(serde_json::to_vec(s).unwrap())).collect();
        for f in &files {
            match f {
                TokFile::Json(i, m) => contents[*i] = Some(apply_json(&seeds[*i], m, &TOKENIZER_KEYS, &extra)),
                TokFile::Bytes(i, ops) => contents[*i] = contents[*i].take().map(|b| mutate_bytes(b, ops, 256)),
                TokFile::Missing(i) => contents[*i] = None,
            }
        }
        for (name, c) in file_names.iter().zip(&contents) {
            let p = tmp.path().join(name);
            match c {
                Some(b) => std::fs::write(&p, b).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        if let Some(tok) = check("Tokenizer::from_dir", Tokenizer::from_dir(tmp.path()))? {
            if let Some(ids) = check("encode", tok.encode(text, true))? {
                let mut ids = ids;
                ids.extend([id, u32::MAX, 0]);
                check("decode", tok.decode(&ids, false, Some(true)))?;
                check("decode", tok.decode(&ids, true, None))?;
                let _ = tok.convert_ids_to_tokens(&ids, true);
            }
            check("tokenize", tok.tokenize(text))?;
            let _ = (tok.template_variables(), tok.all_special_ids(), tok.convert_tokens_to_ids(text), tok.len());
            let opts = EncodeOptions {
                padding: Padding::Longest,
                truncation: true,
                max_length: Some(5),
                ..EncodeOptions::default()
            };
            check("encode_with", tok.encode_with(&[text, "a b"], &opts))?;
        }
        if let Some(Some(t)) = check("ChatTemplates::for_tokenizer", ChatTemplates::for_tokenizer(tmp.path()))? {
            if let Some(ct) = check("compile", t.compile(None, false))? {
                let msgs = json!([{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]);
                check("render", ct.render(&msgs, &RenderOptions::new(true, &[])))?;
            }
        }
        Ok(())
    });
}
