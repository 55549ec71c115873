//! Bindings of `crate::train` and `crate::optim`: [`TrainSession`] as `_core.TrainSession`.

use std::sync::{Mutex, MutexGuard};

use candle_core::{Device, Tensor};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{detached, guard};
use super::model::{to_numpy, OwnedInput, PyVlmModel};
use crate::error::{input_err, Error};
use crate::optim::{lr_lambda, AdamWConfig};
use crate::train::dpo::{DpoLoss, DpoSpec, DpoStats};
use crate::train::session::{sequence_logps as sequence_logps_of, Moments, OptimizerState};
use crate::train::{MicroStats, SessionConfig, StepOptions, TrainSession};

/// A [`TrainSession`] (gradients accumulated over micro-batches, AdamW over the model's trainable
/// tensors, the frozen-vision feature cache) behind a lock; every call releases the GIL while it runs.
#[pyclass(name = "TrainSession", module = "ferrovlm._core", frozen)]
pub struct PyTrainSession {
    inner: Mutex<TrainSession>,
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

/// The batch arrays of one call, copied out of numpy (the GIL is released while they are used).
fn owned<'py>(
    input_ids: &PyReadonlyArrayDyn<'py, i64>,
    labels: &PyReadonlyArrayDyn<'py, i64>,
    attention_mask: Option<&PyReadonlyArrayDyn<'py, i64>>,
    pixel_values: Option<&PyReadonlyArrayDyn<'py, f32>>,
    pixel_attention_mask: Option<&PyReadonlyArrayDyn<'py, bool>>,
) -> PyResult<OwnedInput> {
    guard(|| OwnedInput::copy(input_ids, attention_mask, pixel_values, pixel_attention_mask, Some(labels)))
}

