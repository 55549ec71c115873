//! Bindings of `crate::generate`.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{detached, guard};
use super::model::{OwnedInput, PyVlmModel};
use crate::error::{input_err, Error};
use crate::generate::{generate, EarlyStopping, GenerationConfig};

fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> Result<T, Error> {
    match d.get_item(key) {
        Ok(Some(v)) => v.extract::<T>().or_else(|e| {
            let e: PyErr = e.into();
            input_err(format!("generation setting '{key}': {e}"))
        }),
        _ => input_err(format!("generation setting '{key}' is missing")),
    }
}

fn config_from(d: &Bound<'_, PyDict>) -> Result<GenerationConfig, Error> {
    let early: String = get(d, "early_stopping")?;
    Ok(GenerationConfig {
        max_length: get(d, "max_length")?,
        min_new_tokens: get(d, "min_new_tokens")?,
        do_sample: get(d, "do_sample")?,
        temperature: get(d, "temperature")?,
        top_k: get(d, "top_k")?,
        top_p: get(d, "top_p")?,
        repetition_penalty: get(d, "repetition_penalty")?,
        num_beams: get(d, "num_beams")?,
        length_penalty: get(d, "length_penalty")?,
        early_stopping: match early.as_str() {
            "true" => EarlyStopping::True,
            "false" => EarlyStopping::False,
            "never" => EarlyStopping::Never,
            other => return input_err(format!("early_stopping must be True, False or 'never', got {other}")),
        },
        eos_token_ids: get(d, "eos_token_ids")?,
        pad_token_id: get(d, "pad_token_id")?,
        seed: get(d, "seed")?,
    })
}

/// Generates continuations: returns prompt + new ids [B, T] int64. `config` holds the resolved
/// settings (see ferrovlm.generation). `on_token(list[int]) -> bool` is called after each step
/// (greedy/sampling); returning False stops.
#[pyfunction]
#[pyo3(signature = (model, input_ids, attention_mask, pixel_values, pixel_attention_mask, config, on_token=None))]
#[allow(clippy::too_many_arguments)]
fn generate_ids<'py>(
    py: Python<'py>,
    model: PyRef<'py, PyVlmModel>,
    input_ids: PyReadonlyArrayDyn<'py, i64>,
    attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
    pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
    pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    config: Bound<'py, PyDict>,
    on_token: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let cfg = guard(|| config_from(&config))?;
    let inputs = guard(|| {
        OwnedInput::copy(
            &input_ids,
            attention_mask.as_ref(),
            pixel_values.as_ref(),
            pixel_attention_mask.as_ref(),
            None,
        )
    })?;
    let model = model.get_active()?;
    // A Python error raised by the callback is kept and re-raised after the GIL comes back.
    let mut callback_err: Option<PyErr> = None;
    let seqs = {
        let err_slot = &mut callback_err;
        detached(py, move |interrupt| {
            let mut cb = |tokens: &[u32]| -> bool {
                match &on_token {
                    None => true,
                    Some(f) => Python::attach(|py| match f.call1(py, (tokens.to_vec(),)) {
                        Ok(r) => r.extract::<Option<bool>>(py).ok().flatten().unwrap_or(true),
                        Err(e) => {
                            *err_slot = Some(e);
                            false
                        }
                    }),
                }
            };
            generate(&model, &inputs.view(0), &cfg, Some(&mut cb), interrupt)
        })?
    };
    if let Some(e) = callback_err {
        return Err(e);
    }
    let (b, t) = (seqs.len(), seqs.first().map_or(0, Vec::len));
    let flat: Vec<i64> = seqs.into_iter().flatten().map(i64::from).collect();
    let arr = guard(|| Array2::from_shape_vec((b, t), flat).or_else(|e| input_err(e.to_string())))?;
    Ok(arr.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(generate_ids, m)?)?;
    Ok(())
}
