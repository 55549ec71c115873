//! Scaled dot-product attention with grouped-query heads.
//!
//! Two versions of the same op: [`attention_reference`] composes candle primitives (readable, with
//! autograd) and materialises [B, H, L, S] scores; [`attention`] dispatches f32 CPU inputs to the fused
//! kernel in `attention_f32.rs`, which works one (batch, head) at a time in parallel and never holds
//! more than one [L, S] score matrix per thread. Tests check that the two agree.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

/// Which keys a query may see.
#[derive(Debug, Clone, Default)]
pub struct Mask {
    /// Query i (at absolute position S - L + i) sees keys j <= S - L + i.
    pub causal: bool,
    /// [B * S] row-major: false hides key j of batch row b.
    pub key_valid: Option<Arc<Vec<bool>>>,
}

impl Mask {
    pub fn none() -> Self {
        Mask::default()
    }

    /// Additive bias [B, 1, L, S]: 0 where allowed, f32::MIN where not (finite, like transformers'
    /// eager path, so fully masked rows stay finite).
    pub fn additive(&self, b: usize, l: usize, s: usize, device: &Device) -> Result<Option<Tensor>> {
        if !self.causal && self.key_valid.is_none() {
            return Ok(None);
        }
        let mut m = vec![0f32; b * l * s];
        for bi in 0..b {
            for i in 0..l {
                for j in 0..s {
                    if !self.allowed(bi, i, j, l, s) {
                        m[(bi * l + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, l, s), device)?))
    }

    #[inline]
    pub fn allowed(&self, b: usize, i: usize, j: usize, l: usize, s: usize) -> bool {
        (!self.causal || j + l <= i + s) && self.key_valid.as_ref().is_none_or(|kv| kv[b * s + j])
    }
}

/// The rule for a query whose keys are all hidden (a fully masked row: a padding query, or a frame
/// without valid patches): every key gets the same weight 1 / S, so the output is the mean of the values.
/// That is what transformers' eager attention gives with its finite additive `f32::MIN` mask (all
/// scores equal), and what [`attention_reference`] gives through [`Mask::additive`]. The kernels call
/// this with the row's largest visible score (`-inf` when no key is visible).
#[inline]
pub(crate) fn fully_masked_weight(max_visible_score: f32, keys: usize) -> Option<f32> {
    (max_visible_score == f32::NEG_INFINITY).then(|| 1.0 / keys as f32)
}

/// Numerically stable softmax over the last dim.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// q: [B, H, L, hd], k/v: [B, Hkv, S, hd] with H a multiple of Hkv -> [B, H, L, hd].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Result<Tensor> {
    if super::fused_f32(q) {
        super::attention_f32::fused_attention(q, k, v, mask, scale)
    } else {
        attention_reference(q, &k.contiguous()?, &v.contiguous()?, mask, scale)
    }
}

/// Reference composition: softmax(q k^T * scale + mask) v, softmax in f32.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Result<Tensor> {
    let (b, h, l, hd) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let groups = h / hkv;
    let dt = q.dtype();
    // Fold the query heads of a group into the row dim so that K/V need no copy:
    // [B, Hkv, G*L, hd] @ [B, Hkv, hd, S].
    let qg = q.contiguous()?.reshape((b, hkv, groups * l, hd))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?; // [B, Hkv, G*L, S]
    let scores = scores.to_dtype(DType::F32)?.reshape((b, h, l, s))?; // [B, H, L, S]
    let scores = match mask.additive(b, l, s, q.device())? {
        None => scores,
        Some(m) => scores.broadcast_add(&m)?,
    };
    let p = softmax_last(&scores)?.to_dtype(dt)?; // [B, H, L, S]
    let out = p.reshape((b, hkv, groups * l, s))?.matmul(&v.contiguous()?)?; // [B, Hkv, G*L, hd]
    out.reshape((b, h, l, hd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// GQA with head folding equals repeating each kv head for its query heads.
    #[test]
    fn reference_gqa_equals_repeated_kv() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 4, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev).unwrap();
        let mask = Mask { causal: true, key_valid: Some(Arc::new(vec![true, true, true, false, true, true])) };
        let got = attention_reference(&q, &k, &v, &mask, 0.3).unwrap();
        let rep = |t: &Tensor| {
            Tensor::cat(
                &[
                    t.narrow(1, 0, 1).unwrap(),
                    t.narrow(1, 0, 1).unwrap(),
                    t.narrow(1, 1, 1).unwrap(),
                    t.narrow(1, 1, 1).unwrap(),
                ],
                1,
            )
            .unwrap()
        };
        let (k4, v4) = (rep(&k), rep(&v));
        let m = mask.additive(2, 3, 3, &dev).unwrap().unwrap();
        let s = (q.matmul(&k4.t().unwrap()).unwrap() * 0.3).unwrap().broadcast_add(&m).unwrap();
        let want = softmax_last(&s).unwrap().matmul(&v4).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    /// The fused kernel equals the reference for causal, padded, GQA, cached (S > L) and plain cases.
    #[test]
    fn fused_equals_reference() {
        let dev = Device::Cpu;
        for (b, h, hkv, l, s, causal, pad) in [
            (2, 6, 2, 5, 5, true, true),
            (1, 4, 4, 7, 7, false, false),
            (3, 2, 1, 1, 9, true, true),
            (2, 3, 3, 4, 6, true, false),
            (2, 4, 4, 16, 16, false, true),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, h, l, 8), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, hkv, s, 8), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, hkv, s, 8), &dev).unwrap();
            let key_valid = pad.then(|| Arc::new((0..b * s).map(|i| i % s != 1).collect::<Vec<bool>>()));
            let mask = Mask { causal, key_valid };
            let want = attention_reference(&q, &k, &v, &mask, 0.35).unwrap();
            let got = attention(&q, &k, &v, &mask, 0.35).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "case b{b} h{h} hkv{hkv} l{l} s{s}");
        }
    }
}
