//! `clipcid eval`, `clipcid textness` and `clipcid export`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clipcid_data::{BatchIter, ClipBenchmarkSet, Dataset};
use clipcid_eval::{
    clip_benchmark_class_names, evaluate, export_fp16, load_named_images, textness_study,
    AgreementPlan, EvalError, EvalPlan, ExportReport, ProbeOptions, Templates, TextRenderer,
    TextnessOptions, TextnessReport, ZeroShotPlan,
};
use clipcid_models::ClipTokenizer;

use crate::{input_error, load_eval_model, load_model, read_lines, ModelOptions, PipelineError};

/// Options of [`eval`] (the `clipcid eval` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct EvalArgs {
    /// The student checkpoint (file, folder or Hugging Face repo id), reported as `student`.
    #[arg(long)]
    pub model: PathBuf,
    /// The teacher (file, folder or Hugging Face repo id), reported as `teacher`; needed for
    /// --queries (teacher agreement).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// More models to compare, as NAME=PATH (e.g. `baseline=runs/baseline/student`).
    #[arg(long = "compare", value_name = "NAME=PATH")]
    pub compare: Vec<String>,
    /// `tokenizer.json` for the student and the --compare models (default: the one
    /// inside/beside each model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer.json` for the teacher (default: the one inside/beside it; a locked-text
    /// teacher's is MiniLM's WordPiece, not the students' CLIP BPE).
    #[arg(long, requires = "teacher")]
    pub teacher_tokenizer: Option<PathBuf>,
    /// Labelled set for zero-shot classification: a folder of class folders
    /// (`class_name/*.png`), labelled WebDataset shards (`.cls`), or a CLIP_benchmark set
    /// (its root or a split folder; its `classnames.txt` gives the class names).
    #[arg(long)]
    pub zero_shot: Option<PathBuf>,
    /// Prompt templates: `auto` (a CLIP_benchmark set's own
    /// `zeroshot_classification_templates.txt`, else imagenet), imagenet, cifar, mnist,
    /// simple, name, a CLIP_benchmark dataset name (`cifar100`, `food101`, `imagenet1k`, ...:
    /// its templates), or a file (one per line, the class name's place written `{}` or `{c}`).
    #[arg(long, default_value = "auto")]
    pub templates: String,
    /// Class names in label order: a file (one per line), or a dataset CLIP_benchmark has
    /// class names for (`imagenet1k`: CLIP's cleaned 1,000 ImageNet names, and 16 more).
    /// Default: a CLIP_benchmark set's `classnames.txt`, else the folder names (`_` as spaces).
    #[arg(long)]
    pub class_names: Option<PathBuf>,
    /// Labelled training set of the linear probe.
    #[arg(long, requires = "probe_test")]
    pub probe_train: Option<PathBuf>,
    /// Labelled test set of the linear probe.
    #[arg(long, requires = "probe_train")]
    pub probe_test: Option<PathBuf>,
    /// How the linear probe is fitted: `lbfgs` (CLIP's paper: L-BFGS to the optimum of the
    /// L2-regularised logistic regression, the L2 strength swept; deterministic, and what
    /// scikit-learn gives) or `clip-benchmark` (CLIP_benchmark's: AdamW, lr 0.1, 10 epochs,
    /// batch 64, cosine schedule, the weight decay swept over logspace(-6, 2, 97); for numbers
    /// beside its leaderboards).
    #[arg(long, value_enum, default_value = "lbfgs")]
    pub probe_method: ProbeMethodArg,
    /// Fraction of --probe-train held out to choose the L2 strength or weight decay (0 with
    /// `clip-benchmark`: no search, weight decay 0, as CLIP_benchmark without a validation
    /// split).
    #[arg(long, default_value_t = 0.2)]
    pub probe_validation: f64,
    /// Captioned set for image-text retrieval: one caption per line of a sample's caption
    /// (a WebDataset `.txt` may hold several), or a captions file that lists an image once
    /// per caption; each image counts once, with all its captions.
    #[arg(long)]
    pub retrieval: Option<PathBuf>,
    /// Text queries, one per line, for teacher agreement (mAP@10..20); needs --teacher.
    #[arg(long, requires = "teacher")]
    pub queries: Option<PathBuf>,
    /// Images searched by the queries (default: the --retrieval set, else --zero-shot).
    #[arg(long)]
    pub query_images: Option<PathBuf>,
    /// Report folder.
    #[arg(long, default_value = "eval-report")]
    pub out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Compute precision of every model: `f32`, `f16` or `bf16` (open_clip's `amp_bf16`);
    /// features are normalised and compared in f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: crate::Precision,
    /// Preprocess every model's images as a loader that converts them to RGB first hands
    /// them over: torchvision's `ImageFolder`, which CLIP_benchmark (for ImageNet and its
    /// other folder datasets) and open_clip's `--imagenet-val` read class folders with
    /// (transparency dropped, palette, 1-bit and CMYK images resized as RGB). Without it,
    /// images are preprocessed as `Image.open` gives them, as for CLIP_benchmark's WebDataset
    /// sets (`"pil"`). RGB and gray photos are the same either way.
    #[arg(long)]
    pub rgb_first: bool,
}

