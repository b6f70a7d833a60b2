//! Where a model runs: the CPU, or a GPU in a build with the `cuda` or `metal` feature.
//!
//! Models always load on the CPU (the loaders read, check and convert there) and then move
//! whole to the chosen device ([`crate::LoadedModel::to_device`]). Analyses read results back
//! as plain vectors, so everything after the forward pass is the same on every device.

use candle_core::{Device, DeviceLocation};

use crate::{Error, Result};

/// The device `spec` names: `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`. A GPU this build
/// was not compiled for, or that is not there, fails with a one-line reason.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((kind, n)) => (
            kind,
            n.parse::<usize>().map_err(|_| {
                Error::InvalidInput(format!("`{spec}`: the device number must be 0, 1, …"))
            })?,
        ),
        None => (spec.as_str(), 0),
    };
    match kind {
        "cpu" if ordinal == 0 => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Device::new_cuda(ordinal)
            .map_err(|e| Error::InvalidInput(format!("cannot open CUDA device {ordinal}: {e}"))),
        "metal" if cfg!(feature = "metal") => Device::new_metal(ordinal)
            .map_err(|e| Error::InvalidInput(format!("cannot open Metal device {ordinal}: {e}"))),
        "cuda" | "metal" => Err(Error::InvalidInput(format!(
            "this build has no {kind} support: rebuild with `cargo build --release --features {kind}`"
        ))),
        _ => Err(Error::InvalidInput(format!(
            "unknown device `{spec}` (cpu, cuda, cuda:N, metal or metal:N)"
        ))),
    }
}

/// The devices this build can use, as [`parse_device`] names them (GPUs are listed by kind;
/// whether one is present shows when it is opened).
pub fn compiled_devices() -> Vec<&'static str> {
    let mut devices = vec!["cpu"];
    if cfg!(feature = "cuda") {
        devices.push("cuda:0");
    }
    if cfg!(feature = "metal") {
        devices.push("metal:0");
    }
    devices
}

/// `cpu`, `cuda:N` or `metal:N`: the name [`parse_device`] reads back.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_read_back() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!(device_name(&parse_device(" CPU ").unwrap()), "cpu");
        for bad in ["gpu", "cuda:x", "cpu:1", ""] {
            let e = parse_device(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert_eq!(compiled_devices()[0], "cpu");
    }
}
