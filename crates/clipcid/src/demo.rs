//! `clipcid demo`: the README's main command. Until the later stages (balance, cluster,
//! distill, eval) and the real default data and teacher land, it generates a small captioned
//! image set as WebDataset shards, writes a seeded random `tiny` teacher, and runs `embed`.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clipcid_data::Dataset;
use clipcid_embed::{embed_dataset, EmbedOptions};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
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

pub fn run(out: &Path, samples: usize, device: &Device) -> Result<()> {
    let data = out.join("data");
    println!(
        "[1/5] generating {samples} captioned shape images -> {}",
        data.display()
    );
    write_shapes_dataset(&data, samples, 0)?;

    let teacher_dir = out.join("teacher");
    println!("[2/5] writing the teacher -> {}", teacher_dir.display());
    let cfg = ClipConfig::preset("tiny")?;
    let teacher = ClipModel::random(&cfg, 0, &Device::Cpu)?;
    teacher.save_pretrained(&teacher_dir, DType::F32)?;
    let tokenizer = ClipTokenizer::byte_level(cfg.text_config.max_position_embeddings)?;
    tokenizer.save(&teacher_dir.join("tokenizer.json"))?;
    let teacher = ClipModel::load(&teacher_dir, device)?;

    let emb = out.join("embeddings");
    println!("[3/5] embedding images and captions -> {}", emb.display());
    let opts = EmbedOptions {
        batch_size: 64,
        shard_size: 256,
        progress: true,
        teacher_name: "random tiny CLIP (seed 0)".into(),
        ..EmbedOptions::default()
    };
    let s = embed_dataset(
        &teacher,
        Some(&tokenizer),
        &Dataset::open(&data)?,
        &emb,
        &opts,
    )?;
    println!(
        "[4/5] balancing (near-duplicate removal) -> {}",
        out.join("keep.safetensors").display()
    );
    let emb_all = clipcid_dedup::load_embeddings(std::slice::from_ref(&emb), device)?;
    let bal = clipcid_dedup::balance(
        &emb_all.image,
        &clipcid_dedup::BalanceOptions {
            sweep: vec![0.03, 0.05, 0.07, 0.1],
            ..Default::default()
        },
    )?;
    clipcid_dedup::write_keep_file(&out.join("keep.safetensors"), &bal, &emb_all.ids)?;
    let clusters = out.join("clusters.safetensors");
    let k = (bal.summary.kept / 8).clamp(2, 32);
    println!(
        "[5/5] k-means (faiss, K = {k}) on all and on the kept embeddings -> {}",
        clusters.display()
    );
    let kmeans = clipcid_cluster::KMeans::new(k).iterations(20).seed(0);
    let all_rows = clipcid_cluster::ShardRows::open(std::slice::from_ref(&emb), None)?;
    let before = clipcid_cluster::cluster_shards(&kmeans, &all_rows, false)?;
    clipcid_cluster::write_clusters(&out.join("clusters-unbalanced.safetensors"), &before)?;
    let kept_rows = clipcid_cluster::ShardRows::open(
        std::slice::from_ref(&emb),
        Some(&out.join("keep.safetensors")),
    )?;
    let after = clipcid_cluster::cluster_shards(&kmeans, &kept_rows, false)?;
    clipcid_cluster::write_clusters(&clusters, &after)?;
    let png = clusters.with_extension("png");
    clipcid_cluster::plot_size_histogram(
        &png,
        &format!("cluster sizes, K = {k}: before and after balancing"),
        &[
            ("after balance", &after.sizes),
            ("before balance", &before.sizes),
        ],
    )?;
    let sweep: Vec<String> = bal
        .summary
        .sweep
        .iter()
        .map(|r| format!("{}: {:.1}%", r.threshold, r.removed_pct))
        .collect();
    println!();
    println!("| stage | result |");
    println!("|---|---|");
    println!("| data | {samples} generated image-caption pairs (64x64 PNG, WebDataset shards) |");
    println!("| teacher | `tiny` preset with seeded RANDOM weights: not a pretrained CLIP |");
    println!(
        "| embed | {} images + captions -> {} shard(s), {:.0} images/s, {} skipped |",
        s.samples_embedded,
        s.shards.len(),
        s.images_per_second(),
        s.skipped.len()
    );
    println!(
        "| balance | threshold 0.07: kept {} of {}, removed {:.1}% (sweep {}) |",
        bal.summary.kept,
        bal.summary.n,
        bal.summary.removed_pct,
        sweep.join(", ")
    );
    let sz = |f: &clipcid_cluster::ClusterFile| {
        let s = &f.summary.sizes;
        format!("min {} / median {} / max {}", s.min, s.median, s.max)
    };
    println!(
        "| cluster | K = {k}: sizes before balance {}, after {} (histogram {}) |",
        sz(&before),
        sz(&after),
        png.display()
    );
    println!();
    println!("Note: this demo checks the plumbing only: a random teacher maps most images close together, so");
    println!("balance removes far more than it would with a pretrained one. distill and eval join as they land,");
    println!(
        "and a real pretrained teacher and real images replace the generated ones (see README)."
    );
    Ok(())
}
