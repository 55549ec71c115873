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
        let s: f64 = r.iter().map(|&x| ((x - m) as f64).exp()).sum();
        let lse = m as f64 + s.ln();
        let e: f64 = lse - r.iter().map(|&x| ((x as f64) - lse).exp() * x as f64).sum::<f64>();
        ent.push(e as f32);
        arg.push(r.iter().position(|&x| x == m).unwrap_or(0) as u32);
    }
    Ok((ent, arg))
}
