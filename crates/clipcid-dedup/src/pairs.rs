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

    /// Appends pairs in order.
    pub(crate) fn extend_pairs(&mut self, pairs: impl IntoIterator<Item = Pair>) {
        for (i, j, d2) in pairs {
            self.i.push(i);
            self.j.push(j);
            self.dist2.push(d2);
        }
    }
}

/// All pairs of rows of `x` (`[n, D]`, any device) closer than `threshold`, computed one
/// `block x block` tile at a time over the upper triangle: `d^2 = |a|^2 + |b|^2 - 2 a.b`
/// with one matmul per tile, so memory is `O(block^2)` whatever `n` (on a device, the tiles
/// of one read-back: at most 1 GiB of f32 products, none for f16 tiles). On CPU the f32 tile
/// product is OpenBLAS `sgemm`; otherwise it is candle's matmul (cuBLAS on CUDA) of the
/// folded rows `[a, 1]` and `[2b, -|b|^2]`, whose one pass per tile keeps the host copy to the
/// rows that hold a pair. With `f16`, that product runs in half precision through candle
/// (meant for GPUs; on CPU it works but is slower) and only chooses the rows: their pairs are
/// decided from the same rows' product in f32, so f16 finds the f32 pairs up to rounding at
/// the threshold. `on_tile` is called after each tile (for progress; on the device path as
/// each group of tiles is read back).
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
        out.extend_pairs(scan_tile(s, i0, j0, na, nb, t2).into_iter().flatten());
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
        let (left, right) = folded(&x, &norms, f16)?;
        let mut tiles = DeviceTiles::new(t2, TILES_PER_READ);
        for_each_tile(n, block, |i0, j0, bi, bj| {
            let (a, b) = (left.rows(i0, bi)?, right.rows(j0, bj)?);
            let na = &norms[i0..i0 + bi];
            tiles.push(a, b, i0, j0, na, &mut out, &mut on_tile)
        })?;
        tiles.finish(&mut out, &mut on_tile)?;
    }
    Ok(out)
}

/// One side of the device path's folded tile product (see [`folded`]): its f32 rows, and
/// their f16 copy when the tiles run in f16.
#[derive(Clone)]
pub(crate) struct Folded {
    exact: Tensor,
    half: Option<Tensor>,
}

impl Folded {
    /// Rows `start..start + len`.
    pub(crate) fn rows(&self, start: usize, len: usize) -> candle_core::Result<Self> {
        Ok(Self {
            exact: self.exact.narrow(0, start, len)?,
            half: self
                .half
                .as_ref()
                .map(|h| h.narrow(0, start, len))
                .transpose()?,
        })
    }

    /// What the tile product runs on: the f16 copy if any.
    fn fast(&self) -> &Tensor {
        self.half.as_ref().unwrap_or(&self.exact)
    }
}

/// The two sides of the device path's tile product, `[n, D']` on `x`'s device: `left = [x, 1]`
/// and `right = [2x, -|x|^2]`, zero-padded to a multiple of 8 columns (tensor-core shapes), so
/// that one product gives `left_a . right_b = 2 a.b - |b|^2` and `d^2(a, b) = |a|^2 - left_a .
/// right_b`. Folding `|b|^2` into the product leaves one pass over each tile after the product
/// (a row maximum) instead of the five that adding the norms and scaling would take. With
/// `f16`, each side also keeps an f16 copy for the tiles.
pub(crate) fn folded(x: &Tensor, norms: &[f32], f16: bool) -> Result<(Folded, Folded), DedupError> {
    let (n, d) = x.dims2()?;
    let dev = x.device();
    let x = x.to_dtype(DType::F32)?;
    let pad = (8 - (d + 1) % 8) % 8;
    let neg: Vec<f32> = norms.iter().map(|v| -v).collect();
    let mut left = vec![x.clone(), Tensor::ones((n, 1), DType::F32, dev)?];
    let mut right = vec![(&x * 2.0)?, Tensor::from_vec(neg, (n, 1), dev)?];
    if pad > 0 {
        let zeros = Tensor::zeros((n, pad), DType::F32, dev)?;
        left.push(zeros.clone());
        right.push(zeros);
    }
    let side = |parts: &[Tensor]| -> Result<Folded, DedupError> {
        let exact = Tensor::cat(parts, 1)?;
        let half = if f16 {
            Some(exact.to_dtype(DType::F16)?)
        } else {
            None
        };
        Ok(Folded { exact, half })
    };
    Ok((side(&left)?, side(&right)?))
}

