//! Image decoding and CLIP preprocessing on CPU: how many images a second the host can feed
//! the towers (on a GPU the ViT-B/32 tower takes about 29,000 a second, docs/scale.md).
//!
//! `cargo bench --bench decode [-- --photos data/photos --dir target/decode-bench --reps 5
//! --size 224 --batch 256]`, then the peer on the same files:
//! `python3 benches/decode_peer.py target/decode-bench` (Pillow and numpy).
//!
//! The images are the real photos that `scripts/fetch-data.sh` puts in `data/photos`,
//! written again as JPEG at quality 95 with 4:2:0 chroma (what img2dataset, through OpenCV,
//! and Pillow write by default) in three sets: shortest side 256 (img2dataset's default size
//! for LAION shards), shortest side 512 (the photos at least that large) and the photos' own
//! sizes. Each set is timed with the bytes in memory, so reading files is not counted:
//! - `Preprocess::decode` (open_clip's transform: decode, Pillow-exact bicubic resize of the
//!   shortest side, centre crop, normalise), `--batch` images cycling through the set, one
//!   after another on one thread;
//! - `decode_batch` (the same work on rayon's pool, into a `[B, 3, S, S]` tensor) on those
//!   `--batch` images, on every thread;
//! - `clipcid_store::image_digest` (SHA-256 of the encoded bytes, which `decode_batch` takes
//!   of every image so that `distill` can tell an image replaced since `embed`) on one
//!   thread, and its time as a share of the one-thread decode.
//!
//! Prints a markdown table of images/s and the mean of the output pixels; the peer prints the
//! same columns for Pillow, and equal means show both compute the same thing (both decode
//! JPEG with libjpeg-turbo, `clipcid_data::decode_image`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use clipcid_data::{decode_batch, Preprocess, Sample};
use clipcid_suite::{bench_arg as arg, median};
use image::imageops::FilterType;

/// The sets: a name, the shortest side (`None`: the photo's own size).
const SETS: [(&str, Option<u32>); 3] = [
    ("short side 256", Some(256)),
    ("short side 512", Some(512)),
    ("own size", None),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let photos: PathBuf = arg("--photos", PathBuf::from("data/photos"));
    let dir: PathBuf = arg("--dir", PathBuf::from("target/decode-bench"));
    let (reps, size, batch) = (
        arg("--reps", 5usize),
        arg("--size", 224usize),
        arg("--batch", 256usize),
    );
    let sources = read_photos(&photos)?;
    if sources.is_empty() {
        println!(
            "skipped: no photos in {} (run scripts/fetch-data.sh, or pass --photos DIR)",
            photos.display()
        );
        return Ok(());
    }
    let preprocess = Preprocess::open_clip(size);
    let threads = rayon::current_num_threads();
    println!(
        "clipcid CPU decode + open_clip preprocessing to {size} px, {} photos from {}, JPEG q95 4:2:0, median of {reps}",
        sources.len(),
        photos.display()
    );
    println!();
    println!("| set | images | mean size | MB | one thread: images/s | {threads} threads, batches of {batch}: images/s | digest, one thread: images/s | digest / decode | mean pixel |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for (name, short) in SETS {
        let set = write_set(&sources, short, &dir.join(set_folder(short)))?;
        if set.is_empty() {
            continue;
        }
        let mb = set.iter().map(|b| b.len()).sum::<usize>() as f64 / 1e6;
        let (mean_w, mean_h) = mean_size(&set)?;

        // One thread, one image after another: a core's rate, over the `batch` images the
        // next row decodes at once.
        let mut sum = 0f64;
        let mut count = 0usize;
        let one = median(
            (0..reps)
                .map(|_| {
                    let t0 = Instant::now();
                    for bytes in set.iter().cycle().take(batch) {
                        let px = preprocess.decode(bytes)?;
                        sum += px.iter().map(|&v| f64::from(v)).sum::<f64>();
                        count += px.len();
                    }
                    Ok(t0.elapsed().as_secs_f64())
                })
                .collect::<Result<Vec<f64>, String>>()?,
        );

        // The digest alone, one thread, the same images.
        let mut fold = 0u8;
        let digest = median(
            (0..reps)
                .map(|_| {
                    let t0 = Instant::now();
                    for bytes in set.iter().cycle().take(batch) {
                        fold ^= clipcid_store::image_digest(bytes)[0];
                    }
                    t0.elapsed().as_secs_f64()
                })
                .collect(),
        );
        std::hint::black_box(fold);

        // Every thread: batches of `batch` samples cycling through the set.
        let samples = |start: usize| -> Vec<Sample> {
            (0..batch)
                .map(|i| Sample {
                    index: (start + i) as u64,
                    key: format!("{}", (start + i) % set.len()),
                    image: Ok(set[(start + i) % set.len()].clone()),
                    caption: None,
                    label: None,
                })
                .collect()
        };
        let many = median(
            (0..reps)
                .map(|r| {
                    let group = samples(r * batch);
                    let t0 = Instant::now();
                    let (decoded, skipped) = decode_batch(group, &preprocess, &Device::Cpu)?;
                    let t = t0.elapsed().as_secs_f64();
                    if !skipped.is_empty() || decoded.is_none() {
                        return Err(format!(
                            "{} of the set's images did not decode",
                            skipped.len()
                        )
                        .into());
                    }
                    Ok(t)
                })
                .collect::<Result<Vec<f64>, Box<dyn std::error::Error>>>()?,
        );
        println!(
            "| {name} | {} | {mean_w:.0} x {mean_h:.0} | {mb:.1} | {:.0} | {:.0} | {:.0} | {:.1}% | {:.4} |",
            set.len(),
            batch as f64 / one,
            batch as f64 / many,
            batch as f64 / digest,
            100.0 * digest / one,
            sum / count as f64
        );
    }
    Ok(())
}

