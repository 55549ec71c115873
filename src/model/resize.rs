//! `resize_token_embeddings` as transformers' `PreTrainedModel` does it (`modeling_utils.py`).
//!
//! - The new row count is `new_num_tokens` (the old one when None), rounded up to a multiple of
//!   `pad_to_multiple_of` when given. Rows `[0, min(old, new))` are kept; fewer rows truncate.
//! - `mean_resizing` (transformers' default): added rows are drawn from the multivariate normal with
//!   the old rows' mean and 1e-9 times their covariance (`cov = Xc^T Xc / old_rows`), when that
//!   covariance is positive definite; otherwise every added row is the mean. Without it, added rows
//!   are N(0, initializer_range) (the text config's, default 0.02).
//! - An untied `lm_head` is resized the same way from its own rows (its bias, if any, gets the old
//!   biases' mean plus N(0, 1e-9 * their std) noise); a tied one is the new embedding again.
//! - The text config's `vocab_size` becomes the new row count.
//!
//! The noise is seeded (one stream per matrix), not torch's stream. Its scale is sqrt(1e-9) of the
//! rows' spread, so added rows equal the mean to about 5 significant digits either way.

use candle_core::{DType, Tensor};

use super::init::{normal, stream, DEFAULT_INITIALIZER_RANGE};
use super::VlmModel;
use crate::error::{input_err, Result};
use crate::generate::Rng;
use crate::ops::linear::Weight;
use crate::ops::Linear;

/// transformers' scale of the covariance of mean-resized rows.
const COVARIANCE_SCALE: f64 = 1e-9;

/// How to resize (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct ResizeOptions {
    pub new_num_tokens: Option<usize>,
    pub pad_to_multiple_of: Option<usize>,
    pub mean_resizing: bool,
    pub seed: u64,
}

/// In-place Cholesky factorisation of the symmetric `n` x `n` matrix `a` (row-major): on success its
/// lower triangle holds L with a = L L^T (the upper triangle is zeroed). False when `a` is not
/// positive definite.
pub fn cholesky(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d.is_nan() || d <= 0.0 {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
        for k in j + 1..n {
            a[j * n + k] = 0.0;
        }
    }
    true
}

/// `added` new rows for the f32 matrix `old` [rows, dim] (see the module docs).
fn new_rows(old: &Tensor, added: usize, mean_resizing: bool, std: f64, rng: &mut Rng) -> Result<Vec<f32>> {
    let (rows, dim) = old.dims2()?;
    if !mean_resizing || rows == 0 {
        return Ok(normal(rng, added * dim, 0.0, std));
    }
    let mean = old.mean_keepdim(0)?; // [1, dim]
    let centered = old.broadcast_sub(&mean)?;
    let cov = (centered.t()?.matmul(&centered)? / rows as f64)?; // [dim, dim], f32 as torch computes it
    let mean: Vec<f32> = mean.flatten_all()?.to_vec1()?;
    let mut l: Vec<f64> = cov.flatten_all()?.to_vec1::<f32>()?.iter().map(|&c| c as f64 * COVARIANCE_SCALE).collect();
    if !cholesky(&mut l, dim) {
        return Ok((0..added).flat_map(|_| mean.iter().copied()).collect());
    }
    let mut out = Vec::with_capacity(added * dim);
    for _ in 0..added {
        let z = normal(rng, dim, 0.0, 1.0);
        for i in 0..dim {
            let row = &l[i * dim..i * dim + i + 1];
            let s: f64 = row.iter().zip(&z).map(|(a, &b)| a * b as f64).sum();
            out.push((mean[i] as f64 + s) as f32);
        }
    }
    Ok(out)
}

