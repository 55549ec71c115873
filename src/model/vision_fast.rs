//! The SigLIP encoder layers in the bf16 compute mode, for inference (nothing tracked by autograd).
//!
//! Same layer as `VisionLayer::forward`, on plain buffers reused across layers:
//!   xa  = bf16(layer_norm1(hs))                                   [N, D]   bf16 rows
//!   qkv = bf16(xa @ [Wq | Wk | Wv]^T + [bq | bk | bv])            [N, 3D]  one gemm call
//!   att = bf16(attention(q, k, v))   (bf16 products, f32 softmax)  [N, D]   no head transposes
//!   hs += att @ Wo^T + bo                                         [N, D]   f32, in place
//!   xa  = bf16(layer_norm2(hs))
//!   mid = bf16(gelu_tanh(xa @ W1^T + b1))                         [N, I]
//!   hs += mid @ W2^T + b2
//! Differs from the unfused bf16 mode only by where values are rounded to bf16: q, k, v and the
//! attention probabilities are now rounded too (tested against the unfused layer below).

use candle_core::{Result as CResult, Tensor};

use super::vision::VisionLayer;
use super::{check, Interrupt};
use crate::error::Result;
use crate::ops::attention_bf16::{attention_qkv_bf16, attention_qkv_bf16_portable};
use crate::ops::bf16::Bf16Rows;
use crate::ops::linear::Weight;
use crate::ops::matmul_bf16_fused::{gemm_fused, gemm_fused_portable, Job, Out};
use crate::ops::matmul_bf16_packed::PackedBf16;
use crate::ops::norm::layer_norm_bf16;
use crate::ops::Linear;

/// The packed bf16 weight of a layer without adapter: the bf16 compute mode's, or the copy of
/// `bf16=True` training ([`Weight::Autocast`]). (In the bf16 compute mode a model that carries adapters
/// has no packed weights at all, see `crate::lora::attach`: every pass then takes the unfused layers,
/// whose arithmetic the tracked training pass shares.)
fn packed(l: &Linear) -> Option<&PackedBf16> {
    match (&l.weight, &l.adapter) {
        (Weight::PackedBf16 { packed, .. } | Weight::Autocast { packed, .. }, None) => Some(packed),
        _ => None,
    }
}

fn untracked_f32_cpu(t: &Tensor) -> bool {
    crate::ops::fused_f32(t) && !t.track_op()
}

/// Whether [`encoder_layers`] can run `layers` on x [F, Np, D]: f32 CPU input, every Linear packed
/// for the bf16 compute mode without adapter, nothing tracked, an even head dim, matching shapes.
pub(crate) fn usable(layers: &[VisionLayer], x: &Tensor, heads: usize) -> bool {
    let Ok((_, _, d)) = x.dims3() else { return false };
    if !untracked_f32_cpu(x) || heads == 0 || d % heads != 0 || !(d / heads).is_multiple_of(2) {
        return false;
    }
    layers.iter().all(|l| {
        let lin_ok = |lin: &Linear, i: usize, o: Option<usize>| {
            packed(lin).is_some()
                && lin.weight_tensor().is_some_and(|w| !w.track_op())
                && lin.in_features == i
                && o.is_none_or(|o| lin.out_features == o)
                && lin.bias.as_ref().is_none_or(|b| untracked_f32_cpu(b) && b.dims() == [lin.out_features])
        };
        let ln_ok =
            |n: &super::vision::LayerNorm| [&n.weight, &n.bias].iter().all(|t| untracked_f32_cpu(t) && t.dims() == [d]);
        [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj].iter().all(|lin| lin_ok(lin, d, Some(d)))
            && lin_ok(&l.fc1, d, None)
            && lin_ok(&l.fc2, l.fc1.out_features, Some(d))
            && ln_ok(&l.layer_norm1)
            && ln_ok(&l.layer_norm2)
    })
}

fn gemm(portable: bool, a: &Bf16Rows, jobs: &[Job], gelu: bool, out: Out) {
    if portable {
        gemm_fused_portable(a, jobs, gelu, out)
    } else {
        gemm_fused(a, jobs, gelu, out)
    }
}

fn vals(t: &Tensor) -> CResult<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn bias(l: &Linear) -> CResult<Option<Vec<f32>>> {
    l.bias.as_ref().map(vals).transpose()
}

fn weight(l: &Linear) -> CResult<&PackedBf16> {
    packed(l).ok_or_else(|| {
        candle_core::Error::Msg("vision fast path: a Linear is not packed for the bf16 compute mode".into())
    })
}

