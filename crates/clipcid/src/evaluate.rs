//! `clipcid eval`, `clipcid textness` and `clipcid export`: thin wrappers over clipcid-eval.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clipcid_data::{BatchIter, Dataset, Preprocess};
use clipcid_eval::{
    evaluate, export_fp16, load_images, textness_study, AgreementPlan, EvalModel, EvalPlan,
    ProbeOptions, Templates, TextRenderer, TextnessOptions, ZeroShotPlan,
};
use clipcid_models::{ClipModel, ClipTokenizer};

/// Where a model's `tokenizer.json` is looked for: inside a model folder, or beside a file.
pub fn tokenizer_beside(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("tokenizer.json")
    } else {
        model
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("tokenizer.json")
    }
}

/// A model argument as a local path: itself, or a Hugging Face repository id's cached
/// snapshot (downloaded unless HF_HUB_OFFLINE is set).
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    let s = spec
        .to_str()
        .with_context(|| format!("{}: not a UTF-8 path", spec.display()))?;
    Ok(clipcid_models::resolve_model(s)?)
}

/// Loads a model (f32) and its tokenizer (`tokenizer`, else the one beside the model).
pub fn load_model(
    name: &str,
    path: &Path,
    tokenizer: Option<&Path>,
    device: &Device,
) -> Result<EvalModel> {
    let path = &resolve(path)?;
    let model = ClipModel::load(path, device)?;
    let tok_path = tokenizer
        .map(Path::to_path_buf)
        .unwrap_or_else(|| tokenizer_beside(path));
    if !tok_path.is_file() {
        bail!(
            "no tokenizer for {name} ({}): pass --tokenizer tokenizer.json or put one at {}",
            path.display(),
            tok_path.display()
        );
    }
    let ctx = model.config().text_config.default_context_length();
    let tokenizer = ClipTokenizer::from_file(&tok_path, ctx)?;
    Ok(EvalModel {
        name: name.to_string(),
        model,
        tokenizer,
    })
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The student checkpoint (file, folder or Hugging Face repo id), reported as `student`.
    #[arg(long)]
    model: PathBuf,
    /// The teacher (file, folder or Hugging Face repo id), reported as `teacher`; needed for
    /// --queries (teacher agreement).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// More models to compare, as NAME=PATH (e.g. `baseline=runs/baseline/student`).
    #[arg(long = "compare", value_name = "NAME=PATH")]
    compare: Vec<String>,
    /// `tokenizer.json` for the student and the --compare models (default: the one
    /// inside/beside each model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// `tokenizer.json` for the teacher (default: the one inside/beside it; a locked-text
    /// teacher's is MiniLM's WordPiece, not the students' CLIP BPE).
    #[arg(long, requires = "teacher")]
    teacher_tokenizer: Option<PathBuf>,
    /// Labelled folder (`class_name/*.png`) for zero-shot classification.
    #[arg(long)]
    zero_shot: Option<PathBuf>,
    /// Prompt templates: imagenet, cifar, mnist, simple, name, or a file (one per line).
    #[arg(long, default_value = "imagenet")]
    templates: String,
    /// Class names in label order, one per line (default: folder names, `_` as spaces).
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// Labelled training set of the linear probe.
    #[arg(long, requires = "probe_test")]
    probe_train: Option<PathBuf>,
    /// Labelled test set of the linear probe.
    #[arg(long, requires = "probe_train")]
    probe_test: Option<PathBuf>,
    /// Captioned set (one caption per image) for image-text retrieval.
    #[arg(long)]
    retrieval: Option<PathBuf>,
    /// Text queries, one per line, for teacher agreement (mAP@10..20); needs --teacher.
    #[arg(long, requires = "teacher")]
    queries: Option<PathBuf>,
    /// Images searched by the queries (default: the --retrieval set, else --zero-shot).
    #[arg(long)]
    query_images: Option<PathBuf>,
    /// Report folder.
    #[arg(long, default_value = "eval-report")]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

pub fn eval(args: &EvalArgs, device: &Device) -> Result<()> {
    let tok = args.tokenizer.as_deref();
    let mut models = vec![load_model("student", &args.model, tok, device)?];
    if let Some(t) = &args.teacher {
        let teacher_tok = args.teacher_tokenizer.as_deref();
        models.insert(0, load_model("teacher", t, teacher_tok, device)?);
    }
    for spec in &args.compare {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--compare takes NAME=PATH, got `{spec}`");
        };
        models.push(load_model(name, Path::new(path), tok, device)?);
    }
    let zero_shot = match &args.zero_shot {
        Some(data) => Some(ZeroShotPlan {
            data: data.clone(),
            templates: Templates::parse(&args.templates)?,
            class_names: match &args.class_names {
                Some(p) => Some(read_lines(p)?),
                None => None,
            },
        }),
        None => None,
    };
    let agreement = match &args.queries {
        Some(q) => Some(AgreementPlan {
            images: args
                .query_images
                .clone()
                .or_else(|| args.retrieval.clone())
                .or_else(|| args.zero_shot.clone())
                .context(
                    "--queries needs images to search: --query-images, --retrieval or --zero-shot",
                )?,
            queries: read_lines(q)?,
            teacher: "teacher".into(),
            ns: (10..=20).collect(),
        }),
        None => None,
    };
    let plan = EvalPlan {
        zero_shot,
        linear_probe: args
            .probe_train
            .clone()
            .zip(args.probe_test.clone())
            .map(|(a, b)| (a, b, ProbeOptions::default())),
        retrieval: args.retrieval.clone(),
        agreement,
        batch_size: args.batch_size,
    };
    if plan.zero_shot.is_none()
        && plan.linear_probe.is_none()
        && plan.retrieval.is_none()
        && plan.agreement.is_none()
    {
        bail!("nothing to evaluate: give --zero-shot, --probe-train/--probe-test, --retrieval or --queries");
    }
    let (_, md) = evaluate(&models, &plan, &args.out)?;
    println!("{md}");
    println!("report: {}", args.out.join("report.md").display());
    Ok(())
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        bail!("{}: no lines", path.display());
    }
    Ok(lines)
}

