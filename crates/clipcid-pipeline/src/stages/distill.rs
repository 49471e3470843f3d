//! `clipcid distill`: train a student from a TOML run config.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clipcid_train::{Collective, DistillConfig, RunSummary, Trainer};

use crate::PipelineError;

/// Options of [`open_trainer`] (the `clipcid distill` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct DistillArgs {
    /// The run's TOML config (see `examples/configs/`); paths in it are relative to it.
    #[arg(long)]
    pub config: PathBuf,
    /// Run folder: `checkpoints/`, `metrics.jsonl`, `loss.png` and the final `student/`.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `--out`.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start over in a `--out` that holds an earlier run, removing its checkpoints, metrics
    /// and student (without it, or `--resume`, a used run folder is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Stop after this many steps in total (checkpointed; continue later with `--resume`).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl DistillArgs {
    /// A fresh run to the end, without a progress bar.
    pub fn new(config: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            config: config.into(),
            out: out.into(),
            resume: false,
            overwrite: false,
            max_steps: None,
            quiet: true,
        }
    }
}

/// Reads the run config and opens a trainer on it: a fresh run in `args.out`, or with
/// `args.resume` the newest checkpoint there. Run it with
/// `trainer.run(args.max_steps, !args.quiet)`.
pub fn open_trainer(args: &DistillArgs, device: &Device) -> Result<Trainer, PipelineError> {
    let config = DistillConfig::from_file(&args.config)?;
    // Started by torchrun (WORLD_SIZE > 1): one rank of a data-parallel run, joined over TCP
    // (and, in an `nccl` build on GPUs, on NCCL, the TCP group handing out its id).
    let group: std::sync::Arc<dyn Collective> = match clipcid_train::TcpRank::from_env()? {
        Some(tcp) => {
            log::info!("data-parallel rank {} of {}", tcp.rank(), tcp.world_size());
            data_parallel_group(tcp, device)?
        }
        None => std::sync::Arc::new(clipcid_train::SingleProcess),
    };
    Ok(if args.resume {
        Trainer::resume_data_parallel(config, &args.out, device, group)?
    } else if args.overwrite {
        Trainer::new_overwriting_data_parallel(config, &args.out, device, group)?
    } else {
        Trainer::new_data_parallel(config, &args.out, device, group)?
    })
}

/// The collective of a rank that joined over TCP: NCCL on a GPU in an `nccl` build, else the
/// TCP group itself.
fn data_parallel_group(
    tcp: clipcid_train::TcpRank,
    device: &Device,
) -> Result<std::sync::Arc<dyn Collective>, PipelineError> {
    #[cfg(feature = "nccl")]
    if !device.is_cpu() {
        return Ok(std::sync::Arc::new(clipcid_train::NcclRank::new(
            device, &tcp,
        )?));
    }
    let _ = device;
    Ok(std::sync::Arc::new(tcp))
}

/// Trains a fresh run of `config` in `out` to its last step, replacing a run already there
/// (the caller owns `out`, as the demo and the examples do); returns the run's summary and
/// the finished student's Hugging Face folder.
pub fn train_student(
    config: DistillConfig,
    out: &Path,
    progress: bool,
    device: &Device,
) -> Result<(RunSummary, PathBuf), PipelineError> {
    let summary = Trainer::new_overwriting(config, out, device)?.run(None, progress)?;
    let student = summary.student.clone().ok_or_else(|| {
        PipelineError::Input(format!(
            "{}: the run stopped before its last step",
            out.display()
        ))
    })?;
    Ok((summary, student))
}

/// Writes a run config as TOML (so it can be re-run with `clipcid distill`; its relative paths
/// are relative to the file) and reads it back through the parser the command line uses.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_train::{DataConfig, DistillConfig, Mode};
/// let dir = tempfile::tempdir()?;
/// std::fs::create_dir(dir.path().join("images"))?;
/// std::fs::create_dir(dir.path().join("emb"))?;
/// let config = DistillConfig {
///     mode: Mode::Piccollage,
///     data: DataConfig {
///         dataset: "images".into(),
///         embeddings: Some("emb".into()),
///         ..DataConfig::default()
///     },
///     ..DistillConfig::default()
/// };
/// let read = clipcid_pipeline::write_run_config(&dir.path().join("run.toml"), &config)?;
/// assert_eq!(read.data.dataset, dir.path().join("images")); // relative to the file
/// # Ok(()) }
/// ```
pub fn write_run_config(
    path: &Path,
    config: &DistillConfig,
) -> Result<DistillConfig, PipelineError> {
    let text = toml::to_string_pretty(config)
        .map_err(|e| PipelineError::Input(format!("{}: cannot write TOML: {e}", path.display())))?;
    clipcid_store::io::write_atomic(path, text.as_bytes())?;
    Ok(DistillConfig::from_file(path)?)
}
