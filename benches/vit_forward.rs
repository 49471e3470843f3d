//! Image-tower forward throughput on CPU: ViT-B/32 teacher and the PicCollage students.
//!
//! `cargo bench --bench vit_forward [-- --batch 32 --reps 5 --warmup 1 --models teacher,s12]`
//!
//! `--models` picks rows by a word of their label (`teacher`, `s12`, `s24`; default all), so a
//! profiler can record one model alone.
//!
//! Random weights (throughput does not depend on their values), f32, batch of random pixels.
//! Prints a markdown table: median seconds per batch and images/s. Peer for comparison:
//! `../shared/peers/bench_vit.py` (open_clip on PyTorch, same shapes).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clipcid_models::{ClipConfig, ClipModel};
use clipcid_suite::{bench_arg as arg, blas_line, median};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (batch, reps, warmup) = (arg("--batch", 32), arg("--reps", 5), arg("--warmup", 1));
    let models: String = arg("--models", "teacher,s12,s24".to_string());
    let device = Device::Cpu;
    println!(
        "candle 0.11 CPU, {} threads, batch {batch}, f32, median of {reps} after {warmup} warm-up",
        rayon_threads()
    );
    println!("{}", blas_line());
    println!();
    println!("| model | vision params (M) | median s/batch | min s | images/s |");
    println!("|---|---:|---:|---:|---:|");
    for (label, preset) in [
        ("teacher ViT-B/32 (w768 L12 h12)", "vit-b-32"),
        ("student PicCollage (w384 L6 h12)", "piccollage-s12"),
        ("student PicCollage (w384 L6 h24)", "piccollage-s24"),
    ] {
        if !models
            .split(',')
            .any(|m| preset.ends_with(m) || label.contains(m))
        {
            continue;
        }
        let cfg = ClipConfig::preset(preset)?;
        let model = ClipModel::random(&cfg, 0, &device)?;
        let params: usize = model
            .tensors()
            .iter()
            .filter(|(n, _)| n.starts_with("vision_model") || n.starts_with("visual"))
            .map(|(_, t)| t.elem_count())
            .sum();
        let s = cfg.vision_config.image_size;
        let x = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &device)?.to_dtype(DType::F32)?;
        for _ in 0..warmup {
            model.encode_image(&x)?;
        }
        let mut ts = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            let y = model.encode_image(&x)?;
            y.to_vec2::<f32>()?; // force completion
            ts.push(t0.elapsed().as_secs_f64());
        }
        let min = ts.iter().cloned().fold(f64::INFINITY, f64::min);
        let med = median(ts);
        println!(
            "| {label} | {:.2} | {med:.3} | {min:.3} | {:.1} |",
            params as f64 / 1e6,
            batch as f64 / med
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