/// Tiles read back from the device together (see [`DeviceTiles`]).
pub(crate) const TILES_PER_READ: usize = 32;

/// f32 tile products kept on the device for their rows' pairs until the read-back, at most
/// (about 16 tiles of 4096 x 4096): past it the pending tiles are read back early.
const KEPT_BYTES_PER_READ: usize = 1 << 30;

/// A tile of the device path whose row maxima are on their way (see [`DeviceTiles`]).
struct PendingTile<'n> {
    /// The tile's rows of the left side of [`folded`].
    a: Folded,
    /// Its columns: rows of the right side.
    b: Folded,
    i0: usize,
    j0: usize,
    /// The squared norms of `a`'s rows.
    na: &'n [f32],
    /// Each row's largest `2 a.b - |b|^2` `[bi]`, on the device, not yet read.
    best: Tensor,
    /// The f32 product itself (f32 tiles), from which the rows with a pair are picked; f16
    /// tiles keep nothing and compute those rows again in f32.
    product: Option<Tensor>,
}

/// The device path's tile scan. For each tile the device takes each row's largest
/// `2 a.b - |b|^2` (the diagonal tile's lower triangle masked off), and only the rows within
/// reach of the threshold (plus a slack above rounding: about 1e-4 in f32, 4e-3 for f16
/// tiles; a NaN too) cross to the host, in f32: for f16 tiles those rows' product again in
/// f32, so f16 only chooses the rows and every pair is decided in f32. The host finds their
/// pairs as `d^2 = |a|^2 - (2 a.b - |b|^2)`. Copying whole tiles instead would move 2 TB for
/// 1M rows (hours of PCIe), where one value per row is 0.5 GB.
///
/// The maxima of [`TILES_PER_READ`] tiles come back in one copy, and the picked rows of
/// those tiles in one more, so the host waits for the device twice per group of tiles
/// rather than once or twice per tile (for 1M rows at block 4096, 30,135 tiles): with a copy
/// per tile, the device had nothing queued while the host waited for one tile's maxima and
/// then queued the next tile's work. Pairs come out in tile order, as a tile at a time gave
/// them.
pub(crate) struct DeviceTiles<'n> {
    pending: Vec<PendingTile<'n>>,
    kept_bytes: usize,
    t2: f32,
    tiles_per_read: usize,
}

impl<'n> DeviceTiles<'n> {
    /// A scan for pairs with squared distance under `t2`, reading back every
    /// `tiles_per_read` tiles (at least 1).
    pub(crate) fn new(t2: f32, tiles_per_read: usize) -> Self {
        Self {
            pending: vec![],
            kept_bytes: 0,
            t2,
            tiles_per_read: tiles_per_read.max(1),
        }
    }

    /// Queues the tile of `a` (rows of the left side of [`folded`], from row `i0`, squared
    /// norms `na`) against `b` (rows of the right side, from row `j0`); when the group is
    /// full, reads it back into `out`, calling `on_tile` once per tile read.
    #[allow(clippy::too_many_arguments)] // one tile's coordinates and the scan's outputs
    pub(crate) fn push(
        &mut self,
        a: Folded,
        b: Folded,
        i0: usize,
        j0: usize,
        na: &'n [f32],
        out: &mut NearPairs,
        on_tile: &mut dyn FnMut(),
    ) -> Result<(), DedupError> {
        let dev = a.exact.device().clone();
        let bi = na.len();
        let mut s = a.fast().matmul(&b.fast().t()?)?;
        let bj = s.dim(1)?;
        if i0 == j0 {
            // Each pair once (c > r), as `scan_tile`: the diagonal and below out of the maximum.
            let below = Tensor::tril2(bi, DType::U8, &dev)?;
            let never = Tensor::full(f32::NEG_INFINITY, (bi, bj), &dev)?.to_dtype(s.dtype())?;
            s = below.where_cond(&never, &s)?;
        }
        let best = s.max(1)?;
        let product = if a.half.is_none() {
            self.kept_bytes += s.elem_count() * s.dtype().size_in_bytes();
            Some(s)
        } else {
            None
        };
        self.pending.push(PendingTile {
            a,
            b,
            i0,
            j0,
            na,
            best,
            product,
        });
        if self.pending.len() >= self.tiles_per_read || self.kept_bytes >= KEPT_BYTES_PER_READ {
            self.read_back(out, on_tile)?;
        }
        Ok(())
    }

