//! Teacher embedding extraction for clipcid: runs a CLIP checkpoint over a dataset in batches
//! and writes L2-normalised image (and caption) embeddings as safetensors shards, f32 or f16.
//! Each output shard covers a fixed range of input samples, is written atomically, and is
//! skipped on a re-run once its header checks out, so an interrupted run resumes where it
//! stopped.
//!
//! Shard layout (`embeddings-00000.safetensors`, ...): tensors `image` `[n, D]`, `text`
//! `[n, D]` and `has_text` `[n]` (u8) when captions are embedded, `ids` `[n]` (i64, the
//! sample's position in the dataset), `image_digest` `[n, 8]` (u8: which image bytes each row
//! was made from, [`clipcid_store::image_digest`]; distillation checks it against the images
//! it reads); metadata `keys` (JSON list of sample keys), `skipped`
//! (JSON list of keys dropped as unreadable), `first_index` / `end_index` (input range),
//! `dim`, `teacher`, `provenance`, and `end_record`: a finished run (each part of a split one)
//! writes [`clipcid_store::EMBED_END_RECORD`] with the data's sample count, so a reader can
//! tell a finished run from a stopped one ([`clipcid_store::EmbedEnd`]).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::Device;
//! use clipcid_embed::{embed_dataset, EmbedOptions, EmbeddingShard};
//! use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
//!
//! let data = tempfile::tempdir()?;
//! for (i, colour) in [[255u8, 0, 0], [0, 0, 255]].iter().enumerate() {
//!     image::RgbImage::from_pixel(40, 40, image::Rgb(*colour)).save(data.path().join(format!("{i}.png")))?;
//! }
//! std::fs::write(data.path().join("captions.tsv"), "0.png\ta red square\n1.png\ta blue square\n")?;
//! let dataset = clipcid_data::Dataset::open(data.path())?;
//!
//! let cfg = ClipConfig::preset("tiny")?;
//! let teacher = ClipModel::random(&cfg, 0, &Device::Cpu)?;
//! let tokenizer = ClipTokenizer::byte_level(cfg.text_config.max_position_embeddings)?;
//! let out = tempfile::tempdir()?;
//! let summary = embed_dataset(&teacher, Some(&tokenizer), &dataset, out.path(), &EmbedOptions::default())?;
//! assert_eq!(summary.samples_embedded, 2);
//!
//! let shard = EmbeddingShard::read(&summary.shards[0])?;
//! assert_eq!(shard.image.dims(), &[2, 16]);
//! assert_eq!(shard.keys, vec!["0.png", "1.png"]);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod resume;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use clipcid_data::{decode_batch, Batch, DataError, Dataset, Preprocess, Sample, Skipped};
use clipcid_models::{l2_normalize, ClipModel, ClipTokenizer, ModelError};

pub use clipcid_store::{
    expand_shard_inputs, list_shards, shard_path, EmbeddingShard, Part, ShardLayout, StoreError,
    SHARD_KIND,
};

/// Errors of an embedding run or of reading its shards.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Reading the dataset failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model or tokenizer failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading or writing a shard failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An embedding shard is malformed or inconsistent.
    #[error("{}: {msg}", path.display())]
    Shard {
        /// The shard file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The options or inputs do not fit together.
    #[error("{0}")]
    Config(String),
}

/// Storage precision of the embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbedDtype {
    /// 4 bytes per value.
    #[default]
    F32,
    /// 2 bytes per value (IEEE half precision, candle's `half::f16`).
    F16,
}

impl EmbedDtype {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
        }
    }
}

impl std::str::FromStr for EmbedDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            _ => Err(format!("unknown embedding dtype `{s}` (f32 or f16)")),
        }
    }
}

