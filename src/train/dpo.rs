//! Direct preference optimisation losses with TRL's definitions. A batch holds the chosen sequences
//! in rows 0..P and the rejected ones in rows P..2P; a sequence's log-probability is the sum over its
//! label (completion) tokens of log p(token); IPO compares token-averaged log-ratios, as TRL does.

use candle_core::{DType, Device, Tensor};

use super::HeadOut;

use crate::error::{input_err, Result};
use crate::ops::log_sigmoid;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpoLoss {
    Sigmoid,
    Robust,
    Hinge,
    Ipo,
    SppoHard,
    NcaPair,
    ApoZero,
    ApoDown,
    /// NLL of the chosen completions (mean over their tokens).
    Sft,
}

impl DpoLoss {
    /// Every supported loss with TRL's name for it (`DPOConfig.loss_type`); the one list (exported to
    /// Python, where `DPOConfig` checks its `loss_type` against it).
    pub const ALL: [(&'static str, DpoLoss); 9] = [
        ("sigmoid", DpoLoss::Sigmoid),
        ("robust", DpoLoss::Robust),
        ("hinge", DpoLoss::Hinge),
        ("ipo", DpoLoss::Ipo),
        ("sppo_hard", DpoLoss::SppoHard),
        ("nca_pair", DpoLoss::NcaPair),
        ("apo_zero", DpoLoss::ApoZero),
        ("apo_down", DpoLoss::ApoDown),
        ("sft", DpoLoss::Sft),
    ];

    /// TRL's names of the supported losses.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|(n, _)| *n).collect()
    }

