//! Balance split over independent processes: each part finds the near pairs of its share of
//! the distance tiles and writes a pair file ([`near_pairs_of_part`], [`write_pair_file`]);
//! one merge runs union-find over every part's pairs and picks the representatives
//! ([`merge_pair_files`]). The keep list equals the one-process [`balance`](crate::balance)'s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clipcid_store::{Part, RowReader};

use crate::pairs::{
    cpu_tile, folded, row_sq_norms, scan_tile, DeviceTiles, Folded, TILES_PER_READ,
};
use crate::{BalanceOptions, BalanceResult, DedupError, NearPairs};

/// A row block a part owns: its index, its unit rows on the host (CPU products) or on the
/// device (other products), and its rows' squared norms.
type OwnedBlock = (usize, Vec<f32>, Vec<f32>, Option<Folded>);

/// `kind` metadata of a pair file.
pub const PAIRS_KIND: &str = "clipcid-near-pairs";

/// Metadata key of a pair file's [`PairFile::row_ids`].
const ROW_IDS_META: &str = "row_ids";

/// One part's near pairs and how they were searched ([`write_pair_file`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PairFile {
    /// Pairs `(i, j)` of global row positions, `i < j`, with squared distances.
    pub pairs: NearPairs,
    /// Rows of the embeddings searched.
    pub rows: usize,
    /// Distance searched up to (the merge may use any threshold up to it).
    pub threshold: f32,
    /// Rows per tile.
    pub block_size: usize,
    /// Tile products in f16.
    pub f16: bool,
    /// Which part of the tiles this is.
    pub part: Part,
    /// Provenance of the embeddings searched (metadata `embeddings`).
    pub embeddings: Option<String>,
    /// The searched rows' dataset ids in order, as [`clipcid_store::row_ids_digest`] gives
    /// them (metadata `row_ids`); `None` for a file that records none. The pairs name rows
    /// by position, so the merge must read the same rows in the same order.
    pub row_ids: Option<String>,
}

/// The row blocks (of `block` rows) part `part` owns among `tiles` of them. Row block `r`
/// has `tiles - r` tiles of the upper triangle, so blocks go in pairs `{p, T-1-p}` of
/// `T + 1` tiles each (the middle block alone when `T` is odd), and pair `p` to part
/// `p mod N`: parts differ by at most one pair's tiles.
///
/// ```
/// use clipcid_store::Part;
/// let all: Vec<Vec<usize>> = (0..3).map(|i| clipcid_dedup::part_row_blocks(7, Part::new(i, 3).unwrap())).collect();
/// assert_eq!(all, [vec![0, 3, 6], vec![1, 5], vec![2, 4]]);
/// ```
pub fn part_row_blocks(tiles: usize, part: Part) -> Vec<usize> {
    let mut mine: Vec<usize> = (0..tiles.div_ceil(2))
        .filter(|&p| part.owns(p as u64))
        .flat_map(|p| {
            let mirror = tiles - 1 - p;
            if mirror == p {
                vec![p]
            } else {
                vec![p, mirror]
            }
        })
        .collect();
    mine.sort_unstable();
    mine
}

/// The near pairs (squared distance under `threshold²`) of part `part`'s row blocks
/// ([`part_row_blocks`]) against every block at or right of them: the part's share of the
/// tiles [`near_pairs`](crate::near_pairs) computes over all rows. The part's own rows stay
/// in memory and the other blocks are read one at a time from the shards, so memory is
/// `(rows owned + block) x D x 4` bytes for the rows plus one `block x block` tile (on a
/// device, the tiles of one read-back: up to 32 column blocks, and at most 1 GiB of f32 tile
/// products); every part reads the embeddings once. On the CPU with f32 tiles the tile
/// products are the one process's, bit for bit.
pub fn near_pairs_of_part(
    rows: &RowReader,
    part: Part,
    threshold: f32,
    block: usize,
    f16: bool,
    device: &Device,
    mut on_tile: impl FnMut(),
) -> Result<NearPairs, DedupError> {
    if block == 0 {
        return Err(DedupError::Config("block size must be at least 1".into()));
    }
    crate::check_threshold(threshold)?;
    let (n, d) = (rows.len(), rows.dim());
    let tiles = n.div_ceil(block);
    let t2 = threshold * threshold;
    let span = |b: usize| (b * block, block.min(n - b * block));
    let load = |b: usize| -> Result<(Vec<f32>, Vec<f32>), DedupError> {
        let (start, len) = span(b);
        let values = rows.rows(start..start + len)?;
        let norms = row_sq_norms(&Tensor::from_slice(&values, (len, d), &Device::Cpu)?)?;
        Ok((values, norms))
    };
    let on_cpu = device.is_cpu() && !f16;
    // The part's own blocks: host rows for the CPU product, or put on the device once.
    let owned: Vec<OwnedBlock> = part_row_blocks(tiles, part)
        .into_iter()
        .map(|b| {
            let (rows_b, norms) = load(b)?;
            if on_cpu {
                return Ok::<_, DedupError>((b, rows_b, norms, None));
            }
            let t = Tensor::from_slice(&rows_b, (span(b).1, d), device)?;
            let (left, _) = folded(&t, &norms, f16)?;
            Ok((b, vec![], norms, Some(left)))
        })
        .collect::<Result<_, _>>()?;
    let mut buf = if on_cpu {
        vec![0f32; block.min(n) * block.min(n)]
    } else {
        vec![]
    };
    let mut out = NearPairs::default();
    let mut device_tiles = DeviceTiles::new(t2, TILES_PER_READ);
    for bj in 0..tiles {
        let users: Vec<_> = owned.iter().filter(|(bi, ..)| *bi <= bj).collect();
        if users.is_empty() {
            continue;
        }
        let (j0, len_j) = span(bj);
        let (b_rows, b_norms) = load(bj)?;
        let b_dev = if on_cpu {
            None
        } else {
            let t = Tensor::from_slice(&b_rows, (len_j, d), device)?;
            Some(folded(&t, &b_norms, f16)?.1)
        };
        for (bi, a_rows, a_norms, a_dev) in users {
            let (i0, len_i) = span(*bi);
            match (a_dev, &b_dev) {
                (Some(a), Some(b)) => {
                    let (a, b) = (a.clone(), b.clone());
                    device_tiles.push(a, b, i0, j0, a_norms, &mut out, &mut on_tile)?;
                }
                _ => {
                    cpu_tile(a_rows, &b_rows, d, &mut buf)?;
                    let found = scan_tile(&buf[..len_i * len_j], i0, j0, a_norms, &b_norms, t2);
                    out.extend_pairs(found.into_iter().flatten());
                    on_tile();
                }
            }
        }
    }
    device_tiles.finish(&mut out, &mut on_tile)?;
    Ok(out)
}

