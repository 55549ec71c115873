//! Cross-entropy at label rows with a fused backward, and no-grad token statistics (entropy, argmax).
//! TEMPORARY composition (replaced by the fused op).

use candle_core::{Result, Tensor, D};

/// -log softmax(logits)[t] per row. logits: [N, V] f32 -> [N]
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = targets.len();
    let ys = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&ys, D::Minus1)?;
    (lse - picked)?.squeeze(D::Minus1)
}

/// Per-row entropy of softmax(logits) and argmax. logits: [N, V]
pub fn token_stats(logits: &Tensor) -> Result<(Vec<f32>, Vec<u32>)> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let mut ent = Vec::new();
    let mut arg = Vec::new();
    for r in rows {
        let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = r.iter().map(|x| (x - m).exp()).sum();
        let lse = m + s.ln();
        let e: f32 = lse - r.iter().map(|x| (x - lse).exp() * x).sum::<f32>();
        ent.push(e);
        arg.push(r.iter().position(|&x| x == m).unwrap_or(0) as u32);
    }
    Ok((ent, arg))
}
