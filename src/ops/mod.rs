//! Tensor ops of the model.
//!
//! Every op has a *reference* version composed of candle primitives (plain, readable, with candle's
//! autograd) and a fused version with a hand-written backward next to it (a candle `CustomOp` whose
//! `bwd` calls the backward kernel); inference-only fast paths sit behind a gate and are tested against
//! the plain path. Never use candle-nn's fused `rms_norm`, `layer_norm`, `softmax_last_dim`, rotary ops
//! or `QMatMul` on the training path: they have no backward.
//!
//! | op | entry point | reference | fused forward + backward | inference fast paths | tests |
//! |---|---|---|---|---|---|
//! | RMSNorm | [`norm::rms_norm`] | `rms_norm_reference` | `norm.rs` `RmsNormOp` | | `tests/ops_grad.rs` |
//! | LayerNorm | [`norm::layer_norm`] | `layer_norm_reference` | `norm.rs` `LayerNormOp` | `layer_norm_bf16` (to [`bf16::Bf16Rows`]) | `tests/ops_grad.rs`, `tests/bf16_mode.rs` |
//! | RoPE | [`rope::apply_rotary`] | `apply_rotary_reference` | `rope.rs` `RopeOp` | | `tests/ops_grad.rs` |
//! | GELU-tanh | [`activation::gelu_tanh`] | `gelu_tanh_reference` | `activation.rs` `GeluTanh` | in the epilogue of `matmul_bf16_fused` | `activation.rs`, `tests/ops_grad.rs` |
//! | SwiGLU | [`activation::swiglu`] | `swiglu_reference` | `activation.rs` `Swiglu` | | `tests/ops_grad.rs` |
//! | log-sigmoid (DPO) | [`activation::log_sigmoid`] | `log_sigmoid_reference` | `activation.rs` `LogSigmoid` | | `activation.rs` |
//! | attention | [`attention::attention`] | `attention_reference` | `attention_f32.rs` (f32, no L x L scores) | `attention_bf16.rs` (bf16 vision layers) | `tests/attention_grad.rs`, `attention_bf16.rs` |
//! | Linear | [`linear::Linear::forward`] | `x.matmul(w.t())` | `linear_op.rs` `LinearOp` (f32 or bf16 weight; `bf16=True` training: forward on the packed bf16 copy of `Weight::Autocast`) | `matmul_bf16_skinny.rs` (decode), `matmul_bf16_packed.rs` (bf16 mode), `matmul_bf16_amx.rs` (the same on AMX tiles) | `tests/ops_grad.rs`, `tests/bf16_mode.rs`, `tests/train_session.rs` |
//! | LoRA on a frozen Linear (training passes) | `lora::Adapter::forward` | `Adapter::forward_reference` (the composition) | `linear_lora.rs` `LoraLinearOp` (f32 or bf16 base weight, dropout mask; x, A, B gradients) | | `tests/ops_grad.rs` |
//! | quantized Linear | [`matmul_quant::quant_linear`] | `matmul_quant::reference` | `matmul_quant.rs` `QuantLinearOp` (backward to x) | few-rows / tile kernels in `matmul_quant.rs`; GGUF blocks: `matmul_ggml.rs` (`ggml_simd.rs` decoders) | `tests/quant.rs`, `tests/qlora_grads.rs`, `tests/ggml_matmul.rs`, `matmul_ggml.rs` |
//! | bf16 vision layer matmuls | [`matmul_bf16_fused::gemm_fused`] | `gemm_fused_portable` | (inference only) | bias, GELU, residual in the store; q\|k\|v in one call; products on AMX tiles where usable | `matmul_bf16_fused.rs`, `model/vision_fast.rs` |
//! | cross-entropy at label rows | [`cross_entropy::cross_entropy_rows`] | `cross_entropy_rows_reference` | `cross_entropy.rs` `CrossEntropy` | `token_stats` (entropy, argmax; no grad) | `tests/ops_grad.rs` |
//!
//! Kernel choice at run time ([`simd::CpuFeatures`], `_core.cpu_features()`): f32 products go through the
//! gemm crate, which takes its AVX-512 kernels on a CPU with AVX512F (its `x86-v4` feature) and AVX2+FMA
//! elsewhere; bf16 products take our AMX tile kernels where the CPU and OS allow them
//! ([`matmul_bf16_amx::amx_usable`]; `FERROVLM_NO_AMX=1` turns them off), else our AVX512-BF16 kernels
//! where the CPU has them, f32 products of bf16-rounded values elsewhere; element-wise loops are built for AVX-512 too (`activation::wide`).
//!
//! Shared pieces: [`bf16`] (bf16 conversions and rows), `cpu` (f32 views of tensors, rows per task,
//! gemm parallelism, `SendPtr`), [`math`] (the exp and sum every kernel uses), [`simd`] (CPU feature
//! checks and AVX-512 helpers), [`gradcheck`] (finite differences for the tests). The rule for a fully
//! masked attention row lives in `attention::fully_masked_weight`. [`team`] runs a computation on every
//! rayon worker in lockstep with spinning barriers between its phases (the decoding step of
//! `model/text_decode.rs`: one team per token instead of a dozen parallel dispatches per layer).

