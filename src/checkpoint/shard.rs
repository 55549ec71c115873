//! Sharded checkpoints as transformers' `save_pretrained(max_shard_size=...)` writes them: tensors
//! packed into `model-00001-of-0000N.safetensors` in `state_dict()` order by huggingface_hub's
//! `split_torch_state_dict_into_shards`, and `model.safetensors.index.json` (`metadata.total_parameters`,
//! `metadata.total_size`, `weight_map`, keys sorted, two-space indent), or one `model.safetensors` when
//! everything fits.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{input_err, CheckpointError, Result};
use crate::quant::serialize::RawTensor;

/// transformers' default `max_shard_size` (`PreTrainedModel.save_pretrained`, transformers 5).
pub const DEFAULT_MAX_SHARD_SIZE: &str = "50GB";
pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// A `max_shard_size` string in bytes, as huggingface_hub's `parse_size_to_int` reads it (what
/// transformers 5's `save_pretrained` hands strings to): a number (decimals allowed) and one of the
/// units TB, GB, MB, KB (powers of 10, case-insensitive), e.g. "5GB", "500MB", "0.5GB", "40kb".
pub fn parse_size(size: &str) -> Result<i64> {
    let s = size.trim();
    let (num, unit) = match s.len().checked_sub(2).filter(|&i| s.is_char_boundary(i)) {
        Some(i) => (&s[..i], s[i..].to_ascii_uppercase()),
        None => ("", s.to_ascii_uppercase()),
    };
    let mult: f64 = match unit.as_str() {
        "TB" => 1e12,
        "GB" => 1e9,
        "MB" => 1e6,
        "KB" => 1e3,
        _ => {
            return input_err(format!(
                "max_shard_size: unit '{unit}' not supported. Supported units are TB, GB, MB, KB. Got '{s}'."
            ))
        }
    };
    match num.trim().replace('_', "").parse::<f64>() {
        Ok(v) if (v * mult).is_finite() => Ok((v * mult) as i64), // Python's int(): truncates toward 0
        _ => input_err(format!("max_shard_size: could not parse the size value from '{s}'")),
    }
}

/// One dot-separated part of a tensor name in transformers' `dot_natural_key` order: numbers (by value)
/// before text; text by its characters, then by a numeric suffix (`shard_2` before `shard_11`).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    /// (digit count, digits), leading zeros removed: numeric order without overflow.
    Num(usize, String),
    Text(String, Option<(usize, String)>),
}

fn number(digits: &str) -> (usize, String) {
    let d = digits.trim_start_matches('0');
    (d.len(), d.to_string())
}

/// transformers' `dot_natural_key`: the order `save_pretrained` sorts a loaded model's state dict in
/// (`revert_weight_conversion`) before it fills the shards.
fn natural_key(name: &str) -> Vec<KeyPart> {
    name.split('.')
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                let (n, d) = number(part);
                KeyPart::Num(n, d)
            } else {
                let text = part.trim_end_matches(|c: char| c.is_ascii_digit());
                let tail = &part[text.len()..];
                KeyPart::Text(text.to_string(), (!tail.is_empty()).then(|| number(tail)))
            }
        })
        .collect()
}

/// Sorts `tensors` as transformers orders a loaded model's state dict before sharding it.
pub fn sort_like_transformers(tensors: &mut [RawTensor]) {
    tensors.sort_by_cached_key(|t| natural_key(&t.0));
}

