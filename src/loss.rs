//! Causal language-model loss: logits at t predict token t+1, labels of -100 are ignored.
//!
//! The output head is applied only at the positions that carry a label, so the [B, L, V] logits are
//! never needed for the loss.

use candle_core::{DType, Tensor, D};

use crate::error::{input_err, Result};
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
                return input_err(format!("labels[{bi}, {}] = {y} is outside the vocabulary [0, {vocab}) and is not -100", t + 1));
            }
            out.push(((bi * l + t) as u32, y as u32));
        }
    }
    Ok(out)
}

/// Sum of -log p(target) over the label positions, and their count.
/// hidden: [B, L, H] (final-normed), head: the output projection.
pub fn causal_lm_loss_sum(hidden: &Tensor, labels: &[i64], head: &Linear) -> Result<(Tensor, usize)> {
    let (b, l, h) = hidden.dims3()?;
    let targets = shifted_targets(labels, b, l, head.out_features)?;
    let dev = hidden.device();
    if targets.is_empty() {
        return Ok((Tensor::zeros((), DType::F32, dev)?, 0));
    }
    let rows: Vec<u32> = targets.iter().map(|t| t.0).collect();
    let ys: Vec<u32> = targets.iter().map(|t| t.1).collect();
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, dev)?;
    let ys = Tensor::from_vec(ys, (n, 1), dev)?;
    let hs = hidden.reshape((b * l, h))?.index_select(&rows, 0)?; // [N, H]
    let logits = head.forward(&hs)?.to_dtype(DType::F32)?; // [N, V]
    let nll = cross_entropy_rows(&logits, &ys)?; // [N]
    Ok((nll.sum_all()?, n))
}

/// -log softmax(logits)[y] per row. logits: [N, V] f32, ys: [N, 1] u32 -> [N]
pub fn cross_entropy_rows(logits: &Tensor, ys: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?; // [N, 1]
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // [N, 1]
    let picked = shifted.gather(ys, D::Minus1)?; // [N, 1]
    Ok((lse - picked)?.squeeze(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_direct_formula() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &Device::Cpu).unwrap();
        let ys = Tensor::new(&[[2u32], [1]], &Device::Cpu).unwrap();
        let got = cross_entropy_rows(&logits, &ys).unwrap().to_vec1::<f32>().unwrap();
        let want0 = -(3f32.exp() / (1f32.exp() + 2f32.exp() + 3f32.exp())).ln();
        let want1 = -((-1f32).exp() / (0.5f32.exp() + (-1f32).exp() + 1.0)).ln();
        assert!((got[0] - want0).abs() < 1e-6 && (got[1] - want1).abs() < 1e-6);
    }

    #[test]
    fn shift_skips_ignored_and_rejects_out_of_vocab() {
        let t = shifted_targets(&[5, -100, 7, 1], 1, 4, 10).unwrap();
        assert_eq!(t, vec![(1, 7), (2, 1)]);
        let e = shifted_targets(&[5, 12], 1, 2, 10).unwrap_err().to_string();
        assert!(e.contains("labels[0, 1] = 12"), "{e}");
    }
}
