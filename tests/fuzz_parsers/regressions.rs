//! Regressions: inputs the fuzzer found, each a plain test (and a typed error in the parser).

use super::checkpoint::model_dir;
use super::tokenizer::small_tokenizer_json;
use super::*;

fn render(source: &str) -> ferrovlm::Result<String> {
    let t = ChatTemplate::with_origin(source, "regression.jinja")?;
    t.render(&json!([{"role": "user", "content": "hi"}]), &RenderOptions::default())
}

fn template_error(r: ferrovlm::Result<String>) -> String {
    match r {
        Err(e @ Error::Data(ferrovlm::error::DataError::Template(_))) => e.to_string(),
        other => panic!("expected a template error, got {other:?}"),
    }
}

/// config_json: `scale_factor` 2^32 overflowed `hidden * s * s` in the connector loader (panic).
#[test]
fn config_huge_scale_factor_is_a_bad_value() {
    let mut v: Value = serde_json::from_slice(&read(model_dir().join("config.json"))).unwrap();
    v["scale_factor"] = json!(4294967296u64);
    let e = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("scale_factor"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(model_dir().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let e = VlmModel::from_dir(tmp.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("scale_factor"), "{e}");
}

/// safetensors index (found by review, not by a crash): shard names were deduplicated with a
/// linear search per entry, quadratic in the entries of weight_map (minutes for 10^5 names).
#[test]
fn index_with_many_shard_names_fails_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let map: serde_json::Map<String, Value> =
        (0..100_000).map(|i| (format!("t{i}"), json!(format!("shard-{i}.safetensors")))).collect();
    std::fs::write(tmp.path().join("model.safetensors.index.json"), json!({ "weight_map": map }).to_string()).unwrap();
    let t0 = Instant::now();
    let e = WeightStore::open_dir(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("shard-0.safetensors"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

/// tokenizer_files: a `decoder` nested 140 deep in tokenizer.json made the tokenizers library
/// panic (`expect("Helper")` on serde_json's recursion limit).
#[test]
fn deeply_nested_tokenizer_decoder_is_a_tokenizer_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = small_tokenizer_json().clone();
    v["decoder"] = (0..140).fold(v["decoder"].take(), |x, _| json!([x]));
    std::fs::write(tmp.path().join("tokenizer.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    match Tokenizer::from_dir(tmp.path()) {
        Err(e @ Error::Data(ferrovlm::error::DataError::Tokenizer(_))) => {
            assert!(e.to_string().contains("tokenizer.json"), "{e}")
        }
        other => panic!("expected a tokenizer error, got {:?}", other.map(|_| ())),
    }
}

/// chat_template: `tojson(indent=9999999999)` allocated 10 GB for the indent string (abort).
#[test]
fn tojson_huge_indent_is_a_template_error() {
    let e = template_error(render("{{ messages | tojson(indent=9999999999) }}"));
    assert!(e.contains("indent") && e.contains("regression.jinja"), "{e}");
    assert_eq!(render("{{ [1] | tojson(indent=2) }}").unwrap(), "[\n  1\n]");
}

/// chat_template: a sequence repeated 10^19 times overflows inside minijinja (a panic in debug
/// builds): a template error, not a crash.
#[test]
fn sequence_repeat_overflow_does_not_panic() {
    if let Err(e) = render("{{ ([1, 2] * 10000000000000000000) | length }}") {
        assert!(e.to_string().contains("regression.jinja"), "{e}");
    }
}

/// chat_template: `tojson` collected a lazy sequence of 10^11 items before writing it (abort).
#[test]
fn tojson_of_a_huge_lazy_sequence_is_a_template_error() {
    let e = template_error(render("{{ ([1] * 100000000000) | tojson }}"));
    assert!(e.contains("longer than"), "{e}");
}

/// chat_template: an endless loop ran for ever (no fuel limit): now it stops with an error.
#[test]
fn endless_template_loop_runs_out_of_fuel() {
    let e = template_error(render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"));
    assert!(e.contains("instructions"), "{e}");
}