impl EvalArgs {
    /// The command line's defaults for one model and nothing to evaluate yet: set at least one
    /// of `zero_shot`, `probe_train`/`probe_test`, `retrieval` or `queries`.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            teacher: None,
            compare: vec![],
            tokenizer: None,
            teacher_tokenizer: None,
            zero_shot: None,
            templates: "auto".into(),
            class_names: None,
            probe_train: None,
            probe_test: None,
            probe_method: ProbeMethodArg::Lbfgs,
            probe_validation: 0.2,
            retrieval: None,
            queries: None,
            query_images: None,
            out: out.into(),
            batch_size: 64,
            precision: crate::Precision::F32,
            rgb_first: false,
        }
    }
}

/// Loads the student (and teacher and --compare models), evaluates them side by side and
/// writes `report.md`, `results.json` and plots to `args.out`; returns the report's markdown.
pub fn eval(args: &EvalArgs, device: &Device) -> Result<String, PipelineError> {
    let tok = args.tokenizer.as_deref();
    // Each model with its own files; the loader's order is the run's, the same for all.
    let load = ModelOptions {
        rgb_first: args.rgb_first,
        ..ModelOptions::default()
    };
    let mut models = vec![load_eval_model(
        "student",
        &args.model,
        &load,
        tok,
        "--tokenizer",
        device,
        args.precision.dtype(),
    )?];
    if let Some(t) = &args.teacher {
        let teacher_tok = args.teacher_tokenizer.as_deref();
        models.insert(
            0,
            load_eval_model(
                "teacher",
                t,
                &load,
                teacher_tok,
                "--teacher-tokenizer",
                device,
                args.precision.dtype(),
            )?,
        );
    }
    for spec in &args.compare {
        let Some((name, path)) = spec.split_once('=') else {
            input_error!("--compare takes NAME=PATH, got `{spec}`");
        };
        models.push(load_eval_model(
            name,
            Path::new(path),
            &load,
            tok,
            "--tokenizer",
            device,
            args.precision.dtype(),
        )?);
    }
    let zero_shot = match &args.zero_shot {
        Some(data) => Some(ZeroShotPlan {
            data: data.clone(),
            templates: zero_shot_templates(&args.templates, data)?,
            class_names: match &args.class_names {
                Some(p) if p.is_file() => Some(read_lines(p)?),
                Some(p) => Some(
                    p.to_str()
                        .and_then(clip_benchmark_class_names)
                        .ok_or_else(|| {
                            PipelineError::Input(format!(
                                "--class-names {}: no such file, nor a dataset CLIP_benchmark has class names for",
                                p.display()
                            ))
                        })?,
                ),
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
                .ok_or_else(|| {
                    PipelineError::Input(
                        "--queries needs images to search: --query-images, --retrieval or --zero-shot"
                            .into(),
                    )
                })?,
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
            .map(|(a, b)| (a, b, args.probe_options())),
        retrieval: args.retrieval.clone(),
        agreement,
        batch_size: args.batch_size,
    };
    if plan.zero_shot.is_none()
        && plan.linear_probe.is_none()
        && plan.retrieval.is_none()
        && plan.agreement.is_none()
    {
        input_error!("nothing to evaluate: give --zero-shot, --probe-train/--probe-test, --retrieval or --queries");
    }
    let (_, md) = evaluate(&models, &plan, &args.out)?;
    Ok(md)
}

/// The templates `--templates` names; `auto` is the zero-shot set's own file where it is a
/// CLIP_benchmark set with one, else CLIP's 80 ImageNet templates.
fn zero_shot_templates(spec: &str, data: &Path) -> Result<Templates, PipelineError> {
    if spec != "auto" {
        return Ok(Templates::parse(spec)?);
    }
    match ClipBenchmarkSet::find(data).and_then(|set| set.templates) {
        Some(file) => Ok(Templates::from_file(&file)?),
        None => Ok(Templates::named("imagenet")?),
    }
}

/// Options of [`textness`] (the `clipcid textness` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct TextnessArgs {
    /// Model checkpoint (file or folder).
    #[arg(long)]
    pub model: PathBuf,
    /// How the model is read: `--config`, `--activation`, `--preprocess`.
    #[command(flatten)]
    pub load: ModelOptions,
    /// `tokenizer.json` (default: the one inside/beside the model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Real images without text: a folder of image files or any dataset.
    #[arg(long)]
    pub images: PathBuf,
    /// Real images that carry text (a folder of image files), added to the probe and the
    /// search pool beside the rendered ones (e.g. data/text-images).
    #[arg(long)]
    pub text_images: Option<PathBuf>,
    /// Text queries (repeatable).
    #[arg(long = "query", default_value = "a photo")]
    pub queries: Vec<String>,
    /// TrueType font for the rendered words (default: the built-in DejaVu Sans).
    #[arg(long)]
    pub font: Option<PathBuf>,
    /// Words to draw, one per line (default: a built-in list of sign texts).
    #[arg(long)]
    pub words: Option<PathBuf>,
    /// Query-side scales, one grid row each.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-2,-1,0,1,2"
    )]
    pub scales: Vec<f32>,
    /// Results per row.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Seed of the probe/pool split and the text placement.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: textness.safetensors, grid-N.png, report.md.
    #[arg(long, default_value = "textness")]
    pub out: PathBuf,
    /// Compute precision: `f32`, `f16` or `bf16`; the probe runs in f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: crate::Precision,
}

