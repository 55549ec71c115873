//! Linear layer y = x W^T + b over arbitrary leading dims.
//!
//! The weight is kept as stored by PyTorch ([out, in]), or quantized ([`Weight::Quant`]: bitsandbytes'
//! nf4/fp4/int8, multiplied by `ops::matmul_quant` without a dequantized copy; GGUF will be another
//! quantized kind), each with a matmul and a backward to the input.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use std::sync::{Arc, OnceLock};

use super::cpu::{add_bias_rows, with_f32};
use super::linear_op::linear_tracked;
use super::matmul_bf16_packed;
use crate::checkpoint::WeightStore;
use crate::error::CheckpointError;

/// Storage of a linear weight.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense [out, in] in the compute dtype.
    Dense(Tensor),
    /// [out, in] kept in bf16 because the checkpoint stored bf16 while the compute dtype is f32:
    /// the values are exact, memory is halved, and decoding reads half the bytes.
    Bf16(Tensor),
    /// The bf16 compute mode: [out, in] bf16 (`w`, used by the skinny path for few rows, by the
    /// tracked/backward path and by adapter merging) plus the same weight packed once at load time for
    /// [`matmul_bf16_packed::matmul_packed`] (x rounded to bf16, f32 accumulation), used for more than
    /// [`GEMV_MAX_ROWS`] rows. Only built where [`matmul_bf16_packed::available`].
    PackedBf16 { w: Tensor, packed: Arc<matmul_bf16_packed::PackedBf16> },
    /// `bf16=True` training on a CPU (transformers' CPU autocast): the stored weight `w` [out, in] (f32,
    /// or bf16 as [`Weight::Bf16`] keeps a bf16 checkpoint's) stays the master copy (merging, saving, the backward to x), and every product x W^T, tracked or not, runs
    /// on `packed`, the weight rounded to bf16 and packed for [`matmul_bf16_packed::matmul_packed`]
    /// (x rounded to bf16, f32 accumulation), as autocast runs `linear` in bf16. Built by
    /// [`Linear::with_bf16_autocast`] for a training session and dropped with it. `packed_t`: the
    /// transposed packed weight for the backward to x (bf16 g times bf16 W, as autocast's backward of a
    /// bf16 `linear`), built on the first backward through the layer (a frozen layer that no gradient
    /// crosses, the vision tower under cached features say, never pays for it).
    Autocast {
        w: Tensor,
        packed: Arc<matmul_bf16_packed::PackedBf16>,
        packed_t: Arc<OnceLock<matmul_bf16_packed::PackedBf16>>,
    },
    /// A frozen quantized weight (bitsandbytes 4-bit or 8-bit). `bf16`: products in bf16 with f32
    /// accumulation and the output rounded to bf16 (`bnb_4bit_compute_dtype=bfloat16`).
    Quant { q: Arc<crate::quant::QuantWeight>, bf16: bool },
}

/// Up to this many rows, bf16 weights go through the skinny kernel; above, they are widened block by
/// block and multiplied by gemm.
pub(crate) const GEMV_MAX_ROWS: usize = 16;

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    /// [out]
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
    /// A LoRA / DoRA adapter or a trainable copy (`modules_to_save`), see `crate::lora`.
    pub adapter: Option<std::sync::Arc<crate::lora::Adapter>>,
}

