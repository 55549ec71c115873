//! The SigLIP encoder layers in f32, for inference (nothing tracked by autograd): the f32 twin of
//! `vision_fast` (the bf16 compute mode's), on plain buffers reused across layers:
//!   xa  = layer_norm1(hs)                                   [N, D]
//!   qkv = [bq | bk | bv] + xa @ [Wq | Wk | Wv]^T             [N, 3D]  three gemms into one buffer,
//!                                                                     accumulating onto the biases
//!   att = attention(q, k, v)                                [N, D]   read in place, no head transposes
//!   hs += bo + att @ Wo^T                                   [N, D]   in place
//!   xa  = layer_norm2(hs)
//!   mid = gelu_tanh(b1 + xa @ W1^T)                         [N, I]   GELU in place
//!   hs += b2 + mid @ W2^T
//! The same arithmetic as `VisionLayer::forward` up to the order of float sums (the bias is added
//! before the products instead of after): tested against it below. Weights stored in bf16
//! (`Weight::Bf16`, a bf16 checkpoint run in f32) are widened to f32 one matrix at a time.

use candle_core::{DType, Result as CResult, Tensor};

use super::vision::VisionLayer;
use super::{check, Interrupt};
use crate::error::Result;
use crate::ops::activation::gelu_tanh_inplace;
use crate::ops::attention_qkv_f32::attention_qkv_f32;
use crate::ops::cpu::{gemm_into, parallelism, with_f32, Mat};
use crate::ops::linear::Weight;
use crate::ops::norm::layer_norm_into;
use crate::ops::Linear;

fn untracked_f32_cpu(t: &Tensor) -> bool {
    crate::ops::fused_f32(t) && !t.track_op()
}

/// The stored weight [out, in] of a Linear this path can use: f32 or bf16 on the CPU, no adapter.
fn plain_weight(l: &Linear) -> Option<&Tensor> {
    match (&l.weight, &l.adapter) {
        (Weight::Dense(w), None) if w.dtype() == DType::F32 => Some(w),
        (Weight::Bf16(w), None) if w.dtype() == DType::BF16 => Some(w),
        _ => None,
    }
}

