//! Memory-mapped safetensors checkpoints: one file or shards listed in `model.safetensors.index.json`.
//!
//! Tensors are decoded straight from the mapping into the compute dtype, so the process holds one
//! copy of the weights: the mapping is file-backed and is dropped once the model is built.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use crate::error::CheckpointError;

struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The tensors of a safetensors checkpoint, memory-mapped, by name (one backend of
/// [`super::WeightStore`]).
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

/// A stored tensor as it is on disk: dtype, shape, bytes and the file it is in.
pub type RawTensor<'a> = (StDtype, Vec<usize>, &'a [u8], &'a Path);

impl SafetensorsFiles {
    /// Opens `model.safetensors` or the shards of `model.safetensors.index.json` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, CheckpointError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        if index.is_file() {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| CheckpointError::Io { file: index.clone(), msg: e.to_string() })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| CheckpointError::Corrupt { file: index.clone(), msg: format!("invalid JSON: {e}") })?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| CheckpointError::Corrupt {
                file: index.clone(),
                msg: "no 'weight_map' object".into(),
            })?;
            // A set: a linear search per entry is quadratic in the number of shard names.
            let mut shards: BTreeSet<&str> = BTreeSet::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| CheckpointError::Corrupt {
                    file: index.clone(),
                    msg: format!("weight_map['{name}'] is not a file name"),
                })?;
                shards.insert(f);
            }
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open_files(&paths);
        }
        Err(CheckpointError::NotFound { path: single, hint: " (nor model.safetensors.index.json)".into() })
    }

    /// Maps the given files and reads their headers.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, CheckpointError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let f = File::open(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => CheckpointError::NotFound { path: path.clone(), hint: String::new() },
                _ => CheckpointError::Io { file: path.clone(), msg: e.to_string() },
            })?;
            // SAFETY: the mapping is read-only; a checkpoint rewritten while we read it is outside our contract
            // (the same as safetensors' and transformers' own loaders).
            let mmap =
                unsafe { Mmap::map(&f) }.map_err(|e| CheckpointError::Io { file: path.clone(), msg: e.to_string() })?;
            // Validates the header and that every tensor lies inside the file.
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| CheckpointError::Corrupt { file: path.clone(), msg: e.to_string() })?;
            for (name, view) in st.tensors() {
                let data = view.data();
                // Offset of this view's data inside the mapping.
                let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsFiles { files, entries })
    }

    /// True when `name` is stored as bf16.
    pub fn is_bf16(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.dtype == StDtype::BF16)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub(crate) fn file_list(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|(p, _)| p.display().to_string()).collect();
        names.join(", ")
    }

    /// The stored bytes of `name` with its safetensors dtype and shape (quantized weights, byte blobs).
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, CheckpointError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor { name: name.to_string(), files: self.file_list() })?;
        let (path, mmap) = &self.files[e.file];
        Ok((e.dtype, e.shape.clone(), &mmap[e.start..e.end], path.as_path()))
    }

    /// Loads `name`, checking it has `shape`, converted to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, CheckpointError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor { name: name.to_string(), files: self.file_list() })?;
        let (path, mmap) = &self.files[e.file];
        if e.shape != shape {
            return Err(CheckpointError::BadShape {
                name: name.into(),
                file: path.clone(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        let bytes = &mmap[e.start..e.end];
        let bad_dtype =
            || CheckpointError::BadDtype { name: name.into(), file: path.clone(), dtype: format!("{:?}", e.dtype) };
        let t = match dtype {
            DType::F32 => Tensor::from_vec(decode(bytes, e.dtype, |x| x).ok_or_else(bad_dtype)?, shape, device),
            DType::BF16 => {
                Tensor::from_vec(decode(bytes, e.dtype, bf16::from_f32).ok_or_else(bad_dtype)?, shape, device)
            }
            DType::F16 => Tensor::from_vec(decode(bytes, e.dtype, f16::from_f32).ok_or_else(bad_dtype)?, shape, device),
            other => {
                return Err(CheckpointError::BadDtype {
                    name: name.into(),
                    file: path.clone(),
                    dtype: format!("target {other:?}"),
                })
            }
        };
        // The decoded copy is what the model keeps: let the kernel drop the mapped pages now, so that
        // loading never holds the file's pages and the weights at once (peak RSS ~ one copy).
        #[cfg(unix)]
        // SAFETY: a read-only, file-backed mapping; DONTNEED only discards pages, which are re-read from
        // the file if touched again. No reference into this range outlives this call.
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, e.start, e.end - e.start) };
        t.map_err(|err| CheckpointError::Io { file: path.clone(), msg: format!("tensor '{name}': {err}") })
    }
}

/// Decodes little-endian F32/BF16/F16 bytes to `T` via f32 (exact for bf16/f16 sources;
/// f32 -> bf16/f16 rounds to nearest even like torch). `None` for other source dtypes.
fn decode<T>(bytes: &[u8], src: StDtype, conv: impl Fn(f32) -> T) -> Option<Vec<T>> {
    Some(match src {
        StDtype::F32 => bytes.chunks_exact(4).map(|c| conv(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        StDtype::BF16 => bytes.chunks_exact(2).map(|c| conv(bf16::from_le_bytes([c[0], c[1]]).to_f32())).collect(),
        StDtype::F16 => bytes.chunks_exact(2).map(|c| conv(f16::from_le_bytes([c[0], c[1]]).to_f32())).collect(),
        _ => return None,
    })
}
