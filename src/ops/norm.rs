//! Normalisations, computed in f32 whatever the storage dtype (like transformers).

use candle_core::{DType, Result, Tensor, D};

/// Llama RMSNorm: x / sqrt(mean(x^2) + eps) in f32, cast back to x's dtype, times `weight`.
/// x: [.., H], weight: [H].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?; // [.., H]
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
    let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dt)?.broadcast_mul(weight)
}

/// LayerNorm with bias over the last dim, statistics in f32 (biased variance, like torch).
/// x: [.., D], weight, bias: [D].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?; // [.., D]
    let mean = xf.mean_keepdim(D::Minus1)?; // [.., 1]
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let w = weight.to_dtype(DType::F32)?;
    let b = bias.to_dtype(DType::F32)?;
    y.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_zero_mean_unit_var() {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let y = layer_norm(&x, &w, &b, 0.0).unwrap().to_vec2::<f32>().unwrap();
        let m: f32 = y[0].iter().sum::<f32>() / 4.0;
        let v: f32 = y[0].iter().map(|a| a * a).sum::<f32>() / 4.0;
        assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = Tensor::new(&[[1.0f32, -2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 1.0, 1.0, 2.0], &Device::Cpu).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap().to_vec2::<f32>().unwrap();
        let rms = ((1.0 + 4.0 + 9.0 + 36.0) / 4.0f32).sqrt();
        assert!((y[0][0] - 1.0 / rms).abs() < 1e-6 && (y[0][3] - 12.0 / rms).abs() < 1e-5);
    }
}
