//! CUDA kernels (the `cuda` feature), compiled from the CUDA C source below with NVRTC the
//! first time a process needs them, so the build needs no `nvcc` of its own beyond candle's.
//! They are reached through the same candle `CustomOp`s as the CPU kernels (the op's
//! `cuda_fwd`), in f32, bf16 and f16 (arithmetic in f32), where candle's primitive ops would cost
//! a kernel launch and a full-size temporary each:
//!
//! - AdamW's update in place ([`cpu::adamw_update`](crate::cpu::adamw_update)): three
//!   launches per parameter tensor instead of about sixteen tensor ops (f32); and for a
//!   whole optimizer step ([`cpu::adamw_update_many`](crate::cpu::adamw_update_many)) one
//!   launch for every parameter, which reads their addresses from a table in device memory.
//!   Its arithmetic is rounded op by op, so it gives the CPU kernel's bits.
//! - A gradient norm's sums of squares ([`cpu::squared_norms`](crate::cpu::squared_norms)):
//!   one launch and one copy to the host for all the gradients.
//! - Layer norm with its backward pass ([`cpu::layer_norm`](crate::cpu::layer_norm)): one
//!   launch forward (a warp per row of up to 1024, read once), three backward (rows, column
//!   partial sums, their fixed-order total), where candle has a fused forward only and
//!   training took about ten ops forward and twenty backward.
//! - Softmax over the last dimension with its backward pass
//!   ([`cpu::softmax_last_dim`](crate::cpu::softmax_last_dim)): one warp per row.
//! - Attention's head split and merge ([`swap_middle_dims`]) and a ViT's patch matrix
//!   ([`patchify`]): copies with 32-bit indices.
//! - Multi-head self-attention on the fused q/k/v rows
//!   ([`cpu::attention`](crate::cpu::attention), sizes that [`attention_fits`]), forward and
//!   backward: one block per batch item and head keeps the head's keys and values in shared
//!   memory, each warp computes four query rows' scores, softmax and weighted sum at once
//!   without writing the `[B, H, T, T]` scores anywhere, and the backward pass (two
//!   launches, queries then keys) recomputes the probabilities, as FlashAttention does. It
//!   replaces a layer's three head splits, two batched products, softmax and merge, and their
//!   gradients. In bf16 on compute capability 8.0 and up, heads of 32 or 64 and up to 80
//!   positions run on tensor cores instead ([`set_attention_tensor_cores`]): `mma.sync`
//!   products, one launch each way.
//! - A linear layer's bias, alone ([`bias_add`]), with CLIP's activation
//!   ([`bias_quick_gelu`]) or with a residual ([`bias_residual_add`]), with backward passes:
//!   candle's broadcast add computes each element's index with 64-bit divisions, and took
//!   0.8 ms on `[12800, 3072]` bf16 on an H200 (the memory-bound time is 0.04 ms), which made
//!   it the largest part of the ViT-B/32 tower's time.
//! - The gradient of a gathered table ([`gather_rows`](crate::gather_rows), a text tower's
//!   token embedding): a block per piece of at most 64 positions of one row, then a block per
//!   row adding its pieces in order, where candle's `index_add` gives the whole table one
//!   block that walks every id in turn.
//!
//! [`enabled`] says whether they are used: `CLIPCID_CUDA_KERNELS=0` in the environment (or
//! [`set_enabled`]) falls back to candle's primitive ops, to measure one against the other.
//!
//! ```no_run
//! # fn main() -> candle_core::Result<()> {
//! // On a machine with a GPU: compile and load the kernels once, up front, to report a
//! // missing NVRTC library before a training run starts.
//! let gpu = candle_core::Device::new_cuda(0)?;
//! clipcid_kernels::cuda::load(&gpu)?;
//! # Ok(()) }
//! ```

// Launching a kernel is `unsafe` in cudarc (it cannot check the arguments against the
// kernel's parameters); each launch below says why its arguments match.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::compile_ptx;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result,
    Shape, Tensor,
};
use half::{bf16, f16};

use crate::cpu::ApplyScalars;
use crate::rows::RowIndex;

/// The module name under which the kernels are loaded on each device.
const MODULE: &str = "clipcid_kernels";

/// Threads per block of the row kernels (layer norm): a multiple of the warp size.
const ROW_THREADS: u32 = 128;
/// Rows per block of the column partial sums (layer norm's scale and shift gradients).
const COLUMN_CHUNK: usize = 64;

/// What both kernel sources ([`SOURCE`] and the tensor-core one) begin with: `bf16` and `f16`
/// values travel as their 16 bits (`unsigned short`, and a struct of one for f16), widened to
/// f32 on load and rounded to nearest-even on store, so NVRTC needs no CUDA headers. The
/// sources are files of their own (`prelude.cuh`, `kernels.cu`, `tensor_core.cu`) so that
/// `clipcid-cuda-emulator` can compile the same text for the CPU: the crate's tests
/// (`src/cuda_emulated.rs`) run the kernels there too, GPU or not.
macro_rules! kernel_prelude {
    () => {
        include_str!("prelude.cuh")
    };
}

mod tensor_core;
pub use tensor_core::{attention_tensor_cores, set_attention_tensor_cores};

/// The kernels (f32, bf16 and f16, arithmetic in f32), for any GPU candle runs on
/// (`kernels.cu` after the prelude).
const SOURCE: &str = concat!(kernel_prelude!(), include_str!("kernels.cu"));

/// The kernels [`SOURCE`] defines once.
const UNTYPED_KERNELS: [&str; 4] = [
    "clipcid_adamw_moment",
    "clipcid_adamw_apply",
    "clipcid_adamw_many",
    "clipcid_squares_many",
];

/// The kernels [`SOURCE`] defines for each dtype, as `{name}_{suffix}` (see [`suffix`]).
const TYPED_KERNELS: [&str; 19] = [
    "clipcid_ln_fwd",
    "clipcid_ln_fwd_warp",
    "clipcid_ln_bwd_rows",
    "clipcid_ln_bwd_columns",
    "clipcid_ln_bwd_total",
    "clipcid_softmax_fwd",
    "clipcid_softmax_bwd",
    "clipcid_bias_add",
    "clipcid_bias_residual",
    "clipcid_bias_quick_gelu",
    "clipcid_bias_quick_gelu_bwd",
    "clipcid_column_partial",
    "clipcid_row_sum_pieces",
    "clipcid_row_sum_rows",
    "clipcid_swap_middle",
    "clipcid_patchify",
    "clipcid_attention_fwd",
    "clipcid_attention_dq",
    "clipcid_attention_dkv",
];

/// The dtypes the kernels take, and the suffixes of their kernels' names.
const DTYPES: [(DType, &str); 3] = [
    (DType::F32, "f32"),
    (DType::BF16, "bf16"),
    (DType::F16, "f16"),
];

/// Every kernel [`SOURCE`] defines (what [`load`] loads).
fn kernels() -> impl Iterator<Item = String> {
    let typed = TYPED_KERNELS
        .iter()
        .flat_map(|k| DTYPES.iter().map(move |(_, s)| format!("{k}_{s}")));
    UNTYPED_KERNELS.iter().map(|k| k.to_string()).chain(typed)
}

/// The PTX of [`SOURCE`], compiled once per process (or the compiler's message).
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    match PTX.get_or_init(|| {
        compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    }) {
        Ok(ptx) => Ok(ptx),
        Err(e) => bail!("compiling clipcid's CUDA kernels with NVRTC: {e}"),
    }
}

/// 0: not read yet, 1: on, 2: off.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether clipcid's CUDA kernels are used: yes unless `CLIPCID_CUDA_KERNELS=0` was in the
/// environment when first asked, or [`set_enabled`] said otherwise.
///
/// ```
/// clipcid_kernels::cuda::set_enabled(false);
/// assert!(!clipcid_kernels::cuda::enabled());
/// clipcid_kernels::cuda::set_enabled(true);
/// assert!(clipcid_kernels::cuda::enabled());
/// ```
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("CLIPCID_CUDA_KERNELS").map_or(true, |v| v.trim() != "0");
            ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns clipcid's CUDA kernels on or off for this process (off: candle's primitive ops).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the kernels of this module take these tensors (what
/// [`crate::gpu_kernels_take`] asks in a `cuda` build): kernels enabled, all on a GPU, all
/// of one dtype, f32, bf16 or f16.
pub fn takes(ts: &[&Tensor]) -> bool {
    enabled()
        && ts.iter().all(|t| {
            t.device().is_cuda()
                && t.dtype() == ts[0].dtype()
                && DTYPES.iter().any(|(d, _)| *d == t.dtype())
        })
}

/// Makes the GPU's stream-ordered memory pool keep what is freed (up to all of the GPU's
/// memory) instead of handing it back to the driver at every synchronisation, as PyTorch's
/// caching allocator does. candle allocates each op's output with `cuMemAllocAsync` from the
/// device's default pool, whose release threshold is 0 unless set: every sync (a training
/// step's loss read, a timing) returned the whole working set, and the next pass mapped it
/// again. A no-op on the CPU; [`crate::open_cuda`] calls it for each GPU it opens.
pub fn keep_freed_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(dev) = device else {
        return Ok(());
    };
    let cu_device = dev.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid place for the handle; `cu_device` is an opened device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) }
        .result()
        .w()?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release threshold is a `cuuint64_t` attribute, read through the pointer
    // during the call; `pool` is the handle the driver returned above.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .w()?;
    Ok(())
}