    /// Reads back the tiles still queued.
    pub(crate) fn finish(
        mut self,
        out: &mut NearPairs,
        on_tile: &mut dyn FnMut(),
    ) -> Result<(), DedupError> {
        self.read_back(out, on_tile)
    }

    /// The queued tiles' maxima in one copy; the rows within reach picked on the device
    /// and read in one more copy; their pairs into `out`, tile by tile.
    fn read_back(
        &mut self,
        out: &mut NearPairs,
        on_tile: &mut dyn FnMut(),
    ) -> Result<(), DedupError> {
        let tiles = std::mem::take(&mut self.pending);
        self.kept_bytes = 0;
        let Some(first) = tiles.first() else {
            return Ok(());
        };
        let dev = first.a.exact.device().clone();
        let maxima: Vec<Tensor> = tiles.iter().map(|t| t.best.clone()).collect();
        let best: Vec<f32> = Tensor::cat(&maxima, 0)?.to_dtype(DType::F32)?.to_vec1()?;
        // Per tile: the rows within reach, and their f32 values queued on the device.
        let mut hits: Vec<Vec<u32>> = Vec::with_capacity(tiles.len());
        let mut picked: Vec<Tensor> = vec![];
        let mut at = 0;
        for t in &tiles {
            let (bi, t2) = (t.na.len(), self.t2);
            let slack = if t.product.is_none() { 4e-3 } else { 1e-4 };
            let rows: Vec<u32> = best[at..at + bi]
                .iter()
                .enumerate()
                // A NaN maximum (however a device's max treats NaN) is scanned too.
                .filter(|&(r, &m)| m.is_nan() || m > t.na[r] - t2 - slack * (1.0 + t.na[r].abs()))
                .map(|(r, _)| r as u32)
                .collect();
            at += bi;
            if !rows.is_empty() {
                let ids = Tensor::from_slice(&rows, rows.len(), &dev)?;
                let values = match &t.product {
                    Some(s) => s.index_select(&ids, 0)?,
                    None => t.a.exact.index_select(&ids, 0)?.matmul(&t.b.exact.t()?)?,
                };
                picked.push(values.flatten_all()?);
            }
            hits.push(rows);
        }
        let host: Vec<f32> = match picked.len() {
            0 => vec![],
            _ => Tensor::cat(&picked, 0)?.to_vec1()?,
        };
        let mut at = 0;
        for (t, rows) in tiles.iter().zip(&hits) {
            let bj = t.b.exact.dim(0)?;
            let values = &host[at..at + rows.len() * bj];
            at += rows.len() * bj;
            let (i0, j0, na, t2) = (t.i0, t.j0, t.na, self.t2);
            let found: Vec<Vec<Pair>> = rows
                .par_iter()
                .zip(values.par_chunks(bj.max(1)))
                .map(|(&r, values)| {
                    let r = r as usize;
                    let start = if i0 == j0 { r + 1 } else { 0 };
                    let mut pairs = Vec::new();
                    for (c, &v) in values.iter().enumerate().skip(start) {
                        let d2 = na[r] - v;
                        if d2 < t2 {
                            pairs.push(((i0 + r) as u32, (j0 + c) as u32, d2.max(0.0)));
                        }
                    }
                    pairs
                })
                .collect();
            out.extend_pairs(found.into_iter().flatten());
            on_tile();
        }
        Ok(())
    }
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
/// diagonal tile.
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

