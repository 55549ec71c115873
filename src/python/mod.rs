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

/// One malloc arena for the process (glibc), unless `MALLOC_ARENA_MAX` says otherwise: ferrovlm's
/// calls run on rayon's worker threads (`errors::detached`), and glibc gives each thread that allocates
/// its own arena, whose freed blocks other threads do not reuse: the README demo's peak RSS was 4.1 GB
/// with per-thread arenas, 2.8 GB with one, at the same speed.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt takes two integers and changes only the allocator's tuning.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    one_malloc_arena();
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
