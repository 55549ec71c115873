//! Forward + backward of one micro-batch.
//!
//! The text model runs layer by layer: each layer's input is kept (as a leaf), and the backward goes
//! layer by layer from the top, seeding each layer's graph with the gradient of its output. With
//! `gradient_checkpointing` a layer's graph is dropped after its forward and rebuilt in the backward
//! (the adapters' dropout masks are seeded per layer, so the recomputation is identical); without it,
//! the graphs are kept. Frozen layers below the lowest trainable one are not back-propagated at all,
//! and the vision tower only when something in it (or the connector) trains; with
//! `gradient_checkpointing` its encoder layers are checkpointed the same way (`vision_ckpt.rs`).

use std::cell::RefCell;

use candle_core::{DType, Tensor, Var};

use super::rows::Rows;
use super::vision_ckpt::{self, VisionTraining};
use super::FeatureCache;
use crate::error::{input_err, Result};
use crate::loss::{head_at_rows, shifted_targets, LabelLogits};
use crate::model::vision::VisionModel;
use crate::model::{check, ForwardInput, Interrupt, VlmModel};
use crate::ops::cross_entropy::token_stats;
use crate::ops::rms_norm;

/// A trainable tensor with its PEFT key (`base_model.model.<module>.lora_A.weight`, ...).
#[derive(Clone)]
pub struct Trainable {
    pub name: String,
    pub var: Var,
    /// The checkpoint's shape (the patch embedding's Conv2d weight is [D, C, P, P], its Var [D, C*P*P]).
    pub shape: Vec<usize>,
}

/// Every trainable tensor of the model: its adapters' (PEFT keys, in module order), then its own
/// trainable parameters (full-parameter training, transformers' names; under `base_model.model.` when
/// the model also has adapters or `modules_to_save` copies, as PEFT names them).
pub fn trainable_params(model: &VlmModel) -> Vec<Trainable> {
    let mut out = Vec::new();
    for (name, lin) in model.linears() {
        if let Some(ad) = &lin.adapter {
            for (suffix, var) in ad.params() {
                let shape = var.dims().to_vec();
                out.push(Trainable { name: format!("base_model.model.{name}.{suffix}"), var: var.clone(), shape });
            }
        }
    }
    let prefix = if out.is_empty() && model.saved.is_empty() { "" } else { "base_model.model." };
    for (name, var, shape) in model.param_vars() {
        out.push(Trainable { name: format!("{prefix}{name}"), var, shape });
    }
    out
}

#[derive(Debug, Clone, Default)]
pub struct StepOptions {
    pub gradient_checkpointing: bool,
    /// Seeds the adapters' dropout masks of this micro-batch.
    pub dropout_seed: u64,
    /// Run the backward (false: evaluation, loss and metrics only).
    pub backward: bool,
    /// Rows i and P + i share a prompt (DPO's chosen and rejected): run their common prefix once.
    pub paired: bool,
}

/// Sums over one micro-batch, the ingredients of TRL's logged metrics.
#[derive(Debug, Clone, Default)]
pub struct MicroStats {
    /// Sum of -log p over the label tokens.
    pub loss_sum: f64,
    pub num_label_tokens: usize,
    /// Sum over the label positions of the predictive entropy.
    pub entropy_sum: f64,
    /// Attention-mask tokens (TRL's `num_tokens` counts these).
    pub num_mask_tokens: usize,
    /// Label tokens whose argmax prediction is right.
    pub correct: usize,
}

pub(super) fn accumulate(
    acc: &mut [Option<Tensor>],
    params: &[Trainable],
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    for (slot, p) in acc.iter_mut().zip(params) {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            *slot = Some(match slot.take() {
                None => g.detach(),
                Some(s) => (s + g)?.detach(),
            });
        }
    }
    Ok(())
}

