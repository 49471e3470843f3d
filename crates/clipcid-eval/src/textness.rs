//! Textness bias (PicCollage): a 2-class linear probe on embeddings of images with and
//! without text in them; its positive-class weight vector is the *textness direction*. At
//! query time `text_vec += scale * textness` (then renormalised) moves search towards
//! (scale > 0) or away from (scale < 0) images that show text.
//!
//! The direction is stored unit-length, so `scale` is in units of the (unit) query
//! embedding: `scale = 1` adds as much textness as there is query. The probe's raw weight
//! norm is kept in the file's metadata.

use std::collections::HashMap;
use std::path::Path;

use ab_glyph::{Font, FontArc, PxScale, ScaleFont};
use candle_core::{Device, Tensor};
use clipcid_data::{DecodedImage, Preprocess};
use image::{DynamicImage, Rgb, RgbImage};
use rand::Rng;
use serde::Serialize;

use crate::features::Features;
use crate::linear_probe::{LabelledFeatures, LogisticRegression};
use crate::metrics::top_n;
use crate::EvalError;

/// Draws words onto images with a TrueType font.
///
/// ```
/// use clipcid_eval::TextRenderer;
/// use rand::SeedableRng;
/// let r = TextRenderer::dejavu_sans().unwrap();
/// let img = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 200, 200]));
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
/// let with_text = r.render(&img, "SALE", &mut rng);
/// assert_ne!(with_text, img);
/// ```
pub struct TextRenderer {
    font: FontArc,
}

impl std::fmt::Debug for TextRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextRenderer")
    }
}

impl TextRenderer {
    /// DejaVu Sans, built into the binary (the `dejavu` crate; the same font as Debian's
    /// `fonts-dejavu-core`).
    pub fn dejavu_sans() -> Result<Self, EvalError> {
        let font = FontArc::try_from_slice(dejavu::sans::regular())
            .map_err(|e| EvalError::Input(format!("built-in DejaVu Sans: {e}")))?;
        Ok(Self { font })
    }

    /// A `.ttf`/`.otf` file.
    pub fn from_file(path: &Path) -> Result<Self, EvalError> {
        let bytes = std::fs::read(path).map_err(|e| EvalError::file(path, e))?;
        let font = FontArc::try_from_vec(bytes)
            .map_err(|e| EvalError::file(path, format!("not a TrueType/OpenType font: {e}")))?;
        Ok(Self { font })
    }

    /// A copy of `img` with `text` drawn on it: height 15-30% of the image (shrunk to fit
    /// the width), a random position, black or white with a contrasting outline.
    pub fn render(&self, img: &RgbImage, text: &str, rng: &mut impl Rng) -> RgbImage {
        let (w, h) = img.dimensions();
        let mut size = h as f32 * rng.random_range(0.15..0.30);
        let width_at = |size: f32| {
            let s = self.font.as_scaled(PxScale::from(size));
            text.chars()
                .map(|c| s.h_advance(s.glyph_id(c)))
                .sum::<f32>()
        };
        let max_w = w as f32 * 0.95;
        let tw = width_at(size);
        if tw > max_w {
            size *= max_w / tw;
        }
        let tw = width_at(size);
        let x0 = rng.random_range(0.0..(w as f32 - tw).max(1.0));
        let y0 = rng.random_range(0.0..(h as f32 - size).max(1.0));
        let (fg, edge) = if rng.random_bool(0.5) {
            ([0u8, 0, 0], [255u8, 255, 255])
        } else {
            ([255, 255, 255], [0, 0, 0])
        };
        let mut out = img.clone();
        let outline = (size / 14.0).max(1.0) as i32;
        for (dx, dy, colour) in (-outline..=outline)
            .flat_map(|dx| (-outline..=outline).map(move |dy| (dx, dy)))
            .filter(|&(dx, dy)| dx != 0 || dy != 0)
            .map(|(dx, dy)| (dx, dy, edge))
            .chain(std::iter::once((0, 0, fg)))
        {
            self.draw(&mut out, text, size, x0 + dx as f32, y0 + dy as f32, colour);
        }
        out
    }

