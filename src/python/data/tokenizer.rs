//! Bindings of `crate::data::tokenizer` (+ batch encoding).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::data::tokenizer::Tokenizer;
use crate::data::tokenizer_batch::{EncodeOptions, Padding};
use crate::data::tokenizer_config::Side;
use crate::error::{input_err, Error};
use crate::python::errors::guard;

fn side(s: Option<&str>, what: &str) -> Result<Option<Side>, Error> {
    match s {
        None => Ok(None),
        Some(v) => Side::parse(v)
            .map(Some)
            .map_or_else(|| input_err(format!("{what} must be 'left' or 'right', got '{v}'")), Ok),
    }
}

/// A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json).
/// Per row: token ids and attention mask.
type IdsAndMasks = (Vec<Vec<u32>>, Vec<Vec<u32>>);

#[pyclass(name = "Tokenizer", module = "ferrovlm._core")]
pub struct PyTokenizer {
    inner: Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    #[staticmethod]
    #[pyo3(signature = (dir, model_type=None))]
    fn from_dir(dir: PathBuf, model_type: Option<&str>) -> PyResult<Self> {
        guard(|| Ok(PyTokenizer { inner: Tokenizer::from_dir_with_model_type(&dir, model_type)? }))
    }

    /// The tokenizer of a GGUF file (`tokenizer.ggml.*`) and its `tokenizer.chat_template`.
    #[staticmethod]
    fn from_gguf(path: PathBuf) -> PyResult<(Self, Option<String>)> {
        guard(|| {
            let g = Tokenizer::from_gguf(&path)?;
            Ok((PyTokenizer { inner: g.tokenizer }, g.chat_template))
        })
    }

    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        guard(|| self.inner.encode(text, add_special_tokens))
    }

    /// Returns (input_ids, attention_mask) per sample.
    #[pyo3(signature = (texts, add_special_tokens=true, padding="do_not_pad", truncation=false, max_length=None, pad_to_multiple_of=None, padding_side=None, truncation_side=None))]
    #[allow(clippy::too_many_arguments)]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        add_special_tokens: bool,
        padding: &str,
        truncation: bool,
        max_length: Option<usize>,
        pad_to_multiple_of: Option<usize>,
        padding_side: Option<&str>,
        truncation_side: Option<&str>,
    ) -> PyResult<IdsAndMasks> {
        let opts = guard(|| {
            Ok(EncodeOptions {
                add_special_tokens,
                padding: match padding {
                    "do_not_pad" => Padding::DoNotPad,
                    "longest" => Padding::Longest,
                    "max_length" => Padding::MaxLength,
                    other => {
                        return input_err(format!(
                            "padding must be True/False, 'longest', 'max_length' or 'do_not_pad', got '{other}'"
                        ))
                    }
                },
                truncation,
                max_length,
                pad_to_multiple_of,
                padding_side: side(padding_side, "padding_side")?,
                truncation_side: side(truncation_side, "truncation_side")?,
            })
        })?;
        let inner = &self.inner;
        let enc = py.detach(|| guard(|| inner.encode_with(&texts, &opts)))?;
        Ok((enc.input_ids, enc.attention_mask))
    }

    fn tokenize(&self, text: &str) -> PyResult<Vec<String>> {
        guard(|| self.inner.tokenize(text))
    }

    #[pyo3(signature = (ids, skip_special_tokens=false, clean_up_tokenization_spaces=None))]
    fn decode(
        &self,
        ids: Vec<u32>,
        skip_special_tokens: bool,
        clean_up_tokenization_spaces: Option<bool>,
    ) -> PyResult<String> {
        guard(|| self.inner.decode(&ids, skip_special_tokens, clean_up_tokenization_spaces))
    }

    #[pyo3(signature = (batch, skip_special_tokens=false, clean_up_tokenization_spaces=None))]
    fn batch_decode(
        &self,
        batch: Vec<Vec<u32>>,
        skip_special_tokens: bool,
        clean_up_tokenization_spaces: Option<bool>,
    ) -> PyResult<Vec<String>> {
        guard(|| self.inner.batch_decode(&batch, skip_special_tokens, clean_up_tokenization_spaces))
    }

    fn convert_tokens_to_ids(&self, token: &str) -> Option<u32> {
        self.inner.convert_tokens_to_ids(token)
    }

    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn convert_ids_to_tokens(&self, ids: Vec<u32>, skip_special_tokens: bool) -> Vec<Option<String>> {
        self.inner.convert_ids_to_tokens(&ids, skip_special_tokens)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// (name, token) pairs: bos_token, eos_token, pad_token, ...
    #[getter]
    fn special_tokens_map(&self) -> Vec<(String, String)> {
        self.inner.special_tokens_map().to_vec()
    }

    #[getter]
    fn extra_special_tokens(&self) -> Vec<String> {
        self.inner.extra_special_tokens().to_vec()
    }

    #[getter]
    fn all_special_tokens(&self) -> Vec<String> {
        self.inner.all_special_tokens()
    }

    #[getter]
    fn all_special_ids(&self) -> Vec<u32> {
        self.inner.all_special_ids()
    }

    /// (id, content, special) of the added tokens.
    #[getter]
    fn added_tokens(&self) -> Vec<(u32, String, bool)> {
        self.inner.added_tokens()
    }

    #[getter]
    fn padding_side(&self) -> &'static str {
        self.inner.padding_side().as_str()
    }

    #[setter]
    fn set_padding_side(&mut self, value: &str) -> PyResult<()> {
        let s = guard(|| side(Some(value), "padding_side"))?;
        if let Some(s) = s {
            self.inner.set_padding_side(s);
        }
        Ok(())
    }

    #[getter]
    fn truncation_side(&self) -> &'static str {
        self.inner.truncation_side().as_str()
    }

    #[setter]
    fn set_truncation_side(&mut self, value: &str) -> PyResult<()> {
        let s = guard(|| side(Some(value), "truncation_side"))?;
        if let Some(s) = s {
            self.inner.set_truncation_side(s);
        }
        Ok(())
    }

    #[getter]
    fn model_max_length(&self) -> Option<usize> {
        self.inner.model_max_length()
    }

    #[getter]
    fn clean_up_tokenization_spaces(&self) -> bool {
        self.inner.clean_up_tokenization_spaces()
    }

    /// An independent copy (tokens added to it do not change this one).
    fn copy(&self) -> Self {
        PyTokenizer { inner: self.inner.clone() }
    }

    /// `add_tokens`: appends the tokens not in the vocabulary yet; returns how many were new.
    #[pyo3(signature = (tokens, special=false))]
    fn add_tokens(&mut self, tokens: Vec<String>, special: bool) -> usize {
        self.inner.add_tokens(&tokens, special)
    }

    /// `add_special_tokens`: (name, token) pairs for bos_token, eos_token, ...; `extra` replaces (or,
    /// without `replace_extra`, extends) the extra special tokens. Returns how many tokens were new.
    #[pyo3(signature = (named, extra, replace_extra=true))]
    fn add_special_tokens(
        &mut self,
        named: Vec<(String, String)>,
        extra: Vec<String>,
        replace_extra: bool,
    ) -> PyResult<usize> {
        guard(|| self.inner.add_special_tokens(&named, &extra, replace_extra))
    }

    /// Writes `tokenizer.json` into `dir`.
    fn save_tokenizer_json(&self, dir: PathBuf) -> PyResult<()> {
        guard(|| self.inner.save_tokenizer_json(&dir))
    }

    /// The `tokenizer_config.json` object transformers writes, as JSON (`model_max_length` null when
    /// unbounded).
    #[pyo3(signature = (processor_class=None))]
    fn config_json(&self, processor_class: Option<&str>) -> String {
        self.inner.config_json(processor_class).to_string()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    Ok(())
}