fn layer_seed(base: u64, layer: usize) -> u64 {
    base.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (layer as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// What the loss sees of the head: per label row (after the causal shift) its cross-entropy, its logits
/// and the batch row it belongs to.
pub struct HeadOut<'a> {
    /// [N] -log p(target), tracked.
    pub nll: &'a Tensor,
    /// [N, V] f32 logits at the label rows (tracked; detach before reading values).
    pub logits: &'a Tensor,
    /// Batch row of each label row.
    pub seq: &'a [usize],
    /// Target token of each label row.
    pub targets: &'a [u32],
    pub batch: usize,
}

/// Builds the scalar to differentiate from the head's output (also called without a backward).
pub type Objective<'a> = &'a mut dyn FnMut(&HeadOut) -> Result<Tensor>;

/// What a micro-batch runs against: the model, its trainable tensors (the gradient slots follow their
/// order), the frozen-vision feature cache and the interrupt poll.
#[derive(Clone, Copy)]
pub struct StepCtx<'a> {
    pub model: &'a VlmModel,
    pub params: &'a [Trainable],
    pub cache: Option<&'a FeatureCache>,
    pub interrupt: Interrupt<'a>,
}

/// Forward (and, with `opts.backward`, backward) of one micro-batch. The loss whose gradient is
/// accumulated into `acc` (aligned with `ctx.params`) is `loss_scale` x the sum of the label tokens'
/// cross-entropies (TRL: 1 / number of label tokens in the whole optimizer step).
pub fn forward_backward(
    ctx: &StepCtx,
    input: &ForwardInput,
    opts: &StepOptions,
    loss_scale: f64,
    acc: &mut [Option<Tensor>],
) -> Result<MicroStats> {
    run_objective(ctx, input, opts, acc, &mut |h: &HeadOut| Ok((h.nll.sum_all()? * loss_scale)?))
}