impl Linear {
    /// A dense linear layer computing in the weight's dtype.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Linear { weight: Weight::Dense(weight), bias, in_features, out_features, adapter: None })
    }

    /// A layer computing in `compute`: a bf16 weight with an f32 compute dtype stays bf16 ([`Weight::Bf16`]).
    pub fn with_compute_dtype(weight: Tensor, bias: Option<Tensor>, compute: DType) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let weight = if weight.dtype() == DType::BF16 && compute == DType::F32 {
            Weight::Bf16(weight)
        } else {
            Weight::Dense(weight)
        };
        Ok(Linear { weight, bias, in_features, out_features, adapter: None })
    }

    /// A layer of the bf16 compute mode: the weight rounded to bf16 and, on a CPU with AVX512-BF16,
    /// packed for [`matmul_bf16_packed::matmul_packed`] ([`Weight::PackedBf16`]); elsewhere a plain
    /// [`Weight::Bf16`]. The bias keeps its dtype.
    pub fn bf16_compute(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let w = weight.to_dtype(DType::BF16)?.contiguous()?;
        let weight = if w.device().is_cpu() && matmul_bf16_packed::available() {
            let packed = {
                let (s, l) = w.storage_and_layout();
                match (&*s, l.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
                        matmul_bf16_packed::pack(&v[a..b], out_features, in_features)
                    }
                    _ => candle_core::bail!("bf16_compute: expected a contiguous bf16 CPU weight"),
                }
            };
            Weight::PackedBf16 { w, packed: Arc::new(packed) }
        } else {
            Weight::Bf16(w)
        };
        Ok(Linear { weight, bias, in_features, out_features, adapter: None })
    }

    /// This layer for `bf16=True` training ([`Weight::Autocast`]): a frozen f32 (or bf16-stored) CPU
    /// weight gets a bf16 packed copy that every product uses, on a CPU with AVX512-BF16. Any other layer
    /// is returned as it is: trainable weights (autograd `Var`s), the bf16 compute mode's and quantized
    /// weights, and every weight on a CPU without AVX512-BF16 (products stay f32 there, more precise
    /// than autocast).
    pub fn with_bf16_autocast(&self) -> Result<Self> {
        let mut lin = self.clone();
        let (Weight::Dense(w) | Weight::Bf16(w)) = &self.weight else { return Ok(lin) };
        if !w.device().is_cpu() || w.is_variable() || !matmul_bf16_packed::available() {
            return Ok(lin);
        }
        let bits: Vec<half::bf16> = match w.dtype() {
            DType::F32 => with_f32(w, |v| {
                v.par_iter().map(|&x| half::bf16::from_bits(super::bf16::f32_to_bf16_bits(x))).collect()
            })?,
            DType::BF16 => w.flatten_all()?.to_vec1::<half::bf16>()?,
            _ => return Ok(lin),
        };
        let packed = matmul_bf16_packed::pack(&bits, self.out_features, self.in_features);
        lin.weight = Weight::Autocast { w: w.clone(), packed: Arc::new(packed), packed_t: Arc::default() };
        Ok(lin)
    }

    /// A layer over a quantized weight.
    pub fn quantized(q: Arc<crate::quant::QuantWeight>, bias: Option<Tensor>, bf16: bool) -> Self {
        let (out_features, in_features) = q.shape();
        Linear { weight: Weight::Quant { q, bf16 }, bias, in_features, out_features, adapter: None }
    }

    /// The quantized weight, when the layer has one.
    pub fn quant(&self) -> Option<&Arc<crate::quant::QuantWeight>> {
        match &self.weight {
            Weight::Quant { q, .. } => Some(q),
            _ => None,
        }
    }

    /// Whether the weight is kept for the bf16 compute mode (see [`Self::bf16_compute`]).
    pub fn is_bf16_compute(&self) -> bool {
        matches!(self.weight, Weight::PackedBf16 { .. })
    }

    /// Loads `{prefix}.weight` [out, in] and, when `bias`, `{prefix}.bias` [out].
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        ctx: &crate::model::LoadCtx,
    ) -> std::result::Result<Self, CheckpointError> {
        let b = if bias { Some(ctx.get(store, &format!("{prefix}.bias"), &[out_features])?) } else { None };
        if let Some(q) = crate::quant::load::gguf_linear(store, prefix, (out_features, in_features))? {
            return Ok(Linear::quantized(q, b, false));
        }
        if let Some(q) = crate::quant::load::linear(store, prefix, (out_features, in_features), ctx)? {
            // bnb_4bit_compute_dtype applies to 4-bit layers; int8 layers compute as bitsandbytes does.
            let bf16 = ctx.quant.as_ref().is_some_and(|c| c.compute_bf16)
                && matches!(*q, crate::quant::QuantWeight::FourBit(_));
            return Ok(Linear::quantized(q, b, bf16));
        }
        if ctx.bf16_compute && ctx.dtype == DType::F32 {
            let w = store.get(&format!("{prefix}.weight"), &[out_features, in_features], DType::BF16, &ctx.device)?;
            return Linear::bf16_compute(w, b)
                .map_err(|e| CheckpointError::Io { file: "<memory>".into(), msg: e.to_string() });
        }
        let w = ctx.get_storage(store, &format!("{prefix}.weight"), &[out_features, in_features])?;
        let weight = if w.dtype() != ctx.dtype { Weight::Bf16(w) } else { Weight::Dense(w) };
        Ok(Linear { weight, bias: b, in_features, out_features, adapter: None })
    }

    /// x: [.., in] -> [.., out], with the adapter when there is one.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            Some(ad) => ad.forward(self, x, &|x| self.forward_base(x)),
            None => self.forward_base(x),
        }
    }

    /// The layer without its adapter. x: [.., in] -> [.., out]
    ///
    /// When x, the weight or the bias is tracked by autograd (a `Var` or computed from one) and the
    /// computation is f32 on the CPU, the product runs as a custom op whose backward computes only
    /// the gradients of tracked arguments (a frozen weight never gets a gradient). Otherwise the
    /// inference path below runs unchanged.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.in_features))?; // [N, in]
        if let Weight::Quant { q, bf16 } = &self.weight {
            let y = self.quant_forward(&x2, q, *bf16)?; // [N, out]
            let mut out_dims = dims;
            let last = out_dims.len() - 1;
            out_dims[last] = self.out_features;
            return y.reshape(out_dims);
        }
        let w = self.weight_tensor().ok_or_else(|| candle_core::Error::Msg("linear: no dense weight".into()))?;
        let tracked = x.track_op() || w.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        let y = if tracked && self.fused_ok(x) {
            let packed = match &self.weight {
                Weight::Autocast { packed, packed_t, .. } => Some((packed.clone(), packed_t.clone())),
                _ => None,
            };
            linear_tracked(&x2, w, self.bias.as_ref(), packed)? // [N, out], bias included
        } else {
            let cpu_f32 = super::fused_f32(x);
            let bias = self.bias.as_ref();
            let (y, with_bias) = match &self.weight {
                Weight::Dense(w) if cpu_f32 && n <= GEMV_MAX_ROWS && w.dtype() == DType::F32 => {
                    (f32_gemv(&x2, w, self.out_features)?, false) // decoding: the skinny kernel, [N, out]
                }
                Weight::Dense(w) => (x2.matmul(&w.t()?)?, false), // [N, out]
                Weight::Bf16(w) if cpu_f32 => (bf16_matmul(&x2, w, self.out_features, bias)?, true), // [N, out]
                Weight::Bf16(w) => (x2.matmul(&w.to_dtype(x.dtype())?.t()?)?, false),
                Weight::PackedBf16 { w, packed } if cpu_f32 => {
                    if n <= GEMV_MAX_ROWS {
                        (bf16_matmul(&x2, w, self.out_features, bias)?, true) // decoding: the skinny kernel
                    } else {
                        (packed_matmul(&x2, packed)?, false)
                    }
                }
                Weight::PackedBf16 { w, .. } => (x2.matmul(&w.to_dtype(x.dtype())?.t()?)?, false),
                Weight::Autocast { packed, .. } if cpu_f32 => (packed_matmul(&x2, packed)?, false),
                Weight::Autocast { w, .. } => (x2.matmul(&w.to_dtype(x.dtype())?.t()?)?, false),
                Weight::Quant { .. } => unreachable!("handled above"),
            };
            match bias {
                Some(b) if !with_bias => y.broadcast_add(b)?,
                _ => y,
            }
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        y.reshape(out_dims)
    }

    /// x [N, in] through a quantized weight: int8 in inference mode runs LLM.int8's product, every
    /// other case [`matmul_quant::quant_linear`] (tracked x gets its gradient; the weight never).
    fn quant_forward(&self, x2: &Tensor, q: &Arc<crate::quant::QuantWeight>, bf16: bool) -> Result<Tensor> {
        let x2 = if x2.dtype() == DType::F32 { x2.clone() } else { x2.to_dtype(DType::F32)? };
        if !super::fused_on(x2.device()) {
            // Off the CPU kernels (a GPU, or the reference ops forced): W dequantized whole on x's device
            // and candle's matmul, autograd giving dx; int8 layers compute in f32 as in training mode.
            let bf16 = bf16 && !matches!(&**q, crate::quant::QuantWeight::Int8(_));
            return super::matmul_quant::reference(&x2, q, self.bias.as_ref(), bf16);
        }
        if let crate::quant::QuantWeight::Int8(w) = &**q {
            if !x2.track_op() && !w.training.load(std::sync::atomic::Ordering::SeqCst) {
                let n = x2.dim(0)?;
                let bias: Option<Vec<f32>> =
                    self.bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?;
                let y = with_f32(&x2, |xs| w.forward_lt(xs, n, bias.as_deref()))?;
                return Tensor::from_vec(y, (n, self.out_features), x2.device());
            }
            return super::matmul_quant::quant_linear(&x2, q, self.bias.as_ref(), false);
        }
        super::matmul_quant::quant_linear(&x2, q, self.bias.as_ref(), bf16)
    }

    /// The reference composition (candle matmul + broadcast_add, weight widened to x's dtype):
    /// autograd through it differentiates every argument, frozen or not. Used by tests.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.in_features))?; // [N, in]
        let w = self.dense_weight()?.to_dtype(x.dtype())?; // [out, in]
        let y = x2.matmul(&w.t()?)?; // [N, out]
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        y.reshape(out_dims)
    }

    /// Whether the tracked product can run as `linear_op::LinearOp`: f32 CPU input, f32 (dense) or bf16
    /// (`Weight::Bf16`) CPU weight, f32 bias.
    fn fused_ok(&self, x: &Tensor) -> bool {
        let w_ok = match &self.weight {
            Weight::Dense(w) => super::fused_f32(w),
            Weight::Autocast { w, .. } => matches!(w.dtype(), DType::F32 | DType::BF16) && super::fused_on(w.device()),
            Weight::Bf16(w) | Weight::PackedBf16 { w, .. } => w.dtype() == DType::BF16 && super::fused_on(w.device()),
            Weight::Quant { .. } => false,
        };
        let b_ok = self.bias.as_ref().is_none_or(super::fused_f32);
        super::fused_f32(x) && w_ok && b_ok
    }

    /// The stored weight [out, in]; None for a quantized one (see [`Self::dense_weight`]).
    pub fn weight_tensor(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) | Weight::Bf16(w) | Weight::PackedBf16 { w, .. } | Weight::Autocast { w, .. } => Some(w),
            Weight::Quant { .. } => None,
        }
    }

    /// The weight [out, in] as a tensor: the stored one, or a quantized one dequantized to f32 (a
    /// temporary copy: merging, DoRA norms, references).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) | Weight::Bf16(w) | Weight::PackedBf16 { w, .. } | Weight::Autocast { w, .. } => {
                Ok(w.clone())
            }
            Weight::Quant { q, .. } => {
                Tensor::from_vec(q.dequantize(), (self.out_features, self.in_features), &candle_core::Device::Cpu)
            }
        }
    }
}

