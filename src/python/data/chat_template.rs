//! Bindings of `crate::data::chat_template`.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::data::chat_template::{ChatTemplate, ChatTemplates, RenderOptions};
use crate::data::chat_template_value::TemplateValue;
use crate::error::{DataError, Error};
use crate::python::errors::guard;

fn parse(json: Option<&str>, what: &str) -> Result<Option<TemplateValue>, Error> {
    json.map(|s| {
        TemplateValue::from_json_str(s)
            .map_err(|e| Error::Data(DataError::Invalid(format!("{what}: invalid JSON: {e}"))))
    })
    .transpose()
}

/// A compiled chat template (sandboxed Jinja, configured like transformers).
#[pyclass(name = "ChatTemplate", module = "ferrovlm._core", frozen)]
pub struct PyChatTemplate {
    inner: ChatTemplate,
}

#[pymethods]
impl PyChatTemplate {
    #[new]
    fn new(source: String) -> PyResult<Self> {
        guard(|| Ok(PyChatTemplate { inner: ChatTemplate::new(source)? }))
    }

    #[getter]
    fn source(&self) -> &str {
        self.inner.source()
    }

    /// Renders one conversation given as JSON (key order is kept). `variables_json` is an object of
    /// extra template variables (special tokens first, then the caller's keyword arguments).
    #[pyo3(signature = (messages_json, add_generation_prompt=false, continue_final_message=None, normalize_image_urls=false, variables_json=None, tools_json=None, documents_json=None))]
    #[allow(clippy::too_many_arguments)]
    fn render(
        &self,
        messages_json: &str,
        add_generation_prompt: bool,
        continue_final_message: Option<String>,
        normalize_image_urls: bool,
        variables_json: Option<&str>,
        tools_json: Option<&str>,
        documents_json: Option<&str>,
    ) -> PyResult<String> {
        guard(|| {
            let variables = match parse(variables_json, "variables")? {
                Some(TemplateValue::Map(pairs)) => pairs,
                Some(_) => {
                    return Err(Error::Data(DataError::Invalid("template variables must be a JSON object".into())))
                }
                None => Vec::new(),
            };
            let opts = RenderOptions {
                add_generation_prompt,
                continue_final_message,
                normalize_image_urls,
                tools: parse(tools_json, "tools")?,
                documents: parse(documents_json, "documents")?,
                variables,
            };
            self.inner.render_json(messages_json, &opts)
        })
    }
}

/// Named templates of a checkpoint folder as (name, source) pairs, `None` when it has none.
/// `kind` is "processor" or "tokenizer" (they read different files, like transformers).
#[pyfunction]
fn load_chat_templates(dir: PathBuf, kind: &str) -> PyResult<Option<Vec<(String, String)>>> {
    guard(|| {
        let t = match kind {
            "processor" => ChatTemplates::for_processor(&dir)?,
            _ => ChatTemplates::for_tokenizer(&dir)?,
        };
        Ok(t.map(|t| t.templates))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyChatTemplate>()?;
    m.add_function(wrap_pyfunction!(load_chat_templates, m)?)?;
    Ok(())
}
