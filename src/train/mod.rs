//! Training: one forward + backward of a micro-batch through the adapted model (`step`), DPO's
//! objective (`dpo`), the session that accumulates gradients and steps AdamW (`session`), the
//! frozen-vision feature cache (`features`) and the vision tower's gradient checkpointing
//! (`vision_ckpt`). AdamW, clipping and schedules live in `crate::optim`; the loop (data order,
//! logging, checkpoints) is driven from Python.

pub mod dpo;
pub mod features;
pub mod rows;
pub mod session;
pub mod step;
pub mod vision_ckpt;

pub use features::FeatureCache;
pub use session::{OptimizerState, SessionConfig, TrainSession};
pub use step::{
    forward_backward, run_objective, trainable_params, HeadOut, MicroStats, Objective, StepCtx, StepOptions, Trainable,
};
