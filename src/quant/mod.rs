//! Quantized base weights: bitsandbytes' 4-bit NF4/FP4 and 8-bit LLM.int8, bit for bit with
//! bitsandbytes (quantizing while loading, reading and writing its serialized form), and GGUF's GGML
//! blocks ([`ggml::GgmlWeight`], kept as read from the file).
//!
//! A [`QuantWeight`] never holds a full-size f32 copy of its weight: the matmul kernels in
//! `ops::matmul_quant` decode it tile by tile ([`QuantWeight::decode_rows`]).

pub mod dynamic;
pub mod four_bit;
pub mod ggml;
pub mod ggml_quantize;
pub mod int8;
pub mod load;
pub mod serialize;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use four_bit::{Absmax, FourBitType};
pub use ggml::{GgmlType, GgmlWeight};

/// What `BitsAndBytesConfig` asks for, as the core needs it.
#[derive(Debug, Clone, Default)]
pub struct QuantConfig {
    pub method: QuantMethod,
    /// `bnb_4bit_compute_dtype` is bfloat16 (or float16): products in bf16 with f32 accumulation.
    pub compute_bf16: bool,
    /// Modules (transformers names, or their last components) left unquantized, besides `lm_head`.
    pub skip_modules: Vec<String>,
    /// LLM.int8 outlier threshold (`llm_int8_threshold`).
    pub int8_threshold: f32,
    /// The checkpoint is stored quantized: Linears stored dense stay dense.
    pub prequantized: bool,
    /// The model's training mode, shared with its int8 layers (see [`Int8::training`]).
    pub training: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMethod {
    FourBit { ty: FourBitType, double_quant: bool },
    Int8,
}

impl Default for QuantMethod {
    fn default() -> Self {
        QuantMethod::FourBit { ty: FourBitType::Fp4, double_quant: false }
    }
}

/// Block size of 4-bit quantization (transformers' bnb integration always uses 64).
pub const BLOCKSIZE: usize = 64;
/// Block size of the double quantization of the 4-bit scales.
pub const NESTED_BLOCKSIZE: usize = 256;

impl QuantConfig {
    /// Whether the Linear `module` stays unquantized: transformers keeps the output head and every
    /// module named (or ending with a name) in `llm_int8_skip_modules`.
    pub fn skips(&self, module: &str) -> bool {
        module == "lm_head"
            || self.skip_modules.iter().any(|s| {
                module == s
                    || module.ends_with(&format!(".{s}"))
                    || module.starts_with(&format!("{s}."))
                    || module.contains(&format!(".{s}."))
            })
    }
}

/// A 4-bit weight in bitsandbytes' layout.
#[derive(Debug, Clone)]
pub struct FourBit {
    pub ty: FourBitType,
    /// [out, in]
    pub shape: (usize, usize),
    /// ceil(out * in / 2) bytes, the even flattened position in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub blocksize: usize,
    /// The dtype the weight had when quantized (`quant_state.dtype`: "float32", "bfloat16", ...).
    pub dtype: String,
    /// `absmax` decoded to one f32 per block (what dequantization multiplies by).
    pub scales: Vec<f32>,
}

/// An LLM.int8 weight: int8 rows with one f32 absmax (`SCB`) per output row.
#[derive(Debug, Clone)]
pub struct Int8 {
    /// [out, in]
    pub shape: (usize, usize),
    /// [out * in] row-major
    pub cb: Vec<i8>,
    /// [out]
    pub scb: Vec<f32>,
    /// LLM.int8 outlier threshold for activations (0 = none).
    pub threshold: f32,
    /// The model's training mode, shared by its int8 layers: training runs bitsandbytes' training
    /// product (dequantize, then f32), inference the LLM.int8 product ([`Int8::forward_lt`]).
    pub training: Arc<AtomicBool>,
}

/// A quantized Linear weight [out, in].
#[derive(Debug, Clone)]
pub enum QuantWeight {
    FourBit(FourBit),
    Int8(Int8),
    /// GGUF blocks (frozen: training reaches x only, as with the others).
    Ggml(GgmlWeight),
}

impl FourBit {
    /// Quantizes `w` ([out, in] row-major f32, the values the weight has in its load dtype).
    pub fn quantize(w: &[f32], shape: (usize, usize), ty: FourBitType, double_quant: bool, dtype: &str) -> Self {
        let (packed, absmax) = four_bit::quantize(w, ty, BLOCKSIZE);
        let absmax = if double_quant { four_bit::nest(&absmax, NESTED_BLOCKSIZE) } else { Absmax::Plain(absmax) };
        Self::from_parts(ty, shape, packed, absmax, BLOCKSIZE, dtype.to_string())
    }

