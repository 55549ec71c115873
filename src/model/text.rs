//! Llama decoder (SmolLM2): RMSNorm pre-norm, GQA attention with rotate-half RoPE, SwiGLU MLP.

use candle_core::{Result as CResult, Tensor};

use super::cache::{KvCache, LayerCache};
use super::{check, Interrupt, LoadCtx};
use crate::checkpoint::WeightStore;
use crate::config::TextConfig;
use crate::error::{CheckpointError, Result};
use crate::ops::rope::apply_rotary;
use crate::ops::{attention, rms_norm, swiglu, Linear, Mask, Rope};

#[derive(Debug, Clone)]
pub struct TextLayer {
    pub input_layernorm: Tensor, // [H]
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Tensor, // [H]
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct TextModel {
    pub cfg: TextConfig,
    /// [V, H]
    pub embed_tokens: Tensor,
    pub layers: Vec<TextLayer>,
    pub norm: Tensor, // [H]
    pub rope: Rope,
    /// The compute dtype (weights may be stored narrower).
    pub dtype: candle_core::DType,
}

impl TextModel {
    pub fn load(store: &WeightStore, prefix: &str, cfg: &TextConfig, ctx: &LoadCtx) -> Result<Self, CheckpointError> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_out, kv_out) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
        let embed_tokens = ctx.get_storage(store, &format!("{prefix}.embed_tokens.weight"), &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lp = format!("{prefix}.layers.{l}");
            let lin = |name: &str, i_f: usize, o_f: usize, bias: bool| {
                Linear::load(store, &format!("{lp}.{name}"), i_f, o_f, bias, ctx)
            };
            let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
            layers.push(TextLayer {
                input_layernorm: ctx.get(store, &format!("{lp}.input_layernorm.weight"), &[h])?,
                q_proj: lin("self_attn.q_proj", h, q_out, ab)?,
                k_proj: lin("self_attn.k_proj", h, kv_out, ab)?,
                v_proj: lin("self_attn.v_proj", h, kv_out, ab)?,
                o_proj: lin("self_attn.o_proj", q_out, h, ab)?,
                post_attention_layernorm: ctx.get(store, &format!("{lp}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: lin("mlp.gate_proj", h, i, mb)?,
                up_proj: lin("mlp.up_proj", h, i, mb)?,
                down_proj: lin("mlp.down_proj", i, h, mb)?,
            });
        }
        let norm = ctx.get(store, &format!("{prefix}.norm.weight"), &[h])?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, &ctx.device)
            .map_err(|e| CheckpointError::Io { file: "<memory>".into(), msg: e.to_string() })?;
        Ok(TextModel { cfg: cfg.clone(), embed_tokens, layers, norm, rope, dtype: ctx.dtype })
    }

