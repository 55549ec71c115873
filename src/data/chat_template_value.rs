//! Python-compatible values for chat templates.
//!
//! Hugging Face renders chat templates with Jinja2 over Python objects. Dicts keep insertion order:
//! [`TemplateValue`] parses JSON without reordering keys, and maps become an order-keeping template
//! object ([`PyDict`]); lists print like Python's ([`PyList`]). How values become text (`str()`,
//! `repr()`, `json.dumps`) is in `python_text.rs`.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr, Value};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::python_text::py_str;

/// A JSON-like value whose maps keep their key order, like Python dicts.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateValue {
    /// `None` / `null`.
    Null,
    /// `True` / `False`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float (printed with Python's `repr`).
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<TemplateValue>),
    /// A dict, in insertion order.
    Map(Vec<(String, TemplateValue)>),
}

impl TemplateValue {
    /// Parses JSON text keeping the key order of every object (serde_json's `Value` may sort them).
    pub fn from_json_str(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// The value under `key` when `self` is a map.
    pub fn get(&self, key: &str) -> Option<&TemplateValue> {
        match self {
            TemplateValue::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            TemplateValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short name of the kind of value, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            TemplateValue::Null => "null",
            TemplateValue::Bool(_) => "a boolean",
            TemplateValue::Int(_) | TemplateValue::Float(_) => "a number",
            TemplateValue::Str(_) => "a string",
            TemplateValue::List(_) => "a list",
            TemplateValue::Map(_) => "an object",
        }
    }

    /// Converts to a template engine value (maps become order-keeping dict objects).
    pub fn to_value(&self) -> Value {
        match self {
            TemplateValue::Null => Value::from(()),
            TemplateValue::Bool(b) => Value::from(*b),
            TemplateValue::Int(i) => Value::from(*i),
            TemplateValue::Float(f) => Value::from(*f),
            TemplateValue::Str(s) => Value::from(s.as_str()),
            TemplateValue::List(items) => {
                Value::from_object(PyList { items: items.iter().map(|v| v.to_value()).collect() })
            }
            TemplateValue::Map(entries) => Value::from_object(PyDict {
                entries: entries.iter().map(|(k, v)| (Value::from(k.as_str()), v.to_value())).collect(),
            }),
        }
    }
}

impl From<&serde_json::Value> for TemplateValue {
    fn from(v: &serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => TemplateValue::Null,
            serde_json::Value::Bool(b) => TemplateValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => TemplateValue::Int(i),
                None => TemplateValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => TemplateValue::Str(s.clone()),
            serde_json::Value::Array(a) => TemplateValue::List(a.iter().map(TemplateValue::from).collect()),
            serde_json::Value::Object(m) => {
                TemplateValue::Map(m.iter().map(|(k, v)| (k.clone(), TemplateValue::from(v))).collect())
            }
        }
    }
}

impl From<&str> for TemplateValue {
    fn from(s: &str) -> Self {
        TemplateValue::Str(s.to_string())
    }
}

impl<'de> Deserialize<'de> for TemplateValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TemplateValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Null)
            }
            fn visit_none<E>(self) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Int(i))
            }
            fn visit_u64<E>(self, u: u64) -> Result<TemplateValue, E> {
                Ok(i64::try_from(u).map(TemplateValue::Int).unwrap_or(TemplateValue::Float(u as f64)))
            }
            fn visit_f64<E>(self, f: f64) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Float(f))
            }
            fn visit_str<E>(self, s: &str) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TemplateValue, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(TemplateValue::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TemplateValue, A::Error> {
                let mut entries: Vec<(String, TemplateValue)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, TemplateValue>()? {
                    // Python's json.loads keeps the last duplicate, at the first position.
                    match entries.iter_mut().find(|(key, _)| *key == k) {
                        Some(slot) => slot.1 = v,
                        None => entries.push((k, v)),
                    }
                }
                Ok(TemplateValue::Map(entries))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// An insertion-ordered dict visible to templates as a map.
#[derive(Debug)]
pub struct PyDict {
    entries: Vec<(Value, Value)>,
}

impl PyDict {
    /// Builds a dict from key/value pairs (later duplicates replace earlier values in place).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Value, Value)>) -> Self {
        let mut entries: Vec<(Value, Value)> = Vec::new();
        for (k, v) in pairs {
            match entries.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = v,
                None => entries.push((k, v)),
            }
        }
        PyDict { entries }
    }
}

impl Object for PyDict {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_key_value_enumerator(|this| Box::new(this.entries.iter().map(|(k, v)| (k.clone(), v.clone()))))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.entries.len())
    }

    fn is_true(self: &Arc<Self>) -> bool {
        !self.entries.is_empty()
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&py_str(&Value::from_dyn_object(self.clone())))
    }
}

/// A list visible to templates as a sequence that converts to text like Python's `str(list)`
/// (so `'x' ~ content` and `content | trim` print `[{'type': 'text', ...}]` as Jinja2 does).
#[derive(Debug)]
pub struct PyList {
    items: Vec<Value>,
}

impl Object for PyList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.items.get(key.as_usize()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.items.len())
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&py_str(&Value::from_dyn_object(self.clone())))
    }
}
