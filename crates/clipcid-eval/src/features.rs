//! Unit-normalised image and text features of a model, as plain row-major `f32` matrices,
//! and the similarity products the evaluations share.

use candle_core::Tensor;
use clipcid_data::{Batch, BatchIter, Dataset, DecodedImage, Preprocess, Skipped};
use clipcid_models::{l2_normalize, ClipModel, ClipTokenizer};
use image::{DynamicImage, RgbImage};
use ndarray::ArrayView2;

use crate::EvalError;

/// A row-major matrix of unit rows `[rows, dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// The values, `rows * dim` of them.
    pub data: Vec<f32>,
    /// Row width.
    pub dim: usize,
}

impl Features {
    /// Wraps row-major values; each row is L2-normalised here (zero rows stay zero).
    pub fn normalized(mut data: Vec<f32>, dim: usize) -> Result<Self, EvalError> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(EvalError::Input(format!(
                "{} values are not rows of width {dim}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(EvalError::Input(format!(
                "row {} holds a non-finite value",
                i / dim
            )));
        }
        for row in data.chunks_exact_mut(dim) {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if n > 0.0 {
                row.iter_mut().for_each(|v| *v /= n);
            }
        }
        Ok(Self { data, dim })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// `self . other^T`: `[self.rows(), other.rows()]`, row-major (OpenBLAS sgemm).
    pub fn similarity(&self, other: &Features) -> Result<Vec<f32>, EvalError> {
        if self.dim != other.dim {
            return Err(EvalError::Input(format!(
                "cannot compare {}-wide with {}-wide embeddings",
                self.dim, other.dim
            )));
        }
        let a = ArrayView2::from_shape((self.rows(), self.dim), &self.data)
            .map_err(|e| EvalError::Input(e.to_string()))?;
        let b = ArrayView2::from_shape((other.rows(), other.dim), &other.data)
            .map_err(|e| EvalError::Input(e.to_string()))?;
        Ok(a.dot(&b.t()).into_raw_vec_and_offset().0)
    }

    /// Mean over rows of the cosine between row `i` of `self` and of `other` (both unit).
    pub fn mean_row_cosine(&self, other: &Features) -> Result<f64, EvalError> {
        if self.dim != other.dim || self.rows() != other.rows() {
            return Err(EvalError::Input(format!(
                "[{}, {}] and [{}, {}] embeddings do not pair up",
                self.rows(),
                self.dim,
                other.rows(),
                other.dim
            )));
        }
        let sum: f64 = (0..self.rows())
            .map(|i| {
                self.row(i)
                    .iter()
                    .zip(other.row(i))
                    .map(|(a, b)| (a * b) as f64)
                    .sum::<f64>()
            })
            .sum();
        Ok(sum / self.rows().max(1) as f64)
    }
}

fn unit_rows(t: &Tensor) -> Result<Features, EvalError> {
    let t = l2_normalize(&t.to_dtype(candle_core::DType::F32)?)?;
    let dim = t.dim(1)?;
    Features::normalized(t.flatten_all()?.to_vec1::<f32>()?, dim)
}

/// Image features of a whole dataset with what came with each image.
#[derive(Debug, Clone)]
pub struct EncodedImages {
    /// Unit image embeddings, one row per decoded sample.
    pub features: Features,
    /// Sample keys.
    pub keys: Vec<String>,
    /// Captions (when the dataset has them).
    pub captions: Vec<Option<String>>,
    /// Class labels (labelled folders and `.cls` members).
    pub labels: Vec<Option<usize>>,
    /// Samples that could not be decoded (named, skipped).
    pub skipped: Vec<Skipped>,
}

