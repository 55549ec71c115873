//! Cross-entropy at label rows with a fused backward, and no-grad token statistics (entropy, argmax).
//!
//! Per row of logits l [V] with target t (in f32, max-subtracted like torch):
//!   lse  = m + ln sum_j exp(l_j - m),  m = max_j l_j
//!   loss = lse - l_t
//!   dloss/dl = softmax(l) - onehot(t)
//!   entropy = lse - sum_j softmax(l)_j l_j        (TRL's entropy_from_logits)

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{f32_arg, rows_per_task, with_f32};
use super::math::exp_f32;

/// (max, logsumexp) of one row, f32, 8 accumulators.
#[inline]
fn row_lse(l: &[f32]) -> (f32, f32) {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return (m, m);
    }
    let mut acc = [0f32; 8];
    let chunks = l.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&v| exp_f32(v - m)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp_f32(v - m);
        }
    }
    (m, m + (acc.iter().sum::<f32>() + rest).ln())
}

fn check_targets(op: &str, n: usize, v: usize, targets: &[u32]) -> Result<()> {
    if targets.len() != n {
        bail!("{op}: {} targets for {n} rows of logits", targets.len());
    }
    if let Some((row, t)) = targets.iter().enumerate().find(|(_, &t)| t as usize >= v) {
        bail!("{op}: target {t} at row {row} is outside the vocabulary [0, {v})");
    }
    Ok(())
}

/// -log softmax(logits)[target] per row. logits: [N, V] (f32 on the CPU runs the fused kernel with a
/// hand-written backward; other inputs run [`cross_entropy_rows_reference`]), targets: N ids < V.
/// Returns [N] f32.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    check_targets("cross_entropy_rows", n, v, targets)?;
    if super::fused_f32(logits) {
        logits
            .contiguous()?
            .apply_op1(CrossEntropy { targets: Arc::new(targets.to_vec()), lse: Arc::new(OnceLock::new()) })
    } else {
        cross_entropy_rows_reference(logits, targets)
    }
}

/// candle composition of [`cross_entropy_rows`] (stats in f32).
pub fn cross_entropy_rows_reference(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    check_targets("cross_entropy_rows_reference", n, v, targets)?;
    let l = logits.to_dtype(DType::F32)?; // [N, V]
    let m = l.max_keepdim(D::Minus1)?.detach(); // [N, 1] (the gradient through m cancels)
    let shifted = l.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // [N, 1]
    let ys = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    let picked = shifted.gather(&ys, D::Minus1)?; // [N, 1]
    (lse - picked)?.squeeze(D::Minus1)
}

/// The fused cross-entropy; `lse` keeps the forward's per-row logsumexp for the backward.
struct CrossEntropy {
    targets: Arc<Vec<u32>>,
    lse: Arc<OnceLock<Vec<f32>>>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = f32_arg(s, l, "cross-entropy-rows")?; // [N, V]
        let (n, v) = l.shape().dims2()?;
        check_targets("cross-entropy-rows", n, v, &self.targets)?;
        let lse: Vec<f32> = logits.par_chunks(v.max(1)).map(|r| row_lse(r).1).collect(); // [N]
        let loss: Vec<f32> = lse
            .iter()
            .zip(self.targets.iter())
            .enumerate()
            .map(|(i, (lse, &t))| lse - logits[i * v + t as usize])
            .collect();
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }
    fn bwd(&self, logits: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyGrad { targets: self.targets.clone(), lse: self.lse.clone() };
        Ok(Some(logits.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// (logits [N, V], g [N]) -> (softmax(logits) - onehot(targets)) * g  [N, V]
struct CrossEntropyGrad {
    targets: Arc<Vec<u32>>,
    lse: Arc<OnceLock<Vec<f32>>>,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-rows-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = f32_arg(s1, l1, "cross-entropy-rows-grad")?; // [N, V]
        let g = f32_arg(s2, l2, "cross-entropy-rows-grad")?; // [N]
        let (n, v) = l1.shape().dims2()?;
        if g.len() != n {
            bail!("cross-entropy-rows-grad: {} gradients for {n} rows", g.len());
        }
        let cached = self.lse.get().filter(|c| c.len() == n);
        let mut out = vec![0f32; n * v];
        let rows = rows_per_task(n, v);
        out.par_chunks_mut((rows * v).max(1)).enumerate().for_each(|(ci, o)| {
            for (j, o) in o.chunks_exact_mut(v).enumerate() {
                let i = ci * rows + j;
                let l = &logits[i * v..(i + 1) * v];
                let lse = match cached {
                    Some(c) => c[i],
                    None => row_lse(l).1,
                };
                let gi = g[i];
                for (o, &x) in o.iter_mut().zip(l) {
                    *o = exp_f32(x - lse) * gi;
                }
                o[self.targets[i] as usize] -= gi;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-row entropy of softmax(logits) and argmax (first maximum wins, like torch), no gradient.
/// logits: [N, V] any float dtype/device (computed in f32 on the CPU).
/// Returns (entropy [N], argmax [N]).
pub fn token_stats(logits: &Tensor) -> Result<(Vec<f32>, Vec<u32>)> {
    let (_n, v) = logits.dims2()?;
    let logits = logits.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    with_f32(&logits, |l| {
        let stats: Vec<(f32, u32)> = l
            .par_chunks(v.max(1))
            .map(|r| {
                let mut best = 0usize;
                for (j, &x) in r.iter().enumerate() {
                    if x > r[best] {
                        best = j;
                    }
                }
                let (m, lse) = row_lse(r);
                let mut s = 0f32; // sum softmax * logits, as sum p (l - m) + m to avoid cancellation
                if m.is_finite() {
                    for &x in r {
                        let p = exp_f32(x - lse);
                        if p > 0.0 {
                            s += p * (x - m);
                        }
                    }
                }
                let ent = (lse - m) - s;
                (ent, best as u32)
            })
            .collect();
        stats.into_iter().unzip()
    })
}

/// candle composition of the entropy of [`token_stats`] (test reference): lse - sum softmax * logits.
pub fn entropy_reference(logits: &Tensor) -> Result<Tensor> {
    let l = logits.to_dtype(DType::F32)?; // [N, V]
    let m = l.max_keepdim(D::Minus1)?;
    let lse = (l.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?; // [N, 1]
    let p = l.broadcast_sub(&lse)?.exp()?;
    lse.squeeze(D::Minus1)? - (p * l)?.sum(D::Minus1)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_out_of_range_target_naming_row() {
        let l = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let e = cross_entropy_rows(&l, &[0, 4, 1]).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("target 4"), "{e}");
        let e = cross_entropy_rows(&l, &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("2 targets for 3 rows"), "{e}");
    }

    #[test]
    fn argmax_first_max_wins_and_uniform_entropy() {
        let l = Tensor::new(&[[1.0f32, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let (ent, am) = token_stats(&l).unwrap();
        assert_eq!(am, vec![1, 0]);
        assert!((ent[1] - 4f32.ln()).abs() < 1e-6, "{}", ent[1]);
    }
}
