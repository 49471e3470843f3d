//! Image semantic balance at scale: planted near-duplicates, per-stage seconds, peak memory,
//! and distance throughput against this machine's measured matmul peak.
//!
//! `cargo bench --bench dedup [-- --n 100000 --d 512 --thr 0.1 --block 4096]`
//!
//! Data as in `../shared/peers/bench_dedup.py`: 70% random unit vectors, 30% copies of a
//! random one plus Gaussian noise of expected norm 0.03, renormalised, shuffled.

use std::time::Instant;

use candle_core::{Device, Tensor};
use clipcid_dedup::{balance, BalanceOptions};
use clipcid_suite::{bench_arg as arg, blas_line, peak_rss_mb};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

fn planted(n: usize, d: usize, dup_frac: f64, noise: f32) -> (Vec<f32>, usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let n_dup = (n as f64 * dup_frac).round() as usize;
    let n_src = n - n_dup;
    let mut x = vec![0f32; n * d];
    let norm = |v: &mut [f32]| {
        let s = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.iter_mut().for_each(|a| *a /= s);
    };
    for i in 0..n_src {
        let row = &mut x[i * d..(i + 1) * d];
        row.iter_mut()
            .for_each(|a| *a = StandardNormal.sample(&mut rng));
        norm(row);
    }
    for i in n_src..n {
        let p = rng.random_range(0..n_src);
        for k in 0..d {
            let z: f32 = StandardNormal.sample(&mut rng);
            x[i * d + k] = x[p * d + k] + z * noise / (d as f32).sqrt();
        }
        norm(&mut x[i * d..(i + 1) * d]);
    }
    // Shuffle rows (Fisher-Yates).
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        for k in 0..d {
            x.swap(i * d + k, j * d + k);
        }
    }
    (x, n_src)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, d) = (arg("--n", 100_000usize), arg("--d", 512usize));
    let (thr, block) = (arg("--thr", 0.1f32), arg("--block", 4096usize));
    let dev = Device::Cpu;
    let (x, n_src) = planted(n, d, 0.3, 0.03);
    let x = Tensor::from_vec(x, (n, d), &dev)?;

    // The machine's matmul peak: one tile product as balance computes it on CPU (OpenBLAS
    // sgemm through ndarray), best of three.
    let a = ndarray::Array2::from_shape_fn((block, d), |(i, k)| ((i * 31 + k * 17) % 97) as f32);
    let mut c = ndarray::Array2::<f32>::zeros((block, block));
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        ndarray::linalg::general_mat_mul(1.0, &a, &a.t(), 0.0, &mut c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let peak_gflops = 2.0 * (block * block * d) as f64 / best / 1e9;

    let t = Instant::now();
    let r = balance(
        &x,
        &BalanceOptions {
            threshold: thr,
            block_size: block,
            ..Default::default()
        },
    )?;
    let total = t.elapsed().as_secs_f64();
    let s = &r.summary;
    let flops = (n as f64) * (n as f64 + block as f64) / 2.0 * 2.0 * d as f64; // upper-triangle tiles
    let dist_gflops = flops / s.seconds_distance / 1e9;
    println!(
        "n={n} d={d} thr={thr} block={block}, {} threads; expected kept {n_src}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("{}", blas_line());
    println!();
    println!("| stage | seconds |");
    println!("|---|---:|");
    println!(
        "| distance (blockwise matmul + threshold) | {:.2} |",
        s.seconds_distance
    );
    println!("| union-find | {:.3} |", s.seconds_union_find);
    println!("| representatives | {:.3} |", s.seconds_representatives);
    println!("| total | {total:.2} |");
    println!();
    println!(
        "kept {} (expected {n_src}), sets {}, largest {}, pairs {}, removed {:.2}%",
        s.kept, s.sets, s.largest_set, s.pairs, s.removed_pct
    );
    println!("peak RSS {:.0} MB", peak_rss_mb());
    println!("matmul peak {peak_gflops:.1} GFLOP/s; distance throughput {dist_gflops:.1} GFLOP/s ({:.2}x of peak)", dist_gflops / peak_gflops);
    Ok(())
}
