//! How the text layers see a training micro-batch: as its full rows, or, for paired rows (DPO: row i
//! holds a prompt with its chosen completion and row P + i the same prompt with the rejected one), as
//! each pair's shared prefix once plus every row's suffix. The prefix (image tokens and prompt, most of
//! a DPO row) then runs once per pair instead of twice, in the forward, the recomputation and the
//! backward; the suffixes attend to their pair's prefix keys and values, so every output equals the
//! full-row computation (up to float summation order).

use std::sync::Arc;

use candle_core::{Result as CResult, Tensor};

use crate::error::Result;
use crate::model::text::{TextLayer, TextModel};
use crate::model::ForwardInput;
use crate::ops::Mask;

/// Prefixes shorter than this are not worth a second pass per layer.
const MIN_SHARED_PREFIX: usize = 8;

pub struct Rows {
    b: usize,
    l: usize,
    layout: Layout,
}

enum Layout {
    Full { mask: Mask, rope: (Tensor, Tensor) },
    Shared(Shared),
}

struct Shared {
    pairs: usize,
    /// Columns 0..lp of rows i and P + i are identical (ids, mask and embeddings).
    lp: usize,
    /// Prefix rows [P, Lp] (causal, their own padding).
    mask_p: Mask,
    /// Suffix rows [2P, Ls] over full-row keys [2P, Lp + Ls].
    mask_s: Mask,
    rope_p: (Tensor, Tensor),
    rope_s: (Tensor, Tensor),
}

/// Length of the prefix that rows i and P + i share (ids and attention mask), the minimum over pairs.
pub fn shared_prefix_len(ids: &[i64], mask: Option<&[i64]>, b: usize, l: usize) -> usize {
    if b == 0 || !b.is_multiple_of(2) {
        return 0;
    }
    let p = b / 2;
    let same = |r1: usize, r2: usize, t: usize| {
        ids[r1 * l + t] == ids[r2 * l + t] && mask.is_none_or(|m| m[r1 * l + t] == m[r2 * l + t])
    };
    (0..p).map(|i| (0..l).take_while(|&t| same(i, p + i, t)).count()).min().unwrap_or(0)
}

impl Rows {
    /// x0: the merged embeddings [B, L, H]. With `paired`, rows i and P + i share their common prefix
    /// when it is long enough and their embeddings there are equal (same images too).
    pub fn new(text: &TextModel, input: &ForwardInput, x0: &Tensor, paired: bool) -> Result<Self> {
        let (b, l) = (input.batch, input.seq_len);
        let dev = x0.device();
        let key_valid = match input.attention_mask {
            Some(m) if m.contains(&0) => Some(Arc::new(m.iter().map(|&v| v != 0).collect::<Vec<bool>>())),
            _ => None,
        };
        let positions = |rows: usize, from: usize, to: usize| -> CResult<Tensor> {
            let pos: Vec<u32> = (0..rows).flat_map(|_| from as u32..to as u32).collect();
            Tensor::from_vec(pos, (rows, to - from), dev)
        };
        let mut lp = if paired {
            shared_prefix_len(input.input_ids, input.attention_mask, b, l).min(l.saturating_sub(1))
        } else {
            0
        };
        if lp >= MIN_SHARED_PREFIX {
            let p = b / 2;
            let (first, second) = (x0.narrow(0, 0, p)?.narrow(1, 0, lp)?, x0.narrow(0, p, p)?.narrow(1, 0, lp)?);
            let differ = first.ne(&second)?.flatten_all()?.max(0)?.to_scalar::<u8>()? != 0;
            if differ {
                lp = 0; // the pair's images differ: nothing is shared
            }
        }
        if lp < MIN_SHARED_PREFIX {
            let rope = text.rope.cos_sin(&positions(b, 0, l)?, x0.dtype())?;
            return Ok(Rows { b, l, layout: Layout::Full { mask: Mask { causal: true, key_valid }, rope } });
        }
        let p = b / 2;
        let prefix_valid = key_valid
            .as_ref()
            .map(|kv| Arc::new((0..p).flat_map(|i| kv[i * l..i * l + lp].to_vec()).collect::<Vec<bool>>()));
        let shared = Shared {
            pairs: p,
            lp,
            mask_p: Mask { causal: true, key_valid: prefix_valid },
            mask_s: Mask { causal: true, key_valid },
            rope_p: text.rope.cos_sin(&positions(p, 0, lp)?, x0.dtype())?,
            rope_s: text.rope.cos_sin(&positions(b, lp, l)?, x0.dtype())?,
        };
        Ok(Rows { b, l, layout: Layout::Shared(shared) })
    }

