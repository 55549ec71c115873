//! Bindings of `crate::train` and `crate::optim`: a training session over a model's adapters.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Device, Tensor};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{detached, guard};
use super::model::{to_numpy, OwnedInput, PyVlmModel};
use crate::error::{input_err, Error};
use crate::model::VlmModel;
use crate::optim::{clip_grad_norm, lr_lambda, AdamW};
use crate::train::dpo::{self, DpoLoss, DpoSpec, DpoStats};
use crate::train::{forward_backward, run_objective, trainable_params, FeatureCache, HeadOut, MicroStats, StepOptions, Trainable};

/// Gradients accumulated over micro-batches, AdamW over the model's trainable tensors, and the
/// frozen-vision feature cache.
#[pyclass(name = "TrainSession", module = "ferrovlm._core", frozen)]
pub struct PyTrainSession {
    model: Arc<VlmModel>,
    params: Vec<Trainable>,
    opt: Mutex<AdamW>,
    grads: Mutex<Vec<Option<Tensor>>>,
    cache: Option<FeatureCache>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn stats_dict<'py>(py: Python<'py>, s: &MicroStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("loss_sum", s.loss_sum)?;
    d.set_item("num_label_tokens", s.num_label_tokens)?;
    d.set_item("entropy_sum", s.entropy_sum)?;
    d.set_item("num_mask_tokens", s.num_mask_tokens)?;
    d.set_item("correct", s.correct)?;
    Ok(d)
}

impl PyTrainSession {
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        labels: PyReadonlyArrayDyn<'py, i64>,
        loss_scale: f64,
        opts: StepOptions,
    ) -> PyResult<Bound<'py, PyDict>> {
        let inputs = guard(|| OwnedInput::copy(&input_ids, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref(), Some(&labels)))?;
        let stats = detached(py, |interrupt| {
            let mut acc = if opts.backward { lock(&self.grads).clone() } else { vec![None; self.params.len()] };
            let s = forward_backward(&self.model, &self.params, &inputs.view(0), loss_scale, &mut acc, self.cache.as_ref(), &opts, interrupt)?;
            if opts.backward {
                *lock(&self.grads) = acc;
            }
            Ok(s)
        })?;
        stats_dict(py, &stats)
    }
}

#[pymethods]
impl PyTrainSession {
    /// `no_decay`: names of the tensors without weight decay. `feature_cache_mb` = 0 turns the
    /// frozen-vision cache off.
    #[new]
    #[pyo3(signature = (model, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, no_decay=vec![], feature_cache_mb=1024))]
    fn new(model: &PyVlmModel, weight_decay: f64, beta1: f64, beta2: f64, eps: f64, no_decay: Vec<String>, feature_cache_mb: usize) -> PyResult<Self> {
        let model = model.get();
        let params = trainable_params(&model);
        guard(|| {
            if params.is_empty() {
                return input_err("the model has no trainable tensors: attach adapters first (get_peft_model)".to_string());
            }
            Ok(())
        })?;
        let vars = params.iter().map(|p| (p.var.clone(), !no_decay.contains(&p.name))).collect();
        let n = params.len();
        let cache = (feature_cache_mb > 0).then(|| FeatureCache::new(feature_cache_mb << 20));
        Ok(PyTrainSession { model, params, opt: Mutex::new(AdamW::new(vars, beta1, beta2, eps, weight_decay)), grads: Mutex::new(vec![None; n]), cache })
    }

    #[getter]
    fn param_names(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }

    /// Distinct images whose features are cached.
    #[getter]
    fn cached_images(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// Forward + backward of one micro-batch; the gradient of loss_scale x (sum of the label tokens'
    /// cross-entropies) is added to the accumulated gradients. Returns the micro-batch sums.
    #[pyo3(signature = (input_ids, labels, attention_mask=None, pixel_values=None, pixel_attention_mask=None, loss_scale=1.0, gradient_checkpointing=false, dropout_seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn forward_backward<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        labels: PyReadonlyArrayDyn<'py, i64>,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        loss_scale: f64,
        gradient_checkpointing: bool,
        dropout_seed: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = StepOptions { gradient_checkpointing, dropout_seed, backward: true, paired: false };
        self.run(py, input_ids, attention_mask, pixel_values, pixel_attention_mask, labels, loss_scale, opts)
    }