/// x [F, Np, D] through `layers` (checked by [`usable`]); `key_valid` [F * Np] hides keys.
/// `portable` forces the portable kernels (tests).
pub(crate) fn encoder_layers(
    layers: &[VisionLayer],
    heads: usize,
    x: &Tensor,
    key_valid: Option<&[bool]>,
    interrupt: Interrupt,
    portable: bool,
) -> Result<Tensor> {
    let (f, np, d) = x.dims3()?;
    let (n, hd) = (f * np, d / heads);
    let inter = layers.first().map_or(0, |l| l.fc1.out_features);
    let scale = (hd as f64).powf(-0.5) as f32;
    let mut hs = vals(x)?; // [N, D] residual stream
    let mut xa = Bf16Rows::zeros(n, d); // [N, D]
    let mut qkv = Bf16Rows::zeros(n, 3 * d); // [N, 3D]
    let mut att = Bf16Rows::zeros(n, d); // [N, D]
    let mut mid = Bf16Rows::zeros(n, inter); // [N, I]
    for l in layers {
        check(interrupt)?;
        let (ln1, ln2) = (&l.layer_norm1, &l.layer_norm2);
        layer_norm_bf16(&hs, &vals(&ln1.weight)?, &vals(&ln1.bias)?, ln1.eps as f32, &mut xa);
        let (bq, bk, bv) = (bias(&l.q_proj)?, bias(&l.k_proj)?, bias(&l.v_proj)?);
        let jobs = [
            Job { w: weight(&l.q_proj)?, bias: bq.as_deref(), col0: 0 },
            Job { w: weight(&l.k_proj)?, bias: bk.as_deref(), col0: d },
            Job { w: weight(&l.v_proj)?, bias: bv.as_deref(), col0: 2 * d },
        ];
        gemm(portable, &xa, &jobs, false, Out::Bf16(&mut qkv));
        if portable {
            attention_qkv_bf16_portable(&qkv, f, heads, hd, key_valid, scale, &mut att);
        } else {
            attention_qkv_bf16(&qkv, f, heads, hd, key_valid, scale, &mut att);
        }
        let bo = bias(&l.out_proj)?;
        gemm(
            portable,
            &att,
            &[Job { w: weight(&l.out_proj)?, bias: bo.as_deref(), col0: 0 }],
            false,
            Out::F32 { y: &mut hs, ld: d, accumulate: true },
        );
        layer_norm_bf16(&hs, &vals(&ln2.weight)?, &vals(&ln2.bias)?, ln2.eps as f32, &mut xa);
        let b1 = bias(&l.fc1)?;
        gemm(portable, &xa, &[Job { w: weight(&l.fc1)?, bias: b1.as_deref(), col0: 0 }], true, Out::Bf16(&mut mid));
        let b2 = bias(&l.fc2)?;
        gemm(
            portable,
            &mid,
            &[Job { w: weight(&l.fc2)?, bias: b2.as_deref(), col0: 0 }],
            false,
            Out::F32 { y: &mut hs, ld: d, accumulate: true },
        );
    }
    Ok(Tensor::from_vec(hs, (f, np, d), x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::no_interrupt;
    use crate::ops::{matmul_bf16_packed, Mask};
    use candle_core::Device;
    use std::sync::Arc;

    fn rand_layer(d: usize, inter: usize) -> VisionLayer {
        crate::model::vision::rand_layer(d, inter, |w, b| Linear::bf16_compute(w, Some(b)).unwrap())
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let (a, b) = (vals(a).unwrap(), vals(b).unwrap());
        let d = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        (d, b.iter().fold(0f32, |m, x| m.max(x.abs())))
    }

    #[test]
    fn fused_vision_layers_match_the_unfused_bf16_layers() {
        if !matmul_bf16_packed::available() {
            return; // the layers are not packed: the model keeps the unfused path
        }
        let (f, np, d, heads, inter) = (2, 37, 128, 2, 256);
        let layers: Vec<VisionLayer> = (0..2).map(|_| rand_layer(d, inter)).collect();
        let x = Tensor::randn(0f32, 1.0, (f, np, d), &Device::Cpu).unwrap();
        let kv: Vec<bool> = (0..f * np).map(|i| i < np || i % 3 != 0).collect();
        assert!(usable(&layers, &x, heads));
        for key_valid in [None, Some(kv)] {
            let mask = Mask { causal: false, key_valid: key_valid.clone().map(Arc::new) };
            let mut want = x.clone();
            for l in &layers {
                want = l.forward(&want, &mask, heads).unwrap();
            }
            let fast = encoder_layers(&layers, heads, &x, key_valid.as_deref(), &no_interrupt, false).unwrap();
            let port = encoder_layers(&layers, heads, &x, key_valid.as_deref(), &no_interrupt, true).unwrap();
            let (e1, scale) = max_abs_diff(&fast, &want);
            let (e2, _) = max_abs_diff(&port, &want);
            let (e3, _) = max_abs_diff(&fast, &port);
            assert!(
                e1 <= 1.5e-2 * scale && e2 <= 1.5e-2 * scale && e3 <= 1e-2 * scale,
                "fast {e1}, portable {e2}, fast vs portable {e3}, scale {scale}"
            );
        }
    }

    #[test]
    fn tracked_input_or_adapter_keeps_the_unfused_path() {
        let layers = vec![rand_layer(64, 128)];
        let x = Tensor::randn(0f32, 1.0, (1, 5, 64), &Device::Cpu).unwrap();
        let v = candle_core::Var::from_tensor(&x).unwrap();
        assert!(!usable(&layers, v.as_tensor(), 1));
        assert!(!usable(&layers, &x, 3), "64 is not a multiple of 3 heads");
    }
}
