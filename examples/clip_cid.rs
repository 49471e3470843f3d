//! The whole CLIP-CID pipeline from library code: teacher embeddings, near-duplicate removal,
//! k-means pseudo-classes, a half-size student distilled with the CLIP, cluster and instance
//! losses, and a zero-shot + linear-probe comparison with the teacher (the probe fitted on a
//! labelled training split and scored on the evaluation set).
//!
//! ```sh
//! # Small default run (generated images, a seeded random teacher): about a minute.
//! cargo run --release --example clip_cid
//! # Your own data and teacher:
//! cargo run --release --example clip_cid -- --teacher openai/clip-vit-base-patch32 \
//!     --data shards/ --eval-data labelled/test --probe-train labelled/train --k 1000 \
//!     --epochs 32 --out runs/clip-cid
//! ```

use std::error::Error;
use std::path::PathBuf;

use clap::Parser;
use clipcid_pipeline::{BalanceArgs, ClusterArgs, EmbedArgs, EvalArgs};
use clipcid_train::{ClusterTermConfig, DataConfig, DistillConfig, StudentConfig};

/// Options (all have small defaults).
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Teacher (file, folder or Hugging Face id; default: a seeded random `tiny` CLIP).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Captioned training data (default: 192 generated images with captions).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Labelled folder (`class/*.png`): zero-shot's set and the linear probe's test split
    /// (default: generated).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Labelled folder the linear probe is fitted on, with --eval-data's classes (default:
    /// generated, other images than the default --eval-data's; with --eval-data given and
    /// this not, no linear probe).
    #[arg(long)]
    pub probe_train: Option<PathBuf>,
    /// Near-duplicate threshold (the paper's 0.07).
    #[arg(long, default_value_t = 0.07)]
    pub threshold: f32,
    /// Pseudo-classes (the paper: 1M on 225M images).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Student epochs.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Working folder.
    #[arg(long, default_value = "runs/example-clip-cid")]
    pub out: PathBuf,
}

/// Runs the pipeline; returns the evaluation report's markdown.
pub fn run(args: &Args) -> Result<String, Box<dyn Error>> {
    let device = clipcid_pipeline::parse_device(&args.device)?;
    let out = &args.out;
    std::fs::create_dir_all(out)?;
    let teacher = match &args.teacher {
        Some(t) => clipcid_pipeline::resolve_model_path(t)?,
        None => clipcid_suite::toy::random_teacher(&out.join("teacher"), "tiny", 7)?,
    };
    let data = match &args.data {
        Some(d) => d.clone(),
        None => clipcid_suite::toy::captioned_images(&out.join("data"), 192)?,
    };
    let eval_data = match &args.eval_data {
        Some(d) => d.clone(),
        None => clipcid_suite::toy::labelled_images(&out.join("eval"), 8, 1000)?,
    };
    let probe_train = match (&args.probe_train, &args.eval_data) {
        (Some(p), _) => Some(p.clone()),
        (None, None) => Some(clipcid_suite::toy::labelled_images(
            &out.join("probe-train"),
            8,
            2000,
        )?),
        (None, Some(_)) => None,
    };

    println!("[1/5] embed {} with the teacher", data.display());
    let embeddings = out.join("embeddings");
    clipcid_pipeline::embed(&EmbedArgs::new(&teacher, &data, &embeddings), &device)?;

    println!("[2/5] balance at threshold {}", args.threshold);
    let keep = out.join("keep.safetensors");
    let balance = BalanceArgs {
        threshold: args.threshold,
        ..BalanceArgs::new(&embeddings, &keep)
    };
    let s = clipcid_pipeline::balance(&balance, &device)?.result.summary;
    println!(
        "      kept {} of {} ({:.1}% removed)",
        s.kept, s.n, s.removed_pct
    );

    println!("[3/5] k-means into K = {}", args.k);
    let cluster = ClusterArgs {
        keep: Some(keep),
        ..ClusterArgs::new(&embeddings, args.k, out.join("clusters.safetensors"))
    };
    clipcid_pipeline::cluster(&cluster, &device)?;

    println!("[4/5] distil a half-size student (CLIP + cluster + instance losses)");
    clipcid_pipeline::write_half_size_student(&teacher, &out.join("student-config.json"))?;
    let tokenizer = clipcid_pipeline::tokenizer_beside(&teacher);
    let mut config = DistillConfig {
        data: DataConfig {
            dataset: std::path::absolute(&data)?,
            embeddings: Some("embeddings".into()),
            keep: Some("keep.safetensors".into()),
            clusters: Some("clusters.safetensors".into()),
            tokenizer: Some(std::path::absolute(&tokenizer)?),
            ..DataConfig::default()
        },
        student: StudentConfig {
            model: "student-config.json".into(),
            ..StudentConfig::default()
        },
        batch_size: args.batch_size,
        epochs: args.epochs,
        ..DistillConfig::default()
    };
    config.loss.cluster = ClusterTermConfig {
        sample_rate: 0.5,
        scale: 16.0,
        ..ClusterTermConfig::default()
    };
    config.optim.warmup_steps = 5;
    let config = clipcid_pipeline::write_run_config(&out.join("distill.toml"), &config)?;
    let (run, student) = clipcid_pipeline::train_student(config, &out.join("run"), false, &device)?;
    println!("      {} steps -> {}", run.steps, student.display());

    println!(
        "[5/5] evaluate the student beside the teacher on {}",
        eval_data.display()
    );
    let eval = EvalArgs {
        teacher: Some(teacher),
        tokenizer: Some(tokenizer),
        zero_shot: Some(eval_data.clone()),
        templates: "simple".into(),
        probe_test: probe_train.as_ref().map(|_| eval_data.clone()),
        probe_train,
        ..EvalArgs::new(student, out.join("report"))
    };
    Ok(clipcid_pipeline::eval(&eval, &device)?)
}

#[allow(dead_code)] // not called when the tests include this file
fn main() -> Result<(), Box<dyn Error>> {
    let report = run(&Args::parse())?;
    println!("{report}");
    Ok(())
}