    /// Loss and metrics sums without a backward (adapters' dropout off).
    #[pyo3(signature = (input_ids, labels, attention_mask=None, pixel_values=None, pixel_attention_mask=None))]
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        labels: PyReadonlyArrayDyn<'py, i64>,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.run(py, input_ids, attention_mask, pixel_values, pixel_attention_mask, labels, 1.0, StepOptions::default())
    }

    /// Per-sequence completion log-probabilities of the session's model (sums, or means with
    /// `average`), no gradient, with the frozen-vision cache: the reference pass of DPO.
    #[pyo3(signature = (input_ids, labels, attention_mask=None, pixel_values=None, pixel_attention_mask=None, average=false))]
    #[allow(clippy::too_many_arguments)]
    fn sequence_logps<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        labels: PyReadonlyArrayDyn<'py, i64>,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        average: bool,
    ) -> PyResult<Vec<f64>> {
        let inputs = guard(|| OwnedInput::copy(&input_ids, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref(), Some(&labels)))?;
        detached(py, |interrupt| sequence_logps_of(&self.model, &inputs, average, self.cache.as_ref(), interrupt))
    }

    /// One DPO micro-batch: rows 0..P chosen, P..2P rejected, `ref_logps` [2P] the reference's
    /// sequence log-probabilities; `losses` = [(loss_type, weight)]. Accumulates the gradient of
    /// loss_scale x loss (with `backward`) and returns the values TRL logs.
    #[pyo3(signature = (input_ids, labels, ref_logps, losses, beta=0.1, label_smoothing=0.0, attention_mask=None, pixel_values=None, pixel_attention_mask=None, loss_scale=1.0, gradient_checkpointing=false, dropout_seed=0, backward=true))]
    #[allow(clippy::too_many_arguments)]
    fn dpo_step<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        labels: PyReadonlyArrayDyn<'py, i64>,
        ref_logps: Vec<f64>,
        losses: Vec<(String, f64)>,
        beta: f64,
        label_smoothing: f64,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        loss_scale: f64,
        gradient_checkpointing: bool,
        dropout_seed: u64,
        backward: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let inputs = guard(|| OwnedInput::copy(&input_ids, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref(), Some(&labels)))?;
        let losses = guard(|| losses.iter().map(|(k, w)| Ok((DpoLoss::parse(k)?, *w))).collect::<Result<Vec<_>, Error>>())?;
        let spec = DpoSpec { losses, beta, label_smoothing, loss_scale };
        let opts = StepOptions { gradient_checkpointing, dropout_seed, backward, paired: true };
        let (ds, ms) = detached(py, |interrupt| {
            let mut ds = DpoStats::default();
            let mut acc = if backward { lock(&self.grads).clone() } else { vec![None; self.params.len()] };
            let ms = {
                let mut obj = dpo::objective(&spec, &ref_logps, &mut ds);
                run_objective(&self.model, &self.params, &inputs.view(0), &mut acc, self.cache.as_ref(), &opts, interrupt, &mut obj)?
            };
            if backward {
                *lock(&self.grads) = acc;
            }
            Ok((ds, ms))
        })?;
        dpo_dict(py, &ds, &ms)
    }

    /// The accumulated gradients by PEFT key (tensors without a gradient are left out).
    fn grads<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (p, g) in self.params.iter().zip(lock(&self.grads).iter()) {
            if let Some(g) = g {
                d.set_item(&p.name, to_numpy(py, g)?)?;
            }
        }
        Ok(d)
    }

    fn zero_grad(&self) {
        lock(&self.grads).iter_mut().for_each(|g| *g = None);
    }

    /// Clips the accumulated gradients to `max_grad_norm` (global L2; <= 0 turns clipping off), takes
    /// one AdamW step with `lr` and clears the gradients. Returns the norm before clipping.
    fn optimizer_step(&self, py: Python<'_>, lr: f64, max_grad_norm: f64) -> PyResult<f64> {
        detached(py, |_| {
            let mut grads = lock(&self.grads);
            let norm = clip_grad_norm(&mut grads, max_grad_norm)?;
            lock(&self.opt).step(lr, &grads)?;
            grads.iter_mut().for_each(|g| *g = None);
            Ok(norm)
        })
    }

    /// Optimizer state: {"step": n, "exp_avg/<name>": array, "exp_avg_sq/<name>": array}.
    fn optimizer_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let opt = lock(&self.opt);
        let d = PyDict::new(py);
        d.set_item("step", opt.step)?;
        for (p, a) in self.params.iter().zip(&opt.params) {
            let shape = p.var.dims().to_vec();
            for (key, v) in [("exp_avg", &a.m), ("exp_avg_sq", &a.v)] {
                let t = guard(|| Ok(Tensor::from_vec(v.clone(), shape.clone(), &Device::Cpu)?))?;
                d.set_item(format!("{key}/{}", p.name), to_numpy(py, &t)?)?;
            }
        }
        Ok(d)
    }

    /// Restores what `optimizer_state` returned.
    fn load_optimizer_state(&self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut opt = lock(&self.opt);
        let step: u64 = match state.get_item("step")? {
            Some(s) => s.extract()?,
            None => return guard(|| input_err::<()>("optimizer state lacks 'step'".to_string())),
        };
        for (p, a) in self.params.iter().zip(opt.params.iter_mut()) {
            for (key, dst) in [("exp_avg", &mut a.m), ("exp_avg_sq", &mut a.v)] {
                let k = format!("{key}/{}", p.name);
                let Some(v) = state.get_item(&k)? else {
                    return guard(|| input_err::<()>(format!("optimizer state lacks '{k}'")));
                };
                let arr: PyReadonlyArrayDyn<'_, f32> = v.extract()?;
                if arr.shape() != p.var.dims() {
                    return guard(|| input_err::<()>(format!("optimizer state '{k}' has shape {:?}, expected {:?}", arr.shape(), p.var.dims())));
                }
                *dst = arr.as_array().iter().copied().collect();
            }
        }
        opt.step = step;
        Ok(())
    }
}

