//! Chat templates: render a checkpoint's own Jinja template exactly like transformers.
//!
//! transformers compiles templates with `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])`, adds `raise_exception`,
//! `strftime_now`, a `tojson` filter that is `json.dumps(..., ensure_ascii=False)`, and renders with
//! `messages`, `tools`, `documents`, `add_generation_prompt` and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, ...). Here the same template runs on minijinja with Python string/dict
//! methods (minijinja-contrib `pycompat`), Python's `str()` for printed values, insertion-ordered
//! dicts, and no loader (no `include`/`import` of files, no environment access).
//! `{% generation %}...{% endgeneration %}` blocks render their body (assistant masks are not tracked).
//!
//! Where templates come from (see [`ChatTemplates`]): a tokenizer reads `chat_template.jinja` (+
//! `additional_chat_templates/*.jinja`), else `tokenizer_config.json`'s `chat_template` (a string or a
//! list of `{name, template}`); a processor reads `processor_config.json`'s `chat_template`, else
//! `chat_template.json`, else `chat_template.jinja` (+ `additional_chat_templates/`).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Rest, Value};
use minijinja::{Environment, ErrorKind, State};

use crate::data::chat_template_value::TemplateValue;
use crate::data::python_text::{json_dumps, py_str, strftime_utc, JsonOptions};
use crate::error::{DataError, Error, Result};

const TEMPLATE_NAME: &str = "chat_template";
const RAISE_MARKER: &str = "\u{1}raise_exception\u{1}";
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
/// Instructions one rendering may execute (minijinja's fuel): a real chat template over a long
/// conversation uses well under a million; a template that loops for ever stops with an error.
const TEMPLATE_FUEL: u64 = 50_000_000;
/// Largest `tojson(indent=n)`.
const MAX_JSON_INDENT: usize = 1024;

pub(crate) fn template_err(msg: impl Into<String>) -> Error {
    Error::Data(DataError::Template(msg.into()))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Data(DataError::Invalid(msg.into()))
}

/// Options of one rendering (the keyword arguments of `apply_chat_template`).
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the assistant header (`Assistant:` for SmolVLM).
    pub add_generation_prompt: bool,
    /// Leave the last message open so the model continues it: `Some("content")` is transformers'
    /// `continue_final_message=True`; another field name continues that field. Incompatible with
    /// `add_generation_prompt`.
    pub continue_final_message: Option<String>,
    /// Turn OpenAI `{"type": "image_url", "image_url": {"url": u}}` blocks into
    /// `{"type": "image", "url": u}` first, as `processor.apply_chat_template` does (the tokenizer's
    /// `apply_chat_template` does not).
    pub normalize_image_urls: bool,
    /// The `tools` variable (`None` in the template when absent).
    pub tools: Option<TemplateValue>,
    /// The `documents` variable (`None` in the template when absent).
    pub documents: Option<TemplateValue>,
    /// Further variables: the tokenizer's special tokens map (`bos_token`, `eos_token`, ...) followed by
    /// user keyword arguments; later entries win, like `{**special_tokens_map, **kwargs}`.
    pub variables: Vec<(String, TemplateValue)>,
}

impl RenderOptions {
    /// Options with `add_generation_prompt` set and the given special tokens as variables.
    pub fn new(add_generation_prompt: bool, special_tokens: &[(String, String)]) -> Self {
        RenderOptions {
            add_generation_prompt,
            variables: special_tokens.iter().map(|(k, v)| (k.clone(), TemplateValue::from(v.as_str()))).collect(),
            ..Default::default()
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    source: String,
    origin: String,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("len", &self.source.len()).finish()
    }
}

impl ChatTemplate {
    /// Compiles a template source. A syntax error is a [`DataError::Template`] naming the line.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        Self::with_origin(source, "chat template")
    }