/// Compiles (once per process) and loads the kernels on `device`; an error names what
/// failed (typically NVRTC's library missing from the library path). A no-op on the CPU.
pub fn load(device: &Device) -> Result<()> {
    if let Device::Cuda(dev) = device {
        for f in kernels() {
            dev.get_or_load_custom_func(&f, MODULE, ptx()?)?;
        }
        if device_limits(dev)?.compute_major >= 8 {
            for f in tensor_core::KERNELS {
                dev.get_or_load_custom_func(f, tensor_core::MODULE, tensor_core::ptx()?)?;
            }
        }
    }
    Ok(())
}

/// A tensor's contiguous element range in its storage: `(start, end)`.
type Span = (usize, usize);

/// The contiguous element range of `l`, at most `u32::MAX` elements (what the kernels index).
fn span(l: &Layout, op: &str) -> Result<Span> {
    match l.contiguous_offsets() {
        Some((start, end)) if end - start <= u32::MAX as usize => Ok((start, end)),
        Some((start, end)) => bail!(
            "{op}: {} elements is more than one launch takes",
            end - start
        ),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// `acc = decay acc + (1 - decay) x` (or `x^2` when `square`) with `x = g scale`, in place,
/// f32.
pub(crate) fn adamw_moment(
    acc: &mut CudaStorage,
    la: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    decay: f64,
    square: bool,
    scale: f32,
) -> Result<()> {
    const OP: &str = "clipcid-adamw-moment";
    let (a0, a1) = span(la, OP)?;
    let (g0, g1) = span(lg, OP)?;
    if a1 - a0 != g1 - g0 {
        bail!(
            "{OP}: moment of {} values for a gradient of {}",
            a1 - a0,
            g1 - g0
        );
    }
    let func = acc
        .device
        .get_or_load_custom_func("clipcid_adamw_moment", MODULE, ptx()?)?;
    let n = (a1 - a0) as u32;
    let (decay_f, rest, square) = (decay as f32, (1.0 - decay) as f32, square as i32);
    let g = g.as_cuda_slice::<f32>()?.slice(g0..g1);
    let mut acc = acc.as_cuda_slice_mut::<f32>()?.slice_mut(a0..a1);
    let mut b = func.builder();
    b.arg(&mut acc);
    b.arg(&g);
    b.arg(&n);
    b.arg(&decay_f);
    b.arg(&rest);
    b.arg(&square);
    b.arg(&scale);
    // SAFETY: the kernel reads `n` elements of `g` and reads and writes `n` of `acc`, both
    // views of exactly `n` elements; the scalars match the kernel's parameter types.
    unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
    Ok(())
}

/// `p = p keep - lr (m inv_bias1) / (sqrt(v inv_bias2) + eps)`, in place, f32.
pub(crate) fn adamw_apply(
    p: &mut CudaStorage,
    lp: &Layout,
    m: &CudaStorage,
    lm: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    s: &ApplyScalars,
) -> Result<()> {
    const OP: &str = "clipcid-adamw-apply";
    let (p0, p1) = span(lp, OP)?;
    let (m0, m1) = span(lm, OP)?;
    let (v0, v1) = span(lv, OP)?;
    if p1 - p0 != m1 - m0 || p1 - p0 != v1 - v0 {
        bail!("{OP}: parameter and moments differ in size");
    }
    let func = p
        .device
        .get_or_load_custom_func("clipcid_adamw_apply", MODULE, ptx()?)?;
    let n = (p1 - p0) as u32;
    let m = m.as_cuda_slice::<f32>()?.slice(m0..m1);
    let v = v.as_cuda_slice::<f32>()?.slice(v0..v1);
    let mut p = p.as_cuda_slice_mut::<f32>()?.slice_mut(p0..p1);
    let mut b = func.builder();
    b.arg(&mut p);
    b.arg(&m);
    b.arg(&v);
    b.arg(&n);
    b.arg(&s.keep);
    b.arg(&s.lr);
    b.arg(&s.inv_bias1);
    b.arg(&s.inv_bias2);
    b.arg(&s.eps);
    // SAFETY: `p`, `m` and `v` are views of exactly `n` elements; the scalars match the
    // kernel's parameter types.
    unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
    Ok(())
}

use crate::many::{DeviceValues, MANY_THREADS};

/// Runs `launch` with where each tensor's contiguous values lie (all on one GPU; f32, bf16
/// or f16), the tensors' storages held (read-locked) meanwhile. candle gives a kernel at most
/// three tensors; the many-tensor kernels take the addresses from a table in device memory
/// instead, as PyTorch's `multi_tensor_apply` does.
fn with_addresses<R>(
    ts: &[&Tensor],
    op: &str,
    launch: impl FnOnce(&candle_core::CudaDevice, &[DeviceValues]) -> Result<R>,
) -> Result<R> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let Some(first) = ts.first() else {
        bail!("{op}: no tensors")
    };
    let Device::Cuda(dev) = first.device() else {
        bail!("{op}: expected tensors on a GPU")
    };
    let stream = dev.cuda_stream();
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut values = Vec::with_capacity(ts.len());
    for (t, (storage, layout)) in ts.iter().zip(&held) {
        let candle_core::Storage::Cuda(cs) = &**storage else {
            bail!("{op}: expected tensors on a GPU")
        };
        if !t.device().same_device(first.device()) {
            bail!("{op}: tensors on more than one GPU");
        }
        let (start, end) = span(layout, op)?;
        let (base, code, size) = match t.dtype() {
            DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 0, 4),
            DType::BF16 => (cs.as_cuda_slice::<bf16>()?.device_ptr(&stream).0, 1, 2),
            DType::F16 => (cs.as_cuda_slice::<f16>()?.device_ptr(&stream).0, 2, 2),
            d => bail!("{op}: no CUDA kernel for {d:?} (f32, bf16 and f16 only)"),
        };
        values.push(DeviceValues {
            address: base + size * start as u64,
            count: end - start,
            code,
            size,
        });
    }
    launch(dev, &values)
}

/// Where each tensor's contiguous values lie in GPU memory (all on one GPU; f32, bf16 or
/// f16), for `cpu::check_update_ranges`.
pub(crate) fn extents(ts: &[&Tensor], op: &str) -> Result<Vec<crate::cpu::Extent>> {
    with_addresses(ts, op, |_, at| {
        Ok(at.iter().map(DeviceValues::extent).collect())
    })
}

