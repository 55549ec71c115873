//! Activations. `gelu_tanh` runs a parallel f32 kernel on the CPU (candle's unary ops are
//! single-threaded) and candle's composition elsewhere; both compute the same formula.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::f32_arg;
use super::math::exp_f32;

pub(crate) const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// 0.5 x (1 + tanh(u)) == x / (1 + exp(-2u)): one exp instead of a (slower) tanh.
#[inline]
pub(crate) fn gelu_tanh_scalar(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * u))
}

/// d/dx of [`gelu_tanh_scalar`]: with t = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
/// f = x t and f' = t + x t (1 - t) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2).
#[inline]
fn gelu_tanh_grad_scalar(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let t = 1.0 / (1.0 + exp_f32(-2.0 * u));
    t + x * t * (1.0 - t) * 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
}

/// sigmoid(x) (0 for x below about -88.7, where exp overflows to inf).
#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

const CHUNK: usize = 4096;

/// Runs `body` compiled for AVX-512 when the CPU has it, else for AVX2 (AMD's Zen 3 and older Intel
/// parts): the element loops it inlines then vectorise 16 or 8 lanes wide instead of SSE2's 4. Each
/// element still goes through the same IEEE operations in the same order (Rust does not contract to
/// FMA), so the results are bit for bit those of the plain build.
#[inline(always)]
fn wide<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512() {
        #[target_feature(enable = "avx512f")]
        unsafe fn run<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        // SAFETY: the CPU supports avx512f (checked just above).
        return unsafe { run(body) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2() {
        #[target_feature(enable = "avx2")]
        unsafe fn run2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        // SAFETY: the CPU supports avx2 (checked just above).
        return unsafe { run2(body) };
    }
    body()
}

/// out[i] = f(a[i]) in parallel chunks.
fn map1(a: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(o, a)| wide(|| o.iter_mut().zip(a).for_each(|(o, &a)| *o = f(a))));
    out
}

/// out[i] = f(a[i], b[i]) in parallel chunks.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
        wide(|| o.iter_mut().zip(a).zip(b).for_each(|((o, &a), &b)| *o = f(a, b)));
    });
    out
}

/// out[i] = f(a[i], b[i], c[i]) in parallel chunks.
fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).zip(c.par_chunks(CHUNK)).for_each(
        |(((o, a), b), c)| {
            wide(|| o.iter_mut().zip(a).zip(b).zip(c).for_each(|(((o, &a), &b), &c)| *o = f(a, b, c)));
        },
    );
    out
}

fn check_same_shape(op: &str, a: &Layout, b: &Layout) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", a.shape(), b.shape());
    }
    Ok(())
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(s, l, "gelu-tanh")?;
        Ok((CpuStorage::F32(map1(x, gelu_tanh_scalar)), l.shape().clone()))
    }
    /// dx = g * gelu'(x)
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluTanhGrad)?))
    }
}

