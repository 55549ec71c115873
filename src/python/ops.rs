//! Bindings of `crate::ops`: what the kernels detected on this CPU.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::ops::simd::CpuFeatures;

/// The CPU's instruction-set extensions the kernels choose by (`avx2`, `fma`, `avx512f`, `avx512bf16`,
/// `amx`: AMX tiles usable, see `ops::matmul_bf16_amx::amx_usable`),
/// and the kernel each product runs (`f32_matmul`, `bf16_matmul`).
#[pyfunction]
fn cpu_features(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let f = CpuFeatures::detect();
    let d = PyDict::new(py);
    d.set_item("avx2", f.avx2)?;
    d.set_item("fma", f.fma)?;
    d.set_item("avx512f", f.avx512f)?;
    d.set_item("avx512bf16", f.avx512bf16)?;
    d.set_item("amx", f.amx)?;
    for (k, v) in f.kernels() {
        d.set_item(k, v)?;
    }
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    Ok(())
}
