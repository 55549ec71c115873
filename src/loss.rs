//! Causal language-model loss at the label rows: logits at t predict token t+1, labels of -100 are
//! ignored. The one home of that rule: `VlmModel::forward`'s loss and every training objective
//! (`train::step`) find their label rows here and run the head only there, so the [B, L, V] logits
//! are never needed for a loss.

use candle_core::{DType, Tensor};

use crate::error::{input_err, Result};
use crate::ops::cross_entropy::cross_entropy_rows;
use crate::ops::Linear;

pub const IGNORE_INDEX: i64 = -100;

/// Label positions after the causal shift: (row index into the flattened [B*L] hidden states, target id).
pub fn shifted_targets(labels: &[i64], b: usize, l: usize, vocab: usize) -> Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    for bi in 0..b {
        for t in 0..l.saturating_sub(1) {
            let y = labels[bi * l + t + 1];
            if y == IGNORE_INDEX {
                continue;
            }
            if y < 0 || y as usize >= vocab {
                return input_err(format!(
                    "labels[{bi}, {}] = {y} is outside the vocabulary [0, {vocab}) and is not -100",
                    t + 1
                ));
            }
            out.push(((bi * l + t) as u32, y as u32));
        }
    }
    Ok(out)
}

/// The head's output at the label rows.
pub struct LabelLogits {
    /// [N, V] f32 logits (tracked; detach before reading values).
    pub logits: Tensor,
    /// [N] -log p(target), tracked.
    pub nll: Tensor,
}

/// The head at rows `at` of `flat` ([T, H], final-normed hidden states) and the cross-entropy of
/// each row against `targets` (one per row).
pub fn head_at_rows(flat: &Tensor, at: Vec<u32>, targets: &[u32], head: &Linear) -> Result<LabelLogits> {
    let n = at.len();
    let at = Tensor::from_vec(at, n, flat.device())?;
    let logits = head.forward(&flat.index_select(&at, 0)?)?.to_dtype(DType::F32)?; // [N, V]
    let nll = cross_entropy_rows(&logits, targets)?; // [N]
    Ok(LabelLogits { logits, nll })
}

/// Sum of -log p(target) over the label positions, and their count.
/// hidden: [B, L, H] (final-normed), head: the output projection.
pub fn causal_lm_loss_sum(hidden: &Tensor, labels: &[i64], head: &Linear) -> Result<(Tensor, usize)> {
    let (b, l, h) = hidden.dims3()?;
    let targets = shifted_targets(labels, b, l, head.out_features)?;
    if targets.is_empty() {
        return Ok((Tensor::zeros((), DType::F32, hidden.device())?, 0));
    }
    let (rows, ys): (Vec<u32>, Vec<u32>) = targets.into_iter().unzip();
    let n = rows.len();
    let out = head_at_rows(&hidden.reshape((b * l, h))?, rows, &ys, head)?;
    Ok((out.nll.sum_all()?, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_skips_ignored_and_rejects_out_of_vocab() {
        let t = shifted_targets(&[5, -100, 7, 1], 1, 4, 10).unwrap();
        assert_eq!(t, vec![(1, 7), (2, 1)]);
        let e = shifted_targets(&[5, 12], 1, 2, 10).unwrap_err().to_string();
        assert!(e.contains("labels[0, 1] = 12"), "{e}");
    }
}
