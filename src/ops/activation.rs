//! Activations.

use candle_core::{Result, Tensor};

/// GELU with the tanh approximation (`gelu_pytorch_tanh`):
/// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
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
    fn gelu_tanh_matches_formula() {
        let xs = [-3.0f32, -1.0, -0.1, 0.0, 0.5, 2.0, 4.0];
        let t = Tensor::new(&xs, &Device::Cpu).unwrap();
        let got = gelu_tanh(&t).unwrap().to_vec1::<f32>().unwrap();
        for (x, g) in xs.iter().zip(got) {
            let x = *x as f64;
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!((g as f64 - want).abs() < 1e-6, "{x}: {g} vs {want}");
        }
    }
}
