//! Choosing where tensors live (`--device cpu|metal|cuda|auto`) and which code runs on
//! them (`HEARTH_COMPUTE`).

use anyhow::Context as _;
use candle_core::Device;
use hearth_models::{ComputePath, ModelSource};

/// An internal switch for the code that runs a node's stages: `native` (the CPU kernels)
/// or `candle-ops` (candle's operations, the path Metal and CUDA take), so that tests and
/// developers can run the GPU path on a CPU-only machine. Unset or empty, each device
/// takes its own path.
pub const COMPUTE_PATH_ENV: &str = "HEARTH_COMPUTE";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// Metal on a Mac built with it, else the CPU.
    Auto,
    Cpu,
    /// Apple GPUs (builds with the `metal` feature; on by default on macOS).
    Metal,
    /// NVIDIA GPUs (builds with the `cuda` feature).
    Cuda,
}

impl DeviceChoice {
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if candle_core::utils::metal_is_available() => {
                Device::new_metal(0).context("opening the Metal GPU")
            }
            Self::Auto => Ok(Device::Cpu),
            Self::Metal => Device::new_metal(0)
                .context("opening the Metal GPU (hearth must be built on macOS, or with `--features metal`)"),
            Self::Cuda => {
                Device::new_cuda(0).context("opening the CUDA GPU (hearth must be built with `--features cuda`)")
            }
        }
    }
}

/// Sets how many threads the CPU kernels use. Must run before the first tensor operation,
/// while the process is still single-threaded, because the pools read it once.
pub fn set_compute_threads(threads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(threads > 0, "--threads must be at least 1");
    for variable in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        std::env::set_var(variable, threads.to_string());
    }
    Ok(())
}

/// The compute path `HEARTH_COMPUTE` asks for, if any; an unknown value is an error that
/// names the ones there are.
pub fn compute_path_from_env() -> anyhow::Result<Option<ComputePath>> {
    match std::env::var(COMPUTE_PATH_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(value)) => {
            anyhow::bail!("{COMPUTE_PATH_ENV}={value:?} is not a compute path: use `native` or `candle-ops`")
        }
        Ok(value) => parse_compute_path(&value),
    }
}

fn parse_compute_path(value: &str) -> anyhow::Result<Option<ComputePath>> {
    match value.trim() {
        "" => Ok(None),
        "native" => Ok(Some(ComputePath::Native)),
        "candle-ops" => Ok(Some(ComputePath::CandleOps)),
        other => anyhow::bail!("{COMPUTE_PATH_ENV}=`{other}` is not a compute path: use `native` or `candle-ops`"),
    }
}

/// Makes `source` load its stages on the path `HEARTH_COMPUTE` asks for, if it asks.
pub fn apply_compute_path_from_env(source: &mut ModelSource) -> anyhow::Result<()> {
    if let Some(compute) = compute_path_from_env()? {
        tracing::info!(?compute, "{COMPUTE_PATH_ENV} picks the compute path");
        source.set_compute_path(compute);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_paths_parse_and_unknown_ones_are_named() {
        assert_eq!(parse_compute_path("native").unwrap(), Some(ComputePath::Native));
        assert_eq!(parse_compute_path("candle-ops").unwrap(), Some(ComputePath::CandleOps));
        assert_eq!(parse_compute_path("").unwrap(), None);
        let error = parse_compute_path("metal").unwrap_err().to_string();
        assert!(error.contains("`metal`") && error.contains("candle-ops"), "{error}");
    }
}
