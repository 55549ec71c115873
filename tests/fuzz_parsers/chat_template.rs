//! Targets: chat templates (compiled and rendered) and chat template files.

use super::*;

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// A template using what Hugging Face templates use: loops, namespaces, macros, filters, tojson,
/// slicing, generation tags, raise_exception, strftime_now.
pub(crate) const RICH_TEMPLATE: &str = r#"{%- set ns = namespace(n=0, sys='') -%}
{%- macro render(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for b in c -%}{%- if b.type == 'text' -%}{{ b.text | trim }}{%- elif b.type == 'image' -%}<image>{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.sys = messages[0]['content'] -%}{%- endif -%}
{%- if tools is not none -%}Tools: {{ tools | tojson(indent=2) }}{%- endif -%}
{%- for message in messages[ns.sys and 1 or 0:] -%}
  {%- set ns.n = ns.n + 1 -%}
  {%- if message.role not in ['user', 'assistant', 'system', 'tool'] -%}{{ raise_exception('bad role ' ~ message.role) }}{%- endif -%}
  <|im_start|>{{ message['role'] | capitalize }}{{ loop.index }}/{{ loop.length }}:
  {%- if message.role == 'assistant' -%}{% generation %}{{ render(message.content) }}{% endgeneration %}
  {%- else -%}{{ render(message.content) }}{%- endif -%}
  {%- if message.thinking is defined -%}[{{ message.thinking }}]{%- endif -%}
  {{ message.get('name', '') | upper }}{{ message | length }}{{ message.items() | list | length }}
  <end_of_utterance>
{% endfor -%}
{%- if add_generation_prompt -%}Assistant:{%- endif -%}{{ strftime_now('%Y-%m-%d') | length }}{{ bos_token }}"#;

/// Jinja fragments spliced into templates: syntax pieces, deep nesting, recursion, long loops,
/// huge repeats, bad calls.
pub(crate) const FRAGMENTS: [&str; 40] = [
    "{%",
    "%}",
    "{{",
    "}}",
    "{#",
    "{% endfor %}",
    "{% endif %}",
    "{% for m in messages %}",
    "{% if messages %}",
    "{% else %}",
    "{% generation %}",
    "{% endgeneration %}",
    "{{ messages }}",
    "{{ messages[0]['content'][-1] }}",
    "{{ messages[99] }}",
    "{{ messages[0].content[0].type.upper() }}",
    "{{ 1 / 0 }}",
    "{{ 1 // 0 }}",
    "{{ 1 % 0 }}",
    "{{ 9223372036854775807 + 1 }}",
    "{{ -9223372036854775808 * -1 }}",
    "{{ 'a' * 100000000000 }}",
    "{{ 'ab' * 1000000 | length }}",
    "{{ ([1, 2] * 10000000000000000000) | length }}",
    "{{ ([1, 2] * 4611686018427387904) | length }}",
    "{{ range(100000) | list | length }}",
    "{{ range(10000000000) | length }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "{% set x = [] %}{% for i in range(100) %}{% set x = x + x + [i] %}{% endfor %}{{ x | length }}",
    "{{ ((((((((((((((((((((1)))))))))))))))))))) }}",
    "{{ raise_exception('boom') }}",
    "{{ messages | tojson(indent=-5, separators=[1]) }}",
    "{{ messages | tojson(indent=9999999999) }}",
    "{{ strftime_now('%Q%-%') }}",
    "{{ messages | map(attribute='content') | join(', ') }}",
    "{{ ' '.join(['a', 1, none]) }}",
    "{{ messages[0].content | string | replace('', 'x') }}",
    "{{ messages.pop() }}{{ messages.append(1) }}",
    "{% include 'x' %}{% import 'y' as z %}{% extends 'w' %}",
];

#[derive(Clone, Debug)]
pub(crate) enum TplOp {
    InsertFragment {
        at: Index,
        fragment: usize,
    },
    /// Insert a fragment at a tag boundary (start, end, right after `%}` / `}}`): it stays parseable.
    InsertAtTag {
        at: Index,
        fragment: usize,
    },
    /// Deeply nested `{% if %}` / `(` / `[` at one place.
    Nest {
        at: Index,
        depth: usize,
        kind: u8,
    },
    Bytes(Vec<ByteOp>),
}

pub(crate) fn tpl_op() -> impl Strategy<Value = TplOp> {
    prop_oneof![
        2 => (any::<Index>(), 0..FRAGMENTS.len()).prop_map(|(at, fragment)| TplOp::InsertFragment { at, fragment }),
        6 => (any::<Index>(), 0..FRAGMENTS.len()).prop_map(|(at, fragment)| TplOp::InsertAtTag { at, fragment }),
        1 => (any::<Index>(), prop::sample::select(vec![10usize, 100, 500, 5000]), 0u8..3).prop_map(|(at, depth, kind)| TplOp::Nest { at, depth, kind }),
        2 => byte_ops(3).prop_map(TplOp::Bytes),
    ]
}

pub(crate) fn char_floor(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

pub(crate) fn mutate_template(seed: &str, ops: &[TplOp]) -> String {
    let mut s = seed.to_string();
    for op in ops {
        match op {
            TplOp::InsertFragment { at, fragment } => {
                let i = char_floor(&s, at.index(s.len() + 1));
                s.insert_str(i, FRAGMENTS[*fragment]);
            }
            TplOp::InsertAtTag { at, fragment } => {
                let mut spots: Vec<usize> = vec![0, s.len()];
                spots.extend(s.match_indices("%}").chain(s.match_indices("}}")).map(|(i, _)| i + 2));
                let i = spots[at.index(spots.len())];
                s.insert_str(i, FRAGMENTS[*fragment]);
            }
            TplOp::Nest { at, depth, kind } => {
                let i = char_floor(&s, at.index(s.len() + 1));
                let body = match kind {
                    0 => format!("{}x{}", "{% if true %}".repeat(*depth), "{% endif %}".repeat(*depth)),
                    1 => format!("{{{{ {}1{} }}}}", "(".repeat(*depth), ")".repeat(*depth)),
                    _ => format!("{{{{ {}1{} }}}}", "[".repeat(*depth), "]".repeat(*depth)),
                };
                s.insert_str(i, &body);
            }
            TplOp::Bytes(ops) => {
                s = String::from_utf8_lossy(&mutate_bytes(s.into_bytes(), ops, usize::MAX)).into_owned()
            }
        }
    }
    s
}

/// Arbitrary template values (messages, tools, documents, variables).
pub(crate) fn template_value() -> impl Strategy<Value = TemplateValue> {
    let leaf = prop_oneof![
        Just(TemplateValue::Null),
        any::<bool>().prop_map(TemplateValue::Bool),
        prop_oneof![any::<i64>(), Just(i64::MAX), Just(i64::MIN), Just(0)].prop_map(TemplateValue::Int),
        prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e300)]
            .prop_map(TemplateValue::Float),
        prop_oneof![
            Just("user".to_string()),
            Just("assistant".to_string()),
            Just("system".to_string()),
            Just("text".to_string()),
            Just("image".to_string()),
            Just("image_url".to_string()),
            Just(String::new()),
            ".{0,12}",
            Just("CONTINUE_FINAL_MESSAGE_TAG {{ }} {% %}".to_string()),
        ]
        .prop_map(TemplateValue::Str),
    ];
    let keys = prop_oneof![
        Just("role".to_string()),
        Just("content".to_string()),
        Just("type".to_string()),
        Just("text".to_string()),
        Just("image_url".to_string()),
        Just("url".to_string()),
        Just("thinking".to_string()),
        Just("reasoning_content".to_string()),
        Just("name".to_string()),
        "[a-z]{0,6}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(TemplateValue::List),
            prop::collection::vec((keys.clone(), inner), 0..6).prop_map(TemplateValue::Map),
        ]
    })
}

