//! Bindings of `crate::model`: the loaded model and its forward.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::errors::{detached, guard};
use crate::error::{input_err, Error};
use crate::model::{ForwardInput, VlmModel};

fn parse_dtype(s: &str) -> Result<DType, Error> {
    match s {
        "float32" | "fp32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "fp16" => Ok(DType::F16),
        other => input_err(format!("unsupported dtype '{other}' (float32, bfloat16, float16)")),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

pub(crate) fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = t.dims().to_vec();
    let data: Vec<f32> = guard(|| Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))?;
    let arr = guard(|| ArrayD::from_shape_vec(IxDyn(&shape), data).or_else(|e| input_err(e.to_string())))?;
    Ok(arr.into_pyarray(py))
}

/// The device `spec` names, opened without the GIL (the first CUDA call loads the driver).
fn open_device(py: Python<'_>, spec: &str) -> PyResult<Device> {
    py.detach(|| guard(|| crate::device::open(crate::device::parse(spec)?)))
}

/// Pixel values [B, F, C, H, W] to a tensor (copied; numpy memory is not kept).
fn pixels(p: &PyReadonlyArrayDyn<'_, f32>) -> Result<Tensor, Error> {
    let shape = p.shape().to_vec();
    let data: Vec<f32> = p.as_array().iter().copied().collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn shape2(a: &PyReadonlyArrayDyn<'_, i64>, name: &str) -> Result<(usize, usize), Error> {
    match a.shape() {
        [b, l] => Ok((*b, *l)),
        s => input_err(format!("{name} must be 2-D [batch, seq_len], got shape {s:?}")),
    }
}

/// Model inputs copied out of numpy (with the GIL held) and shape-checked.
pub(crate) struct OwnedInput {
    b: usize,
    l: usize,
    ids: Vec<i64>,
    am: Option<Vec<i64>>,
    labels: Option<Vec<i64>>,
    px: Option<Tensor>,
    pam: Option<Vec<bool>>,
}

impl OwnedInput {
    pub(crate) fn copy(
        input_ids: &PyReadonlyArrayDyn<'_, i64>,
        attention_mask: Option<&PyReadonlyArrayDyn<'_, i64>>,
        pixel_values: Option<&PyReadonlyArrayDyn<'_, f32>>,
        pixel_attention_mask: Option<&PyReadonlyArrayDyn<'_, bool>>,
        labels: Option<&PyReadonlyArrayDyn<'_, i64>>,
    ) -> Result<Self, Error> {
        let (b, l) = shape2(input_ids, "input_ids")?;
        for (name, arr) in [("attention_mask", attention_mask), ("labels", labels)] {
            if let Some(a) = arr {
                if a.shape() != [b, l] {
                    return input_err(format!("{name} has shape {:?}, input_ids has [{b}, {l}]", a.shape()));
                }
            }
        }
        let px = pixel_values.map(pixels).transpose()?;
        if let Some(px) = &px {
            let d = px.dims();
            if d.len() != 5 {
                return input_err(format!(
                    "pixel_values must be [batch, frames, channels, height, width], got shape {d:?}"
                ));
            }
            let want = [d[0], d[1], d[3], d[4]];
            if let Some(m) = pixel_attention_mask {
                if m.shape() != want {
                    return input_err(format!(
                        "pixel_attention_mask has shape {:?}, expected {want:?} from pixel_values {d:?}",
                        m.shape()
                    ));
                }
            }
        }
        let flat = |a: &PyReadonlyArrayDyn<'_, i64>| a.as_array().iter().copied().collect::<Vec<i64>>();
        Ok(OwnedInput {
            b,
            l,
            ids: flat(input_ids),
            am: attention_mask.map(flat),
            labels: labels.map(flat),
            px,
            pam: pixel_attention_mask.map(|a| a.as_array().iter().copied().collect()),
        })
    }

    pub(crate) fn view(&self, logits_to_keep: usize) -> ForwardInput<'_> {
        ForwardInput {
            input_ids: &self.ids,
            batch: self.b,
            seq_len: self.l,
            attention_mask: self.am.as_deref(),
            pixel_values: self.px.as_ref(),
            pixel_attention_mask: self.pam.as_deref(),
            labels: self.labels.as_deref(),
            logits_to_keep,
        }
    }
}

/// A loaded SmolVLM / Idefics3 model.
/// A shape and two arrays, as a Python tuple.
type ShapeAndArrays<'py> = (Vec<usize>, Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<f32>>);

