//! Fresh weights as transformers' `PreTrainedModel._init_weights` gives them to a new Idefics3 vision
//! tower and connector: every Linear, Conv2d and Embedding weight ~ N(0, std), their biases 0,
//! LayerNorm weights 1 and biases 0. transformers takes `std` from `vision_config.initializer_range`
//! for the vision tower (a sub-model with its own config) and from `text_config.initializer_range` for
//! the connector (the top-level Idefics3Config has none); both default to 0.02.
//!
//! The numbers come from a seeded SplitMix64 stream per tensor (by its transformers name), so a seed
//! gives the same weights whatever order they are made in. They are not torch's stream: the same seed
//! in torch gives other (equally distributed) values.

use candle_core::{Device, Tensor};

use super::connector::Connector;
use super::vision::{LayerNorm, VisionLayer, VisionModel};
use super::LoadCtx;
use crate::config::VisionConfig;
use crate::error::Result;
use crate::generate::Rng;
use crate::ops::Linear;

/// transformers' default `initializer_range`.
pub const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// The random stream of the tensor `name` under `seed` (FNV-1a of the name mixed into the seed).
pub fn stream(seed: u64, name: &str) -> Rng {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
    }
    Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ h)
}

/// `n` draws from N(mean, std^2) (Box-Muller, both values of each pair used).
pub fn normal(rng: &mut Rng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (rng.next_f64().max(f64::MIN_POSITIVE), rng.next_f64());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((mean + std * r * t.cos()) as f32);
        out.push((mean + std * r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A tensor of `shape` ~ N(0, std^2) from the stream of `name`, f32 on `device`.
pub fn normal_tensor(seed: u64, name: &str, shape: &[usize], std: f64, device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(normal(&mut stream(seed, name), n, 0.0, std), shape, device)?)
}

/// A Linear layer from f32 `w` [out, in] and `b` [out] in the representation `ctx` loads into (the
/// compute dtype, or bf16 packed in the bf16 compute mode), as `Linear::load` would hold them.
pub fn linear_in_ctx(w: Tensor, b: Option<Tensor>, ctx: &LoadCtx) -> Result<Linear> {
    let b = b.map(|b| b.to_dtype(ctx.dtype)).transpose()?;
    if ctx.bf16_compute {
        return Ok(Linear::bf16_compute(w, b)?);
    }
    Ok(Linear::new(w.to_dtype(ctx.dtype)?, b)?)
}

struct Maker<'a> {
    seed: u64,
    std: f64,
    ctx: &'a LoadCtx,
}

impl Maker<'_> {
    fn zeros(&self, n: usize) -> Result<Tensor> {
        Ok(Tensor::zeros(n, self.ctx.dtype, &self.ctx.device)?)
    }

    /// A Linear with weight ~ N(0, std) and a zero bias (or none).
    fn linear(&self, name: &str, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
        let w = normal_tensor(self.seed, &format!("{name}.weight"), &[out_f, in_f], self.std, &self.ctx.device)?;
        linear_in_ctx(w, if bias { Some(self.zeros(out_f)?) } else { None }, self.ctx)
    }

    fn layer_norm(&self, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: Tensor::ones(dim, self.ctx.dtype, &self.ctx.device)?, bias: self.zeros(dim)?, eps })
    }
}

/// A new vision tower (`model.vision_model`) for `cfg`, weights ~ N(0, `std`).
pub fn random_vision(cfg: &VisionConfig, std: f64, seed: u64, ctx: &LoadCtx) -> Result<VisionModel> {
    let mk = Maker { seed, std, ctx };
    let p = super::modules::VISION;
    let (d, c, ps, n) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patches_per_side());
    // Conv2d(C, D, P, stride P) as a Linear over flattened [C, P, P] patches, as the loader holds it.
    let patch_embedding = mk.linear(&format!("{p}.embeddings.patch_embedding"), c * ps * ps, d, true)?;
    let position_embedding =
        normal_tensor(seed, &format!("{p}.embeddings.position_embedding.weight"), &[n * n, d], std, &ctx.device)?
            .to_dtype(ctx.dtype)?;
    let eps = cfg.layer_norm_eps;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let lp = format!("{p}.encoder.layers.{i}");
        let lin = |name: &str, i_f: usize, o_f: usize| mk.linear(&format!("{lp}.{name}"), i_f, o_f, true);
        layers.push(VisionLayer {
            layer_norm1: mk.layer_norm(d, eps)?,
            q_proj: lin("self_attn.q_proj", d, d)?,
            k_proj: lin("self_attn.k_proj", d, d)?,
            v_proj: lin("self_attn.v_proj", d, d)?,
            out_proj: lin("self_attn.out_proj", d, d)?,
            layer_norm2: mk.layer_norm(d, eps)?,
            fc1: lin("mlp.fc1", d, cfg.intermediate_size)?,
            fc2: lin("mlp.fc2", cfg.intermediate_size, d)?,
        });
    }
    let post_layernorm = mk.layer_norm(d, eps)?;
    Ok(VisionModel { cfg: cfg.clone(), patch_embedding, position_embedding, layers, post_layernorm })
}

