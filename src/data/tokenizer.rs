//! The text tokenizer: `tokenizer.json` plus `tokenizer_config.json`, behaving like transformers 5.x's
//! `AutoTokenizer` for SmolVLM / Idefics3 checkpoints.
//!
//! What transformers does, and this module mirrors:
//! - No BOS/EOS is added: `tokenizer.json`'s post-processor is used as is (SmolVLM's is `null`);
//!   `add_bos_token` in `tokenizer_config.json` is ignored when `tokenizer.json` exists.
//! - Backend selection: a folder whose `tokenizer_config.json` says `GPT2Tokenizer` (SmolVLM's does) is
//!   rebuilt from the BPE vocab/merges with a plain `ByteLevel` pre-tokenizer (dropping SmolLM2's
//!   `Digits` step), unless the model type maps to a generic backend: `config.json` with
//!   `model_type: "smolvlm"` (SmolVLM2) keeps `tokenizer.json`'s pipeline; `"idefics3"` (SmolVLM v1)
//!   or no `config.json` gets the rebuild. The two differ only around runs of spaces before digits.
//! - Added tokens from `added_tokens_decoder` and missing special tokens are added to the vocabulary.
//! - `decode(..., clean_up_tokenization_spaces=True)` is ignored for BPE models (transformers 5.24
//!   skips that cleanup for BPE unless `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`).
//! - `convert_tokens_to_ids` gives the unk id for unknown tokens (`None` without an unk token);
//!   `convert_ids_to_tokens` gives `None` for ids outside the vocabulary.

use std::collections::HashSet;
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper};

use crate::data::chat_template_value::TemplateValue;
pub use crate::data::tokenizer_config::{AddedTokenSpec, Side, TokenizerConfig};
use crate::error::{DataError, Error, Result};

fn tok_err(msg: impl Into<String>) -> Error {
    Error::Data(DataError::Tokenizer(msg.into()))
}

/// Which text pipeline the tokenizer runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `tokenizer.json` as written (transformers' `TokenizersBackend`).
    TokenizerJson,
    /// transformers' `GPT2Tokenizer`: BPE + `ByteLevel` pre-tokenizer/decoder, no normalizer.
    Gpt2,
}

/// A tokenizer loaded from a checkpoint folder.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub(crate) inner: tokenizers::Tokenizer,
    pub(crate) config: TokenizerConfig,
    pub(crate) path: PathBuf,
    pub(crate) padding_side: Side,
    pub(crate) truncation_side: Side,
    backend: Backend,
    is_bpe: bool,
}

/// `model_type` from `dir/config.json`, if that file exists.
fn read_model_type(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| tok_err(format!("{}: cannot read: {e}", path.display())))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| tok_err(format!("{}: invalid JSON: {e}", path.display())))?;
    Ok(value.get("model_type").and_then(|v| v.as_str()).map(str::to_string))
}