/// [`cpu::adamw_update_many`](crate::cpu::adamw_update_many) in one launch: `ts` holds each
/// parameter's tensors at `groups` (f32 parameter and moments, contiguous gradient in f32,
/// bf16 or f16, then its working copy if any), all on one GPU. First, with the addresses in
/// hand, `cpu::check_update_ranges`: no range the kernel writes (a parameter, a moment, a
/// working copy) may overlap another range it reads or writes, so that each block writes its
/// own values and what one block writes no other reads.
pub(crate) fn adamw_many(
    params: &[crate::cpu::AdamWParam<'_>],
    ts: &[&Tensor],
    groups: &[std::ops::Range<usize>],
    step: &crate::cpu::AdamWStep,
    scale: f32,
) -> Result<()> {
    const OP: &str = "clipcid-adamw-many";
    with_addresses(ts, OP, |dev, at| {
        let table = crate::many::adamw_table(params, at, groups, step, OP)?;
        let blocks = (table.len() / 7) as u32;
        if blocks == 0 {
            return Ok(());
        }
        let stream = dev.cuda_stream();
        let table = stream.clone_htod(&table).w()?;
        let func = dev.get_or_load_custom_func("clipcid_adamw_many", MODULE, ptx()?)?;
        let mut b = func.builder();
        b.arg(&table);
        let scalars = crate::many::adamw_scalars(step, scale);
        for x in &scalars {
            b.arg(x);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (MANY_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each of the `blocks` table entries holds the addresses of at least its
        // count of values of the dtypes its codes name (chunks of tensors whose storages
        // `with_addresses` holds through the launch, which is stream-ordered before any later
        // use or free); the ranges written overlap nothing else the kernel touches (the
        // table checked); the scalars match the kernel's parameter types.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })
}

/// [`cpu::squared_norms`](crate::cpu::squared_norms) in one launch and one copy to the host:
/// `ts` are contiguous tensors on one GPU (f32, bf16 or f16); each chunk's f32 total, then
/// each tensor's chunks added in f64 in order.
pub(crate) fn squares_many(ts: &[&Tensor]) -> Result<Vec<f64>> {
    const OP: &str = "clipcid-squares-many";
    with_addresses(ts, OP, |dev, at| {
        let (table, owner) = crate::many::squares_table(at);
        if owner.is_empty() {
            return Ok(vec![0.0; ts.len()]);
        }
        let stream = dev.cuda_stream();
        let table = stream.clone_htod(&table).w()?;
        let mut partials = stream.alloc_zeros::<f32>(owner.len()).w()?;
        let func = dev.get_or_load_custom_func("clipcid_squares_many", MODULE, ptx()?)?;
        let mut b = func.builder();
        b.arg(&table);
        b.arg(&mut partials);
        let cfg = LaunchConfig {
            grid_dim: (owner.len() as u32, 1, 1),
            block_dim: (MANY_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each of the `owner.len()` table entries is the address of at least its
        // count of values of the dtype its code names (held by `with_addresses` through the
        // launch), and `partials` has a value per entry.
        unsafe { b.launch(cfg) }.w()?;
        let partials = stream.clone_dtoh(&partials).w()?;
        Ok(crate::many::add_partials(&owner, &partials, ts.len()))
    })
}

/// `$f::<T>(args)` with `T` the Rust type of `$dtype` (f32, bf16 or f16); for any other dtype
/// an error naming the op `$op`.
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            t => bail!("{}: no CUDA kernel for {t:?} (f32, bf16 and f16 only)", $op),
        }
    };
}

/// The kernel-name suffix of a dtype the row kernels take.
fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    match DTYPES.iter().find(|(d, _)| *d == dtype) {
        Some((_, s)) => Ok(s),
        None => bail!("{op}: no CUDA kernel for {dtype:?} (f32, bf16 and f16 only)"),
    }
}

/// Rows and row width of a contiguous tensor of at least one dimension.
fn rows_of(l: &Layout, op: &str) -> Result<(usize, usize)> {
    let (s, e) = span(l, op)?;
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(((e - s) / d, d)),
        _ => bail!("{op}: expected a tensor with a non-empty last dimension"),
    }
}

/// Layer norm's forward pass over the last dimension (`x`, then the scale `w` and shift `b`
/// of the row width), f32, bf16 or f16.
pub(crate) fn layer_norm_fwd(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "clipcid-layer-norm";
    let (rows, d) = rows_of(lx, OP)?;
    let (sw, sb) = (span(lw, OP)?, span(lb, OP)?);
    if sw.1 - sw.0 != d || sb.1 - sb.0 != d {
        bail!(
            "{OP}: scale/shift of {}/{} values for rows of {d}",
            sw.1 - sw.0,
            sb.1 - sb.0
        );
    }
    let out = by_dtype!(
        x.dtype(),
        OP,
        ln_fwd_typed((x, lx), (w, sw), (b, sb), rows, d, eps)
    )?;
    Ok((out, lx.shape().clone()))
}

fn ln_fwd_typed<T: CudaDType + DeviceRepr>(
    (x, lx): (&CudaStorage, &Layout),
    (w, sw): (&CudaStorage, (usize, usize)),
    (b, sb): (&CudaStorage, (usize, usize)),
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    const OP: &str = "clipcid-layer-norm";
    let dev = x.device.clone();
    // Rows of up to 1024 fit one warp's registers (32 values a lane).
    let per_warp = d <= 1024;
    let func = dev.get_or_load_custom_func(
        &format!(
            "clipcid_ln_fwd_{}{}",
            if per_warp { "warp_" } else { "" },
            suffix(x.dtype(), OP)?
        ),
        MODULE,
        ptx()?,
    )?;
    let (x0, x1) = span(lx, OP)?;
    let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
    let ws = w.as_cuda_slice::<T>()?.slice(sw.0..sw.1);
    let bs = b.as_cuda_slice::<T>()?.slice(sb.0..sb.1);
    // SAFETY: every element is written by the kernel below before it is read.
    let mut y: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * d)? };
    let (d32, rows32) = (d as u32, rows as u32);
    let mut a = func.builder();
    a.arg(&xs);
    a.arg(&ws);
    a.arg(&bs);
    a.arg(&mut y);
    if per_warp {
        a.arg(&rows32);
    }
    a.arg(&d32);
    a.arg(&eps);
    let cfg = if per_warp {
        warp_rows_config(rows)?
    } else {
        row_config(rows)?
    };
    // SAFETY: one warp (rows bounded in the kernel, `d` <= 1024) or one block per row of
    // `d` elements of `x` and `y` (`rows * d` each), `w` and `b` of `d`; the arguments match
    // the chosen kernel's for this dtype.
    unsafe { a.launch(cfg) }.w()?;
    Ok(T::wrap_cuda_slice(y, dev))
}

/// One block of [`ROW_THREADS`] per row.
fn row_config(rows: usize) -> Result<LaunchConfig> {
    if rows == 0 || rows > i32::MAX as usize {
        bail!("clipcid CUDA kernels: {rows} rows is not a grid size");
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Layer norm's gradients from the input `x`, the scale `w` and the output gradient `g`,
/// packed as `[rows + 2, d]` (dx, then dw, then db) in `x`'s dtype, as the CPU op packs them.
pub(crate) fn layer_norm_bwd(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "clipcid-layer-norm-grad";
    let (rows, d) = rows_of(lx, OP)?;
    let (sw, sg) = (span(lw, OP)?, span(lg, OP)?);
    if sw.1 - sw.0 != d || sg.1 - sg.0 != rows * d {
        bail!("{OP}: input, scale and gradient sizes disagree");
    }
    let out = by_dtype!(
        x.dtype(),
        OP,
        ln_bwd_typed((x, lx), (w, sw), (g, sg), rows, d, eps)
    )?;
    Ok((out, Shape::from((rows + 2, d))))
}

fn ln_bwd_typed<T: CudaDType + DeviceRepr>(
    (x, lx): (&CudaStorage, &Layout),
    (w, sw): (&CudaStorage, (usize, usize)),
    (g, sg): (&CudaStorage, (usize, usize)),
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    const OP: &str = "clipcid-layer-norm-grad";
    let dev = x.device.clone();
    let s = suffix(x.dtype(), OP)?;
    let (x0, x1) = span(lx, OP)?;
    let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
    let ws = w.as_cuda_slice::<T>()?.slice(sw.0..sw.1);
    let gs = g.as_cuda_slice::<T>()?.slice(sg.0..sg.1);
    // SAFETY: the row kernel writes every dx element and every row's two statistics, the
    // column kernel every partial sum, the total kernel the last `2 d` outputs.
    let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>((rows + 2) * d)? };
    let mut stats: CudaSlice<f32> = unsafe { dev.alloc::<f32>(2 * rows)? };
    let chunks = rows.div_ceil(COLUMN_CHUNK);
    let mut partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(chunks * 2 * d)? };
    let (d32, rows32, chunk32) = (d as u32, rows as u32, COLUMN_CHUNK as u32);
    {
        let func =
            dev.get_or_load_custom_func(&format!("clipcid_ln_bwd_rows_{s}"), MODULE, ptx()?)?;
        let mut dx = out.slice_mut(0..rows * d);
        let mut a = func.builder();
        a.arg(&xs);
        a.arg(&ws);
        a.arg(&gs);
        a.arg(&mut dx);
        a.arg(&mut stats);
        a.arg(&d32);
        a.arg(&eps);
        // SAFETY: one block per row; `x`, `g` and `dx` hold `rows * d`, `w` `d`, `stats`
        // `2 rows` floats.
        unsafe { a.launch(row_config(rows)?) }.w()?;
    }
    {
        let func =
            dev.get_or_load_custom_func(&format!("clipcid_ln_bwd_columns_{s}"), MODULE, ptx()?)?;
        let mut a = func.builder();
        a.arg(&xs);
        a.arg(&gs);
        a.arg(&stats);
        a.arg(&mut partial);
        a.arg(&rows32);
        a.arg(&d32);
        a.arg(&chunk32);
        // SAFETY: blocks cover `d` columns by `chunks` chunks of `COLUMN_CHUNK` rows, the
        // kernel bounds both; `partial` holds `chunks * 2 d` floats.
        unsafe { a.launch(column_config(d, chunks)) }.w()?;
    }
    let mut sums = out.slice_mut(rows * d..(rows + 2) * d);
    column_total(&dev, s, &partial, &mut sums, chunks, 2 * d)?;
    Ok(T::wrap_cuda_slice(out, dev))
}

