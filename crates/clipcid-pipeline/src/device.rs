//! The compute device of a run, and where each stage puts its work on it.

use candle_core::{Device, DeviceLocation};

use crate::{input_error, PipelineError};

/// Parses `cpu` or `cuda:N` (`cuda` alone is `cuda:0`) and opens the device.
///
/// ```
/// let cpu = clipcid_pipeline::parse_device("cpu")?;
/// assert!(cpu.is_cpu());
/// assert!(clipcid_pipeline::parse_device("tpu").is_err());
/// if !cfg!(feature = "cuda") {
///     let e = clipcid_pipeline::parse_device("cuda:0").unwrap_err().to_string();
///     assert!(e.contains("built without `--features cuda`"), "{e}");
/// }
/// # Ok::<(), clipcid_pipeline::PipelineError>(())
/// ```
pub fn parse_device(s: &str) -> Result<Device, PipelineError> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(n) = s.strip_prefix("cuda").map(|r| r.trim_start_matches(':')) else {
        input_error!("unknown device `{s}`: use `cpu` or `cuda:N`");
    };
    let n: usize = if n.is_empty() {
        0
    } else {
        match n.parse() {
            Ok(n) => n,
            Err(_) => input_error!("bad CUDA ordinal in `{s}`"),
        }
    };
    if !cfg!(feature = "cuda") {
        input_error!("cannot open {s}: this clipcid was built without `--features cuda`");
    }
    clipcid_kernels::open_cuda(n).map_err(|e| {
        PipelineError::Input(format!(
            "cannot open {s}: {e} (is the GPU visible, and do the driver and the CUDA \
             libraries on LD_LIBRARY_PATH match CUDA 13.0?)"
        ))
    })
}

/// The GPU faiss should train k-means on for a run on `location`: with the `faiss-gpu`
/// feature, the same CUDA ordinal as the run's tensors; otherwise `None` (faiss on the CPU:
/// k-means trains on a sample, so a CUDA run without faiss's GPU build still clusters).
/// Every stage that builds a [`clipcid_cluster::KMeans`] goes through [`crate::kmeans_for`],
/// which calls this, so the demo and `clipcid cluster` cannot disagree about where k-means
/// runs.
///
/// ```
/// use candle_core::DeviceLocation;
/// use clipcid_pipeline::faiss_gpu;
/// assert_eq!(faiss_gpu(DeviceLocation::Cpu), None);
/// let on_gpu = faiss_gpu(DeviceLocation::Cuda { gpu_id: 1 });
/// assert_eq!(on_gpu, cfg!(feature = "faiss-gpu").then_some(1));
/// ```
pub fn faiss_gpu(location: DeviceLocation) -> Option<i32> {
    match location {
        DeviceLocation::Cuda { gpu_id } if cfg!(feature = "faiss-gpu") => {
            i32::try_from(gpu_id).ok()
        }
        _ => None,
    }
}
