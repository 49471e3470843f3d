//! Matrix products on OpenBLAS that run on candle's CPU threads instead of OpenMP's.
//!
//! The workspace links Debian's OpenMP build of OpenBLAS (faiss's k-means wants it; see
//! `.cargo/config.toml`). A multi-threaded `sgemm` there runs on an OpenMP team whose
//! threads spin for a while after each product, waiting for the next one; in a training step
//! the next thing is element-wise work on candle's threads, and on two cores the spinning
//! team and candle's workers took turns at each other's cores (libgomp's spin loop was 13% of
//! a training-step profile). PyTorch avoids this by running everything on one OpenMP pool.
//! Here a large product is cut into one block of rows (or columns) per thread of candle's
//! pool, and each block is one single-threaded `sgemm` on that thread, so a
//! training step's parallel work runs on one set of threads. Single-threaded means: the
//! calling thread's OpenMP thread count is set to 1 for the call and restored after it, a
//! thread-local setting that OpenBLAS's OpenMP build reads on every call and that leaves
//! other threads as they were.
//!
//! With any other BLAS build (pthreads OpenBLAS, when the OpenMP one is not installed) and
//! for small products, a product goes to BLAS whole and BLAS threads it itself.
//!
//! [`openblas_core`] says which of OpenBLAS's kernel sets runs the products; where OpenBLAS
//! files a new CPU under a set without AVX, clipcid has it choose again when the process
//! starts (see [`core_type`]).
//!
//! Unsafe code: three C functions, `openblas_get_parallel` (OpenBLAS: which threading the
//! build uses), `omp_get_max_threads` and `omp_set_num_threads` (libgomp: the calling
//! thread's team size). None takes a pointer, none can fail, and all may be called from any
//! thread at any time. [`core_type`] says what its own unsafe code does.
#![allow(unsafe_code)]

pub mod core_type;

pub use core_type::{openblas_core, OpenBlasCore};

use std::ffi::c_int;
use std::sync::OnceLock;

use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2, Axis};

extern "C" {
    fn openblas_get_parallel() -> c_int;
    fn omp_get_max_threads() -> c_int;
    fn omp_set_num_threads(n: c_int);
}

/// `openblas_get_parallel()`: 0 single-threaded build, 1 pthreads, 2 OpenMP.
const OPENBLAS_PTHREADS: c_int = 1;
const OPENBLAS_OPENMP: c_int = 2;

/// Products with fewer multiply-adds than this go to BLAS whole: OpenBLAS runs them on one
/// thread anyway (its own threshold is 4 x 65,536), and splitting would only add hand-offs.
const SPLIT_MIN_MACS: usize = 1 << 20;

/// How the loaded OpenBLAS build threads (`openblas_get_parallel()`).
fn openblas_threading() -> c_int {
    // SAFETY: a getter without arguments; OpenBLAS initialises itself when loaded.
    unsafe { openblas_get_parallel() }
}

/// Whether the loaded OpenBLAS threads with OpenMP (checked once per process).
pub fn openblas_uses_openmp() -> bool {
    static OPENMP: OnceLock<bool> = OnceLock::new();
    *OPENMP.get_or_init(|| openblas_threading() == OPENBLAS_OPENMP)
}

/// Whether the loaded OpenBLAS is its pthreads build, whose worker threads start when it is
/// loaded (see [`core_type`]).
#[cfg_attr(
    not(all(target_os = "linux", target_arch = "x86_64")),
    allow(dead_code)
)]
fn openblas_uses_pthreads() -> bool {
    openblas_threading() == OPENBLAS_PTHREADS
}

/// Restores the calling thread's OpenMP team size when dropped (also on unwinding).
struct OmpThreadsGuard(c_int);

impl OmpThreadsGuard {
    fn single() -> Self {
        // SAFETY: both calls only read or write the calling thread's OpenMP settings.
        let previous = unsafe { omp_get_max_threads() };
        unsafe { omp_set_num_threads(1) };
        Self(previous)
    }
}

impl Drop for OmpThreadsGuard {
    fn drop(&mut self) {
        // SAFETY: as in `single`; the value came from `omp_get_max_threads`.
        unsafe { omp_set_num_threads(self.0) }
    }
}

/// Runs `f` with the calling thread's BLAS products single-threaded: for kernels that are
/// already parallel over candle's pool and call many small products (attention's per-head
/// products), where OpenBLAS would otherwise start an OpenMP team from inside each task for
/// the products above its own threshold.
pub(crate) fn on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    let _single = openblas_uses_openmp().then(OmpThreadsGuard::single);
    f()
}

/// `c = a @ b + beta * c` through OpenBLAS `sgemm` (`beta` 0 overwrites `c`, 1 adds to it).
/// `a`, `b` and `c` must each be row- or column-major with a unit inner stride (what ndarray
/// hands to cblas).
///
/// # Panics
///
/// When the shapes do not agree (`a` `[m, k]`, `b` `[k, n]`, `c` `[m, n]`), as ndarray's
/// `general_mat_mul` does.
///
/// ```
/// use ndarray::array;
/// let a = array![[1f32, 2.0], [3.0, 4.0]];
/// let b = array![[1f32, 0.0], [0.0, 1.0]];
/// let mut c = ndarray::Array2::<f32>::ones((2, 2));
/// clipcid_kernels::blas::gemm(&a.view(), &b.view(), 1.0, &mut c.view_mut());
/// assert_eq!(c, array![[2f32, 3.0], [4.0, 5.0]]);
/// ```
pub fn gemm(a: &ArrayView2<f32>, b: &ArrayView2<f32>, beta: f32, c: &mut ArrayViewMut2<f32>) {
    let ((m, k), n) = (a.dim(), b.ncols());
    let threads = crate::pool::threads();
    if threads < 2 || m * n * k < SPLIT_MIN_MACS || !openblas_uses_openmp() {
        general_mat_mul(1.0, a, b, beta, c);
        return;
    }
    // Cut the longer side of `c` into one block per thread; every block reads all of the
    // other operand, so the shorter side is the one that is read twice.
    let split_rows = m >= n;
    let (axis, len) = if split_rows {
        (Axis(0), m)
    } else {
        (Axis(1), n)
    };
    let step = len.div_ceil(threads);
    let mut blocks: Vec<ArrayViewMut2<f32>> = c.axis_chunks_iter_mut(axis, step).collect();
    crate::pool::for_each_chunk_mut(&mut blocks, 1, |span, block| {
        let _single = OmpThreadsGuard::single();
        let (lo, hi) = (span.start * step, (span.start * step + step).min(len));
        if split_rows {
            let a = a.slice(ndarray::s![lo..hi, ..]);
            general_mat_mul(1.0, &a, b, beta, &mut block[0]);
        } else {
            let b = b.slice(ndarray::s![.., lo..hi]);
            general_mat_mul(1.0, a, &b, beta, &mut block[0]);
        }
    });
}
