//! [`WeightStore`]: the tensors the model loaders read, by Hugging Face name, from safetensors files,
//! a Llama GGUF file (dequantized on request, or as raw quantized rows), an mmproj GGUF file (the
//! vision tower and connector, dequantized), or layers of these (the first that holds a name).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::gguf_llama::{GgufLlama, GgufRows};
use super::gguf_mmproj::GgufClip;
use super::safetensors::{RawTensor, SafetensorsFiles};
use crate::error::CheckpointError;

enum Backend {
    Safetensors(SafetensorsFiles),
    Gguf(Box<GgufLlama>),
    Clip(Box<GgufClip>),
    Layered(Vec<WeightStore>),
}

/// The tensors of a checkpoint by Hugging Face name, memory-mapped.
pub struct WeightStore {
    backend: Backend,
}

impl WeightStore {
    /// Opens `model.safetensors` or the shards of `model.safetensors.index.json` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, CheckpointError> {
        Ok(WeightStore { backend: Backend::Safetensors(SafetensorsFiles::open_dir(dir)?) })
    }

    /// Maps the given safetensors files and reads their headers.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, CheckpointError> {
        Ok(WeightStore { backend: Backend::Safetensors(SafetensorsFiles::open_files(paths)?) })
    }

    /// A Llama GGUF file, its tensors named as in `LlamaForCausalLM` (`model.layers.N...`,
    /// `lm_head.weight`).
    pub fn open_gguf(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        Self::open_gguf_with_prefix(path, "model")
    }

    /// A Llama GGUF file with its text model under `prefix` (e.g. "model.text_model" in SmolVLM).
    pub fn open_gguf_with_prefix(path: impl AsRef<Path>, prefix: &str) -> Result<Self, CheckpointError> {
        Ok(Self::from_gguf(GgufLlama::open(path, prefix)?))
    }

    pub fn from_gguf(g: GgufLlama) -> Self {
        WeightStore { backend: Backend::Gguf(Box::new(g)) }
    }

    /// An mmproj GGUF file, its tensors named as in `Idefics3ForConditionalGeneration`.
    pub fn from_clip(c: GgufClip) -> Self {
        WeightStore { backend: Backend::Clip(Box::new(c)) }
    }

    /// Several stores read as one: a name comes from the first store that holds it.
    pub fn layered(stores: Vec<WeightStore>) -> Self {
        WeightStore { backend: Backend::Layered(stores) }
    }

    /// The store that holds `name` (a layer of a layered store, or this one).
    fn owner(&self, name: &str) -> &WeightStore {
        match &self.backend {
            Backend::Layered(l) => l.iter().find(|s| s.contains(name)).map_or(self, |s| s.owner(name)),
            _ => self,
        }
    }

    /// The Llama GGUF file and its config, when the store reads one (the first layer that does).
    pub fn gguf(&self) -> Option<&GgufLlama> {
        match &self.backend {
            Backend::Gguf(g) => Some(g),
            Backend::Layered(l) => l.iter().find_map(WeightStore::gguf),
            Backend::Safetensors(_) | Backend::Clip(_) => None,
        }
    }

    /// True when `name` is stored as bf16.
    pub fn is_bf16(&self, name: &str) -> bool {
        use crate::quant::ggml::GgmlType;
        match &self.owner(name).backend {
            Backend::Safetensors(s) => s.is_bf16(name),
            Backend::Gguf(g) => g.info(name).is_some_and(|i| i.ty == GgmlType::Bf16),
            Backend::Clip(c) => c.info(name).is_some_and(|i| i.ty == GgmlType::Bf16),
            Backend::Layered(_) => false,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.backend {
            Backend::Safetensors(s) => s.contains(name),
            Backend::Gguf(g) => g.contains(name),
            Backend::Clip(c) => c.contains(name),
            Backend::Layered(l) => l.iter().any(|s| s.contains(name)),
        }
    }

    /// The stored shape of `name` (outermost first).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.owner(name).backend {
            Backend::Safetensors(s) => s.shape(name),
            Backend::Gguf(g) => g.info(name).map(|i| i.shape()),
            Backend::Clip(c) => c.info(name).map(|i| i.shape()),
            Backend::Layered(_) => None,
        }
    }

    pub fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.backend {
            Backend::Safetensors(s) => Box::new(s.names()),
            Backend::Gguf(g) => Box::new(g.names()),
            Backend::Clip(c) => Box::new(c.names()),
            Backend::Layered(l) => Box::new(l.iter().flat_map(|s| s.names())),
        }
    }

    /// The stored bytes of `name` with its safetensors dtype and shape (quantized weights, byte
    /// blobs). Safetensors only: a GGUF store gives [`Self::gguf_rows`] instead.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, CheckpointError> {
        match &self.owner(name).backend {
            Backend::Safetensors(s) => s.raw(name),
            Backend::Layered(_) => {
                Err(CheckpointError::MissingTensor { name: name.into(), files: "the layered weight store".into() })
            }
            Backend::Clip(c) => Err(CheckpointError::GgufUnsupported {
                file: c.file().path().to_path_buf(),
                what: format!("access to tensor '{name}' as safetensors bytes (read it dequantized)"),
            }),
            Backend::Gguf(g) => Err(match g.info(name) {
                None => {
                    CheckpointError::MissingTensor { name: name.into(), files: g.file().path().display().to_string() }
                }
                Some(i) => CheckpointError::GgufUnsupported {
                    file: g.file().path().to_path_buf(),
                    what: format!(
                        "access to tensor '{name}' ({}) as safetensors bytes (read it dequantized or as GGUF rows)",
                        i.ty.name()
                    ),
                },
            }),
        }
    }

    /// `name`'s rows in their GGUF encoding, in Hugging Face order (Q/K un-permuted), so that a
    /// loader can keep a quantized weight quantized. `Ok(None)` for a safetensors store.
    pub fn gguf_rows(&self, name: &str) -> Result<Option<GgufRows>, CheckpointError> {
        match &self.owner(name).backend {
            Backend::Safetensors(_) | Backend::Clip(_) | Backend::Layered(_) => Ok(None),
            Backend::Gguf(g) => g.rows(name).map(Some),
        }
    }

    /// Loads `name`, checking it has `shape`, converted to `dtype` on `device`. From a GGUF file the
    /// tensor is dequantized to f32 (as transformers does) and then converted.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, CheckpointError> {
        let owner = self.owner(name);
        let (file, found) = match &owner.backend {
            Backend::Safetensors(s) => return s.get(name, shape, dtype, device),
            Backend::Layered(_) => {
                return Err(CheckpointError::MissingTensor {
                    name: name.into(),
                    files: "the layered weight store".into(),
                })
            }
            Backend::Gguf(g) => (g.file().path().to_path_buf(), g.info(name).map(|i| i.shape())),
            Backend::Clip(c) => (c.file().path().to_path_buf(), c.info(name).map(|i| i.shape())),
        };
        if found.as_deref().is_some_and(|f| f != shape) {
            return Err(CheckpointError::BadShape {
                name: name.into(),
                file,
                expected: shape.to_vec(),
                found: found.unwrap_or_default(),
            });
        }
        let values = match &owner.backend {
            Backend::Gguf(g) => {
                let (v, _) = g.dequantize(name)?;
                g.release(name);
                v
            }
            Backend::Clip(c) => c.dequantize(name)?.0,
            _ => Vec::new(),
        };
        let t = match dtype {
            DType::F32 => Tensor::from_vec(values, shape, device),
            DType::BF16 => Tensor::from_vec(values.into_iter().map(bf16::from_f32).collect(), shape, device),
            DType::F16 => Tensor::from_vec(values.into_iter().map(f16::from_f32).collect(), shape, device),
            other => {
                return Err(CheckpointError::BadDtype { name: name.into(), file, dtype: format!("target {other:?}") })
            }
        };
        t.map_err(|err| CheckpointError::Io { file, msg: format!("tensor '{name}': {err}") })
    }
}
