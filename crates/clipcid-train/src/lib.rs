//! Distillation training for clipcid (in progress): the run's TOML configuration
//! ([`DistillConfig`]) and the optimiser pieces the trainer is built on. [`AdamW`] with decoupled weight decay that skips biases, norms and other
//! vectors (open_clip's rule), checkpointable state for exact resume; [`WarmupCosine`]
//! learning rates; [`clip_grad_norm`] by global norm.
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

mod config;
mod optim;

pub use config::{
    ClusterTermConfig, DataConfig, DistillConfig, InstanceTermConfig, LossConfig, Mode,
    OptimConfig, StudentConfig, TermConfig,
};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, WarmupCosine};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad options or state.
    #[error("{0}")]
    Config(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
