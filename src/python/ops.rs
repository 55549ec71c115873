//! Bindings of `crate::ops` and `crate::device`: what the kernels detected on this CPU, the switch that
//! forces the reference compositions, and which devices this build and machine give.

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

/// Whether the reference compositions are forced on the CPU (`FERROVLM_REFERENCE_OPS=1` or
/// [`set_reference_ops`]); see `ops::reference_ops`.
#[pyfunction]
fn reference_ops() -> bool {
    crate::ops::reference_ops()
}

/// Forces the reference compositions of candle primitives (what a GPU runs) on the CPU too (`true`), or
/// lets the fused CPU kernels run again (`false`), for the whole process.
#[pyfunction]
fn set_reference_ops(on: bool) {
    crate::ops::set_reference_ops(on)
}

/// Whether this build has the CUDA backend (the `cuda` cargo feature).
#[pyfunction]
fn cuda_built() -> bool {
    crate::device::cuda_built()
}

/// Whether cuda:0 opens here (a CUDA build, a driver and a GPU). Never raises.
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    py.detach(|| crate::device::open(crate::device::DeviceSpec::Cuda(0)).is_ok())
}

/// torch's name of the device `spec` ("cpu", "cuda", "cuda:N", "auto") opens to, e.g. "cuda:0"; a
/// `DeviceError` saying what is missing when it cannot be had.
#[pyfunction]
fn resolve_device(py: Python<'_>, spec: &str) -> PyResult<String> {
    let spec = spec.to_string();
    py.detach(|| super::errors::guard(|| Ok(crate::device::name(&crate::device::open(crate::device::parse(&spec)?)?))))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(reference_ops, m)?)?;
    m.add_function(wrap_pyfunction!(set_reference_ops, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_built, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_device, m)?)?;
    Ok(())
}