/// The launch of a column-partial kernel over `columns` columns in `chunks` chunks of
/// [`COLUMN_CHUNK`] rows: a block per 32 columns per chunk, 8 warps down its rows.
fn column_config(columns: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (columns.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// `out[c]` = the sum over `k < chunks` of `partial[k n + c]`, in that fixed order, for the
/// `n` columns of a column-partial kernel's output (kernel `clipcid_ln_bwd_total_{s}`).
fn column_total<T: DeviceRepr>(
    dev: &candle_core::CudaDevice,
    s: &str,
    partial: &CudaSlice<f32>,
    out: &mut CudaViewMut<'_, T>,
    chunks: usize,
    n: usize,
) -> Result<()> {
    if partial.len() < chunks * n || out.len() < n {
        bail!("clipcid column sums: buffers smaller than {chunks} chunks of {n} columns");
    }
    let func = dev.get_or_load_custom_func(&format!("clipcid_ln_bwd_total_{s}"), MODULE, ptx()?)?;
    let (chunks32, n32) = (chunks as u32, n as u32);
    let mut a = func.builder();
    a.arg(partial);
    a.arg(out);
    a.arg(&chunks32);
    a.arg(&n32);
    // SAFETY: `n` threads (bounded in the kernel) each add `chunks` partials (`partial`
    // holds `chunks n`, checked above) into one of `out`'s first `n` elements.
    unsafe { a.launch(LaunchConfig::for_num_elems(n32)) }.w()?;
    Ok(())
}

/// Rows per block of the kernels that take a warp per row (softmax, the layer-norm forward).
const WARP_ROWS_PER_BLOCK: usize = 4;

/// A warp per row, [`WARP_ROWS_PER_BLOCK`] rows per block.
fn warp_rows_config(rows: usize) -> Result<LaunchConfig> {
    let blocks = rows.div_ceil(WARP_ROWS_PER_BLOCK);
    if blocks == 0 || blocks > i32::MAX as usize {
        bail!("clipcid CUDA kernels: {rows} rows is not a grid size");
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (32 * WARP_ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Softmax over the last dimension, f32, bf16 or f16.
pub(crate) fn softmax_fwd(x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "clipcid-softmax";
    let out = by_dtype!(x.dtype(), OP, softmax_fwd_typed(x, lx))?;
    Ok((out, lx.shape().clone()))
}

fn softmax_fwd_typed<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    lx: &Layout,
) -> Result<CudaStorage> {
    const OP: &str = "clipcid-softmax";
    let (rows, n) = rows_of(lx, OP)?;
    let dev = x.device.clone();
    let func = dev.get_or_load_custom_func(
        &format!("clipcid_softmax_fwd_{}", suffix(x.dtype(), OP)?),
        MODULE,
        ptx()?,
    )?;
    let (x0, x1) = span(lx, OP)?;
    let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
    // SAFETY: every element is written by the kernel below.
    let mut y: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * n)? };
    let (rows32, n32) = (rows as u32, n as u32);
    let mut a = func.builder();
    a.arg(&xs);
    a.arg(&mut y);
    a.arg(&rows32);
    a.arg(&n32);
    // SAFETY: one warp per row of `n` elements (rows bounded in the kernel); `x` and `y`
    // hold `rows * n`.
    unsafe { a.launch(warp_rows_config(rows)?) }.w()?;
    Ok(T::wrap_cuda_slice(y, dev))
}

/// Softmax's input gradient from its output `y` and the output gradient `g`.
pub(crate) fn softmax_bwd(
    (y, ly): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "clipcid-softmax-grad";
    let (rows, n) = rows_of(ly, OP)?;
    let (g0, g1) = span(lg, OP)?;
    if g1 - g0 != rows * n || g.dtype() != y.dtype() {
        bail!("{OP}: value and gradient sizes or dtypes differ");
    }
    let out = by_dtype!(
        y.dtype(),
        OP,
        softmax_bwd_typed((y, ly), (g, (g0, g1)), rows, n)
    )?;
    Ok((out, ly.shape().clone()))
}

fn softmax_bwd_typed<T: CudaDType + DeviceRepr>(
    (y, ly): (&CudaStorage, &Layout),
    (g, sg): (&CudaStorage, (usize, usize)),
    rows: usize,
    n: usize,
) -> Result<CudaStorage> {
    const OP: &str = "clipcid-softmax-grad";
    let dev = y.device.clone();
    let func = dev.get_or_load_custom_func(
        &format!("clipcid_softmax_bwd_{}", suffix(y.dtype(), OP)?),
        MODULE,
        ptx()?,
    )?;
    let (y0, y1) = span(ly, OP)?;
    let ys = y.as_cuda_slice::<T>()?.slice(y0..y1);
    let gs = g.as_cuda_slice::<T>()?.slice(sg.0..sg.1);
    // SAFETY: every element is written by the kernel below.
    let mut dx: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * n)? };
    let (rows32, n32) = (rows as u32, n as u32);
    let mut a = func.builder();
    a.arg(&ys);
    a.arg(&gs);
    a.arg(&mut dx);
    a.arg(&rows32);
    a.arg(&n32);
    // SAFETY: one warp per row of `n` elements (rows bounded in the kernel); `y`, `g` and
    // `dx` hold `rows * n`.
    unsafe { a.launch(warp_rows_config(rows)?) }.w()?;
    Ok(T::wrap_cuda_slice(dx, dev))
}

/// Launches one of the row-broadcast elementwise kernels: `inputs` (of `T`, in the kernel's
/// parameter order), then a new output of `total` values, `total` and the row width `n`.
fn elementwise<T: CudaDType + DeviceRepr>(
    kernel: &str,
    op: &str,
    inputs: &[(&CudaStorage, (usize, usize))],
    total: usize,
    n: usize,
) -> Result<CudaStorage> {
    let first = inputs[0].0;
    let dev = first.device.clone();
    let name = format!("{kernel}_{}", suffix(first.dtype(), op)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
    let views = inputs
        .iter()
        .map(|(s, (a, b))| Ok(s.as_cuda_slice::<T>()?.slice(*a..*b)))
        .collect::<Result<Vec<CudaView<'_, T>>>>()?;
    // SAFETY: every one of the `total` elements is written by the kernel below.
    let mut y: CudaSlice<T> = unsafe { dev.alloc::<T>(total)? };
    let (total32, n32) = (total as u32, n as u32);
    let mut a = func.builder();
    for v in &views {
        a.arg(v);
    }
    a.arg(&mut y);
    a.arg(&total32);
    a.arg(&n32);
    // SAFETY: the callers pass the full-size inputs with `total` elements and the broadcast
    // vector with `n` (the kernel indexes it modulo `n`), in the kernel's order and type.
    unsafe { a.launch(LaunchConfig::for_num_elems(total32)) }.w()?;
    Ok(T::wrap_cuda_slice(y, dev))
}

/// Checks a `[.., n]` input and its `[n]` vector; returns their spans, `total` and `n`.
fn with_vector(
    (x, lx): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
    op: &str,
) -> Result<(Span, Span, usize, usize)> {
    let (rows, n) = rows_of(lx, op)?;
    let (sx, sb) = (span(lx, op)?, span(lb, op)?);
    if sb.1 - sb.0 != n {
        bail!("{op}: a vector of {} values for rows of {n}", sb.1 - sb.0);
    }
    if x.dtype() != b.dtype() {
        bail!(
            "{op}: input {:?} and vector {:?} differ in dtype",
            x.dtype(),
            b.dtype()
        );
    }
    Ok((sx, sb, rows * n, n))
}

fn cpu_unsupported<R>(op: &str) -> Result<R> {
    bail!("{op}: a CUDA kernel (on the CPU, `clipcid_kernels::cpu` has the fused ops)")
}

/// `x + b` with `b` broadcast over the rows of `x` (its last dimension), f32, bf16 or f16 CUDA
/// tensors, differentiable in both: candle's broadcast add indexes each element with 64-bit
/// divisions (20x the memory-bound time at ViT-B/32's shapes on an H200), and its bias
/// gradient is a strided reduction; here one pass forward, and the bias gradient as column
/// sums in a fixed order.
///
/// ```no_run
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{DType, Device, Tensor};
/// let gpu = Device::new_cuda(0)?;
/// let x = Tensor::zeros((4, 3), DType::F32, &gpu)?;
/// let b = Tensor::new(&[1f32, 2.0, 3.0], &gpu)?;
/// let y = clipcid_kernels::cuda::bias_add(&x, &b)?;
/// assert_eq!(y.to_vec2::<f32>()?[3], [1.0, 2.0, 3.0]);
/// # Ok(()) }
/// ```
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&b.contiguous()?, BiasThen { quick_gelu: false })
}