fn dpo_dict<'py>(py: Python<'py>, s: &DpoStats, m: &MicroStats) -> PyResult<Bound<'py, PyDict>> {
    let d = stats_dict(py, m)?;
    d.set_item("loss", s.loss)?;
    d.set_item("chosen_logps", s.chosen_logps.clone())?;
    d.set_item("rejected_logps", s.rejected_logps.clone())?;
    d.set_item("chosen_rewards", s.chosen_rewards.clone())?;
    d.set_item("rejected_rewards", s.rejected_rewards.clone())?;
    d.set_item("chosen_logits_sum", s.chosen_logits_sum)?;
    d.set_item("rejected_logits_sum", s.rejected_logits_sum)?;
    d.set_item("chosen_tokens", s.chosen_tokens)?;
    d.set_item("rejected_tokens", s.rejected_tokens)?;
    d.set_item("vocab", s.vocab)?;
    d.set_item("chosen_correct", s.chosen_correct)?;
    Ok(d)
}

/// Per-sequence completion log-probabilities (sums, or means with `average`) of `model`, no gradient.
pub(crate) fn sequence_logps_of(model: &VlmModel, inputs: &OwnedInput, average: bool, cache: Option<&FeatureCache>, interrupt: crate::model::Interrupt) -> Result<Vec<f64>, Error> {
    let mut out = Vec::new();
    let mut obj = |h: &HeadOut| -> crate::error::Result<Tensor> {
        let (lp, _) = dpo::sequence_logps(h, average)?;
        out = lp.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        Ok(lp.sum_all()?)
    };
    let mut none: Vec<Option<Tensor>> = Vec::new();
    run_objective(model, &[], &inputs.view(0), &mut none, cache, &StepOptions { paired: true, ..StepOptions::default() }, interrupt, &mut obj)?;
    Ok(out)
}

/// Per-sequence completion log-probabilities of any model (e.g. an explicit DPO `ref_model`).
#[pyfunction]
#[pyo3(signature = (model, input_ids, labels, attention_mask=None, pixel_values=None, pixel_attention_mask=None, average=false))]
#[allow(clippy::too_many_arguments)]
fn sequence_logps<'py>(
    py: Python<'py>,
    model: &PyVlmModel,
    input_ids: PyReadonlyArrayDyn<'py, i64>,
    labels: PyReadonlyArrayDyn<'py, i64>,
    attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
    pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
    pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    average: bool,
) -> PyResult<Vec<f64>> {
    let inputs = guard(|| OwnedInput::copy(&input_ids, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref(), Some(&labels)))?;
    let m = model.get();
    detached(py, |interrupt| sequence_logps_of(&m, &inputs, average, None, interrupt))
}

/// transformers' learning-rate multiplier at optimizer step `step` (0-based).
#[pyfunction]
fn lr_multiplier(kind: &str, step: u64, total: u64, warmup: u64) -> PyResult<f64> {
    guard(|| lr_lambda(kind, step, total, warmup).map_err(Error::from))
}

/// TRL's names of the DPO losses the core implements (`DPOConfig.loss_type` values).
#[pyfunction]
fn dpo_loss_types() -> Vec<&'static str> {
    DpoLoss::names()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTrainSession>()?;
    m.add_function(wrap_pyfunction!(dpo_loss_types, m)?)?;
    m.add_function(wrap_pyfunction!(lr_multiplier, m)?)?;
    m.add_function(wrap_pyfunction!(sequence_logps, m)?)?;
    Ok(())
}