/// Mostly message lists of the usual shape, with arbitrary values inside; sometimes anything.
pub(crate) fn messages() -> impl Strategy<Value = TemplateValue> {
    let content = prop_oneof![
        ".{0,20}".prop_map(TemplateValue::Str),
        prop::collection::vec(
            prop_oneof![
                ".{0,10}".prop_map(|t| TemplateValue::Map(vec![
                    ("type".into(), "text".into()),
                    ("text".into(), TemplateValue::Str(t))
                ])),
                Just(TemplateValue::Map(vec![("type".into(), "image".into())])),
                Just(TemplateValue::Map(vec![
                    ("type".into(), "image_url".into()),
                    ("image_url".into(), TemplateValue::Map(vec![("url".into(), "http://x".into())])),
                ])),
                template_value(),
            ],
            0..4
        )
        .prop_map(TemplateValue::List),
        template_value(),
    ];
    let role = prop_oneof![Just("user"), Just("assistant"), Just("system"), Just("tool"), Just("")]
        .prop_map(TemplateValue::from);
    let message = (role, content, prop::option::of(template_value())).prop_map(|(role, content, extra)| {
        let mut m = vec![("role".to_string(), role), ("content".to_string(), content)];
        if let Some(x) = extra {
            m.push(("thinking".to_string(), x));
        }
        TemplateValue::Map(m)
    });
    prop_oneof![
        8 => prop::collection::vec(message, 1..5).prop_map(TemplateValue::List),
        1 => Just(TemplateValue::List(Vec::new())),
        1 => template_value(),
    ]
}

#[derive(Clone, Debug)]
pub(crate) struct RenderInput {
    add_generation_prompt: bool,
    continue_final_message: Option<String>,
    normalize_image_urls: bool,
    tools: Option<TemplateValue>,
    documents: Option<TemplateValue>,
    variables: Vec<(String, TemplateValue)>,
}

