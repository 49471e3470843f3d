//! PicCollage's distilled CLIP from library code: embed images with the teacher's image
//! tower, distil only the image tower into a student with half the width and half the layers
//! (KL at temperature 4, then 2, plus L1 between student and teacher embeddings), and ship it
//! in FP16 with the measured error.
//!
//! ```sh
//! # Small default run (generated images, a seeded random teacher): under a minute.
//! cargo run --release --example piccollage
//! # PicCollage's setting: ViT-B/32 teacher, 384-wide 6-layer student.
//! cargo run --release --example piccollage -- --teacher openai/clip-vit-base-patch32 \
//!     --images photos/ --epochs 20 --switch-epoch 10 --out runs/piccollage
//! ```

use std::error::Error;
use std::path::PathBuf;

use clap::Parser;
use clipcid_loss::TemperatureSchedule;
use clipcid_pipeline::{EmbedArgs, ExportArgs, ExportOutcome};
use clipcid_train::{DataConfig, DistillConfig, Mode, StudentConfig};

/// Options (all have small defaults).
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Teacher (file, folder or Hugging Face id; default: a seeded random `tiny` CLIP).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Training images: any dataset clipcid reads (default: 128 generated images).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Student epochs.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Epoch from which the KL temperature drops from 4 to 2 (PicCollage: 10).
    #[arg(long, default_value_t = 1)]
    pub switch_epoch: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Working folder.
    #[arg(long, default_value = "runs/example-piccollage")]
    pub out: PathBuf,
}

/// Runs the distillation and the FP16 export; returns the export's sizes and error.
pub fn run(args: &Args) -> Result<ExportOutcome, Box<dyn Error>> {
    let device = clipcid_pipeline::parse_device(&args.device)?;
    let out = &args.out;
    std::fs::create_dir_all(out)?;
    let teacher = match &args.teacher {
        Some(t) => clipcid_pipeline::resolve_model_path(t)?,
        None => clipcid_suite::toy::random_teacher(&out.join("teacher"), "tiny", 11)?,
    };
    let images = match &args.images {
        Some(d) => d.clone(),
        None => clipcid_suite::toy::captioned_images(&out.join("images"), 128)?,
    };

    println!("[1/3] teacher image embeddings of {}", images.display());
    let embed = EmbedArgs {
        images_only: true,
        ..EmbedArgs::new(&teacher, &images, out.join("embeddings"))
    };
    clipcid_pipeline::embed(&embed, &device)?;

    println!("[2/3] distil the image tower: half width, half layers; KL (T 4 -> 2) + L1");
    clipcid_pipeline::write_half_size_student(&teacher, &out.join("student-config.json"))?;
    let mut config = DistillConfig {
        mode: Mode::Piccollage,
        data: DataConfig {
            dataset: std::path::absolute(&images)?,
            embeddings: Some("embeddings".into()),
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
    config.loss.piccollage.schedule = TemperatureSchedule {
        steps: vec![(0, 4.0), (args.switch_epoch, 2.0)],
    };
    config.optim.warmup_steps = 5;
    let config = clipcid_pipeline::write_run_config(&out.join("piccollage.toml"), &config)?;
    let (run, student) = clipcid_pipeline::train_student(config, &out.join("run"), false, &device)?;
    if let Some(m) = &run.last {
        let cosine = m.teacher_cosine.map(|c| format!("{c:.3}"));
        println!(
            "      {} steps, last loss {:.4}, student-teacher cosine {}",
            run.steps,
            m.loss,
            cosine.as_deref().unwrap_or("-")
        );
    }

    println!("[3/3] FP16 export");
    let export = ExportArgs {
        sample: Some(images),
        ..ExportArgs::new(student, out.join("student-fp16"))
    };
    Ok(clipcid_pipeline::export(&export, &device)?)
}

#[allow(dead_code)] // not called when the tests include this file
fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let e = run(&args)?;
    let r = &e.report;
    println!(
        "image tower: {:.2} M parameters, {:.1} MB in FP16 (FP32 {:.1} MB); FP16 vs FP32 on {}: max |diff| {:.2e}, min cosine {:.6}",
        r.vision_parameters as f64 / 1e6,
        2.0 * r.vision_parameters as f64 / 1e6,
        4.0 * r.vision_parameters as f64 / 1e6,
        e.measured_on,
        r.max_abs_diff,
        r.min_cosine
    );
    println!("student: {}", args.out.join("student-fp16").display());
    Ok(())
}
