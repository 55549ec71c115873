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

/// Values per parallel task of the element-wise loops (AdamW, the gradient norm): large enough that
/// rayon's overhead vanishes, small enough that a 28M-value embedding splits over every thread.
const CHUNK: usize = 1 << 16;

/// The per-step scalars of the update, all f32 as the update computes.
#[derive(Clone, Copy)]
struct AdamScalars {
    /// 1 - lr * weight_decay (1 for a tensor without decay).
    decay: f32,
    b1: f32,
    b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    /// The clipping coefficient the gradient is multiplied by first (None: no clipping).
    grad_scale: Option<f32>,
}

impl AdamScalars {
    /// torch's AdamW on one run of values, in torch's order of operations (`_single_tensor_adamw`):
    /// param.mul_(1 - lr * wd); exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad,
    /// grad, value=1 - beta2); denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps;
    /// param.addcdiv_(exp_avg, denom, value=-step_size). A clipped gradient is g * coef (+ 0, as
    /// candle's affine computes `clip_grad_norm`'s product: only the sign of a zero can differ).
    #[inline]
    fn update(&self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let AdamScalars { decay, b1, b2, step_size, bc2_sqrt, eps, grad_scale } = *self;
        let upd = |w: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
            *w *= decay;
            *m += (1.0 - b1) * (g - *m); // torch: exp_avg.lerp_(grad, 1 - beta1)
            *v = *v * b2 + (1.0 - b2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *w -= step_size * (*m / denom);
        };
        let it = w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g);
        match grad_scale {
            None => it.for_each(|(((w, m), v), &g)| upd(w, m, v, g)),
            Some(c) => it.for_each(|(((w, m), v), &g)| upd(w, m, v, g * c + 0.0)),
        }
    }
}

/// The AdamW update of one parameter as an in-place candle op: the parameter's storage is updated
/// where it lies (the user's model shares it), the moments in place, in parallel over chunks.
struct AdamKernel<'a> {
    scalars: AdamScalars,
    m: std::cell::RefCell<&'a mut [f32]>,
    v: std::cell::RefCell<&'a mut [f32]>,
}

