//! Streaming over embedding shards (train on a sample, assign shard by shard) and the
//! cluster file.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clipcid_dedup::KeepList;
use clipcid_embed::EmbeddingShard;

use crate::{Centroids, ClusterError, ClusterSummary, KMeans};

/// The rows k-means runs over: embedding shards in order and, with a keep file from
/// `clipcid balance`, which of their rows survive. Only headers are read here; rows are read
/// a shard at a time by [`train_from_shards`] and [`assign_shards`].
#[derive(Debug, Clone)]
pub struct ShardRows {
    /// Shards in order.
    pub shards: Vec<PathBuf>,
    /// Rows in each shard.
    pub counts: Vec<usize>,
    /// Embedding width.
    pub dim: usize,
    /// The keep list (`None`: every row is kept).
    pub keep: Option<KeepList>,
    /// Where the keep list came from.
    pub keep_path: Option<PathBuf>,
}

impl ShardRows {
    /// Lists the shards (folders of `embeddings-*.safetensors`, or single files), checks that
    /// every `image` tensor has the same width, and that the keep list, if any, covers
    /// exactly their rows.
    pub fn open(inputs: &[PathBuf], keep_path: Option<&Path>) -> Result<Self, ClusterError> {
        let shards = clipcid_embed::expand_shard_inputs(inputs)?;
        let mut counts = Vec::with_capacity(shards.len());
        let mut width: Option<(usize, &Path)> = None;
        for path in &shards {
            let header = clipcid_models::io::read_header(path)?;
            let info = header.tensors.get("image").ok_or_else(|| {
                ClusterError::Config(format!("{}: no `image` tensor", path.display()))
            })?;
            let [n, d] = info.shape[..] else {
                return Err(ClusterError::Config(format!(
                    "{}: `image` must be [n, D], found {:?}",
                    path.display(),
                    info.shape
                )));
            };
            match width {
                Some((w, first)) if w != d && n > 0 => {
                    return Err(ClusterError::Config(format!(
                        "{}: embeddings are {d} wide but {} has {w}",
                        path.display(),
                        first.display()
                    )))
                }
                None if n > 0 => width = Some((d, path)),
                _ => {}
            }
            counts.push(n);
        }
        let Some((dim, _)) = width else {
            return Err(ClusterError::Config(
                "the embedding shards hold no rows".into(),
            ));
        };
        let total: usize = counts.iter().sum();
        let keep = match keep_path {
            Some(path) => {
                let list = KeepList::read(path)?;
                if list.keep.len() != total {
                    return Err(ClusterError::Config(format!(
                        "{}: keep list covers {} rows but the shards hold {total} (was it made from other embeddings?)",
                        path.display(),
                        list.keep.len()
                    )));
                }
                Some(list)
            }
            None => None,
        };
        Ok(Self {
            shards,
            counts,
            dim,
            keep,
            keep_path: keep_path.map(Path::to_path_buf),
        })
    }

    /// Rows in all shards.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Rows that are kept (and clustered).
    pub fn kept(&self) -> usize {
        match &self.keep {
            Some(k) => k.kept(),
            None => self.total(),
        }
    }

    /// Calls `f(shard, kept_offset, kept_rows)` for every shard: the kept rows, normalised,
    /// as `(ids, values)`, and the index of the first of them among all kept rows. Checks the
    /// keep list's ids against the shard's and rejects non-finite values, naming the file.
    fn for_each_shard(
        &self,
        mut f: impl FnMut(&Path, usize, &[i64], &[f32]) -> Result<(), ClusterError>,
    ) -> Result<(), ClusterError> {
        let mut row = 0usize;
        let mut kept = 0usize;
        for (path, &count) in self.shards.iter().zip(&self.counts) {
            if count == 0 {
                continue;
            }
            let shard = EmbeddingShard::read(path)?;
            let d = shard.dim();
            if shard.len() != count || d != self.dim {
                return Err(ClusterError::Config(format!(
                    "{}: changed while being read ({} x {d}, expected {count} x {})",
                    path.display(),
                    shard.len(),
                    self.dim
                )));
            }
            let keep = self.keep.as_ref();
            if let Some(list) = keep {
                if let Some(r) = (0..count).find(|&r| list.ids[row + r] != shard.ids[r]) {
                    return Err(ClusterError::Config(format!(
                        "{}: row {r} has id {} but the keep list{} has id {} there",
                        path.display(),
                        shard.ids[r],
                        self.keep_path
                            .as_ref()
                            .map(|p| format!(" {}", p.display()))
                            .unwrap_or_default(),
                        list.ids[row + r]
                    )));
                }
            }
            let kept_here = |r: usize| keep.is_none_or(|list| list.keep[row + r]);
            let rows = shard.unit_image_rows(kept_here)?;
            let ids: Vec<i64> = (0..count)
                .filter(|&r| kept_here(r))
                .map(|r| shard.ids[r])
                .collect();
            f(path, kept, &ids, &rows)?;
            kept += ids.len();
            row += count;
        }
        Ok(())
    }
}

