//! Linear layer y = x W^T + b over arbitrary leading dims.
//!
//! The weight is kept as stored by PyTorch ([out, in]). Quantized storage (nf4/fp4/int8, GGUF) will be
//! further variants of [`Weight`], each with a matmul and a backward to the input.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

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
}

/// Up to this many rows, bf16 weights go through the skinny kernel; above, they are widened block by
/// block and multiplied by gemm.
const GEMV_MAX_ROWS: usize = 16;

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
        let weight = if weight.dtype() == DType::BF16 && compute == DType::F32 { Weight::Bf16(weight) } else { Weight::Dense(weight) };
        Ok(Linear { weight, bias, in_features, out_features, adapter: None })
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
        let w = ctx.get_storage(store, &format!("{prefix}.weight"), &[out_features, in_features])?;
        let b = if bias { Some(ctx.get(store, &format!("{prefix}.bias"), &[out_features])?) } else { None };
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

    /// The frozen layer alone. x: [.., in] -> [.., out]
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.in_features))?; // [N, in]
        let y = match &self.weight {
            Weight::Dense(w) => x2.matmul(&w.t()?)?, // [N, out]
            Weight::Bf16(w) if x.dtype() == DType::F32 && x.device().is_cpu() => bf16_matmul(&x2, w, self.out_features)?, // [N, out]
            Weight::Bf16(w) => x2.matmul(&w.to_dtype(x.dtype())?.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        y.reshape(out_dims)
    }

    /// The stored weight [out, in].
    pub fn weight_tensor(&self) -> &Tensor {
        match &self.weight {
            Weight::Dense(w) | Weight::Bf16(w) => w,
        }
    }
}

/// x: [N, in] f32, w: [out, in] bf16 -> [N, out] f32: the skinny kernel for few rows (decoding),
/// blockwise widening + gemm for many (prefill).
fn bf16_matmul(x: &Tensor, w: &Tensor, out: usize) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let y = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) if n <= GEMV_MAX_ROWS => super::gemv::gemv_bf16(&xs, n, k, v[a..b].reinterpret_cast(), out),
        (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => super::gemv::matmul_bf16_wide(&xs, n, k, v[a..b].reinterpret_cast(), out),
        _ => candle_core::bail!("skinny bf16 matmul needs a contiguous bf16 CPU weight"),
    };
    Tensor::from_vec(y, (n, out), x.device())
}
