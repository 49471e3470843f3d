//! Image semantic balance alone, on embeddings you already have: any safetensors file with an
//! `image` `[n, D]` tensor (or a folder of `embeddings-*.safetensors` shards), f32 or f16,
//! normalised or not. Writes the keep file (`keep` mask, duplicate set of each row, the row
//! each set keeps) and prints how much each threshold would remove.
//!
//! ```sh
//! # Small default run: 2,000 random 64-d embeddings, 600 of them planted near-copies.
//! cargo run --release --example dedup
//! # Your own embeddings:
//! cargo run --release --example dedup -- --embeddings my-embeddings.safetensors \
//!     --threshold 0.07 --sweep 0.05,0.07,0.08 --out keep.safetensors
//! ```

use std::error::Error;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clap::Parser;
use clipcid_pipeline::{BalanceArgs, BalanceOutcome};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Options (all have small defaults).
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Embedding files or shard folders (default: generated, see `--planted`).
    #[arg(long, num_args = 1..)]
    pub embeddings: Vec<PathBuf>,
    /// Euclidean distance between unit embeddings under which rows are duplicates.
    #[arg(long, default_value_t = 0.07)]
    pub threshold: f32,
    /// Also report these thresholds (same pass).
    #[arg(long, value_delimiter = ',', default_value = "0.03,0.05,0.07,0.1")]
    pub sweep: Vec<f32>,
    /// Generated data: distinct rows.
    #[arg(long, default_value_t = 1400)]
    pub distinct: usize,
    /// Generated data: near-copies of distinct rows (distance about 0.016).
    #[arg(long, default_value_t = 600)]
    pub planted: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output keep file.
    #[arg(long, default_value = "runs/example-dedup/keep.safetensors")]
    pub out: PathBuf,
}

/// `distinct` random 64-d rows and `planted` noisy copies of the first ones (seeded), written
/// as one embedding shard; returns its path.
pub fn planted_embeddings(
    path: &std::path::Path,
    distinct: usize,
    planted: usize,
) -> Result<PathBuf, Box<dyn Error>> {
    const D: usize = 64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut rows: Vec<f32> = (0..distinct * D)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    for i in 0..planted {
        let source = i % distinct.max(1);
        for j in 0..D {
            let noise: f32 = StandardNormal.sample(&mut rng);
            let v = rows[source * D + j];
            // A 64-d standard normal row has norm about 8, and noise of 0.016 per coordinate
            // has norm about 0.13: after normalisation the copy lies about 0.016 from its
            // source, while distinct rows lie about 1.41 apart.
            rows.push(v + 0.016 * noise);
        }
    }
    let n = distinct + planted;
    let image = Tensor::from_vec(rows, (n, D), &Device::Cpu)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    clipcid_store::io::write_safetensors(
        path,
        [("image".to_string(), image)],
        &Default::default(),
    )?;
    Ok(path.to_path_buf())
}

/// Balances the embeddings and writes the keep file.
pub fn run(args: &Args) -> Result<BalanceOutcome, Box<dyn Error>> {
    let device = clipcid_pipeline::parse_device(&args.device)?;
    let embeddings = if args.embeddings.is_empty() {
        let dir = args.out.parent().unwrap_or(std::path::Path::new("."));
        vec![planted_embeddings(
            &dir.join("planted.safetensors"),
            args.distinct,
            args.planted,
        )?]
    } else {
        args.embeddings.clone()
    };
    let balance = BalanceArgs {
        embeddings,
        threshold: args.threshold,
        sweep: args.sweep.clone(),
        ..BalanceArgs::new(PathBuf::new(), &args.out)
    };
    Ok(clipcid_pipeline::balance(&balance, &device)?)
}

#[allow(dead_code)] // not called when the tests include this file
fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let o = run(&args)?;
    let s = &o.result.summary;
    println!(
        "{} rows at threshold {}: {} duplicate sets, kept {}, removed {} ({:.2}%); keep file {}",
        s.n,
        s.threshold,
        s.sets,
        s.kept,
        s.removed,
        s.removed_pct,
        args.out.display()
    );
    println!("| threshold | kept | removed % |\n|---:|---:|---:|");
    for row in &s.sweep {
        println!(
            "| {} | {} | {:.2} |",
            row.threshold, row.kept, row.removed_pct
        );
    }
    Ok(())
}