pub mod activation;
pub mod attention;
pub mod attention_bf16;
pub(crate) mod attention_f32;
pub mod attention_qkv_f32;
pub mod bf16;
pub(crate) mod cpu;
pub mod cross_entropy;
mod ggml_simd;
pub mod gradcheck;
pub mod linear;
pub(crate) mod linear_lora;
mod linear_op;
pub mod math;
pub mod matmul_bf16_amx;
pub mod matmul_bf16_fused;
pub mod matmul_bf16_packed;
pub mod matmul_bf16_skinny;
pub mod matmul_ggml;
pub mod matmul_quant;
pub mod norm;
pub mod rope;
pub mod simd;
pub mod team;

pub use activation::{gelu_tanh, log_sigmoid, silu, swiglu};

use std::sync::atomic::{AtomicU8, Ordering};

/// [`reference_ops`]: 0 = not read yet, 1 = off, 2 = on.
static REFERENCE_OPS: AtomicU8 = AtomicU8::new(0);

/// Whether the reference compositions are forced on the CPU too: `FERROVLM_REFERENCE_OPS=1` in the
/// environment (read once, at the first op), or [`set_reference_ops`]. They are what runs on a GPU
/// (candle's CUDA primitives with candle's autograd), so forcing them on the CPU checks, on a machine
/// without a GPU, that the GPU's path computes what the fused CPU kernels compute.
pub fn reference_ops() -> bool {
    match REFERENCE_OPS.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("FERROVLM_REFERENCE_OPS").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
            // Another thread may have set it meanwhile: its value wins.
            let _ = REFERENCE_OPS.compare_exchange(0, if on { 2 } else { 1 }, Ordering::Relaxed, Ordering::Relaxed);
            REFERENCE_OPS.load(Ordering::Relaxed) == 2
        }
        v => v == 2,
    }
}

/// Forces the reference compositions (`true`) or lets the fused CPU kernels run again (`false`),
/// process-wide, for the ops that start after the call.
pub fn set_reference_ops(on: bool) {
    REFERENCE_OPS.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether the fused CPU kernels (the custom ops and inference fast paths of this module, which read
/// CPU storage) may run on tensors on `dev`: a CPU device, and [`reference_ops`] off. Every other
/// device (CUDA) runs the reference compositions of candle primitives.
pub fn fused_on(dev: &candle_core::Device) -> bool {
    dev.is_cpu() && !reference_ops()
}

/// An f32 tensor on a device where the fused CPU kernels run ([`fused_on`]).
pub(crate) fn fused_f32(t: &candle_core::Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && fused_on(t.device())
}
pub use attention::{attention, Mask};
pub use linear::Linear;
pub use norm::{layer_norm, rms_norm};
pub use rope::Rope;