/// Probes the textness direction of the model and writes `textness.safetensors`, one grid
/// PNG per query and `report.md` to `args.out`.
pub fn textness(args: &TextnessArgs, device: &Device) -> Result<TextnessReport, PipelineError> {
    let m = load_eval_model(
        "model",
        &args.model,
        &args.load,
        args.tokenizer.as_deref(),
        "--tokenizer",
        device,
        args.precision.dtype(),
    )?;
    let renderer = match &args.font {
        Some(f) => TextRenderer::from_file(f)?,
        None => TextRenderer::dejavu_sans()?,
    };
    // The grids are pictures: written among the images, the next run would read them as
    // images without text.
    for (flag, input) in [
        ("--images", Some(&args.images)),
        ("--text-images", args.text_images.as_ref()),
    ] {
        if let Some(input) = input.filter(|p| p.is_dir()) {
            clipcid_store::io::check_not_an_input(&args.out, [input.as_path()]).map_err(|_| {
                PipelineError::Input(format!(
                    "{}: the {flag} folder; the study's pictures written into it would be read as images by the next run: choose another --out",
                    args.out.display()
                ))
            })?;
        }
    }
    let (image_names, images): (Vec<String>, Vec<_>) =
        load_named_images(&args.images)?.into_iter().unzip();
    let (text_names, real_text_images): (Vec<String>, Vec<_>) = match &args.text_images {
        Some(p) => load_named_images(p)?.into_iter().unzip(),
        None => (vec![], vec![]),
    };
    let mut opts = TextnessOptions {
        scales: args.scales.clone(),
        top: args.top,
        seed: args.seed,
        real_text_images,
        ..TextnessOptions::default()
    };
    if let Some(w) = &args.words {
        opts.words = read_lines(w)?;
    }
    textness_study(
        &m.model,
        &m.tokenizer,
        &m.preprocess,
        &images,
        &args.queries,
        &renderer,
        &opts,
        &args.out,
    )
    .map_err(|e| match e {
        // The study knows positions; the files have names here.
        EvalError::SharedPicture { image, text_image } => PipelineError::Input(format!(
            "{}: the same picture as {} (--images, without text): an image cannot be both with and without text; keep it in one of --images and --text-images",
            text_names[text_image], image_names[image]
        )),
        e => e.into(),
    })
}