/// huggingface_hub's split: tensors (by their byte sizes, in order) go into the current shard until the
/// next one would take it past `max_size`; a tensor larger than `max_size` gets a shard of its own.
/// Returns the shards as lists of indices into `sizes`.
pub fn split(sizes: &[usize], max_size: i64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_size: i128 = 0;
    let max = i128::from(max_size);
    for (i, &sz) in sizes.iter().enumerate() {
        let sz = sz as i128;
        if sz > max {
            shards.push(vec![i]);
            continue;
        }
        if cur_size + sz > max {
            shards.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur.push(i);
        cur_size += sz;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// The index file's content, exactly as transformers writes it (`json.dumps(index, indent=2,
/// sort_keys=True) + "\n"`).
pub fn index_json(total_parameters: usize, total_size: usize, weight_map: BTreeMap<String, String>) -> String {
    #[derive(serde::Serialize)]
    struct Index {
        metadata: BTreeMap<&'static str, usize>,
        weight_map: BTreeMap<String, String>,
    }
    let metadata = BTreeMap::from([("total_parameters", total_parameters), ("total_size", total_size)]);
    // Serializing maps of strings and integers cannot fail.
    serde_json::to_string_pretty(&Index { metadata, weight_map }).unwrap_or_default() + "\n"
}

fn io(file: &Path, e: impl ToString) -> CheckpointError {
    CheckpointError::Io { file: file.to_path_buf(), msg: e.to_string() }
}

/// Whether `name` is a shard of `model.safetensors` (`model-00001-of-00004.safetensors`; transformers'
/// `(.*?)-\d{5}-of-\d{5}` on the name without its extension).
fn is_shard_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".safetensors") else { return false };
    let b = stem.as_bytes();
    name.starts_with("model")
        && b.len() >= 15
        && b[b.len() - 9..b.len() - 5] == *b"-of-"
        && b[b.len() - 15] == b'-'
        && b[b.len() - 14..b.len() - 9].iter().chain(&b[b.len() - 5..]).all(u8::is_ascii_digit)
}

/// Writes `tensors` (in `state_dict()` order) into `dir` as transformers does for `max_shard_size`: one
/// `model.safetensors`, or shards and the index. Each file is written atomically; afterwards shard files
/// of an earlier save that this one did not rewrite are removed (as transformers does), and so is a stale
/// single file or index of the other layout (transformers leaves those; its loader, and ferrovlm's,
/// would pick a stale `model.safetensors` first). Returns the weight files written.
pub fn save_sharded(dir: &Path, tensors: &[RawTensor], max_size: i64, total_parameters: usize) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let sizes: Vec<usize> = tensors.iter().map(|t| t.3.len()).collect();
    let shards = split(&sizes, max_size);
    let n = shards.len();
    let names: Vec<String> = if n <= 1 {
        vec![SINGLE_NAME.to_string()]
    } else {
        (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect()
    };
    let mut weight_map = BTreeMap::new();
    for (shard, name) in shards.iter().zip(&names) {
        let part: Vec<RawTensor> = shard.iter().map(|&i| tensors[i].clone()).collect();
        super::save::write_safetensors(&dir.join(name), &part)?;
        weight_map.extend(part.into_iter().map(|t| (t.0, name.clone())));
    }
    if n == 0 {
        super::save::write_safetensors(&dir.join(SINGLE_NAME), &[])?;
    }
    let index = dir.join(INDEX_NAME);
    if n > 1 {
        let tmp = dir.join(format!("{INDEX_NAME}.tmp"));
        let text = index_json(total_parameters, sizes.iter().sum(), weight_map);
        std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &index).map_err(|e| io(&index, e))?;
    }
    // Stale files of an earlier save.
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = (is_shard_name(&name) && !names.contains(&name))
            || (n > 1 && name == SINGLE_NAME)
            || (n <= 1 && name == INDEX_NAME);
        if stale && entry.path().is_file() {
            std::fs::remove_file(entry.path()).map_err(|e| io(&entry.path(), e))?;
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_huggingface_hub_parses_them() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size(" 0.2MB ").unwrap(), 200_000);
        assert_eq!(parse_size("25kb").unwrap(), 25_000);
        assert_eq!(parse_size("1 TB").unwrap(), 1_000_000_000_000);
        for bad in ["5GiB", "5", "", "GB", "x5GB", "5B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("5GiB").unwrap_err().to_string().contains("unit 'IB' not supported"));
    }

    #[test]
    fn split_follows_the_hub_example() {
        // huggingface_hub's docstring: limit 10, sizes [6, 6, 2, 6, 2, 2] -> [6], [6+2], [6+2+2]
        assert_eq!(split(&[6, 6, 2, 6, 2, 2], 10), vec![vec![0], vec![1, 2], vec![3, 4, 5]]);
        // a tensor over the limit gets its own shard, without closing the current one
        assert_eq!(split(&[3, 20, 4, 5], 10), vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(split(&[1, 2], 100), vec![vec![0, 1]]);
    }

    #[test]
    fn shard_names_are_recognised() {
        assert!(is_shard_name("model-00001-of-00004.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
        assert!(!is_shard_name("adapter-00001-of-00004.safetensors"));
        assert!(!is_shard_name("model-0001-of-00004.safetensors"));
    }

    #[test]
    fn names_sort_as_dot_natural_key() {
        let mut names = [
            "model.layers.10.mlp",
            "model.layers.2.mlp",
            "lm_head.weight",
            "model.layers.2",
            "a.shard_11",
            "a.shard_2",
            "a.shard",
            "a.0",
        ];
        names.sort_by_cached_key(|n| natural_key(n));
        assert_eq!(
            names,
            [
                "a.0",
                "a.shard",
                "a.shard_2",
                "a.shard_11",
                "lm_head.weight",
                "model.layers.2",
                "model.layers.2.mlp",
                "model.layers.10.mlp"
            ]
        );
    }
}