    /// The shared prefix length (0: full rows).
    pub fn shared_prefix(&self) -> usize {
        match &self.layout {
            Layout::Full { .. } => 0,
            Layout::Shared(s) => s.lp,
        }
    }

    /// [B, L, H] -> the parts the layers run on: [x] or [prefix [P, Lp, H], suffixes [B, Ls, H]].
    pub fn split(&self, x: &Tensor) -> CResult<Vec<Tensor>> {
        match &self.layout {
            Layout::Full { .. } => Ok(vec![x.clone()]),
            Layout::Shared(s) => Ok(vec![
                x.narrow(0, 0, s.pairs)?.narrow(1, 0, s.lp)?.contiguous()?,
                x.narrow(1, s.lp, self.l - s.lp)?.contiguous()?,
            ]),
        }
    }

    /// One decoder layer over the parts.
    pub fn layer(&self, text: &TextModel, layer: &TextLayer, parts: &[Tensor]) -> CResult<Vec<Tensor>> {
        match &self.layout {
            Layout::Full { mask, rope } => {
                Ok(vec![text.layer_forward(layer, &parts[0], &rope.0, &rope.1, mask, None)?])
            }
            Layout::Shared(s) => {
                let (p, q) = text.layer_forward_shared_prefix(
                    layer, &parts[0], &parts[1], &s.rope_p, &s.rope_s, &s.mask_p, &s.mask_s,
                )?;
                Ok(vec![p, q])
            }
        }
    }

    /// The parts' rows stacked [T, H] (T = B * L, or P * Lp + B * Ls).
    pub fn stacked(&self, parts: &[Tensor]) -> CResult<Tensor> {
        let flat = parts.iter().map(|t| t.flatten_to(1)).collect::<CResult<Vec<_>>>()?;
        if flat.len() == 1 {
            return Ok(flat[0].clone());
        }
        Tensor::cat(&flat, 0)
    }

    /// Index into [`Self::stacked`] of token t of batch row b.
    pub fn stacked_row(&self, b: usize, t: usize) -> u32 {
        debug_assert!(b < self.b && t < self.l);
        match &self.layout {
            Layout::Full { .. } => (b * self.l + t) as u32,
            Layout::Shared(s) if t < s.lp => ((b % s.pairs) * s.lp + t) as u32,
            Layout::Shared(s) => (s.pairs * s.lp + b * (self.l - s.lp) + t - s.lp) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_is_the_minimum_over_pairs() {
        // 2 pairs of length 5: pair 0 agrees on 3 tokens, pair 1 on 4.
        let ids = [1, 2, 3, 4, 5, /**/ 1, 2, 7, 8, 9, /**/ 1, 2, 3, 9, 9, /**/ 1, 2, 7, 8, 0];
        assert_eq!(shared_prefix_len(&ids, None, 4, 5), 3);
        // A mask difference ends the shared prefix too.
        let mask = [1, 1, 1, 1, 1, /**/ 1, 1, 1, 1, 0, /**/ 1, 0, 1, 1, 1, /**/ 1, 1, 1, 1, 1];
        assert_eq!(shared_prefix_len(&ids, Some(&mask), 4, 5), 1);
        assert_eq!(shared_prefix_len(&ids[..15], None, 3, 5), 0);
    }
}
