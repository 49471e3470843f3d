//! `clipcid demo`: the README's main command. Until real default data and a pretrained
//! teacher ship offline (issue 8), it generates a captioned shape-image set as WebDataset
//! shards, trains a small teacher CLIP on it from scratch, and runs the whole pipeline:
//! embed -> balance -> cluster -> distill (plus a no-distillation baseline) -> eval, then
//! prints a results table and writes `report/`.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clipcid_data::{BatchIter, Dataset, Preprocess};
use clipcid_embed::{embed_dataset, EmbedOptions};
use clipcid_eval::{
    evaluate, AgreementPlan, EvalModel, EvalPlan, ProbeOptions, Templates, ZeroShotPlan,
};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
use clipcid_train::{DistillConfig, RunSummary, Trainer};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

const COLOURS: &[(&str, [u8; 3])] = &[
    ("red", [220, 30, 30]),
    ("green", [30, 170, 60]),
    ("blue", [40, 60, 220]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 50, 170]),
];
const SHAPES: &[&str] = &["circle", "square", "triangle", "cross"];

/// Draws one shape image and its caption.
fn draw(rng: &mut impl Rng, size: u32) -> (RgbImage, String) {
    let (cname, colour) = COLOURS[rng.random_range(0..COLOURS.len())];
    let shape = SHAPES[rng.random_range(0..SHAPES.len())];
    let bg = [
        rng.random_range(200..=255u8),
        rng.random_range(200..=255u8),
        rng.random_range(200..=255u8),
    ];
    let big = rng.random_bool(0.5);
    let r = if big {
        size as f32 * 0.38
    } else {
        size as f32 * 0.2
    };
    let cx = rng.random_range(r..size as f32 - r);
    let cy = rng.random_range(r..size as f32 - r);
    let img = RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let inside = match shape {
            "circle" => dx * dx + dy * dy <= r * r,
            "square" => dx.abs() <= r * 0.8 && dy.abs() <= r * 0.8,
            "triangle" => dy <= r * 0.8 && dy >= -r && dx.abs() <= (dy + r) * 0.55,
            _ => (dx.abs() <= r * 0.25 && dy.abs() <= r) || (dy.abs() <= r * 0.25 && dx.abs() <= r),
        };
        if inside {
            Rgb(colour)
        } else {
            // A soft vertical gradient so backgrounds are not flat.
            let t = y as f32 / size as f32;
            Rgb(bg.map(|c| (c as f32 * (0.85 + 0.15 * t)) as u8))
        }
    });
    let caption = format!("a {} {cname} {shape}", if big { "large" } else { "small" });
    (img, caption)
}

