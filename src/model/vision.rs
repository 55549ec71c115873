//! SigLIP vision encoder (no pooling head), as in `Idefics3VisionTransformer`.

use std::sync::Arc;

use candle_core::{Result as CResult, Tensor};

use super::{check, Interrupt, LoadCtx};
use crate::checkpoint::WeightStore;
use crate::config::VisionConfig;
use crate::error::{input_err, CheckpointError, Result};
use crate::ops::{attention, gelu_tanh, layer_norm, Linear, Mask};

/// LayerNorm parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor, // [D]
    pub bias: Tensor,   // [D]
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        dim: usize,
        eps: f64,
        ctx: &LoadCtx,
    ) -> Result<Self, CheckpointError> {
        Ok(LayerNorm {
            weight: ctx.get(store, &format!("{prefix}.weight"), &[dim])?,
            bias: ctx.get(store, &format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct VisionLayer {
    pub layer_norm1: LayerNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Debug, Clone)]
pub struct VisionModel {
    pub cfg: VisionConfig,
    /// Conv2d(C, D, P, stride P) as a Linear over flattened [C, P, P] patches.
    pub patch_embedding: Linear,
    /// [N*N, D]
    pub position_embedding: Tensor,
    pub layers: Vec<VisionLayer>,
    pub post_layernorm: LayerNorm,
}

impl VisionModel {
    pub fn load(store: &WeightStore, prefix: &str, cfg: &VisionConfig, ctx: &LoadCtx) -> Result<Self, CheckpointError> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let n = cfg.patches_per_side();
        let conv_name = format!("{prefix}.embeddings.patch_embedding.weight");
        let conv = ctx.get(store, &conv_name, &[d, c, p, p])?;
        let conv = conv
            .reshape((d, c * p * p))
            .map_err(|e| CheckpointError::Io { file: "<memory>".into(), msg: e.to_string() })?;
        let conv_b = ctx.get(store, &format!("{prefix}.embeddings.patch_embedding.bias"), &[d])?;
        let patch_embedding =
            if ctx.bf16_compute { Linear::bf16_compute(conv, Some(conv_b)) } else { Linear::new(conv, Some(conv_b)) };
        let patch_embedding =
            patch_embedding.map_err(|e| CheckpointError::Io { file: "<memory>".into(), msg: e.to_string() })?;
        let position_embedding =
            ctx.get(store, &format!("{prefix}.embeddings.position_embedding.weight"), &[n * n, d])?;
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lp = format!("{prefix}.encoder.layers.{i}");
            let lin =
                |name: &str, i_f: usize, o_f: usize| Linear::load(store, &format!("{lp}.{name}"), i_f, o_f, true, ctx);
            layers.push(VisionLayer {
                layer_norm1: LayerNorm::load(store, &format!("{lp}.layer_norm1"), d, eps, ctx)?,
                q_proj: lin("self_attn.q_proj", d, d)?,
                k_proj: lin("self_attn.k_proj", d, d)?,
                v_proj: lin("self_attn.v_proj", d, d)?,
                out_proj: lin("self_attn.out_proj", d, d)?,
                layer_norm2: LayerNorm::load(store, &format!("{lp}.layer_norm2"), d, eps, ctx)?,
                fc1: lin("mlp.fc1", d, cfg.intermediate_size)?,
                fc2: lin("mlp.fc2", cfg.intermediate_size, d)?,
            });
        }
        let post_layernorm = LayerNorm::load(store, &format!("{prefix}.post_layernorm"), d, eps, ctx)?;
        Ok(VisionModel { cfg: cfg.clone(), patch_embedding, position_embedding, layers, post_layernorm })
    }

    /// pixel_values: [F, C, H, W] (real frames only); patch_mask: per frame, row-major
    /// (H/P) x (W/P) validity. Returns last_hidden_state [F, Np, D].
    pub fn forward(&self, pixel_values: &Tensor, patch_mask: &[Vec<bool>], interrupt: Interrupt) -> Result<Tensor> {
        let (mut hs, mask) = self.embed(pixel_values, patch_mask)?;
        let heads = self.cfg.num_attention_heads;
        if super::vision_fast::usable(&self.layers, &hs, heads) {
            // bf16 compute mode, inference: the fused layers (see vision_fast.rs)
            let kv = mask.key_valid.as_deref().map(|v| v.as_slice());
            hs = super::vision_fast::encoder_layers(&self.layers, heads, &hs, kv, interrupt, false)?;
        } else if super::vision_fast_f32::usable(&self.layers, &hs, heads) {
            // f32 inference: the fused f32 layers (see vision_fast_f32.rs)
            let kv = mask.key_valid.as_deref().map(|v| v.as_slice());
            hs = super::vision_fast_f32::encoder_layers(&self.layers, heads, &hs, kv, interrupt)?;
        } else {
            for layer in &self.layers {
                check(interrupt)?;
                hs = layer.forward(&hs, &mask, heads)?;
            }
        }
        Ok(self.post_layernorm.forward(&hs)?)
    }

    /// The embeddings (patch embedding + position embedding) [F, Np, D] of the frames of `forward`,
    /// and the encoder layers' attention mask (masked patches hidden as keys).
    pub fn embed(&self, pixel_values: &Tensor, patch_mask: &[Vec<bool>]) -> Result<(Tensor, Mask)> {
        let (f, c, h, w) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels {
            return input_err(format!(
                "pixel_values have {c} channels, the vision config expects {}",
                self.cfg.num_channels
            ));
        }
        let (nh, nw) = (h / p, w / p);
        if nh == 0 || nw == 0 {
            return input_err(format!("pixel_values of {h}x{w} are smaller than one {p}x{p} patch"));
        }
        // Conv2d with stride P and no padding == matmul over non-overlapping patches (remainder ignored).
        let x = pixel_values.narrow(2, 0, nh * p)?.narrow(3, 0, nw * p)?; // [F, C, nh*P, nw*P]
        let x = x.reshape((f, c, nh, p, nw, p))?.permute((0, 2, 4, 1, 3, 5))?; // [F, nh, nw, C, P, P]
        let x = x.reshape((f, nh * nw, c * p * p))?; // [F, Np, C*P*P]
        let emb = self.patch_embedding.forward(&x)?; // [F, Np, D]
        let ids = position_ids(patch_mask, nh, nw, self.cfg.patches_per_side()); // [F * Np]
        let ids = Tensor::from_vec(ids, f * nh * nw, pixel_values.device())?;
        let pos = self.position_embedding.index_select(&ids, 0)?.reshape((f, nh * nw, ()))?; // [F, Np, D]
        let hs = (emb + pos)?;
        let mask = if patch_mask.iter().all(|m| m.iter().all(|&v| v)) {
            Mask::none()
        } else {
            // Masked patches stay queries (their outputs feed the connector) but are hidden as keys.
            Mask { causal: false, key_valid: Some(Arc::new(patch_mask.iter().flatten().copied().collect())) }
        };
        Ok((hs, mask))
    }
}

impl VisionLayer {
    /// x [F, Np, D] -> [F, Np, D] (candle ops; autograd-friendly).
    pub fn forward(&self, x: &Tensor, mask: &Mask, heads: usize) -> CResult<Tensor> {
        let l = self;
        let (f, np, d) = x.dims3()?;
        let hd = d / heads;
        let h = l.layer_norm1.forward(x)?; // [F, Np, D]
        let split = |t: Tensor| t.reshape((f, np, heads, hd))?.transpose(1, 2)?.contiguous(); // [F, H, Np, hd]
        let q = split(l.q_proj.forward(&h)?)?;
        let k = split(l.k_proj.forward(&h)?)?;
        let v = split(l.v_proj.forward(&h)?)?;
        let a = attention(&q, &k, &v, mask, (hd as f64).powf(-0.5))?; // [F, H, Np, hd]
        let a = a.transpose(1, 2)?.reshape((f, np, d))?;
        let x = (x + l.out_proj.forward(&a)?)?;
        let h = l.layer_norm2.forward(&x)?;
        let m = l.fc2.forward(&gelu_tanh(&l.fc1.forward(&h)?)?)?;
        x + m
    }
}

/// Patch validity from a pixel mask [H, W] (row-major bools): a patch is valid when any of its
/// pixels is (transformers unfolds the mask and tests sum > 0). Returns (H/P) x (W/P) row-major.
pub fn patch_mask_from_pixels(pixel_mask: &[bool], h: usize, w: usize, p: usize) -> Vec<bool> {
    let (nh, nw) = (h / p, w / p);
    let mut out = vec![false; nh * nw];
    for (i, o) in out.iter_mut().enumerate() {
        let (pr, pc) = (i / nw, i % nw);
        *o = (0..p).any(|r| (0..p).any(|c| pixel_mask[(pr * p + r) * w + pc * p + c]));
    }
    out
}

/// Position ids with transformers' bucketing rule: for a frame with n_h valid patch rows (counted in
/// column 0) and n_w valid columns (counted in row 0), patch (i, j) gets
/// bucket(i / n_h) * N + bucket(j / n_w) where bucket counts the boundaries k/N (k = 1..) at or below
/// the fractional coordinate, all in f32 as torch computes them; masked patches get 0.
pub fn position_ids(patch_mask: &[Vec<bool>], nh: usize, nw: usize, n: usize) -> Vec<u32> {
    // torch.arange(1/N, 1.0, 1/N): length ceil((1 - 1/N) / (1/N)) and values start + k*step, in f64, stored as f32.
    let step = 1.0f64 / n as f64;
    let len = ((1.0 - step) / step).ceil().max(0.0) as usize;
    let boundaries: Vec<f32> = (0..len).map(|k| (step + k as f64 * step) as f32).collect();
    let bucket = |x: f32| boundaries.iter().filter(|&&b| b <= x).count() as u32;
    let clamp_max = (1.0f64 - 1e-6) as f32;
    let coords = |count: usize, len: usize| -> Vec<u32> {
        let s = 1.0f32 / count as f32;
        (0..len).map(|i| bucket(((i as f32) * s).min(clamp_max))).collect()
    };
    let mut ids = Vec::with_capacity(patch_mask.len() * nh * nw);
    for m in patch_mask {
        let n_h = (0..nh).filter(|&i| m[i * nw]).count();
        let n_w = (0..nw).filter(|&j| m[j]).count();
        let (bh, bw) = (coords(n_h.max(1), nh), coords(n_w.max(1), nw));
        for i in 0..nh {
            for j in 0..nw {
                ids.push(if m[i * nw + j] { bh[i] * n as u32 + bw[j] } else { 0 });
            }
        }
    }
    ids
}

/// A random encoder layer for tests: weights ~ N(0, 1/in), biases ~ N(0, 0.1), LayerNorm weights
/// ~ N(1, 0.1); `linear(w, b)` builds each Linear in the representation under test.
#[cfg(test)]
pub(crate) fn rand_layer(d: usize, inter: usize, linear: impl Fn(Tensor, Tensor) -> Linear) -> VisionLayer {
    let dev = candle_core::Device::Cpu;
    let lin = |o: usize, i: usize| {
        let w = Tensor::randn(0f32, (i as f32).powf(-0.5), (o, i), &dev).unwrap();
        linear(w, Tensor::randn(0f32, 0.1, o, &dev).unwrap())
    };
    let ln = || LayerNorm {
        weight: Tensor::randn(1f32, 0.1, d, &dev).unwrap(),
        bias: Tensor::randn(0f32, 0.1, d, &dev).unwrap(),
        eps: 1e-6,
    };
    VisionLayer {
        layer_norm1: ln(),
        q_proj: lin(d, d),
        k_proj: lin(d, d),
        v_proj: lin(d, d),
        out_proj: lin(d, d),
        layer_norm2: ln(),
        fc1: lin(inter, d),
        fc2: lin(d, inter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_tile_positions_are_identity() {
        let m = vec![vec![true; 16]];
        assert_eq!(position_ids(&m, 4, 4, 4), (0..16).collect::<Vec<u32>>());
        let m = vec![vec![true; 27 * 27]];
        assert_eq!(position_ids(&m, 27, 27, 27), (0..27 * 27).collect::<Vec<u32>>());
    }

    #[test]
    fn partial_grid_is_bucketed() {
        // 2 valid rows x 3 valid cols of a 4x4 grid: rows map to 0, 2; cols to 0, 1, 2 (floor(j*4/3)).
        let mut m = vec![false; 16];
        for i in 0..2 {
            for j in 0..3 {
                m[i * 4 + j] = true;
            }
        }
        let ids = position_ids(&[m], 4, 4, 4);
        assert_eq!(&ids[0..4], &[0, 1, 2, 0]);
        assert_eq!(&ids[4..8], &[8, 9, 10, 0]);
        assert!(ids[8..].iter().all(|&x| x == 0));
    }
}
