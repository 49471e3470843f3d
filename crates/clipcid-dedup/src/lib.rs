//! Image semantic balance (CLIP-CID): remove near-duplicate images before clustering.
//!
//! Teacher image embeddings are L2-normalised; every pair closer than a Euclidean threshold
//! (0.07 in the paper, which removed 43.7% of LAION-400M) is found blockwise on a candle
//! device without ever forming the `N x N` matrix; pairs are merged with union-find; each set
//! keeps the member nearest its centroid (ties: lowest id) and drops the rest. One pass, no
//! iterations. A threshold sweep reports the removed fraction for several thresholds from the
//! same pass. Split over N processes, each part searches its share of the tiles
//! ([`near_pairs_of_part`]) into a pair file, and [`merge_pair_files`] gives the same keep
//! list as one process.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{Device, Tensor};
//! use clipcid_dedup::{balance, BalanceOptions};
//! // Rows 0 and 2 are near-duplicates; row 1 is far from both.
//! let x = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [0.999, 0.02]], &Device::Cpu)?;
//! let r = balance(&x, &BalanceOptions { threshold: 0.1, ..Default::default() })?;
//! assert_eq!(r.keep, vec![true, true, false]); // 0 and 2 tie on distance; lowest id wins
//! assert_eq!(r.summary.removed, 1);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod io;
mod pairs;
mod split;
mod union_find;

use std::time::Instant;

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use io::{load_embeddings, write_keep_file, Embeddings, KeepList};
pub use pairs::{near_pairs, NearPairs};
pub use split::{
    merge_pair_files, near_pairs_of_part, part_row_blocks, read_pair_file, write_pair_file,
    PairFile, PAIRS_KIND,
};
pub use union_find::UnionFind;

/// Errors of the balance stage.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// Bad options or input.
    #[error("{0}")]
    Config(String),
    /// Reading embedding shards or writing the keep file failed.
    #[error(transparent)]
    Store(#[from] clipcid_store::StoreError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Options of [`balance`].
#[derive(Debug, Clone)]
pub struct BalanceOptions {
    /// Euclidean distance under which two normalised embeddings are duplicates (paper: 0.07).
    pub threshold: f32,
    /// Rows per tile of the distance computation; memory is `O(block^2)`.
    pub block_size: usize,
    /// Tile matmuls in f16 (for GPUs): they choose the rows that may hold a pair, and
    /// those rows' pairs are decided in f32.
    pub f16: bool,
    /// Extra thresholds to report the removed fraction for, from the same pass.
    pub sweep: Vec<f32>,
    /// Show a progress bar over tiles.
    pub progress: bool,
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            threshold: 0.07,
            block_size: 4096,
            f16: false,
            sweep: vec![],
            progress: false,
        }
    }
}

impl BalanceOptions {
    /// The threshold and every sweep threshold are positive and finite: a NaN or negative
    /// threshold would otherwise merge nothing (or, squared, the pairs under its absolute
    /// value) and give a keep list that looks right.
    ///
    /// ```
    /// use clipcid_dedup::BalanceOptions;
    /// assert!(BalanceOptions::default().check_thresholds().is_ok());
    /// let nan = BalanceOptions { threshold: f32::NAN, ..Default::default() };
    /// assert!(nan.check_thresholds().is_err());
    /// let below = BalanceOptions { sweep: vec![0.05, -0.1], ..Default::default() };
    /// assert!(below.check_thresholds().is_err());
    /// ```
    pub fn check_thresholds(&self) -> Result<(), DedupError> {
        std::iter::once(&self.threshold)
            .chain(&self.sweep)
            .try_for_each(|&t| check_threshold(t))
    }
}

/// One threshold is positive and finite.
pub(crate) fn check_threshold(t: f32) -> Result<(), DedupError> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(DedupError::Config(format!(
            "threshold {t} is not a distance: thresholds must be positive and finite"
        )))
    }
}

/// One row of a threshold sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// Threshold.
    pub threshold: f32,
    /// Images kept (= number of sets).
    pub kept: usize,
    /// Percentage removed.
    pub removed_pct: f64,
}

