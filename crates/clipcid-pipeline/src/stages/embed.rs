//! `clipcid embed`: teacher embeddings of a dataset into resumable shards.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clipcid_data::Dataset;
use clipcid_embed::{embed_dataset, EmbedDtype, EmbedOptions, EmbedSummary};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};

use crate::{input_error, resolve_model_path, tokenizer_beside, PipelineError};

/// Options of [`embed`] (the `clipcid embed` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct EmbedArgs {
    /// Teacher checkpoint: a `.safetensors` file, a model folder (HF or OpenCLIP names), or a
    /// Hugging Face repository id (`owner/name`, cached; HF_HUB_OFFLINE=1 uses only the cache).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Model config (HF `config.json`) overriding the one found with the teacher.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dataset: captions `.tsv`/`.csv`, a `.tar` shard, a folder of shards, or a labelled folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder for `embeddings-NNNNN.safetensors`.
    #[arg(long)]
    pub out: PathBuf,
    /// `tokenizer.json` for the captions (default: `tokenizer.json` beside the teacher).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Embed images only, even when the data has captions.
    #[arg(long)]
    pub images_only: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Input samples per output shard.
    #[arg(long, default_value_t = 10_000)]
    pub shard_size: usize,
    /// Storage precision: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: EmbedDtype,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl EmbedArgs {
    /// The command line's defaults for these inputs, without a progress bar.
    pub fn new(
        teacher: impl Into<PathBuf>,
        data: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> Self {
        Self {
            teacher: teacher.into(),
            config: None,
            data: data.into(),
            out: out.into(),
            tokenizer: None,
            images_only: false,
            batch_size: 64,
            shard_size: 10_000,
            dtype: EmbedDtype::F32,
            quiet: true,
        }
    }
}

/// Loads the teacher (and its tokenizer when the data has captions) and embeds the dataset
/// into `args.out`, keeping shards a previous run completed.
pub fn embed(args: &EmbedArgs, device: &Device) -> Result<EmbedSummary, PipelineError> {
    let config = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| PipelineError::io(p, "read", e))?;
            match serde_json::from_str::<ClipConfig>(&text) {
                Ok(c) => Some(c),
                Err(e) => input_error!("{}: not a CLIP config: {e}", p.display()),
            }
        }
        None => None,
    };
    let teacher_path = resolve_model_path(&args.teacher)?;
    let teacher = ClipModel::load_with(&teacher_path, config, device, DType::F32)?;
    let dataset = Dataset::open(&args.data)?;
    let ctx = teacher.config().text_config.default_context_length();
    let tokenizer = if args.images_only || !dataset.has_captions() {
        None
    } else {
        let beside = tokenizer_beside(&teacher_path);
        let path = args
            .tokenizer
            .clone()
            .or(Some(beside).filter(|p| p.is_file()));
        let Some(path) = path else {
            input_error!(
                "{} has captions but no tokenizer was given: pass --tokenizer tokenizer.json, or --images-only",
                args.data.display()
            );
        };
        Some(ClipTokenizer::from_file(&path, ctx)?)
    };
    let opts = EmbedOptions {
        batch_size: args.batch_size,
        shard_size: args.shard_size,
        dtype: args.dtype,
        progress: !args.quiet,
        teacher_name: args.teacher.display().to_string(),
    };
    Ok(embed_dataset(
        &teacher,
        tokenizer.as_ref(),
        &dataset,
        &args.out,
        &opts,
    )?)
}
