//! clipcid's CUDA kernels, run on the CPU: the same source text that NVRTC compiles for a GPU
//! (`clipcid-kernels/src/cuda/*.cu`), compiled by the system C++ compiler under an emulation of
//! CUDA's execution model, so that the tests check every kernel's indexing, tables and
//! barriers on machines without a GPU (CI's, and most of this project's sessions).
//!
//! A [`launch`] runs a grid's blocks one after another and a block's threads as cooperative
//! fibers on the calling thread, switched at `__syncthreads`, `__syncwarp` and warp shuffles;
//! shared memory, warp shuffles and bf16 `mma.sync` behave as CUDA defines them. It reports
//! as errors what a GPU would hang on or read as garbage: a deadlock at a barrier, a shuffle
//! from a lane that has exited, a block over 1,024 threads. [`launch_in_order`] with
//! [`ThreadOrder::Reverse`] runs blocks and threads last to first: a kernel that reads another
//! thread's value with no barrier between gives other results than in the usual order.
//! Launches are serialised (the emulated kernels' shared memory is static). It measures
//! nothing about speed, and it cannot show races that only a GPU's finer interleaving exposes
//! (threads here switch only at barriers and shuffles).
//!
//! Arithmetic is IEEE single precision rounded op by op, as the kernels' `__f*_rn`
//! intrinsics ask; `expf` and friends are the host's (within a few ulps of CUDA's).
//!
//! ```
//! use clipcid_cuda_emulator::{launch, Args, GuardedBuffer, LaunchConfig};
//!
//! // y = x + b[column] over a 2 x 3 matrix, with clipcid's f32 bias kernel.
//! let x = GuardedBuffer::new(&[1f32, 2., 3., 4., 5., 6.]);
//! let b = GuardedBuffer::new(&[10f32, 20., 30.]);
//! let y = GuardedBuffer::new(&[0f32; 6]);
//! let args = Args::new().ptr(x.as_ptr()).ptr(b.as_ptr()).ptr(y.as_ptr()).u32(6).u32(3);
//! // SAFETY: the arguments are clipcid_bias_add_f32's (x, b, y, total, n), and the buffers
//! // hold `total` and `n` values.
//! unsafe { launch("clipcid_bias_add_f32", LaunchConfig::linear(1, 32), &args) }?;
//! assert_eq!(y.values(), vec![11., 22., 33., 14., 25., 36.]);
//! y.check_guards()?;
//! # Ok::<(), clipcid_cuda_emulator::EmulatorError>(())
//! ```
#![deny(missing_docs)]
// The crate is a foreign-function interface to C++ (the launch) and hands out raw pointers
// for kernels to write through: each unsafe block says why it is sound.
#![allow(unsafe_code)]
#[cfg(target_endian = "big")]
compile_error!("the emulator passes arguments in little-endian slots");

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::marker::PhantomData;

mod buffer;
pub use buffer::GuardedBuffer;

/// What went wrong in an emulated launch.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The launch was refused or stopped: no such kernel, a bad configuration, a deadlock, a
    /// shuffle from an exited lane (the message names the block and thread).
    #[error("emulated CUDA launch: {0}")]
    Launch(String),
    /// A kernel name with a NUL byte in it.
    #[error("emulated CUDA launch: the kernel name {0:?} holds a NUL byte")]
    Name(String),
    /// A kernel wrote outside a [`GuardedBuffer`]'s values.
    #[error("a kernel wrote {bytes} bytes outside a buffer of {len} values ({where_})")]
    OutOfBounds {
        /// How many bytes of the guards changed.
        bytes: usize,
        /// The buffer's values.
        len: usize,
        /// Before or after the values.
        where_: &'static str,
    },
}

/// A launch's shape: blocks in the grid, threads in a block, bytes of dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks along x, y and z.
    pub grid: [u32; 3],
    /// Threads along x, y and z (at most 1,024 in all).
    pub block: [u32; 3],
    /// Dynamic shared memory (`extern __shared__`), at most 227 KiB.
    pub shared_bytes: usize,
}

impl LaunchConfig {
    /// `blocks` blocks of `threads` threads, along x, with no dynamic shared memory.
    ///
    /// ```
    /// let c = clipcid_cuda_emulator::LaunchConfig::linear(4, 256);
    /// assert_eq!((c.grid, c.block, c.shared_bytes), ([4, 1, 1], [256, 1, 1], 0));
    /// ```
    pub fn linear(blocks: u32, threads: u32) -> Self {
        Self {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }
}

/// A kernel's arguments in order, each kept where the launch can point at it (as
/// `cudaLaunchKernel` takes them). The builder methods name the C type each value has.
#[derive(Debug, Default)]
pub struct Args<'a> {
    /// Each argument's bits, in a slot of its own (8 bytes, enough for any scalar or pointer);
    /// the launch points at them while it borrows the list.
    slots: Vec<u64>,
    /// Pointers the arguments hold borrow from buffers that must outlive the launch.
    borrows: PhantomData<&'a ()>,
}

