//! Bindings of `crate::model::{compose, resize}`: a VLM from a language model and a vision tower, and
//! `resize_token_embeddings`.

use std::path::{Path, PathBuf};

use pyo3::prelude::*;

use super::errors::{detached, guard};
use super::model::PyVlmModel;
use crate::config::ModelConfig;
use crate::error::Error;
use crate::model::compose::{compose, ComposeOptions, VisionSource};
use crate::model::init::DEFAULT_INITIALIZER_RANGE;
use crate::model::resize::{resize_token_embeddings, ResizeOptions};
use crate::model::LoadCtx;

/// A new tower's config from a `vision_config` JSON object (transformers' defaults for missing keys).
fn random_source(json: &str) -> Result<VisionSource, Error> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| crate::error::ConfigError::Json { file: "vision_config".into(), msg: e.to_string() })?;
    let range = v.get("initializer_range").and_then(|r| r.as_f64()).unwrap_or(DEFAULT_INITIALIZER_RANGE);
    let wrapped = serde_json::json!({"model_type": "idefics3", "vision_config": v});
    let cfg = ModelConfig::from_json_str(&wrapped.to_string(), Path::new("vision_config"))?;
    Ok(VisionSource::Random { config: cfg.vision, initializer_range: range })
}

/// The VLM of `text_model` (a language model alone) with a new vision tower (`vision_config_json`), the
/// tower and connector of the checkpoint folder `vision_dir`, or those of the loaded `vision_model`;
/// its token embeddings resized to `vocab_size` rows (see `crate::model::compose`).
#[pyfunction]
#[pyo3(signature = (text_model, image_token_id, vocab_size, vision_config_json=None, vision_dir=None, vision_model=None, model_type="idefics3", scale_factor=2, reuse_connector=None, pad_to_multiple_of=None, mean_resizing=true, seed=0))]
#[allow(clippy::too_many_arguments)]
fn compose_vlm(
    py: Python<'_>,
    text_model: &PyVlmModel,
    image_token_id: i64,
    vocab_size: usize,
    vision_config_json: Option<&str>,
    vision_dir: Option<PathBuf>,
    vision_model: Option<&PyVlmModel>,
    model_type: &str,
    scale_factor: usize,
    reuse_connector: Option<bool>,
    pad_to_multiple_of: Option<usize>,
    mean_resizing: bool,
    seed: u64,
) -> PyResult<PyVlmModel> {
    let text = text_model.get();
    let donor = vision_model.map(|m| m.get());
    let opts = ComposeOptions {
        model_type: model_type.to_string(),
        scale_factor,
        image_token_id,
        resize: ResizeOptions { new_num_tokens: Some(vocab_size), pad_to_multiple_of, mean_resizing, seed },
        reuse_connector,
        seed,
    };
    let source = |ctx: &LoadCtx| -> Result<VisionSource, Error> {
        match (vision_config_json, &vision_dir, &donor) {
            (_, Some(dir), _) => VisionSource::from_dir(dir, ctx),
            (_, None, Some(m)) => VisionSource::from_model(m, "the vision_model given"),
            (Some(j), None, None) => random_source(j),
            (None, None, None) => random_source("{}"),
        }
    };
    let m = detached(py, |_| {
        let ctx = LoadCtx {
            dtype: text.dtype,
            device: text.device.clone(),
            bf16_storage: false,
            bf16_compute: text.bf16_compute,
            quant: None,
        };
        compose(&text, source(&ctx)?, &opts)
    })?;
    Ok(PyVlmModel::new(m))
}

/// `resize_token_embeddings` in place; returns the new row count.
#[pyfunction]
#[pyo3(signature = (model, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=true, seed=0))]
fn resize_embeddings(
    model: &PyVlmModel,
    new_num_tokens: Option<usize>,
    pad_to_multiple_of: Option<usize>,
    mean_resizing: bool,
    seed: u64,
) -> PyResult<usize> {
    let opts = ResizeOptions { new_num_tokens, pad_to_multiple_of, mean_resizing, seed };
    let mut rows = 0;
    guard(|| {
        model.update(|m| {
            rows = resize_token_embeddings(m, &opts)?;
            Ok(())
        })
    })?;
    Ok(rows)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compose_vlm, m)?)?;
    m.add_function(wrap_pyfunction!(resize_embeddings, m)?)?;
    Ok(())
}
