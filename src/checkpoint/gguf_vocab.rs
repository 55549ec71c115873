//! The `tokenizer.*` metadata of an exported Llama GGUF file, as llama.cpp's converter writes it for a
//! byte-level BPE tokenizer (`LlamaModel.set_vocab` -> `_set_vocab_gpt2` + gguf-py's `SpecialVocab`):
//!
//! - `tokenizer.ggml.add_space_prefix` when `tokenizer_config.json` has `add_prefix_space`;
//! - `model` "gpt2", `pre` (the pre-tokenizer's llama.cpp name), `tokens` (every id below the model's
//!   vocab_size: the vocabulary and added tokens as spelled in `tokenizer.json`, `[PAD<i>]` for holes),
//!   `token_type` (1 normal, 3 control = a special added token or one that looks special `<|...|>`,
//!   4 user defined = another added token, 5 unused = a hole), `merges` ("a b", a space inside a
//!   part written as U+0120);
//! - special ids from `tokenizer_config.json` (`bos_token`, ...: the id of the added token with that
//!   content), then from the model config's `<typ>_token_id` (top level, else `text_config`), never
//!   overriding; `add_bos_token` / `add_eos_token` / `add_sep_token` from the post-processor (ByteLevel:
//!   false; a TemplateProcessing's leading / trailing special token) or `tokenizer_config.json`;
//! - `tokenizer.chat_template` from `tokenizer_config.json`, else `chat_template.jinja`
//!   (+ `additional_chat_templates/`: named templates), else `chat_template.json`;
//! - `add_bos_token` false for a 49152-token vocabulary (the converter's rule for Granite small, which
//!   SmolLM2's vocabulary size also meets).
//!
//! The pre-tokenizer name: the converter hashes the ids of a test text and looks the hash up in a table
//! of known vocabularies. Here the name comes from the `tokenizer.json` pre-tokenizer itself, for the
//! splits llama.cpp implements that ferrovlm reads back (`data::tokenizer_gguf`): Digits + ByteLevel
//! "smollm" (SmolLM / SmolLM2 / SmolVLM, the same regex llama.cpp uses for StarCoder-style vocabularies),
//! plain ByteLevel "gpt2", Llama 3's split "llama-bpe", Qwen2's "qwen2". Anything else is refused.
//!
//! A model read from a GGUF file keeps that file's `tokenizer.*` keys as they are ([`from_gguf`]).

use std::path::Path;

use serde_json::{Map, Value};

use super::gguf::GgufFile;
use super::gguf_value::{GgufArray, GgufValue};
use crate::error::{DataError, Error, Result};

/// Metadata in insertion order, where setting a present key replaces its value in place (as gguf-py's
/// writer does with a duplicate key).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kv(pub Vec<(String, GgufValue)>);

impl Kv {
    pub fn set(&mut self, key: &str, v: GgufValue) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.0.push((key.to_string(), v)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

pub(super) fn tok_err(file: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data(DataError::Tokenizer(format!("{}: {msg}", file.display())))
}

pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| tok_err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| tok_err(path, format!("invalid JSON: {e}")))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("")
}

