//! `clipcid`: distil big CLIP models into small ones. One subcommand per pipeline stage.
//!
//! This binary only parses arguments and prints: every stage runs in `clipcid-pipeline`
//! (the option structs parsed here are that crate's).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use clipcid_embed::EmbedSummary;
use clipcid_pipeline::{
    BalanceArgs, ClusterArgs, DemoOptions, DistillArgs, EmbedArgs, EvalArgs, ExportArgs, LitArgs,
    TextnessArgs,
};

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

/// `clipcid balance [ARGS]`, or its split form `clipcid balance pairs|merge`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BalanceCli {
    #[command(subcommand)]
    split: Option<BalanceSplit>,
    #[command(flatten)]
    args: Option<BalanceArgs>,
}

#[derive(Subcommand)]
enum BalanceSplit {
    /// One part's share of the distance tiles (`--part I/N`, or RANK/WORLD_SIZE) into a pair
    /// file; memory is the part's rows plus one block, not the whole matrix.
    Pairs(clipcid_pipeline::BalancePairsArgs),
    /// Union-find over every part's pair file and the keep file: exactly one process's.
    Merge(clipcid_pipeline::BalanceMergeArgs),
}

#[derive(Subcommand)]
enum Command {
    /// Embed a dataset with a teacher CLIP into safetensors shards (resumable).
    Embed(EmbedArgs),
    /// Remove near-duplicate images (image semantic balance): union-find over distance < threshold.
    /// Split over N processes with `balance pairs --part I/N` then `balance merge`.
    Balance(BalanceCli),
    /// k-means (faiss) over the kept teacher image embeddings: centroids + pseudo-labels.
    Cluster(ClusterArgs),
    /// Train a student CLIP from a TOML run config (CLIP-CID or PicCollage; resumable).
    Distill(DistillArgs),
    /// Evaluate a student (and its teacher, and other models) side by side: zero-shot,
    /// linear probe, retrieval, teacher agreement; writes a markdown report with plots.
    Eval(EvalArgs),
    /// Textness bias: probe the direction of "text in the image" and show its effect on search.
    Textness(TextnessArgs),
    /// Export a model to FP16 safetensors (Hugging Face layout) with a size and error report.
    Export(ExportArgs),
    /// The default real data (see `scripts/fetch-data.sh`, which downloads it and calls this).
    #[command(subcommand)]
    Data(DataCommand),
    /// Build a teacher when no pretrained CLIP is at hand.
    #[command(subcommand)]
    Teacher(TeacherCommand),
    /// Write a CLIP checkpoint with seeded random weights (for tests and smoke runs), or
    /// with --image-tower-of, PicCollage's student of a teacher: a random image tower at
    /// half its width and depth beside the teacher's own text tower.
    InitModel {
        /// Model shape: vit-b-32, vit-b-16, piccollage-s12, piccollage-s24 or tiny.
        #[arg(long, default_value = "tiny", conflicts_with = "image_tower_of")]
        preset: String,
        /// A teacher (file, folder or Hugging Face id): write its PicCollage student (image
        /// tower halved and freshly initialised, text tower, text projection and logit scale
        /// copied) into the folder --out, for a `mode = "piccollage"` run's student.model
        /// (OUT/config.json) and student.init (OUT/model.safetensors).
        #[arg(long)]
        image_tower_of: Option<PathBuf>,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output `.safetensors` file (Hugging Face layout, config in the metadata); a folder
        /// with --image-tower-of.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check that `--device` computes what the CPU does: a tiny CLIP's f32, bf16 and f16
    /// embeddings, the losses, near-duplicate removal and one training step, compared with
    /// their limits (exit status 1 when one is exceeded).
    SelfCheck {
        /// Also measure throughput on `--device` (ViT-B/32 bf16 images/s, a student training
        /// step, balance tiles): batch 256 and 1M rows, or a seconds-long smoke size on a CPU.
        #[arg(long)]
        bench: bool,
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
    /// scripts/fetch-data.sh; see the README), ending in the ablation: CLIP only, then with
    /// the cluster term, then with the instance term too (CLIP-CID), and PicCollage's image
    /// tower, each over several seeds on one data-limited subset. Teacher: --teacher, else a
    /// pretrained CLIP in ../shared/teacher/, else a locked-text teacher built once in
    /// DATA/teacher-lit.
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
        /// Epochs of the locked-text teacher's image tower over all the training digits,
        /// when it is built.
        #[arg(long, default_value_t = DemoOptions::new("", "").teacher_epochs)]
        teacher_epochs: usize,
        /// Epochs of each CLIP-CID arm's student (CLIP only, + cluster, + instance).
        #[arg(long, default_value_t = DemoOptions::new("", "").student_epochs)]
        student_epochs: usize,
        /// Epochs of the PicCollage arm's student (image tower only: cheaper steps).
        #[arg(long, default_value_t = DemoOptions::new("", "").piccollage_epochs)]
        piccollage_epochs: usize,
        /// Rows of the seeded subset every student learns from (the teacher sees them all).
        #[arg(long, default_value_t = DemoOptions::new("", "").student_rows)]
        student_rows: usize,
        /// Seeds per arm of the ablation.
        #[arg(long, default_value_t = DemoOptions::new("", "").seeds)]
        seeds: usize,
    },
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
    Lit(LitArgs),
}

/// mimalloc instead of glibc's malloc. A training step frees and allocates the same
/// activation-sized buffers (megabytes each) every step; glibc serves those from fresh `mmap`s
/// or trims them back to the kernel, and the page faults of touching them again (the kernel
/// zeroing each page) cost a student training step 10-15% (0.70 -> 0.62 s at batch 32,
/// docs/benchmarks.md). mimalloc keeps freed pages for reuse. C libraries (faiss, OpenBLAS)
/// keep using malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    // The soft limit on open files up to the hard one, so that each set of embedding shards
    // keeps more of its files open between batches (`ShardLayout::open_files`).
    if let Some(limit) = clipcid_store::raise_open_files_limit() {
        log::debug!("open files: at most {limit}");
    }
    let blas = clipcid_kernels::blas::openblas_core();
    if blas.replaced.is_some() {
        log::info!("OpenBLAS's kernels: {blas}; OPENBLAS_CORETYPE chooses a set");
    }
    if let Some(set) = clipcid_kernels::blas::core_type::suggested_core_type() {
        log::warn!(
            "OpenBLAS runs its {} kernels, without AVX, on a CPU with AVX, so CPU products run \
             several times slower: set OPENBLAS_CORETYPE={set} (docs/guide.md, \"OpenBLAS's \
             kernels\")",
            blas.name
        );
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {}", error_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line (`outer: cause: cause`, as anyhow's `{:#}`), leaving
/// out a cause whose text the line already ends with: an error that prints its source and
/// also returns it from `source()` (thiserror's `"{path}: {source}"` beside a `source` field,
/// `"faiss: {0}"` on a `#[from]`) was printed twice, as
/// `x.json: No space left on device (os error 28): No space left on device (os error 28)`.
/// A path inside an output folder's staging folder (gone once the write failed) is written
/// as the path the file was going to (`clipcid_store::io::without_staging`).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.is_empty() && line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    clipcid_store::io::without_staging(&line)
}

fn run(cli: Cli) -> Result<()> {
    let device = clipcid_pipeline::parse_device(&cli.device)?;
    match cli.command {
        Command::Embed(args) => {
            let summary = clipcid_pipeline::embed(&args, &device)?;
            print_embed_summary(&summary, &args.out);
        }
        Command::Balance(b) => match (b.split, b.args) {
            (Some(BalanceSplit::Pairs(args)), _) => {
                let o = clipcid_pipeline::balance_pairs(&args, &device)?;
                println!(
                    "part {}: {} of {} row blocks, {} near pairs under {} in {:.2} s ({} rows in memory at once); wrote {}",
                    o.part,
                    o.row_blocks.0,
                    o.row_blocks.1,
                    o.pairs,
                    args.threshold,
                    o.seconds,
                    o.rows_in_memory,
                    args.out.display()
                );
            }
            (Some(BalanceSplit::Merge(args)), _) => {
                let o = clipcid_pipeline::balance_merge(&args)?;
                print_balance(&o, &args.out);
            }
            (None, Some(args)) => {
                print_balance(&clipcid_pipeline::balance(&args, &device)?, &args.out)
            }
            (None, None) => anyhow::bail!("balance needs --embeddings and --out (see --help)"),
        },
        Command::Cluster(args) => print_cluster(&clipcid_pipeline::cluster(&args, &device)?, &args),
        Command::Distill(args) => distill(&args, &device)?,
        Command::Data(DataCommand::Build { raw, out }) => {
            let s = clipcid_pipeline::build_default_data(&raw, &out)?;
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
        Command::Teacher(TeacherCommand::Lit(args)) => {
            let t = clipcid_pipeline::lit_teacher(&args, &device)?;
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
        Command::Eval(args) => {
            let md = clipcid_pipeline::eval(&args, &device)?;
            println!("{md}");
            println!("report: {}", args.out.join("report.md").display());
        }
        Command::Textness(args) => {
            let r = clipcid_pipeline::textness(&args, &device)?;
            println!("{}", r.markdown);
            println!(
                "textness direction: {}",
                args.out.join("textness.safetensors").display()
            );
        }
        Command::Export(args) => print_export(&clipcid_pipeline::export(&args, &device)?, &args),
        Command::InitModel {
            preset,
            image_tower_of,
            seed,
            out,
        } => match image_tower_of {
            Some(teacher) => {
                let path = clipcid_pipeline::resolve_model_path(&teacher)?;
                let student = clipcid_pipeline::write_image_tower_student(&path, seed, &out)?;
                let v = &student.config().vision_config;
                println!(
                    "wrote {} (image tower width {}, depth {}, seed {seed}, random; text tower of {})",
                    out.display(),
                    v.hidden_size,
                    v.num_hidden_layers,
                    teacher.display()
                );
            }
            None => {
                clipcid_pipeline::init_model(&preset, seed, &out)?;
                println!(
                    "wrote {} ({preset}, seed {seed}, random weights)",
                    out.display()
                );
            }
        },
        Command::SelfCheck { bench } => {
            let rows = clipcid_pipeline::device_parity(&candle_core::Device::Cpu, &device)?;
            print!(
                "{}",
                clipcid_pipeline::parity_table(&candle_core::Device::Cpu, &device, &rows)
            );
            let mut profile_error = None;
            if bench {
                let sizes = if device.is_cpu() {
                    clipcid_pipeline::BenchSizes::SMOKE
                } else {
                    clipcid_pipeline::BenchSizes::FULL
                };
                println!(
                    "\n| workload ({:?}) | value | unit |\n|---|---|---|",
                    device.location()
                );
                let print = |rows: &[clipcid_pipeline::BenchRow]| {
                    for r in rows {
                        // Seconds keep four decimals: a GPU's balance row may be well under
                        // a tenth of a second, and gpu-check.py divides by it.
                        let digits = match r.unit {
                            "s" => 4,
                            "ms (op)" => 3,
                            u if u.starts_with("ms") => 2,
                            _ => 1,
                        };
                        println!("| {} | {:.*} | {} |", r.workload, digits, r.value, r.unit);
                    }
                };
                print(&clipcid_pipeline::throughput(&device, sizes)?);
                // The profile after the headline rows are out: its failure keeps them.
                if let Err(e) = clipcid_pipeline::op_profile(&device, sizes).map(|p| print(&p)) {
                    profile_error = Some(e);
                }
            }
            if let Some(bad) = rows.iter().find(|r| !r.pass) {
                anyhow::bail!("{} is {:e}, beyond {}", bad.check, bad.value, bad.limit);
            }
            if let Some(e) = profile_error {
                anyhow::bail!("the op profile failed: {e}");
            }
        }
        Command::Tokenizer { bpe_vocab, out } => {
            let tok = clipcid_pipeline::write_tokenizer(bpe_vocab.as_deref(), &out)?;
            println!("wrote {} ({} tokens)", out.display(), tok.vocab_size());
        }
        Command::Demo {
            data,
            out,
            teacher,
            teacher_epochs,
            student_epochs,
            piccollage_epochs,
            student_rows,
            seeds,
        } => {
            let opts = DemoOptions {
                data,
                out,
                teacher,
                teacher_epochs,
                student_epochs,
                piccollage_epochs,
                student_rows,
                seeds,
            };
            let r = clipcid_pipeline::demo::run(&opts, &device, &mut |line| println!("{line}"))?;
            println!();
            println!("{}", r.pipeline);
            println!("{}", r.table);
            for line in &r.ordering {
                println!("{line}");
            }
            println!();
            println!("{}", r.teacher_note);
            println!("Report: {}", r.report.display());
            println!("Total time {:.0} s.", r.seconds);
        }
    }
    Ok(())
}

fn distill(args: &DistillArgs, device: &candle_core::Device) -> Result<()> {
    let mut trainer = clipcid_pipeline::open_trainer(args, device)?;
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

fn print_cluster(o: &clipcid_pipeline::ClusterOutcome, args: &ClusterArgs) {
    let (file, s) = (&o.file, &o.file.summary);
    println!(
        "clustered {} of {} rows into K = {} (dim {}, trained on {}, objective {:.4}, imbalance {:.3})",
        file.labels.len(),
        o.total_rows,
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
        o.histogram.display()
    );
}

fn print_balance(o: &clipcid_pipeline::BalanceOutcome, out: &Path) {
    let s = &o.result.summary;
    println!(
        "balanced {} images from {} shard(s) at threshold {}: {} sets, kept {}, removed {} ({:.2}%), largest set {}",
        s.n,
        o.shards,
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
        out.display()
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
}

fn print_export(o: &clipcid_pipeline::ExportOutcome, args: &ExportArgs) {
    let r = &o.report;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "exported {} -> {} (f16, Hugging Face layout)\n\n| | FP32 | FP16 |\n|---|---:|---:|\n| all parameters ({:.2} M) | {:.1} MB | {:.1} MB |\n| image tower ({:.2} M) | {:.1} MB | {:.1} MB |\n| model.safetensors | - | {:.1} MB |\n\nunit image embeddings, FP16 ({} compute) vs FP32 on {}: max |diff| {:.2e}, mean |diff| {:.2e}, min cosine {:.6}",
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
        o.measured_on,
        r.max_abs_diff,
        r.mean_abs_diff,
        r.min_cosine
    );
    if let Some(onnx) = &o.onnx {
        let precision = if args.fp16 { "f16" } else { "f32" };
        println!(
            "\nONNX (opset {}, {precision}):\n\n| file | MB |\n|---|---:|",
            clipcid_onnx::OPSET
        );
        for saved in std::iter::once(&onnx.image).chain(&onnx.text) {
            println!(
                "| {} | {:.1} |",
                saved.path.display(),
                mb(saved.total_bytes())
            );
        }
        if let Some(why) = &onnx.text_skipped {
            println!("text tower not exported: {why}");
        }
        println!(
            "check it in ONNX Runtime: python3 scripts/onnx-check.py {}",
            args.out.display()
        );
    }
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

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn an_error_that_prints_its_source_prints_it_once() {
        // What thiserror derives for `#[error("{path}: {source}")]` with a `source` field.
        #[derive(Debug)]
        struct Io(std::io::Error);
        impl std::fmt::Display for Io {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "x.json: {}", self.0)
            }
        }
        impl std::error::Error for Io {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let line = error_line(&anyhow::Error::new(Io(std::io::Error::from_raw_os_error(
            28,
        ))));
        assert_eq!(line.matches("os error 28").count(), 1, "{line}");
        assert!(line.starts_with("x.json: "), "{line}");
        // A context whose cause is not in its text still gets the cause.
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(2)).context("cannot open a");
        assert_eq!(
            error_line(&e),
            format!("cannot open a: {}", std::io::Error::from_raw_os_error(2))
        );
    }

    #[test]
    fn an_error_names_the_path_a_staged_file_was_going_to() {
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(28))
            .context("cannot write out/.clipcid-staging-31337/student/model.safetensors");
        assert_eq!(
            error_line(&e),
            format!(
                "cannot write out/student/model.safetensors: {}",
                std::io::Error::from_raw_os_error(28)
            )
        );
    }
}
