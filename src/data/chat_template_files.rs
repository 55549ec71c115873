//! Where a checkpoint's chat templates live, in transformers' precedence: `chat_template.jinja` (+
//! `additional_chat_templates/`), `chat_template.json`, `processor_config.json`, `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use crate::data::chat_template::{template_err, ChatTemplate};
use crate::data::chat_template_value::TemplateValue;
use crate::error::Result;

/// The chat templates of a checkpoint folder: a default one and named ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplates {
    /// Templates by name in load order; `"default"` is the one used when none is named.
    pub templates: Vec<(String, String)>,
    /// The file the templates were read from (for messages).
    pub origin: PathBuf,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| template_err(format!("{}: cannot read: {e}", path.display())))
}

fn read_json(path: &Path) -> Result<TemplateValue> {
    TemplateValue::from_json_str(&read_text(path)?)
        .map_err(|e| template_err(format!("{}: invalid JSON: {e}", path.display())))
}

/// `additional_chat_templates/*.jinja`, sorted by name.
fn additional_templates(dir: &Path) -> Result<Vec<(String, String)>> {
    let sub = dir.join("additional_chat_templates");
    if !sub.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(&sub).map_err(|e| template_err(format!("{}: cannot list: {e}", sub.display())))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| template_err(format!("{}: cannot list: {e}", sub.display())))?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("jinja") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.push((stem.to_string(), read_text(&path)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A `chat_template` value from a config file: a string, or a list of `{name, template}`.
fn templates_from_field(value: &TemplateValue, file: &Path) -> Result<Vec<(String, String)>> {
    match value {
        TemplateValue::Str(s) => Ok(vec![("default".into(), s.clone())]),
        TemplateValue::List(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                match (
                    item.get("name").and_then(TemplateValue::as_str),
                    item.get("template").and_then(TemplateValue::as_str),
                ) {
                    (Some(n), Some(t)) => Ok((n.to_string(), t.to_string())),
                    _ => Err(template_err(format!(
                        "{}: chat_template[{i}] must be an object with string \"name\" and \"template\"",
                        file.display()
                    ))),
                }
            })
            .collect(),
        other => Err(template_err(format!(
            "{}: chat_template must be a string or a list of {{name, template}}, got {}",
            file.display(),
            other.kind_name()
        ))),
    }
}

impl ChatTemplates {
    /// The templates a tokenizer loaded from `dir` uses (transformers' precedence): `chat_template.jinja`
    /// plus `additional_chat_templates/*.jinja` when any exist, else `tokenizer_config.json`'s
    /// `chat_template`. `Ok(None)` when there is none.
    pub fn for_tokenizer(dir: &Path) -> Result<Option<ChatTemplates>> {
        let jinja = dir.join("chat_template.jinja");
        let mut templates = Vec::new();
        if jinja.is_file() {
            templates.push(("default".to_string(), read_text(&jinja)?));
        }
        templates.extend(additional_templates(dir)?);
        if !templates.is_empty() {
            return Ok(Some(ChatTemplates { templates, origin: jinja }));
        }
        let config = dir.join("tokenizer_config.json");
        if config.is_file() {
            if let Some(field) = read_json(&config)?.get("chat_template") {
                if *field != TemplateValue::Null {
                    let templates = templates_from_field(field, &config)?;
                    return Ok(Some(ChatTemplates { templates, origin: config }));
                }
            }
        }
        Ok(None)
    }

    /// The templates a processor loaded from `dir` uses: `processor_config.json`'s `chat_template`,
    /// else `chat_template.json` (an error if `additional_chat_templates/` also has templates, as in
    /// transformers), else `chat_template.jinja` plus `additional_chat_templates/*.jinja`.
    /// The tokenizer's template is not a fallback. `Ok(None)` when there is none.
    pub fn for_processor(dir: &Path) -> Result<Option<ChatTemplates>> {
        let processor_config = dir.join("processor_config.json");
        if processor_config.is_file() {
            if let Some(field) = read_json(&processor_config)?.get("chat_template") {
                if *field != TemplateValue::Null {
                    let templates = templates_from_field(field, &processor_config)?;
                    return Ok(Some(ChatTemplates { templates, origin: processor_config }));
                }
            }
        }
        let legacy = dir.join("chat_template.json");
        let extra = additional_templates(dir)?;
        if legacy.is_file() {
            if !extra.is_empty() {
                return Err(template_err(format!(
                    "{}: conflicting chat template files: a legacy chat_template.json together with \
                     additional_chat_templates/; replace chat_template.json by chat_template.jinja",
                    dir.display()
                )));
            }
            let field = read_json(&legacy)?.get("chat_template").cloned().unwrap_or(TemplateValue::Null);
            let TemplateValue::Str(source) = field else {
                return Err(template_err(format!("{}: \"chat_template\" must be a string", legacy.display())));
            };
            return Ok(Some(ChatTemplates { templates: vec![("default".into(), source)], origin: legacy }));
        }
        let jinja = dir.join("chat_template.jinja");
        let mut templates = Vec::new();
        if jinja.is_file() {
            templates.push(("default".to_string(), read_text(&jinja)?));
        }
        templates.extend(extra);
        Ok((!templates.is_empty()).then_some(ChatTemplates { templates, origin: jinja }))
    }

    /// The template source named `name`; with no name, `"tool_use"` when `with_tools` and it exists,
    /// else `"default"` (an error listing the names if there is no default).
    pub fn select(&self, name: Option<&str>, with_tools: bool) -> Result<&str> {
        let find = |n: &str| self.templates.iter().find(|(k, _)| k == n).map(|(_, t)| t.as_str());
        let names = || self.templates.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ");
        match name {
            Some(n) => find(n).ok_or_else(|| {
                template_err(format!(
                    "{}: no chat template named \"{n}\" (available: {})",
                    self.origin.display(),
                    names()
                ))
            }),
            None => {
                let tool = if with_tools { find("tool_use") } else { None };
                tool.or_else(|| find("default")).ok_or_else(|| {
                    template_err(format!(
                        "{}: several chat templates and none named \"default\"; pass a name (available: {})",
                        self.origin.display(),
                        names()
                    ))
                })
            }
        }
    }

    /// Compiles the selected template (see [`ChatTemplates::select`]).
    pub fn compile(&self, name: Option<&str>, with_tools: bool) -> Result<ChatTemplate> {
        ChatTemplate::with_origin(self.select(name, with_tools)?, self.origin.display().to_string())
    }
}