/// llama.cpp's name of a `tokenizer.json` pre-tokenizer (see the module doc), or None.
pub fn pre_tokenizer_name(pre: &Value) -> Option<&'static str> {
    let ty = type_of;
    let flag = |v: &Value, k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
    let byte_level = |v: &Value, regex: bool| ty(v) == "ByteLevel" && flag(v, "use_regex", true) == regex;
    match ty(pre) {
        "ByteLevel" if byte_level(pre, true) && !flag(pre, "add_prefix_space", true) => Some("gpt2"),
        "Sequence" => {
            let parts = pre.get("pretokenizers").and_then(Value::as_array)?;
            match parts.as_slice() {
                [d, b] if ty(d) == "Digits" && flag(d, "individual_digits", false) && byte_level(b, true) => {
                    Some("smollm")
                }
                [s, b] if ty(s) == "Split" && byte_level(b, false) => {
                    match s.get("pattern").and_then(|p| p.get("Regex")).and_then(Value::as_str)? {
                        LLAMA3_SPLIT => Some("llama-bpe"),
                        QWEN2_SPLIT => Some("qwen2"),
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

struct Added {
    id: u64,
    content: String,
    special: bool,
}

/// The special-token types gguf-py looks for, in its order (`eot` / `eom` join when a template
/// redefines the EOS).
const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// The metadata key of a special token type's id (`cls` has none: the converter skips it).
fn special_id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        "eot" => "tokenizer.ggml.eot_token_id",
        "eom" => "tokenizer.ggml.eom_token_id",
        _ => return None,
    })
}

/// gguf-py's `SpecialVocab` state.
#[derive(Default)]
struct Special {
    ids: Vec<(String, u64)>,
    add: Vec<(String, bool)>,
}

impl Special {
    fn set_id(&mut self, typ: &str, id: Option<&Value>) {
        // `isinstance(tid, int)`: a JSON integer (or bool); negative ids are refused by gguf-py
        let id = match id {
            Some(Value::Bool(b)) => Some(*b as u64),
            Some(v) => v.as_u64(),
            None => None,
        };
        if let Some(id) = id {
            if !self.ids.iter().any(|(t, _)| t == typ) {
                self.ids.push((typ.to_string(), id));
            }
        }
    }

    fn add_default(&mut self, typ: &str, v: bool) {
        if !self.add.iter().any(|(t, _)| t == typ) {
            self.add.push((typ.to_string(), v));
        }
    }

    fn add_force(&mut self, typ: &str, v: bool) {
        match self.add.iter_mut().find(|(t, _)| t == typ) {
            Some(slot) => slot.1 = v,
            None => self.add.push((typ.to_string(), v)),
        }
    }
}

fn special_token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The post-processor part of gguf-py's `_try_load_from_tokenizer_json`: add_bos / add_eos / add_sep
/// from a ByteLevel, RobertaProcessing or TemplateProcessing post-processor; `cfg` is
/// `tokenizer_config.json`, updated as gguf-py updates it (a template's trailing token other than the
/// configured EOS becomes the EOS, the old one the EOT: `types` then gains "eot").
fn post_processor_flags(post: &Value, cfg: &mut Option<Map<String, Value>>, sp: &mut Special, types: &mut Vec<String>) {
    let get = |cfg: &Option<Map<String, Value>>, k: &str| special_token_content(cfg.as_ref().and_then(|c| c.get(k)));
    let set = |cfg: &mut Option<Map<String, Value>>, k: &str, v: &str| {
        if let Some(c) = cfg.as_mut().filter(|c| !c.is_empty()) {
            c.insert(k.into(), Value::String(v.into()));
        }
    };
    if get(cfg, "bos_token").is_none() {
        if let Some(cls) = get(cfg, "cls_token") {
            set(cfg, "bos_token", &cls);
        }
    }
    if get(cfg, "eos_token").is_none() {
        if let Some(sep) = get(cfg, "sep_token") {
            set(cfg, "eos_token", &sep);
        }
    }
    let procs: Vec<&Value> = match post.get("processors").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![post],
    };
    let no_cfg = cfg.as_ref().is_none_or(|c| c.is_empty());
    for p in procs {
        match p.get("type").and_then(Value::as_str) {
            Some("ByteLevel") => {
                sp.add_default("bos", false);
                sp.add_default("eos", false);
            }
            Some("RobertaProcessing") => {
                sp.add_force("bos", true);
                sp.add_force("eos", true);
                sp.add_force("sep", true);
                let first =
                    |k: &str| p.get(k).and_then(Value::as_array).and_then(|a| a.first()).and_then(Value::as_str);
                if get(cfg, "cls_token").is_none() {
                    if let Some(c) = first("cls").map(str::to_string).or_else(|| get(cfg, "bos_token")) {
                        set(cfg, "cls_token", &c);
                    }
                }
                if get(cfg, "sep_token").is_none() {
                    if let Some(s) = first("sep").map(str::to_string).or_else(|| get(cfg, "eos_token")) {
                        set(cfg, "sep_token", &s);
                    }
                }
            }
            Some("TemplateProcessing") => {
                let single = p.get("single").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
                if single.len() <= 1 {
                    continue;
                }
                let special_id = |v: &Value| {
                    v.get("SpecialToken").and_then(|s| s.get("id")).and_then(Value::as_str).map(str::to_string)
                };
                if let Some(first) = single.first().and_then(special_id) {
                    let (bos, cls) = (get(cfg, "bos_token"), get(cfg, "cls_token"));
                    let known = Some(&first) == bos.as_ref() || Some(&first) == cls.as_ref();
                    if !known && !no_cfg {
                        if bos.is_none() {
                            set(cfg, "bos_token", &first);
                        }
                        if cls.is_none() {
                            set(cfg, "cls_token", &first);
                        }
                    }
                    sp.add_force("bos", known || no_cfg || bos.is_none() || cls.is_none());
                }
                if let Some(last) = single.last().and_then(special_id) {
                    let eos = get(cfg, "eos_token");
                    if !no_cfg && Some(&last) != eos.as_ref() {
                        for extra in ["eot", "eom"] {
                            if !types.iter().any(|t| t == extra) {
                                types.push(extra.into());
                                if let Some(e) = &eos {
                                    set(cfg, &format!("{extra}_token"), e);
                                }
                                break;
                            }
                        }
                        set(cfg, "eos_token", &last);
                    }
                    sp.add_force("eos", true);
                }
            }
            _ => {}
        }
    }
}

/// The converter's `tokenizer.*` keys for the tokenizer files in `dir` (`tokenizer.json`, optional
/// `tokenizer_config.json` and chat template files), a model of `vocab_size` ids, and the model's
/// `config.json` (special ids not named by the tokenizer files).
pub fn from_tokenizer_dir(dir: &Path, vocab_size: usize, model_config: &Value) -> Result<Kv> {
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: Option<Map<String, Value>> = if cfg_path.is_file() {
        match read_json(&cfg_path)? {
            Value::Object(o) => Some(o),
            _ => return Err(tok_err(&cfg_path, "not a JSON object")),
        }
    } else {
        None
    };
    let mut kv = Kv::default();
    if let Some(b) = cfg.as_ref().and_then(|c| c.get("add_prefix_space")).and_then(Value::as_bool) {
        kv.set("tokenizer.ggml.add_space_prefix", GgufValue::Bool(b));
    }
    let model = tj.get("model").ok_or_else(|| tok_err(&tj_path, "no 'model' section"))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(tok_err(&tj_path, "only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') are exported"));
    }
    let pre = tj.get("pre_tokenizer").unwrap_or(&Value::Null);
    let pre_name = pre_tokenizer_name(pre).ok_or_else(|| {
        tok_err(
            &tj_path,
            format!(
                "pre-tokenizer {pre} has no llama.cpp name ferrovlm knows (smollm: Digits + ByteLevel, gpt2: \
                 ByteLevel, llama-bpe and qwen2: their Split regex + ByteLevel)"
            ),
        )
    })?;
    // ids: the BPE vocabulary, then the added tokens (transformers' get_vocab())
    let mut by_id: Vec<Option<String>> = vec![None; vocab_size];
    let mut put = |id: u64, tok: &str| -> Result<()> {
        let slot = usize::try_from(id).ok().and_then(|i| by_id.get_mut(i)).ok_or_else(|| {
            tok_err(&tj_path, format!("token '{tok}' has id {id}, outside the model's vocab_size {vocab_size}"))
        })?;
        *slot = Some(tok.to_string());
        Ok(())
    };
    let vocab = model.get("vocab").and_then(Value::as_object).ok_or_else(|| tok_err(&tj_path, "no model.vocab"))?;
    for (tok, id) in vocab {
        put(id.as_u64().ok_or_else(|| tok_err(&tj_path, format!("token '{tok}': id {id} is not an integer")))?, tok)?;
    }
    let mut added = Vec::new();
    for a in tj.get("added_tokens").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
        let (Some(id), Some(content)) = (a.get("id").and_then(Value::as_u64), a.get("content").and_then(Value::as_str))
        else {
            return Err(tok_err(&tj_path, format!("added token {a} has no integer id or string content")));
        };
        put(id, content)?;
        added.push(Added {
            id,
            content: content.into(),
            special: a.get("special").and_then(Value::as_bool) == Some(true),
        });
    }
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut toktypes = Vec::with_capacity(vocab_size);
    for (i, t) in by_id.into_iter().enumerate() {
        let Some(tok) = t else {
            tokens.push(format!("[PAD{i}]"));
            toktypes.push(5);
            continue;
        };
        match added.iter().find(|a| a.content == tok) {
            None => toktypes.push(1),
            Some(a) => {
                let entry = added.iter().find(|x| x.id == i as u64).unwrap_or(a);
                let looks_special = (tok.starts_with("<|") && tok.ends_with("|>"))
                    || (tok.starts_with("<｜") && tok.ends_with("｜>"))
                    || (tok.starts_with("<unused") && tok.ends_with('>'))
                    || ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&tok.as_str());
                if entry.special || looks_special {
                    toktypes.push(3);
                } else {
                    toktypes.push(4);
                    tokens.push(tok.replace('\u{2581}', " "));
                    continue;
                }
            }
        }
        tokens.push(tok);
    }
    kv.set("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    kv.set("tokenizer.ggml.pre", GgufValue::String(pre_name.into()));
    kv.set("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens)));
    kv.set("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(toktypes)));

    let merges = merges(model).map_err(|m| tok_err(&tj_path, m))?;
    let mut sp = Special::default();
    let mut types: Vec<String> = SPECIAL_TYPES.iter().map(|t| t.to_string()).collect();
    if let Some(post) = tj.get("post_processor").filter(|p| !p.is_null()) {
        post_processor_flags(post, &mut cfg, &mut sp, &mut types);
    }
    let mut template = Kv::default();
    if let Some(c) = cfg.as_ref().filter(|c| !c.is_empty()) {
        template = super::gguf_chat_template::entries(dir, c)?;
        for typ in &types {
            if let Some(b) = c.get(&format!("add_{typ}_token")).and_then(Value::as_bool) {
                sp.add_default(typ, b);
            }
            let Some(content) = special_token_content(c.get(&format!("{typ}_token"))) else { continue };
            let id = added.iter().find(|a| a.content == content).map(|a| Value::from(a.id));
            sp.set_id(typ, id.as_ref());
        }
    }
    let text_cfg = model_config.get("text_config");
    for typ in &types {
        let key = format!("{typ}_token_id");
        let v = match model_config.get(&key) {
            Some(v) if !v.is_null() => Some(v),
            _ => text_cfg.and_then(|t| t.get(&key)),
        };
        sp.set_id(typ, v);
    }
    if !merges.is_empty() {
        kv.set("tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(merges)));
    }
    for (typ, id) in &sp.ids {
        if let Some(key) = special_id_key(typ) {
            let id = u32::try_from(*id).map_err(|_| tok_err(&tj_path, format!("{typ} token id {id} is too large")))?;
            kv.set(key, GgufValue::U32(id));
        }
    }
    for (typ, v) in &sp.add {
        if matches!(typ.as_str(), "bos" | "eos" | "sep") {
            kv.set(&format!("tokenizer.ggml.add_{typ}_token"), GgufValue::Bool(*v));
        }
    }
    for (k, v) in template.0 {
        kv.set(&k, v);
    }
    if let Some(n) = tj.get("normalizer").filter(|n| !n.is_null()) {
        let (mut lower, mut strip) = (None, None);
        normalizer_flags(n, &mut lower, &mut strip);
        if let Some(b) = lower {
            kv.set("tokenizer.ggml.normalizer.lowercase", GgufValue::Bool(b));
        }
        if let Some(b) = strip {
            kv.set("tokenizer.ggml.normalizer.strip_accents", GgufValue::Bool(b));
        }
    }
    if vocab_size == 49152 {
        kv.set("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
    }
    Ok(kv)
}

fn normalizer_flags(n: &Value, lower: &mut Option<bool>, strip: &mut Option<bool>) {
    match n.get("type").and_then(Value::as_str) {
        Some("Lowercase") => *lower = Some(true),
        Some("StripAccents") => *strip = Some(true),
        Some("BertNormalizer") => {
            if let Some(b) = n.get("lowercase").and_then(Value::as_bool) {
                *lower = Some(b);
            }
            if let Some(b) = n.get("strip_accents").and_then(Value::as_bool) {
                *strip = Some(b);
            }
        }
        Some("Sequence") => {
            for m in n.get("normalizers").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
                normalizer_flags(m, lower, strip);
            }
        }
        _ => {}
    }
}

/// `model.merges` as "a b" strings (pairs joined; a space inside a part written as U+0120).
fn merges(model: &Value) -> std::result::Result<Vec<String>, String> {
    let Some(list) = model.get("merges").and_then(Value::as_array) else { return Ok(Vec::new()) };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => {
                    Ok(format!("{} {}", a.replace(' ', "\u{120}"), b.replace(' ', "\u{120}")))
                }
                _ => Err(format!("unknown merges format: {m}")),
            },
            _ => Err(format!("unknown merges format: {m}")),
        })
        .collect()
}