    /// Like [`ChatTemplate::new`]; `origin` (e.g. the file it came from) prefixes error messages.
    pub fn with_origin(source: impl Into<String>, origin: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            out.write_str(&py_str(value)).map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "write failed"))
        });
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_fuel(Some(TEMPLATE_FUEL));
        let rewritten = rewrite_generation_tags(&source);
        // The template engine is third-party code: a panic on a hostile template becomes an error.
        catch_unwind(AssertUnwindSafe(|| env.add_template_owned(TEMPLATE_NAME, rewritten)))
            .map_err(|p| {
                template_err(format!(
                    "{origin}: cannot compile the chat template: the template engine crashed ({})",
                    panic_text(&p)
                ))
            })?
            .map_err(|e| template_err(format!("{origin}: cannot compile the chat template: {}", describe(&e))))?;
        Ok(ChatTemplate { source, origin, env })
    }

    /// The template source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON list of `{role, content, ...}` objects; `content` a string or a list
    /// of `{"type": "text", "text": ...}` / `{"type": "image", ...}` blocks). Key order follows the
    /// `serde_json` map; use [`ChatTemplate::render_json`] to keep the caller's order exactly.
    pub fn render(&self, messages: &serde_json::Value, options: &RenderOptions) -> Result<String> {
        self.render_value(&TemplateValue::from(messages), options)
    }

    /// Renders messages given as JSON text, keeping every object's key order.
    pub fn render_json(&self, messages_json: &str, options: &RenderOptions) -> Result<String> {
        let messages = TemplateValue::from_json_str(messages_json)
            .map_err(|e| invalid(format!("{}: messages are not valid JSON: {e}", self.origin)))?;
        self.render_value(&messages, options)
    }

    /// Renders messages given as a [`TemplateValue`] (what the other `render*` methods call).
    pub fn render_value(&self, messages: &TemplateValue, options: &RenderOptions) -> Result<String> {
        let mut chat = prepare_messages(messages, options.normalize_image_urls, &self.origin)?;
        let continued = match &options.continue_final_message {
            Some(field) => {
                if options.add_generation_prompt {
                    return Err(invalid(
                        "continue_final_message and add_generation_prompt are not compatible: use one or the other",
                    ));
                }
                Some(self.tag_final_message(&mut chat, field)?)
            }
            None => None,
        };
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &options.variables {
            ctx.insert(k.clone(), v.to_value());
        }
        ctx.insert("messages".into(), TemplateValue::List(chat).to_value());
        ctx.insert("tools".into(), options.tools.as_ref().map(|t| t.to_value()).unwrap_or(Value::from(())));
        ctx.insert("documents".into(), options.documents.as_ref().map(|t| t.to_value()).unwrap_or(Value::from(())));
        ctx.insert("add_generation_prompt".into(), Value::from(options.add_generation_prompt));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err(format!("{}: {}", self.origin, describe(&e))))?;
        let rendered = catch_unwind(AssertUnwindSafe(|| template.render(&ctx)))
            .map_err(|p| {
                template_err(format!(
                    "{}: rendering the chat template failed: the template engine crashed ({})",
                    self.origin,
                    panic_text(&p)
                ))
            })?
            .map_err(|e| self.render_error(&e))?;
        match continued {
            Some(final_text) => cut_at_continue_tag(rendered, &final_text),
            None => Ok(rendered),
        }
    }

    fn render_error(&self, e: &minijinja::Error) -> Error {
        if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISE_MARKER)) {
            return template_err(format!("{}: the chat template raised an exception: {msg}", self.origin));
        }
        if e.kind() == ErrorKind::OutOfFuel {
            return template_err(format!(
                "{}: rendering the chat template failed: it ran more than {TEMPLATE_FUEL} instructions (endless loop?)",
                self.origin
            ));
        }
        template_err(format!("{}: rendering the chat template failed: {}", self.origin, describe(e)))
    }

    /// transformers' `continue_final_message`: tag the final text so the rendering can be cut there.
    fn tag_final_message(&self, chat: &mut [TemplateValue], field: &str) -> Result<String> {
        let Some(TemplateValue::Map(last)) = chat.last_mut() else {
            return Err(invalid("continue_final_message is set but the conversation is empty"));
        };
        let final_message = match last.iter().find(|(k, _)| k == field) {
            Some((_, v)) => v.clone(),
            None => {
                return Err(invalid(format!(
                    "continue_final_message is set but the final message has no \"{field}\" to continue"
                )))
            }
        };
        let mut fields = vec![field.to_string()];
        if REASONING_FIELDS.contains(&field) {
            fields = REASONING_FIELDS
                .iter()
                .filter(|f| last.iter().any(|(k, v)| k == *f && *v == final_message))
                .map(|f| f.to_string())
                .collect();
        }
        if !fields.iter().any(|f| self.source.contains(f.as_str())) {
            return Err(invalid(format!(
                "continue_final_message is set to \"{field}\" but this is not an accepted field in the chat template"
            )));
        }
        if let TemplateValue::List(blocks) = &final_message {
            let mut blocks = blocks.clone();
            for block in blocks.iter_mut().rev() {
                if let TemplateValue::Map(entries) = block {
                    if let Some((_, text)) = entries.iter_mut().find(|(k, _)| k == "text") {
                        let original = text.as_str().map(str::to_string).ok_or_else(|| {
                            invalid("continue_final_message: the last text block's \"text\" is not a string")
                        })?;
                        *text = TemplateValue::Str(format!("{original}{CONTINUE_TAG}"));
                        if let Some((_, v)) = last.iter_mut().find(|(k, _)| k == field) {
                            *v = TemplateValue::List(blocks);
                        }
                        return Ok(original);
                    }
                }
            }
            return Err(invalid("continue_final_message is set but there is no text to continue in the final message"));
        }
        let original = final_message.as_str().map(str::to_string).ok_or_else(|| {
            invalid(format!("continue_final_message: the final message's \"{field}\" is not a string"))
        })?;
        for (k, v) in last.iter_mut() {
            if fields.contains(k) {
                *v = TemplateValue::Str(format!("{original}{CONTINUE_TAG}"));
            }
        }
        Ok(original)
    }
}