    pub fn from_parts(
        ty: FourBitType,
        shape: (usize, usize),
        packed: Vec<u8>,
        absmax: Absmax,
        blocksize: usize,
        dtype: String,
    ) -> Self {
        let scales = absmax.decode();
        FourBit { ty, shape, packed, absmax, blocksize, dtype, scales }
    }

    /// Rows `r0..r0 + rows` dequantized into `dst` ([rows, in]).
    pub fn decode_rows(&self, r0: usize, rows: usize, dst: &mut [f32]) {
        let k = self.shape.1;
        four_bit::decode_range(
            &self.packed,
            &self.scales,
            self.ty.table(),
            self.blocksize,
            r0 * k,
            &mut dst[..rows * k],
        );
    }
}

impl QuantWeight {
    /// [out, in]
    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantWeight::FourBit(q) => q.shape,
            QuantWeight::Int8(q) => q.shape,
            QuantWeight::Ggml(q) => q.shape,
        }
    }

    /// Rows `r0..r0 + rows` of the dequantized weight into `dst` (at least rows * in values).
    pub fn decode_rows(&self, r0: usize, rows: usize, dst: &mut [f32]) {
        match self {
            QuantWeight::FourBit(q) => q.decode_rows(r0, rows, dst),
            QuantWeight::Int8(q) => q.decode_rows(r0, rows, dst),
            QuantWeight::Ggml(q) => q.decode_rows(r0, rows, dst),
        }
    }

    /// The whole dequantized weight [out * in] (tests, merging, DoRA norms; never kept by a model).
    pub fn dequantize(&self) -> Vec<f32> {
        let (o, k) = self.shape();
        let mut w = vec![0f32; o * k];
        self.decode_rows(0, o, &mut w);
        w
    }

    /// Bytes held by the quantized data (what `get_memory_footprint` counts for this weight).
    pub fn nbytes(&self) -> usize {
        match self {
            QuantWeight::FourBit(q) => q.packed.len() + q.absmax.nbytes() + 4 * 16,
            QuantWeight::Int8(q) => q.cb.len() + 4 * q.scb.len(),
            QuantWeight::Ggml(q) => q.data().len(),
        }
    }

    /// Quantizes a dense weight per `cfg`.
    pub fn quantize(w: &[f32], shape: (usize, usize), cfg: &QuantConfig, dtype: &str) -> Arc<Self> {
        Arc::new(match cfg.method {
            QuantMethod::FourBit { ty, double_quant } => {
                QuantWeight::FourBit(FourBit::quantize(w, shape, ty, double_quant, dtype))
            }
            QuantMethod::Int8 => {
                let mut q = Int8::quantize(w, shape, cfg.int8_threshold);
                q.training = cfg.training.clone();
                QuantWeight::Int8(q)
            }
        })
    }

    /// `w` (same shape) quantized with this weight's settings (PEFT's merge into a bitsandbytes
    /// layer), or None when a merged layer is dense: a GGUF weight, which transformers holds
    /// dequantized (f32), so that its merge is a dense weight too.
    pub fn requantize(&self, w: &[f32]) -> Option<Self> {
        Some(match self {
            QuantWeight::Ggml(_) => return None,
            QuantWeight::FourBit(q) => QuantWeight::FourBit(FourBit::quantize(
                w,
                q.shape,
                q.ty,
                matches!(q.absmax, Absmax::Nested { .. }),
                &q.dtype,
            )),
            QuantWeight::Int8(q) => {
                let mut n = Int8::quantize(w, q.shape, q.threshold);
                n.training = q.training.clone();
                QuantWeight::Int8(n)
            }
        })
    }

    /// The quantization settings of this weight as a short description (errors, repr).
    pub fn kind(&self) -> &'static str {
        match self {
            QuantWeight::FourBit(q) => q.ty.name(),
            QuantWeight::Int8(_) => "int8",
            QuantWeight::Ggml(q) => match q.ty {
                GgmlType::F32 => "gguf F32",
                GgmlType::F16 => "gguf F16",
                GgmlType::Bf16 => "gguf BF16",
                GgmlType::Q8_0 => "gguf Q8_0",
                GgmlType::Q4_0 => "gguf Q4_0",
                GgmlType::Q4_1 => "gguf Q4_1",
                GgmlType::Q5_0 => "gguf Q5_0",
                GgmlType::Q5_1 => "gguf Q5_1",
                GgmlType::Q4K => "gguf Q4_K",
                GgmlType::Q5K => "gguf Q5_K",
                GgmlType::Q6K => "gguf Q6_K",
            },
        }
    }
}