/// Writes a pair file atomically: tensors `i`, `j` (u32) and `dist2` (f32); metadata `kind`,
/// `rows`, `threshold`, `block_size`, `f16`, `part` (`I/N`), `embeddings` (provenance) and
/// `row_ids` (the rows' ids digest).
pub fn write_pair_file(path: &Path, file: &PairFile) -> Result<(), DedupError> {
    let cpu = Device::Cpu;
    let p = &file.pairs;
    let n = p.len();
    let tensors = vec![
        ("i".to_string(), Tensor::from_slice(&p.i, n, &cpu)?),
        ("j".to_string(), Tensor::from_slice(&p.j, n, &cpu)?),
        ("dist2".to_string(), Tensor::from_slice(&p.dist2, n, &cpu)?),
    ];
    let mut meta: std::collections::HashMap<String, String> = [
        ("kind", PAIRS_KIND.to_string()),
        ("rows", file.rows.to_string()),
        ("threshold", file.threshold.to_string()),
        ("block_size", file.block_size.to_string()),
        ("f16", file.f16.to_string()),
        ("part", file.part.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(e) = &file.embeddings {
        meta.insert(clipcid_store::EMBEDDINGS_META.to_string(), e.clone());
    }
    if let Some(d) = &file.row_ids {
        meta.insert(ROW_IDS_META.to_string(), d.clone());
    }
    clipcid_store::io::write_safetensors(path, tensors, &meta)?;
    Ok(())
}

/// Reads a pair file, checking its kind, metadata and tensors; errors name the file.
pub fn read_pair_file(path: &Path) -> Result<PairFile, DedupError> {
    let bad = |msg: String| DedupError::Config(format!("{}: {msg}", path.display()));
    let header = clipcid_store::io::read_header(path)?;
    let meta = |k: &str| {
        header.metadata.get(k).ok_or_else(|| {
            bad(format!(
                "not a pair file of `clipcid balance pairs` (no `{k}`)"
            ))
        })
    };
    if meta("kind")? != PAIRS_KIND {
        return Err(bad(format!("not a pair file (kind `{}`)", meta("kind")?)));
    }
    let num = |k: &str| -> Result<usize, DedupError> {
        meta(k)?
            .parse()
            .map_err(|_| bad(format!("bad `{k}` metadata")))
    };
    let threshold: f32 = meta("threshold")?
        .parse()
        .ok()
        .filter(|&t| crate::check_threshold(t).is_ok())
        .ok_or_else(|| bad("bad `threshold` metadata (not a positive, finite distance)".into()))?;
    let part: Part = meta("part")?.parse().map_err(bad)?;
    let rows = num("rows")?;
    let mut t = clipcid_store::io::load_tensors(path)?;
    let mut take = |k: &str, dtype: DType| -> Result<Tensor, DedupError> {
        let x = t.remove(k).ok_or_else(|| bad(format!("no `{k}` tensor")))?;
        if x.dtype() != dtype || x.rank() != 1 {
            return Err(bad(format!("`{k}` must be a {dtype:?} vector")));
        }
        Ok(x)
    };
    let pairs = NearPairs {
        i: take("i", DType::U32)?.to_vec1()?,
        j: take("j", DType::U32)?.to_vec1()?,
        dist2: take("dist2", DType::F32)?.to_vec1()?,
    };
    let (ni, nj, nd) = (pairs.i.len(), pairs.j.len(), pairs.dist2.len());
    if ni != nj || ni != nd {
        return Err(bad(format!(
            "`i`, `j`, `dist2` have lengths {ni}, {nj}, {nd}"
        )));
    }
    if let Some(k) = (0..ni).find(|&k| {
        pairs.i[k] >= pairs.j[k] || pairs.j[k] as usize >= rows || !pairs.dist2[k].is_finite()
    }) {
        return Err(bad(format!(
            "pair {k} ({}, {}, {}) is not a pair of distinct rows below {rows}",
            pairs.i[k], pairs.j[k], pairs.dist2[k]
        )));
    }
    Ok(PairFile {
        pairs,
        rows,
        threshold,
        block_size: num("block_size")?,
        f16: meta("f16")? == "true",
        part,
        embeddings: header.metadata.get(clipcid_store::EMBEDDINGS_META).cloned(),
        row_ids: header.metadata.get(ROW_IDS_META).cloned(),
    })
}

/// Union-find over the pairs of every part and the representatives read from `rows`: the
/// one-process [`balance`](crate::balance) result. The pair files must be the `N` parts
/// `0/N .. N-1/N` of one search over these rows (same row count, block size, precision and
/// recorded embeddings, and the same rows in the same order where a file records their ids'
/// digest) up to at least `opts.threshold` and every sweep threshold; anything else is an
/// error naming the file or the missing parts. Memory: the pairs, the `n` union-find
/// entries, the rows' ids (kept by `rows`, [`RowReader::row_ids`]), and the rows of one
/// chunk of duplicate sets.
pub fn merge_pair_files(
    rows: &RowReader,
    files: &[(PathBuf, PairFile)],
    opts: &BalanceOptions,
) -> Result<BalanceResult, DedupError> {
    let Some((first_path, first)) = files.first() else {
        return Err(DedupError::Config("no pair files given".into()));
    };
    opts.check_thresholds()?;
    let count = first.part.count();
    // The parts given, by index: as many entries as files, whatever count a file claims.
    let mut seen = std::collections::HashMap::<u64, &Path>::new();
    let needed = opts.sweep.iter().copied().fold(opts.threshold, f32::max);
    // Read only when a file records a digest (files written before it was recorded do not).
    let mut row_ids: Option<String> = None;
    for (path, f) in files {
        let err = |msg: String| DedupError::Config(format!("{}: {msg}", path.display()));
        if f.rows != rows.len() {
            return Err(err(format!(
                "pairs of {} rows, but the embeddings hold {}",
                f.rows,
                rows.len()
            )));
        }
        clipcid_store::check_same_embeddings(
            path,
            "pair file",
            f.embeddings.as_deref(),
            rows.layout().provenance.as_deref(),
        )?;
        if let Some(recorded) = &f.row_ids {
            let here = match &row_ids {
                Some(d) => d,
                None => row_ids.insert(clipcid_store::row_ids_digest(rows.row_ids()?)),
            };
            if recorded != here {
                return Err(err(
                    "these pairs were searched over other rows, or over these rows in another \
                     order (the rows' dataset ids differ); give the merge the --embeddings that \
                     `balance pairs` searched, in the same order"
                        .into(),
                ));
            }
        }
        if (f.part.count(), f.block_size, f.f16, f.threshold)
            != (count, first.block_size, first.f16, first.threshold)
        {
            return Err(err(format!(
                "part {} of a search with block {}, f16 {}, threshold {}; {} is part {} of block {}, f16 {}, threshold {}",
                f.part, f.block_size, f.f16, f.threshold,
                first_path.display(), first.part, first.block_size, first.f16, first.threshold
            )));
        }
        if f.threshold < needed {
            return Err(err(format!(
                "pairs were searched up to {}, below the threshold {needed} asked for; run `balance pairs` with --threshold {needed}",
                f.threshold
            )));
        }
        if let Some(other) = seen.insert(f.part.index(), path) {
            return Err(err(format!(
                "part {} is also given as {}",
                f.part,
                other.display()
            )));
        }
    }
    // Every index is below the count and none repeats, so `count - seen` parts are missing;
    // the first few are named (a count of 2^60 once sized a table of every part).
    let absent = count - seen.len() as u64;
    if absent > 0 {
        const NAMED: usize = 8;
        let mut missing: Vec<String> = (0..count)
            .filter(|i| !seen.contains_key(i))
            .take(NAMED)
            .map(|i| format!("{i}/{count}"))
            .collect();
        if absent > NAMED as u64 {
            missing.push(format!("and {} more", absent - NAMED as u64));
        }
        return Err(DedupError::Config(format!(
            "pair files of parts {} are missing",
            missing.join(", ")
        )));
    }
    let t0 = Instant::now();
    let mut pairs = NearPairs::default();
    for (_, f) in files {
        pairs.i.extend_from_slice(&f.pairs.i);
        pairs.j.extend_from_slice(&f.pairs.j);
        pairs.dist2.extend_from_slice(&f.pairs.dist2);
    }
    let gather = |idx: &[u32]| -> Result<Vec<f32>, DedupError> { Ok(rows.gather(idx)?) };
    crate::finish(rows.len(), &pairs, gather, opts, t0.elapsed().as_secs_f64())
}
