//! Linear layer y = x W^T + b over arbitrary leading dims.
//!
//! The weight is kept as stored by PyTorch ([out, in]), or quantized ([`Weight::Quant`]: bitsandbytes'
//! nf4/fp4/int8, multiplied by `ops::matmul_quant` without a dequantized copy; GGUF will be another
//! quantized kind), each with a matmul and a backward to the input.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use std::sync::Arc;

use super::cpu::{f32_arg, parallelism, rows_per_task, with_f32};
use super::matmul_bf16_packed;
use crate::checkpoint::WeightStore;
use crate::error::CheckpointError;

/// Storage of a linear weight.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense [out, in] in the compute dtype.
    Dense(Tensor),
    /// [out, in] kept in bf16 because the checkpoint stored bf16 while the compute dtype is f32:
    /// the values are exact, memory is halved, and decoding reads half the bytes.
    Bf16(Tensor),
    /// The bf16 compute mode: [out, in] bf16 (`w`, used by the skinny path for few rows, by the
    /// tracked/backward path and by adapter merging) plus the same weight packed once at load time for
    /// [`matmul_bf16_packed::matmul_packed`] (x rounded to bf16, f32 accumulation), used for more than
    /// [`GEMV_MAX_ROWS`] rows. Only built where [`matmul_bf16_packed::available`].
    PackedBf16 { w: Tensor, packed: Arc<matmul_bf16_packed::PackedBf16> },
    /// `bf16=True` training on a CPU (transformers' CPU autocast): the stored weight `w` [out, in] (f32,
    /// or bf16 as [`Weight::Bf16`] keeps a bf16 checkpoint's) stays the master copy (merging, saving, the backward to x), and every product x W^T, tracked or not, runs
    /// on `packed`, the weight rounded to bf16 and packed for [`matmul_bf16_packed::matmul_packed`]
    /// (x rounded to bf16, f32 accumulation), as autocast runs `linear` in bf16. Built by
    /// [`Linear::with_bf16_autocast`] for a training session and dropped with it.
    Autocast { w: Tensor, packed: Arc<matmul_bf16_packed::PackedBf16> },
    /// A frozen quantized weight (bitsandbytes 4-bit or 8-bit). `bf16`: products in bf16 with f32
    /// accumulation and the output rounded to bf16 (`bnb_4bit_compute_dtype=bfloat16`).
    Quant { q: Arc<crate::quant::QuantWeight>, bf16: bool },
}

/// Up to this many rows, bf16 weights go through the skinny kernel; above, they are widened block by
/// block and multiplied by gemm.
const GEMV_MAX_ROWS: usize = 16;

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    /// [out]
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
    /// A LoRA / DoRA adapter or a trainable copy (`modules_to_save`), see `crate::lora`.
    pub adapter: Option<std::sync::Arc<crate::lora::Adapter>>,
}

