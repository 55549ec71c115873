//! A training session over a model's trainable tensors: gradients accumulated over micro-batches,
//! global-norm clipping, AdamW and zeroing, the optimizer state, and the frozen-vision feature cache.
//! The trainers' loop (data order, schedules, logging, checkpoints) drives it: per optimizer step,
//! `forward_backward` (or `dpo_step`) for each micro-batch with `loss_scale` = 1 / (label tokens of
//! the whole step), then `optimizer_step(lr, max_grad_norm)`, as transformers' Trainer does.

use std::sync::Arc;

use candle_core::Tensor;

use super::dpo::{self, DpoSpec, DpoStats};
use super::step::{
    forward_backward, run_objective, trainable_params, HeadOut, MicroStats, StepCtx, StepOptions, Trainable,
};
use super::FeatureCache;
use crate::error::{input_err, Result};
use crate::model::{ForwardInput, Interrupt, VlmModel};
use crate::optim::{clip_coefficient, global_norm, AdamW, AdamWConfig};

/// How a session is set up.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    pub adam: AdamWConfig,
    /// Names (PEFT keys) of the tensors without weight decay.
    pub no_decay: Vec<String>,
    /// Budget of the frozen-vision feature cache in bytes; 0 turns it off.
    pub feature_cache_bytes: usize,
    /// `bf16=True` of TrainingArguments on a CPU: products with frozen Linear weights in bf16 (see
    /// [`VlmModel::with_bf16_autocast`]); trainable tensors, gradients and the optimizer stay f32.
    pub bf16_autocast: bool,
}

/// AdamW's moments of one tensor, flattened (torch's `exp_avg`, `exp_avg_sq`).
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub name: String,
    pub shape: Vec<usize>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// The optimizer state: completed steps and the moments of every trainable tensor, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub moments: Vec<Moments>,
}

pub struct TrainSession {
    model: Arc<VlmModel>,
    params: Vec<Trainable>,
    opt: AdamW,
    /// Accumulated gradients, aligned with `params` (None: no gradient yet).
    grads: Vec<Option<Tensor>>,
    cache: Option<FeatureCache>,
}

impl TrainSession {
    /// A session over every trainable tensor of `model` (its adapters); an error when there is none.
    pub fn new(model: Arc<VlmModel>, cfg: &SessionConfig) -> Result<Self> {
        let params = trainable_params(&model);
        if params.is_empty() {
            return input_err("the model has no trainable tensors: attach adapters first (get_peft_model)".to_string());
        }
        let vars = params.iter().map(|p| (p.var.clone(), !cfg.no_decay.contains(&p.name))).collect();
        let n = params.len();
        let cache = (cfg.feature_cache_bytes > 0).then(|| FeatureCache::new(cfg.feature_cache_bytes));
        let model = if cfg.bf16_autocast { Arc::new(model.with_bf16_autocast()?) } else { model };
        Ok(TrainSession { model, params, opt: AdamW::new(vars, cfg.adam), grads: vec![None; n], cache })
    }

    pub fn model(&self) -> &Arc<VlmModel> {
        &self.model
    }

    pub fn params(&self) -> &[Trainable] {
        &self.params
    }