/// A new connector (`model.connector.modality_projection.proj`, no bias), weight ~ N(0, `std`).
pub fn random_connector(
    vision_dim: usize,
    text_dim: usize,
    scale_factor: usize,
    std: f64,
    seed: u64,
    ctx: &LoadCtx,
) -> Result<Connector> {
    let mk = Maker { seed, std, ctx };
    let in_f = vision_dim * scale_factor * scale_factor;
    Ok(Connector { scale_factor, proj: mk.linear(super::modules::CONNECTOR_PROJ, in_f, text_dim, false)? })
}

/// Mean and standard deviation of `t`'s values (f64 sums).
#[cfg(test)]
pub(crate) fn mean_std(t: &Tensor) -> (f64, f64) {
    let v: Vec<f32> =
        t.to_dtype(candle_core::DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).unwrap_or_default();
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn ctx() -> LoadCtx {
        LoadCtx { dtype: DType::F32, device: Device::Cpu, bf16_storage: false, bf16_compute: false, quant: None }
    }

    fn cfg() -> VisionConfig {
        VisionConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 32,
            patch_size: 8,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }

    #[test]
    fn normal_draws_have_the_asked_moments() {
        let v = normal(&mut stream(7, "x"), 200_001, 1.5, 0.25);
        assert_eq!(v.len(), 200_001);
        let t = Tensor::from_vec(v, 200_001, &Device::Cpu).unwrap();
        let (m, s) = mean_std(&t);
        assert!((m - 1.5).abs() < 0.005, "{m}");
        assert!((s - 0.25).abs() < 0.005, "{s}");
    }

    #[test]
    fn vision_tower_follows_init_weights() {
        let v = random_vision(&cfg(), 0.05, 3, &ctx()).unwrap();
        assert_eq!(v.patch_embedding.dense_weight().unwrap().dims(), &[32, 3 * 8 * 8]);
        assert_eq!(v.position_embedding.dims(), &[16, 32]);
        let (_, s) = mean_std(&v.layers[0].fc1.dense_weight().unwrap());
        assert!((s - 0.05).abs() < 0.005, "{s}");
        let (m, s) = mean_std(v.layers[1].q_proj.bias.as_ref().unwrap());
        assert_eq!((m, s), (0.0, 0.0));
        assert_eq!(mean_std(&v.post_layernorm.weight), (1.0, 0.0));
        assert_eq!(mean_std(&v.layers[0].layer_norm2.bias), (0.0, 0.0));
        // one stream per tensor: same seed, same values; different tensors or seeds, different values
        let again = random_vision(&cfg(), 0.05, 3, &ctx()).unwrap();
        let w = |m: &VisionModel| m.layers[1].k_proj.dense_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>();
        assert_eq!(w(&v).unwrap(), w(&again).unwrap());
        let other = random_vision(&cfg(), 0.05, 4, &ctx()).unwrap();
        assert_ne!(w(&v).unwrap(), w(&other).unwrap());
        let q = v.layers[1].q_proj.dense_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(q, w(&v).unwrap());
    }

    #[test]
    fn connector_shape_and_std() {
        let c = random_connector(32, 48, 2, 0.1, 0, &ctx()).unwrap();
        let w = c.proj.dense_weight().unwrap();
        assert_eq!(w.dims(), &[48, 128]);
        assert!(c.proj.bias.is_none());
        let (_, s) = mean_std(&w);
        assert!((s - 0.1).abs() < 0.01, "{s}");
    }
}
