//! A tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata (a GGUF has no
//! `tokenizer.json`), for byte-level BPE vocabularies (`tokenizer.ggml.model` "gpt2": SmolLM2,
//! Llama 3, Qwen2, ...).
//!
//! What is built, and where it comes from:
//! - model: BPE over `tokens` (ids = positions) and `merges` ("a b" pairs, best first). A token not
//!   spelled in the byte-level alphabet is re-spelled from its UTF-8 bytes, as transformers'
//!   `byte_level_tokenizer` does.
//! - pre-tokenizer from `tokenizer.ggml.pre`, as llama.cpp splits text for that vocabulary:
//!   "smollm" is SmolLM2's `Digits(individual_digits) + ByteLevel` (llama.cpp: `\p{N}` first, then
//!   GPT-2's regex), the same as SmolLM2's and SmolVLM's hub `tokenizer.json`; "gpt2"/"default"
//!   (or no key) plain GPT-2 `ByteLevel`; "llama-bpe" (Llama 3) and "qwen2" families their split
//!   regex before a regex-less `ByteLevel` (transformers' `GGUF_PRE_TOKENIZER_SPLITS`). Others are
//!   refused rather than guessed. transformers maps "smollm" to plain `ByteLevel`, which differs
//!   from the hub tokenizer when two or more spaces precede a digit ("a  1").
//! - added tokens: type 3 (control) as special tokens (skipped when not spelled in the byte
//!   alphabet: a llama.cpp mislabel, as transformers does), type 4 (user defined) as plain added
//!   tokens; then bos/eos/unk/pad as special tokens when not added yet.
//! - decoder `ByteLevel`; no normalizer; BOS/EOS added only when `add_bos_token` / `add_eos_token`
//!   say so (SmolLM2: neither).

use std::collections::HashSet;
use std::path::Path;

use serde_json::{json, Value};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::checkpoint::{GgufFile, GgufValue};
use crate::data::tokenizer::{Backend, Tokenizer};
use crate::data::tokenizer_config::{AddedTokenSpec, TokenizerConfig};
use crate::error::{CheckpointError, DataError, Error, Result};

/// Llama 3's split regex (llama.cpp "llama-bpe" and friends).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// A tokenizer built from a GGUF file, with what the file says about using it.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token` (false when absent).
    pub add_bos_token: bool,
    pub add_eos_token: bool,
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable bytes stand for themselves,
/// the others for the characters from U+0100 on, in byte order.
pub fn byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let b = b as u32;
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    out
}

fn tok_err(file: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data(DataError::Tokenizer(format!("{}: {msg}", file.display())))
}

/// The pre-tokenizer llama.cpp uses for the vocabulary `pre` (see the module docs).
fn pre_tokenizer(pre: Option<&str>, file: &Path) -> Result<PreTokenizerWrapper> {
    let byte_level = |regex: bool| PreTokenizerWrapper::from(ByteLevel::new(false, true, regex));
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| tok_err(file, format!("cannot compile the split regex: {e}")))?;
        Ok(PreTokenizerWrapper::from(Sequence::new(vec![s.into(), byte_level(false)])))
    };
    match pre {
        None | Some("default") | Some("gpt2") => Ok(byte_level(true)),
        Some("smollm") => Ok(PreTokenizerWrapper::from(Sequence::new(vec![Digits::new(true).into(), byte_level(true)]))),
        Some("llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3") => split(LLAMA3_SPLIT),
        Some("qwen2" | "deepseek-r1-qwen") => split(QWEN2_SPLIT),
        Some(other) => Err(CheckpointError::GgufUnsupported {
            file: file.to_path_buf(),
            what: format!(
                "pre-tokenizer '{other}' (tokenizer.ggml.pre; read: default, gpt2, smollm, llama-bpe, llama3, qwen2, ...)"
            ),
        }
        .into()),
    }
}