pub(crate) fn render_input() -> impl Strategy<Value = RenderInput> {
    let cont = prop::option::weighted(
        0.3,
        prop_oneof![Just("content".to_string()), Just("thinking".to_string()), Just("text".to_string()), "[a-z]{0,5}"],
    );
    let var = (
        prop_oneof![
            Just("bos_token".to_string()),
            Just("eos_token".to_string()),
            Just("messages".to_string()),
            "[a-z_]{1,8}"
        ],
        template_value(),
    );
    (
        any::<bool>(),
        cont,
        any::<bool>(),
        prop::option::of(template_value()),
        prop::option::of(template_value()),
        prop::collection::vec(var, 0..3),
    )
        .prop_map(
            |(add_generation_prompt, continue_final_message, normalize_image_urls, tools, documents, variables)| {
                RenderInput {
                    add_generation_prompt,
                    continue_final_message,
                    normalize_image_urls,
                    tools,
                    documents,
                    variables,
                }
            },
        )
}

/// Templates compiled from mutated sources and rendered with arbitrary messages and options.
#[test]
pub(crate) fn fuzz_chat_template() {
    let smolvlm = std::fs::read_to_string(fixtures().join("tokenizer/template_jinja/chat_template.jinja")).unwrap();
    let seeds = [smolvlm, RICH_TEMPLATE.to_string(), String::new()];
    let strategy = (0..seeds.len(), prop::collection::vec(tpl_op(), 0..4), messages(), render_input());
    fuzz("chat_template", 7, strategy, |(s, ops, msgs, r)| {
        let source = mutate_template(&seeds[s], &ops);
        if let Some(t) = check("ChatTemplate::with_origin", ChatTemplate::with_origin(source, "fuzz.jinja"))? {
            let options = RenderOptions {
                add_generation_prompt: r.add_generation_prompt,
                continue_final_message: r.continue_final_message.clone(),
                normalize_image_urls: r.normalize_image_urls,
                tools: r.tools.clone(),
                documents: r.documents.clone(),
                variables: r.variables.clone(),
            };
            check("render_value", t.render_value(&msgs, &options))?;
            let json = serde_json::to_string(&template_json(&msgs)).unwrap();
            check("render_json", t.render_json(&json, &options))?;
        }
        Ok(())
    });
}

pub(crate) fn template_json(v: &TemplateValue) -> Value {
    match v {
        TemplateValue::Null => Value::Null,
        TemplateValue::Bool(b) => json!(b),
        TemplateValue::Int(i) => json!(i),
        TemplateValue::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        TemplateValue::Str(s) => json!(s),
        TemplateValue::List(l) => Value::Array(l.iter().map(template_json).collect()),
        TemplateValue::Map(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), template_json(v))).collect()),
    }
}

/// The template files of a processor folder (processor_config.json, chat_template.json,
/// chat_template.jinja, additional_chat_templates/) with one of them corrupted.
#[test]
pub(crate) fn fuzz_chat_template_files() {
    let cfg_dir = fixtures().join("processor/config");
    let seeds: Vec<Value> = vec![
        serde_json::from_slice(&read(cfg_dir.join("processor_config.json"))).unwrap(),
        serde_json::from_slice(&read(cfg_dir.join("chat_template.json"))).unwrap(),
        json!({"chat_template": [{"name": "default", "template": "{{ messages | length }}"}, {"name": "tool_use", "template": "{{ tools }}"}]}),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let extra = vec![
        json!("{{ messages }}"),
        json!([{"name": "default"}]),
        json!([{"name": 1, "template": 2}]),
        json!("{% for %}"),
    ];
    let keys = ["chat_template", "name", "template", "image_seq_len"];
    let strategy = (0usize..3, json_mut(), any::<bool>(), any::<bool>(), prop::option::of("[a-z_]{0,8}"));
    fuzz("chat_template_files", 8, strategy, |(which, m, jinja, extra_dir, name)| {
        let d = tmp.path();
        let _ = std::fs::remove_dir_all(d.join("additional_chat_templates"));
        for f in ["processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json"] {
            let _ = std::fs::remove_file(d.join(f));
        }
        let text = apply_json(&seeds[which], &m, &keys, &extra);
        match which {
            0 => std::fs::write(d.join("processor_config.json"), &text).unwrap(),
            1 => std::fs::write(d.join("chat_template.json"), &text).unwrap(),
            _ => std::fs::write(d.join("tokenizer_config.json"), &text).unwrap(),
        }
        if jinja {
            std::fs::write(d.join("chat_template.jinja"), "{{ messages[0].content }}").unwrap();
        }
        if extra_dir {
            std::fs::create_dir_all(d.join("additional_chat_templates")).unwrap();
            std::fs::write(d.join("additional_chat_templates/tool_use.jinja"), "{{ tools | tojson }}").unwrap();
            std::fs::write(d.join("additional_chat_templates/.jinja"), b"\xff\xfe").unwrap();
        }
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for loaded in [ChatTemplates::for_processor(d), ChatTemplates::for_tokenizer(d)] {
            if let Some(Some(t)) = check("ChatTemplates", loaded)? {
                if let Some(ct) = check("compile", t.compile(name.as_deref(), extra_dir))? {
                    check("render", ct.render(&msgs, &RenderOptions::default()))?;
                }
            }
        }
        Ok(())
    });
}
