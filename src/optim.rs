//! AdamW as torch implements it (decoupled weight decay, bias correction), global-norm gradient
//! clipping like `torch.nn.utils.clip_grad_norm_`, and transformers' learning-rate schedules.

use candle_core::{Tensor, Var};

use crate::error::{input_err, Result};

/// One parameter group member: the tensor, its optimizer state and whether weight decay applies.
pub struct AdamParam {
    pub var: Var,
    pub decay: bool,
    /// First and second moments, flattened.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// AdamW's hyper-parameters (torch's defaults; transformers' `adam_beta1`, `adam_beta2`,
/// `adam_epsilon`, `weight_decay`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    pub params: Vec<AdamParam>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Completed steps (torch's `state["step"]`).
    pub step: u64,
}

impl AdamW {
    /// `vars`: each trainable tensor with whether weight decay applies to it.
    pub fn new(vars: Vec<(Var, bool)>, cfg: AdamWConfig) -> Self {
        let params = vars
            .into_iter()
            .map(|(var, decay)| {
                let n = var.elem_count();
                AdamParam { var, decay, m: vec![0.0; n], v: vec![0.0; n] }
            })
            .collect();
        let AdamWConfig { beta1, beta2, eps, weight_decay } = cfg;
        AdamW { params, beta1, beta2, eps, weight_decay, step: 0 }
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of `params[i]` (None = no
    /// gradient: torch skips such a parameter entirely).
    pub fn step(&mut self, lr: f64, grads: &[Option<Tensor>]) -> Result<()> {
        if grads.len() != self.params.len() {
            return input_err(format!("{} gradients for {} parameters", grads.len(), self.params.len()));
        }
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let (eps, bc2_sqrt) = (self.eps as f32, bc2_sqrt as f32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g: Vec<f32> = g.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
            let mut w: Vec<f32> = p.var.as_tensor().flatten_all()?.to_vec1()?;
            let decay = if p.decay { 1.0 - (lr * self.weight_decay) as f32 } else { 1.0 };
            for i in 0..w.len() {
                w[i] *= decay;
                p.m[i] += (1.0 - b1) * (g[i] - p.m[i]); // torch: exp_avg.lerp_(grad, 1 - beta1)
                p.v[i] = p.v[i] * b2 + (1.0 - b2) * g[i] * g[i];
                let denom = p.v[i].sqrt() / bc2_sqrt + eps;
                w[i] -= step_size * (p.m[i] / denom);
            }
            p.var.set(&Tensor::from_vec(w, p.var.shape(), p.var.device())?)?;
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients (f64 accumulation).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        let v: Vec<f32> = g.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        sq += v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    }
    Ok(sq.sqrt())
}

/// Scales the gradients so that their global norm is at most `max_norm` (torch: coefficient
/// max_norm / (norm + 1e-6), clamped to 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// transformers' schedules: the multiplier of the base learning rate at optimizer step `step`
/// (0-based) out of `total`, after `warmup` warm-up steps.
pub fn lr_lambda(kind: &str, step: u64, total: u64, warmup: u64) -> Result<f64> {
    let (s, t, w) = (step as f64, total as f64, warmup as f64);
    let warm = |s: f64| if step < warmup { Some(s / w.max(1.0)) } else { None };
    Ok(match kind {
        "constant" => 1.0,
        "constant_with_warmup" => warm(s).unwrap_or(1.0),
        "linear" => warm(s).unwrap_or_else(|| ((t - s) / (t - w).max(1.0)).max(0.0)),
        "cosine" => warm(s).unwrap_or_else(|| {
            let progress = (s - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }),
        other => {
            return input_err(format!(
                "lr_scheduler_type '{other}' is not supported (linear, cosine, constant, constant_with_warmup)"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps written out by hand from torch's documented update rule.
    #[test]
    fn adamw_matches_torch_update_rule() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt =
            AdamW::new(vec![(var.clone(), true)], AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() });
        let g1 = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
        let g2 = Tensor::new(&[0.25f32, 2.0], &Device::Cpu).unwrap();
        opt.step(0.01, &[Some(g1)]).unwrap();
        opt.step(0.01, &[Some(g2)]).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        let (mut w, mut m, mut v) = ([1.0f64, -2.0], [0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5f64, -1.0], [0.25, 2.0]].iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..2 {
                w[i] *= 1.0 - 0.01 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                w[i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
            }
        }
        for i in 0..2 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "{got:?} vs {w:?}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![Some(Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()), None];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn schedules() {
        assert_eq!(lr_lambda("linear", 0, 10, 2).unwrap(), 0.0);
        assert_eq!(lr_lambda("linear", 1, 10, 2).unwrap(), 0.5);
        assert_eq!(lr_lambda("linear", 2, 10, 2).unwrap(), 1.0);
        assert!((lr_lambda("linear", 6, 10, 2).unwrap() - 0.5).abs() < 1e-12);
        assert!((lr_lambda("cosine", 6, 10, 2).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(lr_lambda("constant_with_warmup", 1, 10, 4).unwrap(), 0.25);
        assert!(lr_lambda("bogus", 0, 1, 0).is_err());
    }
}