    fn draw(&self, img: &mut RgbImage, text: &str, size: f32, x0: f32, y0: f32, colour: [u8; 3]) {
        let scaled = self.font.as_scaled(PxScale::from(size));
        let mut x = x0;
        let mut prev = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = prev {
                x += scaled.kern(p, id);
            }
            let glyph = id.with_scale_and_position(size, ab_glyph::point(x, y0 + scaled.ascent()));
            x += scaled.h_advance(id);
            prev = Some(id);
            if let Some(outlined) = self.font.outline_glyph(glyph) {
                let b = outlined.px_bounds();
                outlined.draw(|gx, gy, coverage| {
                    let (px, py) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
                    if px < 0 || py < 0 || px >= img.width() as i64 || py >= img.height() as i64 {
                        return;
                    }
                    let p = img.get_pixel_mut(px as u32, py as u32);
                    let a = coverage.clamp(0.0, 1.0);
                    for (v, c) in p.0.iter_mut().zip(colour) {
                        *v = (*v as f32 * (1.0 - a) + c as f32 * a).round() as u8;
                    }
                });
            }
        }
    }
}

/// The textness direction.
#[derive(Debug, Clone, Serialize)]
pub struct TextnessDirection {
    /// Unit vector in the embedding space.
    pub vector: Vec<f32>,
    /// Norm of the probe's raw positive-class weight row.
    pub raw_norm: f64,
    /// The probe's accuracy on its own training embeddings.
    pub train_accuracy: f64,
}

impl TextnessDirection {
    /// Fits the 2-class probe (L-BFGS, L2 strength `l2`) on unit embeddings of images with
    /// text (`positive`) and without (`negative`); the direction is the positive-class
    /// weight row, normalised.
    pub fn fit(positive: &Features, negative: &Features, l2: f64) -> Result<Self, EvalError> {
        if positive.dim != negative.dim || positive.rows() == 0 || negative.rows() == 0 {
            return Err(EvalError::Input(format!(
                "textness needs embeddings of both kinds of the same width ({} x {} with text, {} x {} without)",
                positive.rows(),
                positive.dim,
                negative.rows(),
                negative.dim
            )));
        }
        let mut x = negative.data.clone();
        x.extend_from_slice(&positive.data);
        let mut y = vec![0usize; negative.rows()];
        y.extend(std::iter::repeat_n(1, positive.rows()));
        let data = LabelledFeatures::new(&x, positive.dim, &y, 2)?;
        let probe = LogisticRegression::fit(&data, 2, l2, 1000, None)?;
        let row: Vec<f64> = probe.weights().row(1).to_vec();
        let raw_norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if raw_norm.is_nan() || raw_norm <= 0.0 {
            return Err(EvalError::Input(
                "the textness probe learned nothing (zero weights): are the two sets different?"
                    .into(),
            ));
        }
        Ok(Self {
            vector: row.iter().map(|v| (v / raw_norm) as f32).collect(),
            raw_norm,
            train_accuracy: probe.accuracy(&data),
        })
    }

    /// `normalise(query + scale * direction)` for every query row.
    ///
    /// ```
    /// use clipcid_eval::{Features, TextnessDirection};
    /// let dir = TextnessDirection { vector: vec![0.0, 1.0], raw_norm: 1.0, train_accuracy: 1.0 };
    /// let q = Features::normalized(vec![1.0, 0.0], 2).unwrap();
    /// let b = dir.bias(&q, 1.0).unwrap();
    /// assert!((b.data[0] - b.data[1]).abs() < 1e-6); // 45 degrees
    /// ```
    pub fn bias(&self, queries: &Features, scale: f32) -> Result<Features, EvalError> {
        if queries.dim != self.vector.len() {
            return Err(EvalError::Input(format!(
                "queries are {}-wide, the textness direction {}-wide",
                queries.dim,
                self.vector.len()
            )));
        }
        let mut data = queries.data.clone();
        for row in data.chunks_exact_mut(queries.dim) {
            row.iter_mut()
                .zip(&self.vector)
                .for_each(|(q, t)| *q += scale * t);
        }
        Features::normalized(data, queries.dim)
    }

    /// Writes `textness` `[D]` (f32) with the norm and accuracy in the metadata, atomically.
    pub fn save(&self, path: &Path) -> Result<(), EvalError> {
        let t = Tensor::from_vec(self.vector.clone(), self.vector.len(), &Device::Cpu)?;
        let mut meta = HashMap::new();
        meta.insert("kind".to_string(), "clipcid-textness".to_string());
        meta.insert("raw_norm".to_string(), self.raw_norm.to_string());
        meta.insert(
            "train_accuracy".to_string(),
            self.train_accuracy.to_string(),
        );
        clipcid_store::io::write_safetensors(path, vec![("textness".to_string(), t)], &meta)?;
        Ok(())
    }

