//! The training rows: dataset samples joined by id with their teacher embeddings, keep flag
//! and pseudo-label.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{Device, Tensor};
use clipcid_data::{decode_batch, Dataset, Preprocess, SampleIndex, Skipped};
use clipcid_models::ClipTokenizer;
use clipcid_store::{check_same_embeddings, ShardLayout};

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
/// Teacher embeddings are held in memory as f32 (`N * D * 4` bytes: 2 GB for 1M rows of
/// 512); images are read from the dataset per batch through a [`SampleIndex`].
#[derive(Debug)]
pub struct TrainingSet {
    index: SampleIndex,
    ids: Vec<u64>,
    dim: usize,
    teacher_image: Vec<f32>,
    teacher_text: Option<Vec<f32>>,
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

fn unit_rows(values: Vec<f32>, d: usize) -> Vec<f32> {
    let mut v = values;
    for row in v.chunks_exact_mut(d.max(1)) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
    v
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
            return Self::captions_only(index, needs);
        };
        // Headers only: the shards' common width and provenance, two runs mixed refused.
        let layout = ShardLayout::open(std::slice::from_ref(embeddings))?;
        let provenance = layout.provenance.as_deref();
        if let Some((p, list)) = &keep {
            check_same_embeddings(p, "keep file", list.embeddings.as_deref(), provenance)?;
        }
        if let Some((p, c)) = &clusters {
            check_same_embeddings(p, "cluster file", c.embeddings.as_deref(), provenance)?;
        }
        let keep: Option<HashSet<i64>> = keep.map(|(_, list)| list.kept_ids().collect());
        let mut set = Self {
            index,
            ids: vec![],
            dim: 0,
            teacher_image: vec![],
            teacher_text: needs.teacher_text.then(Vec::new),
            labels: clusters.as_ref().map(|_| Vec::new()),
            centroids: None,
            teacher: clipcid_store::io::read_header(&layout.shards[0])?
                .metadata
                .remove("teacher")
                .unwrap_or_default(),
            provenance: layout.provenance.clone(),
            dropped_without_caption: 0,
        };
        set.dim = layout.dim;
        for (i, path) in layout.shards.iter().enumerate() {
            if layout.counts[i] == 0 {
                continue;
            }
            let shard = layout.read(i)?;
            let d = shard.dim();
            if needs.teacher_text && shard.text.is_none() {
                return Err(file_err(
                    path,
                    "the instance loss needs teacher text embeddings, but this shard has none (embed with a tokenizer)".into(),
                ));
            }
            let select = |r: usize| {
                keep.as_ref().is_none_or(|k| k.contains(&shard.ids[r]))
                    && (!needs.captions || shard.has_text[r])
            };
            let image = shard.unit_image_rows(select)?;
            let text: Option<Vec<f32>> = match (&shard.text, needs.teacher_text) {
                (Some(t), true) => Some(t.flatten_all()?.to_vec1()?),
                _ => None,
            };
            set.teacher_image.extend(image);
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
                if let (Some(out), Some(t)) = (set.teacher_text.as_mut(), &text) {
                    let row = &t[r * d..(r + 1) * d];
                    if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
                        return Err(file_err(
                            path,
                            format!(
                                "non-finite value {bad} in text row {r} (sample `{}`)",
                                shard.keys[r]
                            ),
                        ));
                    }
                    out.extend_from_slice(row);
                }
                if let (Some(out), Some(map), Some((cpath, _))) =
                    (set.labels.as_mut(), &label_of, &clusters)
                {
                    let label = map.get(&id).ok_or_else(|| {
                        file_err(
                            cpath,
                            format!("no pseudo-label for sample {id} (`{}`): the cluster file is from another keep list or embedding run", shard.keys[r]),
                        )
                    })?;
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
        if let Some(t) = set.teacher_text.take() {
            set.teacher_text = Some(unit_rows(t, set.dim));
        }
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
        Ok(set)
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
            teacher_image: vec![],
            teacher_text: None,
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

    /// Number of clusters, when a cluster file was read.
    pub fn num_clusters(&self) -> Option<usize> {
        self.centroids.as_ref().map(|(_, k)| *k)
    }

    /// Pseudo-label of each row, when a cluster file was read.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// Teacher image embeddings, row-major `[len, dim]`, unit rows.
    pub fn teacher_image(&self) -> &[f32] {
        &self.teacher_image
    }

    /// The centroids `[K, D]` on `device`.
    pub fn centroids(&self, device: &Device) -> Result<Option<Tensor>, TrainError> {
        Ok(match &self.centroids {
            Some((c, k)) => Some(Tensor::from_slice(c, (*k, self.dim), device)?),
            None => None,
        })
    }

    fn gather(&self, src: &[f32], rows: &[usize], device: &Device) -> Result<Tensor, TrainError> {
        let d = self.dim;
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            out.extend_from_slice(&src[r * d..(r + 1) * d]);
        }
        Ok(Tensor::from_vec(out, (rows.len(), d), device)?)
    }

    /// Reads, decodes (in parallel) and assembles the rows `rows`. Samples whose image is
    /// unreadable are dropped from the batch and listed in `skipped`.
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
        let tokens = match tokenizer {
            Some(tok) => {
                let texts: Vec<&str> = batch
                    .captions
                    .iter()
                    .map(|c| c.as_deref().unwrap_or(""))
                    .collect();
                Some(tok.encode_batch(&texts, device)?)
            }
            None => None,
        };
        Ok(TrainBatch {
            teacher_image: if self.dim == 0 {
                Tensor::zeros((rows.len(), 0), candle_core::DType::F32, device)?
            } else {
                self.gather(&self.teacher_image, &rows, device)?
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
