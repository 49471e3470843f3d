//! PartialFC forward + backward on CPU: K = 100,000 centres, D = 512, batch 256, sample
//! rate 0.1 vs 1.0; median seconds per step and peak memory. Each rate runs in a child
//! process so its peak resident memory is its own.
//!
//! `cargo bench --bench partial_fc [-- --k 100000 --d 512 --batch 256 --steps 5]`

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clipcid_loss::{Margin, PartialFc};
use clipcid_suite::{bench_arg as arg, median, peak_rss_mb};
use rand::{Rng, SeedableRng};

fn one_rate(
    rate: f64,
    k: usize,
    d: usize,
    batch: usize,
    steps: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let centres = Tensor::randn(0f32, 1.0, (k, d), &dev)?;
    let mut fc = PartialFc::new(&centres, rate, 64.0, Margin::ArcFace(0.3), 0)?;
    drop(centres);
    let base = peak_rss_mb();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut times = Vec::new();
    for step in 0..steps + 1 {
        let x = Tensor::randn(0f32, 1.0, (batch, d), &dev)?;
        let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..k as u32)).collect();
        let t = Instant::now();
        let out = fc.forward(&x, &labels)?;
        let grads = out.loss.backward()?;
        let gw = grads.get(fc.weight()).ok_or("no centre gradient")?;
        gw.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "{rate}\t{:.4}\t{:.0}\t{:.0}",
        median(times),
        peak_rss_mb(),
        peak_rss_mb() - base
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (k, d) = (arg("--k", 100_000usize), arg("--d", 512usize));
    let (batch, steps) = (arg("--batch", 256usize), arg("--steps", 5usize));
    let rate = arg("--rate", f64::NAN);
    if rate.is_finite() {
        return one_rate(rate, k, d, batch, steps);
    }
    let exe = std::env::current_exe()?;
    println!("PartialFC fwd+bwd, K={k} D={d} batch={batch}, ArcFace 0.3 s=64, median of {steps} steps after 1 warm-up, f32 CPU");
    println!();
    println!("| sample rate | centres per step | s/step | peak RSS MB | above the centres MB |");
    println!("|---:|---:|---:|---:|---:|");
    for r in [0.1, 1.0] {
        let out = Command::new(&exe)
            .args([
                "--rate",
                &r.to_string(),
                "--k",
                &k.to_string(),
                "--d",
                &d.to_string(),
            ])
            .args(["--batch", &batch.to_string(), "--steps", &steps.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default().to_string();
        let f: Vec<&str> = line.split('\t').collect();
        if !out.status.success() || f.len() != 4 {
            return Err(format!(
                "rate {r} failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let centres = ((r * k as f64).ceil() as usize).min(k);
        println!("| {r} | {centres} | {} | {} | {} |", f[1], f[2], f[3]);
    }
    Ok(())
}
