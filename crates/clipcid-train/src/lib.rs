//! Distillation training for clipcid. A [`Trainer`] reads a run's TOML configuration
//! ([`DistillConfig`]), joins the dataset with the teacher's embedding shards, keep list and
//! cluster file by sample id ([`TrainingSet`]), and trains a student CLIP with every loss
//! term switchable and weighted: CLIP-CID (`L_clip + L_cluster + L_instance`) or PicCollage
//! (image tower only, KL at a scheduled temperature + L1). It writes atomic checkpoints that
//! resume to bit-identical weights, stops on a NaN naming the last good checkpoint, and logs
//! metrics as JSONL with a loss-curve PNG. [`build_locked_text_teacher`] uses the same
//! trainer for locked-text (LiT) tuning: a frozen pretrained text tower and an image tower
//! trained against it, the demo's teacher when no pretrained CLIP is available.
//!
//! The optimiser pieces are usable alone: [`AdamW`] with decoupled weight decay that skips
//! biases, norms and other vectors (open_clip's rule) and checkpointable state;
//! [`WarmupCosine`] learning rates; [`clip_grad_norm`] by global norm.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{Device, Var};
//! use clipcid_train::{AdamW, AdamWConfig, WarmupCosine};
//! let w = Var::new(&[[1.0f32, -2.0]], &Device::Cpu)?;
//! let mut opt = AdamW::new(vec![("proj.weight".into(), w.clone())], AdamWConfig::default())?;
//! let sched = WarmupCosine { peak_lr: 1e-2, warmup_steps: 2, total_steps: 10, min_lr: 0.0 };
//! for step in 0..10 {
//!     let loss = w.as_tensor().sqr()?.sum_all()?;
//!     opt.step(&loss.backward()?, sched.lr(step))?;
//! }
//! assert!(w.as_tensor().sqr()?.sum_all()?.to_scalar::<f32>()? < 5.0);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod collective;
mod config;
mod data;
mod lit;
mod optim;
mod plot;
mod trainer;

#[cfg(feature = "nccl")]
pub use collective::NcclRank;
pub use collective::{
    all_gather_rows, all_reduce_mean, Collective, InProcessGroup, InProcessRank, SingleProcess,
    TcpRank, TCP_TIMEOUT, TIMEOUT_VAR,
};
pub use config::{
    ClusterTermConfig, DataConfig, DistillConfig, InstanceTermConfig, LossConfig, Mode,
    OptimConfig, StudentConfig, TermConfig, TrainPrecision,
};
pub use data::{Needs, TrainBatch, TrainingSet};
pub use lit::{build_locked_text_teacher, LockedTextOptions, LockedTextTeacher};
pub use optim::{
    clip_factor, clip_grad_norm, grad_norm, AdamW, AdamWConfig, LossScale, LossScaleConfig,
    WarmupCosine,
};
pub use plot::plot_loss_curves;
pub use trainer::{read_metrics, student_config, RunSummary, StepMetrics, Trainer};

use std::path::{Path, PathBuf};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad options or state.
    #[error("{0}")]
    Config(String),
    /// Inputs that do not fit together (ids, widths, missing tensors...).
    #[error("{0}")]
    Input(String),
    /// A loss term or the gradient became NaN or infinite; nothing was updated.
    #[error("step {step}: {what}; {}", match last_checkpoint {
        Some(p) => format!("last good checkpoint: {} (continue with --resume)", p.display()),
        None => "no checkpoint was written yet".to_string(),
    })]
    NonFinite {
        /// The step that failed (1-based).
        step: u64,
        /// Which value.
        what: String,
        /// Newest checkpoint written before it.
        last_checkpoint: Option<PathBuf>,
    },
    /// A file could not be read or written.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading the dataset failed.
    #[error(transparent)]
    Data(#[from] clipcid_data::DataError),
    /// Reading embedding shards, the keep file or the cluster file failed.
    #[error(transparent)]
    Store(#[from] clipcid_store::StoreError),
    /// Reading or writing a model or safetensors file failed.
    #[error(transparent)]
    Model(#[from] clipcid_models::ModelError),
    /// A loss could not be computed.
    #[error(transparent)]
    Loss(#[from] clipcid_loss::LossError),
}

impl TrainError {
    pub(crate) fn io(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }
}