    /// Reads a file written by [`TextnessDirection::save`].
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let tensors = clipcid_store::io::load_tensors(path)?;
        let t = tensors
            .get("textness")
            .ok_or_else(|| EvalError::file(path, "no tensor named `textness`"))?;
        let vector = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let header = clipcid_store::io::read_header(path)?;
        let num = |k: &str| {
            header
                .metadata
                .get(k)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
        if vector.is_empty() || !(norm - 1.0).abs().lt(&1e-3) {
            return Err(EvalError::file(path, "`textness` is not a unit vector"));
        }
        Ok(Self {
            vector,
            raw_norm: num("raw_norm"),
            train_accuracy: num("train_accuracy"),
        })
    }
}

/// One row of the scale sweep.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// The scale.
    pub scale: f32,
    /// Top results per query (image indices, best first).
    pub top: Vec<Vec<usize>>,
    /// Fraction of text-bearing images among all queries' top results.
    pub text_fraction: f64,
}

/// The sweep's scales are finite and it shows at least one image per query: a NaN scale
/// would fail only after the direction is fitted and saved, and a top of 0 would report 0%
/// text-bearing at every scale.
fn check_sweep(scales: &[f32], top: usize) -> Result<(), EvalError> {
    if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
        return Err(EvalError::Input(format!(
            "textness scale {s} is not a finite number"
        )));
    }
    if top == 0 {
        return Err(EvalError::Input(
            "the textness sweep must show at least 1 image per query (top 0)".into(),
        ));
    }
    Ok(())
}

/// Ranks `images` for each query at each scale and counts text-bearing images in the top
/// `top` (`has_text[i]` says whether image `i` shows text).
///
/// ```
/// use clipcid_eval::{textness_sweep, Features, TextnessDirection};
/// let dir = TextnessDirection { vector: vec![0.0, 1.0], raw_norm: 1.0, train_accuracy: 1.0 };
/// let images = Features::normalized(vec![1.0, 0.0, 0.8, 0.6], 2).unwrap();
/// let query = Features::normalized(vec![1.0, 0.0], 2).unwrap();
/// let rows = textness_sweep(&dir, &query, &images, &[false, true], &[0.0, 2.0], 1).unwrap();
/// assert_eq!((rows[0].text_fraction, rows[1].text_fraction), (0.0, 1.0));
/// ```
pub fn textness_sweep(
    direction: &TextnessDirection,
    queries: &Features,
    images: &Features,
    has_text: &[bool],
    scales: &[f32],
    top: usize,
) -> Result<Vec<ScaleRow>, EvalError> {
    check_sweep(scales, top)?;
    if has_text.len() != images.rows() {
        return Err(EvalError::Input(format!(
            "{} text flags for {} images",
            has_text.len(),
            images.rows()
        )));
    }
    scales
        .iter()
        .map(|&scale| {
            let sim = direction.bias(queries, scale)?.similarity(images)?;
            let top: Vec<Vec<usize>> = sim
                .chunks_exact(images.rows().max(1))
                .map(|row| top_n(row, top))
                .collect();
            let shown: usize = top.iter().map(Vec::len).sum();
            let with_text = top.iter().flatten().filter(|&&i| has_text[i]).count();
            Ok(ScaleRow {
                scale,
                top,
                text_fraction: with_text as f64 / shown.max(1) as f64,
            })
        })
        .collect()
}