/// How to run [`embed_dataset`].
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Input samples per output shard.
    pub shard_size: usize,
    /// Storage precision.
    pub dtype: EmbedDtype,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Name of the teacher, recorded in every shard.
    pub teacher_name: String,
    /// Image preprocessing; `None` is [`Preprocess::clip`] at the model's image size. Pass
    /// the checkpoint family's own ([`Preprocess::for_model`]) for a teacher loaded from
    /// `transformers` or open_clip files.
    pub preprocess: Option<Preprocess>,
    /// Replace shards another run (another teacher, dataset, tokenizer, preprocessing,
    /// `--dtype` or `--shard-size`) left in the output folder. Without it such a folder is
    /// refused, naming what differs.
    pub overwrite: bool,
    /// This process's share when the run is split over independent processes: output
    /// shard `j` (input samples `j * shard_size ..`) is embedded by part `j % N`; the
    /// others' samples are passed over undecoded (in tar shards unread, seeked past). The N
    /// parts write into one folder (or N folders read together) exactly the shards one
    /// process writes, byte for byte.
    pub part: Part,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            batch_size: 64,
            shard_size: 10_000,
            dtype: EmbedDtype::F32,
            progress: false,
            teacher_name: String::new(),
            preprocess: None,
            overwrite: false,
            part: Part::WHOLE,
        }
    }
}

/// What an [`embed_dataset`] run did.
#[derive(Debug, Clone, Default)]
pub struct EmbedSummary {
    /// Every shard of the output, in order.
    pub shards: Vec<PathBuf>,
    /// How many of them were already complete and kept from an earlier run.
    pub shards_resumed: usize,
    /// Samples embedded in this run.
    pub samples_embedded: usize,
    /// Samples dropped in this run (unreadable or undecodable), with their keys.
    pub skipped: Vec<Skipped>,
    /// Wall time of this run.
    pub seconds: f64,
}

impl EmbedSummary {
    /// Images embedded per second in this run.
    pub fn images_per_second(&self) -> f64 {
        self.samples_embedded as f64 / self.seconds.max(1e-9)
    }
}