    /// Past the first chunk of 65,536 rows, each row's squared norm is still its own.
    #[test]
    fn row_sq_norms_cross_a_chunk_boundary() {
        let n = 65_536 + 3;
        let v: Vec<f32> = (0..n).flat_map(|i| [(i % 7) as f32, 1.0]).collect();
        let x = Tensor::from_vec(v, (n, 2), &Device::Cpu).unwrap();
        let norms = row_sq_norms(&x).unwrap();
        let want: Vec<f32> = (0..n).map(|i| ((i % 7) * (i % 7) + 1) as f32).collect();
        assert_eq!(norms, want);
    }

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

    /// The pairs of one tile through [`DeviceTiles`], read back on its own.
    fn scan_device_tile(
        a: &Folded,
        b: &Folded,
        i0: usize,
        j0: usize,
        na: &[f32],
        t2: f32,
    ) -> Result<Vec<Pair>, DedupError> {
        let mut out = NearPairs::default();
        let mut tiles = DeviceTiles::new(t2, 1);
        tiles.push(a.clone(), b.clone(), i0, j0, na, &mut out, &mut || {})?;
        tiles.finish(&mut out, &mut || {})?;
        Ok(pairs_of(&out))
    }

    fn pairs_of(p: &NearPairs) -> Vec<Pair> {
        (0..p.len()).map(|k| (p.i[k], p.j[k], p.dist2[k])).collect()
    }

    /// Tiles read back in groups of any size give the pairs of one tile at a time, in the
    /// same order, and report every tile once; f32 tiles, f16 tiles, and f32 tiles whose
    /// kept products pass the byte budget (a read-back before the group is full).
    #[test]
    fn grouped_read_back_equals_one_tile_at_a_time() {
        let (n, d, block, t2) = (130, 24, 32, 0.003f32);
        let mut values = rows(n, d);
        values[70 * d + 3] = f32::NAN;
        let x = Tensor::from_slice(&values, (n, d), &Device::Cpu).unwrap();
        let norms = row_sq_norms(&x).unwrap();
        for f16 in [false, true] {
            let (left, right) = folded(&x, &norms, f16).unwrap();
            let mut want = vec![];
            let mut tiles = 0;
            for_each_tile(n, block, |i0, j0, bi, bj| {
                let (a, b) = (left.rows(i0, bi)?, right.rows(j0, bj)?);
                want.extend(scan_device_tile(&a, &b, i0, j0, &norms[i0..i0 + bi], t2)?);
                tiles += 1;
                Ok::<_, DedupError>(())
            })
            .unwrap();
            assert_eq!(tiles, 15);
            assert!(want.len() > 10, "f16 {f16}: {} pairs", want.len());
            for per_read in [2, 4, 7, 15, 32] {
                let mut out = NearPairs::default();
                let mut reported = 0;
                let mut group = DeviceTiles::new(t2, per_read);
                for_each_tile(n, block, |i0, j0, bi, bj| {
                    let (a, b) = (left.rows(i0, bi)?, right.rows(j0, bj)?);
                    let na = &norms[i0..i0 + bi];
                    group.push(a, b, i0, j0, na, &mut out, &mut || reported += 1)
                })
                .unwrap();
                assert!(reported <= tiles - tiles % per_read);
                group.finish(&mut out, &mut || reported += 1).unwrap();
                assert_eq!(reported, tiles, "f16 {f16}, {per_read} per read");
                assert_eq!(pairs_of(&out), want, "f16 {f16}, {per_read} per read");
            }
        }
        // A byte budget passed: read back before the group is full (f32 tiles keep products).
        let (left, right) = folded(&x, &norms, false).unwrap();
        let mut group = DeviceTiles::new(t2, 32);
        group.kept_bytes = KEPT_BYTES_PER_READ;
        let (mut out, mut reported) = (NearPairs::default(), 0);
        let (a, b) = (left.rows(0, block).unwrap(), right.rows(0, block).unwrap());
        group
            .push(a, b, 0, 0, &norms[..block], &mut out, &mut || reported += 1)
            .unwrap();
        assert_eq!((reported, group.pending.len(), group.kept_bytes), (1, 0, 0));
    }