/// transformers 5.24's AutoTokenizer choice for the classes ferrovlm meets.
fn choose_backend(config: &TokenizerConfig, model_type: Option<&str>, is_bpe: bool) -> Backend {
    let class = config.tokenizer_class.as_deref().map(|c| c.strip_suffix("Fast").unwrap_or(c));
    // "smolvlm" is registered with the generic TokenizersBackend, which wins over the declared class.
    if config.has_auto_map || !is_bpe || class != Some("GPT2Tokenizer") || model_type == Some("smolvlm") {
        Backend::TokenizerJson
    } else {
        Backend::Gpt2
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and `dir/tokenizer_config.json` (and `config.json`'s `model_type`
    /// for the backend choice). A missing or corrupt `tokenizer.json` is a [`DataError::Tokenizer`]
    /// naming the path.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let model_type = read_model_type(dir)?;
        Self::from_dir_with_model_type(dir, model_type.as_deref())
    }

    /// Like [`Tokenizer::from_dir`] with an explicit model type (`None`: as without `config.json`).
    pub fn from_dir_with_model_type(dir: impl AsRef<Path>, model_type: Option<&str>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(tok_err(format!(
                "{}: not found (ferrovlm needs the fast tokenizer file tokenizer.json; slow-only vocab.json/merges.txt folders are not supported)",
                path.display()
            )));
        }
        let config = TokenizerConfig::load(dir)?;
        // The tokenizers library panics on some malformed files (`expect` in its deserializers, e.g.
        // a decoder nested deeper than serde_json's recursion limit): an error, not a crash.
        let mut inner = catch_unwind(|| tokenizers::Tokenizer::from_file(&path))
            .map_err(|p| {
                let msg =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                tok_err(format!(
                    "{}: cannot load the tokenizer: the file is malformed ({})",
                    path.display(),
                    msg.unwrap_or_default()
                ))
            })?
            .map_err(|e| tok_err(format!("{}: cannot load the tokenizer: {e}", path.display())))?;
        let is_bpe = matches!(inner.get_model(), ModelWrapper::BPE(_));
        let backend = choose_backend(&config, model_type, is_bpe);
        if backend == Backend::Gpt2 {
            inner.with_normalizer(None::<NormalizerWrapper>);
            inner.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
                config.add_prefix_space,
                true,
                true,
            ))));
            inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        }
        // Padding/truncation stored in tokenizer.json only provide defaults; calls pass their own.
        let json_trunc_side = inner.get_truncation().map(|t| match t.direction {
            tokenizers::TruncationDirection::Left => Side::Left,
            tokenizers::TruncationDirection::Right => Side::Right,
        });
        let json_pad_side = inner.get_padding().map(|p| match p.direction {
            tokenizers::PaddingDirection::Left => Side::Left,
            tokenizers::PaddingDirection::Right => Side::Right,
        });
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(format!("{}: cannot reset truncation: {e}", path.display())))?;

        // Added tokens declared by the config that the backend lacks, then missing special tokens.
        let existing: HashSet<AddedToken> = inner.get_added_tokens_decoder().into_values().collect();
        let mut to_add: Vec<AddedToken> = Vec::new();
        for spec in &config.added_tokens_decoder {
            let token = AddedToken::from(spec.content.clone(), spec.special)
                .single_word(spec.single_word)
                .lstrip(spec.lstrip)
                .rstrip(spec.rstrip)
                .normalized(spec.normalized);
            // Same test as transformers' repr comparison: content and every flag.
            if !existing.contains(&token) {
                to_add.push(token);
            }
        }
        let mut known: HashSet<String> = existing.iter().map(|t| t.content.clone()).collect();
        known.extend(to_add.iter().map(|t| t.content.clone()));
        for content in config.named_special.iter().map(|(_, t)| t).chain(config.extra_special.iter()) {
            if known.insert(content.clone()) {
                to_add.push(AddedToken::from(content.clone(), true));
            }
        }
        if !to_add.is_empty() {
            inner.add_tokens(&to_add);
        }
        inner.set_encode_special_tokens(config.split_special_tokens);

        Ok(Tokenizer {
            padding_side: config.padding_side.or(json_pad_side).unwrap_or(Side::Right),
            truncation_side: config.truncation_side.or(json_trunc_side).unwrap_or(Side::Right),
            inner,
            config,
            path,
            backend,
            is_bpe,
        })
    }

    /// A tokenizer assembled elsewhere (e.g. from GGUF metadata, `tokenizer_gguf.rs`): `inner` with
    /// padding and truncation off, `config` as if read from `tokenizer_config.json`; `path` names
    /// the source in errors.
    pub(crate) fn from_parts(
        inner: tokenizers::Tokenizer,
        config: TokenizerConfig,
        path: PathBuf,
        backend: Backend,
    ) -> Self {
        let is_bpe = matches!(inner.get_model(), ModelWrapper::BPE(_));
        Tokenizer {
            padding_side: config.padding_side.unwrap_or(Side::Right),
            truncation_side: config.truncation_side.unwrap_or(Side::Right),
            inner,
            config,
            path,
            backend,
            is_bpe,
        }
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The parsed `tokenizer_config.json`.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// Which text pipeline runs (see the module docs).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Token ids of `text`. With `add_special_tokens`, the post-processor's tokens are added
    /// (none for SmolVLM: no BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(format!("{}: cannot encode the text: {e}", self.path.display())))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of each text (no padding; see [`Tokenizer::encode_with`] for padded batches).
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        texts
            .par_iter()
            .enumerate()
            .map(|(i, t)| self.encode(t.as_ref(), add_special_tokens).map_err(|e| tok_err(format!("sample {i}: {e}"))))
            .collect()
    }

    /// The token strings of `text` (`tokenizer.tokenize`, no special tokens added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<String>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(format!("{}: cannot encode the text: {e}", self.path.display())))?;
        Ok(enc.get_tokens().to_vec())
    }

    /// Text of `ids`. `clean_up_tokenization_spaces: None` uses the config's value; the cleanup
    /// (`" ." -> "."`, `" n't" -> "n't"`, ...) only runs for non-BPE models or when the config forces it.
    pub fn decode(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
        clean_up_tokenization_spaces: Option<bool>,
    ) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(format!("{}: cannot decode ids: {e}", self.path.display())))?;
        let clean = clean_up_tokenization_spaces.unwrap_or(self.config.clean_up_tokenization_spaces);
        if clean && (!self.is_bpe || self.config.force_bpe_cleanup) {
            return Ok(clean_up_tokenization(&text));
        }
        Ok(text)
    }

    /// [`Tokenizer::decode`] for each sequence.
    pub fn batch_decode<S: AsRef<[u32]>>(
        &self,
        batch: &[S],
        skip_special_tokens: bool,
        clean_up_tokenization_spaces: Option<bool>,
    ) -> Result<Vec<String>> {
        batch.iter().map(|ids| self.decode(ids.as_ref(), skip_special_tokens, clean_up_tokenization_spaces)).collect()
    }

    /// Id of `token` (added tokens included). Unknown tokens give the unk token's id, or `None` when the
    /// tokenizer has no unk token (transformers returns `None` then).
    pub fn convert_tokens_to_ids(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token).or_else(|| self.unk_token_id())
    }

    /// Token strings of `ids` (`None` for ids outside the vocabulary). With `skip_special_tokens`, the
    /// ids of [`Tokenizer::all_special_tokens`] are dropped (only those: other special added tokens stay,
    /// unlike in [`Tokenizer::decode`]).
    pub fn convert_ids_to_tokens(&self, ids: &[u32], skip_special_tokens: bool) -> Vec<Option<String>> {
        let skip: HashSet<u32> =
            if skip_special_tokens { self.all_special_ids().into_iter().collect() } else { HashSet::new() };
        ids.iter().filter(|id| !skip.contains(id)).map(|&id| self.inner.id_to_token(id)).collect()
    }

    /// `len(tokenizer)`: vocabulary size including added tokens.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `tokenizer.vocab_size`: the base model's vocabulary without added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    /// Added tokens by id: `(id, content, special)`, sorted by id.
    pub fn added_tokens(&self) -> Vec<(u32, String, bool)> {
        let mut out: Vec<(u32, String, bool)> =
            self.inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content, t.special)).collect();
        out.sort_by_key(|t| t.0);
        out
    }

    /// `special_tokens_map`: named special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...,
    /// then model-specific ones), what chat templates receive as variables.
    pub fn special_tokens_map(&self) -> &[(String, String)] {
        &self.config.named_special
    }

    /// The special tokens map as chat-template variables.
    pub fn template_variables(&self) -> Vec<(String, TemplateValue)> {
        self.config.named_special.iter().map(|(k, v)| (k.clone(), TemplateValue::from(v.as_str()))).collect()
    }

    /// A named special token (`"bos_token"`, `"eos_token"`, `"pad_token"`, `"unk_token"`, or a
    /// model-specific name like `"image_token"`).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.config.named_special.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn named_id(&self, name: &str) -> Option<u32> {
        self.special_token(name).and_then(|t| self.convert_tokens_to_ids(t))
    }

    /// The BOS token (`<|im_start|>` for SmolVLM; never added automatically).
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }
    /// The EOS token (`<end_of_utterance>` for SmolVLM).
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }
    /// The padding token (`<|im_end|>` for SmolVLM).
    pub fn pad_token(&self) -> Option<&str> {
        self.special_token("pad_token")
    }
    /// The unknown token (`<|endoftext|>` for SmolVLM).
    pub fn unk_token(&self) -> Option<&str> {
        self.special_token("unk_token")
    }
    /// Id of the BOS token.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.named_id("bos_token")
    }
    /// Id of the EOS token.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.named_id("eos_token")
    }
    /// Id of the padding token.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.named_id("pad_token")
    }
    /// Id of the unknown token (no unk fallback: `None` if the unk token itself is missing).
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token().and_then(|t| self.inner.token_to_id(t))
    }

    /// Extra special tokens (`additional_special_tokens`), in order.
    pub fn extra_special_tokens(&self) -> &[String] {
        &self.config.extra_special
    }

    /// Ids of [`Tokenizer::extra_special_tokens`].
    pub fn extra_special_tokens_ids(&self) -> Vec<u32> {
        self.config.extra_special.iter().filter_map(|t| self.convert_tokens_to_ids(t)).collect()
    }

    /// `all_special_tokens`: named then extra special tokens, without duplicates.
    pub fn all_special_tokens(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.config.named_special.iter().map(|(_, t)| t).chain(self.config.extra_special.iter()) {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }

    /// `all_special_ids`: ids of [`Tokenizer::all_special_tokens`].
    pub fn all_special_ids(&self) -> Vec<u32> {
        self.all_special_tokens().iter().filter_map(|t| self.convert_tokens_to_ids(t)).collect()
    }

    /// Default padding side ("right" unless the config says otherwise).
    pub fn padding_side(&self) -> Side {
        self.padding_side
    }
    /// Changes the default padding side (`tokenizer.padding_side = "left"`).
    pub fn set_padding_side(&mut self, side: Side) {
        self.padding_side = side;
    }
    /// Default truncation side.
    pub fn truncation_side(&self) -> Side {
        self.truncation_side
    }
    /// Changes the default truncation side.
    pub fn set_truncation_side(&mut self, side: Side) {
        self.truncation_side = side;
    }
    /// `model_max_length`; `None` when unbounded.
    pub fn model_max_length(&self) -> Option<usize> {
        self.config.model_max_length
    }
    /// `clean_up_tokenization_spaces` from the config.
    pub fn clean_up_tokenization_spaces(&self) -> bool {
        self.config.clean_up_tokenization_spaces
    }

    /// Number of tokens the post-processor adds to one sequence (0 for SmolVLM).
    pub fn num_special_tokens_to_add(&self) -> usize {
        use tokenizers::PostProcessor;
        self.inner.get_post_processor().map_or(0, |p| p.added_tokens(false))
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and English contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_rules() {
        assert_eq!(
            clean_up_tokenization("a . b ? c ! d , e ' f n't I 'm it 's we 've they 're"),
            "a. b? c! d, e'fn't I'm it's we've they're"
        );
    }

    #[test]
    fn backend_choice() {
        let mut cfg = TokenizerConfig { tokenizer_class: Some("GPT2TokenizerFast".into()), ..Default::default() };
        assert_eq!(choose_backend(&cfg, None, true), Backend::Gpt2);
        assert_eq!(choose_backend(&cfg, Some("idefics3"), true), Backend::Gpt2);
        assert_eq!(choose_backend(&cfg, Some("smolvlm"), true), Backend::TokenizerJson);
        assert_eq!(choose_backend(&cfg, None, false), Backend::TokenizerJson);
        cfg.tokenizer_class = Some("PreTrainedTokenizerFast".into());
        assert_eq!(choose_backend(&cfg, None, true), Backend::TokenizerJson);
    }
}