/// Embeds every sample of `dataset` with `model` into shards under `out_dir`.
///
/// With a `tokenizer`, captions are embedded too (`text`); a sample without a caption gets a
/// zero row and `has_text = 0`. Shards already complete from an earlier run with the same
/// options are kept. Unreadable samples are skipped, logged by key, and listed in the summary
/// and in their shard's `skipped` metadata.
pub fn embed_dataset(
    model: &ClipModel,
    tokenizer: Option<&ClipTokenizer>,
    dataset: &Dataset,
    out_dir: &Path,
    opts: &EmbedOptions,
) -> Result<EmbedSummary, EmbedError> {
    if opts.shard_size == 0 || opts.batch_size == 0 {
        return Err(EmbedError::Config(
            "batch size and shard size must be at least 1".into(),
        ));
    }
    let cfg = model.config();
    if let Some(tok) = tokenizer {
        if tok.context_length() > cfg.text_config.max_position_embeddings {
            return Err(EmbedError::Config(format!(
                "tokenizer context length {} exceeds the model's {}",
                tok.context_length(),
                cfg.text_config.max_position_embeddings
            )));
        }
        if tok.vocab_size() > cfg.text_config.vocab_size {
            return Err(EmbedError::Config(format!(
                "tokenizer vocabulary ({}) is larger than the model's ({}); wrong tokenizer for this teacher?",
                tok.vocab_size(),
                cfg.text_config.vocab_size
            )));
        }
    }
    clipcid_store::io::create_output_folder(out_dir)?;
    // One writer per folder (per part of a split run): a second run into it is refused,
    // not interleaved.
    let part = opts.part;
    let _lock = if part.is_whole() {
        clipcid_store::io::lock_output_dir(out_dir)?
    } else {
        let name = format!(".clipcid-part-{}-of-{}.lock", part.index(), part.count());
        clipcid_store::io::lock_output_dir_part(out_dir, &name)?
    };
    // Only this part's shards are this run's to check, keep or remove.
    let owned = |p: &Path| clipcid_store::shard_index(p).is_none_or(|j| part.owns(j as u64));
    let start = Instant::now();
    let preprocess = match &opts.preprocess {
        Some(p) if p.image_size != cfg.vision_config.image_size => {
            return Err(EmbedError::Config(format!(
                "preprocessing makes {} px images but the model takes {} px",
                p.image_size, cfg.vision_config.image_size
            )))
        }
        Some(p) => p.clone(),
        None => Preprocess::clip(cfg.vision_config.image_size),
    };
    // A folder embedded before a captions file's fingerprint covered its images' sizes
    // records the older form; its runs keep that form, so a re-run resumes its shards (and its
    // parts agree) instead of refusing them as another dataset's.
    let data = match dataset.fingerprint_before_image_sizes()? {
        Some(old)
            if clipcid_store::list_shards(out_dir)
                .unwrap_or_default()
                .iter()
                .any(|p| matches!(resume::recorded(p), Some(Some(r)) if r.data == old)) =>
        {
            old
        }
        _ => dataset.fingerprint()?,
    };
    let provenance = resume::Provenance {
        teacher: model.fingerprint()?,
        data,
        tokenizer: tokenizer.map(|t| t.fingerprint()).transpose()?,
        preprocess: format!("{preprocess:?}"),
        decoder: Some(clipcid_data::IMAGE_DECODER.to_string()),
        dtype: opts.dtype.name().to_string(),
        shard_size: opts.shard_size as u64,
    };
    // Shards of another run in the folder: refused (naming what differs) or, with
    // `overwrite`, removed before this run writes anything.
    for old in clipcid_store::list_shards(out_dir).unwrap_or_default() {
        if !owned(&old) {
            continue;
        }
        let differs = match resume::recorded(&old) {
            None => continue, // unreadable: redone (or removed as stale) by this run
            Some(Some(p)) => p.differences(&provenance),
            Some(None) => vec!["producer (no provenance recorded)"],
        };
        if differs.is_empty() {
            continue;
        }
        if opts.overwrite {
            std::fs::remove_file(&old).map_err(|e| {
                EmbedError::Config(format!("{}: cannot remove: {e}", old.display()))
            })?;
        } else {
            // The teacher's fingerprint is of its weights as loaded: the same checkpoint at
            // another `--precision` differs too, and "different teacher" alone misled.
            let hint = if differs.contains(&"teacher") {
                " (the teacher's weights as loaded: the same checkpoint at another --precision counts as another teacher)"
            } else {
                ""
            };
            return Err(EmbedError::Shard {
                path: old,
                msg: format!(
                    "written by another run (different {}){hint}; embed into another folder, or pass --overwrite to replace it",
                    differs.join(", ")
                ),
            });
        }
    }
    let expect = resume::Expect {
        dim: cfg.projection_dim,
        dtype: opts.dtype,
        with_text: tokenizer.is_some(),
        shard_size: opts.shard_size as u64,
        provenance,
    };
    let bar = progress_bar(opts.progress, dataset.len_hint());
    let mut summary = EmbedSummary::default();
    let mut stream = if part.is_whole() {
        dataset.samples()?
    } else {
        // Other parts' samples are seeked past in tar shards, not read.
        let shard_size = opts.shard_size as u64;
        dataset.samples_where(move |i| part.owns(i / shard_size))?
    };
    // Samples in the dataset, counted as the stream passes them.
    let mut seen = 0u64;
    for shard_idx in 0.. {
        let path = shard_path(out_dir, shard_idx);
        let first = shard_idx as u64 * opts.shard_size as u64;
        if !part.owns(shard_idx as u64) {
            // Another part's samples: passed over, not decoded.
            let n = stream.skip_samples(opts.shard_size as u64)?;
            seen += n;
            bar.inc(n);
            if n < opts.shard_size as u64 {
                break;
            }
            continue;
        }
        if let Some(covered) = resume::is_complete(&path, first, &expect) {
            let n = stream.skip_samples(opts.shard_size as u64)?;
            seen += n;
            if n == covered {
                bar.inc(n);
                summary.shards.push(path);
                summary.shards_resumed += 1;
                if covered < opts.shard_size as u64 {
                    // The dataset's last, short shard: the data still ends where it did.
                    break;
                }
                continue;
            }
            // The samples are read past by now, so the shard cannot be redone in this pass;
            // with the dataset's fingerprint unchanged this means the data moved underneath.
            let now = if n < covered {
                format!("ends at {}", first + n)
            } else {
                "goes on past it".to_string()
            };
            return Err(EmbedError::Shard {
                path,
                msg: format!(
                    "shard covers samples {first}..{} but the dataset now {now}; remove the shard and run again",
                    first + covered
                ),
            });
        }
        let mut rows = ShardRows::default();
        let mut in_flight: Option<InFlight> = None;
        let mut read = 0u64;
        while read < opts.shard_size as u64 {
            let want = opts.batch_size.min(opts.shard_size - read as usize);
            let raw: Vec<Sample> = stream.by_ref().take(want).collect::<Result<_, _>>()?;
            if raw.is_empty() {
                break;
            }
            read += raw.len() as u64;
            let n_raw = raw.len() as u64;
            let (batch, skipped) = decode_batch(raw, &preprocess, model.device())?;
            rows.skipped.extend(skipped);
            // The previous batch's features, which the device computed while this batch
            // was read and decoded.
            if let Some(done) = in_flight.take() {
                done.land(&mut rows)?;
            }
            if let Some(batch) = batch {
                in_flight = Some(InFlight::start(
                    model,
                    tokenizer,
                    batch,
                    opts.dtype.dtype(),
                )?);
            }
            bar.inc(n_raw);
        }
        if let Some(done) = in_flight.take() {
            done.land(&mut rows)?;
        }
        seen += read;
        if read == 0 {
            break;
        }
        summary.samples_embedded += rows.keys.len();
        summary.skipped.extend(rows.skipped.iter().cloned());
        rows.write(&path, first, first + read, &expect, &opts.teacher_name)?;
        summary.shards.push(path);
        if read < opts.shard_size as u64 {
            break;
        }
    }
    bar.finish_and_clear();
    // Shards past this run's last one are an earlier run's (another --shard-size, a longer
    // dataset): left in place they would be read as part of this output.
    let ours: Vec<_> = summary
        .shards
        .iter()
        .filter_map(|p| p.file_name())
        .collect();
    for stale in clipcid_store::list_shards(out_dir).unwrap_or_default() {
        // Another part's shard inside the data's range is that part's; past the range it is
        // stale whoever wrote it.
        let end = seen.div_ceil(opts.shard_size as u64);
        let beyond = clipcid_store::shard_index(&stale).is_some_and(|j| j as u64 >= end);
        if !owned(&stale) && !beyond {
            continue;
        }
        if stale.file_name().is_some_and(|n| !ours.contains(&n)) {
            log::warn!("{}: removing a shard of an earlier run", stale.display());
            match std::fs::remove_file(&stale) {
                // Another part of a split run removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r.map_err(|e| {
                    EmbedError::Config(format!(
                        "{}: cannot remove stale shard: {e}",
                        stale.display()
                    ))
                })?,
            }
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    // Zero rows is never a result: say why (no samples, or every one unreadable). Resumed
    // shards count by their rows: an earlier run that skipped every sample left whole,
    // empty shards, and its re-run reported "embedded 0 images" as a success.
    let empty_resumed = |summary: &EmbedSummary| -> Result<Option<Vec<String>>, EmbedError> {
        let mut skipped = vec![];
        for path in &summary.shards {
            let index = clipcid_store::RowIndex::read(path)?;
            if !index.is_empty() {
                return Ok(None);
            }
            skipped.extend(index.skipped);
        }
        Ok(Some(skipped))
    };
    let nothing = if summary.samples_embedded > 0 || !part.is_whole() {
        None
    } else if summary.shards_resumed == 0 {
        Some(match summary.skipped.first() {
            Some(s) => format!(
                "all {} samples were skipped (first: `{}`: {})",
                summary.skipped.len(),
                s.key,
                s.reason
            ),
            None => "the dataset has no samples".to_string(),
        })
    } else {
        empty_resumed(&summary)?.map(|skipped| match skipped.first() {
            Some(key) => format!(
                "all {} samples were skipped when an earlier run wrote these shards (first: `{key}`; its log says why)",
                skipped.len()
            ),
            None => "the dataset has no samples".to_string(),
        })
    };
    if nothing.is_none() {
        // The data's end, for readers to tell a finished run from one stopped or a shard
        // lost after the last one present. Every part writes the same record.
        clipcid_store::EmbedEnd {
            samples: seen,
            provenance: expect.provenance_json(),
        }
        .write(out_dir)?;
    }
    if let Some(why) = nothing {
        return Err(EmbedError::Config(format!(
            "nothing to embed in {}: {why}",
            match dataset.source() {
                clipcid_data::Source::Captioned { captions } => captions.display().to_string(),
                clipcid_data::Source::Labelled { root } | clipcid_data::Source::Files { root } => {
                    root.display().to_string()
                }
                clipcid_data::Source::WebDataset { shards } => shards
                    .first()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default(),
            }
        )));
    }
    Ok(summary)
}