/// (x, g) -> g * gelu'(x), both [..] f32.
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        check_same_shape("gelu-tanh-grad", l1, l2)?;
        let (x, g) = (f32_arg(s1, l1, "gelu-tanh-grad")?, f32_arg(s2, l2, "gelu-tanh-grad")?);
        Ok((CpuStorage::F32(map2(x, g, |x, g| g * gelu_tanh_grad_scalar(x))), l1.shape().clone()))
    }
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`):
/// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). f32 on the CPU runs a parallel kernel with a
/// hand-written backward; other inputs run [`gelu_tanh_reference`].
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if super::fused_f32(x) {
        x.contiguous()?.apply_op1(GeluTanh)
    } else {
        gelu_tanh_reference(x)
    }
}

/// [`gelu_tanh`]'s f32 kernel in place (same arithmetic), for fused inference layers.
pub fn gelu_tanh_inplace(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(|c| wide(|| c.iter_mut().for_each(|v| *v = gelu_tanh_scalar(*v))));
}

/// candle's composition (tanh approximation).
pub fn gelu_tanh_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// SiLU: x * sigmoid(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// SwiGLU gate of the Llama MLP: silu(gate) * up. gate, up: [.., I] (same shape).
/// f32 on the CPU runs a fused kernel with a hand-written backward (each gradient only for a
/// tracked argument); other inputs run [`swiglu_reference`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f32_cpu = super::fused_f32;
    if f32_cpu(gate) && f32_cpu(up) && gate.shape() == up.shape() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
    } else {
        swiglu_reference(gate, up)
    }
}

/// candle composition of [`swiglu`].
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// y = silu(gate) up = gate s up, s = sigmoid(gate).
/// Backward: dgate = g up s (1 + gate (1 - s)),  dup = g gate s.
struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        check_same_shape("swiglu", l1, l2)?;
        let (gate, up) = (f32_arg(s1, l1, "swiglu")?, f32_arg(s2, l2, "swiglu")?); // [.., I]
        Ok((CpuStorage::F32(map2(gate, up, |a, u| a * sigmoid(a) * u)), l1.shape().clone()))
    }
    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dgate = if gate.track_op() { Some(gate.apply_op3_no_bwd(up, &g, &SwigluGradGate)?) } else { None };
        let dup = if up.track_op() { Some(gate.apply_op2_no_bwd(&g, &SwigluGradUp)?) } else { None };
        Ok((dgate, dup))
    }
}

/// (gate, up, g) -> g up s (1 + gate (1 - s))
struct SwigluGradGate;

impl CustomOp3 for SwigluGradGate {
    fn name(&self) -> &'static str {
        "swiglu-grad-gate"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_same_shape("swiglu-grad-gate", l1, l2)?;
        check_same_shape("swiglu-grad-gate", l1, l3)?;
        let n = "swiglu-grad-gate";
        let (a, u, g) = (f32_arg(s1, l1, n)?, f32_arg(s2, l2, n)?, f32_arg(s3, l3, n)?);
        let out = map3(a, u, g, |a, u, g| {
            let s = sigmoid(a);
            g * u * s * (1.0 + a * (1.0 - s))
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// (gate, g) -> g silu(gate)
struct SwigluGradUp;

impl CustomOp2 for SwigluGradUp {
    fn name(&self) -> &'static str {
        "swiglu-grad-up"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        check_same_shape("swiglu-grad-up", l1, l2)?;
        let (a, g) = (f32_arg(s1, l1, "swiglu-grad-up")?, f32_arg(s2, l2, "swiglu-grad-up")?);
        Ok((CpuStorage::F32(map2(a, g, |a, g| g * a * sigmoid(a))), l1.shape().clone()))
    }
}

/// log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), with the exact derivative sigmoid(-x) (a
/// composition of relu and abs would take a wrong one-sided derivative at x = 0, where DPO starts).
struct LogSigmoid;

impl CustomOp1 for LogSigmoid {
    fn name(&self) -> &'static str {
        "log-sigmoid"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_arg(s, l, "log-sigmoid")?;
        let y = x.iter().map(|&x| x.min(0.0) - (-x.abs()).exp().ln_1p()).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // d/dx log sigmoid(x) = sigmoid(-x) = 1 / (1 + exp(x))
        let s = (x.exp()? + 1.0)?.recip()?;
        Ok(Some((g * s)?))
    }
}

/// Reference composition of log sigmoid, differentiable everywhere with candle's autograd (the GPU's
/// path): -log(1 + e^-x) where x >= 0, x - log(1 + e^x) below, each branch fed only its own side's
/// values so that neither exponential overflows. The derivative at 0 is sigmoid(0) = 1/2 as in the
/// fused op (DPO's first step, policy = reference, sits exactly there).
pub fn log_sigmoid_reference(x: &Tensor) -> Result<Tensor> {
    let pos = x.ge(&x.zeros_like()?)?; // [..] u8
    let zeros = x.zeros_like()?;
    let xp = pos.where_cond(x, &zeros)?; // x >= 0 or 0
    let xn = pos.where_cond(&zeros, x)?; // x < 0 or 0
    let a = ((xp.neg()?.exp()? + 1.0)?.log()?).neg()?;
    let b = (&xn - (xn.exp()? + 1.0)?.log()?)?;
    pos.where_cond(&a, &b)
}

/// log sigmoid(x) elementwise (f32), with the exact derivative: the fused op where it runs
/// (`ops::fused_on`), else [`log_sigmoid_reference`].
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    if super::fused_on(x.device()) {
        x.contiguous()?.apply_op1(LogSigmoid)
    } else {
        log_sigmoid_reference(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_diff, max_rel_err, to_f64};
    use candle_core::{Device, Var};

    /// The kernels' loops run AVX-512 builds of the scalar functions ([`wide`]): bit for bit the scalar
    /// results, on every length (tails included).
    #[test]
    fn wide_loops_give_the_scalar_bits() {
        let xs: Vec<f32> = (0..9000).map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0).collect();
        let ys: Vec<f32> = xs.iter().map(|x| x * 0.37 - 1.0).collect();
        let g = map1(&xs, gelu_tanh_scalar);
        let s = map2(&xs, &ys, |a, b| a * sigmoid(a) * b);
        for i in 0..xs.len() {
            assert_eq!(g[i].to_bits(), gelu_tanh_scalar(xs[i]).to_bits(), "gelu at {}", xs[i]);
            assert_eq!(s[i].to_bits(), (xs[i] * sigmoid(xs[i]) * ys[i]).to_bits(), "swiglu at {}", xs[i]);
        }
    }

    #[test]
    fn gelu_tanh_matches_formula_and_reference() {
        let xs = [-3.0f32, -1.0, -0.1, 0.0, 0.5, 2.0, 4.0];
        let t = Tensor::new(&xs, &Device::Cpu).unwrap();
        let got = gelu_tanh(&t).unwrap().to_vec1::<f32>().unwrap();
        let reference = gelu_tanh_reference(&t).unwrap().to_vec1::<f32>().unwrap();
        for ((x, g), r) in xs.iter().zip(got).zip(reference) {
            let x = *x as f64;
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!((g as f64 - want).abs() < 1e-6, "{x}: {g} vs {want}");
            assert!((g - r).abs() < 1e-6);
        }
    }

    #[test]
    fn log_sigmoid_value_and_gradient_including_zero() {
        let xs = [-30.0f32, -2.0, -0.5, 0.0, 0.5, 3.0, 40.0];
        let x = Var::from_tensor(&Tensor::new(&xs, &Device::Cpu).unwrap()).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let r = log_sigmoid_reference(x.as_tensor()).unwrap();
        for (a, b) in to_f64(&y).unwrap().iter().zip(to_f64(&r).unwrap()) {
            assert!((a - b).abs() < 1e-6);
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        let got = to_f64(g.get(x.as_tensor()).unwrap()).unwrap();
        let want: Vec<f64> = xs.iter().map(|&x| 1.0 / (1.0 + (x as f64).exp())).collect();
        assert!(max_rel_err(&got, &want, 1e-12) < 1e-5, "{got:?} vs {want:?}");
        assert!((got[3] - 0.5).abs() < 1e-7);
        let fd = finite_diff(
            &|t| log_sigmoid(t)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>(),
            &Tensor::new(&[-0.5f32, 0.0, 0.5], &Device::Cpu).unwrap(),
            1e-2,
        )
        .unwrap();
        assert!(max_rel_err(&fd, &want[2..5], 1e-3) < 1e-2);
        // The reference composition (what a GPU runs, with candle's autograd) has the same gradient,
        // 1/2 at 0 included, and stays finite at both ends.
        let gr = r.sum_all().unwrap().backward().unwrap();
        let got_r = to_f64(gr.get(x.as_tensor()).unwrap()).unwrap();
        assert!(max_rel_err(&got_r, &want, 1e-12) < 1e-5, "{got_r:?} vs {want:?}");
        assert!((got_r[3] - 0.5).abs() < 1e-7);
    }
}