/// Whether [`encoder_layers`] can run `layers` on x [F, Np, D]: f32 CPU input, every Linear an f32
/// (or bf16-stored) CPU weight without adapter, nothing tracked, matching shapes.
pub(crate) fn usable(layers: &[VisionLayer], x: &Tensor, heads: usize) -> bool {
    let Ok((_, _, d)) = x.dims3() else { return false };
    if !untracked_f32_cpu(x) || heads == 0 || d % heads != 0 {
        return false;
    }
    layers.iter().all(|l| {
        let lin_ok = |lin: &Linear, i: usize, o: Option<usize>| {
            plain_weight(lin)
                .is_some_and(|w| !w.track_op() && crate::ops::fused_on(w.device()) && w.dims() == [lin.out_features, i])
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

/// y [N, ld] columns col0..col0 + out (+)= a [N, in] W^T + b for `l` (checked by [`usable`]): the
/// bias is written (or added, when `accumulate`) first, then the product accumulates onto it.
fn linear_into(l: &Linear, a: &[f32], y: &mut [f32], ld: usize, col0: usize, accumulate: bool) -> CResult<()> {
    let (k, out) = (l.in_features, l.out_features);
    let n = a.len() / k.max(1);
    let w = plain_weight(l).ok_or_else(|| candle_core::Error::Msg("vision f32 fast path: unusable Linear".into()))?;
    let rows = y.chunks_mut(ld).take(n);
    match &l.bias {
        Some(b) => with_f32(b, |b| {
            rows.for_each(|r| {
                let r = &mut r[col0..col0 + out];
                if accumulate {
                    r.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                } else {
                    r.copy_from_slice(b);
                }
            })
        })?,
        None if !accumulate => rows.for_each(|r| r[col0..col0 + out].fill(0.0)),
        None => {}
    }
    with_f32(w, |w| {
        let y = &mut y[col0..];
        gemm_into(y, ld, (n, out, k), Mat::rows(a, k), Mat::transposed(w, k), true, parallelism())
    })
}

fn vals(t: &Tensor) -> CResult<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// x [F, Np, D] through `layers` (checked by [`usable`]); `key_valid` [F * Np] hides keys.
pub(crate) fn encoder_layers(
    layers: &[VisionLayer],
    heads: usize,
    x: &Tensor,
    key_valid: Option<&[bool]>,
    interrupt: Interrupt,
) -> Result<Tensor> {
    let (f, np, d) = x.dims3()?;
    let (n, hd) = (f * np, d / heads);
    let inter = layers.first().map_or(0, |l| l.fc1.out_features);
    let scale = (hd as f64).powf(-0.5) as f32;
    let mut hs = vals(x)?; // [N, D] residual stream
    let mut xa = vec![0f32; n * d]; // [N, D]
    let mut qkv = vec![0f32; n * 3 * d]; // [N, 3D]
    let mut att = vec![0f32; n * d]; // [N, D]
    let mut mid = vec![0f32; n * inter]; // [N, I]
    let mut clock = crate::trace::Phases::new("vision layers f32");
    for l in layers {
        check(interrupt)?;
        let (ln1, ln2) = (&l.layer_norm1, &l.layer_norm2);
        layer_norm_into(&hs, &vals(&ln1.weight)?, &vals(&ln1.bias)?, ln1.eps as f32, &mut xa);
        clock.mark("norms");
        for (i, lin) in [&l.q_proj, &l.k_proj, &l.v_proj].into_iter().enumerate() {
            linear_into(lin, &xa, &mut qkv, 3 * d, i * d, false)?;
        }
        clock.mark("qkv");
        attention_qkv_f32(&qkv, f, heads, hd, key_valid, scale, &mut att);
        clock.mark("attention");
        linear_into(&l.out_proj, &att, &mut hs, d, 0, true)?;
        clock.mark("out_proj");
        layer_norm_into(&hs, &vals(&ln2.weight)?, &vals(&ln2.bias)?, ln2.eps as f32, &mut xa);
        clock.mark("norms");
        linear_into(&l.fc1, &xa, &mut mid, inter, 0, false)?;
        clock.mark("fc1");
        gelu_tanh_inplace(&mut mid);
        clock.mark("gelu");
        linear_into(&l.fc2, &mid, &mut hs, d, 0, true)?;
        clock.mark("fc2");
    }
    Ok(Tensor::from_vec(hs, (f, np, d), x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::no_interrupt;
    use crate::ops::Mask;
    use candle_core::Device;
    use std::sync::Arc;

    fn rand_layer(d: usize, inter: usize, bf16_stored: bool) -> VisionLayer {
        crate::model::vision::rand_layer(d, inter, |w, b| {
            let mut l = Linear::new(w.clone(), Some(b)).unwrap();
            if bf16_stored {
                l.weight = Weight::Bf16(w.to_dtype(DType::BF16).unwrap());
            }
            l
        })
    }

    #[test]
    fn fused_f32_layers_match_the_unfused_layers() {
        let (f, np, d, heads, inter) = (2, 37, 48, 3, 80);
        for bf16_stored in [false, true] {
            let layers: Vec<VisionLayer> = (0..2).map(|_| rand_layer(d, inter, bf16_stored)).collect();
            let x = Tensor::randn(0f32, 1.0, (f, np, d), &Device::Cpu).unwrap();
            assert!(usable(&layers, &x, heads));
            let kv: Vec<bool> = (0..f * np).map(|i| i < np || i % 3 != 0).collect();
            for key_valid in [None, Some(kv)] {
                let mask = Mask { causal: false, key_valid: key_valid.clone().map(Arc::new) };
                let mut want = x.clone();
                for l in &layers {
                    want = l.forward(&want, &mask, heads).unwrap();
                }
                let got = encoder_layers(&layers, heads, &x, key_valid.as_deref(), &no_interrupt).unwrap();
                let (a, b) = (vals(&got).unwrap(), vals(&want).unwrap());
                let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(err < 2e-5, "bf16-stored {bf16_stored}: max abs diff {err}");
            }
        }
    }

    #[test]
    fn tracked_input_adapter_or_packed_weights_keep_other_paths() {
        let layers = vec![rand_layer(16, 32, false)];
        let x = Tensor::randn(0f32, 1.0, (1, 5, 16), &Device::Cpu).unwrap();
        assert!(usable(&layers, &x, 2));
        let v = candle_core::Var::from_tensor(&x).unwrap();
        assert!(!usable(&layers, v.as_tensor(), 2), "tracked input");
        assert!(!usable(&layers, &x, 3), "16 is not a multiple of 3 heads");
        let mut packed = rand_layer(16, 32, false);
        packed.fc1 = Linear::bf16_compute(Tensor::zeros((32, 16), DType::F32, &Device::Cpu).unwrap(), None).unwrap();
        if packed.fc1.is_bf16_compute() {
            assert!(!usable(&[packed], &x, 2), "a packed bf16 Linear belongs to the bf16 path");
        } else {
            // Without AVX512-BF16 the bf16 compute mode keeps a plain bf16 weight, run here in f32.
            assert!(usable(&[packed], &x, 2), "a bf16-stored Linear without packing runs in f32");
        }
    }
}