/// `old` [rows, dim] (any float dtype) with `n` rows, in f32.
pub fn resize_rows(old: &Tensor, n: usize, mean_resizing: bool, std: f64, rng: &mut Rng) -> Result<Tensor> {
    let old = old.to_dtype(DType::F32)?;
    let (rows, dim) = old.dims2()?;
    if n <= rows {
        return Ok(old.narrow(0, 0, n)?.contiguous()?);
    }
    let added = new_rows(&old, n - rows, mean_resizing, std, rng)?;
    let added = Tensor::from_vec(added, (n - rows, dim), old.device())?;
    Ok(Tensor::cat(&[&old, &added], 0)?)
}

/// `w` (f32 [out, in]) and `b` as a Linear held like `old` (dense in `dtype`, bf16-stored, or packed
/// for the bf16 compute mode); a quantized `old` becomes dense (its exact dequantized values).
pub fn relinear(old: &Linear, w: Tensor, b: Option<Tensor>, dtype: DType) -> Result<Linear> {
    Ok(match &old.weight {
        Weight::PackedBf16 { .. } => Linear::bf16_compute(w, b)?,
        Weight::Bf16(_) => Linear::with_compute_dtype(w.to_dtype(DType::BF16)?, b, dtype)?,
        _ => Linear::new(w.to_dtype(dtype)?, b)?,
    })
}

/// The output head tied to the embedding `embed`, as `VlmModel::load` builds it.
pub fn tied_head(embed: &Tensor, dtype: DType, bf16_compute: bool) -> Result<Linear> {
    Ok(if bf16_compute {
        Linear::bf16_compute(embed.clone(), None)?
    } else {
        Linear::with_compute_dtype(embed.clone(), None, dtype)?
    })
}

/// The text config's `initializer_range` (0.02 when absent).
pub fn text_initializer_range(model: &VlmModel) -> f64 {
    let raw = &model.config.raw;
    let text = if model.config.text_only() { Some(raw) } else { raw.get("text_config") };
    text.and_then(|t| t.get("initializer_range")).and_then(|v| v.as_f64()).unwrap_or(DEFAULT_INITIALIZER_RANGE)
}

/// Sets `vocab_size` in the text config (parsed and raw JSON).
fn set_vocab_size(model: &mut VlmModel, n: usize) {
    model.config.text.vocab_size = n;
    let text_only = model.config.text_only();
    let raw = &mut model.config.raw;
    let target = if text_only { Some(raw) } else { raw.get_mut("text_config") };
    if let Some(obj) = target.and_then(|t| t.as_object_mut()) {
        obj.insert("vocab_size".into(), n.into());
    }
}

/// Resizes the token embedding (and the output head) of `model` in place; returns the new row count.
pub fn resize_token_embeddings(model: &mut VlmModel, opts: &ResizeOptions) -> Result<usize> {
    let old_rows = model.text.embed_tokens.dim(0)?;
    let mut n = opts.new_num_tokens.unwrap_or(old_rows);
    if let Some(m) = opts.pad_to_multiple_of {
        if m == 0 {
            return input_err("pad_to_multiple_of must be a positive integer");
        }
        n = n.div_ceil(m) * m;
    }
    if n == 0 {
        return input_err("new_num_tokens must be at least 1");
    }
    if n == old_rows {
        return Ok(n);
    }
    if model.lm_head.adapter.is_some() {
        return input_err("cannot resize the token embeddings while lm_head has an adapter: merge_and_unload() first");
    }
    let std = text_initializer_range(model);
    let old = &model.text.embed_tokens;
    let store_dtype = old.dtype();
    let embed = resize_rows(old, n, opts.mean_resizing, std, &mut stream(opts.seed, "embed_tokens"))?;
    model.text.embed_tokens = embed.to_dtype(store_dtype)?;
    model.lm_head = if model.config.tie_word_embeddings {
        tied_head(&model.text.embed_tokens, model.dtype, model.bf16_compute)?
    } else {
        let head = &model.lm_head;
        let w = resize_rows(&head.dense_weight()?, n, opts.mean_resizing, std, &mut stream(opts.seed, "lm_head"))?;
        let bias = match &head.bias {
            None => None,
            Some(b) => Some(resize_bias(b, n, &mut stream(opts.seed, "lm_head.bias"))?),
        };
        relinear(head, w, bias, model.dtype)?
    };
    set_vocab_size(model, n);
    Ok(n)
}

