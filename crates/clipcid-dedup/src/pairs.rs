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

/// One pair of a tile scan: rows `i < j` and their squared distance.
pub(crate) type Pair = (u32, u32, f32);

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
            let (na, nb) = (&norms[i0..i0 + bi], &norms[j0..j0 + bj]);
            for (i, j, d2) in scan_device_tile(&a, &b, i0, j0, na, nb, t2)?
                .into_iter()
                .flatten()
            {
                out.i.push(i);
                out.j.push(j);
                out.dist2.push(d2);
            }
            on_tile();
            Ok::<_, DedupError>(())
        })?;
    }
    Ok(out)
}

/// [`scan_tile`] for a tile whose product `a bᵀ` is computed on the device of `a` and `b`
/// (CUDA, or candle's CPU matmul for f16): the same pairs in the same order, but only the
/// rows of the tile that hold one cross to the host. The device computes each row's smallest
/// squared distance (the diagonal tile's lower triangle masked off), and the host scans the
/// rows under the threshold, plus a slack far above f32 rounding, with `scan_tile`'s own
/// formula on the copied dot products; so the host decides every pair exactly as `scan_tile`
/// would. Copying whole tiles instead would move 2 TB for 1M rows: hours of PCIe, where
/// one minimum per row is 0.5 GB.
pub(crate) fn scan_device_tile(
    a: &Tensor,
    b: &Tensor,
    i0: usize,
    j0: usize,
    na: &[f32],
    nb: &[f32],
    t2: f32,
) -> Result<Vec<Vec<Pair>>, DedupError> {
    let dev = a.device();
    let (bi, bj) = (na.len(), nb.len());
    let s = a.matmul(&b.t()?)?.to_dtype(DType::F32)?;
    let col = Tensor::from_slice(na, (bi, 1), dev)?;
    let row = Tensor::from_slice(nb, (1, bj), dev)?;
    let mut d2 = col.broadcast_add(&row)?.sub(&s.affine(2.0, 0.0)?)?;
    if i0 == j0 {
        // Each pair once (c > r), as `scan_tile`: the diagonal and below out of the minimum.
        let below = (Tensor::tril2(bi, DType::F32, dev)? * 1e30)?;
        d2 = (d2 + below)?;
    }
    let mins: Vec<f32> = d2.min(1)?.to_vec1()?;
    let nb_max = nb.iter().copied().fold(0f32, f32::max);
    let hit_rows: Vec<u32> = mins
        .iter()
        .enumerate()
        // A NaN minimum (however a device's min treats NaN) is scanned too.
        .filter(|&(r, &m)| m.is_nan() || m < t2 + 1e-4 * (1.0 + na[r] + nb_max))
        .map(|(r, _)| r as u32)
        .collect();
    if hit_rows.is_empty() {
        return Ok(vec![]);
    }
    let picked = s.index_select(&Tensor::from_slice(&hit_rows, hit_rows.len(), dev)?, 0)?;
    let host: Vec<f32> = picked.flatten_all()?.to_vec1()?;
    Ok(hit_rows
        .par_iter()
        .zip(host.par_chunks(bj))
        .map(|(&r, dots)| scan_row(dots, r as usize, i0, j0, na[r as usize], nb, t2))
        .collect())
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
) -> Vec<Vec<Pair>> {
    let (bi, bj) = (na.len(), nb.len());
    (0..bi)
        .into_par_iter()
        .map(|r| scan_row(&s[r * bj..(r + 1) * bj], r, i0, j0, na[r], nb, t2))
        .collect()
}

/// The pairs of row `r` of a tile (its dot products `dots` with the tile's columns, `na_r`
/// its squared norm): `d^2 = |a|^2 + |b|^2 - 2 a.b` under `t2`, columns `c > r` only on a
/// diagonal tile. The one formula of every tile scan, so the host and device paths agree.
fn scan_row(
    dots: &[f32],
    r: usize,
    i0: usize,
    j0: usize,
    na_r: f32,
    nb: &[f32],
    t2: f32,
) -> Vec<Pair> {
    let start = if i0 == j0 { r + 1 } else { 0 };
    let mut hits = Vec::new();
    for c in start..dots.len() {
        let d2 = na_r + nb[c] - 2.0 * dots[c];
        if d2 < t2 {
            hits.push(((i0 + r) as u32, (j0 + c) as u32, d2.max(0.0)));
        }
    }
    hits
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test data is built here; a failure should panic

    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// Rows in groups of four around shared centres, spread so that many pairs fall just
    /// under and just over the threshold, plus lone rows.
    fn rows(n: usize, d: usize) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut v = Vec::with_capacity(n * d);
        let mut centre = vec![0f32; d];
        for r in 0..n {
            if r % 4 == 0 {
                centre = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            }
            let spread = [0.0, 0.01, 0.02, 0.05][r % 4] * rng.random_range(0.5f32..1.5);
            v.extend(
                centre
                    .iter()
                    .map(|c| c + spread * rng.random_range(-1.0f32..1.0)),
            );
        }
        v
    }

    #[test]
    fn device_tile_scan_equals_the_full_host_scan() {
        let (n, d, block) = (96, 24, 40);
        let clean = rows(n, d);
        // One NaN row too: its column is NaN in every tile it meets, whatever the device's
        // minimum then says, the other rows' pairs are still found.
        let mut poisoned = clean.clone();
        poisoned[5 * d] = f32::NAN;
        for (values, t2) in [0.0004f32, 0.003, 0.01, 0.05]
            .into_iter()
            .map(|t2| (&clean, t2))
            .chain([(&poisoned, 0.01)])
        {
            let x = Tensor::from_slice(values, (n, d), &Device::Cpu).unwrap();
            let norms = row_sq_norms(&x).unwrap();
            let mut pairs = 0;
            for_each_tile(n, block, |i0, j0, bi, bj| {
                let (a, b) = (x.narrow(0, i0, bi)?, x.narrow(0, j0, bj)?);
                let (na, nb) = (&norms[i0..i0 + bi], &norms[j0..j0 + bj]);
                let tile = a.matmul(&b.t()?)?;
                let full = with_host_slice(&tile, |s| scan_tile(s, i0, j0, na, nb, t2))?;
                let full: Vec<_> = full.into_iter().flatten().collect();
                let device: Vec<_> = scan_device_tile(&a, &b, i0, j0, na, nb, t2)?
                    .into_iter()
                    .flatten()
                    .collect();
                assert_eq!(device, full, "tile ({i0}, {j0}), t2 {t2}");
                pairs += full.len();
                Ok::<_, DedupError>(())
            })
            .unwrap();
            // The data straddles every threshold: some pairs, not all.
            assert!(pairs > 0 && pairs < n * (n - 1) / 2, "t2 {t2}");
        }
    }
}
