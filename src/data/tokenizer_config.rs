//! `tokenizer_config.json` / `special_tokens_map.json`, read the way transformers 5.x reads them.
//!
//! - `additional_special_tokens` becomes the extra special tokens unless `extra_special_tokens` is a
//!   non-empty list; a dict `extra_special_tokens` and any other `*_token` string key (e.g.
//!   `image_token`) are model-specific named tokens, listed after bos/eos/unk/sep/pad/cls/mask.
//! - `special_tokens_map.json` is only read for legacy configs without `added_tokens_decoder`.
//! - Defaults: `padding_side` and `truncation_side` "right", `clean_up_tokenization_spaces` false,
//!   `model_max_length` unbounded (transformers' `VERY_LARGE_INTEGER`), `split_special_tokens` false.

use std::path::{Path, PathBuf};

use crate::data::chat_template_value::TemplateValue;
use crate::error::{DataError, Error, Result};

/// The standard named special tokens, in transformers' order.
pub const SPECIAL_TOKEN_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

fn tok_err(msg: impl Into<String>) -> Error {
    Error::Data(DataError::Tokenizer(msg.into()))
}

/// Which end of a sequence padding or truncation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The start of the sequence.
    Left,
    /// The end of the sequence.
    Right,
}

impl Side {
    /// Parses `"left"` / `"right"`.
    pub fn parse(s: &str) -> Option<Side> {
        match s {
            "left" => Some(Side::Left),
            "right" => Some(Side::Right),
            _ => None,
        }
    }

    /// `"left"` or `"right"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
        }
    }
}

/// One entry of `added_tokens_decoder`.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedTokenSpec {
    /// The id the config declares.
    pub id: u32,
    /// The token text.
    pub content: String,
    /// Only match whole words.
    pub single_word: bool,
    /// Swallow whitespace on the left.
    pub lstrip: bool,
    /// Swallow whitespace on the right.
    pub rstrip: bool,
    /// Match against normalized text.
    pub normalized: bool,
    /// A special token (skipped by `decode(skip_special_tokens=True)`).
    pub special: bool,
}

/// The parsed tokenizer configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizerConfig {
    /// Named special tokens (`bos_token` ... then model-specific ones), what `special_tokens_map` holds.
    pub named_special: Vec<(String, String)>,
    /// Extra special tokens (`additional_special_tokens`), in order.
    pub extra_special: Vec<String>,
    /// `added_tokens_decoder`, sorted by id.
    pub added_tokens_decoder: Vec<AddedTokenSpec>,
    /// `padding_side` if set.
    pub padding_side: Option<Side>,
    /// `truncation_side` if set.
    pub truncation_side: Option<Side>,
    /// `model_max_length`; `None` when absent or unbounded (>= 1e18).
    pub model_max_length: Option<usize>,
    /// `clean_up_tokenization_spaces` (default false).
    pub clean_up_tokenization_spaces: bool,
    /// `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` (default false).
    pub force_bpe_cleanup: bool,
    /// `split_special_tokens` (default false): special tokens in text are tokenized as plain text.
    pub split_special_tokens: bool,
    /// `tokenizer_class` as written.
    pub tokenizer_class: Option<String>,
    /// `add_prefix_space` (GPT-2 style tokenizers).
    pub add_prefix_space: bool,
    /// Whether the config has an `auto_map` (remote tokenizer code).
    pub has_auto_map: bool,
}

fn read_json(path: &Path) -> Result<TemplateValue> {
    let text = std::fs::read_to_string(path).map_err(|e| tok_err(format!("{}: cannot read: {e}", path.display())))?;
    let value =
        TemplateValue::from_json_str(&text).map_err(|e| tok_err(format!("{}: invalid JSON: {e}", path.display())))?;
    match value {
        TemplateValue::Map(_) => Ok(value),
        other => Err(tok_err(format!("{}: expected a JSON object, got {}", path.display(), other.kind_name()))),
    }
}

