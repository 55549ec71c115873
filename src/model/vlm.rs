//! The full model (`Idefics3ForConditionalGeneration` / `SmolVLMForConditionalGeneration`):
//! vision tower -> connector -> image-token merge -> Llama -> lm_head (+ loss).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::connector::Connector;
use super::text::TextModel;
use super::vision::{patch_mask_from_pixels, VisionModel};
use super::{Interrupt, LoadCtx};
use crate::checkpoint::WeightStore;
use crate::config::ModelConfig;
use crate::error::{input_err, Result};
use crate::lora::AdapterSwitch;
use crate::loss::causal_lm_loss_sum;
use crate::ops::{Linear, Mask};
use crate::quant::QuantConfig;

#[derive(Clone)]
pub struct VlmModel {
    pub config: ModelConfig,
    /// The vision tower and connector; None for a language model alone (`LlamaForCausalLM`).
    pub vision: Option<VisionModel>,
    pub connector: Option<Connector>,
    pub text: TextModel,
    pub lm_head: Linear,
    pub dtype: DType,
    pub device: Device,
    /// Shared by every adapter of this model (see `crate::lora`).
    pub switch: Arc<AdapterSwitch>,
    /// The bf16 compute mode (loaded with dtype bf16 on the CPU): `dtype` is f32 (activations,
    /// norms, softmax), every Linear weight is bf16 and multiplied with the AVX512-BF16 kernel.
    /// The model reports bf16 ([`Self::reported_dtype`]).
    pub bf16_compute: bool,
    /// How the Linear weights were quantized while loading, if they were (bitsandbytes).
    pub quant: Option<Arc<QuantConfig>>,
    /// PEFT `modules_to_save` outside Linear adapters: the original tensors of the parameters whose
    /// trainable copies the model now holds (see `saved.rs`).
    pub saved: Arc<super::saved::SavedModules>,
}

/// Inputs of one forward, shapes as in transformers. Integer inputs are plain vectors (row-major),
/// validated here so that bad ids give an error naming the index, not an out-of-bounds panic.
pub struct ForwardInput<'a> {
    /// [B, L]
    pub input_ids: &'a [i64],
    pub batch: usize,
    pub seq_len: usize,
    /// [B, L]; None = all ones.
    pub attention_mask: Option<&'a [i64]>,
    /// [B, F, C, H, W] f32.
    pub pixel_values: Option<&'a Tensor>,
    /// [B, F, H, W]; None = every pixel valid.
    pub pixel_attention_mask: Option<&'a [bool]>,
    /// [B, L] with -100 for ignored positions.
    pub labels: Option<&'a [i64]>,
    /// 0 = logits at every position, k = only the last k.
    pub logits_to_keep: usize,
}

pub struct ForwardOutput {
    /// [B, K, V] f32
    pub logits: Tensor,
    /// Mean NLL over label tokens (NaN when there are none, like torch).
    pub loss: Option<f32>,
    /// Number of label tokens the loss averaged over.
    pub num_label_tokens: usize,
}

/// Image features of the real frames: the vision tower output and the connector output.
pub struct ImageFeatures {
    /// Indices into the flattened B*F frames of the frames kept (all-zero frames are padding).
    pub real_frames: Vec<usize>,
    /// [F_real, Np, D]
    pub vision_hidden: Tensor,
    /// [F_real, T, H_text]
    pub connector: Tensor,
}

/// Computes connector features `[F_real, T, H]` from pixel values and the pixel attention mask.
pub type FeatureFn<'a> = &'a dyn Fn(&Tensor, Option<&[bool]>) -> Result<Tensor>;

/// Runs the vision tower: (tower, pixel_values [F, C, H, W] of the real frames, their patch masks) ->
/// last_hidden_state [F, Np, D] (`VisionModel::forward`, or a training step's checkpointed run).
pub type VisionEncoder<'a> = &'a dyn Fn(&VisionModel, &Tensor, &[Vec<bool>]) -> Result<Tensor>;