/// `quick_gelu(x + b)` (`h sigmoid(1.702 h)`) with `b` broadcast over the rows of `x`, f32 or
/// bf16 CUDA tensors, differentiable in both: a linear layer's bias and CLIP's activation in
/// one pass instead of four.
///
/// ```no_run
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{DType, Device, Tensor};
/// let gpu = Device::new_cuda(0)?;
/// let x = Tensor::zeros((2, 3), DType::F32, &gpu)?;
/// let b = Tensor::new(&[0f32, 1.0, -1.0], &gpu)?;
/// let y = clipcid_kernels::cuda::bias_quick_gelu(&x, &b)?.to_vec2::<f32>()?;
/// assert!((y[0][1] - 1.0 / (1.0 + (-1.702f32).exp())).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn bias_quick_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&b.contiguous()?, BiasThen { quick_gelu: true })
}

/// `x + b + r` with `b` broadcast over the rows of `x` and `r` of `x`'s shape, f32, bf16 or f16
/// CUDA tensors, differentiable in all three: a linear layer's bias and a transformer block's
/// residual in one pass instead of two.
///
/// ```no_run
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{DType, Device, Tensor};
/// let gpu = Device::new_cuda(0)?;
/// let x = Tensor::ones((2, 3), DType::F32, &gpu)?;
/// let b = Tensor::new(&[1f32, 2.0, 3.0], &gpu)?;
/// let y = clipcid_kernels::cuda::bias_residual_add(&x, &b, &x)?;
/// assert_eq!(y.to_vec2::<f32>()?[1], [3.0, 4.0, 5.0]);
/// # Ok(()) }
/// ```
pub fn bias_residual_add(x: &Tensor, b: &Tensor, r: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&b.contiguous()?, &r.contiguous()?, BiasAndFull::Residual)
}

/// `[n0, n1, n2, n3]` -> `[n0, n2, n1, n3]` (attention's head split `[B, T, H, D]` ->
/// `[B, H, T, D]`, and back), f32, bf16 or f16 CUDA tensors, differentiable: one copy with 32-bit
/// index arithmetic where candle's `transpose(1, 2).contiguous()` is a strided copy that
/// divides 64-bit indices (0.12 ms for ViT-B/32's `[256, 50, 12, 64]` on an H200).
///
/// ```no_run
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// let gpu = Device::new_cuda(0)?;
/// let x = Tensor::arange(0f32, 24.0, &gpu)?.reshape((1, 2, 3, 4))?;
/// let y = clipcid_kernels::cuda::swap_middle_dims(&x)?;
/// let want = x.transpose(1, 2)?.contiguous()?;
/// assert_eq!(y.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
/// # Ok(()) }
/// ```
pub fn swap_middle_dims(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SwapMiddle)
}

struct SwapMiddle;

impl CustomOp1 for SwapMiddle {
    fn name(&self) -> &'static str {
        "clipcid-swap-middle-dims"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
        let &[n0, n1, n2, n3] = lx.dims() else {
            bail!(
                "{}: expected 4 dimensions, got {:?}",
                self.name(),
                lx.dims()
            );
        };
        let sx = span(lx, self.name())?;
        let out = by_dtype!(
            x.dtype(),
            self.name(),
            swap_middle_typed(x, sx, [n0, n1, n2, n3], self.name())
        )?;
        Ok((out, Shape::from((n0, n2, n1, n3))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&SwapMiddle)?))
    }
}

fn swap_middle_typed<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    sx: (usize, usize),
    dims: [usize; 4],
    op: &str,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let name = format!("clipcid_swap_middle_{}", suffix(x.dtype(), op)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
    let total = sx.1 - sx.0;
    let xs = x.as_cuda_slice::<T>()?.slice(sx.0..sx.1);
    // SAFETY: the kernel writes each of the `total` outputs once.
    let mut y: CudaSlice<T> = unsafe { dev.alloc::<T>(total)? };
    let [n0, n1, n2, n3] = dims.map(|d| d as u32);
    let mut a = func.builder();
    a.arg(&xs);
    a.arg(&mut y);
    a.arg(&n0);
    a.arg(&n1);
    a.arg(&n2);
    a.arg(&n3);
    // SAFETY: `x` and `y` hold `n0 n1 n2 n3 = total` values (at most `u32::MAX`, checked by
    // `span`), the kernel's bound.
    unsafe { a.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
    Ok(T::wrap_cuda_slice(y, dev))
}

/// The patch matrix `[B * g * g, C * p * p]` of images `[B, C, S, S]` cut into `p x p`
/// patches (`g = S / p`, row-major over the grid; each row channel-major, as a convolution
/// kernel `[W, C, p, p]` flattens), f32, bf16 or f16 CUDA tensors, differentiable: what a ViT's
/// stride-`p` patch convolution multiplies, in one copy where candle's six-dimensional
/// permute is a strided copy with 64-bit index divisions.
///
/// ```no_run
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// let gpu = Device::new_cuda(0)?;
/// let x = Tensor::arange(0f32, 32.0, &gpu)?.reshape((1, 2, 4, 4))?;
/// let patches = clipcid_kernels::cuda::patchify(&x, 2)?;
/// let want = x.reshape((1, 2, 2, 2, 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((4, 8))?;
/// assert_eq!(patches.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
/// # Ok(()) }
/// ```
pub fn patchify(x: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, s, s2) = x.dims4()?;
    if s != s2 || patch == 0 || s % patch != 0 {
        bail!("patchify: images [{b}, {c}, {s}, {s2}] do not cut into {patch}x{patch} patches");
    }
    x.contiguous()?.apply_op1(Patchify {
        dims: [b, c, s],
        patch,
        scatter: false,
    })
}

/// [`patchify`] (`scatter: false`, from images) or its inverse (`scatter: true`, from the
/// patch matrix); each is the other's backward pass.
struct Patchify {
    /// Images, channels, side.
    dims: [usize; 3],
    patch: usize,
    scatter: bool,
}

