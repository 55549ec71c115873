//! Tokenizer and chat-template parity with transformers.
//!
//! Expected values come from `scripts/reference/tokenizer_templates.py` (transformers 5.24) over the
//! SmolVLM tokenizer in `tests/fixtures/tokenizer/smolvlm/`; see that script for what is recorded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrovlm::data::chat_template::{ChatTemplate, ChatTemplates, RenderOptions};
use ferrovlm::data::chat_template_value::TemplateValue;
use ferrovlm::data::tokenizer::{Backend, Side, Tokenizer};
use ferrovlm::data::tokenizer_batch::{EncodeOptions, Padding};
use ferrovlm::error::DataError;
use ferrovlm::Error;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn expected() -> &'static Value {
    static E: OnceLock<Value> = OnceLock::new();
    E.get_or_init(|| {
        let text =
            std::fs::read_to_string(root().join("expected.json")).expect("expected.json (run the reference script)");
        serde_json::from_str(&text).expect("expected.json parses")
    })
}

/// expected.json with key order kept (messages are rendered from this).
fn expected_ordered() -> &'static TemplateValue {
    static E: OnceLock<TemplateValue> = OnceLock::new();
    E.get_or_init(|| {
        let text = std::fs::read_to_string(root().join("expected.json")).expect("expected.json");
        TemplateValue::from_json_str(&text).expect("expected.json parses")
    })
}

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_dir(root().join("smolvlm")).expect("fixture tokenizer loads"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn side(v: &Value) -> Option<Side> {
    v.as_str().and_then(Side::parse)
}

#[test]
fn tokenizer_attributes_match() {
    let e = &expected()["tokenizer"];
    let t = tok();
    assert_eq!(t.backend(), Backend::Gpt2, "no config.json + GPT2Tokenizer class -> transformers' GPT2 rebuild");
    assert_eq!(t.len() as u64, e["len"].as_u64().unwrap());
    assert_eq!(t.vocab_size() as u64, e["vocab_size"].as_u64().unwrap());
    let map: Vec<(String, String)> = e["special_tokens_map"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let mut got = t.special_tokens_map().to_vec();
    let mut want = map.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let all: Vec<String> =
        e["all_special_tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    assert_eq!(t.all_special_tokens(), all);
    assert_eq!(t.all_special_ids(), ids(&e["all_special_ids"]));
    let extra: Vec<String> =
        e["extra_special_tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    assert_eq!(t.extra_special_tokens(), extra.as_slice());
    assert_eq!(t.extra_special_tokens_ids(), ids(&e["extra_special_tokens_ids"]));
    assert_eq!(t.bos_token_id(), Some(e["bos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(t.eos_token_id(), Some(e["eos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(t.pad_token_id(), Some(e["pad_token_id"].as_u64().unwrap() as u32));
    assert_eq!(t.unk_token_id(), Some(e["unk_token_id"].as_u64().unwrap() as u32));
    assert_eq!(t.eos_token(), Some("<end_of_utterance>"));
    assert_eq!(t.padding_side(), side(&e["padding_side"]).unwrap());
    assert_eq!(t.truncation_side(), side(&e["truncation_side"]).unwrap());
    assert_eq!(t.model_max_length().map(|n| n as u64), e["model_max_length"].as_u64());
    assert_eq!(t.clean_up_tokenization_spaces(), e["clean_up_tokenization_spaces"].as_bool().unwrap());
    assert_eq!(t.num_special_tokens_to_add(), 0, "SmolVLM adds no BOS/EOS");
    // Published SmolVLM-256M-Instruct ids for `<|im_start|>User: What is in` and `Assistant:`.
    assert_eq!(t.encode("<|im_start|>User: What is in", true).unwrap(), vec![1, 11126, 42, 1812, 314, 281]);
    assert_eq!(t.encode("Assistant:", true).unwrap(), vec![9519, 9531, 42]);
}

#[test]
fn encode_matches_transformers() {
    let t = tok();
    let cases = expected()["encode"].as_array().unwrap();
    assert!(cases.len() > 100);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let add = c["add_special_tokens"].as_bool().unwrap();
        assert_eq!(t.encode(text, add).unwrap(), ids(&c["ids"]), "encode({text:?}, add_special_tokens={add})");
        let tokens: Vec<String> =
            c["tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        let got: Vec<String> =
            t.convert_ids_to_tokens(&ids(&c["ids"]), false).into_iter().map(|x| x.unwrap()).collect();
        assert_eq!(got, tokens, "tokens of {text:?}");
        if !add {
            assert_eq!(t.tokenize(text).unwrap(), tokens, "tokenize({text:?})");
        }
    }
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let batch = t.encode_batch(&texts, false).unwrap();
    for (c, got) in cases.iter().zip(batch) {
        assert_eq!(got, ids(&c["ids"]));
    }
}

#[test]
fn decode_matches_transformers() {
    let t = tok();
    for c in expected()["decode"].as_array().unwrap() {
        let skip = c["skip_special_tokens"].as_bool().unwrap();
        let clean = c["clean_up_tokenization_spaces"].as_bool();
        let got = t.decode(&ids(&c["ids"]), skip, clean).unwrap();
        assert_eq!(got, c["text"].as_str().unwrap(), "decode({:?}, skip={skip}, clean_up={clean:?})", c["ids"]);
    }
    let b = &expected()["batch_decode"];
    let batch: Vec<Vec<u32>> = b["ids"].as_array().unwrap().iter().map(ids).collect();
    let want: Vec<String> = b["text"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    assert_eq!(t.batch_decode(&batch, true, None).unwrap(), want);
}

#[test]
fn token_id_conversions_match() {
    let t = tok();
    for c in expected()["convert_tokens_to_ids"].as_array().unwrap() {
        let token = c["token"].as_str().unwrap();
        assert_eq!(
            t.convert_tokens_to_ids(token),
            c["id"].as_u64().map(|x| x as u32),
            "convert_tokens_to_ids({token:?})"
        );
    }
    for c in expected()["convert_ids_to_tokens"].as_array().unwrap() {
        let skip = c["skip_special_tokens"].as_bool().unwrap();
        let want: Vec<Option<String>> =
            c["tokens"].as_array().unwrap().iter().map(|x| x.as_str().map(str::to_string)).collect();
        assert_eq!(t.convert_ids_to_tokens(&ids(&c["ids"]), skip), want, "skip_special_tokens={skip}");
    }
    let oor = &expected()["convert_id_out_of_range"];
    assert_eq!(t.convert_ids_to_tokens(&[oor["id"].as_u64().unwrap() as u32], false), vec![None]);
    assert!(oor["token"].is_null());
}

#[test]
fn padding_and_truncation_match() {
    let t = tok();
    for c in expected()["batch"].as_array().unwrap() {
        let texts: Vec<&str> = c["texts"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        let opts = EncodeOptions {
            add_special_tokens: true,
            padding: match c["padding"].as_str().unwrap() {
                "longest" => Padding::Longest,
                "max_length" => Padding::MaxLength,
                _ => Padding::DoNotPad,
            },
            truncation: c["truncation"].as_bool().unwrap_or(false),
            max_length: c["max_length"].as_u64().map(|x| x as usize),
            pad_to_multiple_of: c["pad_to_multiple_of"].as_u64().map(|x| x as usize),
            padding_side: side(&c["padding_side"]),
            truncation_side: Some(side(&c["truncation_side"]).unwrap_or(Side::Right)),
        };
        let got = t.encode_with(&texts, &opts).unwrap();
        let want_ids: Vec<Vec<u32>> = c["input_ids"].as_array().unwrap().iter().map(ids).collect();
        let want_mask: Vec<Vec<u32>> = c["attention_mask"].as_array().unwrap().iter().map(ids).collect();
        assert_eq!(got.input_ids, want_ids, "{opts:?}");
        assert_eq!(got.attention_mask, want_mask, "{opts:?}");
    }
}

#[test]
fn backend_follows_model_type_like_autotokenizer() {
    for case in expected()["backend_selection"].as_array().unwrap() {
        let model_type = case["model_type"].as_str();
        let dir = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(root().join("smolvlm").join(f), dir.path().join(f)).unwrap();
        }
        if let Some(mt) = model_type {
            std::fs::write(dir.path().join("config.json"), format!("{{\"model_type\": \"{mt}\"}}")).unwrap();
        }
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        let want_backend = if case["class"] == "GPT2Tokenizer" { Backend::Gpt2 } else { Backend::TokenizerJson };
        assert_eq!(t.backend(), want_backend, "model_type {model_type:?}");
        for enc in case["encodings"].as_array().unwrap() {
            let text = enc["text"].as_str().unwrap();
            assert_eq!(t.encode(text, true).unwrap(), ids(&enc["ids"]), "model_type {model_type:?}, text {text:?}");
        }
    }
}

fn messages_of(case_index: usize, section: &str) -> TemplateValue {
    let TemplateValue::Map(top) = expected_ordered() else { panic!("expected.json is an object") };
    let (_, list) = top.iter().find(|(k, _)| k == section).expect("section");
    let TemplateValue::List(cases) = list else { panic!("list") };
    cases[case_index].get("messages").expect("messages").clone()
}

#[test]
fn chat_templates_render_like_transformers() {
    let t = tok();
    let tokenizer_smolvlm =
        ChatTemplates::for_tokenizer(&root().join("smolvlm")).unwrap().unwrap().compile(None, false).unwrap();
    let processor_smolvlm =
        ChatTemplates::for_processor(&root().join("template_json")).unwrap().unwrap().compile(None, false).unwrap();
    let templates = &expected()["templates"];
    for (i, c) in expected()["template_render"].as_array().unwrap().iter().enumerate() {
        let is_processor = c["source"] == "processor";
        let name = c["template"].as_str().unwrap();
        let custom;
        let template = match (name, is_processor) {
            ("smolvlm", true) => &processor_smolvlm,
            ("smolvlm", false) => &tokenizer_smolvlm,
            _ => {
                custom = ChatTemplate::new(templates[name].as_str().unwrap()).unwrap();
                &custom
            }
        };
        let opts = RenderOptions {
            add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
            normalize_image_urls: is_processor,
            variables: t.template_variables(),
            ..Default::default()
        };
        let got = template.render_value(&messages_of(i, "template_render"), &opts);
        let label =
            format!("case {} ({}, add_generation_prompt={})", c["case"], c["source"], opts.add_generation_prompt);
        match c["rendered"].as_str() {
            Some(want) => assert_eq!(got.unwrap(), want, "{label}"),
            None => assert!(got.is_err(), "{label}: transformers raised {}", c["error"]),
        }
    }
}

#[test]
fn render_from_serde_value_and_json_text() {
    let template = ChatTemplate::new(expected()["templates"]["smolvlm"].as_str().unwrap()).unwrap();
    let messages = serde_json::json!([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Can you describe this image?"}]}
    ]);
    let opts = RenderOptions::new(true, tok().special_tokens_map());
    let want = "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:";
    assert_eq!(template.render(&messages, &opts).unwrap(), want);
    assert_eq!(template.render_json(&messages.to_string(), &opts).unwrap(), want);
}

#[test]
fn continue_final_message_leaves_the_last_turn_open() {
    let template = ChatTemplate::new(expected()["templates"]["smolvlm"].as_str().unwrap()).unwrap();
    let messages = serde_json::json!([
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello, I am"}]}
    ]);
    let opts = RenderOptions { continue_final_message: Some("content".into()), ..Default::default() };
    assert_eq!(
        template.render(&messages, &opts).unwrap(),
        "<|im_start|>User: Hi<end_of_utterance>\nAssistant: Hello, I am"
    );
    let both = RenderOptions { add_generation_prompt: true, ..opts };
    assert!(matches!(template.render(&messages, &both), Err(Error::Data(DataError::Invalid(_)))));
}

#[test]
fn template_errors_match() {
    for c in expected()["template_errors"].as_array().unwrap() {
        let source = c["template"].as_str().unwrap();
        let messages = &c["messages"];
        match c["case"].as_str().unwrap() {
            "raises" => {
                let t = ChatTemplate::new(source).unwrap();
                match t.render(messages, &RenderOptions::default()) {
                    Err(Error::Data(DataError::Template(msg))) => {
                        assert!(msg.contains(c["error"].as_str().unwrap()), "message {msg:?} lacks the template's text")
                    }
                    other => panic!("expected a template error, got {other:?}"),
                }
            }
            "syntax_error" => match ChatTemplate::with_origin(source, "bad/chat_template.jinja") {
                Err(Error::Data(DataError::Template(msg))) => {
                    assert!(msg.contains("bad/chat_template.jinja") && msg.contains("syntax"), "{msg}")
                }
                other => panic!("expected a syntax error, got {other:?}"),
            },
            other => panic!("unknown case {other}"),
        }
    }
}

#[test]
fn template_sources_follow_transformers_precedence() {
    let sources = expected()["template_sources"].as_object().unwrap();
    assert_eq!(sources.len(), 6);
    for (folder, want) in sources {
        let dir = root().join(folder);
        for (kind, got) in
            [("tokenizer", ChatTemplates::for_tokenizer(&dir)), ("processor", ChatTemplates::for_processor(&dir))]
        {
            let want = &want[kind];
            let label = format!("{folder}: {kind}");
            match want {
                Value::Null => assert!(matches!(got, Ok(None)), "{label}: expected no template, got {got:?}"),
                Value::String(s) if s.starts_with("ERROR") => assert!(got.is_err(), "{label}: transformers raised"),
                Value::String(s) => {
                    let got = got.unwrap().unwrap();
                    assert_eq!(got.templates, vec![("default".to_string(), s.clone())], "{label}");
                    assert_eq!(got.select(None, false).unwrap(), s, "{label}");
                }
                Value::Object(m) => {
                    let got = got.unwrap().unwrap();
                    for (name, source) in m {
                        assert_eq!(got.select(Some(name), false).unwrap(), source.as_str().unwrap(), "{label}: {name}");
                    }
                    assert_eq!(got.templates.len(), m.len(), "{label}");
                    if let Some(d) = m.get("default") {
                        assert_eq!(got.select(None, false).unwrap(), d.as_str().unwrap());
                    }
                }
                other => panic!("{label}: unexpected {other}"),
            }
        }
    }
    let list = ChatTemplates::for_tokenizer(&root().join("template_config_list")).unwrap().unwrap();
    assert_eq!(list.select(None, true).unwrap(), "TOOL_USE{{ messages | length }}", "tools pick tool_use");
    assert!(list.select(Some("nope"), false).is_err());
}

// ---------- bad input ----------

fn tokenizer_error(r: ferrovlm::Result<Tokenizer>) -> String {
    match r {
        Err(Error::Data(DataError::Tokenizer(msg))) => msg,
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let msg = tokenizer_error(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains(&dir.path().join("tokenizer.json").display().to_string()), "{msg}");
    assert!(msg.contains("not found"), "{msg}");
}

#[test]
fn corrupt_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": {\"type\": \"BPE\", \"vocab\": ").unwrap();
    let msg = tokenizer_error(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("tokenizer.json"), "{msg}");

    std::fs::copy(root().join("smolvlm/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"padding_side\": \"middle\"}").unwrap();
    let msg = tokenizer_error(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("tokenizer_config.json") && msg.contains("padding_side"), "{msg}");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"added_tokens_decoder\": {\"x\": {}}}").unwrap();
    let msg = tokenizer_error(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("added_tokens_decoder.x"), "{msg}");
    std::fs::write(dir.path().join("tokenizer_config.json"), "not json").unwrap();
    let msg = tokenizer_error(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("tokenizer_config.json") && msg.contains("invalid JSON"), "{msg}");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("config.json"), "{oops").unwrap();
    let msg = tokenizer_error(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn unknown_tokens_and_missing_pad_token() {
    // With an unk token, unknown tokens map to its id (transformers: unk_token_id).
    assert_eq!(tok().convert_tokens_to_ids("definitely-not-a-token"), Some(0));
    // Without one they map to None (transformers returns None), and padding is an error.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root().join("smolvlm/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"eos_token\": \"<end_of_utterance>\"}").unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.backend(), Backend::TokenizerJson);
    assert_eq!(t.convert_tokens_to_ids("definitely-not-a-token"), None);
    assert_eq!(t.convert_tokens_to_ids("<image>"), Some(49190));
    assert_eq!(t.special_tokens_map(), &[("eos_token".to_string(), "<end_of_utterance>".to_string())]);
    let opts = EncodeOptions { padding: Padding::Longest, ..Default::default() };
    match t.encode_with(&["a", "b c"], &opts) {
        Err(Error::Data(DataError::Tokenizer(msg))) => assert!(msg.contains("padding token"), "{msg}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // A config token that the vocabulary lacks is added, like transformers does.
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"pad_token\": \"<my_pad>\"}").unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.pad_token_id(), Some(49280));
    assert_eq!(t.len(), 49281);
    assert_eq!(t.encode("x<my_pad>", false).unwrap(), vec![104, 49280]);
}

fn template_error(r: ferrovlm::Result<String>) -> String {
    match r {
        Err(Error::Data(DataError::Template(msg))) | Err(Error::Data(DataError::Invalid(msg))) => msg,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn bad_messages_and_templates_are_errors() {
    let t = ChatTemplate::new("{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    let opts = RenderOptions::default();
    let msg = template_error(t.render(&serde_json::json!({"role": "user", "content": "hi"}), &opts));
    assert!(msg.contains("messages must be a list"), "{msg}");
    let msg = template_error(t.render(&serde_json::json!("hello"), &opts));
    assert!(msg.contains("got a string"), "{msg}");
    let msg = template_error(t.render(&serde_json::json!([{"role": "user", "content": "a"}, 3]), &opts));
    assert!(msg.contains("message 1"), "{msg}");
    let msg = template_error(t.render(&serde_json::json!([]), &opts));
    assert!(msg.contains("empty conversation"), "{msg}");
    let msg = template_error(t.render_json("[{\"role\": ", &opts));
    assert!(msg.contains("not valid JSON"), "{msg}");

    assert!(matches!(ChatTemplate::new("{% if %}"), Err(Error::Data(DataError::Template(_)))));
    let raising = ChatTemplate::new("{{ raise_exception('No system messages, please') }}").unwrap();
    let msg = template_error(raising.render(&serde_json::json!([{"role": "system", "content": ""}]), &opts));
    assert!(msg.contains("raised") && msg.contains("No system messages, please"), "{msg}");
    let bad_call = ChatTemplate::new("{{ messages[0].content | tojson(indent='x', bogus=1) }}").unwrap();
    let msg = template_error(bad_call.render(&serde_json::json!([{"role": "user", "content": "a"}]), &opts));
    assert!(msg.contains("bogus"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"chat_template\": 5}").unwrap();
    match ChatTemplates::for_tokenizer(dir.path()) {
        Err(Error::Data(DataError::Template(msg))) => {
            assert!(msg.contains("tokenizer_config.json") && msg.contains("chat_template"), "{msg}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
    std::fs::write(dir.path().join("chat_template.json"), "{\"template\": \"x\"}").unwrap();
    match ChatTemplates::for_processor(dir.path()) {
        Err(Error::Data(DataError::Template(msg))) => assert!(msg.contains("chat_template.json"), "{msg}"),
        other => panic!("expected an error, got {other:?}"),
    }
}