/// `--probe-method`: how the linear probe is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMethodArg {
    /// L-BFGS with the L2 sweep of CLIP's paper (the default: deterministic, the optimum).
    Lbfgs,
    /// CLIP_benchmark's AdamW recipe and weight-decay search.
    ClipBenchmark,
}

impl EvalArgs {
    /// The linear-probe options these arguments ask for.
    pub fn probe_options(&self) -> ProbeOptions {
        ProbeOptions {
            validation_fraction: self.probe_validation,
            method: match self.probe_method {
                ProbeMethodArg::Lbfgs => clipcid_eval::ProbeMethod::Lbfgs,
                ProbeMethodArg::ClipBenchmark => {
                    clipcid_eval::ProbeMethod::ClipBenchmark(clipcid_eval::AdamWProbe::default())
                }
            },
            ..ProbeOptions::default()
        }
    }
}

/// Options of [`export`] (the `clipcid export` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ExportArgs {
    /// Model checkpoint (file or folder) to export.
    #[arg(long)]
    pub model: PathBuf,
    /// How the model is read: `--config`, `--activation`, `--preprocess` (a checkpoint
    /// without a config needs `--activation`; the export then carries a config.json).
    #[command(flatten)]
    pub load: ModelOptions,
    /// Output folder: model.safetensors (f16), config.json, preprocessor_config.json and, when
    /// the model has a tokenizer, tokenizer.json, tokenizer_config.json and
    /// special_tokens_map.json (what transformers' `CLIPModel` and `CLIPProcessor` load).
    #[arg(long)]
    pub out: PathBuf,
    /// `hf`: the Hugging Face folder above. `open-clip`: also open_clip's files,
    /// open_clip_model.safetensors (f16) and open_clip_config.json (with its preprocess_cfg)
    /// and the BPE merges as bpe_simple_vocab_16e6.txt.gz, side by side as on LAION's Hub
    /// repositories.
    #[arg(long, value_enum, default_value = "hf")]
    pub format: ExportFormat,
    /// Images to measure the FP16 error on (a folder of image files or any dataset);
    /// default: seeded random pixels.
    #[arg(long)]
    pub sample: Option<PathBuf>,
    /// At most this many sample images (1 to 1024: they go through the model as one batch).
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// With `--format onnx`: the ONNX graphs in half precision (weights and arithmetic;
    /// inputs and outputs stay f32), `onnx/*_fp16.onnx`.
    #[arg(long)]
    pub fp16: bool,
}

impl ExportArgs {
    /// The command line's defaults: the error measured on 64 random-pixel inputs.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            load: ModelOptions::default(),
            out: out.into(),
            sample: None,
            samples: 64,
            format: ExportFormat::Hf,
            fp16: false,
        }
    }
}

/// What [`export`] writes (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face model folder.
    Hf,
    /// The Hugging Face folder plus open_clip's files.
    OpenClip,
    /// The Hugging Face folder plus each tower as an ONNX graph (opset 17) in `onnx/`, named
    /// as transformers.js names them (`vision_model.onnx`, `text_model.onnx`; `_fp16` with
    /// `--fp16`), the preprocessing in each graph's metadata, and `onnx/check.safetensors`:
    /// sample inputs with clipcid's outputs, to check a runtime against
    /// (`scripts/onnx-check.py` does it with ONNX Runtime).
    Onnx,
}

/// What [`export`] did.
#[derive(Debug, Clone)]
pub struct ExportOutcome {
    /// Sizes and the FP16-vs-FP32 error.
    pub report: ExportReport,
    /// The inputs the error was measured on, in words.
    pub measured_on: String,
    /// The ONNX files, with `--format onnx`.
    pub onnx: Option<clipcid_onnx::OnnxExport>,
}

