//! Idefics3 connector: pixel shuffle (space-to-depth by `scale_factor`) then a Linear without bias.

use candle_core::{Result as CResult, Tensor};

use super::LoadCtx;
use crate::checkpoint::WeightStore;
use crate::error::{input_err, CheckpointError, Result};
use crate::ops::Linear;

#[derive(Debug, Clone)]
pub struct Connector {
    pub scale_factor: usize,
    /// [s*s*D_vision] -> [D_text]
    pub proj: Linear,
}

impl Connector {
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        vision_dim: usize,
        text_dim: usize,
        scale_factor: usize,
        ctx: &LoadCtx,
    ) -> Result<Self, CheckpointError> {
        let in_f = vision_dim * scale_factor * scale_factor;
        let proj = Linear::load(store, &format!("{prefix}.modality_projection.proj"), in_f, text_dim, false, ctx)?;
        Ok(Connector { scale_factor, proj })
    }

    /// x: [F, Np, D] -> [F, Np/s^2, D_text]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, np, _) = x.dims3()?;
        let side = (np as f64).sqrt().round() as usize;
        if side * side != np || !side.is_multiple_of(self.scale_factor) {
            return input_err(format!(
                "the connector needs a square patch grid divisible by scale_factor {}; got {np} patches per frame",
                self.scale_factor
            ));
        }
        Ok(self.proj.forward(&pixel_shuffle(x, self.scale_factor)?)?)
    }
}

/// Space-to-depth as transformers writes it: output token (I, J) on the (N/s)^2 grid holds, at
/// feature (m*s + k)*D + d, channel d of patch (I*s + m, J*s + k).
/// x: [F, N*N, D] -> [F, (N/s)^2, D*s*s]
pub fn pixel_shuffle(x: &Tensor, s: usize) -> CResult<Tensor> {
    let (f, seq, d) = x.dims3()?;
    let n = (seq as f64).sqrt().round() as usize;
    let x = x.reshape((f, n, n / s, d * s))?; // [F, N(h), N/s(w), s*D]
    let x = x.permute((0, 2, 1, 3))?; // [F, N/s(w), N(h), s*D]
    let x = x.reshape((f, n / s, n / s, d * s * s))?; // [F, N/s(w), N/s(h), s*s*D]
    let x = x.permute((0, 2, 1, 3))?; // [F, N/s(h), N/s(w), s*s*D]
    x.reshape((f, seq / (s * s), d * s * s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The documented index rule, checked element by element.
    #[test]
    fn pixel_shuffle_index_rule() {
        let (n, s, d) = (4usize, 2usize, 3usize);
        let v: Vec<f32> = (0..n * n * d).map(|i| i as f32).collect();
        let x = Tensor::from_vec(v, (1, n * n, d), &Device::Cpu).unwrap();
        let y = pixel_shuffle(&x, s).unwrap().to_vec3::<f32>().unwrap();
        for (t, row) in y[0].iter().enumerate() {
            let (bi, bj) = (t / (n / s), t % (n / s));
            for m in 0..s {
                for k in 0..s {
                    for c in 0..d {
                        let patch = (bi * s + m) * n + (bj * s + k);
                        assert_eq!(row[(m * s + k) * d + c], (patch * d + c) as f32);
                    }
                }
            }
        }
    }
}
