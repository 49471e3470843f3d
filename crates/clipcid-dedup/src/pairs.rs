//! Blockwise near-pair search on a candle device.

use candle_core::{DType, Tensor};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::DedupError;

/// Pairs `(i, j)`, `i < j`, whose squared Euclidean distance is below a threshold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NearPairs {
    /// First row of each pair.
    pub i: Vec<u32>,
    /// Second row of each pair (`j > i`).
    pub j: Vec<u32>,
    /// Squared distance of each pair.
    pub dist2: Vec<f32>,
}

impl NearPairs {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.i.len()
    }

    /// True when no pair was found.
    pub fn is_empty(&self) -> bool {
        self.i.is_empty()
    }
}

/// All pairs of rows of `x` (`[n, D]`, any device) closer than `threshold`, computed one
/// `block x block` tile at a time over the upper triangle: `d^2 = |a|^2 + |b|^2 - 2 a.b`
/// with one matmul per tile, so memory is `O(block^2)` whatever `n`. On CPU the f32 tile
/// product is OpenBLAS `sgemm`; otherwise it is candle's matmul (cuBLAS on CUDA). With
/// `f16`, the tile matmul runs in half precision through candle (meant for GPUs; on CPU it
/// works but is slower); norms and the comparison stay f32.
/// `on_tile` is called after each tile (for progress).
pub fn near_pairs(
    x: &Tensor,
    threshold: f32,
    block: usize,
    f16: bool,
    mut on_tile: impl FnMut(),
) -> Result<NearPairs, DedupError> {
    let (n, _d) = x.dims2()?;
    if block == 0 {
        return Err(DedupError::Config("block size must be at least 1".into()));
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let norms = row_sq_norms(&x)?;
    let t2 = threshold * threshold;
    let mut out = NearPairs::default();
    let mut emit = |i0: usize, j0: usize, bi: usize, bj: usize, s: &[f32]| {
        let (na, nb) = (&norms[i0..i0 + bi], &norms[j0..j0 + bj]);
        let rows = scan_tile(s, i0, j0, na, nb, t2);
        for (i, j, d2) in rows.into_iter().flatten() {
            out.i.push(i);
            out.j.push(j);
            out.dist2.push(d2);
        }
        on_tile();
    };
    if x.device().is_cpu() && !f16 {
        // CPU: tile products through OpenBLAS sgemm into one reused buffer. candle's CPU
        // matmul (the `gemm` crate) reached 148 GFLOP/s on the 2-core CI machine where
        // OpenBLAS reaches 235, and the products are nearly all of balance's time.
        let d = x.dim(1)?;
        with_host_slice(&x, |xs| {
            let mut buf = vec![0f32; block.min(n) * block.min(n)];
            for_each_tile(n, block, |i0, j0, bi, bj| {
                let (a, b) = (&xs[i0 * d..(i0 + bi) * d], &xs[j0 * d..(j0 + bj) * d]);
                cpu_tile(a, b, d, &mut buf)?;
                emit(i0, j0, bi, bj, &buf[..bi * bj]);
                Ok::<(), DedupError>(())
            })
        })??;
    } else {
        let mm_dtype = if f16 { DType::F16 } else { DType::F32 };
        let xm = x.to_dtype(mm_dtype)?;
        for_each_tile(n, block, |i0, j0, bi, bj| {
            let a = xm.narrow(0, i0, bi)?;
            let b = xm.narrow(0, j0, bj)?;
            let tile = a.matmul(&b.t()?)?.to_dtype(DType::F32)?;
            with_host_slice(&tile, |s| emit(i0, j0, bi, bj, s))?;
            Ok::<_, DedupError>(())
        })?;
    }
    Ok(out)
}

/// The dot products of the rows of `a` (`[bi, d]`) with those of `b` (`[bj, d]`) into
/// `buf[..bi * bj]`, row-major, by OpenBLAS `sgemm`: the one CPU tile product, so that a
/// split run ([`crate::near_pairs_of_part`]) computes bit for bit what one process does.
pub(crate) fn cpu_tile(a: &[f32], b: &[f32], d: usize, buf: &mut [f32]) -> Result<(), DedupError> {
    let (bi, bj) = (a.len() / d.max(1), b.len() / d.max(1));
    let a = ArrayView2::from_shape((bi, d), a);
    let b = ArrayView2::from_shape((bj, d), b);
    let c = ArrayViewMut2::from_shape((bi, bj), &mut buf[..bi * bj]);
    match (a, b, c) {
        (Ok(a), Ok(b), Ok(mut c)) => {
            general_mat_mul(1.0, &a, &b.t(), 0.0, &mut c);
            Ok(())
        }
        _ => Err(DedupError::Config(
            "tile shape does not match the input".into(),
        )),
    }
}

/// Squared L2 norm of every row of a `[n, D]` f32 tensor, a chunk of rows at a time: the
/// whole-matrix `x.sqr()` would briefly double memory (2 GB more at 1M x 512).
pub(crate) fn row_sq_norms(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (n, _) = x.dims2()?;
    let chunk = 65_536;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(chunk) {
        let rows = x.narrow(0, start, chunk.min(n - start))?;
        out.extend(rows.sqr()?.sum(1)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Calls `f(i0, j0, rows_i, rows_j)` for every tile of the upper triangle, row-major.
fn for_each_tile<E>(
    n: usize,
    block: usize,
    mut f: impl FnMut(usize, usize, usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    for i0 in (0..n).step_by(block) {
        for j0 in (i0..n).step_by(block) {
            f(i0, j0, block.min(n - i0), block.min(n - j0))?;
        }
    }
    Ok(())
}

/// Pairs under `t2` in one tile of dot products `s` (`bi x bj`, row-major, `bi = na.len()`,
/// `bj = nb.len()`: the squared norms of the tile's rows and columns), rows in parallel.
/// On a diagonal tile only `c > r` is scanned, so each pair appears once.
pub(crate) fn scan_tile(
    s: &[f32],
    i0: usize,
    j0: usize,
    na: &[f32],
    nb: &[f32],
    t2: f32,
) -> Vec<Vec<(u32, u32, f32)>> {
    let (bi, bj) = (na.len(), nb.len());
    let diagonal = i0 == j0;
    (0..bi)
        .into_par_iter()
        .map(|r| {
            let row = &s[r * bj..(r + 1) * bj];
            let start = if diagonal { r + 1 } else { 0 };
            let mut hits = Vec::new();
            for c in start..bj {
                let d2 = na[r] + nb[c] - 2.0 * row[c];
                if d2 < t2 {
                    hits.push(((i0 + r) as u32, (j0 + c) as u32, d2.max(0.0)));
                }
            }
            hits
        })
        .collect()
}

/// Runs `f` on the f32 values of a contiguous tensor: in place for CPU tensors (the tile is
/// 64 MB at block 4096, and copying it out costs as much as scanning it), through a host copy
/// for other devices.
pub(crate) fn with_host_slice<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            if let Some((start, end)) = layout.contiguous_offsets() {
                return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
            }
        }
    }
    let host: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(f(&host))
}
