//! The training rows: dataset samples joined by id with their teacher embeddings, keep flag
//! and pseudo-label.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{Device, Tensor};
use clipcid_data::{decode_batch, Dataset, Preprocess, SampleIndex, Skipped};
use clipcid_models::ClipTokenizer;
use clipcid_store::{check_same_embeddings, ImageDigests, RowReader, ShardLayout};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{DataConfig, TrainError};

/// Which inputs the enabled loss terms need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// Captions (the student's text tower: CLIP and instance terms).
    pub captions: bool,
    /// Teacher text embeddings (instance term).
    pub teacher_text: bool,
    /// Pseudo-labels and centroids (cluster term).
    pub clusters: bool,
}

/// Everything a distillation run reads, joined by dataset id: for each training row the
/// sample's position in the dataset, the teacher's unit image (and text) embedding, and the
/// k-means pseudo-label. Rows are the kept rows of the keep list (all rows without one);
/// when captions are needed, rows whose sample had no caption are left out.
///
/// Teacher embeddings are not held in memory: each batch reads its rows from the shards by
/// positioned reads ([`RowReader`]), so memory per training row is its dataset position,
/// its shard row and its label (16 bytes), whatever the embedding width; images are read
/// from the dataset per batch through a [`SampleIndex`]. A non-finite embedding is an
/// error naming the shard when its batch reads it, and so is an image whose bytes are not
/// the ones its embedding was made from (the shards' `image_digest`; replaced since
/// `clipcid embed`, though its size is unchanged and the dataset's fingerprint with it).
#[derive(Debug)]
pub struct TrainingSet {
    index: SampleIndex,
    ids: Vec<u64>,
    dim: usize,
    /// Row of each training row in the shards (global position, shard order).
    rows: Vec<u32>,
    teacher_image: Option<RowReader>,
    teacher_text: Option<RowReader>,
    /// Which image bytes each shard row was embedded from, when the shards record it.
    image_digests: Option<ImageDigests>,
    labels: Option<Vec<u32>>,
    centroids: Option<(Vec<f32>, usize)>,
    teacher: String,
    /// The embedding shards' recorded provenance (JSON), when they carry one.
    provenance: Option<String>,
    dropped_without_caption: usize,
}

/// One micro-batch ready for the model.
#[derive(Debug)]
pub struct TrainBatch {
    /// Training rows in the batch (after dropping unreadable images).
    pub rows: Vec<usize>,
    /// Pixels `[B, 3, S, S]`.
    pub pixels: Tensor,
    /// Token ids `[B, L]` when captions are needed.
    pub tokens: Option<Tensor>,
    /// Teacher image embeddings `[B, D]`, unit rows.
    pub teacher_image: Tensor,
    /// Teacher text embeddings `[B, D]`, when present.
    pub teacher_text: Option<Tensor>,
    /// Pseudo-labels, when present.
    pub labels: Vec<u32>,
    /// Samples of the batch whose image could not be read or decoded.
    pub skipped: Vec<Skipped>,
}

