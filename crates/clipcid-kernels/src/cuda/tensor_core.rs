//! Attention on tensor cores (bf16, compute capability 8.0 and up): the forward and backward
//! passes of [`cpu::attention`](crate::cpu::attention) for sequences of up to
//! [`MAX_POSITIONS`] positions in heads of 32 or 64, which covers ViT-B/32's 50 positions and
//! a text tower's 77. The products run as `mma.sync.m16n8k16` (bf16 inputs, f32 sums), the
//! softmax in f32 registers, so one block per (batch item, head) does the whole head in one
//! launch each way: where the f32 kernels of [`super`] spent 1.4 ms on the text tower's
//! backward pass at batch 256 (f32 FMAs on CUDA cores, probabilities computed twice), these
//! take the products to tensor cores and the pass to one launch.
//!
//! The source is its own NVRTC module, compiled for `compute_80`, so the rest of the kernels
//! still load on older GPUs (which keep the f32 kernels).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Result};
use half::bf16;

use super::{attention_func, device_limits, AttentionDims, Span};

/// The most positions the tensor-core kernels take: five tiles of 16 (their registers hold a
/// query tile's scores against every key).
pub(super) const MAX_POSITIONS: usize = 80;

/// The module name under which the tensor-core kernels are loaded on each device.
pub(super) const MODULE: &str = "clipcid_kernels_tc";

/// The tensor-core attention kernels. Layout as the f32 ones (`qkv` `[B t, 3W]`, head `h` in
/// columns `h D..(h + 1) D` of each third); `KT` is the most 16-row tiles of positions a
/// kernel takes, `D` the head size. A block has one warp per 16-row tile of the item's
/// positions; warp `w` owns query rows `16w..16w + 15` and (backward) key rows likewise.
const SOURCE: &str = concat!(kernel_prelude!(), include_str!("tensor_core.cu"));

/// Every kernel [`SOURCE`] defines.
pub(super) const KERNELS: [&str; 8] = [
    "clipcid_attention_tc_fwd_k4_d32",
    "clipcid_attention_tc_bwd_k4_d32",
    "clipcid_attention_tc_fwd_k4_d64",
    "clipcid_attention_tc_bwd_k4_d64",
    "clipcid_attention_tc_fwd_k5_d32",
    "clipcid_attention_tc_bwd_k5_d32",
    "clipcid_attention_tc_fwd_k5_d64",
    "clipcid_attention_tc_bwd_k5_d64",
];

/// The PTX of [`SOURCE`] for `compute_80`, compiled once per process (or NVRTC's message).
pub(super) fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    match PTX.get_or_init(|| {
        let opts = CompileOptions {
            arch: Some("compute_80"),
            ..Default::default()
        };
        compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    }) {
        Ok(ptx) => Ok(ptx),
        Err(e) => bail!("compiling clipcid's tensor-core kernels with NVRTC: {e}"),
    }
}

/// 0: not set (on), 1: on, 2: off.
static ON: AtomicU8 = AtomicU8::new(0);