    /// Token embeddings in the compute dtype. ids: [B, L] u32 (already range-checked) -> [B, L, H]
    pub fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        let (b, l) = ids.dims2()?;
        self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.to_dtype(self.dtype)?.reshape((b, l, ()))
    }

    /// x: [B, L, H] embeddings, positions: [B, L] -> final-normed hidden [B, L, H].
    /// With a cache, the new keys/values are appended to it and attention covers all S = past + L
    /// keys (`mask.key_valid` then has B * S entries).
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        mut cache: Option<&mut KvCache>,
        interrupt: Interrupt,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope.cos_sin(positions, x.dtype())?; // [B, 1, L, hd]
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            check(interrupt)?;
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(i));
            h = self.layer_forward(layer, &h, &cos, &sin, mask, slot)?;
        }
        Ok(rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)?)
    }

    pub fn layer_forward(
        &self,
        l: &TextLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Mask,
        cache: Option<&mut LayerCache>,
    ) -> CResult<Tensor> {
        let (q, k, v) = self.attention_inputs(l, x, cos, sin)?;
        let (k, v) = match cache {
            Some(slot) => slot.append(&k, &v)?, // [B, Hkv, S, hd]
            None => (k, v),
        };
        let a = attention(&q, &k, &v, mask, self.attention_scale())?; // [B, Hq, L, hd]
        self.layer_output(l, x, &a)
    }

    /// One layer over a batch of pairs whose rows i and P + i share their first Lp tokens (a prompt
    /// with two completions): the shared prefix runs once, and each row's suffix attends to its pair's
    /// prefix keys and values plus its own. Equal to [`Self::layer_forward`] on the full rows.
    /// xp: [P, Lp, H] prefix, xs: [2P, Ls, H] suffixes; `rope_p` / `rope_s` the (cos, sin) of their
    /// positions; `mask_s` covers the full rows (S = Lp + Ls keys). Returns (prefix, suffix) outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_forward_shared_prefix(
        &self,
        l: &TextLayer,
        xp: &Tensor,
        xs: &Tensor,
        rope_p: &(Tensor, Tensor),
        rope_s: &(Tensor, Tensor),
        mask_p: &Mask,
        mask_s: &Mask,
    ) -> CResult<(Tensor, Tensor)> {
        let pairs = xp.dim(0)?;
        let (qp, kp, vp) = self.attention_inputs(l, xp, &rope_p.0, &rope_p.1)?; // [P, Hq|Hkv, Lp, hd]
        let (qs, ks, vs) = self.attention_inputs(l, xs, &rope_s.0, &rope_s.1)?; // [2P, Hq|Hkv, Ls, hd]
        let scale = self.attention_scale();
        let ap = attention(&qp, &kp, &vp, mask_p, scale)?; // [P, Hq, Lp, hd]
        let pair_of = Tensor::from_vec(
            (0..2 * pairs as u32).map(|r| r % pairs as u32).collect::<Vec<u32>>(),
            2 * pairs,
            xp.device(),
        )?;
        let k_all = Tensor::cat(&[&kp.index_select(&pair_of, 0)?, &ks], 2)?; // [2P, Hkv, Lp + Ls, hd]
        let v_all = Tensor::cat(&[&vp.index_select(&pair_of, 0)?, &vs], 2)?;
        let a_s = attention(&qs, &k_all, &v_all, mask_s, scale)?; // [2P, Hq, Ls, hd]
        Ok((self.layer_output(l, xp, &ap)?, self.layer_output(l, xs, &a_s)?))
    }

    fn attention_scale(&self) -> f64 {
        (self.cfg.head_dim as f64).powf(-0.5)
    }

    /// x: [B, L, H] -> rotated q [B, Hq, L, hd], rotated k and v [B, Hkv, L, hd].
    fn attention_inputs(
        &self,
        l: &TextLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> CResult<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (b, len, _) = x.dims3()?;
        let hd = c.head_dim;
        let h = rms_norm(x, &l.input_layernorm, c.rms_norm_eps)?; // [B, L, H]
        let heads = |t: Tensor, n: usize| t.reshape((b, len, n, hd))?.transpose(1, 2)?.contiguous(); // [B, n, L, hd]
        let q = heads(l.q_proj.forward(&h)?, c.num_attention_heads)?;
        let k = heads(l.k_proj.forward(&h)?, c.num_key_value_heads)?;
        let v = heads(l.v_proj.forward(&h)?, c.num_key_value_heads)?;
        Ok((apply_rotary(&q, cos, sin)?, apply_rotary(&k, cos, sin)?, v))
    }

    /// The layer's output from its input x [B, L, H] and the attention output a [B, Hq, L, hd].
    fn layer_output(&self, l: &TextLayer, x: &Tensor, a: &Tensor) -> CResult<Tensor> {
        let c = &self.cfg;
        let (b, len, _) = x.dims3()?;
        let a = a.transpose(1, 2)?.reshape((b, len, c.num_attention_heads * c.head_dim))?;
        let x = (x + l.o_proj.forward(&a)?)?;
        let h = rms_norm(&x, &l.post_attention_layernorm, c.rms_norm_eps)?;
        let m = l.down_proj.forward(&swiglu(&l.gate_proj.forward(&h)?, &l.up_proj.forward(&h)?)?)?;
        x + m
    }
}