#[pyclass(name = "VlmModel", module = "ferrovlm._core", frozen)]
pub struct PyVlmModel {
    /// Replaced as a whole when adapters are attached, merged or removed; calls in flight keep the
    /// model they started with.
    inner: std::sync::RwLock<Arc<VlmModel>>,
}

impl PyVlmModel {
    pub(crate) fn new(m: VlmModel) -> Self {
        PyVlmModel { inner: std::sync::RwLock::new(Arc::new(m)) }
    }

    /// The current model.
    pub(crate) fn get(&self) -> Arc<VlmModel> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The model a pass runs: with the adapters off, the `modules_to_save` originals in place
    /// ([`VlmModel::active`]).
    pub(crate) fn get_active(&self) -> PyResult<Arc<VlmModel>> {
        let m = self.get();
        Ok(guard(|| m.active())?.map(Arc::new).unwrap_or(m))
    }

    /// Replaces the model by `f(copy of the current one)`.
    pub(crate) fn update(&self, f: impl FnOnce(&mut VlmModel) -> Result<(), Error>) -> Result<(), Error> {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut m = VlmModel::clone(&g);
        f(&mut m)?;
        *g = Arc::new(m);
        Ok(())
    }
}

#[pymethods]
impl PyVlmModel {
    /// Loads config.json and the safetensors weights of a checkpoint directory.
    /// `quantization_config`: transformers' `BitsAndBytesConfig.to_dict()` as JSON (quantize while
    /// loading); a checkpoint saved quantized loads as stored without it.
    #[staticmethod]
    /// `device`: "cpu", "cuda", "cuda:N" or "auto" (see `crate::device`).
    #[pyo3(signature = (dir, dtype="float32", quantization_config=None, device="cpu"))]
    fn load(
        py: Python<'_>,
        dir: PathBuf,
        dtype: &str,
        quantization_config: Option<&str>,
        device: &str,
    ) -> PyResult<Self> {
        let dtype = guard(|| parse_dtype(dtype))?;
        let dev = open_device(py, device)?;
        let quant = guard(|| {
            quantization_config
                .map(|j| {
                    let v: serde_json::Value = serde_json::from_str(j)
                        .or_else(|e| input_err(format!("quantization_config is not JSON: {e}")))?;
                    Ok(crate::quant::QuantConfig::from_json(&v, std::path::Path::new("<quantization_config>"))?)
                })
                .transpose()
        })?;
        let m = detached(py, |_| VlmModel::from_dir_quantized(&dir, dtype, &dev, quant))?;
        Ok(PyVlmModel::new(m))
    }

    /// A model from GGUF files (`from_pretrained(dir, gguf_file=..., mmproj_file=...)`): a Llama
    /// language model alone from `path`; with `mmproj`, SmolVLM from the text file and the mmproj file
    /// (`config_dir`'s config.json when given, else the files' metadata with `model_type`); with
    /// `config_dir` alone, SmolVLM from that hub-layout folder with its text model from `path`.
    /// Quantized weights stay in their blocks, float tensors are decoded to `dtype`.
    #[staticmethod]
    #[pyo3(signature = (path, dtype="float32", mmproj=None, config_dir=None, model_type="idefics3", device="cpu"))]
    fn load_gguf(
        py: Python<'_>,
        path: PathBuf,
        dtype: &str,
        mmproj: Option<PathBuf>,
        config_dir: Option<PathBuf>,
        model_type: &str,
        device: &str,
    ) -> PyResult<Self> {
        let dtype = guard(|| parse_dtype(dtype))?;
        let dev = open_device(py, device)?;
        let m = detached(py, |_| match (&mmproj, &config_dir) {
            (Some(mm), dir) => VlmModel::from_gguf_mmproj(&path, mm, dir.as_deref(), model_type, dtype, &dev),
            (None, Some(dir)) => VlmModel::from_dir_gguf_text(dir, &path, dtype, &dev),
            (None, None) => VlmModel::from_gguf(&path, dtype, &dev),
        })?;
        Ok(PyVlmModel::new(m))
    }