/// Turns the tensor-core attention kernels on or off for this process (off: bf16 attention
/// runs on the f32-arithmetic kernels, as on GPUs before compute capability 8.0). A knob for
/// `clipcid self-check --bench`'s profile and the tests, which measure and check both.
///
/// ```
/// use clipcid_kernels::cuda::{attention_tensor_cores, set_attention_tensor_cores};
/// set_attention_tensor_cores(false);
/// assert!(!attention_tensor_cores());
/// set_attention_tensor_cores(true);
/// assert!(attention_tensor_cores());
/// ```
pub fn set_attention_tensor_cores(on: bool) {
    ON.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether bf16 attention may run on the tensor-core kernels (see
/// [`set_attention_tensor_cores`]; on unless turned off).
pub fn attention_tensor_cores() -> bool {
    ON.load(Ordering::Relaxed) != 2
}

/// The position tiles (`KT`) of the tensor-core kernel that takes `g` in `dtype` on `dev`
/// with its tensors starting at element `offsets`, or `None`: bf16 only, heads of 32 or 64,
/// at most [`MAX_POSITIONS`], 16-byte aligned rows, compute capability 8.0 or more.
pub(super) fn tiles(
    dev: &candle_core::CudaDevice,
    dtype: DType,
    g: &AttentionDims,
    offsets: &[usize],
) -> Result<Option<usize>> {
    let fits = attention_tensor_cores()
        && dtype == DType::BF16
        && matches!(g.head_dim, 32 | 64)
        && g.t <= MAX_POSITIONS
        && offsets.iter().all(|o| o % 8 == 0);
    if !fits || device_limits(dev)?.compute_major < 8 {
        return Ok(None);
    }
    Ok(Some(if g.t <= 64 { 4 } else { 5 }))
}

/// The pass a kernel computes.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// `clipcid_attention_tc_fwd_*`: q/k/v in, the output out.
    Forward,
    /// `clipcid_attention_tc_bwd_*`: q/k/v and the output gradient in, q/k/v's gradient out.
    Backward,
}

/// Launches `pass`'s kernel for `g` (`kt` from [`tiles`]) on `inputs` (q/k/v, then in the
/// backward pass the output gradient), writing `out`. One block per (batch item, head), a
/// warp per 16 positions, and the shared memory the kernel lays out: bf16 rows of `D + 8`
/// (K, V, Q, and in the backward pass dO), then in the backward pass p^T and ds^T rows of
/// `16 kts + 8`.
fn launch(
    dev: &candle_core::CudaDevice,
    pass: Pass,
    kt: usize,
    g: &AttentionDims,
    inputs: &[CudaView<'_, bf16>],
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let rows = 16 * g.t.div_ceil(16);
    let s = g.head_dim + 8;
    let (name, shared) = match pass {
        Pass::Forward => ("fwd", 2 * 3 * rows * s),
        Pass::Backward => ("bwd", 2 * (4 * rows * s + 2 * rows * (rows + 8))),
    };
    let name = format!("clipcid_attention_tc_{name}_k{kt}_d{}", g.head_dim);
    let func = attention_func(dev, &name, MODULE, ptx()?, shared, g)?;
    let mut cfg = g.config(shared)?;
    cfg.block_dim = (32 * g.t.div_ceil(16) as u32, 1, 1);
    let dims = [g.t, g.tq, g.heads].map(|v| v as u32);
    let causal = g.causal as i32;
    let stream = dev.cuda_stream();
    let mut a = stream.launch_builder(&func);
    for x in inputs {
        a.arg(x);
    }
    a.arg(out);
    for v in &dims {
        a.arg(v);
    }
    a.arg(&causal);
    a.arg(&g.scale);
    // SAFETY: the arguments are the kernel's parameters in order. One block per (batch
    // item, head) reads the item's `t` rows of `3W` from q/k/v and (backward) `tq` rows of
    // `W` from the output gradient, whose sizes the callers check (`batch t 3W`,
    // `batch tq W`) and which start 16-byte aligned ([`tiles`] asks); it writes the item's
    // `tq` rows of the head's columns of the output (`batch tq W`), or of q's gradient and
    // all `t` rows of k's and v's (`batch t 3W`). `t` is at most `16 kt`, the block has a
    // warp per 16 positions, and the shared memory is the size the kernel lays out.
    unsafe { a.launch(cfg) }.w()?;
    Ok(())
}

/// The forward pass on tensor cores: `[batch * tq, W]` from q/k/v rows `qkv[q0..q1]` (bf16),
/// with `kt` from [`tiles`].
pub(super) fn attention_fwd(
    qkv: &CudaStorage,
    (q0, q1): Span,
    g: &AttentionDims,
    kt: usize,
) -> Result<CudaStorage> {
    let dev = qkv.device.clone();
    let xs = qkv.as_cuda_slice::<bf16>()?.slice(q0..q1);
    // SAFETY: the kernel writes every output row (each item's `tq` rows, each head's columns).
    let mut out: CudaSlice<bf16> =
        unsafe { dev.alloc::<bf16>(g.batch * g.tq * g.heads * g.head_dim)? };
    launch(&dev, Pass::Forward, kt, g, &[xs], &mut out)?;
    Ok(bf16::wrap_cuda_slice(out, dev))
}

/// The backward pass on tensor cores: the q/k/v gradient `[batch * t, 3W]` from `qkv[q0..q1]`
/// and the output gradient `grad[g0..g1]` (bf16), with `kt` from [`tiles`].
pub(super) fn attention_bwd(
    (qkv, (q0, q1)): (&CudaStorage, Span),
    (grad, (g0, g1)): (&CudaStorage, Span),
    g: &AttentionDims,
    kt: usize,
) -> Result<CudaStorage> {
    let dev = qkv.device.clone();
    let xs = qkv.as_cuda_slice::<bf16>()?.slice(q0..q1);
    let gs = grad.as_cuda_slice::<bf16>()?.slice(g0..g1);
    let mut dqkv: CudaSlice<bf16> = if g.tq == g.t {
        // SAFETY: with every position a query, the kernel writes every element.
        unsafe { dev.alloc::<bf16>(q1 - q0)? }
    } else {
        // The q columns of rows past `tq` have no gradient and no kernel writes them.
        dev.alloc_zeros::<bf16>(q1 - q0)?
    };
    launch(&dev, Pass::Backward, kt, g, &[xs, gs], &mut dqkv)?;
    Ok(bf16::wrap_cuda_slice(dqkv, dev))
}
