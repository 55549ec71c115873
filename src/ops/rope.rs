//! Rotary position embeddings, rotate-half (non-interleaved) layout as in Llama.

use candle_core::{DType, Device, Result, Tensor, D};

/// Precomputed inverse frequencies; cos/sin are built per call from position ids.
#[derive(Debug, Clone)]
pub struct Rope {
    /// [hd/2] f32: theta^(-2k/hd)
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        // transformers: 1 / base ** (arange(0, dim, 2, dtype=int64).float() / dim), in f32.
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|k| {
                let e = (2 * k) as f32 / head_dim as f32;
                1.0f32 / (theta as f32).powf(e)
            })
            .collect();
        Ok(Rope { inv_freq: Tensor::from_vec(inv, head_dim / 2, device)? })
    }

    /// cos, sin for positions [B, L] (i64 or u32): each [B, 1, L, hd] in `dtype`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // [B, L, 1]
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?; // [B, L, hd/2]
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // [B, L, hd]
        let cos = emb.cos()?.to_dtype(dtype)?.unsqueeze(1)?;
        let sin = emb.sin()?.to_dtype(dtype)?.unsqueeze(1)?;
        Ok((cos, sin))
    }
}

/// x * cos + rotate_half(x) * sin. x: [B, H, L, hd], cos/sin: [B, 1, L, hd].
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // rotate_half
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}