/// Writes `n` generated samples as WebDataset shards of 256 under `dir` (deterministic).
pub fn write_shapes_dataset(dir: &Path, n: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (shard, start) in (0..n).step_by(256).enumerate() {
        let path = dir.join(format!("shapes-{shard:05}.tar"));
        let tmp = dir.join(format!(".shapes-{shard:05}.tar.tmp"));
        let mut b = tar::Builder::new(
            std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        for i in start..(start + 256).min(n) {
            let (img, caption) = draw(&mut rng, 64);
            let mut png = Cursor::new(Vec::new());
            img.write_to(&mut png, image::ImageFormat::Png)?;
            for (ext, bytes) in [("png", png.into_inner()), ("txt", caption.into_bytes())] {
                let mut h = tar::Header::new_gnu();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, format!("{i:09}.{ext}"), bytes.as_slice())?;
            }
        }
        b.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// Writes `n` generated images as a labelled folder `dir/<class>/<i>.png` (deterministic),
/// with a folder for every one of the 40 classes (`large_red_circle`, ...) even when no image
/// of it was drawn, so every split has the same class list.
pub fn write_shapes_labelled(dir: &Path, n: usize, seed: u64) -> Result<()> {
    let folder = |caption: &str| caption.trim_start_matches("a ").replace(' ', "_");
    for c in class_prompts() {
        std::fs::create_dir_all(dir.join(folder(&c)))
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..n {
        let (img, caption) = draw(&mut rng, 64);
        let path = dir.join(folder(&caption)).join(format!("{i:06}.png"));
        img.save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The demo's sizes; `clipcid demo --samples N` scales the data, the rest follows.
#[derive(Debug, Clone, Copy)]
pub struct DemoSize {
    /// Generated training pairs.
    pub samples: usize,
    /// Generated held-out pairs for evaluation.
    pub eval_samples: usize,
    /// Epochs of the teacher's own training.
    pub teacher_epochs: usize,
    /// Epochs of each student run.
    pub student_epochs: usize,
}

/// Every caption the generator can write, in a fixed order: the zero-shot classes.
fn class_prompts() -> Vec<String> {
    let mut v = vec![];
    for size in ["large", "small"] {
        for (c, _) in COLOURS {
            for s in SHAPES {
                v.push(format!("a {size} {c} {s}"));
            }
        }
    }
    v
}

/// The demo teacher's shape: the `tiny` preset at twice the width and depth (the student
/// is `tiny` itself), sharing its 16-wide embedding space so distillation can compare them.
fn teacher_config() -> Result<ClipConfig> {
    let mut c = ClipConfig::preset("tiny")?;
    for (hidden, inter, layers, heads) in [
        (
            &mut c.vision_config.hidden_size,
            &mut c.vision_config.intermediate_size,
            &mut c.vision_config.num_hidden_layers,
            &mut c.vision_config.num_attention_heads,
        ),
        (
            &mut c.text_config.hidden_size,
            &mut c.text_config.intermediate_size,
            &mut c.text_config.num_hidden_layers,
            &mut c.text_config.num_attention_heads,
        ),
    ] {
        *hidden = 64;
        *inter = 256;
        *layers = 4;
        *heads = 4;
    }
    Ok(c)
}

/// Writes a run config beside the demo's outputs (so it can be re-run with `clipcid distill`)
/// and reads it back through the same parser the CLI uses.
fn write_config(path: &Path, body: &str) -> Result<DistillConfig> {
    std::fs::write(path, body).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(DistillConfig::from_file(path)?)
}

fn train(config: DistillConfig, out: &Path, device: &Device) -> Result<(RunSummary, ClipModel)> {
    let mut t = Trainer::new(config, out, device)?;
    let s = t.run(None, true)?;
    let student = s
        .student
        .clone()
        .context("the run stopped before its last step")?;
    Ok((s, ClipModel::load(&student, device)?))
}

/// Runs the demo: returns the markdown results table it printed.
pub fn run(out: &Path, size: DemoSize, device: &Device) -> Result<String> {
    let started = std::time::Instant::now();
    let data = out.join("data");
    let eval_data = out.join("eval-classes");
    let probe_data = out.join("probe-train");
    println!(
        "[1/8] generating {} training and {} held-out captioned shape images -> {}",
        size.samples,
        size.eval_samples,
        data.display()
    );
    write_shapes_dataset(&data, size.samples, 0)?;
    write_shapes_labelled(&eval_data, size.eval_samples, 1)?;
    write_shapes_labelled(&probe_data, 2 * size.eval_samples, 2)?;
    let teacher_dir = out.join("teacher");
    let tokenizer = ClipTokenizer::byte_level(16)?;
    let tok_path = out.join("tokenizer.json");
    tokenizer.save(&tok_path)?;

    println!(
        "[2/8] training the teacher CLIP (width 64, 4 layers) from scratch on the generated pairs"
    );
    let teacher_cfg = teacher_config()?;
    let json = serde_json::to_vec_pretty(&teacher_cfg.to_hf_json())?;
    std::fs::write(out.join("teacher-config.json"), json)?;
    let teacher_run = write_config(
        &out.join("teacher.toml"),
        &format!(
            "# The demo teacher: CLIP loss only, no teacher of its own.\nbatch_size = 64\nepochs = {}\nseed = 0\ncheckpoint_every = 100000\n\n[data]\ndataset = \"data\"\ntokenizer = \"tokenizer.json\"\n\n[student]\nmodel = \"teacher-config.json\"\n\n[loss.cluster]\nenabled = false\n\n[loss.instance]\nenabled = false\n\n[optim]\nlr = 2e-3\nwarmup_steps = 30\n",
            size.teacher_epochs
        ),
    )?;
    let (_, teacher) = train(teacher_run, &out.join("runs/teacher"), device)?;
    teacher.save_pretrained(&teacher_dir, DType::F32)?;
    tokenizer.save(&teacher_dir.join("tokenizer.json"))?;

    let emb = out.join("embeddings");
    println!(
        "[3/8] embedding images and captions with the teacher -> {}",
        emb.display()
    );
    let opts = EmbedOptions {
        batch_size: 64,
        shard_size: 1024,
        progress: true,
        teacher_name: "demo teacher (tiny x2, trained on the generated shapes)".into(),
        ..EmbedOptions::default()
    };
    let s = embed_dataset(
        &teacher,
        Some(&tokenizer),
        &Dataset::open(&data)?,
        &emb,
        &opts,
    )?;

    let keep = out.join("keep.safetensors");
    println!(
        "[4/8] balancing (near-duplicate removal, threshold 0.07) -> {}",
        keep.display()
    );
    let emb_all = clipcid_dedup::load_embeddings(std::slice::from_ref(&emb), device)?;
    let bal = clipcid_dedup::balance(
        &emb_all.image,
        &clipcid_dedup::BalanceOptions {
            sweep: vec![0.03, 0.05, 0.07, 0.1],
            ..Default::default()
        },
    )?;
    clipcid_dedup::write_keep_file(&keep, &bal, &emb_all.ids)?;

    let clusters = out.join("clusters.safetensors");
    // faiss wants at least 39 training points per centroid.
    let k = (bal.summary.kept / 39).clamp(2, 64);
    println!(
        "[5/8] k-means (faiss, K = {k}) on all and on the kept embeddings -> {}",
        clusters.display()
    );
    let kmeans = clipcid_cluster::KMeans::new(k).iterations(20).seed(0);
    let all_rows = clipcid_cluster::ShardRows::open(std::slice::from_ref(&emb), None)?;
    let before = clipcid_cluster::cluster_shards(&kmeans, &all_rows, false)?;
    clipcid_cluster::write_clusters(&out.join("clusters-unbalanced.safetensors"), &before)?;
    let kept_rows = clipcid_cluster::ShardRows::open(std::slice::from_ref(&emb), Some(&keep))?;
    let after = clipcid_cluster::cluster_shards(&kmeans, &kept_rows, false)?;
    clipcid_cluster::write_clusters(&clusters, &after)?;
    let report = out.join("report");
    std::fs::create_dir_all(&report)?;
    clipcid_cluster::plot_size_histogram(
        &report.join("cluster-sizes.png"),
        &format!("cluster sizes, K = {k}: before and after balancing"),
        &[
            ("after balance", &after.sizes),
            ("before balance", &before.sizes),
        ],
    )?;

    let student_body = |terms: &str| {
        format!(
            "batch_size = 32\nepochs = {}\nseed = 0\ncheckpoint_every = 200\n\n[data]\ndataset = \"data\"\nembeddings = \"embeddings\"\nkeep = \"keep.safetensors\"\nclusters = \"clusters.safetensors\"\ntokenizer = \"tokenizer.json\"\n\n[student]\nmodel = \"tiny\"\n\n{terms}\n[optim]\nlr = 2e-3\nwarmup_steps = 30\n",
            size.student_epochs
        )
    };
    println!(
        "[6/8] distilling the `tiny` student: CLIP + cluster + instance loss -> {}",
        out.join("runs/distilled").display()
    );
    let distill_cfg = write_config(
        &out.join("distill.toml"),
        &student_body(
            "[loss.cluster]\nsample_rate = 0.5\nscale = 16.0\n\n[loss.instance]\nweight = 1.0\n",
        ),
    )?;
    let (distilled_run, distilled) = train(distill_cfg, &out.join("runs/distilled"), device)?;
    println!("[7/8] training the same student without distillation (CLIP loss only, same data and steps)");
    let baseline_cfg = write_config(
        &out.join("baseline.toml"),
        &student_body("[loss.cluster]\nenabled = false\n\n[loss.instance]\nenabled = false\n"),
    )?;
    let (baseline_run, baseline) = train(baseline_cfg, &out.join("runs/baseline"), device)?;

    println!(
        "[8/8] evaluating on the {} held-out images -> {}",
        size.eval_samples,
        report.display()
    );
    let prompts = class_prompts();
    let named = |name: &str, model: &ClipModel| EvalModel {
        name: name.into(),
        model: model.clone(),
        tokenizer: tokenizer.clone(),
    };
    let models = [
        named("teacher", &teacher),
        named("distilled", &distilled),
        named("baseline", &baseline),
    ];
    let plan = EvalPlan {
        zero_shot: Some(ZeroShotPlan {
            data: eval_data.clone(),
            // The class folders are the captions without their article: "a {}" rebuilds them.
            templates: {
                let path = out.join("templates.txt");
                std::fs::write(
                    &path,
                    "# the demo's captions are \"a <class name>\"\na {}\n",
                )
                .with_context(|| format!("cannot write {}", path.display()))?;
                Templates::from_file(&path)?
            },
            class_names: None,
        }),
        linear_probe: Some((
            probe_data.clone(),
            eval_data.clone(),
            ProbeOptions::default(),
        )),
        retrieval: None,
        agreement: Some(AgreementPlan {
            images: eval_data.clone(),
            queries: prompts.clone(),
            teacher: "teacher".into(),
            ns: (10..=20).collect(),
        }),
        batch_size: 256,
    };
    let (res, _) = evaluate(&models, &plan, &report.join("eval"))?;
    let mut table = String::new();
    table.push_str("| model | parameters | zero-shot top-1 (40 classes) | linear probe top-1 | mAP@10-20 vs teacher | image cosine to teacher | train samples/s |\n|---|---|---|---|---|---|---|\n");
    table.push_str(&format!(
        "| teacher (tiny x2, CLIP loss) | {} | {:.1}% | {:.1}% | - | - | - |\n",
        teacher.parameter_count(),
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

    // Textness on the distilled student: words drawn onto held-out shapes.
    let shapes = clipcid_eval::load_images(&eval_data)?;
    let textness = clipcid_eval::textness_study(
        &distilled,
        &tokenizer,
        &shapes,
        &[
            "a large red circle".to_string(),
            "a small blue square".to_string(),
        ],
        &clipcid_eval::TextRenderer::dejavu_sans()?,
        &clipcid_eval::TextnessOptions::default(),
        &report.join("textness"),
    )?;
    let fractions: Vec<String> = textness
        .rows
        .iter()
        .map(|r| format!("{:+}: {:.0}%", r.scale, 100.0 * r.text_fraction))
        .collect();

    // FP16 export of the distilled student.
    let sample = {
        let ds = Dataset::open(&eval_data)?;
        let mut it = BatchIter::new(ds.samples()?, Preprocess::clip(32), 64, device.clone());
        it.next().context("no held-out images")??.pixels
    };
    let fp16 = clipcid_eval::export_fp16(&distilled, &out.join("student-fp16"), &sample)?;
    tokenizer.save(&out.join("student-fp16/tokenizer.json"))?;
    for (run, name) in [
        ("distilled", "loss-distilled.png"),
        ("baseline", "loss-baseline.png"),
        ("teacher", "loss-teacher.png"),
    ] {
        std::fs::copy(
            out.join("runs").join(run).join("loss.png"),
            report.join(name),
        )?;
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
         | data | {} training + {} held-out generated image-caption pairs (64x64 PNG, WebDataset shards) |\n\
         | teacher | trained here from scratch with the CLIP loss ({} epochs): NOT a pretrained CLIP |\n\
         | embed | {} images + captions -> {} shard(s), {:.0} images/s |\n\
         | balance | threshold 0.07: kept {} of {}, removed {:.1}% (sweep {}) |\n\
         | cluster | K = {k}: sizes before balance {}, after {} |\n\
         | distill | {} steps x 32, {} epochs per student |\n\
         | eval | zero-shot and linear probe (train: {} generated images) on {} held-out images, teacher agreement over the 40 class prompts: [eval/report.md](eval/report.md) |\n\
         | textness | distilled student, words drawn on held-out shapes; text-bearing share of the top 10 by scale: {} ([textness/report.md](textness/report.md)) |\n\
         | export | FP16 student: {:.1} kB -> {:.1} kB of tensors; unit image embeddings vs FP32: max abs diff {:.1e}, min cosine {:.5} |\n",
        size.samples,
        size.eval_samples,
        size.teacher_epochs,
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
        size.student_epochs,
        2 * size.eval_samples,
        size.eval_samples,
        fractions.join(", "),
        fp16.fp32_bytes as f64 / 1e3,
        fp16.fp16_bytes as f64 / 1e3,
        fp16.max_abs_diff,
        fp16.min_cosine,
    );
    let md = format!(
        "# clipcid demo report\n\n\
         Teacher used: a small CLIP trained by this demo on its own generated shapes (no pretrained\n\
         teacher ships offline yet). Students are the `tiny` preset (half the teacher's width and depth).\n\n\
         ## Results on {} held-out images\n\n{table}\n\
         ## Pipeline\n\n{pipeline}\n\
         ## Pictures\n\n\
         - Cluster sizes before and after balancing: ![](cluster-sizes.png)\n\
         - Loss curves: distilled ![](loss-distilled.png), baseline ![](loss-baseline.png), teacher ![](loss-teacher.png)\n\n\
         Re-run a stage with the configs beside this folder: `clipcid distill --config {} --out runs/x`.\n\
         Total time {:.0} s.\n",
        size.eval_samples,
        out.join("distill.toml").display(),
        started.elapsed().as_secs_f64()
    );
    clipcid_models::io::write_atomic(&report.join("README.md"), md.as_bytes())?;
    println!();
    println!("{pipeline}");
    println!("{table}");
    println!("Teacher used: a small CLIP the demo trained itself on the generated shapes, NOT a pretrained");
    println!(
        "CLIP (none ships offline yet). Report: {}",
        report.join("README.md").display()
    );
    println!("Total time {:.0} s.", started.elapsed().as_secs_f64());
    Ok(table)
}
