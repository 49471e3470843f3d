//! faiss k-means through clipcid-cluster, the same cases as `../shared/peers/bench_kmeans.py`:
//! random unit vectors (512-d), 100k -> 1,000 and 200k -> 4,096 centroids, 10 iterations,
//! spherical and plain; median training seconds of `--reps` runs after one warm-up.
//!
//! `cargo bench --bench kmeans [-- --reps 3 --niter 10 --only-first | --only-second]`
//! (`--only-second`: the 200k case alone, for interleaving with the peer); `KM_VERBOSE=1` prints
//! faiss's per-iteration times (search vs the rest).

use std::time::Instant;

use clipcid_cluster::KMeans;
use clipcid_suite::{bench_arg as arg, blas_line, faiss_has_avx2_kernel, median};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn data(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut x: Vec<f32> = (0..n * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    for row in x.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    x
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps = arg("--reps", 3usize);
    let niter = arg("--niter", 10usize);
    let only_first = std::env::args().any(|a| a == "--only-first");
    let d = 512;
    let mut cases = vec![(100_000usize, 1_000usize), (200_000, 4_096)];
    if only_first {
        cases.truncate(1);
    } else if std::env::args().any(|a| a == "--only-second") {
        cases.remove(0);
    }
    println!(
        "faiss k-means via clipcid-cluster, niter={niter}, reps={reps} (+1 warm-up), {} threads",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("{}", blas_line());
    println!(
        "faiss L2 top-1 kernel: {}",
        match faiss_has_avx2_kernel() {
            Some(true) => "AVX2 (fused distance + arg-min)",
            Some(false) => "generic (distance pass, then arg-min pass)",
            None => "unknown (executable unreadable)",
        }
    );
    println!();
    println!("| n | k | spherical | median s | min s | max s | s/iter | objective |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for (n, k) in cases {
        let x = data(n, d, 0);
        for spherical in [true, false] {
            let run = |seed: u32| -> Result<(f64, f32), Box<dyn std::error::Error>> {
                let km = KMeans::new(k)
                    .iterations(niter)
                    .seed(seed)
                    .spherical(spherical)
                    .verbose(std::env::var_os("KM_VERBOSE").is_some());
                let t = Instant::now();
                let c = km.train(&x, d)?;
                Ok((t.elapsed().as_secs_f64(), c.objective))
            };
            run(1)?;
            let mut times = Vec::new();
            let mut obj = 0.0;
            for r in 0..reps {
                let (t, o) = run(1 + r as u32)?;
                times.push(t);
                obj = o;
            }
            let (mn, mx) = times
                .iter()
                .fold((f64::INFINITY, 0f64), |(a, b), &t| (a.min(t), b.max(t)));
            let med = median(times);
            println!(
                "| {n} | {k} | {spherical} | {med:.3} | {mn:.3} | {mx:.3} | {:.3} | {obj:.1} |",
                med / niter as f64
            );
        }
    }
    Ok(())
}
