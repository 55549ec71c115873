//! Activations. `gelu_tanh` runs a parallel f32 kernel on the CPU (candle's unary ops are
//! single-threaded) and candle's composition elsewhere; both compute the same formula.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::math::exp_f32;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// 0.5 x (1 + tanh(u)) == x / (1 + exp(-2u)): one exp instead of a (slower) tanh.
#[inline]
fn gelu_tanh_scalar(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * u))
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => bail!("gelu-tanh kernel needs contiguous f32"),
        };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, i)| {
            for (o, &i) in o.iter_mut().zip(i) {
                *o = gelu_tanh_scalar(i);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`):
/// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        x.contiguous()?.apply_op1(GeluTanh)
    } else {
        gelu_tanh_reference(x)
    }
}

/// candle's composition (tanh approximation).
pub fn gelu_tanh_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// SiLU: x * sigmoid(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