impl Linear {
    /// A dense linear layer computing in the weight's dtype.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Linear { weight: Weight::Dense(weight), bias, in_features, out_features, adapter: None })
    }

    /// A layer computing in `compute`: a bf16 weight with an f32 compute dtype stays bf16 ([`Weight::Bf16`]).
    pub fn with_compute_dtype(weight: Tensor, bias: Option<Tensor>, compute: DType) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let weight = if weight.dtype() == DType::BF16 && compute == DType::F32 {
            Weight::Bf16(weight)
        } else {
            Weight::Dense(weight)
        };
        Ok(Linear { weight, bias, in_features, out_features, adapter: None })
    }

    /// A layer of the bf16 compute mode: the weight rounded to bf16 and, on a CPU with AVX512-BF16,
    /// packed for [`matmul_bf16_packed::matmul_packed`] ([`Weight::PackedBf16`]); elsewhere a plain
    /// [`Weight::Bf16`]. The bias keeps its dtype.
    pub fn bf16_compute(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let w = weight.to_dtype(DType::BF16)?.contiguous()?;
        let weight = if w.device().is_cpu() && matmul_bf16_packed::available() {
            let packed = {
                let (s, l) = w.storage_and_layout();
                match (&*s, l.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
                        matmul_bf16_packed::pack(&v[a..b], out_features, in_features)
                    }
                    _ => candle_core::bail!("bf16_compute: expected a contiguous bf16 CPU weight"),
                }
            };
            Weight::PackedBf16 { w, packed: Arc::new(packed) }
        } else {
            Weight::Bf16(w)
        };
        Ok(Linear { weight, bias, in_features, out_features, adapter: None })
    }

    /// This layer for `bf16=True` training ([`Weight::Autocast`]): a frozen f32 (or bf16-stored) CPU
    /// weight gets a bf16 packed copy that every product uses, on a CPU with AVX512-BF16. Any other layer
    /// is returned as it is: trainable weights (autograd `Var`s), the bf16 compute mode's and quantized
    /// weights, and every weight on a CPU without AVX512-BF16 (products stay f32 there, more precise
    /// than autocast).
    pub fn with_bf16_autocast(&self) -> Result<Self> {
        let mut lin = self.clone();
        let (Weight::Dense(w) | Weight::Bf16(w)) = &self.weight else { return Ok(lin) };
        if !w.device().is_cpu() || w.is_variable() || !matmul_bf16_packed::available() {
            return Ok(lin);
        }
        let bits: Vec<half::bf16> = match w.dtype() {
            DType::F32 => with_f32(w, |v| {
                v.par_iter().map(|&x| half::bf16::from_bits(super::bf16::f32_to_bf16_bits(x))).collect()
            })?,
            DType::BF16 => w.flatten_all()?.to_vec1::<half::bf16>()?,
            _ => return Ok(lin),
        };
        let packed = matmul_bf16_packed::pack(&bits, self.out_features, self.in_features);
        lin.weight = Weight::Autocast { w: w.clone(), packed: Arc::new(packed) };
        Ok(lin)
    }

    /// A layer over a quantized weight.
    pub fn quantized(q: Arc<crate::quant::QuantWeight>, bias: Option<Tensor>, bf16: bool) -> Self {
        let (out_features, in_features) = q.shape();
        Linear { weight: Weight::Quant { q, bf16 }, bias, in_features, out_features, adapter: None }
    }

    /// The quantized weight, when the layer has one.
    pub fn quant(&self) -> Option<&Arc<crate::quant::QuantWeight>> {
        match &self.weight {
            Weight::Quant { q, .. } => Some(q),
            _ => None,
        }
    }

    /// Whether the weight is kept for the bf16 compute mode (see [`Self::bf16_compute`]).
    pub fn is_bf16_compute(&self) -> bool {
        matches!(self.weight, Weight::PackedBf16 { .. })
    }

    /// Loads `{prefix}.weight` [out, in] and, when `bias`, `{prefix}.bias` [out].
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        ctx: &crate::model::LoadCtx,
    ) -> std::result::Result<Self, CheckpointError> {
        let b = if bias { Some(ctx.get(store, &format!("{prefix}.bias"), &[out_features])?) } else { None };
        if let Some(q) = crate::quant::load::linear(store, prefix, (out_features, in_features), ctx)? {
            // bnb_4bit_compute_dtype applies to 4-bit layers; int8 layers compute as bitsandbytes does.
            let bf16 = ctx.quant.as_ref().is_some_and(|c| c.compute_bf16)
                && matches!(*q, crate::quant::QuantWeight::FourBit(_));
            return Ok(Linear::quantized(q, b, bf16));
        }
        if ctx.bf16_compute && ctx.dtype == DType::F32 {
            let w = store.get(&format!("{prefix}.weight"), &[out_features, in_features], DType::BF16, &ctx.device)?;
            return Linear::bf16_compute(w, b)
                .map_err(|e| CheckpointError::Io { file: "<memory>".into(), msg: e.to_string() });
        }
        let w = ctx.get_storage(store, &format!("{prefix}.weight"), &[out_features, in_features])?;
        let weight = if w.dtype() != ctx.dtype { Weight::Bf16(w) } else { Weight::Dense(w) };
        Ok(Linear { weight, bias: b, in_features, out_features, adapter: None })
    }

    /// x: [.., in] -> [.., out], with the adapter when there is one.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            Some(ad) => ad.forward(self, x, &|x| self.forward_base(x)),
            None => self.forward_base(x),
        }
    }

    /// The layer without its adapter. x: [.., in] -> [.., out]
    ///
    /// When x, the weight or the bias is tracked by autograd (a `Var` or computed from one) and the
    /// computation is f32 on the CPU, the product runs as a custom op whose backward computes only
    /// the gradients of tracked arguments (a frozen weight never gets a gradient). Otherwise the
    /// inference path below runs unchanged.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.in_features))?; // [N, in]
        if let Weight::Quant { q, bf16 } = &self.weight {
            let y = self.quant_forward(&x2, q, *bf16)?; // [N, out]
            let mut out_dims = dims;
            let last = out_dims.len() - 1;
            out_dims[last] = self.out_features;
            return y.reshape(out_dims);
        }
        let w = self.weight_tensor().ok_or_else(|| candle_core::Error::Msg("linear: no dense weight".into()))?;
        let tracked = x.track_op() || w.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        let y = if tracked && self.fused_ok(x) {
            let packed = match &self.weight {
                Weight::Autocast { packed, .. } => Some(packed.clone()),
                _ => None,
            };
            linear_tracked(&x2, w, self.bias.as_ref(), packed)? // [N, out], bias included
        } else {
            let cpu_f32 = x.dtype() == DType::F32 && x.device().is_cpu();
            let bias = self.bias.as_ref();
            let (y, with_bias) = match &self.weight {
                Weight::Dense(w) => (x2.matmul(&w.t()?)?, false), // [N, out]
                Weight::Bf16(w) if cpu_f32 => (bf16_matmul(&x2, w, self.out_features, bias)?, true), // [N, out]
                Weight::Bf16(w) => (x2.matmul(&w.to_dtype(x.dtype())?.t()?)?, false),
                Weight::PackedBf16 { w, packed } if cpu_f32 => {
                    if n <= GEMV_MAX_ROWS {
                        (bf16_matmul(&x2, w, self.out_features, bias)?, true) // decoding: the skinny kernel
                    } else {
                        let y = with_f32(&x2, |xs| matmul_bf16_packed::matmul_packed(xs, n, self.in_features, packed))?;
                        (Tensor::from_vec(y, (n, self.out_features), x.device())?, false)
                    }
                }
                Weight::PackedBf16 { w, .. } => (x2.matmul(&w.to_dtype(x.dtype())?.t()?)?, false),
                Weight::Autocast { packed, .. } if cpu_f32 => {
                    let y = with_f32(&x2, |xs| matmul_bf16_packed::matmul_packed(xs, n, self.in_features, packed))?;
                    (Tensor::from_vec(y, (n, self.out_features), x.device())?, false)
                }
                Weight::Autocast { w, .. } => (x2.matmul(&w.to_dtype(x.dtype())?.t()?)?, false),
                Weight::Quant { .. } => unreachable!("handled above"),
            };
            match bias {
                Some(b) if !with_bias => y.broadcast_add(b)?,
                _ => y,
            }
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        y.reshape(out_dims)
    }

    /// x [N, in] through a quantized weight: int8 in inference mode runs LLM.int8's product, every
    /// other case [`matmul_quant::quant_linear`] (tracked x gets its gradient; the weight never).
    fn quant_forward(&self, x2: &Tensor, q: &Arc<crate::quant::QuantWeight>, bf16: bool) -> Result<Tensor> {
        let x2 = if x2.dtype() == DType::F32 { x2.clone() } else { x2.to_dtype(DType::F32)? };
        if let crate::quant::QuantWeight::Int8(w) = &**q {
            if !x2.track_op() && !w.training.load(std::sync::atomic::Ordering::SeqCst) {
                let n = x2.dim(0)?;
                let bias: Option<Vec<f32>> =
                    self.bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?;
                let y = with_f32(&x2, |xs| w.forward_lt(xs, n, bias.as_deref()))?;
                return Tensor::from_vec(y, (n, self.out_features), x2.device());
            }
            return super::matmul_quant::quant_linear(&x2, q, self.bias.as_ref(), false);
        }
        super::matmul_quant::quant_linear(&x2, q, self.bias.as_ref(), bf16)
    }

    /// The reference composition (candle matmul + broadcast_add, weight widened to x's dtype):
    /// autograd through it differentiates every argument, frozen or not. Used by tests.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.in_features))?; // [N, in]
        let w = self.dense_weight()?.to_dtype(x.dtype())?; // [out, in]
        let y = x2.matmul(&w.t()?)?; // [N, out]
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        y.reshape(out_dims)
    }

    /// Whether the tracked product can run as [`LinearOp`]: f32 CPU input, f32 (dense) or bf16
    /// (`Weight::Bf16`) CPU weight, f32 bias.
    fn fused_ok(&self, x: &Tensor) -> bool {
        let w_ok = match &self.weight {
            Weight::Dense(w) => w.dtype() == DType::F32 && w.device().is_cpu(),
            Weight::Autocast { w, .. } => matches!(w.dtype(), DType::F32 | DType::BF16) && w.device().is_cpu(),
            Weight::Bf16(w) | Weight::PackedBf16 { w, .. } => w.dtype() == DType::BF16 && w.device().is_cpu(),
            Weight::Quant { .. } => false,
        };
        let b_ok = self.bias.as_ref().is_none_or(|b| b.dtype() == DType::F32 && b.device().is_cpu());
        x.dtype() == DType::F32 && x.device().is_cpu() && w_ok && b_ok
    }

    /// The stored weight [out, in]; None for a quantized one (see [`Self::dense_weight`]).
    pub fn weight_tensor(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) | Weight::Bf16(w) | Weight::PackedBf16 { w, .. } | Weight::Autocast { w, .. } => Some(w),
            Weight::Quant { .. } => None,
        }
    }

    /// The weight [out, in] as a tensor: the stored one, or a quantized one dequantized to f32 (a
    /// temporary copy: merging, DoRA norms, references).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) | Weight::Bf16(w) | Weight::PackedBf16 { w, .. } | Weight::Autocast { w, .. } => {
                Ok(w.clone())
            }
            Weight::Quant { q, .. } => {
                Tensor::from_vec(q.dequantize(), (self.out_features, self.in_features), &candle_core::Device::Cpu)
            }
        }
    }
}

