//! Zero-shot classification with any CLIP: a Hugging Face repository id (from the standard
//! cache; `HF_HUB_OFFLINE=1` never touches the network), an OpenCLIP or Hugging Face
//! checkpoint folder, or a student clipcid wrote, on a labelled folder (`class_name/*.png`),
//! with CLIP's prompt templates. Writes `report.md`, `results.json` and a confusion matrix.
//!
//! ```sh
//! # Small default run (a seeded random CLIP on generated images): a few seconds.
//! cargo run --release --example zero_shot
//! # A Hub CLIP on your labelled images, with ImageNet's 80 templates:
//! cargo run --release --example zero_shot -- --model openai/clip-vit-base-patch32 \
//!     --images my-labelled-folder --templates imagenet --out runs/zero-shot
//! ```

use std::error::Error;
use std::path::PathBuf;

use clap::Parser;
use clipcid_pipeline::EvalArgs;

/// Options (all have small defaults).
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// The model: file, folder or Hugging Face id (default: a seeded random `tiny` CLIP).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `tokenizer.json` (default: the one inside or beside the model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Labelled folder (default: 4 generated colour classes).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Prompt templates: imagenet, cifar, mnist, simple, name, or a file (one per line).
    #[arg(long, default_value = "imagenet")]
    pub templates: String,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Report folder.
    #[arg(long, default_value = "runs/example-zero-shot")]
    pub out: PathBuf,
}

/// Classifies the images; returns the report's markdown.
pub fn run(args: &Args) -> Result<String, Box<dyn Error>> {
    let device = clipcid_pipeline::parse_device(&args.device)?;
    std::fs::create_dir_all(&args.out)?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => clipcid_suite::toy::random_teacher(&args.out.join("model"), "tiny", 3)?,
    };
    let images = match &args.images {
        Some(d) => d.clone(),
        None => clipcid_suite::toy::labelled_images(&args.out.join("images"), 6, 0)?,
    };
    let eval = EvalArgs {
        tokenizer: args.tokenizer.clone(),
        zero_shot: Some(images),
        templates: args.templates.clone(),
        ..EvalArgs::new(model, args.out.join("report"))
    };
    Ok(clipcid_pipeline::eval(&eval, &device)?)
}

#[allow(dead_code)] // not called when the tests include this file
fn main() -> Result<(), Box<dyn Error>> {
    println!("{}", run(&Args::parse())?);
    Ok(())
}
