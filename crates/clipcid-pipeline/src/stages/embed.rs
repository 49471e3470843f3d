//! `clipcid embed`: teacher embeddings of a dataset into resumable shards.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clipcid_data::Dataset;
use clipcid_embed::{embed_dataset, EmbedDtype, EmbedOptions, EmbedSummary};
use clipcid_models::ClipTokenizer;

use crate::{input_error, load_model, ModelOptions, PipelineError};

/// Options of [`embed`] (the `clipcid embed` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct EmbedArgs {
    /// Teacher checkpoint: a `.safetensors` file, a model folder (HF or OpenCLIP names), or a
    /// Hugging Face repository id (`owner/name`, cached; HF_HUB_OFFLINE=1 uses only the cache).
    #[arg(long)]
    pub teacher: PathBuf,
    /// How the teacher is read: `--config`, `--activation`, `--preprocess`.
    #[command(flatten)]
    pub model: ModelOptions,
    /// Dataset: captions `.tsv`/`.csv`, a `.tar` shard, a folder of shards, img2dataset's
    /// `files` folder, or a labelled folder. Shard lists as WebDataset users write them:
    /// braces (`shards/{00000..41455}.tar`), globs (`'shards/*.tar'`), sources joined by `::`,
    /// or `--data` repeated; several sources must all be tar shards.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Output folder for `embeddings-NNNNN.safetensors`.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokenizer for the captions: a `tokenizer.json` or open_clip's BPE merges file (default:
    /// the one in the teacher's folder).
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
    /// Storage precision of the embeddings: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: EmbedDtype,
    /// Compute precision of the teacher: f32, f16 or bf16 (weights cast, activations in that
    /// type, embeddings normalised in f32). Measured against f32 on the reference checkpoints
    /// (`tests/reference.rs`): see docs/guide.md.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Replace shards another run (another teacher, dataset, tokenizer, preprocessing,
    /// --dtype or --shard-size) left in `--out`; without it such a folder is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// This process's share of a run split over N independent processes (`I/N`, I from 0):
    /// output shard j is embedded by part j mod N. Without it, torchrun's `RANK` and
    /// `WORLD_SIZE` or a Slurm array's `SLURM_ARRAY_TASK_ID`/`_COUNT` give the part, else the
    /// process does it all. The parts' shards together are byte for byte one process's.
    #[arg(long)]
    pub part: Option<clipcid_embed::Part>,
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
            model: ModelOptions::default(),
            data: vec![data.into()],
            out: out.into(),
            tokenizer: None,
            images_only: false,
            batch_size: 64,
            shard_size: 10_000,
            dtype: EmbedDtype::F32,
            precision: Precision::F32,
            overwrite: false,
            part: None,
            quiet: true,
        }
    }
}

/// Compute precision of a model (`--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16 (open_clip's `amp_bf16`).
    Bf16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Loads the teacher (and its tokenizer when the data has captions) and embeds the dataset
/// into `args.out`, keeping shards a previous run completed.
pub fn embed(args: &EmbedArgs, device: &Device) -> Result<EmbedSummary, PipelineError> {
    let loaded = load_model(&args.teacher, &args.model, device, args.precision.dtype())?;
    let (teacher_path, teacher) = (loaded.path, loaded.model);
    let dataset = Dataset::open_sources(&args.data)?;
    let ctx = teacher.config().text_config.default_context_length();
    let tokenizer = if args.images_only || !dataset.has_captions() {
        None
    } else {
        let path = args
            .tokenizer
            .clone()
            .or_else(|| ClipTokenizer::find_beside(&teacher_path));
        let Some(path) = path else {
            input_error!(
                "{} has captions but no tokenizer was given: pass --tokenizer tokenizer.json (or open_clip's bpe_simple_vocab_16e6.txt.gz), or --images-only",
                args.data
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        };
        Some(ClipTokenizer::load(&path, ctx)?)
    };
    let opts = EmbedOptions {
        batch_size: args.batch_size,
        shard_size: args.shard_size,
        dtype: args.dtype,
        progress: !args.quiet,
        teacher_name: args.teacher.display().to_string(),
        preprocess: Some(loaded.preprocess),
        overwrite: args.overwrite,
        part: part_of(args.part)?,
    };
    Ok(embed_dataset(
        &teacher,
        tokenizer.as_ref(),
        &dataset,
        &args.out,
        &opts,
    )?)
}

/// The part `--part` names, else the launcher's environment ([`clipcid_embed::Part::from_env`]),
/// else the whole job; a part from the environment is logged.
pub(crate) fn part_of(
    arg: Option<clipcid_embed::Part>,
) -> Result<clipcid_embed::Part, PipelineError> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let from_env = clipcid_embed::Part::from_env()?;
    if let Some(p) = from_env {
        log::info!(
            "part {p} from the launcher's environment (RANK/WORLD_SIZE or SLURM_ARRAY_TASK_*)"
        );
    }
    Ok(from_env.unwrap_or_default())
}