/// x [N, in] f32 -> [N, out] through a packed bf16 weight (x rounded to bf16, f32 accumulation).
fn packed_matmul(x: &Tensor, packed: &matmul_bf16_packed::PackedBf16) -> Result<Tensor> {
    let n = x.dim(0)?;
    let y = with_f32(x, |xs| matmul_bf16_packed::matmul_packed(xs, n, packed.in_features(), packed))?;
    Tensor::from_vec(y, (n, packed.out_features()), x.device())
}

/// x: [N, in] f32, w: [out, in] f32 -> [N, out] f32 with the skinny kernel (few rows: decoding).
fn f32_gemv(x: &Tensor, w: &Tensor, out: usize) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let y = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
            with_f32(x, |xs| super::matmul_bf16_skinny::gemv_f32(xs, n, k, &v[a..b], out))?
        }
        _ => candle_core::bail!("skinny f32 matmul needs a contiguous f32 CPU weight"),
    };
    Tensor::from_vec(y, (n, out), x.device())
}

/// x: [N, in] f32, w: [out, in] bf16 -> [N, out] f32: the skinny kernel for few rows (decoding),
/// blockwise widening + gemm for many (prefill).
fn bf16_matmul(x: &Tensor, w: &Tensor, out: usize, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let bias: Option<Vec<f32>> = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?; // [out]
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let y = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
            let w: &[u16] = v[a..b].reinterpret_cast();
            with_f32(x, |xs| {
                if n <= GEMV_MAX_ROWS {
                    let mut y = super::matmul_bf16_skinny::gemv_bf16(xs, n, k, w, out);
                    if let Some(b) = &bias {
                        add_bias_rows(&mut y, b);
                    }
                    y
                } else {
                    super::matmul_bf16_skinny::matmul_bf16_wide(xs, n, k, w, out, bias.as_deref())
                }
            })?
        }
        _ => candle_core::bail!("skinny bf16 matmul needs a contiguous bf16 CPU weight"),
    };
    Tensor::from_vec(y, (n, out), x.device())
}