/// x: [N, in] f32, w: [out, in] bf16 -> [N, out] f32: the skinny kernel for few rows (decoding),
/// blockwise widening + gemm for many (prefill).
fn bf16_matmul(x: &Tensor, w: &Tensor, out: usize, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let bias: Option<Vec<f32>> = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?; // [out]
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let y = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
            let w: &[u16] = v[a..b].reinterpret_cast();
            with_f32(x, |xs| {
                if n <= GEMV_MAX_ROWS {
                    let mut y = super::matmul_bf16_skinny::gemv_bf16(xs, n, k, w, out);
                    if let Some(b) = &bias {
                        y.chunks_mut(out.max(1)).for_each(|r| r.iter_mut().zip(b).for_each(|(y, b)| *y += b));
                    }
                    y
                } else {
                    super::matmul_bf16_skinny::matmul_bf16_wide(xs, n, k, w, out, bias.as_deref())
                }
            })?
        }
        _ => candle_core::bail!("skinny bf16 matmul needs a contiguous bf16 CPU weight"),
    };
    Tensor::from_vec(y, (n, out), x.device())
}

// ---------------------------------------------------------------------------------------------
// Tracked linear: y = x W^T + b with a backward that skips untracked (frozen) arguments.

/// The weight of a [`LinearOp`] argument: f32 values or bf16 bits, [out, in] row-major.
enum WSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