impl<'a> Args<'a> {
    /// No arguments yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(mut self, bits: u64) -> Self {
        self.slots.push(bits);
        self
    }

    /// A pointer argument (`T *` or `const T *`).
    pub fn ptr<T>(self, p: *const T) -> Self {
        self.push(p as usize as u64)
    }

    /// An `unsigned int`.
    pub fn u32(self, v: u32) -> Self {
        self.push(u64::from(v))
    }

    /// An `int`.
    pub fn i32(self, v: i32) -> Self {
        self.push(u64::from(v as u32))
    }

    /// A `float`.
    pub fn f32(self, v: f32) -> Self {
        self.push(u64::from(v.to_bits()))
    }

    /// An `unsigned long long`.
    pub fn u64(self, v: u64) -> Self {
        self.push(v)
    }

    /// How many arguments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

extern "C" {
    fn clipcid_emu_launch(
        name: *const c_char,
        grid: *const c_uint,
        block: *const c_uint,
        shared_bytes: usize,
        reverse: c_int,
        args: *mut *mut c_void,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
}

/// The order in which a launch runs blocks, and resumes a block's threads at each turn
/// (threads switch only at barriers and shuffles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadOrder {
    /// First block first, thread 0 first (x fastest, then y, then z).
    #[default]
    Forward,
    /// Last block first, last thread first. A kernel whose threads or blocks race (one reads
    /// what another writes with no barrier between) computes something else in this order
    /// than in [`Forward`](Self::Forward): running both and comparing is a race check.
    Reverse,
}

/// Runs kernel `name` of clipcid's CUDA sources on the CPU over `config`'s grid, blocks and
/// threads in [`ThreadOrder::Forward`].
///
/// # Safety
/// `args` must match the kernel's parameters in number and types (each slot is read as
/// the parameter's C type, from its first bytes: little-endian), and every pointer among them
/// must be valid for every access the kernel makes through it with these arguments, as for a
/// launch on a GPU.
pub unsafe fn launch(
    name: &str,
    config: LaunchConfig,
    args: &Args<'_>,
) -> Result<(), EmulatorError> {
    // SAFETY: the caller's promise is `launch_in_order`'s.
    unsafe { launch_in_order(name, config, args, ThreadOrder::Forward) }
}

/// [`launch`] with blocks and threads run in `order`.
///
/// ```
/// use clipcid_cuda_emulator::{launch_in_order, Args, GuardedBuffer, LaunchConfig, ThreadOrder};
/// let x = GuardedBuffer::new(&[1f32, 2., 3.]);
/// let b = GuardedBuffer::new(&[0.5f32]);
/// let y = GuardedBuffer::new(&[0f32; 3]);
/// let args = Args::new().ptr(x.as_ptr()).ptr(b.as_ptr()).ptr(y.as_ptr()).u32(3).u32(1);
/// let config = LaunchConfig::linear(2, 32);
/// // SAFETY: clipcid_bias_add_f32(x, b, y, total 3, n 1) over buffers of those sizes.
/// unsafe { launch_in_order("clipcid_bias_add_f32", config, &args, ThreadOrder::Reverse) }?;
/// assert_eq!(y.values(), vec![1.5, 2.5, 3.5]);
/// # Ok::<(), clipcid_cuda_emulator::EmulatorError>(())
/// ```
///
/// # Safety
/// As for [`launch`].
pub unsafe fn launch_in_order(
    name: &str,
    config: LaunchConfig,
    args: &Args<'_>,
    order: ThreadOrder,
) -> Result<(), EmulatorError> {
    let c_name = CString::new(name).map_err(|_| EmulatorError::Name(name.to_string()))?;
    let mut pointers: Vec<*mut c_void> = args
        .slots
        .iter()
        .map(|s| (s as *const u64).cast_mut().cast::<c_void>())
        .collect();
    let mut message = vec![0u8; 1024];
    // SAFETY: the name is NUL-terminated, grid and block hold three values each, `pointers`
    // points at live slots (each 8 bytes, little-endian, so a 4-byte parameter reads its
    // value from the first bytes), `message` has the length passed; the caller vouches for
    // the kernel's accesses.
    let rc = unsafe {
        clipcid_emu_launch(
            c_name.as_ptr(),
            config.grid.as_ptr(),
            config.block.as_ptr(),
            config.shared_bytes,
            c_int::from(order == ThreadOrder::Reverse),
            pointers.as_mut_ptr(),
            message.as_mut_ptr().cast::<c_char>(),
            message.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = message
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(message.len());
    Err(EmulatorError::Launch(
        String::from_utf8_lossy(&message[..end]).into_owned(),
    ))
}
