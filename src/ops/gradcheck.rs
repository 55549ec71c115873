//! Gradient checks shared by the ops' tests: central finite differences of a scalar function and a
//! comparison helper. Used by unit tests and by `tests/*.rs`; not on any compute path.

use candle_core::{DType, Result, Tensor};

/// d f / d x by central differences, one coordinate at a time, computed in f64 from f32 evaluations.
/// `f` maps a tensor shaped like `x` to a scalar. Returns a Vec in row-major order of `x`.
pub fn finite_diff(f: &dyn Fn(&Tensor) -> Result<f64>, x: &Tensor, eps: f64) -> Result<Vec<f64>> {
    let base: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut v = base.clone();
        v[i] = (base[i] as f64 + eps) as f32;
        let hi = f(&Tensor::from_vec(v.clone(), x.shape(), x.device())?.to_dtype(x.dtype())?)?;
        v[i] = (base[i] as f64 - eps) as f32;
        let lo = f(&Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)?;
        out.push((hi - lo) / (2.0 * eps));
    }
    Ok(out)
}

/// Weighted sum sum(y * w) as f64: turns a tensor output into a scalar whose gradient is `w`.
pub fn weighted_sum(y: &Tensor, w: &Tensor) -> Result<f64> {
    (y.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Largest |a - b| / (atol + |b|) over both slices; panics on a length mismatch (test helper).
pub fn max_rel_err(a: &[f64], b: &[f64], atol: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "gradient lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (atol + y.abs())).fold(0.0, f64::max)
}

/// A tensor's values as f64 (test helper).
pub fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}