/// Writes the model as FP16 safetensors (Hugging Face layout) with its config and tokenizer
/// to `args.out`, and measures the FP16 error on sample images (or random pixels).
pub fn export(args: &ExportArgs, device: &Device) -> Result<ExportOutcome, PipelineError> {
    // The samples are one batch (and, without --sample, one tensor of random pixels): a
    // count past any batch asked for terabytes before the model was read.
    const MAX_SAMPLES: usize = 1024;
    if args.samples == 0 {
        // It was read as 1; the doc says 1 to 1024.
        input_error!("--samples 0: the FP16 error needs at least 1 sample image");
    }
    if args.samples > MAX_SAMPLES {
        input_error!(
            "--samples {} is more than one batch of {MAX_SAMPLES} images (the FP16 error settles on far fewer)",
            args.samples
        );
    }
    if args.fp16 && args.format != ExportFormat::Onnx {
        input_error!(
            "--fp16 applies to --format onnx (the safetensors export is always f16); add \
             --format onnx or drop --fp16"
        );
    }
    let loaded = load_model(&args.model, &args.load, device, DType::F32)?;
    let (model_path, model, preprocess) = (loaded.path, loaded.model, loaded.preprocess);
    crate::models::check_not_model_folder(&args.out, &model_path)?;
    let size = model.config().vision_config.image_size;
    let folder_images = match &args.sample {
        Some(data) if data.is_dir() => clipcid_data::image_files_in(data)?,
        _ => vec![],
    };
    let (pixels, what) = match &args.sample {
        // A plain folder of images (no captions, no classes): the first `samples` by name.
        Some(data) if !folder_images.is_empty() => {
            let samples = folder_images
                .iter()
                .take(args.samples)
                .enumerate()
                .map(|(i, file)| clipcid_data::Sample {
                    index: i as u64,
                    key: file.display().to_string(),
                    image: std::fs::read(file).map_err(|e| e.to_string()),
                    caption: None,
                    label: None,
                })
                .collect();
            // Decoded in parallel as a dataset's batch is; a file that fails is an error
            // naming it, not a smaller sample.
            let (batch, skipped) = clipcid_data::decode_batch(samples, &preprocess, device)?;
            if let Some(s) = skipped.first() {
                input_error!("{}: {}", s.key, s.reason);
            }
            let b = batch
                .ok_or_else(|| PipelineError::Input(format!("{}: no images", data.display())))?;
            let n = b.len();
            (b.pixels, format!("{n} images of {}", data.display()))
        }
        Some(data) => {
            let ds = Dataset::open(data)?;
            let mut it = BatchIter::new(
                ds.samples()?,
                preprocess.clone(),
                args.samples,
                device.clone(),
            );
            let b = it
                .next()
                .ok_or_else(|| PipelineError::Input(format!("{}: no images", data.display())))??;
            let n = b.len();
            (b.pixels, format!("{n} images of {}", data.display()))
        }
        None => {
            let n = args.samples;
            let px = Tensor::randn(0f32, 1.0, (n, 3, size, size), device)?;
            (
                px,
                format!("{n} random-pixel inputs (pass --sample DATA for real images)"),
            )
        }
    };
    let ctx = model.config().text_config.default_context_length();
    let tokenizer = match ClipTokenizer::find_beside(&model_path) {
        Some(p) => Some(ClipTokenizer::load(&p, ctx)?),
        None => None,
    };
    // Every file is staged and moved into `--out` together: a failure part way (a full disk)
    // left new weights beside no preprocessing, or beside an earlier export's.
    let (r, onnx) = clipcid_store::io::write_folder_replacing(&args.out, "export", |dir| {
        let r = export_fp16(&model, dir, &pixels.to_dtype(DType::F32)?)?;
        preprocess.save_hf_preprocessor_config(dir)?;
        if let Some(tok) = &tokenizer {
            tok.save_pretrained(dir)?;
        }
        if args.format == ExportFormat::OpenClip {
            model.save_open_clip(
                dir,
                DType::F16,
                Some(preprocess.to_open_clip_preprocess_cfg()),
            )?;
            if let Some(tok) = &tokenizer {
                tok.save_bpe_merges(&dir.join("bpe_simple_vocab_16e6.txt.gz"))?;
            }
        }
        let onnx = match args.format {
            ExportFormat::Onnx => {
                let mut onnx = export_onnx(
                    &model,
                    &preprocess,
                    tokenizer.as_ref(),
                    &pixels,
                    &dir.join("onnx"),
                    args.fp16,
                )?;
                // The paths where the files will be once moved out of the staging folder.
                let moved = |p: &Path| args.out.join(p.strip_prefix(dir).unwrap_or(p));
                for saved in std::iter::once(&mut onnx.image).chain(onnx.text.as_mut()) {
                    saved.path = moved(&saved.path);
                    saved.external_data = saved.external_data.as_deref().map(moved);
                }
                Some(onnx)
            }
            _ => None,
        };
        Ok::<_, PipelineError>((r, onnx))
    })?;
    Ok(ExportOutcome {
        report: r,
        measured_on: what,
        onnx,
    })
}

