//! Tensor ops of the model, written as compositions of candle primitives.
//!
//! Each op here is the *reference* version: plain, readable, autograd-friendly (only candle ops that
//! have a backward). Fused versions with hand-written backward (training) and faster kernels
//! (bf16, attention without L x L scores) go next to them and are tested against them.
//! Never use candle-nn's fused `rms_norm`, `layer_norm`, `softmax_last_dim`, rotary ops or `QMatMul`
//! on the training path: they have no backward.

pub mod activation;
pub mod attention;
pub mod attention_bf16;
mod attention_cpu;
pub mod cross_entropy;
pub mod gemm_bf16;
pub mod gemm_bf16_fused;
pub mod gradcheck;
pub mod gemv;
pub mod linear;
pub mod math;
pub mod norm;
pub mod quant_matmul;
pub mod rope;
pub mod simd;

pub use activation::{gelu_tanh, silu, swiglu};
pub use attention::{attention, Mask};
pub use linear::Linear;
pub use norm::{layer_norm, rms_norm};
pub use rope::Rope;