impl VlmModel {
    /// Loads config and weights from a checkpoint directory in `dtype` on `device`.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_dir_quantized(dir, dtype, device, None)
    }

    /// [`Self::from_dir`], quantizing Linear weights per `quant` (bitsandbytes' `quantization_config`).
    /// A checkpoint saved quantized loads as stored, with the `quantization_config` of its config.json
    /// when `quant` is None.
    pub fn from_dir_quantized(dir: &Path, dtype: DType, device: &Device, quant: Option<QuantConfig>) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let store = WeightStore::open_dir(dir)?;
        let prequantized = crate::quant::load::store_is_prequantized(&store);
        let quant = match quant {
            Some(q) => Some(q),
            None if prequantized => Some(QuantConfig::from_config_file(&dir.join("config.json"))?),
            None => None,
        };
        let quant = quant.map(|q| Arc::new(QuantConfig { prequantized, ..q }));
        // bf16 on the CPU: f32 activations with bf16 Linear weights (see `LoadCtx::bf16_compute`),
        // much faster than candle's bf16 tensors.
        let bf16_compute = dtype == DType::BF16 && device.is_cpu();
        let dtype = if bf16_compute { DType::F32 } else { dtype };
        let ctx = LoadCtx { dtype, device: device.clone(), bf16_storage: false, bf16_compute, quant };
        Self::load(config, &store, &ctx)
    }

    /// A language model alone (`LlamaForCausalLM`) from a Llama GGUF file, as transformers'
    /// `from_pretrained(dir, gguf_file=...)` builds it: the config from the file's `llama.*` keys,
    /// quantized Linear weights kept in their blocks ([`crate::quant::QuantWeight::Ggml`], exact
    /// dequantized values), float tensors decoded. A tied output head shares the embedding's blocks.
    pub fn from_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let store = WeightStore::open_gguf_with_prefix(path, super::modules::TEXT_ONLY)?;
        let config = match store.gguf() {
            Some(g) => crate::config::ModelConfig::from_gguf_llama(g.config(), path)?,
            None => return input_err(format!("{}: not a GGUF file", path.display())),
        };
        let bf16_compute = dtype == DType::BF16 && device.is_cpu();
        let dtype = if bf16_compute { DType::F32 } else { dtype };
        let ctx = LoadCtx { dtype, device: device.clone(), bf16_storage: false, bf16_compute, quant: None };
        Self::load(config, &store, &ctx)
    }

    pub fn load(config: ModelConfig, store: &WeightStore, ctx: &LoadCtx) -> Result<Self> {
        let (vision, connector) = if config.text_only() {
            (None, None)
        } else {
            let vision = VisionModel::load(store, "model.vision_model", &config.vision, ctx)?;
            let connector = Connector::load(
                store,
                "model.connector",
                config.vision.hidden_size,
                config.text.hidden_size,
                config.scale_factor,
                ctx,
            )?;
            (Some(vision), Some(connector))
        };
        // The text model and head run token by token when decoding, where bytes read per token set the
        // speed: bf16 checkpoints keep their bf16 there (exact). The vision tower is compute-bound: f32.
        let tctx = ctx.with_bf16_storage(true);
        let text = TextModel::load(store, super::modules::text_prefix(&config), &config.text, &tctx)?;
        let tp = super::modules::text_prefix(&config);
        let (vocab, hidden) = (config.text.vocab_size, config.text.hidden_size);
        let tied_gguf = match config.tie_word_embeddings {
            // a GGUF file's quantized token embedding is also the output head: kept in its blocks
            true => crate::quant::load::gguf_linear(store, &format!("{tp}.embed_tokens"), (vocab, hidden))?,
            false => None,
        };
        let lm_head = if let Some(q) = tied_gguf {
            Linear::quantized(q, None, false)
        } else if config.tie_word_embeddings && ctx.bf16_compute {
            Linear::bf16_compute(text.embed_tokens.clone(), None)?
        } else if config.tie_word_embeddings {
            Linear::with_compute_dtype(text.embed_tokens.clone(), None, ctx.dtype)?
        } else {
            Linear::load(store, "lm_head", config.text.hidden_size, config.text.vocab_size, false, &tctx)?
        };
        Ok(VlmModel {
            config,
            vision,
            connector,
            text,
            lm_head,
            dtype: ctx.dtype,
            device: ctx.device.clone(),
            switch: Arc::default(),
            bf16_compute: ctx.bf16_compute,
            quant: ctx.quant.clone(),
            saved: Arc::default(),
        })
    }

    /// Linears packed for the bf16 compute mode (not quantized) compute in f32 with their bf16
    /// weights from now on (PEFT's upcast in `prepare_model_for_kbit_training`; exact widening).
    pub fn upcast_dense_layers(&mut self) -> Result<()> {
        let upcast = |l: &mut Linear| -> Result<()> {
            if let crate::ops::linear::Weight::PackedBf16 { w, .. } = &l.weight {
                l.weight = crate::ops::linear::Weight::Bf16(w.clone());
            }
            Ok(())
        };
        if let Some(v) = &mut self.vision {
            upcast(&mut v.patch_embedding)?;
        }
        for (_, l) in self.linears_mut() {
            upcast(l)?;
        }
        // f32 compute from now on: nothing packs these layers again (`lora::detach`), and the model
        // reports float32 as transformers does after PEFT's upcast.
        self.bf16_compute = false;
        Ok(())
    }

    /// Training mode (adapter dropout; bitsandbytes' training product for int8 layers) on or off.
    pub fn set_training(&self, on: bool) {
        self.switch.set_training(on);
        self.set_quant_training(on);
    }

    /// The int8 layers' mode alone: bitsandbytes' training product (on) or LLM.int8's (off).
    pub fn set_quant_training(&self, on: bool) {
        if let Some(q) = &self.quant {
            q.training.store(on, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The dtype the model was loaded in: bf16 in the bf16 compute mode (which computes in f32).
    pub fn reported_dtype(&self) -> DType {
        if self.bf16_compute {
            DType::BF16
        } else {
            self.dtype
        }
    }

    /// Drops padding frames, runs the vision tower and the connector.
    /// pixel_values: [B, F, C, H, W]; pixel_attention_mask: [B, F, H, W] row-major.
    pub fn image_features(
        &self,
        pixel_values: &Tensor,
        pixel_attention_mask: Option<&[bool]>,
        interrupt: Interrupt,
    ) -> Result<ImageFeatures> {
        self.image_features_with(pixel_values, pixel_attention_mask, &|v, px, pm| v.forward(px, pm, interrupt))
    }

    /// [`Self::image_features`] with the vision tower run by `encoder`.
    pub fn image_features_with(
        &self,
        pixel_values: &Tensor,
        pixel_attention_mask: Option<&[bool]>,
        encoder: VisionEncoder,
    ) -> Result<ImageFeatures> {
        let (Some(vision), Some(connector)) = (&self.vision, &self.connector) else {
            return input_err("pixel_values given to a language model without a vision tower");
        };
        let dims = pixel_values.dims().to_vec();
        if dims.len() != 5 {
            return input_err(format!(
                "pixel_values must be [batch, frames, channels, height, width], got shape {dims:?}"
            ));
        }
        let (b, f, c, h, w) = (dims[0], dims[1], dims[2], dims[3], dims[4]);
        if let Some(m) = pixel_attention_mask {
            if m.len() != b * f * h * w {
                return input_err(format!(
                    "pixel_attention_mask has {} elements, expected [batch={b}, frames={f}, {h}, {w}]",
                    m.len()
                ));
            }
        }
        let frames = pixel_values.to_dtype(DType::F32)?.reshape((b * f, c * h * w))?;
        let flat: Vec<f32> = frames.flatten_all()?.to_vec1()?;
        let per = c * h * w;
        let real_frames: Vec<usize> =
            (0..b * f).filter(|&i| flat[i * per..(i + 1) * per].iter().any(|&v| v != 0.0)).collect();
        let p = self.config.vision.patch_size;
        let patch_mask: Vec<Vec<bool>> = real_frames
            .iter()
            .map(|&i| match pixel_attention_mask {
                Some(m) => patch_mask_from_pixels(&m[i * h * w..(i + 1) * h * w], h, w, p),
                None => vec![true; (h / p) * (w / p)],
            })
            .collect();
        let (d, th) = (self.config.vision.hidden_size, self.config.text.hidden_size);
        if real_frames.is_empty() {
            let np = (h / p) * (w / p);
            let t = np / (self.config.scale_factor * self.config.scale_factor);
            return Ok(ImageFeatures {
                real_frames,
                vision_hidden: Tensor::zeros((0, np, d), self.dtype, &self.device)?,
                connector: Tensor::zeros((0, t, th), self.dtype, &self.device)?,
            });
        }
        let idx = Tensor::from_vec(
            real_frames.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            real_frames.len(),
            &self.device,
        )?;
        // Pixels come from the host: the real frames go to the model's device (a no-op on the CPU).
        let px = pixel_values.to_device(&self.device)?.reshape((b * f, c, h, w))?; // [B*F, C, H, W]
        let px = px.index_select(&idx, 0)?.to_dtype(self.dtype)?; // [Fr, C, H, W]
        let vision_hidden = encoder(vision, &px, &patch_mask)?; // [Fr, Np, D]
        let connector = connector.forward(&vision_hidden)?; // [Fr, T, Ht]
        Ok(ImageFeatures { real_frames, vision_hidden, connector })
    }

    /// Token embeddings with the image tokens replaced, in order, by the image features.
    /// Returns [B, L, H].
    pub fn merged_embeddings(&self, input: &ForwardInput, interrupt: Interrupt) -> Result<Tensor> {
        self.merged_embeddings_with(input, &|px, pam| Ok(self.image_features(px, pam, interrupt)?.connector))
    }

    /// [`Self::merged_embeddings`] with the connector features of the real frames ([F_real, T, H])
    /// computed by `features` (e.g. from a cache).
    pub fn merged_embeddings_with(&self, input: &ForwardInput, features: FeatureFn) -> Result<Tensor> {
        let (b, l) = (input.batch, input.seq_len);
        let vocab = self.config.text.vocab_size;
        let mut ids = Vec::with_capacity(b * l);
        for (i, &t) in input.input_ids.iter().enumerate() {
            if t < 0 || t as usize >= vocab {
                return input_err(format!(
                    "input_ids[{}, {}] = {t} is outside the vocabulary [0, {vocab})",
                    i / l,
                    i % l
                ));
            }
            ids.push(t as u32);
        }
        let ids_t = Tensor::from_vec(ids, (b, l), &self.device)?;
        let emb = self.text.embed(&ids_t)?; // [B, L, H]
        let image_tok = self.config.image_token_id;
        let positions: Vec<usize> = (0..b * l).filter(|&i| input.input_ids[i] == image_tok).collect();
        let feats = match input.pixel_values {
            Some(px) => features(px, input.pixel_attention_mask)?,
            None if positions.is_empty() => return Ok(emb),
            None => {
                return input_err(format!(
                    "input_ids hold {} image tokens (id {image_tok}) but no pixel_values were given",
                    positions.len()
                ))
            }
        };
        let (frames, t, hdim) = feats.dims3()?;
        if frames * t != positions.len() {
            return input_err(format!(
                "image features and image tokens do not match: {} image tokens (id {image_tok}) in input_ids, but {frames} images x {t} tokens per image = {} features",
                positions.len(),
                frames * t
            ));
        }
        if positions.is_empty() {
            return Ok(emb);
        }
        // Gather from [text rows; image rows]: row i takes B*L + k if it is the k-th image token.
        let mut index: Vec<u32> = (0..(b * l) as u32).collect();
        for (k, &pos) in positions.iter().enumerate() {
            index[pos] = (b * l + k) as u32;
        }
        let all = Tensor::cat(
            &[&emb.reshape((b * l, hdim))?, &feats.reshape((frames * t, hdim))?.to_dtype(emb.dtype())?],
            0,
        )?;
        let index = Tensor::from_vec(index, b * l, &self.device)?;
        Ok(all.index_select(&index, 0)?.reshape((b, l, hdim))?)
    }

    /// Final hidden states [B, L, H] of the text model.
    /// Checks the shapes and lengths of `input` that every entry point relies on.
    pub fn check_input(&self, input: &ForwardInput) -> Result<()> {
        let (b, l) = (input.batch, input.seq_len);
        if input.input_ids.len() != b * l || b == 0 || l == 0 {
            return input_err(format!(
                "input_ids must be a non-empty [batch, seq_len] array; got {} values for shape [{b}, {l}]",
                input.input_ids.len()
            ));
        }
        let max_pos = self.config.text.max_position_embeddings;
        if l > max_pos {
            return input_err(format!("sequence length {l} exceeds max_position_embeddings {max_pos}"));
        }
        if let Some(m) = input.attention_mask {
            if m.len() != b * l {
                return input_err(format!("attention_mask has {} values, expected [{b}, {l}]", m.len()));
            }
        }
        Ok(())
    }

    /// Final hidden states [B, L, H] of the text model.
    pub fn hidden_states(&self, input: &ForwardInput, interrupt: Interrupt) -> Result<Tensor> {
        let (b, l) = (input.batch, input.seq_len);
        self.check_input(input)?;
        let x = self.merged_embeddings(input, interrupt)?;
        let key_valid = match input.attention_mask {
            Some(m) if m.contains(&0) => Some(Arc::new(m.iter().map(|&v| v != 0).collect::<Vec<bool>>())),
            _ => None,
        };
        let mask = Mask { causal: true, key_valid };
        // A plain forward uses positions 0..L-1 whatever the padding (generate uses cumsum - 1).
        let pos: Vec<u32> = (0..b).flat_map(|_| 0..l as u32).collect();
        let pos = Tensor::from_vec(pos, (b, l), &self.device)?;
        self.text.forward(&x, &pos, &mask, None, interrupt)
    }

    /// Logits (all positions, or the last `logits_to_keep`) and the loss when labels are given.
    pub fn forward(&self, input: &ForwardInput, interrupt: Interrupt) -> Result<ForwardOutput> {
        let hidden = self.hidden_states(input, interrupt)?; // [B, L, H]
        let l = input.seq_len;
        let keep = if input.logits_to_keep == 0 { l } else { input.logits_to_keep.min(l) };
        let tail = hidden.narrow(1, l - keep, keep)?; // [B, K, H]
        let logits = self.lm_head.forward(&tail)?.to_dtype(DType::F32)?; // [B, K, V]
        let (loss, n) = match input.labels {
            None => (None, 0),
            Some(lab) if lab.len() != input.batch * l => {
                return input_err(format!(
                    "labels have {} values, expected [{}, {l}] like input_ids",
                    lab.len(),
                    input.batch
                ))
            }
            Some(lab) => {
                let (sum, n) = causal_lm_loss_sum(&hidden, lab, &self.lm_head)?;
                let sum = sum.to_scalar::<f32>()?;
                (Some(if n == 0 { f32::NAN } else { sum / n as f32 }), n)
            }
        };
        Ok(ForwardOutput { logits, loss, num_label_tokens: n })
    }
}

impl VlmModel {
    /// Number of parameters, tied weights counted once (like `model.num_parameters()`).
    pub fn num_parameters(&self) -> usize {
        let lin = |l: &Linear| l.in_features * l.out_features + l.bias.as_ref().map_or(0, |b| b.elem_count());
        let ln = |n: &super::vision::LayerNorm| n.weight.elem_count() + n.bias.elem_count();
        let mut n = 0;
        if let Some(v) = &self.vision {
            n += lin(&v.patch_embedding) + v.position_embedding.elem_count() + ln(&v.post_layernorm);
            for l in &v.layers {
                n += ln(&l.layer_norm1) + ln(&l.layer_norm2);
                n += [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2]
                    .iter()
                    .map(|x| lin(x))
                    .sum::<usize>();
            }
        }
        if let Some(c) = &self.connector {
            n += lin(&c.proj);
        }
        let t = &self.text;
        n += t.embed_tokens.elem_count() + t.norm.elem_count();
        for l in &t.layers {
            n += l.input_layernorm.elem_count() + l.post_attention_layernorm.elem_count();
            n += [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]
                .iter()
                .map(|x| lin(x))
                .sum::<usize>();
        }
        if !self.config.tie_word_embeddings {
            n += lin(&self.lm_head);
        }
        n
    }
}