/// transformers' `_init_added_lm_head_bias_with_mean`: added entries ~ N(mean, 1e-9 * std) of the old
/// biases (torch's unbiased std); fewer entries truncate.
fn resize_bias(b: &Tensor, n: usize, rng: &mut Rng) -> Result<Tensor> {
    let v: Vec<f32> = b.to_dtype(DType::F32)?.to_vec1()?;
    if n <= v.len() {
        return Ok(b.narrow(0, 0, n)?.contiguous()?);
    }
    let k = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / k.max(1.0);
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (k - 1.0).max(1.0);
    let mut out = v.clone();
    out.extend(normal(rng, n - v.len(), mean, 1e-9 * var.sqrt()));
    Ok(Tensor::from_vec(out, n, b.device())?.to_dtype(b.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cholesky_factors_and_refuses() {
        let mut a = vec![4.0, 2.0, 0.6, 2.0, 5.0, 1.5, 0.6, 1.5, 3.0];
        let orig = a.clone();
        assert!(cholesky(&mut a, 3));
        for i in 0..3 {
            for j in 0..3 {
                let s: f64 = (0..3).map(|k| a[i * 3 + k] * a[j * 3 + k]).sum();
                assert!((s - orig[i * 3 + j]).abs() < 1e-12);
            }
        }
        let mut singular = vec![1.0, 1.0, 1.0, 1.0];
        assert!(!cholesky(&mut singular, 2));
    }

    #[test]
    fn added_rows_are_the_mean_plus_tiny_noise() {
        let old = crate::model::init::normal_tensor(1, "old", &[200, 8], 0.5, &Device::Cpu).unwrap();
        let mean: Vec<f32> = old.mean(0).unwrap().to_vec1().unwrap();
        let new = resize_rows(&old, 205, true, 0.02, &mut stream(0, "e")).unwrap();
        assert_eq!(new.dims(), &[205, 8]);
        let rows: Vec<Vec<f32>> = new.to_vec2().unwrap();
        let keep: Vec<Vec<f32>> = old.to_vec2().unwrap();
        assert_eq!(&rows[..200], &keep[..]);
        for r in &rows[200..] {
            for (a, m) in r.iter().zip(&mean) {
                assert!((a - m).abs() < 1e-3, "{a} vs {m}");
            }
        }
        assert_ne!(rows[200], rows[201]); // noise, not the bare mean
                                          // rank-deficient rows (fewer rows than columns): exactly the mean
        let few = old.narrow(0, 0, 4).unwrap();
        let m4: Vec<f32> = few.mean(0).unwrap().to_vec1().unwrap();
        let r = resize_rows(&few, 6, true, 0.02, &mut stream(0, "e")).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(r[5], m4);
        // truncation and plain normal rows
        assert_eq!(resize_rows(&old, 10, true, 0.02, &mut stream(0, "e")).unwrap().dims(), &[10, 8]);
        let plain = resize_rows(&old, 1200, false, 0.02, &mut stream(0, "e")).unwrap();
        let (m, s) = crate::model::init::mean_std(&plain.narrow(0, 200, 1000).unwrap());
        assert!(m.abs() < 0.005 && (s - 0.02).abs() < 0.002, "{m} {s}");
    }

    #[test]
    fn bias_gets_mean() {
        let b = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let r: Vec<f32> = resize_bias(&b, 5, &mut stream(0, "b")).unwrap().to_vec1().unwrap();
        assert_eq!(&r[..3], &[1.0, 2.0, 3.0]);
        assert!((r[3] - 2.0).abs() < 1e-6 && (r[4] - 2.0).abs() < 1e-6);
    }
}
