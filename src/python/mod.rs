//! Python bindings: the native module `ferrovlm._core`. One submodule per core module.

use pyo3::prelude::*;

mod checkpoint;
mod compose;
mod config;
mod data;
mod errors;
mod generate;
mod lora;
mod model;
mod ops;
mod train;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    checkpoint::register(m)?;
    config::register(m)?;
    model::register(m)?;
    compose::register(m)?;
    ops::register(m)?;
    generate::register(m)?;
    data::register(m)?;
    lora::register(m)?;
    train::register(m)?;
    Ok(())
}