/// [`forward_backward`] with any objective over the label rows' cross-entropies (DPO, ...).
pub fn run_objective(
    ctx: &StepCtx,
    input: &ForwardInput,
    opts: &StepOptions,
    acc: &mut [Option<Tensor>],
    objective: Objective,
) -> Result<MicroStats> {
    let StepCtx { model, params, cache, interrupt } = *ctx;
    if acc.len() != params.len() {
        return input_err(format!("{} gradient slots for {} trainable tensors", acc.len(), params.len()));
    }
    model.check_input(input)?;
    let mut clock = crate::trace::Phases::new("micro-batch");
    let (b, l) = (input.batch, input.seq_len);
    let labels = match input.labels {
        Some(lab) if lab.len() == b * l => lab,
        Some(lab) => return input_err(format!("labels have {} values, expected [{b}, {l}] like input_ids", lab.len())),
        None => return input_err("training needs labels".to_string()),
    };
    let text = &model.text;
    // Names with a leading dot, so that a pattern ".model.x." matches `model.x.y` (full-parameter
    // training) and `base_model.model.model.x.y` (PEFT) alike.
    let names: Vec<String> = params.iter().map(|p| format!(".{}", p.name)).collect();
    let tp = crate::model::modules::text_prefix(&model.config);
    let embed_tag = format!(".{tp}.embed_tokens.");
    // Something below the text layers trains (vision tower, connector, token embeddings): the gradient
    // goes all the way down to the merged embeddings.
    let vision_side = names.iter().any(|n| n.contains(".model.vision_model.") || n.contains(".model.connector."));
    let vision_trains = opts.backward && (vision_side || names.iter().any(|n| n.contains(&embed_tag)));
    let lowest_text_layer = (0..text.layers.len()).find(|i| {
        let tag = format!(".{tp}.layers.{i}.");
        names.iter().any(|n| n.contains(&tag))
    });

    // Embeddings with image features: tracked only when the vision side trains; else cached by content,
    // unless an adapter sits on the vision tower or the connector: the features then depend on the
    // adapter's current values and on whether it is switched on (DPO's reference pass, evaluation),
    // which a cache keyed by pixels cannot tell apart.
    // A training step runs int8 layers in bitsandbytes' training mode (vision tower included); passes
    // without backward keep the model's mode (DPO's reference pass during training runs in training
    // mode in TRL, evaluation in eval mode: the trainers set it).
    if opts.backward {
        model.set_quant_training(true);
    }
    // An int8 vision tower computes differently in training and inference mode (LLM.int8 vs
    // dequantize-then-matmul), which a cache keyed by pixels cannot tell apart either.
    let int8 = model.quant.as_ref().is_some_and(|q| q.method == crate::quant::QuantMethod::Int8);
    // gradient_checkpointing with a training vision tower (no adapters in it): its layers' graphs are
    // not kept, the backward recomputes them (vision_ckpt.rs)
    let vision_training = VisionTraining::from_names(&names, model.vision.as_ref().map_or(0, |v| v.layers.len()));
    let vision_ckpt = RefCell::new(None);
    let checkpoint_vision =
        opts.backward && opts.gradient_checkpointing && vision_training.any() && !model.vision_side_has_adapters();
    let x0 = match (opts.backward && vision_side, cache) {
        (false, Some(c)) if !model.vision_side_has_adapters() && !model.vision_side_trains() && !int8 => {
            model.merged_embeddings_with(input, &|px, pam| c.features(model, px, pam, interrupt))?
        }
        _ if checkpoint_vision => {
            let encoder = |v: &VisionModel, px: &Tensor, pm: &[Vec<bool>]| {
                vision_ckpt::forward(v, px, pm, interrupt, &vision_ckpt)
            };
            model
                .merged_embeddings_with(input, &|px, pam| Ok(model.image_features_with(px, pam, &encoder)?.connector))?
        }
        _ => model.merged_embeddings(input, interrupt)?,
    }; // [B, L, H]
    clock.mark("embeddings");
    let rows = Rows::new(text, input, &x0, opts.paired)?;

    let backward = opts.backward;
    // Layer i needs its input as a leaf when a gradient must reach below it.
    let needs_input_grad = |i: usize| backward && (vision_trains || lowest_text_layer.is_some_and(|lo| i > lo));
    let leaves = |parts: &[Tensor]| -> Result<Vec<Tensor>> {
        Ok(parts
            .iter()
            .map(|t| Var::from_tensor(t).map(|v| v.as_tensor().clone()))
            .collect::<candle_core::Result<_>>()?)
    };
    let mut inputs: Vec<Vec<Tensor>> = Vec::with_capacity(text.layers.len());
    let mut outputs: Vec<Option<Vec<Tensor>>> = Vec::with_capacity(text.layers.len());
    let mut h: Vec<Tensor> = rows.split(&x0.detach())?; // [B, L, H], or prefix [P, Lp, H] + suffixes [B, Ls, H]
    model.switch.set_training(backward);
    for (i, layer) in text.layers.iter().enumerate() {
        check(interrupt)?;
        model.switch.set_seed(layer_seed(opts.dropout_seed, i));
        let hin = if needs_input_grad(i) && !opts.gradient_checkpointing { leaves(&h)? } else { h.clone() };
        let out = rows.layer(text, layer, &hin)?;
        h = out.iter().map(|t| t.detach()).collect();
        inputs.push(hin);
        outputs.push(if backward && !opts.gradient_checkpointing { Some(out) } else { None });
    }
    clock.mark("layers");
    let top = if backward { leaves(&h)? } else { h.clone() };
    let normed =
        top.iter().map(|t| rms_norm(t, &text.norm, text.cfg.rms_norm_eps)).collect::<candle_core::Result<Vec<_>>>()?;
    let flat = rows.stacked(&normed)?; // [T, H]

    // Loss at the label rows (the head runs only there); TRL's entropy and accuracy are over the same rows.
    let targets = shifted_targets(labels, b, l, model.lm_head.out_features)?;
    let num_mask_tokens = match input.attention_mask {
        Some(m) => m.iter().filter(|&&v| v != 0).count(),
        None => b * l,
    };
    let mut stats = MicroStats { num_label_tokens: targets.len(), num_mask_tokens, ..Default::default() };
    if targets.is_empty() {
        return Ok(stats);
    }
    let at: Vec<u32> = targets.iter().map(|t| rows.stacked_row(t.0 as usize / l, t.0 as usize % l)).collect();
    let ys: Vec<u32> = targets.iter().map(|t| t.1).collect();
    let LabelLogits { logits, nll } = head_at_rows(&flat, at, &ys, &model.lm_head)?; // [N, V], [N]
    let (entropy, argmax) = token_stats(&logits.detach())?;
    stats.entropy_sum = entropy.iter().map(|&e| e as f64).sum();
    stats.correct = argmax.iter().zip(&ys).filter(|(a, y)| a == y).count();
    stats.loss_sum = nll.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let seq: Vec<usize> = targets.iter().map(|t| t.0 as usize / l).collect();
    let loss = objective(&HeadOut { nll: &nll, logits: &logits, seq: &seq, targets: &ys, batch: b })?;
    clock.mark("head");
    if !backward {
        return Ok(stats);
    }
    let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !stats.loss_sum.is_finite() || !loss_value.is_finite() {
        stats.loss_sum = f64::NAN;
        return Ok(stats); // the caller stops training and names the step; no gradient is accumulated
    }

    // Backward: head + final norm, then the layers from the top.
    let grads = loss.backward()?;
    accumulate(acc, params, &grads)?;
    let mut g = match gradients(&grads, &top)? {
        Some(g) => g,
        None => return Ok(stats),
    };
    drop(grads);
    clock.mark("head backward");
    for i in (0..text.layers.len()).rev() {
        check(interrupt)?;
        if !vision_trains && lowest_text_layer.is_none_or(|lo| i < lo) {
            break;
        }
        let (hin, out) = match outputs[i].take() {
            Some(out) => (inputs[i].clone(), out),
            None => {
                model.switch.set_seed(layer_seed(opts.dropout_seed, i));
                let hin = if needs_input_grad(i) { leaves(&inputs[i])? } else { inputs[i].clone() };
                let out = rows.layer(text, &text.layers[i], &hin)?;
                (hin, out)
            }
        };
        let grads = seeded(&out, &g)?.backward()?;
        accumulate(acc, params, &grads)?;
        g = match gradients(&grads, &hin)? {
            Some(gi) => gi,
            None => break,
        };
        inputs[i] = Vec::new(); // free
    }
    clock.mark("layers backward");
    if vision_trains {
        let grads = seeded(&rows.split(&x0)?, &g)?.backward()?;
        accumulate(acc, params, &grads)?;
        if let Some(ck) = vision_ckpt.into_inner() {
            let Some(top_grad) = grads.get(ck.top()).map(|t| t.detach()) else { return Ok(stats) };
            drop(grads);
            if let Some(v) = &model.vision {
                vision_ckpt::backward(v, ck, top_grad, vision_training, params, acc, interrupt)?;
            }
        }
        clock.mark("vision backward");
    }
    Ok(stats)
}

/// sum_k sum(out_k * g_k): the scalar whose backward seeds each part's output gradient.
pub(super) fn seeded(out: &[Tensor], g: &[Tensor]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (o, gk) in out.iter().zip(g) {
        let term = (o * gk)?.sum_all()?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    match total {
        Some(t) => Ok(t),
        None => input_err("no layer output to differentiate".to_string()),
    }
}

/// The gradients of the parts (zeros for a part the loss does not reach), None when none is reached.
fn gradients(grads: &candle_core::backprop::GradStore, parts: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
    if parts.iter().all(|p| grads.get(p).is_none()) {
        return Ok(None);
    }
    let g = parts
        .iter()
        .map(|p| grads.get(p).map_or_else(|| p.zeros_like(), |g| Ok(g.detach())))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(g))
}
