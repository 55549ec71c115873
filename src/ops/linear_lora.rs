//! A LoRA adapter on a frozen Linear as one autograd op (PEFT's `lora.Linear` without DoRA), for
//! training passes on the CPU:
//!   xd = x ⊙ m                      [N, in]    m: dropout's scaled keep mask, when dropout is active
//!   u  = xd A^T                     [N, r]
//!   y  = x W^T (+ b) + s u B^T      [N, out]   the adapter's product accumulated onto the base's
//! and its backward, from g = dL/dy [N, out]:
//!   gB = g B                        [N, r]
//!   dx = g W + s (gB A) ⊙ m         [N, in]    only when x is tracked
//!   dA = s gB^T xd                  [r, in]
//!   dB = s g^T u                    [out, r]
//! The reference is the composition `lora::Adapter::forward_reference` (the Linear, two matmuls, a
//! scale and a sum; the path of DoRA, quantized and GPU layers and of passes outside training), which
//! candle's autograd differentiates node by node, allocating each [N, out] intermediate (base, adapter
//! product, scaled product, sum) and each one's gradient; this op keeps two [N, r] buffers instead:
//! a LoRA training micro-batch of the text model ran about 10% faster (`examples/profile_train_step`).
//! The same products up to the order of float sums (`tests/ops_grad.rs`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::cpu::{f32_arg, gemm_scaled_into, parallelism, with_f32, Mat};
use super::linear::Weight;
use super::linear_op::{linear_dx_kernel, linear_fwd_kernel, w_arg};
use super::Linear;

struct LoraLinearOp {
    /// The frozen base weight [out, in], f32 or bf16 on the CPU.
    w: Tensor,
    /// The frozen bias [out] (f32), if any.
    bias: Option<Vec<f32>>,
    scaling: f32,
    /// Dropout's scaled keep mask [N * in] (0 or 1 / (1 - p)), when dropout is active.
    mask: Option<Arc<Vec<f32>>>,
}

impl LoraLinearOp {
    /// xd = x ⊙ m, borrowed when there is no mask.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => x.iter().zip(m.iter()).map(|(x, m)| x * m).collect::<Vec<f32>>().into(),
            None => x.into(),
        }
    }

    /// u = xd A^T [N, r]
    fn down(xd: &[f32], a: &[f32], n: usize, k: usize, r: usize) -> Vec<f32> {
        let mut u = vec![0f32; n * r];
        gemm_scaled_into(&mut u, r, (n, r, k), Mat::rows(xd, k), Mat::transposed(a, k), false, 1.0, parallelism());
        u
    }

    /// Runs `f` on the base weight's values ([`super::linear_op`]'s f32 or bf16 view).
    fn with_w<R>(&self, f: impl FnOnce(&super::linear_op::WSlice) -> R) -> Result<R> {
        let (s, l) = self.w.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok(f(&w_arg(c, l)?)),
            _ => candle_core::bail!("lora linear: the CPU kernel needs a CPU weight"),
        }
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) =
            (f32_arg(xs, xl, "lora linear")?, f32_arg(as_, al, "lora linear")?, f32_arg(bs, bl, "lora linear")?);
        let (n, k) = xl.shape().dims2()?;
        let (r, k2) = al.shape().dims2()?;
        let (out, r2) = bl.shape().dims2()?;
        let (wo, wi) = self.w.dims2()?;
        if k != k2 || r != r2 || (wo, wi) != (out, k) || self.mask.as_ref().is_some_and(|m| m.len() != n * k) {
            candle_core::bail!(
                "lora linear: x {:?}, A {:?}, B {:?}, W {:?} do not match",
                xl.shape(),
                al.shape(),
                bl.shape(),
                self.w.shape()
            );
        }
        let mut y = self.with_w(|w| linear_fwd_kernel(x, n, k, w, out, self.bias.as_deref()))?; // [N, out]
        let u = Self::down(&self.dropped(x), a, n, k, r); // [N, r]
        let s = self.scaling;
        gemm_scaled_into(&mut y, out, (n, out, r), Mat::rows(&u, r), Mat::transposed(b, r), true, s, parallelism());
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let (r, out) = (a.dim(0)?, b.dim(0)?);
        let dims = Dims { n, k, r, out };
        let want = [x.track_op(), a.track_op(), b.track_op()];
        let g = g.contiguous()?;
        let [dx, da, db] = with_f32(&g, |g| {
            with_f32(x, |x| with_f32(a, |a| with_f32(b, |b| self.backward(g, x, a, b, dims, want))))
        })?????;
        let dev = x.device();
        let tensor =
            |v: Option<Vec<f32>>, shape: (usize, usize)| v.map(|v| Tensor::from_vec(v, shape, dev)).transpose();
        Ok((tensor(dx, (n, k))?, tensor(da, (r, k))?, tensor(db, (out, r))?))
    }
}