    /// Distinct images whose features are cached.
    pub fn cached_images(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    fn ctx<'a>(&'a self, interrupt: Interrupt<'a>) -> StepCtx<'a> {
        StepCtx { model: &self.model, params: &self.params, cache: self.cache.as_ref(), interrupt }
    }

    /// Runs `f` with the gradient slots to fill: the accumulated ones when `backward` (kept only when
    /// `f` succeeds, so an interrupted micro-batch adds nothing), else empty ones.
    fn with_slots<R>(
        &mut self,
        backward: bool,
        f: impl FnOnce(&StepCtx, &mut [Option<Tensor>]) -> Result<R>,
        interrupt: Interrupt,
    ) -> Result<R> {
        let mut acc = if backward { self.grads.clone() } else { vec![None; self.params.len()] };
        let active = self.model.active()?; // adapters off: `modules_to_save` originals in place
        let mut ctx = self.ctx(interrupt);
        if let Some(m) = &active {
            ctx.model = m;
        }
        let r = f(&ctx, &mut acc)?;
        if backward {
            self.grads = acc;
        }
        Ok(r)
    }

    /// Forward (+ backward with `opts.backward`) of one micro-batch; the gradient of loss_scale x (sum
    /// of the label tokens' cross-entropies) is added to the accumulated gradients.
    pub fn forward_backward(
        &mut self,
        input: &ForwardInput,
        opts: &StepOptions,
        loss_scale: f64,
        interrupt: Interrupt,
    ) -> Result<MicroStats> {
        self.with_slots(opts.backward, |ctx, acc| forward_backward(ctx, input, opts, loss_scale, acc), interrupt)
    }

    /// Loss and metric sums without a backward (adapters' dropout off).
    pub fn evaluate(&mut self, input: &ForwardInput, interrupt: Interrupt) -> Result<MicroStats> {
        self.forward_backward(input, &StepOptions::default(), 1.0, interrupt)
    }

    /// One DPO micro-batch (rows 0..P chosen, P..2P rejected; `ref_logps` [2P] the reference's
    /// sequence log-probabilities): accumulates the gradient of `spec.loss_scale` x loss with
    /// `opts.backward` and returns the values TRL logs.
    pub fn dpo_step(
        &mut self,
        input: &ForwardInput,
        spec: &DpoSpec,
        ref_logps: &[f64],
        opts: &StepOptions,
        interrupt: Interrupt,
    ) -> Result<(DpoStats, MicroStats)> {
        let mut ds = DpoStats::default();
        let ms = self.with_slots(
            opts.backward,
            |ctx, acc| {
                let mut obj = dpo::objective(spec, ref_logps, &mut ds);
                run_objective(ctx, input, opts, acc, &mut obj)
            },
            interrupt,
        )?;
        Ok((ds, ms))
    }

    /// Per-sequence completion log-probabilities of the session's model, no gradient, with the
    /// frozen-vision cache: DPO's reference pass.
    pub fn sequence_logps(&self, input: &ForwardInput, average: bool, interrupt: Interrupt) -> Result<Vec<f64>> {
        let active = self.model.active()?; // adapters off (DPO's reference): `modules_to_save` originals
        sequence_logps(active.as_ref().unwrap_or(&self.model), input, average, self.cache.as_ref(), interrupt)
    }

    /// The accumulated gradients by PEFT key (tensors without a gradient are left out).
    pub fn grads(&self) -> Vec<(&str, &Tensor)> {
        self.params.iter().zip(&self.grads).filter_map(|(p, g)| g.as_ref().map(|g| (p.name.as_str(), g))).collect()
    }

    /// The accumulated gradients aligned with [`Self::params`] (None: no gradient yet).
    pub fn grad_slots(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }

    /// Clips the accumulated gradients to `max_grad_norm` (global L2; <= 0 turns clipping off), takes
    /// one AdamW step with `lr` and clears the gradients. Returns the norm before clipping.
    pub fn optimizer_step(&mut self, lr: f64, max_grad_norm: f64) -> Result<f64> {
        // clip_grad_norm's scaling is applied inside the update (no scaled copy of every gradient)
        let norm = global_norm(&self.grads)?;
        self.opt.step_scaled(lr, &self.grads, clip_coefficient(norm, max_grad_norm))?;
        self.zero_grad();
        Ok(norm)
    }

    /// Values of all trainable tensors together: the length of [`Self::flat_grads`] and
    /// [`Self::flat_params`].
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// The accumulated gradients of every trainable tensor as one buffer, in [`Self::params`] order
    /// (zeros for a tensor without a gradient yet), and which tensors have one: what data-parallel
    /// training all-reduces before the optimizer step.
    pub fn flat_grads(&self) -> Result<(Vec<f32>, Vec<bool>)> {
        let mut flat = vec![0f32; self.numel()];
        let mut present = vec![false; self.params.len()];
        let mut off = 0;
        for ((p, g), has) in self.params.iter().zip(&self.grads).zip(present.iter_mut()) {
            let n = p.var.elem_count();
            if let Some(g) = g {
                if g.elem_count() != n {
                    return input_err(format!(
                        "the gradient of '{}' has {} values, expected {n}",
                        p.name,
                        g.elem_count()
                    ));
                }
                crate::ops::cpu::with_f32(g, |v| flat[off..off + n].copy_from_slice(v))?;
                *has = true;
            }
            off += n;
        }
        Ok((flat, present))
    }

    /// Replaces the accumulated gradients by `scale` x the slices of `flat` (laid out as
    /// [`Self::flat_grads`] lays them out): tensor i gets a gradient when `present[i]`, else none.
    /// Nothing changes when the sizes do not fit.
    pub fn set_flat_grads(&mut self, flat: &[f32], present: &[bool], scale: f32) -> Result<()> {
        self.check_flat(flat.len(), "gradient")?;
        if present.len() != self.params.len() {
            return input_err(format!("{} gradient flags for {} trainable tensors", present.len(), self.params.len()));
        }
        let mut grads = Vec::with_capacity(self.params.len());
        let mut off = 0;
        for (p, &has) in self.params.iter().zip(present) {
            let n = p.var.elem_count();
            grads.push(if has {
                let v: Vec<f32> = flat[off..off + n].iter().map(|&x| x * scale).collect();
                Some(Tensor::from_vec(v, p.var.shape(), p.var.device())?)
            } else {
                None
            });
            off += n;
        }
        self.grads = grads;
        Ok(())
    }

    /// The values of every trainable tensor as one buffer, in [`Self::params`] order.
    pub fn flat_params(&self) -> Result<Vec<f32>> {
        let mut flat = vec![0f32; self.numel()];
        let mut off = 0;
        for p in &self.params {
            let n = p.var.elem_count();
            crate::ops::cpu::with_f32(p.var.as_tensor(), |v| flat[off..off + n].copy_from_slice(v))?;
            off += n;
        }
        Ok(flat)
    }

    /// Sets every trainable tensor from `flat` (laid out as [`Self::flat_params`] lays it out; e.g.
    /// rank 0's values, broadcast). Nothing changes when the size does not fit.
    pub fn set_flat_params(&mut self, flat: &[f32]) -> Result<()> {
        self.check_flat(flat.len(), "parameter")?;
        let mut off = 0;
        for p in &self.params {
            let n = p.var.elem_count();
            let t = Tensor::from_slice(&flat[off..off + n], p.var.shape(), p.var.device())?;
            p.var.set(&t.to_dtype(p.var.dtype())?)?;
            off += n;
        }
        Ok(())
    }

    fn check_flat(&self, len: usize, what: &str) -> Result<()> {
        let n = self.numel();
        if len != n {
            return input_err(format!("a flat {what} buffer of {len} values for trainable tensors of {n} values"));
        }
        Ok(())
    }

    /// Sets the model's own trainable parameters (full-parameter training) from `values` (transformers'
    /// names, any shape with the right number of values, e.g. a saved checkpoint's): every one must be
    /// there; nothing changes when one is missing or does not fit. Adapters (and `modules_to_save` copies)
    /// are not touched.
    pub fn load_param_values(&mut self, values: &[(String, Tensor)]) -> Result<()> {
        let mut plan = Vec::new();
        for p in self.params.iter().filter(|p| !p.name.contains(".lora_") && !p.name.contains(".modules_to_save")) {
            let key = p.name.strip_prefix("base_model.model.").unwrap_or(&p.name);
            if self.model.saved.contains(key) {
                continue; // a `modules_to_save` copy: it comes with the adapter
            }
            let Some((_, v)) = values.iter().find(|(n, _)| n == key) else {
                return input_err(format!("the checkpoint lacks the trained parameter '{key}'"));
            };
            if v.elem_count() != p.var.elem_count() {
                return input_err(format!("the checkpoint's '{key}' has shape {:?}, expected {:?}", v.dims(), p.shape));
            }
            plan.push((
                &p.var,
                v.to_dtype(candle_core::DType::F32)?.reshape(p.var.shape())?.to_device(p.var.device())?,
            ));
        }
        for (var, v) in plan {
            var.set(&v)?;
        }
        Ok(())
    }

    pub fn optimizer_state(&self) -> OptimizerState {
        let moments = self
            .params
            .iter()
            .zip(&self.opt.params)
            .map(|(p, a)| Moments {
                name: p.name.clone(),
                shape: p.var.dims().to_vec(),
                exp_avg: a.m.clone(),
                exp_avg_sq: a.v.clone(),
            })
            .collect();
        OptimizerState { step: self.opt.step, moments }
    }

    /// Restores what [`Self::optimizer_state`] returned (matched by name; every tensor must be there
    /// with its shape). Nothing changes when the state does not fit.
    pub fn load_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        let mut found = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let Some(m) = state.moments.iter().find(|m| m.name == p.name) else {
                return input_err(format!("optimizer state lacks '{}'", p.name));
            };
            let n = p.var.elem_count();
            if m.shape != p.var.dims() || m.exp_avg.len() != n || m.exp_avg_sq.len() != n {
                return input_err(format!(
                    "optimizer state '{}' has shape {:?}, expected {:?}",
                    p.name,
                    m.shape,
                    p.var.dims()
                ));
            }
            found.push(m);
        }
        for (a, m) in self.opt.params.iter_mut().zip(found) {
            a.m.clone_from(&m.exp_avg);
            a.v.clone_from(&m.exp_avg_sq);
        }
        self.opt.step = state.step;
        Ok(())
    }
}

/// Per-sequence completion log-probabilities (sums, or means with `average`) of any model (e.g. an
/// explicit DPO `ref_model`), no gradient.
pub fn sequence_logps(
    model: &VlmModel,
    input: &ForwardInput,
    average: bool,
    cache: Option<&FeatureCache>,
    interrupt: Interrupt,
) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    let mut obj = |h: &HeadOut| -> Result<Tensor> {
        let (lp, _) = dpo::sequence_logps(h, average)?;
        out = lp.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        Ok(lp.sum_all()?)
    };
    let ctx = StepCtx { model, params: &[], cache, interrupt };
    run_objective(&ctx, input, &StepOptions { paired: true, ..StepOptions::default() }, &mut [], &mut obj)?;
    Ok(out)
}