fn cut_at_continue_tag(rendered: String, final_text: &str) -> Result<String> {
    let tag = CONTINUE_TAG.trim();
    if !rendered.contains(final_text.trim()) || !rendered.contains(tag) {
        return Err(invalid(format!(
            "continue_final_message is set but the final message does not appear in the chat after applying \
             the chat template (the template may delete parts of it). Final message: {}",
            final_text.trim()
        )));
    }
    let loc = rendered.rfind(tag).unwrap_or(rendered.len());
    if rendered[loc..].starts_with(CONTINUE_TAG) {
        Ok(rendered[..loc].to_string())
    } else {
        Ok(rendered[..loc].trim_end().to_string())
    }
}

/// Checks and normalises messages like `_normalize_chat_messages` + `_alias_reasoning_fields`:
/// every message must be an object; top-level keys whose value is null are dropped; a reasoning text
/// given as `reasoning_content`, `thinking` or `reasoning` is visible under `thinking` and
/// `reasoning_content`.
fn prepare_messages(messages: &TemplateValue, normalize_image_urls: bool, origin: &str) -> Result<Vec<TemplateValue>> {
    let TemplateValue::List(list) = messages else {
        return Err(invalid(format!(
            "{origin}: messages must be a list of {{\"role\", \"content\"}} objects, got {}",
            messages.kind_name()
        )));
    };
    if list.is_empty() {
        return Err(invalid(format!("{origin}: cannot apply the chat template to an empty conversation")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let TemplateValue::Map(entries) = message else {
            return Err(invalid(format!(
                "{origin}: message {i} must be an object with \"role\" and \"content\", got {}",
                message.kind_name()
            )));
        };
        let mut entries: Vec<(String, TemplateValue)> =
            entries.iter().filter(|(_, v)| *v != TemplateValue::Null).cloned().collect();
        let reasoning =
            REASONING_FIELDS.iter().find_map(|f| entries.iter().find(|(k, _)| k == f).map(|(_, v)| v.clone()));
        if let Some(r) = reasoning {
            let mut aliased = vec![("thinking".to_string(), r.clone())];
            for (k, v) in entries {
                match aliased.iter_mut().find(|(key, _)| *key == k) {
                    Some(slot) => slot.1 = v,
                    None => aliased.push((k, v)),
                }
            }
            match aliased.iter_mut().find(|(k, _)| k == "reasoning_content") {
                Some(slot) => slot.1 = r,
                None => aliased.push(("reasoning_content".into(), r)),
            }
            entries = aliased;
        }
        if normalize_image_urls {
            for (k, v) in entries.iter_mut() {
                if let (true, TemplateValue::List(blocks)) = (k == "content", v) {
                    for block in blocks.iter_mut() {
                        if block.get("type").and_then(TemplateValue::as_str) == Some("image_url") {
                            if let Some(info) = block.get("image_url") {
                                let url = match info {
                                    TemplateValue::Map(_) => {
                                        info.get("url").cloned().unwrap_or(TemplateValue::Str(String::new()))
                                    }
                                    other => other.clone(),
                                };
                                *block = TemplateValue::Map(vec![("type".into(), "image".into()), ("url".into(), url)]);
                            }
                        }
                    }
                }
            }
        }
        out.push(TemplateValue::Map(entries));
    }
    Ok(out)
}

/// Error text of a minijinja error, with its cause chain and line.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = match e.detail() {
        Some(d) => format!("{}: {}", e.kind(), d),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (line {line})"));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!("; caused by: {s}"));
        source = s.source();
    }
    msg
}

