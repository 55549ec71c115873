//! Bindings of `crate::checkpoint`.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::errors::guard;
use crate::checkpoint::{resolve_dir as core_resolve, HubCache};

/// Resolves a local directory holding `marker`, or a hub id cached under `cache_dir` (default: the
/// environment's Hugging Face cache). Raises ModelNotCachedError for an id that is not cached.
#[pyfunction]
#[pyo3(signature = (id_or_path, revision=None, cache_dir=None, marker="config.json"))]
fn resolve_model_dir(
    id_or_path: &str,
    revision: Option<&str>,
    cache_dir: Option<PathBuf>,
    marker: &str,
) -> PyResult<String> {
    let cache = cache_dir.map(|root| HubCache { root }).unwrap_or_else(HubCache::from_env);
    guard(|| Ok(core_resolve(id_or_path, revision, &cache, marker)?.display().to_string()))
}

/// The hub cache directory the environment names.
#[pyfunction]
fn hub_cache_dir() -> String {
    HubCache::from_env().root.display().to_string()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(resolve_model_dir, m)?)?;
    m.add_function(wrap_pyfunction!(hub_cache_dir, m)?)?;
    Ok(())
}
