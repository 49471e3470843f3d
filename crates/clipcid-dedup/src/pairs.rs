//! Blockwise near-pair search on a candle device.

use candle_core::{DType, Tensor};
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
/// with one matmul per tile, so memory is `O(block^2)` whatever `n`. With `f16`, the tile
/// matmul runs in half precision (GPU); norms and the comparison stay f32.
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
    let x = x.to_dtype(DType::F32)?;
    let norms: Vec<f32> = x.sqr()?.sum(1)?.to_vec1()?;
    let t2 = threshold * threshold;
    let mm_dtype = if f16 { DType::F16 } else { DType::F32 };
    let xm = x.to_dtype(mm_dtype)?;
    let mut out = NearPairs::default();
    for i0 in (0..n).step_by(block) {
        let bi = block.min(n - i0);
        let a = xm.narrow(0, i0, bi)?;
        for j0 in (i0..n).step_by(block) {
            let bj = block.min(n - j0);
            let b = xm.narrow(0, j0, bj)?;
            let tile = a.matmul(&b.t()?)?.to_dtype(DType::F32)?;
            let (na, nb) = (&norms[i0..i0 + bi], &norms[j0..j0 + bj]);
            let diagonal = i0 == j0;
            let rows: Vec<Vec<(u32, u32, f32)>> = with_host_slice(&tile, |s| {
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
            })?;
            for (i, j, d2) in rows.into_iter().flatten() {
                out.i.push(i);
                out.j.push(j);
                out.dist2.push(d2);
            }
            on_tile();
        }
    }
    Ok(out)
}

/// Runs `f` on the f32 values of a contiguous tensor: in place for CPU tensors (the tile is
/// 64 MB at block 4096, and copying it out costs as much as scanning it), through a host copy
/// for other devices.
fn with_host_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
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