/// Draws a grid PNG for one query: a title band with the query (and how to read the grid),
/// then one row per scale, labelled `scale +1` on the left, with the query's top images left
/// to right, each `tile` pixels square; a red frame marks text-bearing images.
pub fn plot_textness_grid(
    path: &Path,
    query: &str,
    rows: &[(f32, Vec<usize>)],
    images: &[RgbImage],
    has_text: &[bool],
    tile: u32,
) -> Result<(), EvalError> {
    let renderer = TextRenderer::dejavu_sans()?;
    let label_w = tile * 3 / 2;
    let title_h = (tile / 2).max(16);
    let cols = rows.iter().map(|(_, r)| r.len()).max().unwrap_or(0) as u32;
    let mut grid = RgbImage::from_pixel(
        label_w + cols * (tile + 4),
        title_h + rows.len() as u32 * (tile + 4),
        Rgb([255, 255, 255]),
    );
    renderer.draw(
        &mut grid,
        &format!("query: \"{query}\"   (rows: textness scale; red frame: text in the image)"),
        title_h as f32 * 0.5,
        4.0,
        title_h as f32 * 0.2,
        [0, 0, 0],
    );
    for (r, (scale, top)) in rows.iter().enumerate() {
        let y = title_h + r as u32 * (tile + 4);
        renderer.draw(
            &mut grid,
            &format!("scale {scale:+}"),
            tile as f32 * 0.22,
            4.0,
            y as f32 + tile as f32 * 0.35,
            [0, 0, 0],
        );
        for (c, &i) in top.iter().enumerate() {
            let img = images.get(i).ok_or_else(|| {
                EvalError::Input(format!("image {i} of {} in the grid", images.len()))
            })?;
            let thumb =
                image::imageops::resize(img, tile, tile, image::imageops::FilterType::Triangle);
            let x = label_w + c as u32 * (tile + 4);
            if has_text.get(i).copied().unwrap_or(false) {
                for px in 0..tile + 4 {
                    for py in 0..tile + 4 {
                        if px < 2 || py < 2 || px >= tile + 2 || py >= tile + 2 {
                            let (gx, gy) = (x + px, y + py);
                            if gx < grid.width() && gy < grid.height() {
                                grid.put_pixel(gx, gy, Rgb([220, 30, 30]));
                            }
                        }
                    }
                }
            }
            image::imageops::overlay(&mut grid, &thumb, (x + 2) as i64, (y + 2) as i64);
        }
    }
    let draft = clipcid_plot::PngDraft::new(path);
    grid.save(draft.tmp())
        .map_err(|e| EvalError::file(path, format!("cannot write PNG: {e}")))?;
    draft.commit().map_err(|e| EvalError::file(path, e))
}

/// Words drawn onto images when none are given: short sign, label and caption texts.
pub const DEFAULT_WORDS: &[&str] = &[
    "SALE",
    "OPEN",
    "STOP",
    "EXIT",
    "HELLO",
    "Happy Birthday",
    "FREE",
    "NEWS",
    "coffee",
    "2024",
    "WELCOME",
    "Menu",
    "NO PARKING",
    "best friends",
    "LOVE",
    "Summer",
    "50% OFF",
    "Thank you",
    "HOTEL",
    "books",
];

/// Options of [`textness_study`].
#[derive(Debug, Clone)]
pub struct TextnessOptions {
    /// Query-side scales, one grid row each (PicCollage: -2..2).
    pub scales: Vec<f32>,
    /// Results per row.
    pub top: usize,
    /// Seed of the split and of the text placement.
    pub seed: u64,
    /// Words to draw.
    pub words: Vec<String>,
    /// L2 strength of the 2-class probe.
    pub l2: f64,
    /// Grid tile size in pixels.
    pub tile: u32,
    /// Real images that carry text (signs, pages, plates): every other one joins the probe's
    /// text side, the rest join the search pool as text-bearing entries. Encoded as decoded
    /// (transparency and palettes as the model's preprocessing takes them).
    pub real_text_images: Vec<DecodedImage>,
}

impl Default for TextnessOptions {
    fn default() -> Self {
        Self {
            scales: vec![-2.0, -1.0, 0.0, 1.0, 2.0],
            top: 10,
            seed: 0,
            words: DEFAULT_WORDS.iter().map(|w| w.to_string()).collect(),
            l2: 1e-3,
            tile: 96,
            real_text_images: vec![],
        }
    }
}

/// What [`textness_study`] found.
#[derive(Debug, Clone, Serialize)]
pub struct TextnessReport {
    /// The direction (also saved as `textness.safetensors`).
    pub direction: TextnessDirection,
    /// Images the probe was fitted on (each clean and with text).
    pub probe_images: usize,
    /// Images in the search pool (each clean and with text, so twice as many entries).
    pub pool_images: usize,
    /// The queries.
    pub queries: Vec<String>,
    /// One row per scale.
    pub rows: Vec<ScaleRow>,
    /// The markdown summary written to `report.md`.
    pub markdown: String,
}