/// What a [`balance`] run found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalanceSummary {
    /// Images in.
    pub n: usize,
    /// Threshold used.
    pub threshold: f32,
    /// Number of sets (singletons included) = images kept.
    pub sets: usize,
    /// Images kept.
    pub kept: usize,
    /// Images removed.
    pub removed: usize,
    /// Percentage removed.
    pub removed_pct: f64,
    /// Size of the largest set.
    pub largest_set: usize,
    /// Near pairs found.
    pub pairs: usize,
    /// Seconds in the blockwise distance search.
    pub seconds_distance: f64,
    /// Seconds in union-find.
    pub seconds_union_find: f64,
    /// Seconds choosing representatives.
    pub seconds_representatives: f64,
    /// Removed fraction at other thresholds (empty unless asked).
    pub sweep: Vec<SweepRow>,
}

/// Result of [`balance`].
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceResult {
    /// Per image: kept?
    pub keep: Vec<bool>,
    /// Per image: its set, numbered `0..sets` in order of each set's smallest member.
    pub set_id: Vec<u32>,
    /// Per set: the kept image.
    pub representatives: Vec<u32>,
    /// Counts and timings.
    pub summary: BalanceSummary,
}

/// Runs image semantic balance over the rows of `x` (`[n, D]`, normalised here).
pub fn balance(x: &Tensor, opts: &BalanceOptions) -> Result<BalanceResult, DedupError> {
    let (n, _) = x.dims2()?;
    if n == 0 {
        return Err(DedupError::Config("no embeddings to balance".into()));
    }
    opts.check_thresholds()?;
    let x = normalized(&x.to_dtype(DType::F32)?)?;
    let search = opts.sweep.iter().copied().fold(opts.threshold, f32::max);
    let t0 = Instant::now();
    let tiles = n.div_ceil(opts.block_size.max(1));
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new((tiles * (tiles + 1) / 2) as u64);
        if let Ok(s) = indicatif::ProgressStyle::with_template(
            "{spinner} balance [{elapsed_precise}] {wide_bar} {pos}/{len} block pairs ({per_sec}, eta {eta})",
        ) {
            b.set_style(s);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let pairs = near_pairs(&x, search, opts.block_size, opts.f16, || bar.inc(1))?;
    bar.finish_and_clear();
    let seconds_distance = t0.elapsed().as_secs_f64();
    finish(n, &pairs, rows_of(&x), opts, seconds_distance)
}

/// The `gather` of [`finish`] over the rows of `x` (row-major, on the host).
fn rows_of(x: &Tensor) -> impl Fn(&[u32]) -> Result<Vec<f32>, DedupError> + '_ {
    |idx: &[u32]| {
        Ok(x.index_select(&Tensor::new(idx, x.device())?, 0)?
            .flatten_all()?
            .to_vec1()?)
    }
}

/// Union-find over the pairs under `opts.threshold`, the sweep, and each set's
/// representative from the rows `gather(positions)` returns (unit rows, row-major).
pub(crate) fn finish(
    n: usize,
    pairs: &NearPairs,
    gather: impl Fn(&[u32]) -> Result<Vec<f32>, DedupError>,
    opts: &BalanceOptions,
    seconds_distance: f64,
) -> Result<BalanceResult, DedupError> {
    let t1 = Instant::now();
    let t2 = opts.threshold * opts.threshold;
    let mut uf = UnionFind::new(n);
    for k in 0..pairs.len() {
        if pairs.dist2[k] < t2 {
            uf.union(pairs.i[k], pairs.j[k]);
        }
    }
    let labels = uf.canonical_labels();
    let sweep = sweep_rows(n, pairs, &opts.sweep);
    let seconds_union_find = t1.elapsed().as_secs_f64();

    let t2_start = Instant::now();
    let (set_id, members) = dense_sets(&labels);
    let representatives = representatives(gather, &members, 1 << 16)?;
    let mut keep = vec![false; n];
    for &r in &representatives {
        keep[r as usize] = true;
    }
    let seconds_representatives = t2_start.elapsed().as_secs_f64();
    let sets = representatives.len();
    let summary = BalanceSummary {
        n,
        threshold: opts.threshold,
        sets,
        kept: sets,
        removed: n - sets,
        removed_pct: 100.0 * (n - sets) as f64 / n as f64,
        largest_set: members.iter().map(Vec::len).max().unwrap_or(0),
        pairs: pairs.dist2.iter().filter(|&&d| d < t2).count(),
        seconds_distance,
        seconds_union_find,
        seconds_representatives,
        sweep,
    };
    Ok(BalanceResult {
        keep,
        set_id,
        representatives,
        summary,
    })
}

