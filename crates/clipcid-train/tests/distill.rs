#![allow(clippy::unwrap_used)]
//! The distillation loop end to end on a synthetic task with a known answer: images are
//! random mixtures of four smooth patterns and the teacher is a fixed random projection of
//! their (preprocessed) pixels, so a student that learns the projection reaches cosine 1.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clipcid_data::Preprocess;
use clipcid_models::{l2_normalize, ClipModel, ClipTokenizer};
use clipcid_train::{DistillConfig, Mode, TrainError, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u32 = 32;
const DIM: usize = 16;
const PATTERNS: usize = 4;

/// A dataset folder, its teacher embeddings and (optionally) clusters.
struct Fixture {
    dir: tempfile::TempDir,
    held_out: Vec<(Vec<f32>, Vec<f32>)>,
}

fn pattern(i: usize, x: u32, y: u32, c: usize) -> f32 {
    let (fx, fy) = (x as f32 / SIZE as f32, y as f32 / SIZE as f32);
    let phase = c as f32 * 1.3;
    match i {
        0 => (std::f32::consts::TAU * fx + phase).sin(),
        1 => (std::f32::consts::TAU * fy + phase).cos(),
        2 => (std::f32::consts::TAU * (fx + fy) + phase).sin(),
        _ => (std::f32::consts::PI * 3.0 * fx * fy + phase).cos(),
    }
}

fn image(w: &[f32]) -> image::RgbImage {
    image::RgbImage::from_fn(SIZE, SIZE, |x, y| {
        image::Rgb(std::array::from_fn(|c| {
            let v: f32 = (0..PATTERNS).map(|i| w[i] * pattern(i, x, y, c)).sum();
            (128.0 + 28.0 * v).round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// The teacher: `normalize(P (x - gray))` over preprocessed pixels `x`.
struct Teacher {
    projection: Vec<f32>,
    gray: Vec<f32>,
}

impl Teacher {
    fn new() -> Self {
        let n = 3 * (SIZE * SIZE) as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let projection = (0..DIM * n)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let gray = Preprocess::clip(SIZE as usize).apply(&image::DynamicImage::ImageRgb8(
            image::RgbImage::from_pixel(SIZE, SIZE, image::Rgb([128, 128, 128])),
        ));
        Self { projection, gray }
    }

    fn embed(&self, png: &[u8]) -> (Vec<f32>, Vec<f32>) {
        let x = Preprocess::clip(SIZE as usize).decode(png).unwrap();
        let centred: Vec<f32> = x.iter().zip(&self.gray).map(|(a, b)| a - b).collect();
        let mut t: Vec<f32> = self
            .projection
            .chunks_exact(centred.len())
            .map(|row| row.iter().zip(&centred).map(|(a, b)| a * b).sum())
            .collect();
        let n = t.iter().map(|v| v * v).sum::<f32>().sqrt();
        t.iter_mut().for_each(|v| *v /= n);
        (x, t)
    }
}

/// The fixture's PNGs are stored without compression, so every image has the same byte
/// length and one can be replaced by another of the same size.
fn png(img: &image::RgbImage) -> Vec<u8> {
    png_with(img, image::codecs::png::CompressionType::Uncompressed)
}

fn png_with(img: &image::RgbImage, compression: image::codecs::png::CompressionType) -> Vec<u8> {
    use image::ImageEncoder;
    let mut buf = vec![];
    image::codecs::png::PngEncoder::new_with_quality(
        &mut buf,
        compression,
        image::codecs::png::FilterType::NoFilter,
    )
    .write_image(
        img,
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    buf
}

/// `n` training images with captions, teacher shards (image + text), a tokenizer, and
/// `held` held-out (pixels, teacher embedding) pairs; with `k > 0`, a cluster file from
/// faiss k-means of the teacher embeddings.
fn fixture(n: usize, held: usize, k: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::create_dir_all(d.join("emb")).unwrap();
    let teacher = Teacher::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut tsv = String::new();
    let (mut img_rows, mut txt_rows) = (vec![], vec![]);
    let mut digests = vec![];
    let mut held_out = vec![];
    for i in 0..n + held {
        let w: Vec<f32> = (0..PATTERNS)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let bytes = png(&image(&w));
        let (pixels, t) = teacher.embed(&bytes);
        if i >= n {
            held_out.push((pixels, t));
            continue;
        }
        std::fs::write(d.join("data").join(format!("{i}.png")), &bytes).unwrap();
        digests.extend(clipcid_store::image_digest(&bytes));
        let words: Vec<String> = w
            .iter()
            .enumerate()
            .map(|(j, v)| {
                format!(
                    "{}{}",
                    ["sin", "cos", "diag", "ring"][j],
                    if *v > 0.0 { "+" } else { "-" }
                )
            })
            .collect();
        tsv.push_str(&format!("{i}.png\t{}\n", words.join(" ")));
        // The teacher's text embedding: its image embedding, slightly perturbed.
        let txt: Vec<f32> = t
            .iter()
            .map(|v| v + rng.random_range(-0.05f32..0.05))
            .collect();
        img_rows.extend(t);
        txt_rows.extend(txt);
    }
    std::fs::write(d.join("data").join("captions.tsv"), tsv).unwrap();
    let cpu = Device::Cpu;
    let tensors = vec![
        (
            "image".to_string(),
            Tensor::from_vec(img_rows, (n, DIM), &cpu).unwrap(),
        ),
        (
            "text".to_string(),
            Tensor::from_vec(txt_rows, (n, DIM), &cpu).unwrap(),
        ),
        (
            "ids".to_string(),
            Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), n, &cpu).unwrap(),
        ),
        (
            "image_digest".to_string(),
            Tensor::from_vec(digests, (n, 8), &cpu).unwrap(),
        ),
    ];
    let meta = HashMap::from([
        ("teacher".to_string(), "random projection".to_string()),
        ("provenance".to_string(), provenance(d, "t1")),
    ]);
    clipcid_store::io::write_safetensors(
        &clipcid_store::shard_path(&d.join("emb"), 0),
        tensors,
        &meta,
    )
    .unwrap();
    ClipTokenizer::byte_level(16)
        .unwrap()
        .save(&d.join("tokenizer.json"))
        .unwrap();
    if k > 0 {
        let rows = clipcid_cluster::ShardRows::open(&[d.join("emb")], None).unwrap();
        let kmeans = clipcid_cluster::KMeans::new(k).seed(1).iterations(20);
        let file = clipcid_cluster::cluster_shards(&kmeans, &rows, false).unwrap();
        clipcid_cluster::write_clusters(&d.join("clusters.safetensors"), &file).unwrap();
    }
    Fixture { dir, held_out }
}

impl Fixture {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn config(&self, body: &str) -> DistillConfig {
        let p = self.path("run.toml");
        std::fs::write(
            &p,
            format!(
                "{body}\n[data]\ndataset = \"data\"\nembeddings = \"emb\"\ntokenizer = \"tokenizer.json\"\n{}",
                if self.path("clusters.safetensors").exists() { "clusters = \"clusters.safetensors\"\n" } else { "" }
            ),
        )
        .unwrap();
        DistillConfig::from_file(&p).unwrap()
    }

    /// Mean cosine of the student's and the teacher's embeddings of the held-out images.
    fn held_out_cosine(&self, model: &ClipModel) -> f32 {
        let n = self.held_out.len();
        let px: Vec<f32> = self.held_out.iter().flat_map(|(p, _)| p.clone()).collect();
        let t: Vec<f32> = self.held_out.iter().flat_map(|(_, t)| t.clone()).collect();
        let px = Tensor::from_vec(px, (n, 3, SIZE as usize, SIZE as usize), &Device::Cpu).unwrap();
        let t = Tensor::from_vec(t, (n, DIM), &Device::Cpu).unwrap();
        let s = l2_normalize(&model.encode_image(&px).unwrap()).unwrap();
        (s * t)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / n as f32
    }
}

const PICCOLLAGE: &str = r#"
mode = "piccollage"
batch_size = 32
epochs = 25
seed = 3
checkpoint_every = 100000
[student]
model = "tiny"
[loss.piccollage]
kl_weight = 1.0
l1_weight = 1.0
schedule = { steps = [[0, 4.0], [15, 2.0]] }
[optim]
lr = 3e-3
warmup_steps = 20
clip_grad_norm = 1.0
adamw = { weight_decay = 0.0 }
"#;

#[test]
fn distillation_learns_a_random_projection_teacher_on_held_out_images() {
    let fx = fixture(512, 128, 0);
    let cfg = fx.config(PICCOLLAGE);
    assert_eq!(cfg.mode, Mode::Piccollage);
    let mut trainer = Trainer::new(cfg, &fx.path("run"), &Device::Cpu).unwrap();
    let before = fx.held_out_cosine(trainer.model());
    let summary = trainer.run(None, false).unwrap();
    let after = fx.held_out_cosine(trainer.model());
    eprintln!(
        "held-out cosine {before:.3} -> {after:.3} in {} steps",
        summary.steps
    );
    assert!(
        before < 0.5,
        "an untrained student already agrees: {before}"
    );
    assert!(
        after > 0.95,
        "held-out student-teacher cosine {after} <= 0.95"
    );
    // The run folder: final student, metrics for every step, loss curves.
    let student = ClipModel::load(&summary.student.unwrap(), &Device::Cpu).unwrap();
    assert!((fx.held_out_cosine(&student) - after).abs() < 1e-6);
    let metrics = clipcid_train::read_metrics(&fx.path("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.len() as u64, summary.steps);
    assert!(metrics.last().unwrap().terms.contains_key("piccollage"));
    assert!(fx.path("run/loss.png").metadata().unwrap().len() > 1000);
}

/// Index of the nearest of `k` centroids (rows of `c`) to each unit row of `x`.
fn nearest(x: &[f32], c: &[f32], d: usize) -> Vec<usize> {
    x.chunks_exact(d)
        .map(|row| {
            let dots = c
                .chunks_exact(d)
                .map(|cr| cr.iter().zip(row).map(|(a, b)| a * b).sum::<f32>());
            dots.enumerate()
                .fold((0, f32::MIN), |b, (i, v)| if v > b.1 { (i, v) } else { b })
                .0
        })
        .collect()
}

#[test]
fn cluster_loss_alone_learns_the_pseudo_labels() {
    let k = 8;
    let fx = fixture(512, 256, k);
    let cfg = fx.config(
        r#"
batch_size = 32
epochs = 12
seed = 4
checkpoint_every = 100000
[student]
model = "tiny"
[loss.clip]
enabled = false
[loss.instance]
enabled = false
[loss.cluster]
sample_rate = 0.5
scale = 16.0
[optim]
lr = 3e-3
warmup_steps = 20
"#,
    );
    let clusters = clipcid_cluster::read_clusters(&fx.path("clusters.safetensors")).unwrap();
    let teacher: Vec<f32> = fx.held_out.iter().flat_map(|(_, t)| t.clone()).collect();
    let truth = nearest(&teacher, &clusters.centroids, DIM);
    let mut counts = vec![0usize; k];
    truth.iter().for_each(|&l| counts[l] += 1);
    let majority = *counts.iter().max().unwrap() as f32 / truth.len() as f32;

    let mut trainer = Trainer::new(cfg, &fx.path("run"), &Device::Cpu).unwrap();
    let accuracy = |model: &ClipModel| {
        let n = fx.held_out.len();
        let px: Vec<f32> = fx.held_out.iter().flat_map(|(p, _)| p.clone()).collect();
        let px = Tensor::from_vec(px, (n, 3, SIZE as usize, SIZE as usize), &Device::Cpu).unwrap();
        let s = l2_normalize(&model.encode_image(&px).unwrap()).unwrap();
        let s: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        let got = nearest(&s, &clusters.centroids, DIM);
        got.iter().zip(&truth).filter(|(a, b)| a == b).count() as f32 / n as f32
    };
    let before = accuracy(trainer.model());
    trainer.run(None, false).unwrap();
    let after = accuracy(trainer.model());
    eprintln!(
        "pseudo-label accuracy {before:.3} -> {after:.3} (chance {:.3}, majority {majority:.3})",
        1.0 / k as f32
    );
    let last = trainer.history().last().unwrap();
    assert!(last.terms.contains_key("cluster_cls") && !last.terms.contains_key("clip"));
    assert!(
        after > 0.7 && after > majority + 0.4,
        "pseudo-label accuracy {after}, majority class {majority}"
    );
}

/// Every parameter of the student as raw f32 values, by name.
fn weights(model: &ClipModel) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<_> = model
        .tensors()
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

const FULL: &str = r#"
batch_size = 16
epochs = 2
seed = 11
checkpoint_every = 3
[student]
model = "tiny"
[loss.cluster]
sample_rate = 0.5
[optim]
lr = 1e-3
warmup_steps = 2
accumulate = 2
"#;

#[test]
fn resume_at_half_way_gives_bit_identical_weights() {
    // On every device this build has: a run stopped at half way and resumed ends with the
    // same weights, optimiser state and metrics as a straight run; and one step on a device
    // gives the CPU's weights within 1e-4.
    // 32 clusters at sample rate 0.5: 16 centres a step, so negatives are drawn at random.
    let fx = fixture(128, 0, 32);
    let mut first_step_on_cpu = None;
    for (i, device) in clipcid_kernels::available_devices().iter().enumerate() {
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        let mut one = Trainer::new(fx.config(FULL), &fx.path(&format!("one{i}")), device).unwrap();
        one.step().unwrap();
        let one = weights(one.model());
        let cpu = first_step_on_cpu.get_or_insert_with(|| one.clone());
        let worst = cpu
            .iter()
            .zip(&one)
            .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-4,
            "{device:?}: one step is {worst} from the CPU's"
        );
        resume_on(&fx, device, &a, &b);
    }
}

fn resume_on(fx: &Fixture, device: &Device, a: &str, b: &str) {
    // 128 rows / (16 x 2) = 4 steps per epoch, 8 in all; resume at 4 crosses no epoch edge
    // and lands between checkpoints (every 3 steps), so the stop's own checkpoint is used.
    let mut straight = Trainer::new(fx.config(FULL), &fx.path(a), device).unwrap();
    assert_eq!(straight.total_steps(), 8);
    let ra = straight.run(None, false).unwrap();

    let mut first = Trainer::new(fx.config(FULL), &fx.path(b), device).unwrap();
    let half = first.run(Some(4), false).unwrap();
    assert_eq!((half.steps, half.student.as_ref()), (4, None));
    drop(first);
    let mut resumed = Trainer::resume(fx.config(FULL), &fx.path(b), device).unwrap();
    assert_eq!(resumed.step_count(), 4);
    let rb = resumed.run(None, false).unwrap();
    assert_eq!((ra.steps, rb.steps, rb.steps_this_run), (8, 8, 4));
    assert!(
        weights(straight.model()) == weights(resumed.model()),
        "{device:?}: weights differ after resume"
    );
    let centres = |dir: &str| {
        let t = clipcid_store::io::load_tensors(
            &fx.path(dir)
                .join("checkpoints/step-00000008/trainer.safetensors"),
        )
        .unwrap();
        t.iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert!(
        centres(a) == centres(b),
        "{device:?}: optimizer state or cluster centres differ"
    );
    let (ma, mb) = (
        clipcid_train::read_metrics(&fx.path(a).join("metrics.jsonl")).unwrap(),
        clipcid_train::read_metrics(&fx.path(b).join("metrics.jsonl")).unwrap(),
    );
    let losses = |m: &[clipcid_train::StepMetrics]| {
        m.iter()
            .map(|m| (m.step, m.loss, m.terms.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&ma), losses(&mb));
    // Only the three newest checkpoints are kept; `latest` names the final one.
    let latest = std::fs::read_to_string(fx.path(b).join("checkpoints/latest")).unwrap();
    assert_eq!(latest, "step-00000008");
    let mut kept: Vec<_> = std::fs::read_dir(fx.path(a).join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-00000003", "step-00000006", "step-00000008"]);
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint() {
    let fx = fixture(64, 0, 0);
    let cfg = fx.config(
        "mode = \"piccollage\"\nbatch_size = 16\nepochs = 3\ncheckpoint_every = 1\n[student]\nmodel = \"tiny\"\n[optim]\nlr = 1e30\nwarmup_steps = 0\nclip_grad_norm = 0.0\n",
    );
    let mut trainer = Trainer::new(cfg, &fx.path("run"), &Device::Cpu).unwrap();
    let err = trainer.run(None, false).unwrap_err();
    let TrainError::NonFinite {
        step,
        last_checkpoint,
        ..
    } = &err
    else {
        panic!("expected a non-finite stop, got {err}");
    };
    assert!(*step >= 2, "{err}");
    let ckpt = last_checkpoint.clone().unwrap();
    assert_eq!(
        ckpt,
        fx.path("run/checkpoints")
            .join(format!("step-{:08}", step - 1))
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("step {step}")) && msg.contains("last good checkpoint"),
        "{msg}"
    );
    assert_eq!(
        trainer.step_count(),
        step - 1,
        "the failing step must not count"
    );
}

#[test]
fn inputs_that_do_not_fit_are_clear_errors() {
    let fx = fixture(64, 0, 0);
    let err = |body: &str| {
        std::fs::write(
            fx.path("bad.toml"),
            format!("{body}\n[data]\ndataset = \"data\"\nembeddings = \"emb\"\n"),
        )
        .unwrap();
        match DistillConfig::from_file(&fx.path("bad.toml")) {
            Err(e) => e.to_string(),
            Ok(cfg) => Trainer::new(cfg, &fx.path("run"), &Device::Cpu)
                .unwrap_err()
                .to_string(),
        }
    };
    // A student whose embedding width differs from the teacher's.
    let e = err("mode = \"piccollage\"\n[student]\nmodel = \"piccollage-s12\"\n");
    assert!(
        e.contains("16 wide") && e.contains("projects to 512"),
        "{e}"
    );
    // Cluster loss without a cluster file; the CLIP loss without a tokenizer.
    let e = err("[student]\nmodel = \"tiny\"\n");
    assert!(e.contains("bad.toml") && e.contains("data.clusters"), "{e}");
    let e = err("[student]\nmodel = \"tiny\"\n[loss.cluster]\nenabled = false\n");
    assert!(e.contains("data.tokenizer"), "{e}");
    // More rows per step than the data has.
    let e = err("mode = \"piccollage\"\nbatch_size = 100\n[student]\nmodel = \"tiny\"\n");
    assert!(e.contains("64 training rows") && e.contains("100"), "{e}");
    // A student preset that does not exist.
    let e = err("mode = \"piccollage\"\n[student]\nmodel = \"vit-z\"\n");
    assert!(e.contains("vit-z") && e.contains("tiny"), "{e}");
    // A NaN in the teacher embeddings names the shard and row when a batch reads it (the
    // embeddings are read per batch, not loaded up front).
    let shard = clipcid_store::shard_path(&fx.path("emb"), 0);
    let mut t = clipcid_store::io::load_tensors(&shard).unwrap();
    let mut img: Vec<f32> = t["image"].flatten_all().unwrap().to_vec1().unwrap();
    img[5 * DIM + 3] = f32::NAN;
    t.insert(
        "image".into(),
        Tensor::from_vec(img, (64, DIM), &Device::Cpu).unwrap(),
    );
    clipcid_store::io::write_safetensors(&shard, t, &HashMap::new()).unwrap();
    let mut t = Trainer::new(
        fx.config("mode = \"piccollage\"\n"),
        &fx.path("nan"),
        &Device::Cpu,
    )
    .unwrap();
    let e = t.run(None, false).unwrap_err().to_string();
    assert!(
        e.contains("embeddings-") && e.contains("row 5") && e.contains("NaN"),
        "{e}"
    );
    assert_eq!(t.step_count(), t.history().len() as u64);
    // Resuming where no run was checkpointed.
    let e = Trainer::resume(
        fx.config("mode = \"piccollage\"\n"),
        &fx.path("nowhere"),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no checkpoint to resume from"), "{e}");
}

#[test]
fn a_clip_only_baseline_needs_no_teacher_and_learns_to_match_captions() {
    let fx = fixture(256, 0, 0);
    std::fs::write(
        fx.path("clip.toml"),
        "batch_size = 32\nepochs = 10\n[loss.cluster]\nenabled = false\n[loss.instance]\nenabled = false\n[optim]\nlr = 2e-3\nwarmup_steps = 10\n[data]\ndataset = \"data\"\ntokenizer = \"tokenizer.json\"\n",
    )
    .unwrap();
    let cfg = DistillConfig::from_file(&fx.path("clip.toml")).unwrap();
    assert_eq!(cfg.data.embeddings, None);
    let mut trainer = Trainer::new(cfg, &fx.path("run"), &Device::Cpu).unwrap();
    assert_eq!(trainer.training_set().len(), 256);
    trainer.run(None, false).unwrap();
    let h = trainer.history();
    let mean = |m: &[clipcid_train::StepMetrics]| {
        m.iter().map(|m| m.terms["clip"]).sum::<f64>() / m.len() as f64
    };
    let (first, last) = (mean(&h[..8]), mean(&h[h.len() - 8..]));
    assert!(h.iter().all(|m| m.teacher_cosine.is_none()));
    // ln(32) = 3.47 is chance for in-batch InfoNCE at batch 32.
    assert!(
        first > 3.0 && last < 0.8 * first,
        "CLIP loss {first:.3} -> {last:.3}"
    );
}

#[test]
fn a_fresh_run_into_a_used_folder_is_refused_or_owns_it_with_overwrite() {
    let fx = fixture(128, 0, 32);
    // An earlier, longer run: 8 steps, checkpoints at 3, 6 and 8.
    Trainer::new(fx.config(FULL), &fx.path("run"), &Device::Cpu)
        .unwrap()
        .run(None, false)
        .unwrap();
    let e = Trainer::new(fx.config(FULL), &fx.path("run"), &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("already holds a run") && e.contains("--resume") && e.contains("--overwrite"),
        "{e}"
    );
    // A leftover hidden temporary checkpoint of a failed write counts as part of the run.
    std::fs::create_dir_all(fx.path("run").join("checkpoints/.step-00000009.tmp")).unwrap();
    // Overwriting: the new run stops at step 4 (its own checkpoint at 3 and at the stop)
    // and nothing of the old run is left to prune it away or to be resumed by mistake.
    let mut t = Trainer::new_overwriting(fx.config(FULL), &fx.path("run"), &Device::Cpu).unwrap();
    let half = t.run(Some(4), false).unwrap();
    assert_eq!(half.steps, 4);
    let mut steps: Vec<String> = std::fs::read_dir(fx.path("run").join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    steps.sort();
    assert_eq!(steps, ["latest", "step-00000003", "step-00000004"]);
    assert!(!fx.path("run").join("student").exists());
    drop(t);
    let mut resumed = Trainer::resume(fx.config(FULL), &fx.path("run"), &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 4);
    assert_eq!(resumed.run(None, false).unwrap().steps, 8);
}

/// The provenance `clipcid embed` records for the fixture's dataset in `d` and `teacher`.
fn provenance(d: &std::path::Path, teacher: &str) -> String {
    let data = clipcid_data::Dataset::open(&d.join("data"))
        .unwrap()
        .fingerprint()
        .unwrap();
    format!(r#"{{"teacher": "{teacher}", "data": "{data}"}}"#)
}

/// Rewrites the fixture's shard with `edit` applied to its tensors and metadata.
fn rewrite_shard(
    fx: &Fixture,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut HashMap<String, String>),
) {
    let shard = clipcid_store::shard_path(&fx.path("emb"), 0);
    let mut tensors = clipcid_store::io::load_tensors(&shard).unwrap();
    let mut meta = clipcid_store::io::read_header(&shard).unwrap().metadata;
    edit(&mut tensors, &mut meta);
    clipcid_store::io::write_safetensors(&shard, tensors, &meta).unwrap();
}

/// Rewrites the fixture's shard with the same rows, recorded as another teacher's.
fn record_as_another_teachers(fx: &Fixture) {
    rewrite_shard(fx, |_, meta| {
        *meta = HashMap::from([("provenance".to_string(), provenance(fx.dir.path(), "t2"))]);
    });
}

/// The shards' ids are positions in the dataset they were embedded from: another dataset
/// of as many samples joined row by row, each image learning from another's embedding.
#[test]
fn embeddings_of_another_dataset_are_refused() {
    let fx = fixture(128, 0, 32);
    let other = fx.path("other");
    std::fs::create_dir_all(&other).unwrap();
    let tsv = std::fs::read_to_string(fx.path("data/captions.tsv")).unwrap();
    for line in tsv.lines() {
        let file = line.split('\t').next().unwrap();
        std::fs::copy(fx.path("data").join(file), other.join(file)).unwrap();
    }
    // The same images under other captions: another dataset, as many samples.
    std::fs::write(other.join("captions.tsv"), tsv.replace('\t', "\tanother ")).unwrap();
    let mut config = fx.config(FULL);
    config.data.dataset = other.clone();
    let e = Trainer::new(config, &fx.path("run"), &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("another dataset")
            && e.contains(&format!("`{}` (data.dataset)", other.display()))
            && e.contains("emb"),
        "{e}"
    );
    // The dataset they were made from trains.
    assert!(Trainer::new(fx.config(FULL), &fx.path("run"), &Device::Cpu).is_ok());
}

/// A captions file's fingerprint covers the sizes of the images it names: embeddings of images
/// replaced since are refused. Shards recorded before it did (the file's bytes only) are still
/// taken as the dataset's.
#[test]
fn embeddings_of_images_replaced_since_are_refused() {
    // No cluster file: it records the shards' provenance, which this test rewrites.
    let fx = fixture(128, 0, 0);
    let record = |data: &str| {
        let provenance = format!(r#"{{"teacher": "t1", "data": "{data}"}}"#);
        rewrite_shard(&fx, |_, meta| {
            *meta = HashMap::from([("provenance".to_string(), provenance)]);
        });
    };
    let data = clipcid_data::Dataset::open(&fx.path("data")).unwrap();
    let before = data.fingerprint_before_image_sizes().unwrap().unwrap();
    record(&before);
    Trainer::new(fx.config(PICCOLLAGE), &fx.path("run"), &Device::Cpu).unwrap();
    record(&data.fingerprint().unwrap());
    Trainer::new(fx.config(PICCOLLAGE), &fx.path("run"), &Device::Cpu).unwrap();
    // Image 5 rewritten (other pixels, another size) under the same captions file.
    let other = png_with(
        &image(&[0.5; PATTERNS]),
        image::codecs::png::CompressionType::Best,
    );
    assert_ne!(
        other.len() as u64,
        std::fs::metadata(fx.path("data/5.png")).unwrap().len()
    );
    std::fs::write(fx.path("data/5.png"), other).unwrap();
    let e = Trainer::new(fx.config(PICCOLLAGE), &fx.path("run"), &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("before some were replaced"), "{e}");
}

/// An image replaced by one of the same byte size leaves the dataset's fingerprint as it was;
/// the digest each shard row records of its image's bytes still tells: the batch that reads
/// it is refused, naming the sample and the shard. Shards without digests (older runs) train.
#[test]
fn an_image_replaced_by_one_of_the_same_size_is_refused_when_read() {
    let fx = fixture(64, 0, 0);
    let path = fx.path("data/5.png");
    let original = std::fs::read(&path).unwrap();
    let fingerprint = clipcid_data::Dataset::open(&fx.path("data"))
        .unwrap()
        .fingerprint()
        .unwrap();
    // Another picture of the same byte length (the fixture's PNGs are uncompressed).
    let replaced = png(&image(&[0.5; PATTERNS]));
    assert!(replaced.len() == original.len() && replaced != original);
    std::fs::write(&path, &replaced).unwrap();
    let same = clipcid_data::Dataset::open(&fx.path("data")).unwrap();
    assert_eq!(same.fingerprint().unwrap(), fingerprint);
    let mut config = fx.config(PICCOLLAGE);
    config.epochs = 1;
    let train = |config: DistillConfig, run: &str| {
        Trainer::new(config, &fx.path(run), &Device::Cpu)?.run(None, false)
    };
    let e = train(config.clone(), "run")
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("image `5.png` is not the one this shard embedded")
            && e.contains("embeddings-00000.safetensors"),
        "{e}"
    );
    // The original bytes back: the same run trains.
    std::fs::write(&path, &original).unwrap();
    assert_eq!(train(config.clone(), "run2").unwrap().steps, 2);
    // A shard from before digests were recorded: nothing to check against.
    std::fs::write(&path, &replaced).unwrap();
    rewrite_shard(&fx, |tensors, _| {
        tensors.remove("image_digest").unwrap();
    });
    assert_eq!(train(config, "run3").unwrap().steps, 2);
}

#[test]
fn resuming_on_another_teachers_embeddings_is_refused() {
    let fx = fixture(128, 0, 32);
    let mut first = Trainer::new(fx.config(FULL), &fx.path("run"), &Device::Cpu).unwrap();
    first.run(Some(4), false).unwrap();
    drop(first);
    // The same rows, now recorded as another teacher's embeddings.
    record_as_another_teachers(&fx);
    let e = Trainer::resume(fx.config(FULL), &fx.path("run"), &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("other teacher embeddings") && e.contains("different teacher"),
        "{e}"
    );
}

/// Inputs rewritten between a stop and its resume (a keep file from another balance
/// threshold, a cluster file from another k-means) were trained on without a word: the
/// data order and the labels changed under the run.
#[test]
fn resuming_on_other_rows_or_other_pseudo_labels_is_refused() {
    let fx = fixture(128, 0, 32);
    let layout = clipcid_store::ShardLayout::open(&[fx.path("emb")]).unwrap();
    let ids = layout.row_ids().unwrap();
    let n = ids.len();
    let keep_path = fx.path("keep.safetensors");
    // Every row kept, or row 0 a duplicate of row 1.
    let write_keep = |drop_first: bool| {
        let keep: Vec<bool> = (0..n).map(|r| !(drop_first && r == 0)).collect();
        let set_id: Vec<u32> = (0..n as u32)
            .map(|r| if drop_first { r.saturating_sub(1) } else { r })
            .collect();
        let first = u32::from(drop_first);
        let reps: Vec<u32> = (first..n as u32).collect();
        clipcid_store::write_keep_file(
            &keep_path,
            &keep,
            &set_id,
            &reps,
            &ids,
            &"summary",
            layout.provenance.as_deref(),
        )
        .unwrap();
    };
    let config = || {
        let mut c = fx.config(FULL);
        c.data.keep = Some(keep_path.clone());
        c
    };
    write_keep(false);
    let mut first = Trainer::new(config(), &fx.path("run"), &Device::Cpu).unwrap();
    first.run(Some(4), false).unwrap();
    drop(first);
    let resume = || Trainer::resume(config(), &fx.path("run"), &Device::Cpu);
    write_keep(true);
    let e = resume().expect_err("refused").to_string();
    assert!(
        e.contains("step-00000004") && e.contains("other rows"),
        "{e}"
    );
    // The same inputs again: resumed.
    write_keep(false);
    assert_eq!(resume().unwrap().step_count(), 4);
    // Another k-means into the same cluster file.
    let before = clipcid_store::read_clusters(&fx.path("clusters.safetensors")).unwrap();
    let rows = clipcid_cluster::ShardRows::open(&[fx.path("emb")], None).unwrap();
    let kmeans = clipcid_cluster::KMeans::new(32).seed(2).iterations(20);
    let file = clipcid_cluster::cluster_shards(&kmeans, &rows, false).unwrap();
    clipcid_cluster::write_clusters(&fx.path("clusters.safetensors"), &file).unwrap();
    let after = clipcid_store::read_clusters(&fx.path("clusters.safetensors")).unwrap();
    assert_ne!(before.labels, after.labels);
    let e = resume().expect_err("refused").to_string();
    assert!(
        e.contains("other pseudo-labels") && e.contains("clusters.safetensors"),
        "{e}"
    );
}

#[test]
fn a_run_stopped_while_appending_its_metrics_still_resumes() {
    // A last metrics line cut short (the process killed, or the disk full, mid-append) is
    // left out; a bad line elsewhere is still an error naming the file and line.
    let fx = fixture(128, 0, 32);
    let mut first = Trainer::new(fx.config(FULL), &fx.path("run"), &Device::Cpu).unwrap();
    first.run(Some(4), false).unwrap();
    let steps = first.history().len();
    drop(first);
    let path = fx.path("run/metrics.jsonl");
    let whole = std::fs::read_to_string(&path).unwrap();
    let torn = format!("{whole}{{\"step\":5,\"lo");
    std::fs::write(&path, &torn).unwrap();
    assert_eq!(clipcid_train::read_metrics(&path).unwrap().len(), steps);
    let resumed = Trainer::resume(fx.config(FULL), &fx.path("run"), &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 4);
    assert_eq!(resumed.history().len(), steps);
    // The resume rewrote the file without the torn line.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    drop(resumed);
    let inside = whole.replacen('\n', "\n{\"step\":1,\"lo\n", 1);
    std::fs::write(&path, inside).unwrap();
    let e = clipcid_train::read_metrics(&path).unwrap_err().to_string();
    assert!(e.contains("metrics.jsonl: line 2"), "{e}");
}

#[test]
fn resuming_from_a_damaged_trainer_state_is_refused_by_name() {
    // A NaN moment, a negative second moment, NaN cluster centres or a loss scale that is
    // not positive would resume into NaN weights (or skip every step) a step later; each
    // is refused before training, naming the file and the tensor.
    let fx = fixture(128, 0, 32);
    let mut first = Trainer::new(fx.config(FULL), &fx.path("run"), &Device::Cpu).unwrap();
    first.run(Some(4), false).unwrap();
    drop(first);
    let latest = std::fs::read_to_string(fx.path("run/checkpoints/latest")).unwrap();
    let file = fx
        .path("run/checkpoints")
        .join(latest.trim())
        .join("trainer.safetensors");
    let saved = std::fs::read(&file).unwrap();
    let header = clipcid_store::io::read_header(&file).unwrap();
    let tensors = clipcid_store::io::load_tensors(&file).unwrap();
    let v_name = tensors
        .keys()
        .find(|k| k.starts_with("adamw.v."))
        .unwrap()
        .clone();
    let m_name = v_name.replace("adamw.v.", "adamw.m.");
    // The cluster head's centres (the trainer's `cluster.centres`).
    const CENTRES: &str = "cluster.centres";
    assert!(tensors.contains_key(CENTRES));
    let poke = |name: &str, value: f32| {
        let mut t = tensors.clone();
        let x = &t[name];
        let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = value;
        let y = candle_core::Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
        t.insert(name.to_string(), y);
        t
    };
    let state = header.metadata["state"].clone();
    let scaled = state.replacen('{', r#"{"loss_scale":[-1.0,0],"#, 1);
    for (tensors, state, says) in [
        (
            poke(&m_name, f32::NAN),
            &state,
            format!("`{m_name}` holds NaN"),
        ),
        (
            poke(&v_name, -1e-3),
            &state,
            format!("`{v_name}` holds a negative"),
        ),
        (
            poke(CENTRES, f32::INFINITY),
            &state,
            format!("`{CENTRES}` holds NaN or infinite"),
        ),
        (tensors.clone(), &scaled, "loss scale -1".to_string()),
    ] {
        let meta = HashMap::from([("state".to_string(), state.clone())]);
        clipcid_store::io::write_safetensors(&file, tensors, &meta).unwrap();
        let e = Trainer::resume(fx.config(FULL), &fx.path("run"), &Device::Cpu)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("trainer.safetensors") && e.contains(&says),
            "{says}: {e}"
        );
    }
    // The file as saved resumes.
    std::fs::write(&file, saved).unwrap();
    let resumed = Trainer::resume(fx.config(FULL), &fx.path("run"), &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 4);
}

#[test]
fn keep_and_cluster_files_of_another_teachers_embeddings_are_refused() {
    let fx = fixture(64, 0, 8);
    let shard = clipcid_store::shard_path(&fx.path("emb"), 0);
    let keep = fx.path("keep.safetensors");
    let all = vec![true; 64];
    let ids: Vec<i64> = (0..64).collect();
    let sets: Vec<u32> = (0..64).collect();
    let provenance = clipcid_store::io::read_header(&shard).unwrap().metadata["provenance"].clone();
    clipcid_store::write_keep_file(&keep, &all, &sets, &sets, &ids, &"", Some(&provenance))
        .unwrap();
    let with_keep = |fx: &Fixture| {
        let mut c = fx.config(FULL);
        c.data.keep = Some(keep.clone());
        c
    };
    // Made from these embeddings: accepted.
    Trainer::new(with_keep(&fx), &fx.path("run-a"), &Device::Cpu).unwrap();

    // The same rows re-recorded as another teacher's: the cluster file (made from the first
    // teacher's) and then the keep file are refused, naming the file and what differs.
    record_as_another_teachers(&fx);
    let e = Trainer::new(fx.config(FULL), &fx.path("run-b"), &Device::Cpu)
        .expect_err("cluster file refused")
        .to_string();
    assert!(
        e.contains("clusters.safetensors") && e.contains("different teacher"),
        "{e}"
    );
    let mut no_clusters = with_keep(&fx);
    no_clusters.data.clusters = None;
    no_clusters.loss.cluster.enabled = false;
    let e = Trainer::new(no_clusters, &fx.path("run-c"), &Device::Cpu)
        .expect_err("keep file refused")
        .to_string();
    assert!(
        e.contains("keep.safetensors") && e.contains("different teacher"),
        "{e}"
    );
}

/// A training row the cluster file has no pseudo-label for is refused, naming the cluster
/// file, the sample and its key. Distillation reads the shards' ids without their keys, and
/// reads the keys again only for this message.
#[test]
fn a_row_without_a_pseudo_label_is_refused_naming_its_key() {
    let fx = fixture(64, 0, 8);
    rewrite_shard(&fx, |_, meta| {
        let keys: Vec<String> = (0..64).map(|i| format!("part-0/{i:04}.png")).collect();
        meta.insert("keys".into(), serde_json::to_string(&keys).unwrap());
    });
    // With keys in the shard, the run starts as before.
    Trainer::new(fx.config(FULL), &fx.path("run-a"), &Device::Cpu).unwrap();
    let path = fx.path("clusters.safetensors");
    let mut file = clipcid_store::read_clusters(&path).unwrap();
    let at = file.ids.iter().position(|&id| id == 37).unwrap();
    file.ids.remove(at);
    let label = file.labels.remove(at);
    file.sizes[label as usize] -= 1;
    clipcid_store::write_clusters(&path, &file).unwrap();
    let e = Trainer::new(fx.config(FULL), &fx.path("run-b"), &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("clusters.safetensors")
            && e.contains("no pseudo-label for sample 37 (`part-0/0037.png`)"),
        "{e}"
    );
    // Keys that do not fit the rows (training reads none): the error names the row instead.
    rewrite_shard(&fx, |_, meta| {
        meta.insert("keys".into(), r#"["only one"]"#.into());
    });
    let e = Trainer::new(fx.config(FULL), &fx.path("run-c"), &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("no pseudo-label for sample 37 (row 37 of ") && e.contains("embeddings-00000"),
        "{e}"
    );
}

/// bf16 training on working copies (`AdamW::working_copies`, `ClipModel::cast_using`) gives,
/// on every device, the same bits as casting the f32 weights each step (`ClipModel::cast`):
/// the gradients are the same bf16 values either way (the cast's backward pass only widens
/// them), and each copy holds its updated weight rounded to bf16.
#[test]
fn working_copies_give_the_bits_of_casting_each_step_on_every_device() {
    use candle_core::{DType, Var};
    use clipcid_models::ClipConfig;
    use clipcid_train::{AdamW, AdamWConfig};
    let cfg = ClipConfig::preset("tiny").unwrap();
    for dev in clipcid_kernels::available_devices() {
        let make = || {
            let (model, varmap) = ClipModel::trainable(&cfg, 3, &dev).unwrap();
            let mut named: Vec<(String, Var)> = {
                let data = varmap.data().lock().unwrap();
                data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
            };
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let opt = AdamW::new(named.clone(), AdamWConfig::default()).unwrap();
            (model, named, opt)
        };
        let (cast_model, cast_vars, mut cast_opt) = make();
        let (copy_model, copy_vars, mut copy_opt) = make();
        let copies = copy_opt
            .working_copies(DType::BF16, |n| n != "logit_scale")
            .unwrap();
        let half = copy_model
            .cast_using(DType::BF16, &copies.into_iter().collect())
            .unwrap();
        let loss = |m: &ClipModel, seed: f64| {
            let px = Tensor::arange(0f32, 2.0 * 3.0 * 32.0 * 32.0, &dev)
                .unwrap()
                .reshape((2, 3, 32, 32))
                .unwrap();
            let px = ((px * 1e-3).unwrap().sin().unwrap() * seed).unwrap();
            let e = m.encode_image(&px).unwrap().to_dtype(DType::F32).unwrap();
            e.sqr().unwrap().sum_all().unwrap()
        };
        for step in 1..=3 {
            let grads = loss(&cast_model.cast(DType::BF16).unwrap(), step as f64)
                .backward()
                .unwrap();
            cast_opt.step(&grads, 1e-2).unwrap();
            let grads = loss(&half, step as f64).backward().unwrap();
            copy_opt.step(&grads, 1e-2).unwrap();
        }
        let bits = |t: &Tensor| {
            let t = t
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        for ((name, a), (_, b)) in cast_vars.iter().zip(&copy_vars) {
            assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "{dev:?}: {name}");
        }
        // The steps did move the weights.
        let (fresh, _) = ClipModel::trainable(&cfg, 3, &dev).unwrap();
        let name = "visual_projection.weight";
        assert_ne!(
            bits(&fresh.tensors()[name]),
            bits(&copy_model.tensors()[name])
        );
        for (name, t) in half.tensors() {
            let (_, master) = copy_vars.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!(
                bits(t),
                bits(&master.as_tensor().to_dtype(DType::BF16).unwrap()),
                "{dev:?}: copy of {name}"
            );
        }
    }
}

#[test]
fn bf16_and_f16_training_keep_f32_master_weights_and_follow_the_f32_run() {
    // Eight epochs of 4 steps, each precision from the same seed. In bf16 and f16 the
    // towers run on casts; the weights (and what is saved) stay f32, the run learns, and its
    // weights move the way the f32 run's do: their distance is well under the f32 run's
    // movement. f16 runs with PyTorch GradScaler's default loss scaling.
    let fx = fixture(128, 32, 0);
    let body = PICCOLLAGE
        .replace("epochs = 25", "epochs = 8")
        .replace("warmup_steps = 20", "warmup_steps = 2");
    let run = |precision: &str, dir: &str| {
        let body = body.replace(
            "[optim]\n",
            &format!("[optim]\nprecision = \"{precision}\"\n"),
        );
        let mut t = Trainer::new(fx.config(&body), &fx.path(dir), &Device::Cpu).unwrap();
        let (init, before) = (weights(t.model()), fx.held_out_cosine(t.model()));
        t.run(None, false).unwrap();
        (
            init,
            before,
            fx.held_out_cosine(t.model()),
            weights(t.model()),
            t,
        )
    };
    let (init, before, f32_after, f32_w, _) = run("f32", "f32");
    let dist = |a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]| {
        a.iter()
            .zip(b)
            .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)))
            .sum::<f32>()
            .sqrt()
    };
    let moved = dist(&init, &f32_w);
    for (name, precision) in [
        ("bf16", clipcid_train::TrainPrecision::Bf16),
        ("f16", clipcid_train::TrainPrecision::F16),
    ] {
        let (_, _, after, w, t) = run(name, name);
        assert_eq!(t.config().optim.precision, precision);
        assert!(t
            .model()
            .tensors()
            .values()
            .all(|w| w.dtype() == candle_core::DType::F32));
        let apart = dist(&f32_w, &w);
        let skipped = t.history().iter().filter(|m| m.skipped).count();
        eprintln!(
            "held-out cosine {before:.3} -> f32 {f32_after:.3}, {name} {after:.3}; f32 weights moved {moved:.3}, {name} ends {apart:.3} from them ({skipped} steps skipped)"
        );
        assert!(
            apart < 0.25 * moved,
            "{name} run is {apart} from the f32 run, which moved {moved}"
        );
        assert!(
            after - before > 0.8 * (f32_after - before) && f32_after > before + 0.1,
            "{name} learns less: {before} -> {after} (f32: {f32_after})"
        );
        let scales = t.history().iter().map(|m| m.loss_scale).collect::<Vec<_>>();
        match precision {
            clipcid_train::TrainPrecision::F16 => assert!(scales.iter().all(Option::is_some)),
            _ => assert!(scales.iter().all(Option::is_none) && skipped == 0),
        }
    }
}

#[test]
fn f16_loss_scale_backs_off_on_overflow_skips_those_steps_and_survives_resume() {
    // A loss scale of 2^24 overflows f16 in the backward pass: those steps must leave the
    // weights and AdamW untouched and halve the scale, until the gradients fit; with
    // growth_interval 3 the scale then doubles after three finite steps in a row
    // (GradScaler's rule). A run resumed half way continues with the saved scale and streak.
    let fx = fixture(128, 0, 0);
    let body = PICCOLLAGE
        .replace("epochs = 25", "epochs = 6")
        .replace("warmup_steps = 20", "warmup_steps = 2")
        .replace(
            "[optim]\n",
            "[optim]\nprecision = \"f16\"\nloss_scale = { init = 16777216.0, growth_interval = 3 }\n",
        );
    let mut t = Trainer::new(fx.config(&body), &fx.path("a"), &Device::Cpu).unwrap();
    let init = weights(t.model());
    let mut history = vec![];
    while t.step_count() < t.total_steps() {
        let before = weights(t.model());
        let m = t.step().unwrap();
        if m.skipped {
            assert!(
                weights(t.model()) == before,
                "a skipped step changed weights"
            );
        }
        history.push(m);
    }
    let skipped: Vec<u64> = history
        .iter()
        .filter(|m| m.skipped)
        .map(|m| m.step)
        .collect();
    eprintln!(
        "skipped steps {skipped:?} of {}; scales {:?}",
        history.len(),
        history
            .iter()
            .map(|m| m.loss_scale.unwrap_or(0.0))
            .collect::<Vec<_>>()
    );
    assert!(
        !skipped.is_empty() && skipped[0] == 1,
        "a 2^24 scale must overflow f16 at once: skipped {skipped:?}"
    );
    assert!(weights(t.model()) != init, "the run never stepped");
    assert!(history.iter().any(|m| !m.skipped));
    let mut streak = 0;
    for w in history.windows(2) {
        let (now, next) = (w[0].loss_scale.unwrap(), w[1].loss_scale.unwrap());
        let want = if w[0].skipped {
            streak = 0;
            now * 0.5
        } else {
            streak += 1;
            if streak == 3 {
                streak = 0;
                now * 2.0
            } else {
                now
            }
        };
        assert_eq!(next, want, "scale after step {}", w[0].step);
    }
    // Resume half way: the same scales, skips and weights as the straight run.
    let mut first = Trainer::new(fx.config(&body), &fx.path("b"), &Device::Cpu).unwrap();
    first.run(Some(t.total_steps() / 2), false).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(fx.config(&body), &fx.path("b"), &Device::Cpu).unwrap();
    resumed.run(None, false).unwrap();
    let trace = |h: &[clipcid_train::StepMetrics]| {
        h.iter()
            .map(|m| (m.step, m.loss_scale, m.skipped, m.loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(trace(resumed.history()), trace(&history));
    assert!(weights(resumed.model()) == weights(t.model()));
}

#[test]
fn prefetching_changes_when_batches_are_decoded_not_what_they_hold() {
    // The same run with batches decoded ahead on a worker thread (2 deep, the default) and
    // decoded inside each step: identical weights and metrics, across an epoch boundary and
    // a resume half way.
    let fx = fixture(128, 0, 32);
    let run = |prefetch: usize, dir: &str| {
        let body = format!("prefetch = {prefetch}\n{FULL}");
        let mut first = Trainer::new(fx.config(&body), &fx.path(dir), &Device::Cpu).unwrap();
        first.run(Some(5), false).unwrap();
        drop(first);
        let mut t = Trainer::resume(fx.config(&body), &fx.path(dir), &Device::Cpu).unwrap();
        t.run(None, false).unwrap();
        let losses: Vec<_> = t.history().iter().map(|m| (m.step, m.loss)).collect();
        (weights(t.model()), losses)
    };
    let (a, la) = run(0, "inline");
    let (b, lb) = run(2, "ahead");
    assert_eq!(la, lb);
    assert!(a == b, "prefetching changed the weights");
}

#[test]
fn two_ranks_at_batch_b_train_as_one_process_at_batch_2b() {
    // CLIP-CID with all three terms (PartialFC sampling 16 of 32 centres, two micro-batches a
    // step): 2 ranks at batch 8, stopped half way and resumed, against 1 process at batch 16.
    // The same code path; ranks are threads exchanging through InProcessGroup.
    let fx = fixture(128, 0, 32);
    let mut one = Trainer::new(fx.config(FULL), &fx.path("one"), &Device::Cpu).unwrap();
    one.run(None, false).unwrap();
    // Written once, before the ranks start: two threads writing and reading one run.toml at
    // once could read it half written (an empty file, "missing field `data`").
    let half = fx.config(&FULL.replace("batch_size = 16", "batch_size = 8"));
    let ranks = clipcid_train::InProcessGroup::new(2);
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                let (fx, half) = (&fx, &half);
                s.spawn(move || {
                    let group: std::sync::Arc<dyn clipcid_train::Collective> =
                        std::sync::Arc::new(r);
                    let out = fx.path("dp");
                    let mut t =
                        Trainer::new_data_parallel(half.clone(), &out, &Device::Cpu, group.clone())
                            .unwrap();
                    assert_eq!(t.total_steps(), 8);
                    t.run(Some(4), false).unwrap();
                    drop(t);
                    let mut t =
                        Trainer::resume_data_parallel(half.clone(), &out, &Device::Cpu, group)
                            .unwrap();
                    assert_eq!(t.step_count(), 4);
                    t.run(None, false).unwrap();
                    (weights(t.model()), t.history().to_vec())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (w0, h0) = &runs[0];
    assert!(runs[1].0 == *w0, "the ranks' weights differ");
    let worst = w0
        .iter()
        .zip(weights(one.model()))
        .flat_map(|((_, a), (_, b))| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .collect::<Vec<_>>()
        })
        .fold(0f32, f32::max);
    eprintln!("2 ranks x 8 vs 1 x 16: largest weight difference {worst}");
    assert!(worst < 1e-4, "largest weight difference {worst}");
    let losses = |h: &[clipcid_train::StepMetrics]| {
        h.iter()
            .map(|m| (m.step, m.loss, m.samples))
            .collect::<Vec<_>>()
    };
    let (a, b) = (losses(h0), losses(one.history()));
    assert_eq!(a.len(), b.len());
    for ((s, la, na), (_, lb, nb)) in a.iter().zip(&b) {
        assert!(
            (la - lb).abs() < 1e-4 * lb.abs().max(1.0),
            "step {s}: loss {la} vs {lb}"
        );
        assert_eq!(na, nb, "step {s}: samples");
    }
    // Rank 0 alone wrote the run folder: one metrics line per step, the student.
    let m = clipcid_train::read_metrics(&fx.path("dp/metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 8);
    assert!(fx.path("dp/student/model.safetensors").exists());
}

#[test]
fn a_subset_is_a_seeded_draw_of_whole_rows_shared_by_every_run_seed() {
    use clipcid_train::{Needs, TrainingSet};
    let fx = fixture(90, 0, 3);
    let needs = Needs {
        captions: true,
        teacher_text: true,
        clusters: true,
    };
    let full_cfg = fx.config("seed = 1");
    let full = TrainingSet::load(&full_cfg.data, needs).unwrap();
    assert_eq!(full.len(), 90);
    let subset = |n: usize, subset_seed: u64| {
        let mut data = full_cfg.data.clone();
        data.subset = Some(n);
        data.subset_seed = subset_seed;
        TrainingSet::load(&data, needs)
    };
    let a = subset(30, 0).unwrap();
    assert_eq!(a.len(), 30);
    assert!(a.ids().windows(2).all(|w| w[0] < w[1]), "dataset order");
    // Each kept row is a whole row of the full set: its id, teacher embedding and label.
    let labels = full.labels().unwrap();
    for (r, id) in a.ids().iter().enumerate() {
        let f = full.ids().iter().position(|x| x == id).unwrap();
        assert_eq!(
            a.teacher_image(&[r]).unwrap(),
            full.teacher_image(&[f]).unwrap()
        );
        assert_eq!(a.labels().unwrap()[r], labels[f]);
    }
    // The draw depends on subset_seed, not on the run's seed.
    let mut other_run = fx.config("seed = 7").data;
    other_run.subset = Some(30);
    assert_eq!(TrainingSet::load(&other_run, needs).unwrap().ids(), a.ids());
    assert_ne!(subset(30, 1).unwrap().ids(), a.ids());
    assert_eq!(subset(90, 0).unwrap().ids(), full.ids());
    let err = subset(91, 0).unwrap_err().to_string();
    assert!(
        err.contains("91") && err.contains("90 training rows"),
        "{err}"
    );
    // A trainer on the subset takes its steps from the subset.
    let mut cfg = fx.config("batch_size = 10\nepochs = 2");
    cfg.data.subset = Some(30);
    let mut trainer = Trainer::new(cfg.clone(), &fx.path("sub"), &Device::Cpu).unwrap();
    assert_eq!(trainer.total_steps(), 6);
    trainer.run(Some(2), false).unwrap();
    drop(trainer);
    // Resuming on other rows is refused; on the same rows it continues.
    for (subset, subset_seed) in [(Some(40), 0), (Some(30), 1), (None, 0)] {
        let mut other = cfg.clone();
        other.data.subset = subset;
        other.data.subset_seed = subset_seed;
        let err = Trainer::resume(other, &fx.path("sub"), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("data.subset = 30 (subset_seed = 0)") && err.contains("resuming"),
            "{err}"
        );
    }
    let resumed = Trainer::resume(cfg, &fx.path("sub"), &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 2);
}
