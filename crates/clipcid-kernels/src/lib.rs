//! Compute kernels for clipcid, below the models: one home for what runs the arithmetic.
//!
//! - [`cpu`]: fused f32 CPU ops with hand-written backward passes, as candle `CustomOp`s
//!   (layer norm, softmax, GELU and QuickGELU, linear layers through BLAS `sgemm`, multi-head
//!   attention, a whole transformer block, AdamW in place); each kernel reduces in a fixed
//!   order, so results do not depend on the thread count.
//! - [`blas`]: matrix products on the system BLAS, cut into one single-threaded `sgemm` per
//!   thread of candle's CPU pool, so a training step uses one set of threads; and OpenBLAS's
//!   kernel set, chosen again at start-up where OpenBLAS files a new CPU under one without
//!   AVX ([`blas::openblas_core`]).
//! - [`gather_rows`]: rows of a table by index (an embedding lookup) whose backward pass on a
//!   GPU ([`gather_rows_backward`]) sums each row's gradients in parallel, in a fixed order.
//! - [`l2_normalize`] and [`max_abs_diff`]: small tensor helpers every stage uses.
//! - `cuda` (the `cuda` feature): CUDA kernels compiled at run time with NVRTC where
//!   candle's primitive ops are slow on a GPU (layer norm and softmax with backward passes, a
//!   linear layer's bias and activation, head split, patch matrix, AdamW in place), and
//!   [`open_cuda`], which opens a GPU with its memory pool set to keep freed memory.
//! - [`available_devices`]: the CPU and, in a `cuda` build with a GPU, `cuda:0` (what the
//!   device-parametrised tests loop over).
//!
//! The BLAS backend is chosen by feature: `openblas` (default) links the system OpenBLAS
//! (Debian `libopenblas-dev`); the build script is the one place that links it, for every
//! crate above. CUDA kernels go in the `cuda` module behind the `cuda` feature, reached through
//! the same `CustomOp` as the CPU kernel; where none is written, other devices use candle's
//! primitive ops.
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{Device, Tensor, Var};
//! use clipcid_kernels::{cpu, max_abs_diff};
//!
//! let x = Var::new(&[[1f32, 2.0, 3.0], [0.5, 0.5, 0.5]], &Device::Cpu)?;
//! let w = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?;
//! let b = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
//! let y = cpu::layer_norm(x.as_tensor(), &w, &b, 1e-5)?;
//! // Each row has zero mean after the norm; gradients flow back to `x`.
//! let means = y.mean_keepdim(1)?;
//! assert!(max_abs_diff(&means, &means.zeros_like()?)? < 1e-6);
//! let grads = y.sqr()?.sum_all()?.backward()?;
//! assert!(grads.get(x.as_tensor()).is_some());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

#[cfg(not(feature = "openblas"))]
compile_error!("clipcid-kernels needs a BLAS backend: enable the `openblas` feature");

pub mod blas;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
// The CUDA kernel sources run on the CPU (clipcid-cuda-emulator), GPU or not.
#[cfg(test)]
mod cuda_emulated;
// The many-tensor kernels' tables: used by the `cuda` module, and by the tests that run those
// kernels on clipcid-cuda-emulator.
#[cfg(any(feature = "cuda", test))]
mod many;
mod node;
mod pool;
mod rows;

pub use rows::{gather_rows, gather_rows_backward};

use candle_core::{DType, Result, Tensor, D};

/// Whether clipcid's CUDA kernels take these tensors (then [`cpu::layer_norm`] and
/// [`cpu::softmax_last_dim`] run on the GPU with their backward passes, and the models use
/// the `cuda` module's ops): a `cuda` build, the kernels switched on (`cuda::enabled`),
/// every tensor on a GPU and of one dtype, f32, bf16 or f16.
/// Always false without the `cuda` feature.
///
/// ```
/// let x = candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu)?;
/// assert!(!clipcid_kernels::gpu_kernels_take(&[&x]));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gpu_kernels_take(ts: &[&Tensor]) -> bool {
    #[cfg(feature = "cuda")]
    return cuda::takes(ts);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ts;
        false
    }
}

/// Opens GPU `ordinal` as candle does (`Device::new_cuda`), then makes its memory pool keep
/// freed memory for reuse (`cuda::keep_freed_memory`; a `cuda` build). Every place clipcid
/// opens a GPU goes through here. Without the `cuda` feature, candle's error for a build
/// without CUDA.
///
/// ```
/// if !cfg!(feature = "cuda") {
///     assert!(clipcid_kernels::open_cuda(0).is_err());
/// }
/// ```
pub fn open_cuda(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    cuda::keep_freed_memory(&device)?;
    Ok(device)
}

/// The devices this build can compute on here: the CPU, then `cuda:0` when built with the
/// `cuda` feature and a GPU opens. Tests loop over it so that each property is asserted on
/// every device a machine has (on a CPU-only machine, the CPU alone).
///
/// ```
/// let devices = clipcid_kernels::available_devices();
/// assert!(devices[0].is_cpu());
/// ```
pub fn available_devices() -> Vec<candle_core::Device> {
    let mut devices = vec![candle_core::Device::Cpu];
    if cfg!(feature = "cuda") {
        if let Ok(d) = open_cuda(0) {
            devices.push(d);
        }
    }
    devices
}

/// Divides each row by its L2 norm (rows of zeros stay zero).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu)?;
/// let y = clipcid_kernels::l2_normalize(&x)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// Largest absolute difference between two tensors of one shape, compared in f32 (how tests
/// and users check that two models or two code paths agree).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
/// let b = Tensor::new(&[1f32, 2.5, 2.0], &Device::Cpu)?;
/// assert_eq!(clipcid_kernels::max_abs_diff(&a, &b)?, 1.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()
}

/// Whether every value of `t` is finite (no NaN, no infinity), in one pass: `x * 0` is 0
/// for every finite `x` and NaN otherwise, so the sum is 0 exactly when all are finite (a
/// max would skip NaN).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let ok = Tensor::new(&[1f32, -2.0, 3e38], &Device::Cpu)?;
/// let nan = Tensor::new(&[1f32, f32::NAN], &Device::Cpu)?;
/// assert!(clipcid_kernels::all_finite(&ok)? && !clipcid_kernels::all_finite(&nan)?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let s = t
        .to_dtype(DType::F32)?
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(s.is_finite())
}
