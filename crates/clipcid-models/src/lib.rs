//! CLIP models in candle for clipcid: a vision transformer and a text transformer of any
//! width, depth, head count, patch size and resolution (teacher and student share the code),
//! loaded from and saved to safetensors in the Hugging Face CLIP tensor layout, with
//! OpenCLIP checkpoints mapped on load; the CLIP BPE tokenizer; seeded random models for tests.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{DType, Device, Tensor};
//! use clipcid_models::{l2_normalize, ClipConfig, ClipModel, ClipTokenizer};
//!
//! let device = Device::Cpu;
//! let cfg = ClipConfig::preset("tiny")?;
//! let model = ClipModel::random(&cfg, 42, &device)?;
//!
//! // Save in Hugging Face layout and load it back.
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("tiny.safetensors");
//! model.save(&path, DType::F32)?;
//! let loaded = ClipModel::load(&path, &device)?;
//!
//! let tok = ClipTokenizer::byte_level(cfg.text_config.max_position_embeddings)?;
//! let ids = tok.encode_batch(&["a red square", "a blue circle"], &device)?;
//! let text = l2_normalize(&loaded.encode_text(&ids)?)?;
//! let pixels = Tensor::zeros((1, 3, 32, 32), DType::F32, &device)?;
//! let image = l2_normalize(&loaded.encode_image(&pixels)?)?;
//! let sims = image.matmul(&text.t()?)?; // [1, 2] cosine similarities
//! assert_eq!(sims.dims(), &[1, 2]);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod config;
mod error;
mod hub;
mod model;
pub mod nn;
mod text_clean;
mod tokenizer;
pub mod weights;

pub use clipcid_kernels::l2_normalize;
pub use config::{Activation, ClipConfig, TextConfig, TextTowerKind, VisionConfig, PRESETS};
pub use error::ModelError;
pub use hub::{
    hub_cache_dir, hub_offline, is_repo_id, resolve_model, HUB_CONFIG_FILES, HUB_OPTIONAL_FILES,
};
pub use model::{BertTextTower, ClipModel, TextTower, TextTransformer, VisionTransformer};
pub use text_clean::clip_text_clean;
pub use tokenizer::{ClipTokenizer, END_OF_TEXT, START_OF_TEXT};
pub use weights::{locked_text_tensors, Checkpoint, Layout, LoadOptions, CHECKPOINT_FILES};
