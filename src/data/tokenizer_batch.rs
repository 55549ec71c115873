//! Batched encoding with padding and truncation, like `tokenizer(texts, padding=..., truncation=...,
//! max_length=..., pad_to_multiple_of=..., padding_side=...)` in transformers.
//!
//! Rules mirrored from transformers 5.x:
//! - `truncation` without `max_length` uses `model_max_length`; if that is unbounded, nothing is
//!   truncated. Truncation keeps room for the post-processor's special tokens and cuts on the
//!   tokenizer's `truncation_side` (or the one given).
//! - `Padding::MaxLength` without any length pads nothing; `Padding::Longest` pads to the longest
//!   sequence of the batch; `pad_to_multiple_of` rounds the target length up.
//! - Padding needs a pad token (an error otherwise); padded positions get the pad id and mask 0.

use crate::data::tokenizer::Tokenizer;
pub use crate::data::tokenizer_config::Side;
use crate::error::{DataError, Error, Result};

fn tok_err(msg: impl Into<String>) -> Error {
    Error::Data(DataError::Tokenizer(msg.into()))
}

/// Padding strategy (`padding=False | True/"longest" | "max_length"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// No padding (`padding=False`, the default).
    #[default]
    DoNotPad,
    /// Pad to the longest sequence of the batch (`padding=True` / `"longest"`).
    Longest,
    /// Pad to `max_length` (`padding="max_length"`).
    MaxLength,
}

/// Options of a batched encoding call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Let the post-processor add its special tokens (default true; SmolVLM adds none).
    pub add_special_tokens: bool,
    /// Padding strategy.
    pub padding: Padding,
    /// Truncate to `max_length` (or `model_max_length`).
    pub truncation: bool,
    /// Length limit for truncation and `Padding::MaxLength`.
    pub max_length: Option<usize>,
    /// Round the padded length up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// Padding side for this call (`None`: the tokenizer's).
    pub padding_side: Option<Side>,
    /// Truncation side for this call (`None`: the tokenizer's).
    pub truncation_side: Option<Side>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            add_special_tokens: true,
            padding: Padding::DoNotPad,
            truncation: false,
            max_length: None,
            pad_to_multiple_of: None,
            padding_side: None,
            truncation_side: None,
        }
    }
}

/// Token ids and attention masks of a batch (rows may differ in length without padding).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchEncoding {
    /// Token ids per sample.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for real tokens, 0 for padding, per sample.
    pub attention_mask: Vec<Vec<u32>>,
}

/// Keeps `max_len` tokens of `ids`, dropping from the end (`Side::Right`) or the start (`Side::Left`).
pub fn truncate(ids: &mut Vec<u32>, max_len: usize, side: Side) {
    if ids.len() > max_len {
        match side {
            Side::Right => ids.truncate(max_len),
            Side::Left => {
                ids.drain(..ids.len() - max_len);
            }
        }
    }
}

/// Pads every sequence to `target` (or the longest one when `target` is `None`), then up to a
/// multiple of `pad_to_multiple_of`; sequences already longer are left as they are.
pub fn pad(
    sequences: Vec<Vec<u32>>,
    pad_id: u32,
    target: Option<usize>,
    pad_to_multiple_of: Option<usize>,
    side: Side,
) -> BatchEncoding {
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let mut len = target.unwrap_or(longest);
    if let Some(m) = pad_to_multiple_of.filter(|&m| m > 0) {
        len = len.div_ceil(m) * m;
    }
    let mut out = BatchEncoding::default();
    for ids in sequences {
        let n = len.saturating_sub(ids.len());
        let (mut row, mut mask) = (Vec::with_capacity(ids.len() + n), Vec::with_capacity(ids.len() + n));
        if side == Side::Left {
            row.extend(std::iter::repeat_n(pad_id, n));
            mask.extend(std::iter::repeat_n(0, n));
        }
        mask.extend(std::iter::repeat_n(1, ids.len()));
        row.extend(ids);
        if side == Side::Right {
            row.extend(std::iter::repeat_n(pad_id, n));
            mask.extend(std::iter::repeat_n(0, n));
        }
        out.input_ids.push(row);
        out.attention_mask.push(mask);
    }
    out
}