/// A token value: a string, or a serialized AddedToken `{"content": ...}`; `None` for null.
fn token_text(v: &TemplateValue, file: &Path, field: &str) -> Result<Option<String>> {
    match v {
        TemplateValue::Null => Ok(None),
        TemplateValue::Str(s) => Ok(Some(s.clone())),
        TemplateValue::Map(_) => match v.get("content") {
            Some(TemplateValue::Str(s)) => Ok(Some(s.clone())),
            _ => Err(tok_err(format!(
                "{}: '{field}' must be a string or an object with a string \"content\"",
                file.display()
            ))),
        },
        other => Err(tok_err(format!("{}: '{field}' must be a string, got {}", file.display(), other.kind_name()))),
    }
}

fn token_list(v: &TemplateValue, file: &Path, field: &str) -> Result<Vec<String>> {
    match v {
        TemplateValue::Null => Ok(Vec::new()),
        TemplateValue::List(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(t) = token_text(item, file, &format!("{field}[{i}]"))? {
                    out.push(t);
                }
            }
            Ok(out)
        }
        other => Err(tok_err(format!("{}: '{field}' must be a list, got {}", file.display(), other.kind_name()))),
    }
}

fn bool_field(v: &TemplateValue, file: &Path, field: &str) -> Result<bool> {
    match v {
        TemplateValue::Bool(b) => Ok(*b),
        TemplateValue::Null => Ok(false),
        other => {
            Err(tok_err(format!("{}: '{field}' must be true or false, got {}", file.display(), other.kind_name())))
        }
    }
}

fn side_field(v: &TemplateValue, file: &Path, field: &str) -> Result<Option<Side>> {
    match v {
        TemplateValue::Null => Ok(None),
        TemplateValue::Str(s) => Side::parse(s).map(Some).ok_or_else(|| {
            tok_err(format!("{}: '{field}' must be \"left\" or \"right\", got \"{s}\"", file.display()))
        }),
        other => Err(tok_err(format!(
            "{}: '{field}' must be \"left\" or \"right\", got {}",
            file.display(),
            other.kind_name()
        ))),
    }
}

