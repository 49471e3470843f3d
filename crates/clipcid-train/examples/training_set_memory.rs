//! Peak memory of a training set as the number of samples grows: teacher embeddings are read
//! per batch from the shards, so memory beyond the dataset index should not grow with `N * D`.
//!
//! ```text
//! cargo run --release -p clipcid-train --example training_set_memory -- 1000000 512
//! ```
//! Writes `N` rows of width `D` (f16 shards of 100,000 rows) and a captions file of `N`
//! lines into a temporary folder; then a fresh process (this program again) loads a
//! [`TrainingSet`] over them, reads 100 random batches of 256 teacher rows, and prints its
//! peak resident memory (VmHWM) beside what holding the embeddings as f32 would take.
#![allow(clippy::unwrap_used)] // a benchmark: a failed setup step should panic

use std::collections::HashMap;
use std::io::Write;

use candle_core::{DType, Device, Tensor};
use clipcid_train::{DataConfig, Needs, TrainingSet};
use rand::{Rng, SeedableRng};

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    if let Ok(dir) = std::env::var("CLIPCID_MEMORY_LOAD") {
        let shape = std::env::var("CLIPCID_MEMORY_SHAPE").unwrap_or_default();
        let v: Vec<usize> = shape.split(' ').map(|x| x.parse().unwrap()).collect();
        return load(std::path::Path::new(&dir), v[0], v[1]);
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("N and D are counts"))
        .collect();
    let (n, d) = (
        args.first().copied().unwrap_or(1_000_000),
        args.get(1).copied().unwrap_or(512),
    );
    let dir = tempfile::tempdir().unwrap();
    let emb = dir.path().join("emb");
    std::fs::create_dir(&emb).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let shard_rows = 100_000;
    for (k, start) in (0..n).step_by(shard_rows).enumerate() {
        let rows = shard_rows.min(n - start);
        let values: Vec<f32> = (0..rows * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let image = Tensor::from_vec(values, (rows, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let ids = Tensor::from_vec(
            (start as i64..(start + rows) as i64).collect::<Vec<_>>(),
            rows,
            &Device::Cpu,
        )
        .unwrap();
        clipcid_store::io::write_safetensors(
            &clipcid_store::shard_path(&emb, k),
            [("image".to_string(), image), ("ids".to_string(), ids)],
            &HashMap::new(),
        )
        .unwrap();
    }
    let captions = dir.path().join("captions.tsv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&captions).unwrap());
    for i in 0..n {
        writeln!(f, "img/{i:08}.jpg\tcaption {i}").unwrap();
    }
    drop(f);
    // Measure in a fresh process: this one's peak includes writing the data.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("CLIPCID_MEMORY_LOAD", dir.path())
        .env("CLIPCID_MEMORY_SHAPE", format!("{n} {d}"))
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

/// The measured half: load, read batches, print the table.
fn load(dir: &std::path::Path, n: usize, d: usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let before = peak_rss_mb();
    // The dataset's own sample index alone (what any run over these samples holds).
    let dataset = clipcid_data::Dataset::open(&dir.join("captions.tsv")).unwrap();
    let index = dataset.index().unwrap();
    let index_only = peak_rss_mb();
    drop((index, dataset));
    let data = DataConfig {
        dataset: dir.join("captions.tsv"),
        embeddings: Some(dir.join("emb")),
        ..Default::default()
    };
    let set = TrainingSet::load(&data, Needs::default()).unwrap();
    let loaded = peak_rss_mb();
    for _ in 0..100 {
        let rows: Vec<usize> = (0..256).map(|_| rng.random_range(0..set.len())).collect();
        let t = set.teacher_image(&rows).unwrap();
        assert_eq!(t.len(), 256 * d);
    }
    let after = peak_rss_mb();
    println!("| rows | width | peak RSS at start (MB) | dataset index alone | training set loaded | after 100 batches of 256 | the embeddings as f32 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {n} | {d} | {before:.0} | {index_only:.0} | {loaded:.0} | {after:.0} | {:.0} |",
        (n * d * 4) as f64 / 1048576.0
    );
}
