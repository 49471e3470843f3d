//! Streaming over embedding shards: train on a sample, assign shard by shard.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clipcid_store::{KeepList, ShardLayout};

use crate::{Centroids, ClusterError, ClusterFile, ClusterSummary, KMeans};

/// The rows k-means runs over: embedding shards in order and, with a keep file from
/// `clipcid balance`, which of their rows survive. Only headers are read here; rows are read
/// a shard at a time by [`train_from_shards`] and [`assign_shards`].
#[derive(Debug, Clone)]
pub struct ShardRows {
    /// The shards, their row counts and their common width.
    pub layout: ShardLayout,
    /// The keep list (`None`: every row is kept).
    pub keep: Option<KeepList>,
    /// Where the keep list came from.
    pub keep_path: Option<PathBuf>,
    /// Where [`assign_shards`] labels the rows: the CPU (faiss) by default, or a GPU
    /// ([`Centroids::device_assigner`](crate::Centroids::device_assigner)); see
    /// [`ShardRows::on_device`].
    pub device: Device,
}

impl ShardRows {
    /// Lists the shards (folders of `embeddings-*.safetensors`, or single files), checks that
    /// every `image` tensor has the same width ([`ShardLayout`]), and that the keep list, if
    /// any, was made from these embeddings (same recorded provenance,
    /// [`clipcid_store::check_same_embeddings`]) and covers exactly their rows.
    pub fn open(inputs: &[PathBuf], keep_path: Option<&Path>) -> Result<Self, ClusterError> {
        let layout = ShardLayout::open(inputs)?;
        let total = layout.total();
        let keep = match keep_path {
            Some(path) => {
                let list = KeepList::read(path)?;
                clipcid_store::check_same_embeddings(
                    path,
                    "keep file",
                    list.embeddings.as_deref(),
                    layout.provenance.as_deref(),
                )?;
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
            layout,
            keep,
            keep_path: keep_path.map(Path::to_path_buf),
            device: Device::Cpu,
        })
    }

    /// Assign rows on `device` (a run's `cuda:N`), by matrix products there.
    pub fn on_device(mut self, device: &Device) -> Self {
        self.device = device.clone();
        self
    }

    /// Rows in all shards.
    pub fn total(&self) -> usize {
        self.layout.total()
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.layout.dim
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
        for (i, (path, &count)) in self
            .layout
            .shards
            .iter()
            .zip(&self.layout.counts)
            .enumerate()
        {
            if count == 0 {
                continue;
            }
            let shard = self.layout.read(i)?;
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
    kmeans.check_options()?;
    let kept = rows.kept();
    if kmeans.k() > kept {
        return Err(ClusterError::Config(format!(
            "K = {} is larger than the number of kept embeddings ({kept})",
            kmeans.k()
        )));
    }
    let sample = kmeans.training_rows(kept);
    let d = rows.dim();
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
    if centroids.dim() != rows.dim() {
        return Err(ClusterError::Config(format!(
            "centroids are {} wide but the embeddings are {}",
            centroids.dim(),
            rows.dim()
        )));
    }
    // faiss on the CPU; a candle matrix product on any other device.
    enum Where {
        Faiss(crate::Assigner),
        Device(crate::DeviceAssigner),
    }
    let mut assigner = if rows.device.is_cpu() {
        Where::Faiss(centroids.assigner()?)
    } else {
        Where::Device(centroids.device_assigner(&rows.device)?)
    };
    let mut labels = Vec::with_capacity(rows.kept());
    let mut all_ids = Vec::with_capacity(rows.kept());
    rows.for_each_shard(|_, _, ids, values| {
        labels.extend(match &mut assigner {
            Where::Faiss(a) => a.assign(values)?,
            Where::Device(a) => a.assign(values)?,
        });
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
        dim: rows.dim(),
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
        dim: rows.dim(),
        labels,
        ids,
        sizes,
        summary,
        embeddings: rows.layout.provenance.clone(),
    })
}