impl Tokenizer {
    /// Encodes a batch with truncation and padding (see the module docs). Errors name the sample.
    pub fn encode_with<S: AsRef<str> + Sync>(&self, texts: &[S], options: &EncodeOptions) -> Result<BatchEncoding> {
        use rayon::prelude::*;
        let limit = options.max_length.or(self.model_max_length());
        let truncate_to = if options.truncation { limit } else { None };
        let trunc_side = options.truncation_side.unwrap_or(self.truncation_side());
        let n_added = if options.add_special_tokens { self.num_special_tokens_to_add() } else { 0 };
        let encode_one = |(i, text): (usize, &S)| -> Result<Vec<u32>> {
            let sample_err = |e: String| tok_err(format!("{}: sample {i}: {e}", self.path.display()));
            let mut enc =
                self.inner.encode(text.as_ref(), false).map_err(|e| sample_err(format!("cannot encode: {e}")))?;
            if let Some(max) = truncate_to {
                if max < n_added {
                    return Err(sample_err(format!(
                        "max_length {max} is shorter than the {n_added} special tokens the tokenizer adds"
                    )));
                }
                let direction = match trunc_side {
                    Side::Left => tokenizers::TruncationDirection::Left,
                    Side::Right => tokenizers::TruncationDirection::Right,
                };
                enc.truncate(max - n_added, 0, direction);
            }
            let enc = self
                .inner
                .post_process(enc, None, options.add_special_tokens)
                .map_err(|e| sample_err(format!("cannot add special tokens: {e}")))?;
            Ok(enc.get_ids().to_vec())
        };
        let sequences: Vec<Vec<u32>> = texts.par_iter().enumerate().map(encode_one).collect::<Result<_>>()?;
        let target = match options.padding {
            Padding::DoNotPad => None,
            Padding::Longest => Some(None),
            Padding::MaxLength => limit.map(Some),
        };
        match target {
            None => {
                let attention_mask = sequences.iter().map(|s| vec![1; s.len()]).collect();
                Ok(BatchEncoding { input_ids: sequences, attention_mask })
            }
            Some(target) => {
                let pad_id = self.pad_token_id().ok_or_else(|| {
                    tok_err(format!(
                        "{}: asking to pad but the tokenizer has no padding token (set pad_token, e.g. to the eos token)",
                        self.path.display()
                    ))
                })?;
                let side = options.padding_side.unwrap_or(self.padding_side());
                Ok(pad(sequences, pad_id, target, options.pad_to_multiple_of, side))
            }
        }
    }

    /// Pads already-tokenized sequences (`tokenizer.pad`): to the longest, or to `max_length` when given.
    pub fn pad(
        &self,
        sequences: Vec<Vec<u32>>,
        max_length: Option<usize>,
        pad_to_multiple_of: Option<usize>,
        side: Option<Side>,
    ) -> Result<BatchEncoding> {
        let pad_id = self.pad_token_id().ok_or_else(|| {
            tok_err(format!("{}: asking to pad but the tokenizer has no padding token", self.path.display()))
        })?;
        Ok(pad(sequences, pad_id, max_length, pad_to_multiple_of, side.unwrap_or(self.padding_side())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_and_truncate_helpers() {
        let b = pad(vec![vec![5, 6, 7], vec![8]], 0, None, None, Side::Left);
        assert_eq!(b.input_ids, vec![vec![5, 6, 7], vec![0, 0, 8]]);
        assert_eq!(b.attention_mask, vec![vec![1, 1, 1], vec![0, 0, 1]]);
        let b = pad(vec![vec![5, 6, 7], vec![8]], 9, Some(2), Some(4), Side::Right);
        assert_eq!(b.input_ids, vec![vec![5, 6, 7, 9], vec![8, 9, 9, 9]]);
        let mut ids = vec![1, 2, 3, 4];
        truncate(&mut ids, 2, Side::Left);
        assert_eq!(ids, vec![3, 4]);
        truncate(&mut ids, 1, Side::Right);
        assert_eq!(ids, vec![3]);
    }
}