    /// Writes the text GGUF file (and for a VLM the mmproj file) into `directory` for llama.cpp, as
    /// its converter does (`checkpoint::gguf_export`); returns (text path, mmproj path or None).
    /// `merge_adapters`: export a copy with the adapters merged (the model keeps them); otherwise a
    /// model with adapters is refused. `tokenizer_gguf` / `mmproj_gguf`: the files a model read from
    /// GGUF came from (its vocabulary and image settings, where `assets_dir` has none).
    #[pyo3(signature = (directory, quantization_method="f16", name_or_path="", assets_dir=None, tokenizer_gguf=None, merge_adapters=false, mmproj_gguf=None))]
    #[allow(clippy::too_many_arguments)]
    fn save_gguf(
        &self,
        py: Python<'_>,
        directory: PathBuf,
        quantization_method: &str,
        name_or_path: &str,
        assets_dir: Option<PathBuf>,
        tokenizer_gguf: Option<PathBuf>,
        merge_adapters: bool,
        mmproj_gguf: Option<PathBuf>,
    ) -> PyResult<(String, Option<String>)> {
        use crate::checkpoint::gguf_export::{export, GgufExportOptions, GgufQuantMethod};
        let method = guard(|| GgufQuantMethod::parse(quantization_method))?;
        let name = if name_or_path.is_empty() { directory.display().to_string() } else { name_or_path.to_string() };
        let opts = GgufExportOptions { method, name_or_path: name, assets_dir, tokenizer_gguf, mmproj_gguf };
        let model = self.get();
        let files = detached(py, |_| {
            if merge_adapters {
                let mut copy = VlmModel::clone(&model);
                crate::lora::detach(&mut copy, true)?;
                export(&copy, &directory, &opts)
            } else {
                export(&model, &directory, &opts)
            }
        })?;
        let s = |p: &std::path::Path| p.display().to_string();
        Ok((s(&files.text), files.mmproj.as_deref().map(s)))
    }

    /// Quantized Linear layers: (method or None, their count, bytes of their quantized weights as
    /// transformers counts them, their number of logical weights).
    #[getter]
    fn quantization(&self) -> (Option<&'static str>, usize, usize, usize) {
        let m = self.get();
        let mut kind = None;
        let (mut n, mut bytes, mut logical) = (0, 0, 0);
        for (_, l) in m.linears() {
            if let Some(q) = l.quant() {
                kind = Some(match &**q {
                    crate::quant::QuantWeight::FourBit(_) => "4bit",
                    crate::quant::QuantWeight::Int8(_) => "8bit",
                    crate::quant::QuantWeight::Ggml(_) => "gguf",
                });
                n += 1;
                let (o, k) = q.shape();
                bytes += match &**q {
                    crate::quant::QuantWeight::FourBit(f) => f.packed.len(),
                    crate::quant::QuantWeight::Int8(_) => o * k,
                    crate::quant::QuantWeight::Ggml(g) => g.data().len(),
                };
                logical += o * k;
            }
        }
        (kind, n, bytes, logical)
    }

    /// Writes the weights to `dir` as transformers' `save_pretrained(max_shard_size=...)` does
    /// (transformers' keys; quantized layers in bitsandbytes' form): `model.safetensors`, or shards and
    /// `model.safetensors.index.json`. `max_shard_size`: bytes, or a string such as "5GB" / "500MB".
    /// Returns the weight files written.
    #[pyo3(signature = (dir, max_shard_size=None))]
    fn save_weights(&self, py: Python<'_>, dir: PathBuf, max_shard_size: Option<ShardSize>) -> PyResult<Vec<String>> {
        use crate::checkpoint::shard;
        let max = guard(|| match &max_shard_size {
            Some(ShardSize::Bytes(n)) => Ok(*n),
            Some(ShardSize::Text(s)) => shard::parse_size(s),
            None => shard::parse_size(shard::DEFAULT_MAX_SHARD_SIZE),
        })?;
        let model = self.get();
        detached(py, |_| crate::checkpoint::save::save_model(&model, &dir, max))
    }