#[derive(clap::Args)]
pub struct TextnessArgs {
    /// Model checkpoint (file or folder).
    #[arg(long)]
    model: PathBuf,
    /// `tokenizer.json` (default: the one inside/beside the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Real images without text: a folder of image files or any dataset.
    #[arg(long)]
    images: PathBuf,
    /// Real images that carry text (a folder of image files), added to the probe and the
    /// search pool beside the rendered ones (e.g. data/text-images).
    #[arg(long)]
    text_images: Option<PathBuf>,
    /// Text queries (repeatable).
    #[arg(long = "query", default_value = "a photo")]
    queries: Vec<String>,
    /// TrueType font for the rendered words (default: the built-in DejaVu Sans).
    #[arg(long)]
    font: Option<PathBuf>,
    /// Words to draw, one per line (default: a built-in list of sign texts).
    #[arg(long)]
    words: Option<PathBuf>,
    /// Query-side scales, one grid row each.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-2,-1,0,1,2"
    )]
    scales: Vec<f32>,
    /// Results per row.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Seed of the probe/pool split and the text placement.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: textness.safetensors, grid-N.png, report.md.
    #[arg(long, default_value = "textness")]
    out: PathBuf,
}

pub fn textness(args: &TextnessArgs, device: &Device) -> Result<()> {
    let m = load_model("model", &args.model, args.tokenizer.as_deref(), device)?;
    let renderer = match &args.font {
        Some(f) => TextRenderer::from_file(f)?,
        None => TextRenderer::dejavu_sans()?,
    };
    let images = load_images(&args.images)?;
    let mut opts = TextnessOptions {
        scales: args.scales.clone(),
        top: args.top,
        seed: args.seed,
        real_text_images: match &args.text_images {
            Some(p) => load_images(p)?,
            None => vec![],
        },
        ..TextnessOptions::default()
    };
    if let Some(w) = &args.words {
        opts.words = read_lines(w)?;
    }
    let r = textness_study(
        &m.model,
        &m.tokenizer,
        &images,
        &args.queries,
        &renderer,
        &opts,
        &args.out,
    )?;
    println!("{}", r.markdown);
    println!(
        "textness direction: {}",
        args.out.join("textness.safetensors").display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Model checkpoint (file or folder) to export.
    #[arg(long)]
    model: PathBuf,
    /// Output folder: model.safetensors (f16) + config.json (+ tokenizer.json when found).
    #[arg(long)]
    out: PathBuf,
    /// Images to measure the FP16 error on (any dataset); default: seeded random pixels.
    #[arg(long)]
    sample: Option<PathBuf>,
    /// At most this many sample images.
    #[arg(long, default_value_t = 64)]
    samples: usize,
}

pub fn export(args: &ExportArgs, device: &Device) -> Result<()> {
    let model_path = resolve(&args.model)?;
    let model = ClipModel::load(&model_path, device)?;
    let size = model.config().vision_config.image_size;
    let (pixels, what) = match &args.sample {
        Some(data) => {
            let ds = Dataset::open(data)?;
            let mut it = BatchIter::new(
                ds.samples()?,
                Preprocess::clip(size),
                args.samples.max(1),
                device.clone(),
            );
            let b = it
                .next()
                .with_context(|| format!("{}: no images", data.display()))??;
            let n = b.len();
            (b.pixels, format!("{n} images of {}", data.display()))
        }
        None => {
            let n = args.samples.max(1);
            let px = Tensor::randn(0f32, 1.0, (n, 3, size, size), device)?;
            (
                px,
                format!("{n} random-pixel inputs (pass --sample DATA for real images)"),
            )
        }
    };
    let r = export_fp16(&model, &args.out, &pixels.to_dtype(DType::F32)?)?;
    let tok = tokenizer_beside(&model_path);
    if tok.is_file() {
        std::fs::copy(&tok, args.out.join("tokenizer.json"))
            .with_context(|| format!("cannot copy {}", tok.display()))?;
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "exported {} -> {} (f16, Hugging Face layout)\n\n| | FP32 | FP16 |\n|---|---:|---:|\n| all parameters ({:.2} M) | {:.1} MB | {:.1} MB |\n| image tower ({:.2} M) | {:.1} MB | {:.1} MB |\n| model.safetensors | - | {:.1} MB |\n\nunit image embeddings, FP16 ({} compute) vs FP32 on {what}: max |diff| {:.2e}, mean |diff| {:.2e}, min cosine {:.6}",
        args.model.display(),
        args.out.display(),
        r.parameters as f64 / 1e6,
        mb(r.fp32_bytes),
        mb(r.fp16_bytes),
        r.vision_parameters as f64 / 1e6,
        mb(4 * r.vision_parameters as u64),
        mb(2 * r.vision_parameters as u64),
        mb(r.file_bytes),
        r.compute,
        r.max_abs_diff,
        r.mean_abs_diff,
        r.min_cosine
    );
    Ok(())
}