/// The whole textness experiment on real images: half of `images` (seeded) fit the probe,
/// each both as it is and with a random word drawn on it; the other half form the search
/// pool, again each both clean and with text, so at scale 0 the ranking is the query's
/// meaning and the scale alone tips it towards or away from text. Writes to `out`:
/// `textness.safetensors`, `grid-Q.png` per query (one row per scale, top results,
/// text-bearing ones framed red) and `report.md` with the fraction of text-bearing images
/// in the top results per scale. Clean images are encoded as decoded; a word is drawn on
/// the image converted to RGB by the preprocessing's rule ([`Preprocess::convert_to_rgb`]:
/// transparency over white for transformers, dropped for open_clip), as a Pillow pipeline
/// converts before it draws. A real text image with the pixels of one of `images`
/// ([`first_shared_picture`]) is an error, [`EvalError::SharedPicture`]: it would stand on
/// both sides of the probe.
#[allow(clippy::too_many_arguments)] // one call site per front end; a struct adds nothing
pub fn textness_study(
    model: &clipcid_models::ClipModel,
    tokenizer: &clipcid_models::ClipTokenizer,
    preprocess: &Preprocess,
    images: &[DecodedImage],
    queries: &[String],
    renderer: &TextRenderer,
    opts: &TextnessOptions,
    out: &Path,
) -> Result<TextnessReport, EvalError> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if images.len() < 4 {
        return Err(EvalError::Input(format!(
            "the textness study needs at least 4 images, got {}",
            images.len()
        )));
    }
    if queries.is_empty() || opts.words.is_empty() || opts.scales.is_empty() {
        return Err(EvalError::Input(
            "the textness study needs queries, words and scales".into(),
        ));
    }
    check_sweep(&opts.scales, opts.top)?;
    if let Some((image, text_image)) = first_shared_picture(images, &opts.real_text_images) {
        return Err(EvalError::SharedPicture { image, text_image });
    }
    // The direction, grids and report are staged and moved into `out` together.
    clipcid_store::io::write_folder_replacing(out, "textness", |out| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
        let mut order: Vec<usize> = (0..images.len()).collect();
        order.shuffle(&mut rng);
        let (probe_idx, pool_idx) = order.split_at(images.len() / 2);
        let with_text = |i: usize, rng: &mut rand_chacha::ChaCha8Rng| {
            let word = &opts.words[rng.random_range(0..opts.words.len())];
            let rgb = preprocess.convert_to_rgb(&images[i].image);
            DecodedImage::from(DynamicImage::ImageRgb8(renderer.render(&rgb, word, rng)))
        };
        let probe_clean: Vec<DecodedImage> = probe_idx.iter().map(|&i| images[i].clone()).collect();
        let mut probe_text: Vec<DecodedImage> =
            probe_idx.iter().map(|&i| with_text(i, &mut rng)).collect();
        let (mut pool, mut has_text) = (vec![], vec![]);
        for &i in pool_idx {
            pool.push(images[i].clone());
            has_text.push(false);
            pool.push(with_text(i, &mut rng));
            has_text.push(true);
        }
        for (k, img) in opts.real_text_images.iter().enumerate() {
            if k % 2 == 0 {
                probe_text.push(img.clone());
            } else {
                pool.push(img.clone());
                has_text.push(true);
            }
        }
        let real = opts.real_text_images.len();
        let batch = 64;
        let enc = |imgs: &[DecodedImage]| {
            crate::features::encode_decoded_images(model, preprocess, imgs, batch)
        };
        let direction = TextnessDirection::fit(&enc(&probe_text)?, &enc(&probe_clean)?, opts.l2)?;
        direction.save(&out.join("textness.safetensors"))?;
        let pool_features = enc(&pool)?;
        let q = crate::features::encode_texts(model, tokenizer, queries, 256)?;
        let rows = textness_sweep(
            &direction,
            &q,
            &pool_features,
            &has_text,
            &opts.scales,
            opts.top,
        )?;
        let mut md = format!(
        "# Textness bias\n\nProbe: {} images, each clean and with a word drawn on it, plus {} real text-bearing images (training accuracy {:.1}%). Search pool: {} other images, each clean and with text, plus {} real text-bearing images ({} entries). `query += scale * textness` (unit direction), renormalised.\n\n| scale | text-bearing in top {} |\n|---:|---:|\n",
        probe_idx.len(),
        real.div_ceil(2),
        100.0 * direction.train_accuracy,
        pool_idx.len(),
        real / 2,
        pool.len(),
        // A `top` past the pool shows the whole pool; the header said "top 1000" of 64.
        opts.top.min(pool.len())
    );
        for r in &rows {
            md.push_str(&format!(
                "| {:+} | {:.0}% |\n",
                r.scale,
                100.0 * r.text_fraction
            ));
        }
        md.push('\n');
        let pool_rgb: Vec<RgbImage> = pool
            .iter()
            .map(|d| preprocess.convert_to_rgb(&d.image))
            .collect();
        for (qi, query) in queries.iter().enumerate() {
            let grid: Vec<(f32, Vec<usize>)> =
                rows.iter().map(|r| (r.scale, r.top[qi].clone())).collect();
            let file = format!("grid-{qi}.png");
            plot_textness_grid(
                &out.join(&file),
                query,
                &grid,
                &pool_rgb,
                &has_text,
                opts.tile,
            )?;
            md.push_str(&format!(
                "**\"{query}\"** (rows: scale; red frame: text-bearing)\n\n![{query}]({file})\n\n"
            ));
        }
        clipcid_store::io::write_atomic(&out.join("report.md"), md.as_bytes())?;
        Ok(TextnessReport {
            direction,
            probe_images: probe_idx.len(),
            pool_images: pool_idx.len(),
            queries: queries.to_vec(),
            rows,
            markdown: md,
        })
    })
}