impl CustomOp1 for Patchify {
    fn name(&self) -> &'static str {
        "clipcid-patchify"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
        let [b, c, s] = self.dims;
        let p = self.patch;
        let sx = span(lx, self.name())?;
        if sx.1 - sx.0 != b * c * s * s {
            bail!(
                "{}: {} values for images [{b}, {c}, {s}, {s}]",
                self.name(),
                sx.1 - sx.0
            );
        }
        let out = by_dtype!(x.dtype(), self.name(), patchify_typed(x, sx, self))?;
        let g = s / p;
        let shape = if self.scatter {
            Shape::from((b, c, s, s))
        } else {
            Shape::from((b * g * g, c * p * p))
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Patchify {
            dims: self.dims,
            patch: self.patch,
            scatter: !self.scatter,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

fn patchify_typed<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    sx: (usize, usize),
    op: &Patchify,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let name = format!("clipcid_patchify_{}", suffix(x.dtype(), op.name())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
    let total = sx.1 - sx.0;
    let xs = x.as_cuda_slice::<T>()?.slice(sx.0..sx.1);
    // SAFETY: the kernel writes each of the `total` outputs once (a permutation).
    let mut y: CudaSlice<T> = unsafe { dev.alloc::<T>(total)? };
    let [b, c, s] = op.dims.map(|d| d as u32);
    let (p, scatter) = (op.patch as u32, i32::from(op.scatter));
    let mut a = func.builder();
    a.arg(&xs);
    a.arg(&mut y);
    a.arg(&b);
    a.arg(&c);
    a.arg(&s);
    a.arg(&p);
    a.arg(&scatter);
    // SAFETY: source and destination hold `b c s s = total` values (at most `u32::MAX`,
    // checked by `span`) and `p` divides `s` (checked by `patchify`).
    unsafe { a.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
    Ok(T::wrap_cuda_slice(y, dev))
}

/// `x + b` (row-broadcast `b`), then QuickGELU when `quick_gelu`: [`bias_add`] and
/// [`bias_quick_gelu`].
struct BiasThen {
    quick_gelu: bool,
}

impl BiasThen {
    fn kernel(&self) -> &'static str {
        if self.quick_gelu {
            "clipcid_bias_quick_gelu"
        } else {
            "clipcid_bias_add"
        }
    }
}

impl CustomOp2 for BiasThen {
    fn name(&self) -> &'static str {
        if self.quick_gelu {
            "clipcid-bias-quick-gelu"
        } else {
            "clipcid-bias-add"
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (sx, sb, total, n) = with_vector((x, lx), (b, lb), self.name())?;
        let args = [(x, sx), (b, sb)];
        let (k, op) = (self.kernel(), self.name());
        let out = by_dtype!(x.dtype(), self.name(), elementwise(k, op, &args, total, n))?;
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The pre-activation's gradient is the input's; the bias's is its column sums.
        let dh = if self.quick_gelu {
            bias_quick_gelu_backward(x, b, grad)?
        } else {
            grad.contiguous()?
        };
        let db = column_sum(&dh)?;
        Ok((Some(dh), Some(db)))
    }
}

/// The ops on an input `[.., n]`, its `[n]` bias and a third input of the input's shape.
#[derive(Debug, Clone, Copy)]
enum BiasAndFull {
    /// `x + b + r` ([`bias_residual_add`]).
    Residual,
    /// [`bias_quick_gelu`]'s pre-activation gradient from `x`, `b` and the output gradient.
    QuickGeluGrad,
}

impl BiasAndFull {
    fn kernel(self) -> &'static str {
        match self {
            Self::Residual => "clipcid_bias_residual",
            Self::QuickGeluGrad => "clipcid_bias_quick_gelu_bwd",
        }
    }
}

impl CustomOp3 for BiasAndFull {
    fn name(&self) -> &'static str {
        match self {
            Self::Residual => "clipcid-bias-residual",
            Self::QuickGeluGrad => "clipcid-bias-quick-gelu-grad",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (sx, sb, total, n) = with_vector((x, lx), (b, lb), op)?;
        let sg = span(lg, op)?;
        if lg.shape() != lx.shape() || g.dtype() != x.dtype() {
            bail!(
                "{op}: {:?} {:?} beside an input {:?} {:?}",
                lg.dims(),
                g.dtype(),
                lx.dims(),
                x.dtype()
            );
        }
        let args = [(x, sx), (b, sb), (g, sg)];
        let k = self.kernel();
        let out = by_dtype!(x.dtype(), op, elementwise(k, op, &args, total, n))?;
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match self {
            // The input's and the residual's gradient is the output's; the bias's is its
            // column sums.
            Self::Residual => {
                let g = grad.contiguous()?;
                let db = column_sum(&g)?;
                Ok((Some(g.clone()), Some(db), Some(g)))
            }
            Self::QuickGeluGrad => {
                Err(candle_core::Error::BackwardNotSupported { op: self.name() })
            }
        }
    }
}

/// The sums over the rows of `g` `[.., n]` (a bias's gradient): `[n]` in `g`'s dtype, added in
/// a fixed order; not differentiable.
pub(crate) fn column_sum(g: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op1_no_bwd(&ColumnSum)
}

/// [`bias_quick_gelu`]'s pre-activation gradient from its input `x`, bias `b` and output
/// gradient `grad`; not differentiable.
pub(crate) fn bias_quick_gelu_backward(x: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &b.contiguous()?,
        &grad.contiguous()?,
        &BiasAndFull::QuickGeluGrad,
    )
}

/// Sums over the rows of a contiguous `[.., n]` tensor: `[n]`, in the input's dtype, added
/// in a fixed order (chunks of rows, then the chunks in order).
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "clipcid-column-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(&self, g: &CudaStorage, lg: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, n) = rows_of(lg, self.name())?;
        let sg = span(lg, self.name())?;
        let out = by_dtype!(
            g.dtype(),
            self.name(),
            column_sum_typed(g, sg, rows, n, self.name())
        )?;
        Ok((out, Shape::from(n)))
    }
}

fn column_sum_typed<T: CudaDType + DeviceRepr>(
    g: &CudaStorage,
    sg: (usize, usize),
    rows: usize,
    n: usize,
    op: &str,
) -> Result<CudaStorage> {
    let dev = g.device.clone();
    let s = suffix(g.dtype(), op)?;
    let gs = g.as_cuda_slice::<T>()?.slice(sg.0..sg.1);
    let chunks = rows.div_ceil(COLUMN_CHUNK);
    // SAFETY: the partial kernel writes all `chunks * n` partial sums, the total kernel all
    // `n` outputs.
    let mut partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(chunks * n)? };
    let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
    let (rows32, n32, chunk32) = (rows as u32, n as u32, COLUMN_CHUNK as u32);
    {
        let func =
            dev.get_or_load_custom_func(&format!("clipcid_column_partial_{s}"), MODULE, ptx()?)?;
        let mut a = func.builder();
        a.arg(&gs);
        a.arg(&mut partial);
        a.arg(&rows32);
        a.arg(&n32);
        a.arg(&chunk32);
        // SAFETY: blocks cover `n` columns by `chunks` chunks of rows, bounded in the
        // kernel; `g` holds `rows * n` values and `partial` `chunks * n` floats.
        unsafe { a.launch(column_config(n, chunks)) }.w()?;
    }
    column_total(&dev, s, &partial, &mut out.slice_mut(0..n), chunks, n)?;
    Ok(T::wrap_cuda_slice(out, dev))
}

/// The gradient of a gathered table (`gather_rows`): `[table_rows, W]` in `g`'s dtype, row
/// `r` the sum of the rows of `g` `[positions, W]` that read `r`, grouped as `index` (packed
/// in `packed`, u32) says, the other rows zero. Two launches: a block per piece of at most
/// [`GRADIENT_PIECE`](crate::rows::GRADIENT_PIECE) positions, then a block per row read
/// adding its pieces in order.
pub(crate) fn row_sums(
    (g, lg): (&CudaStorage, &Layout),
    (packed, lp): (&CudaStorage, &Layout),
    index: &RowIndex,
    table_rows: usize,
) -> Result<CudaStorage> {
    const OP: &str = "clipcid-row-sums";
    let (sg, sp) = (span(lg, OP)?, span(lp, OP)?);
    let w = index.width();
    if sg.1 - sg.0 != index.positions() * w || index.pieces() == 0 {
        bail!(
            "{OP}: a gradient of {} values for {} rows of {w}",
            sg.1 - sg.0,
            index.positions()
        );
    }
    // The grids' sizes are `row_config`'s to check.
    if !matches!(table_rows.checked_mul(w), Some(n) if n <= i32::MAX as usize) {
        bail!("{OP}: a table of {table_rows} rows of {w} is more than a launch takes");
    }
    let packed = packed.as_cuda_slice::<u32>()?.slice(sp.0..sp.1);
    by_dtype!(
        g.dtype(),
        OP,
        row_sums_typed((g, sg), &packed, index, table_rows)
    )
}