/// Dense set ids in order of smallest member, and the members of each set (ascending).
fn dense_sets(labels: &[u32]) -> (Vec<u32>, Vec<Vec<u32>>) {
    let mut dense = vec![u32::MAX; labels.len()];
    let mut members: Vec<Vec<u32>> = Vec::new();
    let mut set_id = Vec::with_capacity(labels.len());
    for (i, &l) in labels.iter().enumerate() {
        // A canonical label is its set's smallest member, so it is seen first at i == l.
        if dense[l as usize] == u32::MAX {
            dense[l as usize] = members.len() as u32;
            members.push(Vec::new());
        }
        let s = dense[l as usize];
        members[s as usize].push(i as u32);
        set_id.push(s);
    }
    (set_id, members)
}

/// `x` with unit rows: returned as is (no copy) when it already has them, as embeddings from
/// shards do; normalised otherwise.
fn normalized(x: &Tensor) -> Result<Tensor, candle_core::Error> {
    let norms = pairs::row_sq_norms(x)?;
    if norms.iter().all(|n| (n - 1.0).abs() < 1e-5) {
        Ok(x.clone())
    } else {
        clipcid_kernels::l2_normalize(x)
    }
}

/// The representative of every set. Rows of multi-member sets are gathered (`gather`) a
/// chunk of sets (about `chunk_rows` rows) at a time, so no host copy of the whole matrix is
/// made.
fn representatives(
    gather: impl Fn(&[u32]) -> Result<Vec<f32>, DedupError>,
    members: &[Vec<u32>],
    chunk_rows: usize,
) -> Result<Vec<u32>, DedupError> {
    let mut reps: Vec<u32> = members.iter().map(|m| m[0]).collect();
    let multi: Vec<usize> = (0..members.len())
        .filter(|&s| members[s].len() > 1)
        .collect();
    let mut start = 0;
    while start < multi.len() {
        let mut end = start;
        let mut rows = 0;
        while end < multi.len() && (end == start || rows + members[multi[end]].len() <= chunk_rows)
        {
            rows += members[multi[end]].len();
            end += 1;
        }
        let sets = &multi[start..end];
        let idx: Vec<u32> = sets
            .iter()
            .flat_map(|&s| members[s].iter().copied())
            .collect();
        let host: Vec<f32> = gather(&idx)?;
        let d = host.len() / idx.len().max(1);
        let mut offsets = Vec::with_capacity(sets.len());
        let mut off = 0;
        for &s in sets {
            offsets.push(off);
            off += members[s].len();
        }
        let chosen: Vec<u32> = sets
            .par_iter()
            .zip(&offsets)
            .map(|(&s, &o)| {
                representative(&host[o * d..(o + members[s].len()) * d], d, &members[s])
            })
            .collect();
        for (&s, r) in sets.iter().zip(chosen) {
            reps[s] = r;
        }
        start = end;
    }
    Ok(reps)
}

