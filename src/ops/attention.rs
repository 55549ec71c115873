//! Scaled dot-product attention with an additive mask and grouped-query heads (reference version:
//! materialises the [L, S] scores; a blocked version without them will sit next to it).

use candle_core::{DType, Result, Tensor, D};

/// Which keys a query may see.
#[derive(Debug, Clone)]
pub enum Mask {
    /// Every key.
    None,
    /// Additive bias broadcastable to [B, H, L, S]: 0 where allowed, f32::MIN where not
    /// (finite, so fully masked rows stay finite, like transformers' eager path).
    Additive(Tensor),
}

/// Numerically stable softmax over the last dim, in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// q: [B, H, L, hd], k/v: [B, Hkv, S, hd] with H a multiple of Hkv -> [B, H, L, hd].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Result<Tensor> {
    let (b, h, l, hd) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let groups = h / hkv;
    let dt = q.dtype();
    // Fold the query heads of a group into the row dim so that K/V need no copy:
    // [B, Hkv, G*L, hd] @ [B, Hkv, hd, S].
    let qg = q.reshape((b, hkv, groups * l, hd))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?; // [B, Hkv, G*L, S]
    let scores = scores.to_dtype(DType::F32)?.reshape((b, h, l, s))?; // [B, H, L, S]
    let scores = match mask {
        Mask::None => scores,
        Mask::Additive(m) => scores.broadcast_add(m)?,
    };
    let p = softmax_last(&scores)?.to_dtype(dt)?; // [B, H, L, S]
    let out = p.reshape((b, hkv, groups * l, s))?.matmul(&v.contiguous()?)?; // [B, Hkv, G*L, hd]
    out.reshape((b, h, l, hd))
}

/// Additive mask [B, 1, L, L]: causal, and key j hidden where `attention_mask[b, j] == 0`.
/// attention_mask: [B, L] (any int/float dtype).
pub fn causal_padding_mask(attention_mask: &Tensor) -> Result<Tensor> {
    let (b, l) = attention_mask.dims2()?;
    let keep: Vec<f32> = attention_mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut m = vec![0f32; b * l * l];
    for bi in 0..b {
        for i in 0..l {
            for j in 0..l {
                if j > i || keep[bi * l + j] == 0.0 {
                    m[(bi * l + i) * l + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, l, l), attention_mask.device())
}

/// Additive mask [B, 1, 1, S] hiding keys where `key_mask[b, j]` is false (bidirectional attention).
pub fn key_padding_mask(key_mask: &[Vec<bool>], device: &candle_core::Device) -> Result<Tensor> {
    let b = key_mask.len();
    let s = key_mask.first().map_or(0, Vec::len);
    let m: Vec<f32> = key_mask.iter().flat_map(|row| row.iter().map(|&k| if k { 0.0 } else { f32::MIN })).collect();
    Tensor::from_vec(m, (b, 1, 1, s), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// GQA with head folding equals repeating each kv head for its query heads.
    #[test]
    fn gqa_equals_repeated_kv() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 4, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev).unwrap();
        let mask = Mask::Additive(causal_padding_mask(&Tensor::new(&[[1u32, 1, 1], [0, 1, 1]], &dev).unwrap()).unwrap());
        let got = attention(&q, &k, &v, &mask, 0.3).unwrap();
        // reference: repeat kv heads (j // groups) and loop over heads
        let rep = |t: &Tensor| Tensor::cat(&[t.narrow(1, 0, 1).unwrap(), t.narrow(1, 0, 1).unwrap(), t.narrow(1, 1, 1).unwrap(), t.narrow(1, 1, 1).unwrap()], 1).unwrap();
        let (k4, v4) = (rep(&k), rep(&v));
        let Mask::Additive(m) = &mask else { unreachable!() };
        let s = (q.matmul(&k4.t().unwrap()).unwrap() * 0.3).unwrap().broadcast_add(m).unwrap();
        let want = softmax_last(&s).unwrap().matmul(&v4).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