/// The message of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker tag) into an
/// always-true `if` block, keeping whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag[2..].find("%}").map(|rel| rel + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: Value) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("{RAISE_MARKER}{}", py_str(&message))))
}

fn strftime_now(format: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime_utc(&format, secs)
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(
    _state: &State,
    value: Value,
    args: Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let bad = |m: String| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {m}"));
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(bad(format!("takes at most {} arguments", names.len())));
    }
    let mut opts = JsonOptions::default();
    for (i, name) in names.iter().enumerate() {
        let v: Option<Value> = match args.get(i) {
            Some(v) => Some(v.clone()),
            None => kwargs.get::<Option<Value>>(name)?,
        };
        let Some(v) = v else { continue };
        match *name {
            "ensure_ascii" => opts.ensure_ascii = v.is_true(),
            "sort_keys" => opts.sort_keys = v.is_true(),
            "indent" if v.is_none() => {}
            "indent" if v.is_integer() => {
                let n = i64::try_from(v.clone()).unwrap_or(i64::MAX).max(0) as usize;
                if n > MAX_JSON_INDENT {
                    return Err(bad(format!("indent={n} is too large (at most {MAX_JSON_INDENT})")));
                }
                opts.indent = Some(" ".repeat(n));
            }
            "indent" => {
                opts.indent = Some(v.as_str().ok_or_else(|| bad("indent must be an int or a string".into()))?.into())
            }
            _ if v.is_none() => {}
            _ => {
                let parts: Vec<String> = v
                    .try_iter()
                    .map_err(|_| bad("separators must be a pair of strings".into()))?
                    .map(|p| p.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("separators must be a pair of strings".into()))?;
                match parts.as_slice() {
                    [a, b] => opts.separators = Some((a.clone(), b.clone())),
                    _ => return Err(bad("separators must be a pair of strings".into())),
                }
            }
        }
    }
    kwargs.assert_all_used()?;
    json_dumps(&value, &opts).map_err(bad)
}

pub use crate::data::chat_template_files::ChatTemplates;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_are_rewritten() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}c{% if x %}{% endif %}"),
            "a{%- if true -%}b{% endif %}c{% if x %}{% endif %}"
        );
        assert_eq!(rewrite_generation_tags("{%}"), "{%}");
        assert_eq!(rewrite_generation_tags("x{% generation"), "x{% generation");
        assert!(ChatTemplate::new("{%}").is_err());
    }

    #[test]
    fn python_printing_and_methods() {
        let t = ChatTemplate::new("{{ none }}|{{ true }}|{{ [1, 'a', none] }}|{{ 'x y'.split() }}|{{ ' s '.strip() }}")
            .unwrap();
        let out = t.render(&serde_json::json!([{"role": "user", "content": "x"}]), &RenderOptions::default()).unwrap();
        assert_eq!(out, "None|True|[1, 'a', None]|['x', 'y']|s");
    }

    #[test]
    fn ordered_lists_and_dicts_behave_like_python() {
        let t = ChatTemplate::new(
            "{{ 'y' if messages[0].content else 'n' }}{{ messages[0].content|length }}{{ messages[-1].role }}\
             {{ messages|reverse|map(attribute='role')|join }}{{ messages[1] }}{{ messages[1:]|length }}",
        )
        .unwrap();
        let msgs =
            TemplateValue::from_json_str(r#"[{"role": "a", "content": []}, {"role": "b", "z": 1, "content": [null]}]"#)
                .unwrap();
        let out = t.render_value(&msgs, &RenderOptions::default()).unwrap();
        assert_eq!(out, "n0bba{'role': 'b', 'z': 1, 'content': [None]}1");
    }

    #[test]
    fn loops_controls_and_no_includes() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}",
        )
        .unwrap();
        let msgs = serde_json::json!([{"role": "a", "content": ""}, {"role": "b", "content": ""}]);
        assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "a");
        let t = ChatTemplate::new("{% include 'x.jinja' %}").unwrap();
        assert!(t.render(&msgs, &RenderOptions::default()).is_err());
    }

    #[test]
    fn strftime_now_renders_a_year() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
        let out = t.render(&serde_json::json!([{"role": "user", "content": ""}]), &RenderOptions::default()).unwrap();
        assert_eq!(out.len(), 4);
        assert!(out.starts_with('2'));
    }
}
