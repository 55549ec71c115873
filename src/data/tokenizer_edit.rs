//! Changing and saving a tokenizer as transformers 5.x does: `add_tokens`, `add_special_tokens`, and the
//! files of `save_pretrained` (`tokenizer.json` as the tokenizers library writes it; the
//! `tokenizer_config.json` keys transformers writes: `backend`, the named special tokens,
//! `extra_special_tokens`, `model_max_length`, `tokenizer_class`, ...; no `added_tokens_decoder` and no
//! `special_tokens_map.json`: the added tokens and their flags live in `tokenizer.json`).

use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::AddedToken;

use crate::data::tokenizer::{Backend, Tokenizer};
use crate::data::tokenizer_config::{Side, SPECIAL_TOKEN_NAMES};
use crate::error::{DataError, Error, Result};

fn tok_err(msg: impl Into<String>) -> Error {
    Error::Data(DataError::Tokenizer(msg.into()))
}

/// A token as `add_special_tokens` makes it: special, not normalized, no stripping.
fn special_token(content: &str) -> AddedToken {
    AddedToken::from(content.to_string(), true).normalized(false)
}

impl Tokenizer {
    /// `add_tokens`: tokens not in the vocabulary yet are appended (ids from `len()` on), in order.
    /// Returns how many were new. Special tokens are not normalized, as transformers adds them.
    pub fn add_tokens(&mut self, tokens: &[String], special: bool) -> usize {
        let list: Vec<AddedToken> = tokens
            .iter()
            .map(|t| if special { special_token(t) } else { AddedToken::from(t.clone(), false) })
            .collect();
        if special {
            self.inner.add_special_tokens(&list)
        } else {
            self.inner.add_tokens(&list)
        }
    }

