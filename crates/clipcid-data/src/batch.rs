//! Decoding samples into batches of candle tensors, in parallel, skipping bad samples.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::{DataError, Preprocess, Sample, SampleStream};

/// A sample that was dropped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Position of the sample in the dataset.
    pub index: u64,
    /// Its key.
    pub key: String,
    /// What was wrong (undecodable image, missing file...).
    pub reason: String,
}

/// Decoded samples ready for a model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Sample positions in the dataset.
    pub indices: Vec<u64>,
    /// Sample keys.
    pub keys: Vec<String>,
    /// Normalised pixels `[B, 3, S, S]`, f32.
    pub pixels: Tensor,
    /// Captions, where present.
    pub captions: Vec<Option<String>>,
    /// Labels, where present.
    pub labels: Vec<Option<usize>>,
    /// Each sample's [`ImageDigest`](clipcid_store::ImageDigest): which encoded bytes the
    /// pixels were decoded from.
    pub image_digests: Vec<clipcid_store::ImageDigest>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Each sample's caption, `""` for a sample without one: what a tokenizer takes.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// let batch = clipcid_data::Batch {
    ///     indices: vec![0, 1],
    ///     keys: vec!["a".into(), "b".into()],
    ///     pixels: Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu)?,
    ///     captions: vec![Some("a cat".into()), None],
    ///     labels: vec![None, None],
    ///     image_digests: vec![[0; 8], [1; 8]],
    /// };
    /// assert_eq!(batch.caption_texts(), ["a cat", ""]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn caption_texts(&self) -> Vec<&str> {
        self.captions
            .iter()
            .map(|c| c.as_deref().unwrap_or(""))
            .collect()
    }
}

/// Decodes and preprocesses a group of samples on rayon's pool. Samples that fail are
/// returned as [`Skipped`] (and logged with their key), the rest form the batch (`None`
/// when every sample failed). Each sample is written in place into the batch's one buffer,
/// in parallel; a failed sample's slot is closed up afterwards. Each kept sample's
/// [`image_digest`](clipcid_store::image_digest) is taken of the bytes it was decoded from.
pub fn decode_batch(
    samples: Vec<Sample>,
    preprocess: &Preprocess,
    device: &Device,
) -> Result<(Option<Batch>, Vec<Skipped>), DataError> {
    let per = preprocess.values_per_image();
    let mut flat = vec![0f32; samples.len() * per];
    let outcomes: Vec<Result<clipcid_store::ImageDigest, String>> = flat
        .par_chunks_mut(per)
        .zip(samples.par_iter())
        .map(|(out, sample)| match &sample.image {
            Ok(bytes) => preprocess
                .decode_into(bytes, out)
                .map(|()| clipcid_store::image_digest(bytes)),
            Err(reason) => Err(reason.clone()),
        })
        .collect();
    let mut skipped = Vec::new();
    let (mut indices, mut keys, mut captions, mut labels) = (vec![], vec![], vec![], vec![]);
    let mut image_digests = vec![];
    for (slot, (sample, outcome)) in samples.into_iter().zip(outcomes).enumerate() {
        match outcome {
            Ok(digest) => {
                image_digests.push(digest);
                let kept = keys.len();
                if kept != slot {
                    flat.copy_within(slot * per..(slot + 1) * per, kept * per);
                }
                indices.push(sample.index);
                keys.push(sample.key);
                captions.push(sample.caption);
                labels.push(sample.label);
            }
            Err(reason) => {
                log::warn!("skipping sample `{}`: {reason}", sample.key);
                skipped.push(Skipped {
                    index: sample.index,
                    key: sample.key,
                    reason,
                });
            }
        }
    }
    if keys.is_empty() {
        return Ok((None, skipped));
    }
    flat.truncate(keys.len() * per);
    let s = preprocess.image_size;
    let pixels = Tensor::from_vec(flat, (keys.len(), 3, s, s), device)?;
    Ok((
        Some(Batch {
            indices,
            keys,
            pixels,
            captions,
            labels,
            image_digests,
        }),
        skipped,
    ))
}

/// Iterator of [`Batch`]es over a [`SampleStream`]; every batch but the last holds
/// `batch_size` samples read (fewer decoded if some were skipped). [`BatchIter::skipped`]
/// lists every dropped sample so far.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_data::{BatchIter, Dataset, Preprocess};
/// let dir = tempfile::tempdir()?;
/// for i in 0..3 {
///     image::RgbImage::new(10, 8).save(dir.path().join(format!("{i}.png")))?;
/// }
/// std::fs::write(dir.path().join("bad.png"), b"not a png")?;
/// std::fs::write(dir.path().join("captions.tsv"), "0.png\tzero\n1.png\tone\nbad.png\tbad\n2.png\ttwo\n")?;
/// let ds = Dataset::open(dir.path())?;
/// let mut it = BatchIter::new(ds.samples()?, Preprocess::clip(8), 2, candle_core::Device::Cpu);
/// let sizes: Vec<usize> = it.by_ref().map(|b| b.map(|b| b.len())).collect::<Result<_, _>>()?;
/// assert_eq!(sizes, vec![2, 1]);
/// assert_eq!(it.skipped()[0].key, "bad.png");
/// # Ok(()) }
/// ```
pub struct BatchIter<'a> {
    samples: SampleStream<'a>,
    preprocess: Preprocess,
    batch_size: usize,
    device: Device,
    skipped: Vec<Skipped>,
}

impl<'a> BatchIter<'a> {
    /// Batches `samples` `batch_size` at a time (at least 1).
    pub fn new(
        samples: SampleStream<'a>,
        preprocess: Preprocess,
        batch_size: usize,
        device: Device,
    ) -> Self {
        Self {
            samples,
            preprocess,
            batch_size: batch_size.max(1),
            device,
            skipped: vec![],
        }
    }

    /// Samples dropped so far.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

impl Iterator for BatchIter<'_> {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let raw: Vec<Sample> = match self
                .samples
                .by_ref()
                .take(self.batch_size)
                .collect::<Result<_, _>>()
            {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            };
            if raw.is_empty() {
                return None;
            }
            match decode_batch(raw, &self.preprocess, &self.device) {
                Ok((batch, skipped)) => {
                    self.skipped.extend(skipped);
                    if let Some(b) = batch {
                        return Some(Ok(b));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
