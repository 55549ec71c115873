//! Gradient checkpointing of the vision tower (`gradient_checkpointing=True` while its layers or its
//! embeddings train, as transformers checkpoints `Idefics3Encoder`'s layers): the forward keeps only
//! each encoder layer's input (detached), not its graph; the backward recomputes the layers one at a
//! time from the top, each from its input as a leaf, seeded with the gradient of its output, as the
//! text layers are (`step.rs`). The recomputation runs the same ops on the same values, so the
//! gradients are those of the un-checkpointed pass; what it saves is the encoder's activations (about
//! 240 MB per layer for four 512x512 images in SmolVLM-256M: ~2.9 GB of the 12 layers).
//!
//! Only used when the vision side has no adapters (nothing random in the tower to replay: full or
//! partial fine-tuning); a vision tower with adapters keeps its graph.

use std::cell::RefCell;

use candle_core::{Tensor, Var};

use super::step::{accumulate, seeded, Trainable};
use crate::error::{input_err, Result};
use crate::model::vision::VisionModel;
use crate::model::{check, Interrupt};
use crate::ops::Mask;

/// What the backward needs of the vision tower's forward.
pub struct VisionCheckpoint {
    /// The embeddings' output [F, Np, D], tracked (patch and position embeddings).
    embed: Tensor,
    /// Each encoder layer's input, detached.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf: the post-layernorm, the connector and the merge into the
    /// token embeddings are tracked from it.
    top: Tensor,
    mask: Mask,
}

/// Which parts of the tower train, from the trainable tensors' names (with a leading dot).
#[derive(Debug, Clone, Copy)]
pub struct VisionTraining {
    /// The lowest encoder layer with a trainable tensor.
    pub lowest_layer: Option<usize>,
    /// The patch or position embedding trains.
    pub embeddings: bool,
}

impl VisionTraining {
    pub fn from_names(names: &[String], layers: usize) -> Self {
        let v = crate::model::modules::VISION;
        let lowest_layer = (0..layers).find(|i| {
            let tag = format!(".{v}.encoder.layers.{i}.");
            names.iter().any(|n| n.contains(&tag))
        });
        let tag = format!(".{v}.embeddings.");
        VisionTraining { lowest_layer, embeddings: names.iter().any(|n| n.contains(&tag)) }
    }

    /// Whether anything below the post-layernorm trains (only then is there a graph to checkpoint).
    pub fn any(&self) -> bool {
        self.lowest_layer.is_some() || self.embeddings
    }
}

/// `VisionModel::forward` without the encoder layers' graphs; what the backward needs goes to `slot`
/// (one call per micro-batch: the features of all the batch's frames).
pub fn forward(
    v: &VisionModel,
    pixel_values: &Tensor,
    patch_mask: &[Vec<bool>],
    interrupt: Interrupt,
    slot: &RefCell<Option<VisionCheckpoint>>,
) -> Result<Tensor> {
    if slot.borrow().is_some() {
        return input_err("the checkpointed vision tower ran twice in one micro-batch".to_string());
    }
    let (embed, mask) = v.embed(pixel_values, patch_mask)?;
    let heads = v.cfg.num_attention_heads;
    let mut h = embed.detach();
    let mut inputs = Vec::with_capacity(v.layers.len());
    for layer in &v.layers {
        check(interrupt)?;
        let out = layer.forward(&h, &mask, heads)?.detach(); // the layer's graph is dropped here
        inputs.push(std::mem::replace(&mut h, out));
    }
    let top = Var::from_tensor(&h)?.as_tensor().clone();
    let out = v.post_layernorm.forward(&top)?;
    *slot.borrow_mut() = Some(VisionCheckpoint { embed, inputs, top, mask });
    Ok(out)
}

/// The backward through the tower: `top_grad` is the gradient of the checkpoint's `top` (from the
/// backward of the passes above it, see [`VisionCheckpoint::top`]); the parameter gradients are
/// added to `acc` (aligned with `params`). Stops below the lowest layer that trains unless the
/// embeddings do.
pub fn backward(
    v: &VisionModel,
    ck: VisionCheckpoint,
    top_grad: Tensor,
    training: VisionTraining,
    params: &[Trainable],
    acc: &mut [Option<Tensor>],
    interrupt: Interrupt,
) -> Result<()> {
    let VisionCheckpoint { embed, mut inputs, mask, .. } = ck;
    let heads = v.cfg.num_attention_heads;
    let mut g = top_grad;
    while let Some(input) = inputs.pop() {
        let i = inputs.len();
        check(interrupt)?;
        if !training.embeddings && training.lowest_layer.is_none_or(|lo| i < lo) {
            return Ok(());
        }
        let hin = Var::from_tensor(&input)?.as_tensor().clone();
        drop(input);
        let out = v.layers[i].forward(&hin, &mask, heads)?;
        let grads = seeded(&[out], &[g])?.backward()?;
        accumulate(acc, params, &grads)?;
        g = match grads.get(&hin) {
            Some(gi) => gi.detach(),
            None => return Ok(()),
        };
    }
    if training.embeddings {
        let grads = seeded(&[embed], &[g])?.backward()?;
        accumulate(acc, params, &grads)?;
    }
    Ok(())
}

impl VisionCheckpoint {
    /// The leaf whose gradient the passes above the tower compute.
    pub fn top(&self) -> &Tensor {
        &self.top
    }
}