impl candle_core::InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let g = crate::ops::cpu::f32_arg(s2, l2, "adamw (gradient)")?;
        let w = match (s1, l1.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(w), Some((a, b))) => &mut w[a..b],
            _ => candle_core::bail!("adamw: the parameter must be a contiguous f32 CPU tensor"),
        };
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        let (m, v): (&mut [f32], &mut [f32]) = (&mut m, &mut v);
        if w.len() != g.len() || w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!("adamw: {} values, {} gradients, {} + {} moments", w.len(), g.len(), m.len(), v.len());
        }
        let s = &self.scalars;
        if w.len() <= CHUNK {
            s.update(w, m, v, g);
        } else {
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| s.update(w, m, v, g));
        }
        Ok(())
    }
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
        self.step_scaled(lr, grads, None)
    }

    /// [`Self::step`] with every gradient multiplied by `grad_scale` first (the clipping coefficient,
    /// as [`clip_grad_norm`] would have scaled them, without writing scaled copies of the gradients).
    /// Each parameter is updated in place (in parallel over chunks), its moments too.
    pub fn step_scaled(&mut self, lr: f64, grads: &[Option<Tensor>], grad_scale: Option<f64>) -> Result<()> {
        if grads.len() != self.params.len() {
            return input_err(format!("{} gradients for {} parameters", grads.len(), self.params.len()));
        }
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let base = AdamScalars {
            decay: 1.0,
            b1: self.beta1 as f32,
            b2: self.beta2 as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2_sqrt as f32,
            eps: self.eps as f32,
            grad_scale: grad_scale.map(|c| c as f32),
        };
        let decay = 1.0 - (lr * self.weight_decay) as f32;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(candle_core::DType::F32)?.contiguous()?; // no copy for an f32 gradient
            if g.elem_count() != p.var.elem_count() {
                return input_err(format!(
                    "a gradient of shape {:?} for a parameter of shape {:?}",
                    g.dims(),
                    p.var.dims()
                ));
            }
            let scalars = AdamScalars { decay: if p.decay { decay } else { 1.0 }, ..base };
            let var = p.var.as_tensor();
            if var.dtype() == candle_core::DType::F32 && var.is_contiguous() && crate::ops::fused_on(var.device()) {
                let kernel =
                    AdamKernel { scalars, m: std::cell::RefCell::new(&mut p.m), v: std::cell::RefCell::new(&mut p.v) };
                var.inplace_op2(&g.reshape(var.shape())?, &kernel)?;
            } else {
                // not where the kernel can write in place (a GPU, or the reference ops forced): the same
                // update on a host copy (what the in-place kernel computes), set back on the Var's device
                let mut w: Vec<f32> = var.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
                let gv: Vec<f32> = g.flatten_all()?.to_vec1()?;
                scalars.update(&mut w, &mut p.m, &mut p.v, &gv);
                p.var.set(&Tensor::from_vec(w, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients (f64 accumulation; sums over fixed chunks added in order, so the
/// value does not depend on the number of threads).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    use rayon::prelude::*;
    let sq = |v: &[f32]| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += crate::ops::cpu::with_f32(g, |v| {
            if v.len() <= CHUNK {
                sq(v)
            } else {
                v.par_chunks(CHUNK).map(sq).collect::<Vec<f64>>().iter().sum::<f64>()
            }
        })?;
    }
    Ok(total.sqrt())
}

/// The coefficient that clips gradients of global norm `norm` to `max_norm` (torch: max_norm /
/// (norm + 1e-6), clamped to 1: None when it is 1 or clipping is off, `max_norm` <= 0).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && coef < 1.0).then_some(coef)
}

/// Scales the gradients so that their global norm is at most `max_norm` (torch: coefficient
/// max_norm / (norm + 1e-6), clamped to 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if let Some(coef) = clip_coefficient(norm, max_norm) {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
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

    /// The in-place, chunked, parallel update (and clipping folded into it) equals the scalar update
    /// on copies bit for bit, over several chunks, with and without weight decay; the parameter's
    /// storage is updated where it lies (a detached view sees the new values).
    #[test]
    fn inplace_update_equals_scalar_reference() {
        let n = 3 * CHUNK + 123;
        let init: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
        let grad =
            |s: usize| -> Vec<f32> { (0..n).map(|i| (((i + s) * 104_729 % 2001) as f32 - 1000.0) * 1e-4).collect() };
        let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        for decay in [true, false] {
            let var = Var::from_tensor(&Tensor::from_vec(init.clone(), (n / 3, 3), &Device::Cpu).unwrap()).unwrap();
            let view = var.as_tensor().detach();
            let mut opt = AdamW::new(vec![(var.clone(), decay)], cfg);
            let (mut w, mut m, mut v) = (init.clone(), vec![0f32; n], vec![0f32; n]);
            for step in 1..=3u64 {
                let g = grad(step as usize);
                let gt = Some(Tensor::from_vec(g.clone(), (n / 3, 3), &Device::Cpu).unwrap());
                let clip = (step == 2).then_some(0.3f64);
                // the reference: clip_grad_norm's scaled copy, then the scalar update
                let g: Vec<f32> = match clip {
                    Some(c) => (gt.as_ref().unwrap() * c).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
                    None => g,
                };
                let lr = 1e-3 * step as f64;
                let s = AdamScalars {
                    decay: if decay { 1.0 - (lr * 0.1) as f32 } else { 1.0 },
                    b1: 0.9,
                    b2: 0.999,
                    step_size: (lr / (1.0 - 0.9f64.powi(step as i32))) as f32,
                    bc2_sqrt: (1.0 - 0.999f64.powi(step as i32)).sqrt() as f32,
                    eps: 1e-8,
                    grad_scale: None,
                };
                for i in 0..n {
                    s.update(&mut w[i..i + 1], &mut m[i..i + 1], &mut v[i..i + 1], &g[i..i + 1]);
                }
                opt.step_scaled(lr, &[gt], clip).unwrap();
            }
            let got: Vec<f32> = view.flatten_all().unwrap().to_vec1().unwrap();
            assert!(got.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()), "decay {decay}");
            assert!(opt.params[0].m.iter().zip(&m).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(opt.params[0].v.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn global_norm_over_chunks() {
        let n = 2 * CHUNK + 5;
        let v: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
        let want = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
        let g = vec![Some(Tensor::from_vec(v, n, &Device::Cpu).unwrap()), None];
        assert!((global_norm(&g).unwrap() - want).abs() <= 1e-12 * want);
        assert_eq!(clip_coefficient(5.0, 0.0), None);
        assert_eq!(clip_coefficient(0.5, 1.0), None);
        assert!((clip_coefficient(4.0, 1.0).unwrap() - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
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
