//! The one place where core errors become Python exceptions, and panics are stopped at the border.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyException, PyKeyboardInterrupt};
use pyo3::prelude::*;

use crate::error::{CheckpointError as CoreCheckpointError, Error};

pyo3::create_exception!(ferrovlm, FerroVLMError, PyException, "Base class of every ferrovlm error.");
pyo3::create_exception!(
    ferrovlm,
    ConfigError,
    FerroVLMError,
    "A config file is missing, unreadable or holds a bad value."
);
pyo3::create_exception!(
    ferrovlm,
    CheckpointError,
    FerroVLMError,
    "A weight file is missing, corrupt, or lacks/mis-shapes a tensor."
);
pyo3::create_exception!(
    ferrovlm,
    ModelNotCachedError,
    CheckpointError,
    "A hub id is not in the local Hugging Face cache."
);
pyo3::create_exception!(
    ferrovlm,
    InputError,
    FerroVLMError,
    "The inputs of a call are malformed (shapes, ids, image-token counts)."
);
pyo3::create_exception!(
    ferrovlm,
    ProcessorError,
    FerroVLMError,
    "Images, text or chat templates that cannot be turned into model inputs."
);
pyo3::create_exception!(
    ferrovlm,
    DeviceError,
    FerroVLMError,
    "A device this build or machine cannot give: CUDA on a build without the `cuda` feature, or without a driver or GPU."
);
pyo3::create_exception!(ferrovlm, InternalError, FerroVLMError, "A bug in ferrovlm: please report it.");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FerroVLMError", py.get_type::<FerroVLMError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("ModelNotCachedError", py.get_type::<ModelNotCachedError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("ProcessorError", py.get_type::<ProcessorError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}

pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Checkpoint(CoreCheckpointError::NotCached { .. }) => ModelNotCachedError::new_err(msg),
        // Corrupt, unsupported or mistyped GGUF files are checkpoint errors like safetensors ones.
        Error::Checkpoint(
            CoreCheckpointError::Gguf { .. }
            | CoreCheckpointError::GgufUnsupported { .. }
            | CoreCheckpointError::GgufMetadata { .. },
        ) => CheckpointError::new_err(msg),
        Error::Checkpoint(_) => CheckpointError::new_err(msg),
        Error::Input(_) => InputError::new_err(msg),
        Error::Data(_) => ProcessorError::new_err(msg),
        Error::Device(_) => DeviceError::new_err(msg),
        Error::Tensor(_) => InternalError::new_err(msg),
        Error::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
    }
}

/// Runs `f`, turning a core error into its Python class and a panic into `InternalError`.
pub fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_py),
        Err(p) => {
            let what = crate::error::panic_message(&*p).unwrap_or_else(|| "unknown panic".into());
            Err(InternalError::new_err(format!("internal error (please report): {what}")))
        }
    }
}

/// How often the waiting caller checks for Ctrl-C while `f` runs on a worker (see [`detached`]).
const SIGNAL_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Runs `f` without the GIL, with errors and panics converted; `f`'s interrupt flag turns true after
/// Ctrl-C (checked between layers and steps).
///
/// `f` runs on a rayon worker thread, so that every parallel loop inside it is started from within
/// the pool (the caller's thread takes part and no cross-thread wake-up and sleep is needed per loop:
/// decoding starts hundreds per token). The calling thread, the main one for Python's signal
/// handlers, waits for the result and checks for signals every [`SIGNAL_POLL`]. Called from a worker
/// already (a Python callback inside a ferrovlm call calling ferrovlm again), `f` runs in place and
/// polls the signals itself.
pub fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(&(dyn Fn() -> bool + Sync)) -> Result<T, Error> + Send,
) -> PyResult<T> {
    if rayon::current_thread_index().is_some() {
        let interrupt = || Python::attach(|py| py.check_signals().is_err());
        return py.detach(|| guard(|| f(&interrupt)));
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let interrupt = || stop.load(std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rayon::in_place_scope(|s| {
        s.spawn(|_| {
            // The receiver lives until a result arrives, so the send cannot fail.
            let _ = tx.send(guard(|| f(&interrupt)));
        });
        let mut rx = rx;
        loop {
            let (back, got) = py.detach(move || {
                let got = rx.recv_timeout(SIGNAL_POLL);
                (rx, got)
            });
            rx = back;
            match got {
                Ok(result) => return result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if py.check_signals().is_err() {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(InternalError::new_err(
                        "internal error (please report): a worker ended without a result",
                    ));
                }
            }
        }
    })
}
