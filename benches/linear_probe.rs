//! Linear-probe fit time: multinomial logistic regression with L-BFGS on 50,000 x 512
//! features, 10 classes, the same synthetic data and regularisation as the scikit-learn peer
//! (`../shared/peers/bench_linprobe.py`: class means ~ N(0, 1/d), samples = mean +
//! N(0, sigma^2/d), sigma 2, rows normalised; `C = 0.316`, i.e. `l2 = 1 / (C n)` here).
//!
//! `cargo bench --bench linear_probe [-- --n 50000 --d 512 --classes 10 --reps 3]`

use std::time::Instant;

use clipcid_eval::{LabelledFeatures, LogisticRegression};
use clipcid_suite::{bench_arg as arg, median};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

fn normal(rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
    StandardNormal.sample(rng)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, d, k, reps) = (
        arg("--n", 50_000usize),
        arg("--d", 512usize),
        arg("--classes", 10usize),
        arg("--reps", 3usize),
    );
    let sigma: f32 = arg("--sigma", 2.0);
    let c: f64 = arg("--c", 0.316);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let scale = 1.0 / (d as f32).sqrt();
    let means: Vec<f32> = (0..k * d).map(|_| scale * normal(&mut rng)).collect();
    let y: Vec<usize> = (0..n).map(|_| rng.random_range(0..k)).collect();
    let mut x = Vec::with_capacity(n * d);
    for &label in &y {
        let row: Vec<f32> = (0..d)
            .map(|j| means[label * d + j] + sigma * scale * normal(&mut rng))
            .collect();
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        x.extend(row.iter().map(|v| v / norm));
    }
    let data = LabelledFeatures::new(&x, d, &y, k)?;
    let l2 = 1.0 / (c * n as f64);
    println!(
        "clipcid-eval L-BFGS (argmin, m = 10), f64 via OpenBLAS; n={n} d={d} classes={k} sigma={sigma} C={c} (l2 = {l2:.3e}), median of {reps} after 1 warm-up"
    );
    println!("{}", clipcid_suite::blas_line());
    LogisticRegression::fit(&data, k, l2, 1000, None)?;
    let mut times = vec![];
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let fit = LogisticRegression::fit(&data, k, l2, 1000, None)?;
        times.push(t.elapsed().as_secs_f64());
        last = Some(fit);
    }
    let fit = last.ok_or("no reps")?;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!("\n| fit median s | min s | iterations | train accuracy | objective |\n|---:|---:|---:|---:|---:|");
    println!(
        "| {:.3} | {:.3} | {} | {:.4} | {:.6} |",
        median(times),
        min,
        fit.iterations,
        fit.accuracy(&data),
        fit.loss
    );
    Ok(())
}