/// The member nearest the mean of the members (f64), lowest id on ties. `rows` holds the
/// members' rows in the order of `members` (ascending ids), row-major `[members.len(), d]`.
fn representative(rows: &[f32], d: usize, members: &[u32]) -> u32 {
    let mut centroid = vec![0f64; d];
    for row in rows.chunks_exact(d) {
        for (c, v) in centroid.iter_mut().zip(row) {
            *c += *v as f64;
        }
    }
    centroid.iter_mut().for_each(|c| *c /= members.len() as f64);
    let mut best = (f64::INFINITY, members[0]);
    for (row, &id) in rows.chunks_exact(d).zip(members) {
        let dist: f64 = row
            .iter()
            .zip(&centroid)
            .map(|(v, c)| (*v as f64 - c).powi(2))
            .sum();
        if dist < best.0 {
            best = (dist, id);
        }
    }
    best.1
}

/// Kept counts for several thresholds in one incremental union-find over sorted pairs.
fn sweep_rows(n: usize, pairs: &NearPairs, thresholds: &[f32]) -> Vec<SweepRow> {
    if thresholds.is_empty() {
        return vec![];
    }
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by(|&a, &b| pairs.dist2[a].total_cmp(&pairs.dist2[b]));
    let mut ts: Vec<f32> = thresholds.to_vec();
    ts.sort_by(f32::total_cmp);
    ts.dedup();
    let mut uf = UnionFind::new(n);
    let mut k = 0;
    ts.iter()
        .map(|&t| {
            while k < order.len() && pairs.dist2[order[k]] < t * t {
                uf.union(pairs.i[order[k]], pairs.j[order[k]]);
                k += 1;
            }
            let kept = uf.num_sets();
            SweepRow {
                threshold: t,
                kept,
                removed_pct: 100.0 * (n - kept) as f64 / n as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_representatives_equal_one_chunk() {
        // 12 rows on a circle, grouped into sets of sizes 1..=4 in a scrambled order.
        let rows: Vec<Vec<f32>> = (0..12)
            .map(|k| vec![(k as f32 * 0.7).cos(), (k as f32 * 0.7).sin()])
            .collect();
        let x = Tensor::new(rows, &candle_core::Device::Cpu).unwrap();
        let members = vec![
            vec![0, 5, 7],
            vec![1],
            vec![2, 3, 9, 11],
            vec![4, 6],
            vec![8, 10],
        ];
        let gather = rows_of(&x);
        let whole = representatives(&gather, &members, usize::MAX).unwrap();
        for chunk in [1, 2, 3, 5] {
            assert_eq!(
                representatives(&gather, &members, chunk).unwrap(),
                whole,
                "chunk {chunk}"
            );
        }
        assert_eq!(whole[1], 1);
        // Set {0, 5, 7}: angles 0, 3.5, 4.9 rad; check against a direct computation.
        let direct = representative(
            &[0, 5, 7]
                .iter()
                .flat_map(|&k| [(k as f32 * 0.7).cos(), (k as f32 * 0.7).sin()])
                .collect::<Vec<_>>(),
            2,
            &[0, 5, 7],
        );
        assert_eq!(whole[0], direct);
    }

    /// "Pairs under a threshold": a pair exactly at it stays apart, in the partition, the
    /// pair count and a sweep row at that threshold alike (0.25 and its square are exact).
    #[test]
    fn a_pair_exactly_at_the_threshold_is_not_merged() {
        let t = 0.25f32;
        let pairs = NearPairs {
            i: vec![0, 1, 3],
            j: vec![1, 2, 4],
            dist2: vec![t * t, 0.5 * t * t, t * t],
        };
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|k| vec![(k as f32 * 0.1).cos(), (k as f32 * 0.1).sin()])
            .collect();
        let x = Tensor::new(rows, &candle_core::Device::Cpu).unwrap();
        let opts = BalanceOptions {
            threshold: t,
            sweep: vec![t, 0.3],
            ..Default::default()
        };
        let r = finish(5, &pairs, rows_of(&x), &opts, 0.0).unwrap();
        assert_eq!(r.set_id[1], r.set_id[2]);
        assert_eq!((r.summary.sets, r.summary.pairs), (4, 1));
        let kept: Vec<usize> = r.summary.sweep.iter().map(|w| w.kept).collect();
        assert_eq!(kept, [4, 2]);
    }
}