/// Captions whose clipcid embeddings go into `onnx/check.safetensors`.
const CHECK_CAPTIONS: [&str; 4] = [
    "a photo of a cat",
    "a diagram with the word STOP",
    "two dogs playing in the snow",
    "a red square",
];

/// Writes both towers as ONNX to `dir` with the preprocessing in their metadata, and
/// `check.safetensors`: up to four of `pixels` (`pixel_values`) with clipcid's f32
/// `image_embeds`, and when the model has a tokenizer, [`CHECK_CAPTIONS`] as `input_ids`
/// (int64) with their `text_embeds`.
fn export_onnx(
    model: &clipcid_models::ClipModel,
    preprocess: &clipcid_data::Preprocess,
    tokenizer: Option<&ClipTokenizer>,
    pixels: &Tensor,
    dir: &Path,
    fp16: bool,
) -> Result<clipcid_onnx::OnnxExport, PipelineError> {
    use clipcid_onnx::{export_towers, OnnxPrecision};
    let precision = match fp16 {
        true => OnnxPrecision::F16,
        false => OnnxPrecision::F32,
    };
    let cfg = model.config();
    let meta: Vec<(String, String)> = [
        ("image_size", cfg.vision_config.image_size.to_string()),
        ("image_mean", serde_json::json!(preprocess.mean).to_string()),
        ("image_std", serde_json::json!(preprocess.std).to_string()),
        (
            "preprocessor_config",
            preprocess.to_hf_preprocessor_config().to_string(),
        ),
        (
            "open_clip_preprocess_cfg",
            preprocess.to_open_clip_preprocess_cfg().to_string(),
        ),
        (
            "context_length",
            cfg.text_config.max_position_embeddings.to_string(),
        ),
        ("projection_dim", cfg.projection_dim.to_string()),
        (
            "embeddings",
            "projected, not normalised: divide by the L2 norm for cosine similarity".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let out = export_towers(model, dir, precision, &meta)?;
    if let Some(why) = &out.text_skipped {
        log::warn!("text tower not exported to ONNX: {why}");
    }
    let cpu = Device::Cpu;
    let n = pixels.dim(0)?.min(4);
    let px = pixels.narrow(0, 0, n)?.to_dtype(DType::F32)?;
    let mut tensors = vec![
        ("pixel_values".to_string(), px.to_device(&cpu)?),
        (
            "image_embeds".to_string(),
            model
                .encode_image(&px)?
                .to_dtype(DType::F32)?
                .to_device(&cpu)?,
        ),
    ];
    if let (Some(tok), Some(_)) = (tokenizer, &out.text) {
        let ids = tok.encode_batch(&CHECK_CAPTIONS, model.device())?;
        let emb = model.encode_text(&ids)?.to_dtype(DType::F32)?;
        tensors.push((
            "input_ids".to_string(),
            ids.to_dtype(DType::I64)?.to_device(&cpu)?,
        ));
        tensors.push(("text_embeds".to_string(), emb.to_device(&cpu)?));
    }
    // clipcid's f32 outputs whatever the graphs' precision: the reference both are held to.
    let path = dir.join("check.safetensors");
    clipcid_store::io::write_safetensors(&path, tensors, &Default::default())?;
    Ok(out)
}