    #[test]
    fn device_tile_scan_equals_a_scan_of_the_whole_tile() {
        let (n, d, block) = (96, 24, 40);
        let clean = rows(n, d);
        // One NaN row too: its column is NaN in every tile it meets, whatever the device's
        // maximum then says, the other rows' pairs are still found.
        let mut poisoned = clean.clone();
        poisoned[5 * d] = f32::NAN;
        for (values, t2) in [0.0004f32, 0.003, 0.01, 0.05]
            .into_iter()
            .map(|t2| (&clean, t2))
            .chain([(&poisoned, 0.01)])
        {
            let x = Tensor::from_slice(values, (n, d), &Device::Cpu).unwrap();
            let norms = row_sq_norms(&x).unwrap();
            let (left, right) = folded(&x, &norms, false).unwrap();
            let (left16, right16) = folded(&x, &norms, true).unwrap();
            assert_eq!(left.exact.dim(1).unwrap() % 8, 0);
            let (mut pairs, mut near_edge) = (0, 0);
            for_each_tile(n, block, |i0, j0, bi, bj| {
                let (a, b) = (left.rows(i0, bi)?, right.rows(j0, bj)?);
                let na = &norms[i0..i0 + bi];
                // Every row of the same folded tile scanned on the host.
                let product = a.exact.matmul(&b.exact.t()?)?;
                let whole: Vec<Pair> = with_host_slice(&product, |s| {
                    let mut v = vec![];
                    for r in 0..bi {
                        let start = if i0 == j0 { r + 1 } else { 0 };
                        for c in start..bj {
                            let d2 = na[r] - s[r * bj + c];
                            if d2 < t2 {
                                v.push(((i0 + r) as u32, (j0 + c) as u32, d2.max(0.0)));
                            }
                        }
                    }
                    v
                })?;
                let device = scan_device_tile(&a, &b, i0, j0, na, t2)?;
                assert_eq!(device, whole, "tile ({i0}, {j0}), t2 {t2}");
                // The CPU path's formula finds the same pairs, but for distances within
                // rounding of the threshold.
                let plain = x.narrow(0, i0, bi)?.matmul(&x.narrow(0, j0, bj)?.t()?)?;
                let nb = &norms[j0..j0 + bj];
                let cpu: Vec<Pair> = with_host_slice(&plain, |s| scan_tile(s, i0, j0, na, nb, t2))?
                    .into_iter()
                    .flatten()
                    .collect();
                // f16 tiles choose the rows, f32 decides: the f32 path's pairs, but for
                // distances within rounding of the threshold.
                let (a16, b16) = (left16.rows(i0, bi)?, right16.rows(j0, bj)?);
                let half = scan_device_tile(&a16, &b16, i0, j0, na, t2)?;
                let key = |p: &Pair| (p.0, p.1);
                let edge = |p: &Pair| (p.2 - t2).abs() < 1e-5;
                for other in [&cpu, &half] {
                    let only_device = device
                        .iter()
                        .filter(|p| !other.iter().any(|q| key(q) == key(p)));
                    let only_other = other
                        .iter()
                        .filter(|p| !device.iter().any(|q| key(q) == key(p)));
                    for p in only_device.chain(only_other) {
                        assert!(
                            edge(p),
                            "tile ({i0}, {j0}), t2 {t2}: {p:?} found by one only"
                        );
                        near_edge += 1;
                    }
                }
                pairs += device.len();
                Ok::<_, DedupError>(())
            })
            .unwrap();
            // The data straddles every threshold: some pairs, not all.
            assert!(pairs > 0 && pairs < n * (n - 1) / 2, "t2 {t2}");
            assert!(
                near_edge <= 2,
                "t2 {t2}: {near_edge} pairs differ between the paths"
            );
        }
    }
}
