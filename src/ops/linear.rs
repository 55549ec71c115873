//! Linear layer y = x W^T + b over arbitrary leading dims.
//!
//! The weight is kept as stored by PyTorch ([out, in]). Quantized storage (nf4/fp4/int8, GGUF) will be
//! further variants of [`Weight`], each with a matmul and a backward to the input.

use candle_core::{Result, Tensor};

use crate::checkpoint::WeightStore;
use crate::error::CheckpointError;

/// Storage of a linear weight.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense [out, in] in the compute dtype.
    Dense(Tensor),
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    /// [out]
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Linear { weight: Weight::Dense(weight), bias, in_features, out_features })
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
        let w = ctx.get(store, &format!("{prefix}.weight"), &[out_features, in_features])?;
        let b = if bias { Some(ctx.get(store, &format!("{prefix}.bias"), &[out_features])?) } else { None };
        Ok(Linear { weight: Weight::Dense(w), bias: b, in_features, out_features })
    }

    /// x: [.., in] -> [.., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.in_features))?; // [N, in]
        let y = match &self.weight {
            Weight::Dense(w) => x2.matmul(&w.t()?)?, // [N, out]
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

    /// The dense weight [out, in] (e.g. for tied embeddings).
    pub fn dense_weight(&self) -> &Tensor {
        match &self.weight {
            Weight::Dense(w) => w,
        }
    }
}
