//! `clipcid teacher lit`, `clipcid init-model` and `clipcid tokenizer`: models and tokenizers
//! made here rather than downloaded.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
use clipcid_train::{LockedTextOptions, LockedTextTeacher};

use crate::{input_error, PipelineError};

/// Options of [`lit_teacher`] (the `clipcid teacher lit` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LitArgs {
    /// BERT folder: config.json, model.safetensors, tokenizer.json.
    #[arg(long, default_value = "data/raw/minilm")]
    pub text_tower: PathBuf,
    /// Captioned training images (WebDataset shards folder, captions file...).
    #[arg(long, default_value = "data/shards")]
    pub data: PathBuf,
    /// Output model folder.
    #[arg(long, default_value = "data/teacher-lit")]
    pub out: PathBuf,
    /// Passes over the data.
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Image tower width (heads: width / 32).
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    /// Image tower layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Seed of the image tower's init and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Builds (or reuses, when `args.out` holds one built with the same options) a locked-text
/// teacher: the frozen BERT text tower and a ViT trained against it with the CLIP loss.
pub fn lit_teacher(args: &LitArgs, device: &Device) -> Result<LockedTextTeacher, PipelineError> {
    // The flags are checked by their names before anything is read or written: a bad one
    // was reported against the text tower's config.json or against the run TOML this
    // builder writes, after the folder's earlier run config had been replaced.
    if args.epochs == 0 || args.batch_size == 0 || args.layers == 0 {
        input_error!(
            "--epochs {}, --batch-size {}, --layers {}: each must be at least 1",
            args.epochs,
            args.batch_size,
            args.layers
        );
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        input_error!("--lr {}: the learning rate must be positive", args.lr);
    }
    if args.width == 0 || (args.width > 32 && !args.width.is_multiple_of(32)) {
        input_error!(
            "--width {}: the image tower has width / 32 attention heads, so its width must be \
             a multiple of 32 (or from 1 to 32, one head)",
            args.width
        );
    }
    let mut opts = LockedTextOptions::new(&args.text_tower, &args.data);
    opts.epochs = args.epochs;
    opts.batch_size = args.batch_size;
    opts.lr = args.lr;
    opts.seed = args.seed;
    opts.vision.hidden_size = args.width;
    opts.vision.intermediate_size = 4 * args.width;
    opts.vision.num_attention_heads = (args.width / 32).max(1);
    opts.vision.num_hidden_layers = args.layers;
    Ok(clipcid_train::build_locked_text_teacher(
        &opts, &args.out, device,
    )?)
}

/// Writes a CLIP checkpoint of the preset shape with seeded random weights (f32, Hugging
/// Face layout, config in the metadata).
pub fn init_model(preset: &str, seed: u64, out: &Path) -> Result<(), PipelineError> {
    let cfg = ClipConfig::preset(preset)?;
    ClipModel::random(&cfg, seed, &Device::Cpu)?.save(out, DType::F32)?;
    Ok(())
}

/// Writes a CLIP `tokenizer.json` (context 77) from OpenAI's BPE vocabulary file, or the
/// byte-level one without it; returns the tokenizer.
pub fn write_tokenizer(
    bpe_vocab: Option<&Path>,
    out: &Path,
) -> Result<ClipTokenizer, PipelineError> {
    clipcid_store::io::check_not_an_input(out, bpe_vocab)?;
    let tok = match bpe_vocab {
        Some(p) => ClipTokenizer::from_bpe_vocab(p, 77)?,
        None => ClipTokenizer::byte_level(77)?,
    };
    tok.save(out)?;
    Ok(tok)
}