/// Trains `kmeans` on the kept rows of the shards, reading only its training sample
/// ([`KMeans::training_rows`] over the kept rows) into memory, so embeddings larger than
/// RAM can be clustered.
pub fn train_from_shards(kmeans: &KMeans, rows: &ShardRows) -> Result<Centroids, ClusterError> {
    let kept = rows.kept();
    if kmeans.k() > kept {
        return Err(ClusterError::Config(format!(
            "K = {} is larger than the number of kept embeddings ({kept})",
            kmeans.k()
        )));
    }
    let sample = kmeans.training_rows(kept);
    let d = rows.dim;
    let mut buf = Vec::with_capacity(sample.len() * d);
    let mut next = 0usize;
    rows.for_each_shard(|_, offset, ids, values| {
        while next < sample.len() && sample[next] < offset + ids.len() {
            let r = sample[next] - offset;
            buf.extend_from_slice(&values[r * d..(r + 1) * d]);
            next += 1;
        }
        Ok(())
    })?;
    kmeans.train_sample(&buf, d)
}

/// The nearest centroid of every kept row, shard by shard, and the rows' dataset ids.
/// `on_shard(rows_done)` is called after each shard (for progress).
pub fn assign_shards(
    centroids: &Centroids,
    rows: &ShardRows,
    mut on_shard: impl FnMut(usize),
) -> Result<(Vec<u32>, Vec<i64>), ClusterError> {
    if centroids.dim() != rows.dim {
        return Err(ClusterError::Config(format!(
            "centroids are {} wide but the embeddings are {}",
            centroids.dim(),
            rows.dim
        )));
    }
    let mut assigner = centroids.assigner()?;
    let mut labels = Vec::with_capacity(rows.kept());
    let mut all_ids = Vec::with_capacity(rows.kept());
    rows.for_each_shard(|_, _, ids, values| {
        labels.extend(assigner.assign(values)?);
        all_ids.extend_from_slice(ids);
        on_shard(all_ids.len());
        Ok(())
    })?;
    Ok((labels, all_ids))
}