fn added_tokens_decoder(v: &TemplateValue, file: &Path) -> Result<Vec<AddedTokenSpec>> {
    let TemplateValue::Map(entries) = v else {
        return Err(tok_err(format!("{}: 'added_tokens_decoder' must be an object", file.display())));
    };
    let mut out = Vec::with_capacity(entries.len());
    for (key, entry) in entries {
        let field = format!("added_tokens_decoder.{key}");
        let id: u32 =
            key.parse().map_err(|_| tok_err(format!("{}: '{field}': the key must be a token id", file.display())))?;
        let content = match entry.get("content") {
            Some(TemplateValue::Str(s)) => s.clone(),
            _ => return Err(tok_err(format!("{}: '{field}' needs a string \"content\"", file.display()))),
        };
        let flag = |name: &str, default: bool| -> Result<bool> {
            match entry.get(name) {
                None => Ok(default),
                Some(v) => bool_field(v, file, &format!("{field}.{name}")),
            }
        };
        let special = flag("special", false)?;
        out.push(AddedTokenSpec {
            id,
            single_word: flag("single_word", false)?,
            lstrip: flag("lstrip", false)?,
            rstrip: flag("rstrip", false)?,
            normalized: flag("normalized", !special)?,
            special,
            content,
        });
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}

fn push_named(named: &mut Vec<(String, String)>, key: &str, value: String) {
    match named.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => named.push((key.to_string(), value)),
    }
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json` (optional) and, for legacy configs without
    /// `added_tokens_decoder`, `dir/special_tokens_map.json`. Errors name the file and field.
    pub fn load(dir: &Path) -> Result<TokenizerConfig> {
        let path: PathBuf = dir.join("tokenizer_config.json");
        let mut cfg = TokenizerConfig::default();
        let root = if path.is_file() { read_json(&path)? } else { TemplateValue::Map(Vec::new()) };
        let TemplateValue::Map(entries) = &root else { return Ok(cfg) };
        let get = |k: &str| root.get(k);

        let mut standard: Vec<(String, String)> = Vec::new();
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(v) = get(name) {
                if let Some(t) = token_text(v, &path, name)? {
                    standard.push((name.to_string(), t));
                }
            }
        }
        let extra_field = get("extra_special_tokens");
        let extra_is_truthy = match extra_field {
            Some(TemplateValue::List(l)) => !l.is_empty(),
            Some(TemplateValue::Map(m)) => !m.is_empty(),
            Some(TemplateValue::Null) | None => false,
            Some(_) => true,
        };
        let mut model_specific: Vec<(String, String)> = Vec::new();
        for (k, v) in entries {
            if k.ends_with("_token") && !SPECIAL_TOKEN_NAMES.contains(&k.as_str()) {
                if let TemplateValue::Str(s) = v {
                    model_specific.push((k.clone(), s.clone()));
                }
            }
        }
        match (extra_field, extra_is_truthy) {
            (Some(TemplateValue::Map(m)), true) => {
                for (k, v) in m {
                    if let Some(t) = token_text(v, &path, &format!("extra_special_tokens.{k}"))? {
                        push_named(&mut model_specific, k, t);
                    }
                }
            }
            (Some(list @ TemplateValue::List(_)), true) => {
                cfg.extra_special = token_list(list, &path, "extra_special_tokens")?
            }
            (Some(other), true) => {
                return Err(tok_err(format!(
                    "{}: 'extra_special_tokens' must be a list or an object, got {}",
                    path.display(),
                    other.kind_name()
                )))
            }
            _ => {
                if let Some(v) = get("additional_special_tokens") {
                    cfg.extra_special = token_list(v, &path, "additional_special_tokens")?;
                }
            }
        }

        match get("added_tokens_decoder") {
            Some(v) => cfg.added_tokens_decoder = added_tokens_decoder(v, &path)?,
            None => {
                let map_path = dir.join("special_tokens_map.json");
                if map_path.is_file() {
                    let map = read_json(&map_path)?;
                    if let TemplateValue::Map(items) = &map {
                        for (k, v) in items {
                            if k == "additional_special_tokens" || k == "extra_special_tokens" {
                                for t in token_list(v, &map_path, k)? {
                                    if !cfg.extra_special.contains(&t) {
                                        cfg.extra_special.push(t);
                                    }
                                }
                            } else if let Some(t) = token_text(v, &map_path, k)? {
                                if SPECIAL_TOKEN_NAMES.contains(&k.as_str()) {
                                    push_named(&mut standard, k, t);
                                } else {
                                    push_named(&mut model_specific, k, t);
                                }
                            }
                        }
                    }
                }
            }
        }
        // transformers lists named tokens in SPECIAL_TOKEN_NAMES order, then model-specific ones.
        for name in SPECIAL_TOKEN_NAMES {
            if let Some((_, t)) = standard.iter().find(|(k, _)| k == name) {
                cfg.named_special.push((name.to_string(), t.clone()));
            }
        }
        cfg.named_special.extend(model_specific);

        if let Some(v) = get("padding_side") {
            cfg.padding_side = side_field(v, &path, "padding_side")?;
        }
        if let Some(v) = get("truncation_side") {
            cfg.truncation_side = side_field(v, &path, "truncation_side")?;
        }
        cfg.model_max_length = match get("model_max_length") {
            None | Some(TemplateValue::Null) => None,
            Some(TemplateValue::Int(n)) if *n >= 0 && (*n as f64) < 1e18 => Some(*n as usize),
            Some(TemplateValue::Int(n)) if *n >= 0 => None,
            Some(TemplateValue::Float(f)) if *f >= 0.0 => (*f < 1e18).then_some(*f as usize),
            Some(other) => {
                return Err(tok_err(format!(
                    "{}: 'model_max_length' must be a non-negative number, got {other:?}",
                    path.display()
                )))
            }
        };
        for (field, slot) in [
            ("clean_up_tokenization_spaces", &mut cfg.clean_up_tokenization_spaces),
            ("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", &mut cfg.force_bpe_cleanup),
            ("split_special_tokens", &mut cfg.split_special_tokens),
            ("add_prefix_space", &mut cfg.add_prefix_space),
        ] {
            if let Some(v) = get(field) {
                *slot = bool_field(v, &path, field)?;
            }
        }
        cfg.tokenizer_class = get("tokenizer_class").and_then(TemplateValue::as_str).map(str::to_string);
        cfg.has_auto_map = matches!(get("auto_map"), Some(v) if *v != TemplateValue::Null);
        Ok(cfg)
    }
}