/// Decodes every image of a plain folder of image files (sorted by name), or of any
/// dataset [`clipcid_data::Dataset::open`] reads, as
/// [`clipcid_data::decode_image_with_mode`] gives them (transparency and palettes kept, for
/// the preprocessing to take as it takes a dataset's). Undecodable files are errors naming
/// the file.
pub fn load_images(path: &Path) -> Result<Vec<DecodedImage>, EvalError> {
    Ok(load_named_images(path)?
        .into_iter()
        .map(|(_, image)| image)
        .collect())
}

/// [`load_images`] with each image's name, for messages: its file's path for a folder of
/// image files, `DATASET: sample KEY` for a dataset's sample.
pub fn load_named_images(path: &Path) -> Result<Vec<(String, DecodedImage)>, EvalError> {
    if path.is_dir() {
        let files = clipcid_data::image_files_in(path)?;
        if !files.is_empty() {
            return files
                .iter()
                .map(|f| {
                    let bytes = std::fs::read(f).map_err(|e| EvalError::file(f, e))?;
                    let image = clipcid_data::decode_image_with_mode(&bytes)
                        .map_err(|e| EvalError::file(f, e))?;
                    Ok((f.display().to_string(), image))
                })
                .collect();
        }
    }
    let data = clipcid_data::Dataset::open(path)?;
    let mut out = vec![];
    for s in data.samples()? {
        let s = s?;
        let bytes = s
            .image
            .map_err(|e| EvalError::file(path, format!("sample `{}`: {e}", s.key)))?;
        let img = clipcid_data::decode_image_with_mode(&bytes)
            .map_err(|e| EvalError::file(path, format!("sample `{}`: {e}", s.key)))?;
        out.push((format!("{}: sample `{}`", path.display(), s.key), img));
    }
    Ok(out)
}

/// The first image of `b` (by position) with the very pixels of an image of `a` (size,
/// colour type and every sample value), as `(index in a, index in b)`. The textness study
/// refuses such a pair: one picture cannot be both an image without text and one that
/// carries text.
///
/// ```
/// use clipcid_data::DecodedImage;
/// use image::{DynamicImage, RgbImage, Rgb};
/// let img = |v: u8| DecodedImage::from(DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 2, Rgb([v, 0, 0]))));
/// let a = [img(1), img(2)];
/// assert_eq!(clipcid_eval::first_shared_picture(&a, &[img(3), img(2)]), Some((1, 1)));
/// assert_eq!(clipcid_eval::first_shared_picture(&a, &[img(3)]), None);
/// ```
pub fn first_shared_picture(a: &[DecodedImage], b: &[DecodedImage]) -> Option<(usize, usize)> {
    use std::hash::{Hash, Hasher};
    let key = |d: &DecodedImage| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (d.image.width(), d.image.height(), d.image.color()).hash(&mut h);
        d.image.as_bytes().hash(&mut h);
        h.finish()
    };
    let same = |x: &DecodedImage, y: &DecodedImage| {
        (x.image.width(), x.image.height()) == (y.image.width(), y.image.height())
            && x.image.color() == y.image.color()
            && x.image.as_bytes() == y.image.as_bytes()
    };
    let mut by_key: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    for (i, d) in a.iter().enumerate() {
        by_key.entry(key(d)).or_default().push(i);
    }
    b.iter().enumerate().find_map(|(j, d)| {
        by_key
            .get(&key(d))?
            .iter()
            .find(|&&i| same(&a[i], d))
            .map(|&i| (i, j))
    })
}