    /// `add_special_tokens`: `named` sets named special tokens (`bos_token`, `eos_token`, ...); `extra`
    /// replaces the extra special tokens (`additional_special_tokens`) when `replace_extra` (and it is
    /// not empty), else extends them with the ones not listed yet. Every token given is added to the
    /// vocabulary as a special token when new. Returns how many tokens were new.
    pub fn add_special_tokens(
        &mut self,
        named: &[(String, String)],
        extra: &[String],
        replace_extra: bool,
    ) -> Result<usize> {
        let mut to_add: Vec<String> = Vec::new();
        for (key, token) in named {
            if !SPECIAL_TOKEN_NAMES.contains(&key.as_str()) {
                return Err(tok_err(format!(
                    "Key {key} is not a valid special token. Valid keys are: {}, extra_special_tokens",
                    SPECIAL_TOKEN_NAMES.join(", ")
                )));
            }
            match self.config.named_special.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = token.clone(),
                None => {
                    // keep transformers' order: the standard names first, in SPECIAL_TOKEN_NAMES order
                    let rank = |k: &str| SPECIAL_TOKEN_NAMES.iter().position(|n| *n == k).unwrap_or(usize::MAX);
                    let at = self.config.named_special.iter().position(|(k, _)| rank(k) > rank(key));
                    let at = at.unwrap_or(self.config.named_special.len());
                    self.config.named_special.insert(at, (key.clone(), token.clone()));
                }
            }
            to_add.push(token.clone());
        }
        let new: Vec<String> =
            extra.iter().filter(|t| replace_extra || !self.config.extra_special.contains(t)).cloned().collect();
        if replace_extra && !new.is_empty() {
            self.config.extra_special = new.clone();
        } else {
            self.config.extra_special.extend(new.iter().cloned());
        }
        to_add.extend(new);
        Ok(self.add_tokens(&to_add, true))
    }

    /// `tokenizer.json`: the pipeline as this tokenizer runs it (with its added tokens), as the
    /// tokenizers library serializes it.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| tok_err(format!("cannot serialize the tokenizer: {e}")))
    }

    /// Writes `tokenizer.json` into `dir` (created if needed).
    pub fn save_tokenizer_json(&self, dir: &Path) -> Result<()> {
        let io = |p: &Path, e: std::io::Error| tok_err(format!("{}: cannot write: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, self.to_json()?).map_err(|e| io(&path, e))
    }

    /// The `tokenizer_config.json` object transformers 5.x writes for this tokenizer (keys sorted on
    /// writing). `model_max_length` is null when unbounded (transformers writes its
    /// `VERY_LARGE_INTEGER`, 1e30, which JSON integers of this crate cannot hold: the Python side
    /// writes that value). `processor_class` is added when given.
    pub fn config_json(&self, processor_class: Option<&str>) -> Value {
        let c = &self.config;
        let mut m = Map::new();
        m.insert("backend".into(), json!("tokenizers"));
        for (k, v) in &c.named_special {
            m.insert(k.clone(), json!(v));
        }
        m.insert("extra_special_tokens".into(), json!(c.extra_special));
        m.insert("model_max_length".into(), json!(c.model_max_length));
        m.insert("clean_up_tokenization_spaces".into(), json!(c.clean_up_tokenization_spaces));
        // The class decides the pipeline transformers runs: a GPT-2 rebuild keeps its class (the saved
        // tokenizer.json already holds the rebuilt pipeline, so a second rebuild changes nothing).
        let class = match (self.backend(), &c.tokenizer_class) {
            (Backend::Gpt2, Some(name)) => name.clone(),
            _ => "TokenizersBackend".to_string(),
        };
        m.insert("tokenizer_class".into(), json!(class));
        if c.add_prefix_space {
            m.insert("add_prefix_space".into(), json!(true));
        }
        if c.split_special_tokens {
            m.insert("split_special_tokens".into(), json!(true));
        }
        for (key, side) in [("padding_side", self.padding_side()), ("truncation_side", self.truncation_side())] {
            if side != Side::Right {
                m.insert(key.into(), json!(side.as_str()));
            }
        }
        if let Some(p) = processor_class {
            m.insert("processor_class".into(), json!(p));
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smolvlm() -> Tokenizer {
        Tokenizer::from_dir("tests/fixtures/tokenizer/smolvlm").unwrap()
    }

    #[test]
    fn add_tokens_appends_new_ones_only() {
        let mut t = smolvlm();
        let n = t.len();
        let added = t.add_special_tokens(
            &[("eos_token".into(), "<eot>".into())],
            &["<image>".into(), "<new_a>".into(), "<new_b>".into()],
            false,
        );
        assert_eq!(added.unwrap(), 3); // <eot>, <new_a>, <new_b>; <image> exists
        assert_eq!(t.len(), n + 3);
        assert_eq!(t.convert_tokens_to_ids("<eot>"), Some(n as u32));
        assert_eq!(t.convert_tokens_to_ids("<new_b>"), Some(n as u32 + 2));
        assert_eq!(t.eos_token(), Some("<eot>"));
        assert_eq!(t.extra_special_tokens().len(), 5); // extended
        assert_eq!(t.encode("a<new_a>b", false).unwrap()[1], n as u32 + 1);
        assert_eq!(t.decode(&[n as u32 + 1], true, None).unwrap(), "");
        t.add_special_tokens(&[], &["<new_b>".into()], true).unwrap();
        assert_eq!(t.extra_special_tokens(), &["<new_b>".to_string()]); // replaced
        assert!(t.add_special_tokens(&[("image_tok".into(), "x".into())], &[], true).is_err());
        assert_eq!(t.add_tokens(&["plain".into()], false), 1);
    }

    #[test]
    fn saved_files_load_back_the_same() {
        let mut t = smolvlm();
        t.add_special_tokens(&[], &["<zzz>".into()], false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        t.save_tokenizer_json(dir.path()).unwrap();
        let mut cfg = t.config_json(Some("Idefics3Processor"));
        cfg["model_max_length"] = json!(8192);
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let back = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(back.len(), t.len());
        let text = "User:<image>  12 tokens<zzz>\n<end_of_utterance>";
        assert_eq!(back.encode(text, false).unwrap(), t.encode(text, false).unwrap());
        assert_eq!(back.special_tokens_map(), t.special_tokens_map());
        assert_eq!(back.extra_special_tokens(), t.extra_special_tokens());
        assert_eq!(back.truncation_side(), Side::Left);
        assert_eq!(cfg["tokenizer_class"], "GPT2Tokenizer");
    }
}