impl TrainingSet {
    /// Reads the dataset, every embedding shard in `data.embeddings`, the keep file and the
    /// cluster file, and joins them by dataset id. Missing pieces that `needs` asks for,
    /// ids that do not line up, and non-finite embeddings are errors naming the file.
    pub fn load(data: &DataConfig, needs: Needs) -> Result<Self, TrainError> {
        let file_err = |p: &Path, m: String| TrainError::Input(format!("{}: {m}", p.display()));
        let dataset = Dataset::open(&data.dataset)?;
        if needs.captions && !dataset.has_captions() {
            return Err(file_err(
                &data.dataset,
                "the CLIP and instance loss terms need captions, but this dataset is a labelled folder".into(),
            ));
        }
        let index = dataset.index()?;
        let keep = match &data.keep {
            Some(p) => Some((p, clipcid_store::KeepList::read(p)?)),
            None => None,
        };
        let clusters = match (&data.clusters, needs.clusters) {
            (Some(p), true) => Some((p.clone(), clipcid_store::read_clusters(p)?)),
            (None, true) => {
                return Err(TrainError::Input(
                    "the cluster loss needs data.clusters (a file from `clipcid cluster`)".into(),
                ))
            }
            _ => None,
        };
        let label_of: Option<HashMap<i64, u32>> = clusters.as_ref().map(|(_, c)| {
            c.ids
                .iter()
                .copied()
                .zip(c.labels.iter().copied())
                .collect()
        });

        let Some(embeddings) = &data.embeddings else {
            let mut set = Self::captions_only(index, needs)?;
            set.take_subset(data)?;
            return Ok(set);
        };
        // Headers only: the shards' common width and provenance, two runs mixed refused.
        let layout = ShardLayout::open(std::slice::from_ref(embeddings))?;
        let provenance = layout.provenance.as_deref();
        // The shards' ids are positions in the dataset they were embedded from: the
        // embeddings of another dataset with as many samples joined row by row, and the
        // student learned each image from another image's teacher embedding.
        let recorded_data = provenance
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|v| v.get("data").and_then(|d| d.as_str()).map(str::to_string));
        if let Some(recorded) = recorded_data {
            if !dataset.is_fingerprint(&recorded)? {
                return Err(file_err(
                    embeddings,
                    format!(
                        "these embeddings were made from another dataset than `{}` (data.dataset), \
                         or from its images before some were replaced: its fingerprint differs \
                         from the one the shards record; embed this dataset, or point \
                         data.dataset at the one they were made from",
                        data.dataset.display()
                    ),
                ));
            }
        }
        if let Some((p, list)) = &keep {
            check_same_embeddings(p, "keep file", list.embeddings.as_deref(), provenance)?;
        }
        if let Some((p, c)) = &clusters {
            check_same_embeddings(p, "cluster file", c.embeddings.as_deref(), provenance)?;
        }
        let keep: Option<HashSet<i64>> = keep.map(|(_, list)| list.kept_ids().collect());
        if u32::try_from(layout.total()).is_err() {
            return Err(file_err(
                embeddings,
                format!("{} rows: at most 2^32 per run", layout.total()),
            ));
        }
        let mut set = Self {
            index,
            ids: vec![],
            dim: 0,
            rows: vec![],
            teacher_image: None,
            teacher_text: None,
            image_digests: None,
            labels: clusters.as_ref().map(|_| Vec::new()),
            centroids: None,
            teacher: layout.teacher.clone().unwrap_or_default(),
            provenance: layout.provenance.clone(),
            dropped_without_caption: 0,
        };
        set.dim = layout.dim;
        // Shards are read one at a time for their ids and caption flags; the embeddings
        // themselves are read per batch.
        let mut first_row = 0usize;
        for (i, path) in layout.shards.iter().enumerate() {
            let start = first_row;
            first_row += layout.counts[i];
            if layout.counts[i] == 0 {
                continue;
            }
            // Ids and caption flags only, from where the layout found them: the keys are read
            // (with the header) only for an error that names one.
            let shard = layout.row_ids_of(i)?;
            if needs.teacher_text && !shard.has_text_tensor {
                return Err(file_err(
                    path,
                    "the instance loss needs teacher text embeddings, but this shard has none (embed with a tokenizer)".into(),
                ));
            }
            for r in 0..shard.len() {
                let kept = keep.as_ref().is_none_or(|k| k.contains(&shard.ids[r]));
                if !kept {
                    continue;
                }
                if needs.captions && !shard.has_text[r] {
                    set.dropped_without_caption += 1;
                    continue;
                }
                let id = shard.ids[r];
                let pos = u64::try_from(id)
                    .ok()
                    .filter(|&p| (p as usize) < set.index.len())
                    .ok_or_else(|| {
                        file_err(
                            path,
                            format!(
                                "row {r} names sample {id}, but the dataset `{}` has {} samples (embeddings from another dataset?)",
                                data.dataset.display(),
                                set.index.len()
                            ),
                        )
                    })?;
                set.ids.push(pos);
                // Below 2^32: checked against the layout's total above.
                set.rows.push((start + r) as u32);
                if let (Some(out), Some(map), Some((cpath, _))) =
                    (set.labels.as_mut(), &label_of, &clusters)
                {
                    let Some(label) = map.get(&id) else {
                        // The key where the shard's keys can be read, else the row.
                        let key = clipcid_store::RowIndex::read(path)
                            .ok()
                            .and_then(|index| index.keys.get(r).map(|k| format!("`{k}`")))
                            .unwrap_or_else(|| format!("row {r} of {}", path.display()));
                        return Err(file_err(
                            cpath,
                            format!("no pseudo-label for sample {id} ({key}): the cluster file is from another keep list or embedding run"),
                        ));
                    };
                    out.push(*label);
                }
            }
        }
        if set.ids.is_empty() {
            return Err(file_err(
                embeddings,
                "no training rows (every row was dropped by the keep list or lacked a caption)"
                    .into(),
            ));
        }
        let positions: Vec<i64> = set.ids.iter().map(|&p| p as i64).collect();
        if let Some(dup) = clipcid_store::first_duplicate(&positions) {
            return Err(file_err(
                embeddings,
                format!(
                    "sample {dup} has rows in two shards (shards of two runs mixed in one folder?); re-embed into an empty folder"
                ),
            ));
        }
        if needs.teacher_text {
            set.teacher_text = Some(RowReader::open_tensor(layout.clone(), "text")?);
        }
        let digests = ImageDigests::open(&layout)?;
        set.image_digests = digests.any().then_some(digests);
        set.teacher_image = Some(RowReader::open(layout)?);
        if let Some((cpath, c)) = clusters {
            if c.dim != set.dim {
                return Err(file_err(
                    &cpath,
                    format!(
                        "centroids are {} wide but the embeddings are {}",
                        c.dim, set.dim
                    ),
                ));
            }
            set.centroids = Some((c.centroids, c.k));
        }
        set.take_subset(data)?;
        Ok(set)
    }

    /// Keeps `data.subset` rows drawn with `data.subset_seed` (in their dataset order), or
    /// every row without a subset.
    fn take_subset(&mut self, data: &DataConfig) -> Result<(), TrainError> {
        let Some(n) = data.subset else {
            return Ok(());
        };
        if n > self.ids.len() {
            return Err(TrainError::Config(format!(
                "data.subset asks for {n} rows but `{}` has {} training rows{}",
                data.dataset.display(),
                self.ids.len(),
                if data.keep.is_some() {
                    " after the keep list"
                } else {
                    ""
                }
            )));
        }
        let mut chosen: Vec<usize> = (0..self.ids.len()).collect();
        chosen.shuffle(&mut ChaCha8Rng::seed_from_u64(data.subset_seed));
        chosen.truncate(n);
        chosen.sort_unstable();
        fn pick<T: Copy>(v: &mut Vec<T>, chosen: &[usize]) {
            // A captions-only set has no embedding rows.
            if !v.is_empty() {
                *v = chosen.iter().map(|&i| v[i]).collect();
            }
        }
        pick(&mut self.ids, &chosen);
        pick(&mut self.rows, &chosen);
        if let Some(labels) = self.labels.as_mut() {
            pick(labels, &chosen);
        }
        Ok(())
    }

    /// Every captioned sample, without teacher embeddings (a CLIP-only run).
    fn captions_only(index: SampleIndex, needs: Needs) -> Result<Self, TrainError> {
        if needs.teacher_text || needs.clusters {
            return Err(TrainError::Input(
                "data.embeddings is required by the cluster and instance loss terms".into(),
            ));
        }
        let mut ids = Vec::with_capacity(index.len());
        let mut stream = index.dataset().samples()?;
        let mut dropped = 0;
        for s in stream.by_ref() {
            let s = s?;
            if s.caption.is_some() {
                ids.push(s.index);
            } else {
                dropped += 1;
            }
        }
        if ids.is_empty() {
            return Err(TrainError::Input(
                "the dataset has no captioned sample".into(),
            ));
        }
        Ok(Self {
            index,
            ids,
            dim: 0,
            rows: vec![],
            teacher_image: None,
            teacher_text: None,
            image_digests: None,
            labels: None,
            centroids: None,
            teacher: String::new(),
            provenance: None,
            dropped_without_caption: dropped,
        })
    }

    /// Number of training rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there is no row.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Width of the teacher embeddings (0 without them).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The teacher's name as the embedding shards record it.
    pub fn teacher(&self) -> &str {
        &self.teacher
    }

    /// What produced the teacher embeddings, as their shards record it (JSON: teacher and
    /// dataset SHA-256, tokenizer, preprocessing, ...), when they do.
    pub fn provenance(&self) -> Option<&str> {
        self.provenance.as_deref()
    }

    /// Rows left out because their sample had no caption.
    pub fn dropped_without_caption(&self) -> usize {
        self.dropped_without_caption
    }

    /// Dataset position of each row.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// SHA-256 (hex) of the training rows' dataset positions in order, as little-endian
    /// `u64`: which rows the run trains on (after the keep list, captions and `data.subset`).
    /// A checkpoint records it so that a resume over other rows is refused.
    pub fn ids_digest(&self) -> String {
        clipcid_store::sha256_hex(self.ids.iter().map(|i| i.to_le_bytes()))
    }

    /// SHA-256 (hex) of the rows' pseudo-labels in order, as little-endian `u32`, when a
    /// cluster file was read: a resume with another clustering is refused.
    pub fn labels_digest(&self) -> Option<String> {
        self.labels
            .as_ref()
            .map(|l| clipcid_store::sha256_hex(l.iter().map(|v| v.to_le_bytes())))
    }

    /// Number of clusters, when a cluster file was read.
    pub fn num_clusters(&self) -> Option<usize> {
        self.centroids.as_ref().map(|(_, k)| *k)
    }

    /// Pseudo-label of each row, when a cluster file was read.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// Teacher image embeddings of training rows `rows`, row-major `[rows.len(), dim]`,
    /// unit rows, read from the shards (empty without embeddings).
    pub fn teacher_image(&self, rows: &[usize]) -> Result<Vec<f32>, TrainError> {
        self.read_rows(self.teacher_image.as_ref(), rows)
    }

    fn read_rows(&self, src: Option<&RowReader>, rows: &[usize]) -> Result<Vec<f32>, TrainError> {
        let Some(src) = src else {
            return Ok(vec![]);
        };
        let at: Vec<u32> = rows.iter().map(|&r| self.rows[r]).collect();
        Ok(src.gather(&at)?)
    }

    /// Refuses a batch whose image bytes (`decoded`, one digest per row of `rows`) are not
    /// those the rows' teacher embeddings were made from.
    fn check_image_digests(
        &self,
        rows: &[usize],
        decoded: &[clipcid_store::ImageDigest],
        keys: &[String],
    ) -> Result<(), TrainError> {
        let Some(digests) = &self.image_digests else {
            return Ok(());
        };
        let at: Vec<u32> = rows.iter().map(|&r| self.rows[r]).collect();
        let recorded = digests.gather(&at)?;
        for (k, (recorded, decoded)) in recorded.iter().zip(decoded).enumerate() {
            if recorded.is_some_and(|r| r != *decoded) {
                let shard = digests.shard_of(at[k]).unwrap_or(Path::new("?"));
                return Err(TrainError::Input(format!(
                    "{}: image `{}` is not the one this shard embedded (its bytes differ from \
                     the digest recorded there): the image was replaced after `clipcid embed`, \
                     so its teacher embedding is another image's; embed the dataset again (into \
                     an empty folder, or remove this shard and re-run the same embed)",
                    shard.display(),
                    keys[k]
                )));
            }
        }
        Ok(())
    }

    /// The centroids `[K, D]` on `device`.
    pub fn centroids(&self, device: &Device) -> Result<Option<Tensor>, TrainError> {
        Ok(match &self.centroids {
            Some((c, k)) => Some(Tensor::from_slice(c, (*k, self.dim), device)?),
            None => None,
        })
    }

    fn gather(
        &self,
        src: &RowReader,
        rows: &[usize],
        device: &Device,
    ) -> Result<Tensor, TrainError> {
        let values = self.read_rows(Some(src), rows)?;
        Ok(Tensor::from_vec(values, (rows.len(), self.dim), device)?)
    }

    /// Reads, decodes (in parallel) and assembles the rows `rows`. Samples whose image is
    /// unreadable are dropped from the batch and listed in `skipped`. An image whose bytes
    /// are not those its shard row was embedded from is an error naming the shard and the
    /// sample.
    pub fn batch(
        &self,
        rows: &[usize],
        preprocess: &Preprocess,
        tokenizer: Option<&ClipTokenizer>,
        device: &Device,
    ) -> Result<TrainBatch, TrainError> {
        let samples = rows
            .iter()
            .map(|&r| self.index.get(self.ids[r]))
            .collect::<Result<Vec<_>, _>>()?;
        let (batch, skipped) = decode_batch(samples, preprocess, device)?;
        let Some(batch) = batch else {
            return Err(TrainError::Input(format!(
                "every image of a batch failed to decode (first: `{}`: {})",
                skipped.first().map(|s| s.key.as_str()).unwrap_or(""),
                skipped.first().map(|s| s.reason.as_str()).unwrap_or("")
            )));
        };
        // decode_batch keeps order, so the surviving rows are those not skipped.
        let gone: HashSet<u64> = skipped.iter().map(|s| s.index).collect();
        let rows: Vec<usize> = rows
            .iter()
            .copied()
            .filter(|&r| !gone.contains(&self.ids[r]))
            .collect();
        self.check_image_digests(&rows, &batch.image_digests, &batch.keys)?;
        let tokens = match tokenizer {
            Some(tok) => Some(tok.encode_batch(&batch.caption_texts(), device)?),
            None => None,
        };
        Ok(TrainBatch {
            teacher_image: match &self.teacher_image {
                Some(src) => self.gather(src, &rows, device)?,
                None => Tensor::zeros((rows.len(), 0), candle_core::DType::F32, device)?,
            },
            teacher_text: match &self.teacher_text {
                Some(t) => Some(self.gather(t, &rows, device)?),
                None => None,
            },
            labels: match &self.labels {
                Some(l) => rows.iter().map(|&r| l[r]).collect(),
                None => vec![],
            },
            rows,
            pixels: batch.pixels,
            tokens,
            skipped,
        })
    }
}