/// The sizes of one [`LoraLinearOp`]: N rows, `k` = in, rank `r`, `out`.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    k: usize,
    r: usize,
    out: usize,
}

impl LoraLinearOp {
    /// [dx [N, in], dA [r, in], dB [out, r]] from g [N, out], each where `want` asks for it (see the
    /// module doc for the formulas).
    fn backward(
        &self,
        g: &[f32],
        x: &[f32],
        a: &[f32],
        b: &[f32],
        Dims { n, k, r, out }: Dims,
        want: [bool; 3],
    ) -> Result<[Option<Vec<f32>>; 3]> {
        let (s, par) = (self.scaling, parallelism());
        let xd = self.dropped(x);
        let mut gb = vec![0f32; n * r]; // g B [N, r]
        gemm_scaled_into(&mut gb, r, (n, r, out), Mat::rows(g, out), Mat::rows(b, r), false, 1.0, par);
        let dx = if want[0] {
            let mut dx = self.with_w(|w| linear_dx_kernel(g, n, k, w, out))?; // g W [N, in]
            match &self.mask {
                None => gemm_scaled_into(&mut dx, k, (n, k, r), Mat::rows(&gb, r), Mat::rows(a, k), true, s, par),
                Some(m) => {
                    let mut t = vec![0f32; n * k]; // s gB A [N, in]
                    gemm_scaled_into(&mut t, k, (n, k, r), Mat::rows(&gb, r), Mat::rows(a, k), false, s, par);
                    dx.iter_mut().zip(&t).zip(m.iter()).for_each(|((d, t), m)| *d += t * m);
                }
            }
            Some(dx)
        } else {
            None
        };
        let da = want[1].then(|| {
            let mut da = vec![0f32; r * k]; // s gB^T xd [r, in]
            gemm_scaled_into(&mut da, k, (r, k, n), Mat::transposed(&gb, r), Mat::rows(&xd, k), false, s, par);
            da
        });
        let db = want[2].then(|| {
            let u = Self::down(&xd, a, n, k, r); // [N, r]
            let mut db = vec![0f32; out * r]; // s g^T u [out, r]
            gemm_scaled_into(&mut db, r, (out, r, n), Mat::transposed(g, out), Mat::rows(&u, r), false, s, par);
            db
        });
        Ok([dx, da, db])
    }
}

/// lin(x) + s (x ⊙ m) A^T B^T through [`LoraLinearOp`], when it applies: x, A, B f32 on the CPU where the
/// fused kernels run, the base weight a frozen f32 or bf16 (`Weight::Bf16`) one, the bias frozen f32.
/// None otherwise (the caller composes, and `mask` is left to it; the op takes it only when it runs).
/// x: [.., in], A [r, in], B [out, r], mask [x.elem_count()].
pub(crate) fn lora_linear(
    lin: &Linear,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    mask: &mut Option<Vec<f32>>,
) -> Result<Option<Tensor>> {
    let w = match &lin.weight {
        Weight::Dense(w) if w.dtype() == DType::F32 => w,
        Weight::Bf16(w) if w.dtype() == DType::BF16 => w,
        _ => return Ok(None),
    };
    let cpu = |t: &Tensor| super::fused_f32(t);
    let bias_ok = lin.bias.as_ref().is_none_or(|b| cpu(b) && !b.track_op());
    if !(cpu(x) && cpu(a) && cpu(b) && super::fused_on(w.device()) && !w.track_op() && bias_ok) {
        return Ok(None);
    }
    let bias = lin.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
    let dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, lin.in_features))?.contiguous()?; // [N, in]
    let op = LoraLinearOp { w: w.contiguous()?, bias, scaling: scaling as f32, mask: mask.take().map(Arc::new) };
    let y = x2.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?; // [N, out]
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = lin.out_features;
    Ok(Some(y.reshape(out_dims)?))
}