/// Refuses features with NaN or infinite values (a model that overflows in half precision,
/// or broken weights), naming the batch's first key.
fn check_finite(features: &Tensor, what: &str, first_key: &str) -> Result<(), EmbedError> {
    if clipcid_models::nn::all_finite(features)? {
        Ok(())
    } else {
        Err(EmbedError::Config(format!(
            "the teacher's {what} features are NaN or infinite for the batch starting at `{first_key}` (weights, or overflow at this --precision?)"
        )))
    }
}

fn progress_bar(show: bool, len: Option<usize>) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(n) => (
            indicatif::ProgressBar::new(n as u64),
            "{spinner} embed [{elapsed_precise}] {wide_bar} {pos}/{len} images ({per_sec}, eta {eta})",
        ),
        None => (indicatif::ProgressBar::new_spinner(), "{spinner} embed [{elapsed_precise}] {pos} images ({per_sec})"),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// One tower's output for a batch, on the model's device: the raw features (checked for
/// NaN and infinity when the batch lands) and the rows to store, L2-normalised in f32
/// whatever the model computes in, then cast to the shard's precision.
struct Features {
    raw: Tensor,
    stored: Tensor,
}

/// A batch whose embeddings the device may still be computing. On a GPU the towers' work is
/// queued and returns at once, so the host reads and decodes the next batch meanwhile;
/// [`InFlight::land`] then copies the rows to the host, waiting for the device only there.
/// On the CPU the work is done by the time [`InFlight::start`] returns.
struct InFlight {
    image: Features,
    text: Option<Features>,
    has_text: Vec<u8>,
    ids: Vec<i64>,
    keys: Vec<String>,
    image_digests: Vec<clipcid_store::ImageDigest>,
}

