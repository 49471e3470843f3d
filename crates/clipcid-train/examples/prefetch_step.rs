//! Does decoding ahead of the step hide the loading? Times PicCollage training steps of the
//! w384 L6 student (224 px, batch 16) on JPEGs read from disk, with batches decoded inside
//! the step (`prefetch = 0`) and on the worker thread (`prefetch = 2`), beside the time to
//! assemble one batch alone (read + decode + preprocess + teacher rows).
//!
//! ```text
//! cargo run --release -p clipcid-train --example prefetch_step
//! ```
#![allow(clippy::unwrap_used)] // a benchmark: a failed setup step should panic

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use candle_core::{Device, Tensor};
use clipcid_train::{DistillConfig, Trainer};
use rand::{Rng, SeedableRng};

const N: usize = 112;
const BATCH: usize = 16;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("img")).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut tsv = std::fs::File::create(d.join("captions.tsv")).unwrap();
    for i in 0..N {
        // Photo-sized noise images, so decoding and resizing cost what real JPEGs cost.
        let img = image::RgbImage::from_fn(480, 360, |x, y| {
            let v = rng.random_range(0..64u8);
            image::Rgb([
                (x % 256) as u8 / 2 + v,
                (y % 256) as u8 / 2 + v,
                (i * 9 % 256) as u8 / 2 + v,
            ])
        });
        img.save(d.join(format!("img/{i:04}.jpg"))).unwrap();
        writeln!(tsv, "img/{i:04}.jpg\tphoto {i}").unwrap();
    }
    let dim = clipcid_models::ClipConfig::preset("piccollage-s12")
        .unwrap()
        .projection_dim;
    let rows: Vec<f32> = (0..N * dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    std::fs::create_dir(d.join("emb")).unwrap();
    clipcid_store::io::write_safetensors(
        &clipcid_store::shard_path(&d.join("emb"), 0),
        [
            (
                "image".to_string(),
                Tensor::from_vec(rows, (N, dim), &Device::Cpu).unwrap(),
            ),
            (
                "ids".to_string(),
                Tensor::from_vec((0..N as i64).collect::<Vec<_>>(), N, &Device::Cpu).unwrap(),
            ),
        ],
        &HashMap::new(),
    )
    .unwrap();
    let config = |prefetch: usize| {
        let p = d.join(format!("run-{prefetch}.toml"));
        std::fs::write(
            &p,
            format!(
                "mode = \"piccollage\"\nbatch_size = {BATCH}\nepochs = 1\nprefetch = {prefetch}\ncheckpoint_every = 100000\n[student]\nmodel = \"piccollage-s12\"\n[data]\ndataset = \"captions.tsv\"\nembeddings = \"emb\"\n"
            ),
        )
        .unwrap();
        DistillConfig::from_file(&p).unwrap()
    };
    let mut figures = vec![];
    for prefetch in [0, 2, 0, 2] {
        let out = d.join(format!("out-{prefetch}-{}", figures.len()));
        let mut t = Trainer::new(config(prefetch), &out, &Device::Cpu).unwrap();
        let mut secs = vec![];
        for _ in 0..t.total_steps() {
            let start = Instant::now();
            t.step().unwrap();
            secs.push(start.elapsed().as_secs_f64());
        }
        // The first step starts the queue (and warms the caches): left out.
        let mean = secs[1..].iter().sum::<f64>() / (secs.len() - 1) as f64;
        figures.push((prefetch, mean));
        if prefetch == 0 && figures.len() == 1 {
            let set = t.training_set();
            let pre = clipcid_data::Preprocess::clip(224);
            let start = Instant::now();
            for b in 0..N / BATCH {
                let rows: Vec<usize> = (b * BATCH..(b + 1) * BATCH).collect();
                set.batch(&rows, &pre, None, &Device::Cpu).unwrap();
            }
            let batch = start.elapsed().as_secs_f64() / (N / BATCH) as f64;
            println!(
                "assembling one batch alone (read, decode, preprocess, teacher rows): {batch:.3} s"
            );
        }
    }
    println!("| prefetch | mean step s (steps 2..{}) |", N / BATCH);
    println!("|---:|---:|");
    for (p, s) in &figures {
        println!("| {p} | {s:.3} |");
    }
}