/// Encodes every image of `data` with `model`'s image tower, `batch` at a time, preprocessed
/// with `preprocess` (the model's family's, e.g. `Preprocess::clip` at its image size).
pub fn encode_dataset(
    model: &ClipModel,
    preprocess: &Preprocess,
    data: &Dataset,
    batch: usize,
) -> Result<EncodedImages, EvalError> {
    check_size(model, preprocess)?;
    let mut iter = BatchIter::new(
        data.samples()?,
        preprocess.clone(),
        batch.max(1),
        model.device().clone(),
    );
    let (mut rows, mut keys, mut captions, mut labels) = (vec![], vec![], vec![], vec![]);
    let mut dim = model.config().projection_dim;
    // A batch's features are copied back only after the next batch is decoded: on a GPU the
    // tower's work is queued, so decoding overlaps it. (Copied back after the next batch was
    // queued, they would wait for that batch too.)
    let mut queued: Option<(Tensor, Batch)> = None;
    let mut land = |(features, b): (Tensor, Batch)| -> Result<(), EvalError> {
        let f = unit_rows(&features)?;
        dim = f.dim;
        rows.extend(f.data);
        keys.extend(b.keys);
        captions.extend(b.captions);
        labels.extend(b.labels);
        Ok(())
    };
    for b in iter.by_ref() {
        let b = b?;
        if b.is_empty() {
            continue;
        }
        if let Some(done) = queued.take() {
            land(done)?;
        }
        queued = Some((model.encode_image(&b.pixels)?, b));
    }
    if let Some(done) = queued.take() {
        land(done)?;
    }
    let skipped = iter.skipped().to_vec();
    Ok(EncodedImages {
        features: Features::normalized(rows, dim)?,
        keys,
        captions,
        labels,
        skipped,
    })
}

/// The preprocessing must make the model's input size.
fn check_size(model: &ClipModel, preprocess: &Preprocess) -> Result<(), EvalError> {
    let size = model.config().vision_config.image_size;
    if preprocess.image_size != size {
        return Err(EvalError::Input(format!(
            "preprocessing makes {} px images but the model takes {size} px",
            preprocess.image_size
        )));
    }
    Ok(())
}

/// Encodes in-memory images (e.g. rendered ones) `batch` at a time, preprocessed with
/// `preprocess`.
pub fn encode_images(
    model: &ClipModel,
    preprocess: &Preprocess,
    images: &[RgbImage],
    batch: usize,
) -> Result<Features, EvalError> {
    encode_with(model, preprocess, images, batch, |img, out| {
        preprocess.apply_into(&DynamicImage::ImageRgb8(img.clone()), out)
    })
}

/// [`encode_images`] of decoded images (as [`crate::load_images`] and
/// [`clipcid_data::decode_image_with_mode`] give them): transparency becomes RGB by the
/// preprocessing's rule and palette images are resized as Pillow resizes them, exactly as
/// for images read from a dataset.
pub fn encode_decoded_images(
    model: &ClipModel,
    preprocess: &Preprocess,
    images: &[DecodedImage],
    batch: usize,
) -> Result<Features, EvalError> {
    encode_with(model, preprocess, images, batch, |img, out| {
        preprocess.apply_decoded_into(img, out)
    })
}

/// Encodes `images` `batch` at a time, each written into its slot of the batch by `prep`.
fn encode_with<T>(
    model: &ClipModel,
    preprocess: &Preprocess,
    images: &[T],
    batch: usize,
    prep: impl Fn(&T, &mut [f32]) -> Result<(), String>,
) -> Result<Features, EvalError> {
    check_size(model, preprocess)?;
    let size = preprocess.image_size;
    let pre = preprocess;
    let mut rows = vec![];
    let mut dim = model.config().projection_dim;
    for chunk in images.chunks(batch.max(1)) {
        let per = pre.values_per_image();
        let mut px = vec![0f32; chunk.len() * per];
        for (img, out) in chunk.iter().zip(px.chunks_exact_mut(per)) {
            prep(img, out).map_err(EvalError::Input)?;
        }
        let t = Tensor::from_vec(px, (chunk.len(), 3, size, size), model.device())?;
        let f = unit_rows(&model.encode_image(&t)?)?;
        dim = f.dim;
        rows.extend(f.data);
    }
    Features::normalized(rows, dim)
}

/// Encodes texts `batch` at a time with `model`'s text tower.
pub fn encode_texts(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    texts: &[String],
    batch: usize,
) -> Result<Features, EvalError> {
    let mut rows = vec![];
    let mut dim = model.config().projection_dim;
    for chunk in texts.chunks(batch.max(1)) {
        let ids = tokenizer.encode_batch(chunk, model.device())?;
        let f = unit_rows(&model.encode_text(&ids)?)?;
        dim = f.dim;
        rows.extend(f.data);
    }
    Features::normalized(rows, dim)
}