/// Builds the tokenizer of `file` (see the module docs). Errors name the file and key.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<GgufTokenizer> {
    let path = file.path();
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(CheckpointError::GgufUnsupported {
            file: path.to_path_buf(),
            what: format!(
                "tokenizer model '{model}' (tokenizer.ggml.model; only 'gpt2' byte-level BPE is rebuilt, \
                 not SentencePiece 'llama' or others)"
            ),
        }
        .into());
    }
    let tokens = file.get("tokenizer.ggml.tokens", GgufValue::as_str_array)?;
    if u32::try_from(tokens.len()).is_err() {
        return Err(tok_err(path, format!("{} tokens: more than u32 ids can number", tokens.len())));
    }
    let types = file.get_opt("tokenizer.ggml.token_type", GgufValue::as_int_array)?.unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(CheckpointError::GgufMetadata {
            file: path.to_path_buf(),
            key: "tokenizer.ggml.token_type".into(),
            expected: format!("one type per token ({})", tokens.len()),
            found: format!("{} types", types.len()),
        }
        .into());
    }
    let merges_raw = file.get("tokenizer.ggml.merges", GgufValue::as_str_array)?;

    let alphabet = byte_alphabet();
    let spelled: HashSet<char> = alphabet.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| spelled.contains(&c));
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        let key = if in_alphabet(t) { t.clone() } else { t.bytes().map(|b| alphabet[b as usize]).collect() };
        vocab.insert(key, id as u32);
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let mut parts = m.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(CheckpointError::GgufMetadata {
                    file: path.to_path_buf(),
                    key: format!("tokenizer.ggml.merges[{i}]"),
                    expected: "two tokens separated by one space".into(),
                    found: format!("{m:?}"),
                }
                .into())
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .build()
        .map_err(|e| tok_err(path, format!("cannot build the BPE model from tokenizer.ggml.tokens/merges: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = file.get_opt("tokenizer.ggml.pre", GgufValue::as_str)?;
    inner.with_pre_tokenizer(Some(pre_tokenizer(pre, path)?));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));

    // Control tokens (special), then user-defined ones (plain added tokens).
    let typed = |want: i64| tokens.iter().zip(&types).enumerate().filter(move |(_, (_, &ty))| ty == want);
    let mut added_specs = Vec::new();
    let mut control = Vec::new();
    for (id, (t, _)) in typed(CONTROL).filter(|(_, (t, _))| in_alphabet(t)) {
        control.push(AddedToken::from(t.clone(), true).normalized(false));
        added_specs.push(spec(id as u32, t, true));
    }
    inner.add_special_tokens(&control);
    let mut user = Vec::new();
    for (id, (t, _)) in typed(USER_DEFINED).filter(|(_, (t, _))| vocab.contains_key(t.as_str())) {
        user.push(AddedToken::from(t.clone(), false).normalized(false));
        added_specs.push(spec(id as u32, t, false));
    }
    inner.add_tokens(&user);

    // Named special tokens by id.
    let mut config = TokenizerConfig::default();
    let mut known: HashSet<String> = control.iter().map(|t| t.content.clone()).collect();
    let mut extra = Vec::new();
    let mut ids: Vec<(&str, String, u32)> = Vec::new();
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        let Some(id) = file.get_opt(key, GgufValue::as_usize)? else { continue };
        let token = tokens.get(id).ok_or_else(|| CheckpointError::GgufMetadata {
            file: path.to_path_buf(),
            key: key.into(),
            expected: format!("a token id below {}", tokens.len()),
            found: id.to_string(),
        })?;
        config.named_special.push((name.to_string(), token.clone()));
        ids.push((name, token.clone(), id as u32));
        if known.insert(token.clone()) {
            extra.push(AddedToken::from(token.clone(), true));
        }
    }
    if !extra.is_empty() {
        inner.add_tokens(&extra);
    }
    added_specs.sort_by_key(|s| s.id);
    config.added_tokens_decoder = added_specs;

    let flag = |key: &str| file.get_opt(key, GgufValue::as_bool).map(|b| b.unwrap_or(false));
    let (add_bos_token, add_eos_token) = (flag("tokenizer.ggml.add_bos_token")?, flag("tokenizer.ggml.add_eos_token")?);
    if let Some(post) = post_processor(&ids, add_bos_token, add_eos_token)? {
        inner.with_post_processor(Some(post));
    }
    let chat_template = file.get_opt("tokenizer.chat_template", GgufValue::as_str)?.map(str::to_string);
    Ok(GgufTokenizer {
        tokenizer: Tokenizer::from_parts(inner, config, path.to_path_buf(), Backend::TokenizerJson),
        chat_template,
        add_bos_token,
        add_eos_token,
    })
}

fn spec(id: u32, content: &str, special: bool) -> AddedTokenSpec {
    AddedTokenSpec {
        id,
        content: content.to_string(),
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special,
    }
}

/// `<bos> $A <eos>` (each part only when asked for and the token is known), as transformers'
/// `update_post_processor` writes it; `None` when nothing is added. Built through serde rather than
/// the template strings, so that any token text (spaces, ':' or '$' in it) is taken literally.
fn post_processor(named: &[(&str, String, u32)], add_bos: bool, add_eos: bool) -> Result<Option<PostProcessorWrapper>> {
    let token = |name: &str, on: bool| {
        let (_, t, id) = named.iter().find(|(k, _, _)| *k == name)?;
        on.then(|| (t.clone(), *id))
    };
    let (bos, eos) = (token("bos_token", add_bos), token("eos_token", add_eos));
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let special = |t: &Option<(String, u32)>, ty: u32| {
        t.iter().map(move |(s, _)| json!({"SpecialToken": {"id": s, "type_id": ty}})).collect::<Vec<_>>()
    };
    let seq = |id: &str, ty: u32| json!({"Sequence": {"id": id, "type_id": ty}});
    let single: Vec<Value> = [special(&bos, 0), vec![seq("A", 0)], special(&eos, 0)].concat();
    let pair: Vec<Value> = [single.clone(), special(&bos, 1), vec![seq("B", 1)], special(&eos, 1)].concat();
    let specials: serde_json::Map<String, Value> =
        bos.iter().chain(eos.iter()).map(|(s, id)| (s.clone(), json!({"id": s, "ids": [id], "tokens": [s]}))).collect();
    let v = json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials});
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| Error::Data(DataError::Tokenizer(format!("cannot build the BOS/EOS post-processor: {e}"))))
}

impl Tokenizer {
    /// The tokenizer of the GGUF file at `path` (see [`tokenizer_from_gguf`]).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<GgufTokenizer> {
        tokenizer_from_gguf(&GgufFile::open(path)?)
    }
}