#[pymethods]
impl PyTrainSession {
    /// `no_decay`: names of the tensors without weight decay. `feature_cache_mb` = 0 turns the
    /// frozen-vision cache off. `bf16`: TrainingArguments' `bf16=True` on a CPU (autocast: products
    /// with frozen weights in bf16). `trainable`: the model's own parameters to train as well
    /// (full-parameter training, transformers' names): the session trains copies of them, and `model`
    /// sees every update (it then holds views of the same storage).
    #[new]
    #[pyo3(signature = (model, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, no_decay=vec![], feature_cache_mb=1024, bf16=false, trainable=vec![]))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &PyVlmModel,
        weight_decay: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        no_decay: Vec<String>,
        feature_cache_mb: usize,
        bf16: bool,
        trainable: Vec<String>,
    ) -> PyResult<Self> {
        let cfg = SessionConfig {
            adam: AdamWConfig { beta1, beta2, eps, weight_decay },
            no_decay,
            feature_cache_bytes: feature_cache_mb << 20,
            bf16_autocast: bf16,
        };
        let session = guard(|| {
            let tracked = std::sync::Arc::new(model.get().with_trainable(&trainable)?);
            let session = TrainSession::new(tracked.clone(), &cfg)?;
            let view = tracked.detached()?;
            model.update(|m| {
                *m = view;
                Ok(())
            })?;
            Ok::<_, Error>(session)
        })?;
        Ok(PyTrainSession { inner: Mutex::new(session) })
    }

    #[getter]
    fn param_names(&self) -> Vec<String> {
        lock(&self.inner).params().iter().map(|p| p.name.clone()).collect()
    }

    /// Distinct images whose features are cached.
    #[getter]
    fn cached_images(&self) -> usize {
        lock(&self.inner).cached_images()
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
        let inputs =
            owned(&input_ids, &labels, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref())?;
        let opts = StepOptions { gradient_checkpointing, dropout_seed, backward: true, paired: false };
        let stats = detached(py, |interrupt| {
            lock(&self.inner).forward_backward(&inputs.view(0), &opts, loss_scale, interrupt)
        })?;
        stats_dict(py, &stats)
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
        let inputs =
            owned(&input_ids, &labels, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref())?;
        let stats = detached(py, |interrupt| lock(&self.inner).evaluate(&inputs.view(0), interrupt))?;
        stats_dict(py, &stats)
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
        let inputs =
            owned(&input_ids, &labels, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref())?;
        detached(py, |interrupt| lock(&self.inner).sequence_logps(&inputs.view(0), average, interrupt))
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
        let inputs =
            owned(&input_ids, &labels, attention_mask.as_ref(), pixel_values.as_ref(), pixel_attention_mask.as_ref())?;
        let losses =
            guard(|| losses.iter().map(|(k, w)| Ok((DpoLoss::parse(k)?, *w))).collect::<Result<Vec<_>, Error>>())?;
        let spec = DpoSpec { losses, beta, label_smoothing, loss_scale };
        let opts = StepOptions { gradient_checkpointing, dropout_seed, backward, paired: true };
        let (ds, ms) =
            detached(py, |interrupt| lock(&self.inner).dpo_step(&inputs.view(0), &spec, &ref_logps, &opts, interrupt))?;
        dpo_dict(py, &ds, &ms)
    }

    /// The accumulated gradients by PEFT key (tensors without a gradient are left out).
    fn grads<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let s = lock(&self.inner);
        for (p, g) in s.params().iter().zip(s.grad_slots()) {
            if let Some(g) = g {
                d.set_item(&p.name, to_numpy(py, &guard(|| Ok(g.reshape(p.shape.as_slice())?))?)?)?;
            }
        }
        Ok(d)
    }

    /// Values of all trainable tensors together: the length of `flat_grads()` and `flat_parameters()`.
    #[getter]
    fn numel(&self) -> usize {
        lock(&self.inner).numel()
    }

    /// The accumulated gradients as one float32 buffer (`param_names` order, zeros for a tensor without
    /// a gradient yet) and which tensors have one (bool per tensor): what data-parallel training
    /// all-reduces before `optimizer_step`.
    fn flat_grads<'py>(&self, py: Python<'py>) -> PyResult<FlatGrads<'py>> {
        let (flat, present) = detached(py, |_| lock(&self.inner).flat_grads())?;
        Ok((flat.into_pyarray(py), present.into_pyarray(py)))
    }

    /// Replaces the accumulated gradients by `scale` x `flat` (laid out as `flat_grads()` returns it;
    /// e.g. the sum over the ranks with `scale` = 1 / world size); tensor i gets one when `present[i]`.
    #[pyo3(signature = (flat, present, scale=1.0))]
    fn set_flat_grads(
        &self,
        py: Python<'_>,
        flat: PyReadonlyArray1<'_, f32>,
        present: PyReadonlyArray1<'_, bool>,
        scale: f32,
    ) -> PyResult<()> {
        let flat = contiguous(&flat, "flat")?;
        let present = contiguous(&present, "present")?;
        detached(py, |_| lock(&self.inner).set_flat_grads(flat, present, scale))
    }

    /// The values of every trainable tensor as one float32 buffer (`param_names` order).
    fn flat_parameters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        Ok(detached(py, |_| lock(&self.inner).flat_params())?.into_pyarray(py))
    }

    /// Sets every trainable tensor from one buffer laid out as `flat_parameters()` returns it (e.g.
    /// rank 0's values, broadcast); the model sees the new values.
    fn set_flat_parameters(&self, py: Python<'_>, flat: PyReadonlyArray1<'_, f32>) -> PyResult<()> {
        let flat = contiguous(&flat, "flat")?;
        detached(py, |_| lock(&self.inner).set_flat_params(flat))
    }

    fn zero_grad(&self) {
        lock(&self.inner).zero_grad();
    }

    /// Clips the accumulated gradients to `max_grad_norm` (global L2; <= 0 turns clipping off), takes
    /// one AdamW step with `lr` and clears the gradients. Returns the norm before clipping.
    fn optimizer_step(&self, py: Python<'_>, lr: f64, max_grad_norm: f64) -> PyResult<f64> {
        detached(py, |_| lock(&self.inner).optimizer_step(lr, max_grad_norm))
    }

    /// Optimizer state: {"step": n, "exp_avg/<name>": array, "exp_avg_sq/<name>": array}.
    fn optimizer_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = lock(&self.inner).optimizer_state();
        let d = PyDict::new(py);
        d.set_item("step", state.step)?;
        for m in state.moments {
            for (key, v) in [("exp_avg", m.exp_avg), ("exp_avg_sq", m.exp_avg_sq)] {
                let t = guard(|| Ok(Tensor::from_vec(v, m.shape.clone(), &Device::Cpu)?))?;
                d.set_item(format!("{key}/{}", m.name), to_numpy(py, &t)?)?;
            }
        }
        Ok(d)
    }

    /// Sets the model's own trained parameters from `state` (name -> array, e.g. a checkpoint's
    /// model.safetensors): all or nothing.
    fn load_parameters(&self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let values = crate::python::lora::tensors_from_dict(state)?;
        guard(|| lock(&self.inner).load_param_values(&values))
    }

    /// Restores what `optimizer_state` returned.
    fn load_optimizer_state(&self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut session = lock(&self.inner);
        let step: u64 = match state.get_item("step")? {
            Some(s) => s.extract()?,
            None => return guard(|| input_err::<()>("optimizer state lacks 'step'".to_string())),
        };
        let mut moments = Vec::new();
        for p in session.params() {
            let mut arrays = Vec::with_capacity(2);
            for key in ["exp_avg", "exp_avg_sq"] {
                let k = format!("{key}/{}", p.name);
                let Some(v) = state.get_item(&k)? else {
                    return guard(|| input_err::<()>(format!("optimizer state lacks '{k}'")));
                };
                let arr: PyReadonlyArrayDyn<'_, f32> = v.extract()?;
                if arr.shape() != p.var.dims() {
                    return guard(|| {
                        input_err::<()>(format!(
                            "optimizer state '{k}' has shape {:?}, expected {:?}",
                            arr.shape(),
                            p.var.dims()
                        ))
                    });
                }
                arrays.push(arr.as_array().iter().copied().collect::<Vec<f32>>());
            }
            let exp_avg_sq = arrays.pop().unwrap_or_default();
            let exp_avg = arrays.pop().unwrap_or_default();
            moments.push(Moments { name: p.name.clone(), shape: p.var.dims().to_vec(), exp_avg, exp_avg_sq });
        }
        guard(|| session.load_optimizer_state(&OptimizerState { step, moments }))
    }
}

/// `flat_grads()`: the values, and which tensors have a gradient.
type FlatGrads<'py> = (Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<bool>>);

/// The values of a 1-D array, which must be contiguous.
fn contiguous<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    match a.as_slice() {
        Ok(s) => Ok(s),
        Err(_) => guard(|| input_err(format!("{name} must be a contiguous 1-D array"))),
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
    let inputs = guard(|| {
        OwnedInput::copy(
            &input_ids,
            attention_mask.as_ref(),
            pixel_values.as_ref(),
            pixel_attention_mask.as_ref(),
            Some(&labels),
        )
    })?;
    let m = model.get_active()?;
    detached(py, |interrupt| sequence_logps_of(&m, &inputs.view(0), average, None, interrupt))
}

/// transformers' learning-rate multiplier at optimizer step `step` (0-based).
#[pyfunction]
fn lr_multiplier(kind: &str, step: u64, total: u64, warmup: u64) -> PyResult<f64> {
    guard(|| lr_lambda(kind, step, total, warmup))
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