impl InFlight {
    /// Queues `batch`'s towers on the model's device.
    fn start(
        model: &ClipModel,
        tokenizer: Option<&ClipTokenizer>,
        batch: Batch,
        dtype: DType,
    ) -> Result<Self, EmbedError> {
        // The text tower first: it reads the token ids back to the host (each row's pooled
        // position), which waits for the device; after the image tower was queued, that
        // wait would last until the image tower was done.
        let mut has_text = vec![];
        let text = match tokenizer {
            Some(tok) => {
                has_text = batch.captions.iter().map(|c| c.is_some() as u8).collect();
                let ids = tok.encode_batch(&batch.caption_texts(), model.device())?;
                let raw = model.encode_text(&ids)?.to_dtype(DType::F32)?;
                let mask = Tensor::new(
                    has_text.iter().map(|&h| h as f32).collect::<Vec<_>>(),
                    model.device(),
                )?
                .unsqueeze(1)?;
                // A sample without a caption gets a zero row.
                let stored = l2_normalize(&raw)?.broadcast_mul(&mask)?.to_dtype(dtype)?;
                Some(Features { raw, stored })
            }
            None => None,
        };
        let raw = model.encode_image(&batch.pixels)?.to_dtype(DType::F32)?;
        let stored = l2_normalize(&raw)?.to_dtype(dtype)?;
        Ok(Self {
            image: Features { raw, stored },
            text,
            has_text,
            ids: batch.indices.iter().map(|&i| i as i64).collect(),
            keys: batch.keys,
            image_digests: batch.image_digests,
        })
    }