impl QuantConfig {
    /// From transformers' `BitsAndBytesConfig.to_dict()` (the `quantization_config` of config.json).
    /// `file` names where it came from in errors.
    pub fn from_json(v: &serde_json::Value, file: &std::path::Path) -> Result<Self, crate::error::ConfigError> {
        let bad = |key: &str, msg: String| crate::error::ConfigError::BadValue {
            file: file.to_path_buf(),
            key: format!("quantization_config.{key}"),
            msg,
        };
        let flag = |key: &str| v.get(key).and_then(|x| x.as_bool()).unwrap_or(false);
        if let Some(m) = v.get("quant_method").and_then(|m| m.as_str()) {
            if m != "bitsandbytes" {
                return Err(bad("quant_method", format!("'{m}' is not supported (bitsandbytes)")));
            }
        }
        let (four, eight) = (flag("load_in_4bit"), flag("load_in_8bit"));
        let method = match (four, eight) {
            (true, true) => return Err(bad("load_in_4bit", "load_in_4bit and load_in_8bit are both true".into())),
            (false, false) => return Err(bad("load_in_4bit", "neither load_in_4bit nor load_in_8bit is true".into())),
            (false, true) => QuantMethod::Int8,
            (true, false) => {
                let t = v.get("bnb_4bit_quant_type").and_then(|x| x.as_str()).unwrap_or("fp4");
                let ty = FourBitType::parse(t)
                    .ok_or_else(|| bad("bnb_4bit_quant_type", format!("'{t}' is not one of 'nf4', 'fp4'")))?;
                QuantMethod::FourBit { ty, double_quant: flag("bnb_4bit_use_double_quant") }
            }
        };
        let compute =
            v.get("bnb_4bit_compute_dtype").and_then(|x| x.as_str()).unwrap_or("float32").trim_start_matches("torch.");
        let compute_bf16 = match compute {
            "float32" | "float" => false,
            "bfloat16" | "float16" | "half" => true,
            other => {
                return Err(bad(
                    "bnb_4bit_compute_dtype",
                    format!("'{other}' is not a float dtype (float32, bfloat16, float16)"),
                ))
            }
        };
        let skip_modules = match v.get("llm_int8_skip_modules") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("llm_int8_skip_modules", "entries must be strings".into()))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("llm_int8_skip_modules", "must be a list of module names".into())),
        };
        let int8_threshold = v.get("llm_int8_threshold").and_then(|x| x.as_f64()).unwrap_or(6.0) as f32;
        Ok(QuantConfig {
            method,
            compute_bf16,
            skip_modules,
            int8_threshold,
            prequantized: false,
            training: Arc::default(),
        })
    }

    /// The `quantization_config` of a checkpoint's config.json.
    pub fn from_config_file(path: &std::path::Path) -> Result<Self, crate::error::ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::error::ConfigError::Read { file: path.to_path_buf(), source: e })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| crate::error::ConfigError::Json { file: path.to_path_buf(), msg: e.to_string() })?;
        let q = json.get("quantization_config").ok_or_else(|| crate::error::ConfigError::MissingKey {
            file: path.to_path_buf(),
            key: "quantization_config (the checkpoint holds bitsandbytes-quantized tensors)".into(),
        })?;
        Self::from_json(q, path)
    }
}