/// The folder of a set, under `--dir`.
fn set_folder(short: Option<u32>) -> String {
    short.map_or("own".to_string(), |s| format!("short{s}"))
}

/// The photos (JPEG and PNG) of `dir` in name order, as RGB; none when the folder is absent.
fn read_photos(dir: &Path) -> Result<Vec<(String, image::RgbImage)>, Box<dyn std::error::Error>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let img = image::open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let stem = p
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("photo")
                .to_string();
            Ok((stem, img.to_rgb8()))
        })
        .collect()
}

/// Writes each photo resized to shortest side `short` (Lanczos; photos smaller than that are
/// left out, never enlarged) or at its own size, as `name.jpg` in `dir`, and returns the bytes
/// of every file written.
fn write_set(
    photos: &[(String, image::RgbImage)],
    short: Option<u32>,
    dir: &Path,
) -> Result<Vec<Vec<u8>>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut set = Vec::new();
    for (name, img) in photos {
        let (w, h) = img.dimensions();
        let img = match short {
            None => img.clone(),
            Some(s) if w.min(h) < s => continue,
            Some(s) => {
                let (nw, nh) = if w <= h {
                    (s, (u64::from(s) * u64::from(h) / u64::from(w)) as u32)
                } else {
                    ((u64::from(s) * u64::from(w) / u64::from(h)) as u32, s)
                };
                image::imageops::resize(img, nw, nh, FilterType::Lanczos3)
            }
        };
        let mut bytes = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 95);
        encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
        let (w, h) = img.dimensions();
        encoder.encode(
            img.as_raw(),
            w as u16,
            h as u16,
            jpeg_encoder::ColorType::Rgb,
        )?;
        let path = dir.join(format!("{name}.jpg"));
        let tmp = dir.join(format!("{name}.jpg.tmp-bench"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)?;
        set.push(bytes);
    }
    Ok(set)
}

/// The mean width and height of a set's images.
fn mean_size(set: &[Vec<u8>]) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let mut total = (0f64, 0f64);
    for bytes in set {
        let img = image::load_from_memory(bytes)?;
        total.0 += f64::from(img.width());
        total.1 += f64::from(img.height());
    }
    Ok((total.0 / set.len() as f64, total.1 / set.len() as f64))
}
