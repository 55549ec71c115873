//! Training: one forward + backward of a micro-batch through the adapted model, with the gradients
//! of the trainable tensors accumulated across micro-batches, and the frozen-vision feature cache.
//! The optimizer and schedules live in `crate::optim`; the loop (data order, logging, checkpoints)
//! is driven from Python.

pub mod dpo;
pub mod features;
pub mod rows;
pub mod step;

pub use features::FeatureCache;
pub use step::{forward_backward, run_objective, trainable_params, HeadOut, MicroStats, Objective, StepOptions, Trainable};