    /// Checks the features and appends the batch's rows to `rows`, in order.
    fn land(self, rows: &mut ShardRows) -> Result<(), EmbedError> {
        let first_key = self.keys.first().map_or("", String::as_str);
        let cpu = candle_core::Device::Cpu;
        check_finite(&self.image.raw, "image", first_key)?;
        if let Some(text) = &self.text {
            check_finite(&text.raw, "text", first_key)?;
        }
        rows.image.push(self.image.stored.to_device(&cpu)?);
        if let Some(text) = self.text {
            rows.text.push(text.stored.to_device(&cpu)?);
            rows.has_text.extend(self.has_text);
        }
        rows.ids.extend(self.ids);
        rows.keys.extend(self.keys);
        rows.image_digests.extend(self.image_digests.concat());
        Ok(())
    }
}

#[derive(Default)]
struct ShardRows {
    image: Vec<Tensor>,
    text: Vec<Tensor>,
    has_text: Vec<u8>,
    ids: Vec<i64>,
    keys: Vec<String>,
    /// [`clipcid_store::IMAGE_DIGEST_BYTES`] per row.
    image_digests: Vec<u8>,
    skipped: Vec<Skipped>,
}

impl ShardRows {
    fn write(
        self,
        path: &Path,
        first: u64,
        end: u64,
        expect: &resume::Expect,
        teacher: &str,
    ) -> Result<(), EmbedError> {
        let n = self.keys.len();
        let dtype = expect.dtype.dtype();
        let cpu = candle_core::Device::Cpu;
        let cat = |v: &[Tensor]| -> Result<Tensor, candle_core::Error> {
            if v.is_empty() {
                Tensor::zeros((0, expect.dim), dtype, &cpu)
            } else {
                Tensor::cat(v, 0)
            }
        };
        let mut tensors = vec![
            ("image".to_string(), cat(&self.image)?),
            ("ids".to_string(), Tensor::from_vec(self.ids, n, &cpu)?),
            (
                clipcid_store::IMAGE_DIGEST_TENSOR.to_string(),
                Tensor::from_vec(
                    self.image_digests,
                    (n, clipcid_store::IMAGE_DIGEST_BYTES),
                    &cpu,
                )?,
            ),
        ];
        if expect.with_text {
            tensors.push(("text".to_string(), cat(&self.text)?));
            tensors.push((
                "has_text".to_string(),
                Tensor::from_vec(self.has_text, n, &cpu)?,
            ));
        }
        let skipped: Vec<&str> = self.skipped.iter().map(|s| s.key.as_str()).collect();
        let meta: HashMap<String, String> = [
            ("clipcid.kind", SHARD_KIND.to_string()),
            ("first_index", first.to_string()),
            ("end_index", end.to_string()),
            ("dim", expect.dim.to_string()),
            ("normalized", "true".to_string()),
            ("teacher", teacher.to_string()),
            ("provenance", expect.provenance_json()),
            (
                clipcid_store::EmbedEnd::SHARD_KEY,
                clipcid_store::EMBED_END_RECORD.to_string(),
            ),
            ("keys", json_list(&self.keys)),
            ("skipped", json_list(&skipped)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        clipcid_store::io::write_safetensors(path, tensors, &meta)?;
        Ok(())
    }
}

fn json_list<S: serde::Serialize>(v: &[S]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}