/// The whole stage: trains `kmeans` on (a sample of) the kept rows, assigns every kept row
/// shard by shard, and gathers centroids, labels, sizes and a summary. With `progress`, a
/// bar over assigned rows is shown.
pub fn cluster_shards(
    kmeans: &KMeans,
    rows: &ShardRows,
    progress: bool,
) -> Result<ClusterFile, ClusterError> {
    let centroids = train_from_shards(kmeans, rows)?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(rows.kept() as u64);
        if let Ok(s) = indicatif::ProgressStyle::with_template(
            "{spinner} assign [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, eta {eta})",
        ) {
            b.set_style(s);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let start = std::time::Instant::now();
    let (labels, ids) = assign_shards(&centroids, rows, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds_assign = start.elapsed().as_secs_f64();
    let sizes = crate::cluster_sizes(&labels, centroids.k());
    let summary = ClusterSummary {
        dim: rows.dim,
        iterations: kmeans.get_iterations(),
        seed: kmeans.get_seed(),
        spherical: centroids.is_spherical(),
        init: kmeans.get_init(),
        trained_on: centroids.trained_on,
        objective: centroids.objective,
        imbalance_factor: centroids.imbalance_factor,
        sizes: crate::SizeSummary::of(&sizes),
        seconds_train: centroids.seconds_train,
        seconds_assign,
    };
    Ok(ClusterFile {
        centroids: centroids.normalized(),
        k: centroids.k(),
        dim: rows.dim,
        labels,
        ids,
        sizes,
        summary,
    })
}

/// Everything a cluster file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterFile {
    /// Normalised centroids, row-major `[k, dim]`.
    pub centroids: Vec<f32>,
    /// Number of centroids.
    pub k: usize,
    /// Width.
    pub dim: usize,
    /// Pseudo-label of each kept row, in shard order (aligned with the keep list's kept rows).
    pub labels: Vec<u32>,
    /// Dataset id of each labelled row.
    pub ids: Vec<i64>,
    /// Rows per cluster.
    pub sizes: Vec<u32>,
    /// Options, size statistics and timings.
    pub summary: ClusterSummary,
}

impl ClusterFile {
    /// The centroids as a `[k, dim]` tensor.
    pub fn centroids_tensor(&self, device: &Device) -> Result<Tensor, ClusterError> {
        Ok(Tensor::from_vec(
            self.centroids.clone(),
            (self.k, self.dim),
            device,
        )?)
    }
}

/// Writes a cluster file atomically: `centroids` f32 `[K, D]`, `labels` u32 `[n]`, `ids` i64
/// `[n]`, `sizes` u32 `[K]`; metadata `summary` (JSON), also written beside it as
/// `<name>.json`.
pub fn write_clusters(path: &Path, file: &ClusterFile) -> Result<(), ClusterError> {
    let cpu = Device::Cpu;
    if file.labels.len() != file.ids.len() || file.sizes.len() != file.k {
        return Err(ClusterError::Config(format!(
            "{}: {} labels, {} ids, {} sizes for {} clusters",
            path.display(),
            file.labels.len(),
            file.ids.len(),
            file.sizes.len(),
            file.k
        )));
    }
    let n = file.labels.len();
    let tensors = vec![
        ("centroids".to_string(), file.centroids_tensor(&cpu)?),
        (
            "labels".to_string(),
            Tensor::from_vec(file.labels.clone(), n, &cpu)?,
        ),
        (
            "ids".to_string(),
            Tensor::from_vec(file.ids.clone(), n, &cpu)?,
        ),
        (
            "sizes".to_string(),
            Tensor::from_vec(file.sizes.clone(), file.k, &cpu)?,
        ),
    ];
    clipcid_models::io::write_with_summary(path, tensors, "clusters", &file.summary)?;
    Ok(())
}

/// Reads a cluster file written by [`write_clusters`], checking names, shapes and that every
/// label is below `K`.
pub fn read_clusters(path: &Path) -> Result<ClusterFile, ClusterError> {
    let bad = |msg: String| ClusterError::Config(format!("{}: {msg}", path.display()));
    let header = clipcid_models::io::read_header(path)?;
    let mut t = clipcid_models::io::load_tensors(path)?;
    let mut take = |name: &str| {
        t.remove(name)
            .ok_or_else(|| bad(format!("no `{name}` tensor (not a cluster file?)")))
    };
    let centroids = take("centroids")?;
    let (k, dim) = centroids.dims2().map_err(|_| {
        bad(format!(
            "`centroids` must be [K, D], found {:?}",
            centroids.dims()
        ))
    })?;
    let centroids: Vec<f32> = centroids
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let labels: Vec<u32> = take("labels")?
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1()?;
    let ids: Vec<i64> = take("ids")?
        .flatten_all()?
        .to_dtype(candle_core::DType::I64)?
        .to_vec1()?;
    let sizes: Vec<u32> = take("sizes")?
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1()?;
    if labels.len() != ids.len() || sizes.len() != k {
        return Err(bad(format!(
            "{} labels, {} ids and {} sizes for {k} clusters",
            labels.len(),
            ids.len(),
            sizes.len()
        )));
    }
    if let Some(l) = labels.iter().find(|&&l| l as usize >= k) {
        return Err(bad(format!("label {l} is not below K = {k}")));
    }
    if centroids.iter().any(|v| !v.is_finite()) {
        return Err(bad("non-finite value in `centroids`".into()));
    }
    let summary = match header.metadata.get("summary") {
        Some(s) => {
            serde_json::from_str(s).map_err(|e| bad(format!("bad `summary` metadata: {e}")))?
        }
        None => ClusterSummary::default(),
    };
    Ok(ClusterFile {
        centroids,
        k,
        dim,
        labels,
        ids,
        sizes,
        summary,
    })
}
