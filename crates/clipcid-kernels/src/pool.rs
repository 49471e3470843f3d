//! Parallel loops on candle's CPU thread pool.
//!
//! candle 0.11 runs its element-wise CPU ops on its own pool of spinning workers
//! (`candle_core::utils::barrier_pool`), next to rayon's. Kernels of this crate that ran on
//! rayon left candle's workers spinning on the same cores while they worked, and the reverse
//! (candle's spin loop was 10% of a two-core training-step profile). The fused kernels and the
//! split BLAS products run on candle's pool instead, so a training step's parallel work takes
//! turns on one set of threads.

use std::ops::Range;
use std::sync::Mutex;

/// Calls `f(span, chunk)` for every `chunk_len`-long chunk of `out` (the last may be
/// shorter), where `span` is the chunk's place in `out` (to take the same span of inputs as
/// long as `out`), spread over candle's CPU threads; returns what each call returned, in
/// chunk order, so that reductions over the results do not depend on scheduling.
pub(crate) fn map_chunks_mut<T, R, F>(out: &mut [T], chunk_len: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(Range<usize>, &mut [T]) -> R + Sync,
{
    let chunk_len = chunk_len.max(1);
    let cells: Vec<Mutex<(&mut [T], Option<R>)>> = out
        .chunks_mut(chunk_len)
        .map(|c| Mutex::new((c, None)))
        .collect();
    run(cells.len(), |i| {
        // Each cell is locked once, by the one task that owns chunk `i`: never contended.
        let mut cell = cells[i].lock().unwrap_or_else(|e| e.into_inner());
        let start = i * chunk_len;
        let r = f(start..start + cell.0.len(), cell.0);
        cell.1 = Some(r);
    });
    cells
        .into_iter()
        .filter_map(|c| c.into_inner().unwrap_or_else(|e| e.into_inner()).1)
        .collect()
}

/// Calls `f(span, chunk)` for every `chunk_len`-long chunk of `out`, on candle's CPU threads
/// (see [`map_chunks_mut`]).
pub(crate) fn for_each_chunk_mut<T, F>(out: &mut [T], chunk_len: usize, f: F)
where
    T: Send,
    F: Fn(Range<usize>, &mut [T]) + Sync,
{
    map_chunks_mut(out, chunk_len, f);
}

/// Calls `f(i)` for `i` in `0..n`, spread over candle's CPU threads.
pub(crate) fn run(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(&f));
}

/// Threads a parallel loop runs on (candle's workers and the calling thread).
pub(crate) fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}
