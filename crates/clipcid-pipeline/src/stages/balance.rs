//! `clipcid balance`: near-duplicate removal (image semantic balance) into a keep file.

use std::path::PathBuf;

use candle_core::Device;
use clipcid_dedup::{BalanceOptions, BalanceResult};

use crate::PipelineError;

/// Options of [`balance`] (the `clipcid balance` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BalanceArgs {
    /// Embedding shards: folders of `embeddings-*.safetensors` or single safetensors files
    /// with an `image` [n, D] tensor.
    #[arg(long, required = true, num_args = 1..)]
    pub embeddings: Vec<PathBuf>,
    /// Output keep file (`.safetensors`; the summary is also written as `.json` beside it).
    #[arg(long)]
    pub out: PathBuf,
    /// Euclidean distance between normalised embeddings under which images are duplicates.
    #[arg(long, default_value_t = 0.07)]
    pub threshold: f32,
    /// Rows per distance tile (memory grows with its square, not with N).
    #[arg(long, default_value_t = 4096)]
    pub block_size: usize,
    /// Tile matmuls in f16 (for GPUs).
    #[arg(long)]
    pub f16: bool,
    /// Also report the removed fraction at these thresholds (comma-separated), same pass.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<f32>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl BalanceArgs {
    /// The command line's defaults (threshold 0.07) for one shard folder or file, without a
    /// progress bar.
    pub fn new(embeddings: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            embeddings: vec![embeddings.into()],
            out: out.into(),
            threshold: 0.07,
            block_size: 4096,
            f16: false,
            sweep: vec![],
            quiet: true,
        }
    }
}

/// What [`balance`] did.
#[derive(Debug, Clone)]
pub struct BalanceOutcome {
    /// Keep flags, duplicate sets and the summary.
    pub result: BalanceResult,
    /// Shards read.
    pub shards: usize,
}

/// Reads the shards onto `device`, balances them and writes the keep file `args.out`.
pub fn balance(args: &BalanceArgs, device: &Device) -> Result<BalanceOutcome, PipelineError> {
    let emb = clipcid_dedup::load_embeddings(&args.embeddings, device)?;
    let opts = BalanceOptions {
        threshold: args.threshold,
        block_size: args.block_size,
        f16: args.f16,
        sweep: args.sweep.clone(),
        progress: !args.quiet,
    };
    let result = clipcid_dedup::balance(&emb.image, &opts)?;
    clipcid_dedup::write_keep_file(&args.out, &result, &emb)?;
    Ok(BalanceOutcome {
        result,
        shards: emb.shards.len(),
    })
}