/// The `tokenizer.*` keys of a GGUF file, in file order (a model read from a GGUF file exports the
/// vocabulary it came with).
pub fn from_gguf(file: &GgufFile) -> Kv {
    Kv(file.metadata_entries().iter().filter(|(k, _)| k.starts_with("tokenizer.")).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_names() {
        let smollm = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
        assert_eq!(pre_tokenizer_name(&smollm), Some("smollm"));
        let gpt2 = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&gpt2), Some("gpt2"));
        let llama3 = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]});
        assert_eq!(pre_tokenizer_name(&llama3), Some("llama-bpe"));
        assert_eq!(pre_tokenizer_name(&serde_json::json!({"type": "Whitespace"})), None);
    }

    #[test]
    fn merges_in_both_formats() {
        let m = serde_json::json!({"merges": [["a", "b"], ["c d", "e"]]});
        assert_eq!(merges(&m).unwrap(), ["a b", "c\u{120}d e"]);
        let m = serde_json::json!({"merges": ["a b"]});
        assert_eq!(merges(&m).unwrap(), ["a b"]);
        assert!(merges(&serde_json::json!({"merges": [1]})).is_err());
    }

    fn write_tokenizer(dir: &Path, post: Value, config: Value) {
        let tj = serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
            "post_processor": post,
            "added_tokens": [
                {"id": 3, "content": "<s>", "special": true},
                {"id": 5, "content": "<|user|>", "special": false},
                {"id": 6, "content": "<x\u{2581}y>", "special": false},
            ],
        });
        std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    }

    #[test]
    fn token_types_holes_and_post_processor_flags() {
        let dir = tempfile::tempdir().unwrap();
        let post = serde_json::json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]});
        write_tokenizer(dir.path(), post, serde_json::json!({"bos_token": "<s>", "chat_template": "{{x}}"}));
        let kv = from_tokenizer_dir(dir.path(), 8, &serde_json::json!({"eos_token_id": 5})).unwrap();
        let Some(GgufValue::Array(GgufArray::String(tokens))) = kv.get("tokenizer.ggml.tokens") else { panic!() };
        assert_eq!(tokens, &["a", "b", "ab", "<s>", "[PAD4]", "<|user|>", "<x y>", "[PAD7]"]);
        let Some(GgufValue::Array(GgufArray::I32(types))) = kv.get("tokenizer.ggml.token_type") else { panic!() };
        assert_eq!(types, &[1, 1, 1, 3, 5, 3, 4, 5]); // <|user|> looks special
        assert_eq!(kv.get("tokenizer.ggml.bos_token_id"), Some(&GgufValue::U32(3)));
        assert_eq!(kv.get("tokenizer.ggml.eos_token_id"), Some(&GgufValue::U32(5)));
        assert_eq!(kv.get("tokenizer.ggml.add_bos_token"), Some(&GgufValue::Bool(true)));
        assert_eq!(kv.get("tokenizer.chat_template"), Some(&GgufValue::String("{{x}}".into())));
        let e = from_tokenizer_dir(dir.path(), 4, &Value::Null).unwrap_err().to_string();
        assert!(e.contains("outside the model's vocab_size 4"), "{e}");
    }

    #[test]
    fn a_49152_token_vocabulary_gets_add_bos_false() {
        // the converter's rule for Granite small, which SmolLM2's vocabulary size also meets
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), serde_json::json!({"type": "ByteLevel"}), serde_json::json!({}));
        let kv = from_tokenizer_dir(dir.path(), 49152, &Value::Null).unwrap();
        assert_eq!(kv.get("tokenizer.ggml.add_bos_token"), Some(&GgufValue::Bool(false)));
        assert_eq!(kv.get("tokenizer.ggml.add_eos_token"), Some(&GgufValue::Bool(false)));
        assert!(kv.get("tokenizer.chat_template").is_none());
    }

    #[test]
    fn setting_a_key_twice_keeps_its_place() {
        let mut kv = Kv::default();
        kv.set("a", GgufValue::U32(1));
        kv.set("b", GgufValue::U32(2));
        kv.set("a", GgufValue::U32(3));
        assert_eq!(kv.0, vec![("a".into(), GgufValue::U32(3)), ("b".into(), GgufValue::U32(2))]);
    }
}
