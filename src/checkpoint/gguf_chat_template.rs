//! `tokenizer.chat_template*` of an exported GGUF file (part of [`super::gguf_vocab`]'s tokenizer keys):
//! the chat templates gguf-py's `SpecialVocab` finds next to the tokenizer.

use std::path::Path;

use serde_json::{Map, Value};

use super::gguf_value::{GgufArray, GgufValue};
use super::gguf_vocab::{read_json, tok_err, Kv};
use crate::error::Result;

/// The chat template(s) gguf-py's `SpecialVocab` picks: `tokenizer_config.json`'s `chat_template`
/// (a string, or a list of `{name, template}`), else `chat_template.jinja` (with
/// `additional_chat_templates/*.jinja` as named ones), else `chat_template.json`.
pub(super) fn entries(dir: &Path, cfg: &Map<String, Value>) -> Result<Kv> {
    let mut out = Kv::default();
    let value = match cfg.get("chat_template") {
        Some(v) => v.clone(),
        None => {
            let jinja = dir.join("chat_template.jinja");
            let json = dir.join("chat_template.json");
            if jinja.is_file() {
                let main = std::fs::read_to_string(&jinja).map_err(|e| tok_err(&jinja, format!("cannot read: {e}")))?;
                let sub = dir.join("additional_chat_templates");
                let mut extra = Vec::new();
                if let Ok(entries) = std::fs::read_dir(&sub) {
                    for e in entries.flatten() {
                        let p = e.path();
                        if p.extension().and_then(|x| x.to_str()) == Some("jinja") {
                            let t =
                                std::fs::read_to_string(&p).map_err(|e| tok_err(&p, format!("cannot read: {e}")))?;
                            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
                            extra.push(serde_json::json!({"name": name, "template": t}));
                        }
                    }
                }
                if extra.is_empty() {
                    Value::String(main)
                } else {
                    let mut list = vec![serde_json::json!({"name": "default", "template": main})];
                    list.extend(extra);
                    Value::Array(list)
                }
            } else if json.is_file() {
                read_json(&json)?.get("chat_template").cloned().unwrap_or(Value::Null)
            } else {
                Value::Null
            }
        }
    };
    match value {
        Value::String(s) => out.set("tokenizer.chat_template", GgufValue::String(s)),
        Value::Array(list) => {
            let mut default = None;
            let mut names = Vec::new();
            for choice in &list {
                let name: String = choice
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                let Some(t) = choice.get("template").and_then(Value::as_str) else { continue };
                if name == "default" {
                    default = Some(t.to_string());
                } else if !name.is_empty() {
                    out.set(&format!("tokenizer.chat_template.{name}"), GgufValue::String(t.to_string()));
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
            if !names.is_empty() {
                names.sort();
                out.set("tokenizer.chat_templates", GgufValue::Array(GgufArray::String(names)));
            }
            if let Some(d) = default {
                out.set("tokenizer.chat_template", GgufValue::String(d));
            }
        }
        _ => {}
    }
    Ok(out)
}