fn row_sums_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    (g, sg): (&CudaStorage, Span),
    packed: &CudaView<'_, u32>,
    index: &RowIndex,
    table_rows: usize,
) -> Result<CudaStorage> {
    const OP: &str = "clipcid-row-sums";
    let dev = g.device.clone();
    let s = suffix(g.dtype(), OP)?;
    let (pieces, used, w) = (index.pieces(), index.used(), index.width());
    if packed.len() != index.packed_len() {
        bail!("{OP}: a packed row index of {} values", packed.len());
    }
    let [order, piece, first, rows] = index.parts().map(|r| packed.slice(r));
    let gs = g.as_cuda_slice::<T>()?.slice(sg.0..sg.1);
    // SAFETY: the piece kernel writes all `pieces * w` partial sums.
    let mut partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(pieces * w)? };
    let mut out: CudaSlice<T> = dev.alloc_zeros::<T>(table_rows * w)?;
    let w32 = w as u32;
    {
        let func =
            dev.get_or_load_custom_func(&format!("clipcid_row_sum_pieces_{s}"), MODULE, ptx()?)?;
        let mut a = func.builder();
        a.arg(&gs);
        a.arg(&order);
        a.arg(&piece);
        a.arg(&mut partial);
        a.arg(&w32);
        // SAFETY: a block per piece (`piece` holds `pieces + 1` offsets into `order`, whose
        // `n` entries are rows of `g`, `n * w` values); `partial` holds `pieces * w` floats.
        unsafe { a.launch(row_config(pieces)?) }.w()?;
    }
    {
        let func =
            dev.get_or_load_custom_func(&format!("clipcid_row_sum_rows_{s}"), MODULE, ptx()?)?;
        let mut a = func.builder();
        a.arg(&partial);
        a.arg(&first);
        a.arg(&rows);
        a.arg(&mut out);
        a.arg(&w32);
        // SAFETY: a block per row read (`first` holds `used + 1` offsets into the pieces,
        // `rows` `used` row numbers below `table_rows`); `out` holds `table_rows * w`.
        unsafe { a.launch(row_config(used)?) }.w()?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

/// 0: off (the default), 1: on.
static BLOCK_NODE: AtomicU8 = AtomicU8::new(0);

/// Whether a trainable encoder layer on a GPU runs as one autograd node
/// ([`cpu::transformer_block`](crate::cpu::transformer_block), built from these kernels with
/// a hand-written backward pass) instead of a dozen: candle's backward pass starts every
/// node's input gradient as zeros and adds into it, about 0.16 ms for one q/k/v-sized
/// activation of the student's text tower on an H200, which one node per layer avoids.
/// Off by default until a GPU run has measured it (`clipcid self-check --bench` has rows for
/// both); the layer must use QuickGELU (CLIP's).
///
/// ```
/// use clipcid_kernels::cuda::{block_node, set_block_node};
/// assert!(!block_node());
/// set_block_node(true);
/// assert!(block_node());
/// set_block_node(false);
/// ```
pub fn set_block_node(on: bool) {
    BLOCK_NODE.store(on as u8, Ordering::Relaxed);
}

/// Whether trainable GPU encoder layers run as one autograd node (see [`set_block_node`]).
pub fn block_node() -> bool {
    BLOCK_NODE.load(Ordering::Relaxed) == 1
}

/// Warps per block of the attention kernels (each takes four query or key rows at a time)
/// unless [`set_attention_warps`] says otherwise.
const ATTENTION_WARPS: usize = 8;

/// The warps per block the attention kernels launch with (0: [`ATTENTION_WARPS`]).
static ATTENTION_WARPS_SET: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the warps per block of the attention kernels (1 to 32; each warp takes four query or
/// key rows at a time, and its rows' tiles take shared memory beside the block's keys and
/// values, so more warps share those rows' loads but fit fewer blocks on a multiprocessor).
/// A tuning knob (on an H200 at the student's shapes, 4, 8 and 16 measured alike, 8 a little
/// ahead); 0 restores the default (8), values above 32 are taken as 32. The tensor-core
/// kernels (bf16, see [`set_attention_tensor_cores`]) launch a warp per 16 positions instead.
///
/// ```
/// use clipcid_kernels::cuda::{attention_warps, set_attention_warps};
/// set_attention_warps(4);
/// assert_eq!(attention_warps(), 4);
/// set_attention_warps(0);
/// assert_eq!(attention_warps(), 8);
/// ```
pub fn set_attention_warps(warps: usize) {
    ATTENTION_WARPS_SET.store(warps.min(32), Ordering::Relaxed);
}

/// The warps per block the attention kernels launch with (see [`set_attention_warps`]).
pub fn attention_warps() -> usize {
    match ATTENTION_WARPS_SET.load(Ordering::Relaxed) {
        0 => ATTENTION_WARPS,
        w => w,
    }
}

/// Shared memory a block may use without opting in (the kernels opt in above it).
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// Sizes of one attention call (see [`cpu::attention`](crate::cpu::attention)): `batch`
/// items of `t` positions whose first `tq` are queries, `heads` heads of `head_dim`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionDims {
    pub(crate) batch: usize,
    pub(crate) t: usize,
    pub(crate) tq: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) causal: bool,
    pub(crate) scale: f32,
    /// Warps per block ([`attention_warps`] when made).
    pub(crate) warps: usize,
}

impl AttentionDims {
    /// Shared memory bytes of the forward, dq and dk/dv kernels (the layouts the kernels'
    /// comments give: padded `[rows][D + 1]` f32 blocks, then each warp's rows).
    fn shared_bytes(&self) -> [usize; 3] {
        let (t, tq, d, w) = (self.t, self.tq, self.head_dim, self.warps);
        let p = d + 1;
        // Each warp's tiles are float4s (16 bytes), the shared rows f32.
        [
            16 * w * (d + t) + 4 * 2 * t * p,
            16 * w * (2 * d + 2 * t) + 4 * 2 * t * p,
            16 * w * (2 * d + 2 * tq) + 4 * (2 * tq * p + 2 * tq),
        ]
    }

    fn config(&self, shared: usize) -> Result<LaunchConfig> {
        if self.batch == 0 || self.batch > i32::MAX as usize || self.heads > 65535 {
            bail!(
                "clipcid-attention: {} batch items of {} heads is not a grid size",
                self.batch,
                self.heads
            );
        }
        Ok(LaunchConfig {
            grid_dim: (self.batch as u32, self.heads as u32, 1),
            block_dim: (32 * self.warps as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        })
    }
}

/// What the attention kernels ask of a GPU, read from the driver once per device.
#[derive(Debug, Clone, Copy)]
struct DeviceLimits {
    /// The most shared memory one block may use once a kernel opts in, in bytes.
    max_shared: usize,
    /// The compute capability's major version (8 and up have bf16 tensor-core `mma`).
    compute_major: i32,
}

/// `dev`'s [`DeviceLimits`], cached per device ordinal (each layer's attention asks).
fn device_limits(dev: &candle_core::CudaDevice) -> Result<DeviceLimits> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    use std::collections::HashMap;
    use std::sync::Mutex;
    static LIMITS: OnceLock<Mutex<HashMap<usize, DeviceLimits>>> = OnceLock::new();
    let context = dev.cuda_stream().context().clone();
    let ordinal = context.ordinal();
    let cache = LIMITS.get_or_init(Default::default);
    if let Some(l) = cache.lock().ok().and_then(|c| c.get(&ordinal).copied()) {
        return Ok(l);
    }
    let limits = DeviceLimits {
        max_shared: context
            .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .w()?
            .max(0) as usize,
        compute_major: context
            .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .w()?,
    };
    if let Ok(mut c) = cache.lock() {
        c.insert(ordinal, limits);
    }
    Ok(limits)
}

/// Whether [`cpu::attention`](crate::cpu::attention) runs on clipcid's CUDA kernels on
/// `device` for sequences of `positions` and heads of `head_dim`: the kernels keep one head's
/// keys and values (or queries and output gradients) in a block's shared memory as f32, which
/// bounds `positions x head_dim` (an H200's 227 KiB take 278 positions of 64, so ViT-L/14's
/// 257 at 224 pixels; ViT-B/32's 50 and a text tower's 77 need under 80 KiB).
/// `clipcid_models` asks this before choosing its fused attention path; elsewhere it keeps
/// candle's primitive ops.
///
/// ```
/// use candle_core::Device;
/// // On the CPU the question is moot: the CPU kernel takes every size.
/// assert!(!clipcid_kernels::cuda::attention_fits(&Device::Cpu, 50, 64));
/// ```
pub fn attention_fits(device: &Device, positions: usize, head_dim: usize) -> bool {
    let Device::Cuda(dev) = device else {
        return false;
    };
    let dims = AttentionDims {
        batch: 1,
        t: positions,
        tq: positions,
        heads: 1,
        head_dim,
        causal: false,
        scale: 1.0,
        warps: attention_warps(),
    };
    let need = dims.shared_bytes().into_iter().max().unwrap_or(0);
    enabled()
        && positions > 0
        && head_dim > 0
        && device_limits(dev).is_ok_and(|l| need <= l.max_shared)
}

/// The attention kernel `name` of the NVRTC module `module` (compiled to `ptx`) on `dev`,
/// allowed `shared` bytes of dynamic shared memory.
fn attention_func(
    dev: &candle_core::CudaDevice,
    name: &str,
    module: &str,
    ptx: &str,
    shared: usize,
    g: &AttentionDims,
) -> Result<CudaFunction> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    let func = dev.get_or_load_custom_func(name, module, ptx)?;
    // Shared memory is what bounds how many of these blocks a multiprocessor runs at once:
    // ask for the largest shared-memory carveout (a hint; the driver may otherwise keep more
    // of the unified L1 as cache and fit fewer blocks).
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
    .w()?;
    if shared > DEFAULT_SHARED_BYTES {
        let max = device_limits(dev)?.max_shared;
        if shared > max {
            bail!(
                "clipcid-attention: {} positions in heads of {} need {shared} bytes of shared \
                 memory, more than this GPU's {max} (see clipcid_kernels::cuda::attention_fits)",
                g.t,
                g.head_dim
            );
        }
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .w()?;
    }
    Ok(func.into_cuda_function())
}

