//! Devices as transformers names them (`"cpu"`, `"cuda"`, `"cuda:1"`, `"auto"`), and whether this build
//! and this machine can give them.
//!
//! CUDA needs the `cuda` cargo feature (README, "CUDA build"); such a build opens the driver and the
//! CUDA libraries only when a CUDA device is asked for (cudarc's run-time loading), so it imports and
//! runs on the CPU of a machine without them. Everything that cannot be had is an
//! [`crate::error::Error::Device`] that says what is missing and how to get it, never a panic.

use candle_core::Device;

use crate::error::{Error, Result};

/// What a device string asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA device by ordinal (`"cuda"` is ordinal 0, as in torch).
    Cuda(usize),
    /// The first GPU where there is one, else the CPU (`device_map="auto"`).
    Auto,
}

/// Whether this build has the CUDA backend.
pub fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

fn device_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Device(msg.into()))
}

/// Parses `"cpu"`, `"cuda"`, `"cuda:N"`, `"auto"` (case and surrounding blanks ignored).
pub fn parse(spec: &str) -> Result<DeviceSpec> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => return Ok(DeviceSpec::Cpu),
        "cuda" => return Ok(DeviceSpec::Cuda(0)),
        "auto" => return Ok(DeviceSpec::Auto),
        _ => {}
    }
    if let Some(i) = s.strip_prefix("cuda:") {
        return match i.parse::<usize>() {
            Ok(i) => Ok(DeviceSpec::Cuda(i)),
            Err(_) => device_err(format!("device {spec:?}: the CUDA ordinal must be a number (\"cuda:0\")")),
        };
    }
    device_err(format!(
        "device {spec:?} is not supported: ferrovlm runs on \"cpu\" and, when built with CUDA, on \"cuda\" / \"cuda:N\" (or \"auto\")"
    ))
}

/// How to get a CUDA build (appended to the errors of a build without it).
#[cfg(not(feature = "cuda"))]
const HOW_TO_BUILD: &str = "this ferrovlm was built without CUDA (`pip install .` builds for the CPU only); \
build the wheel with the `cuda` feature as README's \"CUDA build\" says (nvcc from PyPI's nvidia-cuda-nvcc, \
`maturin build --release --features python,cuda`) and install it on the GPU machine";

/// The device `spec` names, opened. CUDA on a build without it, or without a driver or GPU, is an
/// [`Error::Device`] naming what is missing.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(open(DeviceSpec::Cuda(0)).unwrap_or(Device::Cpu)),
        DeviceSpec::Cuda(i) => open_cuda(i),
    }
}

/// The CUDA libraries that candle opens (by cudarc's names) and that cannot be loaded here, by what they are.
#[cfg(all(feature = "cuda", target_os = "linux"))]
fn missing_cuda_libs() -> Vec<&'static str> {
    let libs = [
        ("cuda", "the NVIDIA driver (libcuda.so.1)"),
        ("cublas", "cuBLAS (libcublas.so.13)"),
        ("cublasLt", "cuBLASLt (libcublasLt.so.13)"),
        ("curand", "cuRAND (libcurand.so.10)"),
        ("nvrtc", "NVRTC (libnvrtc.so.13)"),
    ];
    libs.iter()
        .filter(|(lib, _)| {
            !cudarc::get_lib_name_candidates(lib).iter().any(|name| {
                let Ok(c) = std::ffi::CString::new(name.as_str()) else { return false };
                // SAFETY: `c` is a NUL-terminated file name; the handle stays open (cudarc opens the same
                // library for the rest of the process when the device is created).
                !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }.is_null()
            })
        })
        .map(|(_, what)| *what)
        .collect()
}

#[cfg(all(feature = "cuda", not(target_os = "linux")))]
fn missing_cuda_libs() -> Vec<&'static str> {
    Vec::new()
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    // cudarc panics when a library is missing: look for them first, so that this is an error, not a panic.
    let missing = missing_cuda_libs();
    if !missing.is_empty() {
        return device_err(format!(
            "cuda:{ordinal}: this machine lacks {} (this ferrovlm was built with CUDA; it needs an NVIDIA driver and \
             the CUDA 13 libraries: the PyPI packages nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc or a CUDA \
             toolkit, with their lib folders on LD_LIBRARY_PATH)",
            missing.join(", ")
        ));
    }
    let r = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => device_err(format!(
            "cuda:{ordinal} could not be opened ({e}); check that the machine has an NVIDIA GPU with that \
             ordinal and a CUDA 13 driver (`nvidia-smi`), and that CUDA_VISIBLE_DEVICES does not hide it"
        )),
        Err(p) => {
            let what = crate::error::panic_message(&*p).unwrap_or_else(|| "unknown failure".into());
            device_err(format!(
                "cuda:{ordinal}: the CUDA driver or libraries could not be loaded ({what}); this needs an NVIDIA \
                 driver (libcuda.so.1) and the CUDA 13 libraries cuBLAS, cuRAND and NVRTC on the library path \
                 (the PyPI packages nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc, or a CUDA toolkit; \
                 add their lib folders to LD_LIBRARY_PATH)"
            ))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    device_err(format!("cuda:{ordinal} was asked for, but {HOW_TO_BUILD}"))
}

/// torch's name of a device: `"cpu"`, `"cuda:0"`.
pub fn name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("mps:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_torch_names() {
        assert_eq!(parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse(" CUDA ").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(parse("auto").unwrap(), DeviceSpec::Auto);
        for bad in ["cuda:x", "mps", "tpu:0", ""] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, Error::Device(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_and_auto_open_here() {
        assert!(open(DeviceSpec::Cpu).unwrap().is_cpu());
        // "auto" never fails: the GPU when there is one, else the CPU.
        let d = open(DeviceSpec::Auto).unwrap();
        assert_eq!(name(&d), if d.is_cpu() { "cpu" } else { "cuda:0" });
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = open(DeviceSpec::Cuda(0)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Device(_)));
        assert!(msg.contains("without CUDA") && msg.contains("--features python,cuda"), "{msg}");
    }
}
