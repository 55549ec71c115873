//! Bindings of `crate::lora` and the PEFT adapter files (`crate::checkpoint::peft`).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::guard;
use super::model::{to_numpy, PyVlmModel};
use crate::checkpoint::peft;
use crate::lora::{self, AdapterPlan, LoraInit, LoraSpec};

/// Every Linear module name of the model, in module order (transformers' names).
#[pyfunction]
fn linear_names(model: &PyVlmModel) -> Vec<String> {
    model.get().linears().into_iter().map(|(n, _)| n).collect()
}

/// Every module name of the transformers model (`named_modules()`: parents, Linear layers, norms,
/// embeddings), for PEFT's name matching.
#[pyfunction]
fn module_names(model: &PyVlmModel) -> Vec<String> {
    let m = model.get();
    crate::model::modules::module_names(m.vision.as_ref().map(|v| v.layers.len()), m.text.layers.len())
}

/// Attaches LoRA adapters to `targets` and trainable copies to the Linear layers `modules_to_save` and to
/// the other parameters `saved_params` (transformers' names: norms, embeddings, ...), replacing any adapters.
#[pyfunction]
#[pyo3(signature = (model, targets, r, lora_alpha, lora_dropout=0.0, use_dora=false, use_rslora=false, init_lora_weights="true", seed=0, modules_to_save=vec![], saved_params=vec![]))]
#[allow(clippy::too_many_arguments)]
fn add_adapters(
    model: &PyVlmModel,
    targets: Vec<String>,
    r: usize,
    lora_alpha: f64,
    lora_dropout: f32,
    use_dora: bool,
    use_rslora: bool,
    init_lora_weights: &str,
    seed: u64,
    modules_to_save: Vec<String>,
    saved_params: Vec<String>,
) -> PyResult<()> {
    guard(|| {
        if r == 0 {
            return crate::error::input_err("LoRA rank r must be positive".to_string());
        }
        if !(0.0..1.0).contains(&lora_dropout) {
            return crate::error::input_err(format!("lora_dropout must be in [0, 1), got {lora_dropout}"));
        }
        let spec = LoraSpec {
            r,
            alpha: lora_alpha,
            dropout: lora_dropout,
            use_dora,
            use_rslora,
            init: LoraInit::parse(init_lora_weights)?,
            seed,
        };
        let plan = AdapterPlan { lora_targets: targets, spec, modules_to_save, saved_params };
        model.update(|m| lora::attach(m, &plan))
    })
}

/// Removes the adapters; with `merge`, folds them into the base weights first.
#[pyfunction]
#[pyo3(signature = (model, merge=false))]
fn remove_adapters(model: &PyVlmModel, merge: bool) -> PyResult<()> {
    guard(|| model.update(|m| lora::detach(m, merge)))
}

/// PEFT's `prepare_model_for_kbit_training` upcast: Linears that are not quantized and were packed for
/// the bf16 compute mode compute in f32 with their bf16 weights (exact widening).
#[pyfunction]
fn upcast_dense_layers(model: &PyVlmModel) -> PyResult<()> {
    guard(|| model.update(|m| m.upcast_dense_layers()))
}

/// Training mode on or off (`model.train()` / `model.eval()`): adapter dropout, and bitsandbytes'
/// training product for int8 layers.
#[pyfunction]
fn set_training(model: &PyVlmModel, on: bool) {
    model.get().set_training(on)
}

/// Turns every adapter on or off (PEFT's `disable_adapter()`).
#[pyfunction]
fn set_adapters_enabled(model: &PyVlmModel, enabled: bool) {
    model.get().switch.set_enabled(enabled)
}

#[pyfunction]
fn adapters_enabled(model: &PyVlmModel) -> bool {
    model.get().switch.enabled()
}

/// The parameters (transformers' names) that `modules_to_save` copies replace, outside Linear adapters.
#[pyfunction]
fn saved_module_params(model: &PyVlmModel) -> Vec<String> {
    model.get().saved.names()
}

/// (PEFT key, shape) of every trainable tensor.
#[pyfunction]
fn trainable_shapes(model: &PyVlmModel) -> Vec<(String, Vec<usize>)> {
    crate::train::trainable_params(&model.get()).into_iter().map(|p| (p.name, p.var.dims().to_vec())).collect()
}

/// The adapter tensors under PEFT's keys, as float32 arrays.
#[pyfunction]
fn adapter_state<'py>(py: Python<'py>, model: &PyVlmModel) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, t) in guard(|| lora::state(&model.get()))? {
        d.set_item(k, to_numpy(py, &t)?)?;
    }
    Ok(d)
}

pub(crate) fn tensors_from_dict(state: &Bound<'_, PyDict>) -> PyResult<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (k, v) in state.iter() {
        let name: String = k.extract()?;
        let arr: PyReadonlyArrayDyn<'_, f32> = v.extract()?;
        let shape = arr.shape().to_vec();
        let data: Vec<f32> = arr.as_array().iter().copied().collect();
        out.push((name, guard(|| Ok(Tensor::from_vec(data, shape, &Device::Cpu)?))?));
    }
    Ok(out)
}

/// Sets adapter tensors from a dict of PEFT keys to float32 arrays.
#[pyfunction]
#[pyo3(signature = (model, state, strict=true))]
fn load_adapter_state(model: &PyVlmModel, state: &Bound<'_, PyDict>, strict: bool) -> PyResult<()> {
    let tensors = tensors_from_dict(state)?;
    guard(|| lora::load_state(&model.get(), &tensors, strict))
}

/// Writes a dict of float32 arrays as a safetensors file (atomically).
#[pyfunction]
fn save_safetensors(path: PathBuf, state: &Bound<'_, PyDict>) -> PyResult<()> {
    let tensors = tensors_from_dict(state)?;
    guard(|| Ok(peft::save_tensors(&path, &tensors)?))
}

/// Reads every tensor of a safetensors file as float32 arrays.
#[pyfunction]
fn load_safetensors<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let tensors = guard(|| Ok(peft::load_tensors(&path)?))?;
    let d = PyDict::new(py);
    for (k, t) in tensors {
        let a: Bound<'py, PyArrayDyn<f32>> = to_numpy(py, &t)?;
        d.set_item(k, a)?;
    }
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(linear_names, m)?)?;
    m.add_function(wrap_pyfunction!(module_names, m)?)?;
    m.add_function(wrap_pyfunction!(add_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(remove_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(set_adapters_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(upcast_dense_layers, m)?)?;
    m.add_function(wrap_pyfunction!(set_training, m)?)?;
    m.add_function(wrap_pyfunction!(adapters_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(saved_module_params, m)?)?;
    m.add_function(wrap_pyfunction!(trainable_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_state, m)?)?;
    m.add_function(wrap_pyfunction!(load_adapter_state, m)?)?;
    m.add_function(wrap_pyfunction!(save_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(load_safetensors, m)?)?;
    Ok(())
}