    pub fn parse(s: &str) -> Result<Self> {
        match Self::ALL.iter().find(|(n, _)| *n == s) {
            Some((_, l)) => Ok(*l),
            None => input_err(format!("loss_type '{s}' is not supported ({})", Self::names().join(", "))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DpoSpec {
    /// Loss types with their weights.
    pub losses: Vec<(DpoLoss, f64)>,
    pub beta: f64,
    pub label_smoothing: f64,
    /// Multiplies the loss whose gradient is taken (1 / gradient-accumulation steps).
    pub loss_scale: f64,
}

/// Per-pair values of one micro-batch (plain numbers, for TRL's logged metrics).
#[derive(Debug, Clone, Default)]
pub struct DpoStats {
    pub loss: f64,
    pub chosen_logps: Vec<f64>,
    pub rejected_logps: Vec<f64>,
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
    /// Sum of all vocabulary logits over the chosen / rejected label rows, and the row counts.
    pub chosen_logits_sum: f64,
    pub rejected_logits_sum: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
    pub vocab: usize,
    /// Chosen label tokens whose argmax prediction is right.
    pub chosen_correct: usize,
}

/// Per-sequence log-probabilities [2P] (sums, or means with `average`) from the head output, tracked.
pub fn sequence_logps(h: &HeadOut, average: bool) -> Result<(Tensor, Vec<usize>)> {
    let n = h.seq.len();
    let mut onehot = vec![0f32; h.batch * n]; // [2P, N]
    let mut counts = vec![0usize; h.batch];
    for (i, &s) in h.seq.iter().enumerate() {
        onehot[s * n + i] = 1.0;
        counts[s] += 1;
    }
    let dev = h.nll.device();
    let m = Tensor::from_vec(onehot, (h.batch, n), dev)?;
    let sums = m.matmul(&h.nll.neg()?.unsqueeze(1)?)?.squeeze(1)?; // [2P]
    if !average {
        return Ok((sums, counts));
    }
    let inv: Vec<f32> = counts.iter().map(|&c| 1.0 / c.max(1) as f32).collect();
    Ok(((sums * Tensor::from_vec(inv, h.batch, dev)?)?, counts))
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1()?)
}

/// The DPO objective for [`super::run_objective`]: `ref_logps` [2P] are the reference model's sequence
/// log-probabilities (means for IPO). Fills `stats`.
pub fn objective<'a>(
    spec: &'a DpoSpec,
    ref_logps: &'a [f64],
    stats: &'a mut DpoStats,
) -> impl FnMut(&HeadOut) -> Result<Tensor> + 'a {
    move |h: &HeadOut| {
        if !h.batch.is_multiple_of(2) || ref_logps.len() != h.batch {
            return input_err(format!(
                "DPO needs chosen + rejected rows and one reference log-prob each; got {} rows and {} reference values",
                h.batch,
                ref_logps.len()
            ));
        }
        let p = h.batch / 2;
        let dev: Device = h.nll.device().clone();
        let (logps, counts) = sequence_logps(h, false)?; // [2P] sums over completion tokens
        if let Some(i) = counts.iter().position(|&c| c == 0) {
            let which = if i < p { "chosen" } else { "rejected" };
            return input_err(format!(
                "pair {}: the {which} completion has no token to score (empty, or cut by max_length)",
                i % p
            ));
        }
        let chosen = logps.narrow(0, 0, p)?;
        let rejected = logps.narrow(0, p, p)?;
        let refs = Tensor::from_vec(ref_logps.iter().map(|&x| x as f32).collect::<Vec<_>>(), h.batch, &dev)?;
        let (ref_c, ref_r) = (refs.narrow(0, 0, p)?, refs.narrow(0, p, p)?);
        let beta = spec.beta;
        let ls = spec.label_smoothing;
        let chosen_lr = (&chosen - &ref_c)?; // [P]
        let rejected_lr = (&rejected - &ref_r)?;
        let logits = (&chosen_lr - &rejected_lr)?; // (pi_c - pi_r) - (ref_c - ref_r)
        let bl = (&logits * beta)?;
        let mut total: Option<Tensor> = None;
        for &(kind, w) in &spec.losses {
            let per_pair = match kind {
                DpoLoss::Sigmoid => ((log_sigmoid(&bl)? * -(1.0 - ls))? - (log_sigmoid(&bl.neg()?)? * ls)?)?,
                DpoLoss::Robust => {
                    (((log_sigmoid(&bl)? * -(1.0 - ls))? + (log_sigmoid(&bl.neg()?)? * ls)?)? / (1.0 - 2.0 * ls))?
                }
                DpoLoss::Hinge => (bl.neg()? + 1.0)?.relu()?,
                DpoLoss::Ipo => {
                    // IPO on token-averaged log-ratios.
                    let inv = |r: std::ops::Range<usize>| {
                        Tensor::from_vec(counts[r].iter().map(|&c| 1.0 / c as f32).collect::<Vec<_>>(), p, &dev)
                    };
                    let avg = ((&chosen_lr * inv(0..p)?)? - (&rejected_lr * inv(p..2 * p)?)?)?;
                    (avg - 1.0 / (2.0 * beta))?.sqr()?
                }
                DpoLoss::SppoHard => ((&chosen_lr - 0.5 / beta)?.sqr()? + (&rejected_lr + 0.5 / beta)?.sqr()?)?,
                DpoLoss::NcaPair => {
                    let (cr, rr) = ((&chosen_lr * beta)?, (&rejected_lr * beta)?);
                    ((log_sigmoid(&cr)?.neg()? - (log_sigmoid(&cr.neg()?)? * 0.5)?)?
                        - (log_sigmoid(&rr.neg()?)? * 0.5)?)?
                }
                DpoLoss::ApoZero => {
                    let lc = (log_sigmoid(&(&chosen_lr * beta)?)?.exp()?.neg()? + 1.0)?;
                    let lr = log_sigmoid(&(&rejected_lr * beta)?)?.exp()?;
                    (lc + lr)?
                }
                DpoLoss::ApoDown => {
                    let lc = log_sigmoid(&(&chosen_lr * beta)?)?.exp()?;
                    let lr = (log_sigmoid(&((&chosen_lr - &rejected_lr)? * beta)?)?.exp()?.neg()? + 1.0)?;
                    (lc + lr)?
                }
                DpoLoss::Sft => {
                    // Mean NLL over the chosen completions' tokens (sums even under IPO averaging).
                    let n_c: usize = counts[..p].iter().sum();
                    let mask: Vec<f32> = h.seq.iter().map(|&s| if s < p { 1.0 } else { 0.0 }).collect();
                    let nll_c = (h.nll * Tensor::from_vec(mask, h.seq.len(), &dev)?)?.sum_all()?;
                    let term = (nll_c / n_c as f64)?;
                    total = Some(match total {
                        None => (term * w)?,
                        Some(t) => (t + (term * w)?)?,
                    });
                    continue;
                }
            };
            let term = (per_pair.mean_all()? * w)?;
            total = Some(match total {
                None => term,
                Some(t) => (t + term)?,
            });
        }
        let loss = match total {
            Some(t) => t,
            None => return input_err("loss_type is empty".to_string()),
        };
        stats.loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        stats.chosen_logps = to_vec(&chosen.detach())?;
        stats.rejected_logps = to_vec(&rejected.detach())?;
        stats.chosen_rewards = to_vec(&(chosen_lr.detach() * beta)?)?;
        stats.rejected_rewards = to_vec(&(rejected_lr.detach() * beta)?)?;
        let (_, argmax) = crate::ops::cross_entropy::token_stats(&h.logits.detach())?;
        stats.chosen_correct =
            h.seq.iter().zip(argmax.iter().zip(h.targets)).filter(|(&s, (a, y))| s < p && a == y).count();
        let row_sums = to_vec(&h.logits.detach().sum(1)?)?; // [N]
        stats.vocab = h.logits.dim(1)?;
        for (i, &s) in h.seq.iter().enumerate() {
            if s < p {
                stats.chosen_logits_sum += row_sums[i];
                stats.chosen_tokens += 1;
            } else {
                stats.rejected_logits_sum += row_sums[i];
                stats.rejected_tokens += 1;
            }
        }
        Ok((loss * spec.loss_scale)?)
    }
}
