//! Bindings of `crate::data`: one file per core module.

use pyo3::prelude::*;

mod chat_template;
mod image;
mod processor;
mod tokenizer;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    tokenizer::register(m)?;
    chat_template::register(m)?;
    image::register(m)?;
    processor::register(m)?;
    Ok(())
}
