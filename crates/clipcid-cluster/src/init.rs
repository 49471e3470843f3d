//! Seeded k-means++ initial centroids ([`KMeansInit::PlusPlus`](crate::KMeansInit)).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Seeded greedy k-means++ over the rows of `x` (as scikit-learn does it): the first centre
/// uniformly; then at each step `2 + ln K` candidates are drawn with probability
/// proportional to their squared distance to the nearest centre so far, and the candidate
/// that most lowers the total of those distances is taken. Plain k-means++ (one candidate)
/// still puts two seeds into one tight cluster now and then.
pub(crate) fn kmeans_plus_plus(x: &[f32], d: usize, k: usize, seed: u64) -> Vec<f32> {
    let n = x.len() / d;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dist2 = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f32>();
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let trials = 2 + (k as f64).ln().floor() as usize;
    let first = rng.random_range(0..n);
    let mut centres = Vec::with_capacity(k * d);
    centres.extend_from_slice(row(first));
    let mut nearest: Vec<f32> = x
        .par_chunks_exact(d)
        .map(|r| dist2(r, row(first)))
        .collect();
    for _ in 1..k {
        // Prefix sums in f64 so draws are exact and reproducible.
        let mut cumulative = Vec::with_capacity(n);
        let mut total = 0f64;
        for &v in &nearest {
            total += v as f64;
            cumulative.push(total);
        }
        let candidates: Vec<usize> = (0..trials)
            .map(|_| {
                if total > 0.0 {
                    let target = rng.random::<f64>() * total;
                    cumulative.partition_point(|&c| c <= target).min(n - 1)
                } else {
                    rng.random_range(0..n)
                }
            })
            .collect();
        // Potential (sum of nearest distances) after adding each candidate; lowest wins,
        // first candidate on ties.
        let potentials: Vec<f64> = candidates
            .iter()
            .map(|&c| {
                // Fixed chunks summed in order: the same total whatever the thread count.
                let parts: Vec<f64> = x
                    .par_chunks(4096 * d)
                    .zip(nearest.par_chunks(4096))
                    .map(|(rows, near)| {
                        rows.chunks_exact(d)
                            .zip(near)
                            .map(|(r, &m)| m.min(dist2(r, row(c))) as f64)
                            .sum::<f64>()
                    })
                    .collect();
                parts.iter().sum::<f64>()
            })
            .collect();
        let mut best = 0;
        for (i, &p) in potentials.iter().enumerate() {
            if p < potentials[best] {
                best = i;
            }
        }
        let c = row(candidates[best]);
        centres.extend_from_slice(c);
        nearest
            .par_iter_mut()
            .zip(x.par_chunks_exact(d))
            .for_each(|(m, r)| *m = m.min(dist2(r, c)));
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy k-means++ as scikit-learn's `_kmeans_plusplus` writes it, one row at a time in
    /// f64, with the same draws: the first centre uniformly, then `2 + floor(ln K)` candidates
    /// per centre by inverse-CDF draws on the running distances, the one that lowers their
    /// sum most (the first of equals) taken.
    fn reference(x: &[f32], d: usize, k: usize, seed: u64) -> Vec<f32> {
        let n = x.len() / d;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let row = |i: usize| &x[i * d..(i + 1) * d];
        let dist2 =
            |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum() };
        let trials = 2 + (k as f64).ln() as usize;
        let first = rng.random_range(0..n);
        let mut centres = row(first).to_vec();
        let mut nearest: Vec<f32> = (0..n).map(|i| dist2(row(i), row(first))).collect();
        for _ in 1..k {
            let total: f64 = nearest.iter().map(|&v| v as f64).sum();
            let mut candidates = vec![];
            for _ in 0..trials {
                let target = rng.random::<f64>() * total;
                let (mut running, mut pick) = (0.0, n - 1);
                for (i, &v) in nearest.iter().enumerate() {
                    running += v as f64;
                    if running > target {
                        pick = i;
                        break;
                    }
                }
                candidates.push(pick);
            }
            let potential = |c: usize| -> f64 {
                (0..n)
                    .map(|i| nearest[i].min(dist2(row(i), row(c))) as f64)
                    .sum()
            };
            let mut best = candidates[0];
            for &c in &candidates[1..] {
                if potential(c) < potential(best) {
                    best = c;
                }
            }
            centres.extend_from_slice(row(best));
            for (i, m) in nearest.iter_mut().enumerate() {
                *m = m.min(dist2(row(i), row(best)));
            }
        }
        centres
    }

    #[test]
    fn kmeans_plus_plus_matches_a_row_by_row_reference() {
        // 5,000 rows: more than one 4,096-row block of the parallel potential sums.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, d) = (5000, 2);
        let x: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        for (k, seed) in [(2, 1), (9, 2), (40, 3)] {
            assert_eq!(
                kmeans_plus_plus(&x, d, k, seed),
                reference(&x, d, k, seed),
                "K {k}"
            );
        }
    }
}