fn w_arg<'a>(s: &'a CpuStorage, l: &Layout) -> Result<WSlice<'a>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(WSlice::F32(&v[a..b])),
        (CpuStorage::BF16(v), Some((a, b))) => Ok(WSlice::Bf16(v[a..b].reinterpret_cast())),
        _ => candle_core::bail!("linear: the CPU kernel needs a contiguous f32 or bf16 weight"),
    }
}

/// Rows of a bf16 weight widened at once in the backward (bounds the f32 scratch to ~8 MB).
const WIDEN_BLOCK_ELEMS: usize = 1 << 21;

/// y [N, out] = x [N, in] W^T (+ b): gemm for f32 weights, the bf16 kernels of `matmul_bf16_skinny` for bf16 ones.
fn linear_fwd_kernel(x: &[f32], n: usize, k: usize, w: &WSlice, out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    match w {
        WSlice::F32(w) => {
            let mut y = vec![0f32; n * out]; // [N, out]
            if let Some(b) = bias {
                y.par_chunks_mut(out.max(1)).for_each(|r| r.copy_from_slice(b));
            }
            // SAFETY: y is [n, out] row-major; x is [n, k] row-major; W^T is read from W [out, k]
            // with row stride 1 and column stride k.
            unsafe {
                gemm::gemm(
                    n,
                    out,
                    k,
                    y.as_mut_ptr(),
                    1,
                    out as isize,
                    bias.is_some(),
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
            y
        }
        WSlice::Bf16(w) => {
            let mut y = if n <= GEMV_MAX_ROWS {
                super::matmul_bf16_skinny::gemv_bf16(x, n, k, w, out)
            } else {
                super::matmul_bf16_skinny::matmul_bf16_wide(x, n, k, w, out, None)
            };
            if let Some(b) = bias {
                y.par_chunks_mut(out.max(1)).for_each(|r| r.iter_mut().zip(b).for_each(|(y, b)| *y += b));
            }
            y
        }
    }
}

/// dx [N, in] = g [N, out] W [out, in]. A bf16 weight is widened block of rows by block of rows into
/// a scratch buffer and the blocks' products accumulate in dx.
fn linear_dx_kernel(g: &[f32], n: usize, k: usize, w: &WSlice, out: usize) -> Vec<f32> {
    let mut dx = vec![0f32; n * k]; // [N, in]
    match w {
        WSlice::F32(w) => unsafe {
            // SAFETY: dx [n, k], g [n, out], W [out, k], all row-major and of those sizes.
            gemm::gemm(
                n,
                k,
                out,
                dx.as_mut_ptr(),
                1,
                k as isize,
                false,
                g.as_ptr(),
                1,
                out as isize,
                w.as_ptr(),
                1,
                k as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        },
        WSlice::Bf16(w) => {
            let rows = (WIDEN_BLOCK_ELEMS / k.max(1)).clamp(1, out.max(1));
            let mut scratch = vec![0f32; rows * k]; // [rows, in]
            let mut o0 = 0;
            while o0 < out {
                let ob = rows.min(out - o0);
                scratch[..ob * k].par_chunks_mut(4096).zip(w[o0 * k..(o0 + ob) * k].par_chunks(4096)).for_each(
                    |(d, s)| {
                        d.iter_mut().zip(s).for_each(|(d, &b)| *d = f32::from_bits((b as u32) << 16));
                    },
                );
                // SAFETY: dx [n, k]; lhs is the [n, ob] column block g[:, o0..o0+ob] (row stride out);
                // rhs is scratch [ob, k] row-major.
                unsafe {
                    gemm::gemm(
                        n,
                        k,
                        ob,
                        dx.as_mut_ptr(),
                        1,
                        k as isize,
                        o0 > 0,
                        g.as_ptr().add(o0),
                        1,
                        out as isize,
                        scratch.as_ptr(),
                        1,
                        k as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism(),
                    );
                }
                o0 += ob;
            }
        }
    }
    dx
}

/// dW [out, in] = g^T [out, N] x [N, in].
fn linear_dw_kernel(g: &[f32], x: &[f32], n: usize, k: usize, out: usize) -> Vec<f32> {
    let mut dw = vec![0f32; out * k];
    // SAFETY: dw [out, k] row-major; g^T is read from g [n, out] (row stride 1, column stride out);
    // x [n, k] row-major.
    unsafe {
        gemm::gemm(
            out,
            k,
            n,
            dw.as_mut_ptr(),
            1,
            k as isize,
            false,
            g.as_ptr(),
            out as isize,
            1,
            x.as_ptr(),
            1,
            k as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
    dw
}

/// db [out] = sum over rows of g [N, out].
fn linear_db_kernel(g: &[f32], n: usize, out: usize) -> Vec<f32> {
    let rows = rows_per_task(n, out);
    g.par_chunks(rows * out.max(1))
        .map(|c| {
            let mut acc = vec![0f32; out];
            for r in c.chunks_exact(out) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .reduce(
            || vec![0f32; out],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// y = x W^T (+ b) as a custom op on (x [N, in], W [out, in] f32 or bf16[, b [out] f32]).
/// Its backward returns a gradient only for the tracked arguments. With `packed` (the weight of
/// [`Weight::Autocast`]), the forward product runs on the packed bf16 weight (x rounded to bf16, as the
/// untracked pass does, so tracked and untracked passes compute the same numbers); the backward uses
/// the f32 weight.
struct LinearOp {
    packed: Option<Arc<matmul_bf16_packed::PackedBf16>>,
}

impl LinearOp {
    fn forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(xs, xl, "linear")?; // [N, in]
        let w = w_arg(ws, wl)?; // [out, in]
        let (n, k) = xl.shape().dims2()?;
        let (out, k2) = wl.shape().dims2()?;
        if k != k2 || b.is_some_and(|b| b.len() != out) {
            candle_core::bail!(
                "linear: x {:?}, weight {:?}, bias {:?} do not match",
                xl.shape(),
                wl.shape(),
                b.map(|b| b.len())
            );
        }
        let y = match &self.packed {
            Some(p) if p.in_features() == k && p.out_features() == out => {
                let mut y = matmul_bf16_packed::matmul_packed(x, n, k, p); // [N, out]
                if let Some(b) = b {
                    y.par_chunks_mut(out.max(1)).for_each(|r| r.iter_mut().zip(b).for_each(|(y, b)| *y += b));
                }
                y
            }
            Some(p) => candle_core::bail!(
                "linear: packed weight [{}, {}] does not match weight {:?}",
                p.out_features(),
                p.in_features(),
                wl.shape()
            ),
            None => linear_fwd_kernel(x, n, k, &w, out, b),
        };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    /// (dx, dW, db), each only where its argument is tracked.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let out = w.dim(0)?;
        let dev = x.device();
        let g = g.contiguous()?; // [N, out]
        let dx = if x.track_op() {
            let w = w.contiguous()?;
            let (ws, wl) = w.storage_and_layout();
            let ws = match &*ws {
                Storage::Cpu(s) => s,
                _ => candle_core::bail!("linear: the CPU backward needs a CPU weight"),
            };
            let wsl = w_arg(ws, wl)?;
            let dx = with_f32(&g, |g| linear_dx_kernel(g, n, k, &wsl, out))?;
            Some(Tensor::from_vec(dx, (n, k), dev)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = with_f32(&g, |g| with_f32(x, |x| linear_dw_kernel(g, x, n, k, out)))??;
            Some(Tensor::from_vec(dw, (out, k), dev)?.to_dtype(w.dtype())?)
        } else {
            None
        };
        let db = match b {
            Some(b) if b.track_op() => {
                Some(Tensor::from_vec(with_f32(&g, |g| linear_db_kernel(g, n, out))?, out, dev)?.to_dtype(b.dtype())?)
            }
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(xs, xl, ws, wl, None)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, None, g)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bias"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = f32_arg(bs, bl, "linear")?;
        self.forward(xs, xl, ws, wl, Some(b))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, Some(b), g)
    }
}

/// x [N, in] f32 CPU, w [out, in] f32 or bf16, b [out] f32 -> [N, out] through [`LinearOp`]
/// (`packed`: see there).
fn linear_tracked(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    packed: Option<Arc<matmul_bf16_packed::PackedBf16>>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let op = LinearOp { packed };
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}
