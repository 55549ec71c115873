//! Python bindings: the native module `ferrovlm._core`. One submodule per core module.

use pyo3::prelude::*;

mod checkpoint;
mod compose;
mod config;
mod data;
mod errors;
mod generate;
mod lora;
mod model;
mod ops;
mod train;

/// glibc malloc tuned for ferrovlm's large, short-lived buffers, unless the environment tunes it:
/// - one arena for the process (`MALLOC_ARENA_MAX`): ferrovlm's calls run on rayon's worker threads
///   (`errors::detached`), and glibc gives each thread that allocates its own arena, whose freed blocks
///   other threads do not reuse: the README demo's peak RSS was 4.1 GB with per-thread arenas, 2.8 GB
///   with one, at the same speed;
/// - blocks up to 1 GiB from the heap, not from `mmap`, and up to 1 GiB of free heap top kept
///   (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`): glibc maps any block above 32 MiB afresh
///   and unmaps it on free, so every activation or gradient buffer of a training step (a [4096, 3072]
///   f32 block is 48 MiB) paid page faults and the kernel's zeroing again: 16% of a full fine-tuning
///   step's time (perf) on an AMD EPYC, with the same peak RSS once reused.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let unset = |name: &str| std::env::var_os(name).is_none();
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        const GIB: libc::c_int = 1 << 30;
        for (param, env, tunable, value) in [
            (libc::M_ARENA_MAX, "MALLOC_ARENA_MAX", "arena_max", 1),
            (libc::M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "mmap_threshold", GIB),
            (libc::M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "trim_threshold", GIB),
        ] {
            if unset(env) && !tunables.contains(&format!("glibc.malloc.{tunable}")) {
                // SAFETY: mallopt takes two integers and changes only the allocator's tuning.
                unsafe { libc::mallopt(param, value) };
            }
        }
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    tune_malloc();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    checkpoint::register(m)?;
    config::register(m)?;
    model::register(m)?;
    compose::register(m)?;
    ops::register(m)?;
    generate::register(m)?;
    data::register(m)?;
    lora::register(m)?;
    train::register(m)?;
    Ok(())
}
