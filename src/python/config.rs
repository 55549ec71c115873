//! Bindings of `crate::config`.

use std::path::PathBuf;

use pyo3::prelude::*;

use super::errors::guard;
use crate::config::ModelConfig;

/// The config of a checkpoint dir as JSON: the file's own keys with transformers' defaults filled in
/// for the fields the model uses.
#[pyfunction]
pub fn load_config_json(dir: PathBuf) -> PyResult<String> {
    guard(|| Ok(resolved_json(&ModelConfig::from_dir(&dir)?)))
}

pub fn resolved_json(c: &ModelConfig) -> String {
    use serde_json::{json, Value};
    let mut v = c.raw.clone();
    let vis = &c.vision;
    let txt = &c.text;
    let fill = |obj: &mut Value, key: &str, val: Value| {
        if !obj.is_object() {
            *obj = json!({});
        }
        if let Some(o) = obj.as_object_mut() {
            o.entry(key.to_string()).or_insert(val);
        }
    };
    for (k, val) in [
        ("hidden_size", json!(vis.hidden_size)),
        ("intermediate_size", json!(vis.intermediate_size)),
        ("num_hidden_layers", json!(vis.num_hidden_layers)),
        ("num_attention_heads", json!(vis.num_attention_heads)),
        ("num_channels", json!(vis.num_channels)),
        ("image_size", json!(vis.image_size)),
        ("patch_size", json!(vis.patch_size)),
        ("hidden_act", json!(vis.hidden_act)),
        ("layer_norm_eps", json!(vis.layer_norm_eps)),
    ] {
        if c.text_only() {
            break; // LlamaConfig: no vision_config
        }
        let o = v.as_object_mut().map(|o| o.entry("vision_config").or_insert(json!({})));
        if let Some(o) = o {
            fill(o, k, val);
        }
    }
    for (k, val) in [
        ("vocab_size", json!(txt.vocab_size)),
        ("hidden_size", json!(txt.hidden_size)),
        ("intermediate_size", json!(txt.intermediate_size)),
        ("num_hidden_layers", json!(txt.num_hidden_layers)),
        ("num_attention_heads", json!(txt.num_attention_heads)),
        ("num_key_value_heads", json!(txt.num_key_value_heads)),
        ("head_dim", json!(txt.head_dim)),
        ("hidden_act", json!(txt.hidden_act)),
        ("max_position_embeddings", json!(txt.max_position_embeddings)),
        ("rms_norm_eps", json!(txt.rms_norm_eps)),
        ("rope_theta", json!(txt.rope_theta)),
        ("pad_token_id", json!(txt.pad_token_id)),
    ] {
        if c.text_only() {
            fill(&mut v, k, val); // LlamaConfig: the text keys at the top level
            continue;
        }
        let o = v.as_object_mut().map(|o| o.entry("text_config").or_insert(json!({})));
        if let Some(o) = o {
            fill(o, k, val);
        }
    }
    for (k, val) in [
        ("scale_factor", json!(c.scale_factor)),
        ("image_token_id", json!(c.image_token_id)),
        ("tie_word_embeddings", json!(c.tie_word_embeddings)),
        ("use_cache", json!(true)),
    ] {
        if !c.text_only() || matches!(k, "tie_word_embeddings" | "use_cache") {
            fill(&mut v, k, val);
        }
    }
    v.to_string()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load_config_json, m)?)?;
    Ok(())
}
