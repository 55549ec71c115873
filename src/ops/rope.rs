//! Rotary position embeddings, rotate-half (non-interleaved) layout as in Llama.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{f32_arg, with_f32};

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

    /// 1 / theta^(2k / hd) for k < hd / 2: [hd / 2] f32.
    pub fn inv_freq(&self) -> &Tensor {
        &self.inv_freq
    }

    /// The same table on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Rope { inv_freq: self.inv_freq.to_device(device)? })
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

/// x * cos + rotate_half(x) * sin. x: [B, H, L, hd], cos/sin: [B, 1, L, hd] (or [1, 1, L, hd]).
/// f32 on the CPU runs a fused kernel whose backward is the inverse rotation (cos/sin are constants:
/// they never get a gradient); other inputs run [`apply_rotary_reference`].
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(op) = RopeOp::new(x, cos, sin, false)? {
        x.contiguous()?.apply_op1(op)
    } else {
        apply_rotary_reference(x, cos, sin)
    }
}

/// candle composition of [`apply_rotary`]: rotate_half(x) = cat(-x2, x1).
pub fn apply_rotary_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // rotate_half
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// The rotation with cos/sin captured (contiguous f32 [Bc, 1, L, hd], Bc = B or 1, detached).
///
/// Forward, per half (x = [x1, x2], c = [c1, c2], s = [s1, s2]):
///   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
/// Backward (the transpose, i.e. the inverse rotation when c1 = c2, s1 = s2):
///   dx1 = g1 c1 + g2 s2,  dx2 = g2 c2 - g1 s1     i.e. dx = g cos + rotate_half^T(g sin)
///   with rotate_half^T(z) = cat(z2, -z1).
struct RopeOp {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

impl RopeOp {
    /// The fused op when the inputs fit the kernel (f32 CPU, shapes as documented), else None.
    fn new(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Option<Self>> {
        let f32_cpu = super::fused_f32;
        if !(f32_cpu(x) && f32_cpu(cos) && f32_cpu(sin)) || x.rank() != 4 || cos.rank() != 4 || cos.dims() != sin.dims()
        {
            return Ok(None);
        }
        let (b, _h, l, hd) = x.dims4()?;
        let (cb, c1, cl, chd) = cos.dims4()?;
        if hd % 2 != 0 || c1 != 1 || cl != l || chd != hd || !(cb == b || cb == 1) {
            return Ok(None);
        }
        Ok(Some(RopeOp { cos: cos.detach().contiguous()?, sin: sin.detach().contiguous()?, inverse }))
    }
}

/// x, y: [B, H, L, hd], cos, sin: [Bc, 1, L, hd]; `inverse` applies the transpose (backward).
fn rope_kernel(x: &[f32], dims: (usize, usize, usize, usize), cos: &[f32], sin: &[f32], inverse: bool) -> Vec<f32> {
    let (_b, h, l, hd) = dims;
    let half = hd / 2;
    let plane = l * hd; // one (b, h) slice
    let cb = cos.len() / plane.max(1);
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(plane.max(1))
        .zip(x.par_chunks(plane.max(1)))
        .enumerate()
        .with_min_len(16_384usize.div_ceil(plane.max(1)))
        .for_each(|(bh, (y, x))| {
            let bi = if cb == 1 { 0 } else { bh / h };
            let (cos, sin) = (&cos[bi * plane..(bi + 1) * plane], &sin[bi * plane..(bi + 1) * plane]);
            for (((y, x), c), s) in
                y.chunks_exact_mut(hd).zip(x.chunks_exact(hd)).zip(cos.chunks_exact(hd)).zip(sin.chunks_exact(hd))
            {
                let (y1, y2) = y.split_at_mut(half);
                let (x1, x2) = x.split_at(half);
                let (c1, c2) = c.split_at(half);
                let (s1, s2) = s.split_at(half);
                for i in 0..half {
                    if inverse {
                        y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                        y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                    } else {
                        y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                        y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                    }
                }
            }
        });
    y
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rotary"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(s, l, "rotary")?; // [B, H, L, hd]
        let dims = l.shape().dims4()?;
        let y = with_f32(&self.cos, |c| with_f32(&self.sin, |s| rope_kernel(x, dims, c, s, self.inverse)))??;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // The transpose of the rotation, applied to g [B, H, L, hd].
        let op = RopeOp { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}