    /// The config as JSON (file keys plus defaults).
    #[getter]
    fn config_json(&self) -> String {
        super::config::resolved_json(&self.get().config)
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.get().reported_dtype())
    }

    /// torch's name of the device the weights are on: "cpu", "cuda:0".
    #[getter]
    fn device(&self) -> String {
        crate::device::name(&self.get().device)
    }

    /// Moves every weight to `device` ("cpu", "cuda", "cuda:N", "auto"), in place; a `DeviceError` when
    /// it cannot be had or the model has adapters or trainable parameters.
    fn to_device(&self, py: Python<'_>, device: &str) -> PyResult<()> {
        let dev = open_device(py, device)?;
        detached(py, |_| {
            self.update(|m| {
                *m = m.to_device(&dev)?;
                Ok(())
            })
        })
    }

    /// Returns (logits [B, K, V] float32, loss or None, number of label tokens).
    #[pyo3(signature = (input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, labels=None, logits_to_keep=0))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        attention_mask: Option<PyReadonlyArrayDyn<'py, i64>>,
        pixel_values: Option<PyReadonlyArrayDyn<'py, f32>>,
        pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        labels: Option<PyReadonlyArrayDyn<'py, i64>>,
        logits_to_keep: usize,
    ) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, Option<f32>, usize)> {
        let inputs = guard(|| {
            OwnedInput::copy(
                &input_ids,
                attention_mask.as_ref(),
                pixel_values.as_ref(),
                pixel_attention_mask.as_ref(),
                labels.as_ref(),
            )
        })?;
        let model = self.get_active()?;
        let out = detached(py, |interrupt| model.forward(&inputs.view(logits_to_keep), interrupt))?;
        Ok((to_numpy(py, &out.logits)?, out.loss, out.num_label_tokens))
    }

    /// Vision tower and connector outputs of the real (non-padding) frames:
    /// (indices of the real frames in the flattened B*F, vision_hidden [N, P, D], connector [N, T, H]).
    #[pyo3(signature = (pixel_values, pixel_attention_mask=None))]
    fn image_features<'py>(
        &self,
        py: Python<'py>,
        pixel_values: PyReadonlyArrayDyn<'py, f32>,
        pixel_attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    ) -> PyResult<ShapeAndArrays<'py>> {
        let px = guard(|| pixels(&pixel_values))?;
        let pam: Option<Vec<bool>> = pixel_attention_mask.map(|a| a.as_array().iter().copied().collect());
        let model = self.get_active()?;
        let f = detached(py, |interrupt| model.image_features(&px, pam.as_deref(), interrupt))?;
        Ok((f.real_frames, to_numpy(py, &f.vision_hidden)?, to_numpy(py, &f.connector)?))
    }

    /// Number of parameters (tied weights counted once).
    #[getter]
    fn num_parameters(&self) -> usize {
        self.get().num_parameters()
    }

    /// (name, checkpoint shape, storage, trainable) of every parameter in transformers'
    /// `named_parameters()` order (a tied head once, as the embedding). `storage`: "float32",
    /// "bfloat16", "bnb4bit", "bnb8bit" or "gguf"; `trainable`: being trained by a session now.
    fn named_parameters(&self) -> Vec<(String, Vec<usize>, &'static str, bool)> {
        self.get().param_infos().into_iter().map(|p| (p.name, p.shape, p.storage, p.trainable)).collect()
    }

    /// The parameter `name` as a float32 array of its checkpoint shape.
    fn parameter<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let t = guard(|| self.get().param_value(name))?;
        to_numpy(py, &t)
    }

    /// Sets the parameter `name` to `value` (float32, its checkpoint shape), stored as the parameter is.
    fn set_parameter(&self, name: &str, value: PyReadonlyArrayDyn<'_, f32>) -> PyResult<()> {
        let shape = value.shape().to_vec();
        let data: Vec<f32> = value.as_array().iter().copied().collect();
        guard(|| {
            let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
            self.update(|m| m.set_param_value(name, &t))
        })
    }

    /// A frozen copy for a reference pass that computes exactly as a training session over the same
    /// `trainable` parameters does (they are autograd `Var`s here too, never updated): DPO's reference
    /// model in full-parameter training, whose log-probabilities then equal the policy's bit for bit
    /// before the first step, as TRL's do.
    fn trainable_copy(&self, trainable: Vec<String>) -> PyResult<PyVlmModel> {
        let m = guard(|| self.get().with_trainable(&trainable))?;
        Ok(PyVlmModel::new(m))
    }

    /// Another handle on the model as it is now: attaching adapters to either, or training either's
    /// own parameters (which copies them first), leaves the other as it was (a frozen reference).
    fn snapshot(&self) -> PyVlmModel {
        PyVlmModel { inner: std::sync::RwLock::new(self.get()) }
    }
}

/// The Linear modules stored quantized, in module order (transformers' names).
#[pyfunction]
fn quantized_linear_names(model: &PyVlmModel) -> Vec<String> {
    model.get().linears().into_iter().filter(|(_, l)| l.quant().is_some()).map(|(n, _)| n).collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyVlmModel>()?;
    let methods = crate::checkpoint::GgufQuantMethod::ALL.map(|q| q.name());
    m.add("GGUF_QUANTIZATION_METHODS", pyo3::types::PyTuple::new(m.py(), methods)?)?;
    m.add_function(wrap_pyfunction!(quantized_linear_names, m)?)?;
    Ok(())
}

/// `max_shard_size`: bytes (an int) or a size string ("5GB").
#[derive(FromPyObject)]
pub enum ShardSize {
    Bytes(i64),
    Text(String),
}
