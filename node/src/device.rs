//! Choosing where tensors live: `--device cpu|metal|cuda|auto`.

use anyhow::Context as _;
use candle_core::Device;

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
