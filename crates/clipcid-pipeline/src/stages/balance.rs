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
    clipcid_store::io::check_not_an_input(&args.out, emb.shards.iter().map(PathBuf::as_path))?;
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

/// Options of [`balance_pairs`] (`clipcid balance pairs`): one part's share of the
/// distance tiles of a balance split over N processes.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BalancePairsArgs {
    /// Embedding shards, as for `clipcid balance`.
    #[arg(long, required = true, num_args = 1..)]
    pub embeddings: Vec<PathBuf>,
    /// Output pair file (`.safetensors`), e.g. `pairs/part-3.safetensors`.
    #[arg(long)]
    pub out: PathBuf,
    /// This process's part `I/N`; without it torchrun's `RANK`/`WORLD_SIZE` or a Slurm
    /// array's task id and count give it.
    #[arg(long)]
    pub part: Option<clipcid_store::Part>,
    /// Search pairs up to this distance (the merge may use it or any smaller threshold,
    /// and sweep up to it).
    #[arg(long, default_value_t = 0.07)]
    pub threshold: f32,
    /// Rows per distance tile; every part of a run must use the same.
    #[arg(long, default_value_t = 4096)]
    pub block_size: usize,
    /// Tile matmuls in f16 (for GPUs).
    #[arg(long)]
    pub f16: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What [`balance_pairs`] did.
#[derive(Debug, Clone)]
pub struct PairsOutcome {
    /// The part searched.
    pub part: clipcid_store::Part,
    /// Row blocks it owned, of how many.
    pub row_blocks: (usize, usize),
    /// Near pairs found.
    pub pairs: usize,
    /// Rows held in memory at once (owned blocks plus one streamed block).
    pub rows_in_memory: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Searches this part's tiles ([`clipcid_dedup::near_pairs_of_part`]) reading rows on
/// demand from the shards, and writes the pair file `args.out`.
pub fn balance_pairs(
    args: &BalancePairsArgs,
    device: &Device,
) -> Result<PairsOutcome, PipelineError> {
    let start = std::time::Instant::now();
    let part = crate::stages::embed::part_of(args.part)?;
    let reader =
        clipcid_store::RowReader::open(clipcid_store::ShardLayout::open(&args.embeddings)?)?;
    clipcid_store::io::check_not_an_input(
        &args.out,
        reader.layout().shards.iter().map(PathBuf::as_path),
    )?;
    // Read before the search, which can take hours: the merge checks its rows against it.
    let row_ids = clipcid_store::row_ids_digest(reader.row_ids()?);
    let block = args.block_size.max(1);
    let tiles = reader.len().div_ceil(block);
    let mine = clipcid_dedup::part_row_blocks(tiles, part);
    let total_tiles: usize = mine.iter().map(|r| tiles - r).sum();
    let bar = progress(!args.quiet, total_tiles as u64, "tiles");
    let pairs = clipcid_dedup::near_pairs_of_part(
        &reader,
        part,
        args.threshold,
        args.block_size,
        args.f16,
        device,
        || bar.inc(1),
    )?;
    bar.finish_and_clear();
    let found = pairs.len();
    let file = clipcid_dedup::PairFile {
        pairs,
        rows: reader.len(),
        threshold: args.threshold,
        block_size: args.block_size,
        f16: args.f16,
        part,
        embeddings: reader.layout().provenance.clone(),
        row_ids: Some(row_ids),
    };
    clipcid_dedup::write_pair_file(&args.out, &file)?;
    Ok(PairsOutcome {
        part,
        row_blocks: (mine.len(), tiles),
        pairs: found,
        rows_in_memory: mine
            .iter()
            .map(|&b| block.min(reader.len() - b * block))
            .sum::<usize>()
            + block.min(reader.len()),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Options of [`balance_merge`] (`clipcid balance merge`).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BalanceMergeArgs {
    /// The embedding shards the pairs were searched in.
    #[arg(long, required = true, num_args = 1..)]
    pub embeddings: Vec<PathBuf>,
    /// Every part's pair file (`balance pairs --out`), in any order.
    #[arg(long, required = true, num_args = 1..)]
    pub pairs: Vec<PathBuf>,
    /// Output keep file, as `clipcid balance --out`.
    #[arg(long)]
    pub out: PathBuf,
    /// Duplicate threshold (at most the one the pairs were searched with).
    #[arg(long, default_value_t = 0.07)]
    pub threshold: f32,
    /// Also report the removed fraction at these thresholds (each at most the search's).
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<f32>,
}

/// Union-find over every part's pairs ([`clipcid_dedup::merge_pair_files`]) and the keep
/// file `args.out`: the keep list one `clipcid balance` process writes.
pub fn balance_merge(args: &BalanceMergeArgs) -> Result<BalanceOutcome, PipelineError> {
    let layout = clipcid_store::ShardLayout::open(&args.embeddings)?;
    clipcid_store::io::check_not_an_input(
        &args.out,
        layout
            .shards
            .iter()
            .chain(&args.pairs)
            .map(PathBuf::as_path),
    )?;
    let shards = layout.shards.len();
    let provenance = layout.provenance.clone();
    let reader = clipcid_store::RowReader::open(layout)?;
    // Ids only, read before the merge (the reader keeps them, for the pair files' digest and
    // the keep file); the shards' embeddings are read by the merge, a chunk of sets at a time.
    let ids = reader.row_ids()?;
    let files = args
        .pairs
        .iter()
        .map(|p| Ok((p.clone(), clipcid_dedup::read_pair_file(p)?)))
        .collect::<Result<Vec<_>, PipelineError>>()?;
    let opts = BalanceOptions {
        threshold: args.threshold,
        sweep: args.sweep.clone(),
        ..Default::default()
    };
    let result = clipcid_dedup::merge_pair_files(&reader, &files, &opts)?;
    clipcid_store::write_keep_file(
        &args.out,
        &result.keep,
        &result.set_id,
        &result.representatives,
        ids,
        &result.summary,
        provenance.as_deref(),
    )?;
    Ok(BalanceOutcome { result, shards })
}

fn progress(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(s) = indicatif::ProgressStyle::with_template(&format!(
        "balance pairs [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {what} (eta {{eta}})"
    )) {
        bar.set_style(s);
    }
    bar
}