/// [`attention_func`] for the f32-arithmetic kernel `clipcid_attention_{pass}_{dtype}`.
fn attention_func_f32(
    dev: &candle_core::CudaDevice,
    pass: &str,
    dtype: DType,
    shared: usize,
    g: &AttentionDims,
) -> Result<CudaFunction> {
    let name = format!(
        "clipcid_attention_{pass}_{}",
        suffix(dtype, "clipcid-attention")?
    );
    attention_func(dev, &name, MODULE, ptx()?, shared, g)
}

/// Checks that `l` is `g`'s contiguous `[batch * t, 3W]` input and returns its span.
fn qkv_span(l: &Layout, g: &AttentionDims, op: &str) -> Result<Span> {
    let (q0, q1) = span(l, op)?;
    let want = g.batch * g.t * 3 * g.heads * g.head_dim;
    if q1 - q0 != want {
        bail!(
            "{op}: q/k/v of {} values where the shapes make {want}",
            q1 - q0
        );
    }
    Ok((q0, q1))
}

/// Checks that `l` is `g`'s contiguous `[batch * tq, W]` output gradient and returns its span.
fn grad_span(l: &Layout, g: &AttentionDims, op: &str) -> Result<Span> {
    let (g0, g1) = span(l, op)?;
    let want = g.batch * g.tq * g.heads * g.head_dim;
    if g1 - g0 != want {
        bail!(
            "{op}: output gradient of {} values for an output of {want}",
            g1 - g0
        );
    }
    Ok((g0, g1))
}

/// Multi-head self-attention's output `[batch * tq, W]` from packed q/k/v rows (the CUDA
/// form of [`cpu::attention`](crate::cpu::attention)).
pub(crate) fn attention_fwd(
    qkv: &CudaStorage,
    l: &Layout,
    g: AttentionDims,
) -> Result<CudaStorage> {
    let q = qkv_span(l, &g, "clipcid-attention")?;
    if let Some(kt) = tensor_core::tiles(&qkv.device, qkv.dtype(), &g, &[q.0])? {
        return tensor_core::attention_fwd(qkv, q, &g, kt);
    }
    by_dtype!(
        qkv.dtype(),
        "clipcid-attention",
        attention_fwd_typed(qkv, q, &g)
    )
}

/// The f32-arithmetic forward kernel on `qkv[q0..q1]` (the span [`qkv_span`] checked).
fn attention_fwd_typed<T: CudaDType + DeviceRepr>(
    qkv: &CudaStorage,
    (q0, q1): Span,
    g: &AttentionDims,
) -> Result<CudaStorage> {
    let dev = qkv.device.clone();
    let shared = g.shared_bytes()[0];
    let cfg = g.config(shared)?;
    let func = attention_func_f32(&dev, "fwd", qkv.dtype(), shared, g)?;
    let xs = qkv.as_cuda_slice::<T>()?.slice(q0..q1);
    let w = g.heads * g.head_dim;
    let stream = dev.cuda_stream();
    // SAFETY: the kernel writes every output row (each batch item's `tq` rows, each head's
    // columns).
    let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(g.batch * g.tq * w)? };
    let dims = [g.t, g.tq, g.heads, g.head_dim].map(|v| v as u32);
    let causal = g.causal as i32;
    let mut a = stream.launch_builder(&func);
    a.arg(&xs);
    a.arg(&mut out);
    for v in &dims {
        a.arg(v);
    }
    a.arg(&causal);
    a.arg(&g.scale);
    // SAFETY: one block per (batch item, head) reads that item's `t` rows of `3W` from `qkv`
    // (checked to hold `batch t 3W`) and writes its `tq` rows of the head's `D` columns of
    // `out` (`batch tq W`); the shared memory is the size the kernel lays out for these
    // dims, opted in above 48 KiB.
    unsafe { a.launch(cfg) }.w()?;
    Ok(T::wrap_cuda_slice(out, dev))
}

/// Attention's q/k/v gradient `[batch * t, 3W]` from its input and the output gradient
/// `[batch * tq, W]` (rows of q past `tq` are 0).
pub(crate) fn attention_bwd(
    (qkv, lq): (&CudaStorage, &Layout),
    (grad, lg): (&CudaStorage, &Layout),
    g: AttentionDims,
) -> Result<CudaStorage> {
    const OP: &str = "clipcid-attention-grad";
    if qkv.dtype() != grad.dtype() {
        bail!("{OP}: q/k/v and gradient dtypes differ");
    }
    let q = qkv_span(lq, &g, OP)?;
    let o = grad_span(lg, &g, OP)?;
    if let Some(kt) = tensor_core::tiles(&qkv.device, qkv.dtype(), &g, &[q.0, o.0])? {
        return tensor_core::attention_bwd((qkv, q), (grad, o), &g, kt);
    }
    by_dtype!(
        qkv.dtype(),
        "clipcid-attention-grad",
        attention_bwd_typed((qkv, q), (grad, o), &g)
    )
}

/// The f32-arithmetic backward kernels on `qkv[q0..q1]` and `grad[g0..g1]` (the spans
/// [`qkv_span`] and [`grad_span`] checked).
fn attention_bwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    (qkv, (q0, q1)): (&CudaStorage, Span),
    (grad, (g0, g1)): (&CudaStorage, Span),
    g: &AttentionDims,
) -> Result<CudaStorage> {
    let dev = qkv.device.clone();
    let [_, shared_dq, shared_dkv] = g.shared_bytes();
    let (cfg_dq, cfg_dkv) = (g.config(shared_dq)?, g.config(shared_dkv)?);
    let func_dq = attention_func_f32(&dev, "dq", qkv.dtype(), shared_dq, g)?;
    let func_dkv = attention_func_f32(&dev, "dkv", qkv.dtype(), shared_dkv, g)?;
    let xs = qkv.as_cuda_slice::<T>()?.slice(q0..q1);
    let gs = grad.as_cuda_slice::<T>()?.slice(g0..g1);
    // Zeroed where some query rows (past `tq`) have no gradient and no kernel writes them.
    let mut dqkv: CudaSlice<T> = if g.tq == g.t {
        // SAFETY: with every position a query, the two kernels write every element.
        unsafe { dev.alloc::<T>(q1 - q0)? }
    } else {
        dev.alloc_zeros::<T>(q1 - q0)?
    };
    // SAFETY: the dq kernel writes both statistics of every (batch item, head, query row)
    // before the dk/dv kernel, later on the same stream, reads them.
    let mut stats: CudaSlice<f32> = unsafe { dev.alloc::<f32>(g.batch * g.heads * g.tq * 2)? };
    let dims = [g.t, g.tq, g.heads, g.head_dim].map(|v| v as u32);
    let causal = g.causal as i32;
    let stream = dev.cuda_stream();
    // Both kernels take the same arguments: the first writes the statistics, the second
    // reads them.
    for (func, cfg) in [(&func_dq, cfg_dq), (&func_dkv, cfg_dkv)] {
        let mut a = stream.launch_builder(func);
        a.arg(&xs);
        a.arg(&gs);
        a.arg(&mut dqkv);
        a.arg(&mut stats);
        for v in &dims {
            a.arg(v);
        }
        a.arg(&causal);
        a.arg(&g.scale);
        // SAFETY: one block per (batch item, head) reads its `t` rows of `qkv` and `tq` rows
        // of `grad` (sizes checked above). The dq kernel writes the head's q columns of the
        // item's `tq` rows of `dqkv` and its `2 tq` statistics; the dk/dv kernel, later on
        // the same stream, reads those statistics and writes the head's k and v columns of
        // the item's `t` rows (disjoint from the q columns). Shared memory is as the kernels
        // lay it out for these dims.
        unsafe { a.launch(cfg) }.w()?;
    }
    Ok(T::wrap_cuda_slice(dqkv, dev))
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU: the source compiles wherever the `cuda` build's libraries are.
    #[test]
    fn kernel_source_compiles_with_nvrtc() {
        let ptx = super::ptx().unwrap_or_else(|e| panic!("{e}"));
        let tc = super::tensor_core::ptx().unwrap_or_else(|e| panic!("{e}"));
        let tc_kernels = super::tensor_core::KERNELS.iter().map(|k| k.to_string());
        let all: [(_, Vec<String>); 2] = [
            (ptx, super::kernels().collect()),
            (tc, tc_kernels.collect()),
        ];
        for (ptx, kernels) in all {
            assert!(!kernels.is_empty());
            for f in kernels {
                assert!(
                    ptx.contains(&format!(".entry {f}(")),
                    "{f} missing from the PTX"
                );
            }
        }
    }
}
