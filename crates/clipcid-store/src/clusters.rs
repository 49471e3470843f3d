//! The cluster file written by `clipcid cluster`: normalised centroids, a pseudo-label and
//! dataset id per kept row, cluster sizes, and the run's summary.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Value of the `clipcid.kind` metadata key in cluster files.
pub const CLUSTERS_KIND: &str = "clusters";

/// How the centroids are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KMeansInit {
    /// faiss's own: `K` distinct training points chosen at random (seeded). What
    /// `faiss.Kmeans` does; cheap at any `K`.
    #[default]
    Random,
    /// Greedy k-means++ (seeded), computed here and handed to faiss as the initial
    /// centroids. Each of the `K` seeds costs `2 + ln K` passes over the training sample
    /// (`O(n K D log K)` in all, single-vector products rather than BLAS), so it is meant
    /// for small `K` and well-separated data.
    PlusPlus,
}

impl std::str::FromStr for KMeansInit {
    type Err = StoreError;

    /// `random` or `kmeans++` (also `plus-plus`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Self::Random),
            "kmeans++" | "k-means++" | "plus-plus" => Ok(Self::PlusPlus),
            _ => Err(StoreError::Invalid(format!(
                "unknown k-means init `{s}`: use `random` or `kmeans++`"
            ))),
        }
    }
}

/// Cluster-size statistics: what the paper's Figure 2d compares before and after balancing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SizeSummary {
    /// Clusters.
    pub k: usize,
    /// Points.
    pub n: usize,
    /// Clusters with no point.
    pub empty: usize,
    /// Smallest cluster.
    pub min: u32,
    /// Median cluster size (lower median).
    pub median: u32,
    /// Largest cluster.
    pub max: u32,
}

impl SizeSummary {
    /// Statistics of these cluster sizes.
    pub fn of(sizes: &[u32]) -> Self {
        let mut s = sizes.to_vec();
        s.sort_unstable();
        Self {
            k: s.len(),
            n: s.iter().map(|&v| v as usize).sum(),
            empty: s.iter().filter(|&&v| v == 0).count(),
            min: s.first().copied().unwrap_or(0),
            median: s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or(0),
            max: s.last().copied().unwrap_or(0),
        }
    }
}

/// What a clustering run did: options, sizes and timings (written as JSON beside the file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// Embedding width.
    pub dim: usize,
    /// Iterations per run.
    pub iterations: usize,
    /// Seed.
    pub seed: u32,
    /// Spherical k-means?
    pub spherical: bool,
    /// Initialisation.
    pub init: KMeansInit,
    /// Rows k-means was trained on (a sample when there were more than
    /// `max_points_per_centroid * K`).
    pub trained_on: usize,
    /// Final faiss objective.
    pub objective: f32,
    /// Final faiss imbalance factor.
    pub imbalance_factor: f64,
    /// Cluster sizes over all assigned rows.
    pub sizes: SizeSummary,
    /// Seconds training.
    pub seconds_train: f64,
    /// Seconds assigning.
    pub seconds_assign: f64,
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
    /// Provenance of the embeddings clustered, as their shards record it (absent when they
    /// record none); see [`check_same_embeddings`](crate::check_same_embeddings).
    pub embeddings: Option<String>,
}

impl ClusterFile {
    /// The centroids as a `[k, dim]` tensor.
    pub fn centroids_tensor(&self, device: &Device) -> Result<Tensor, StoreError> {
        Ok(Tensor::from_vec(
            self.centroids.clone(),
            (self.k, self.dim),
            device,
        )?)
    }
}

/// Points per cluster: how many of `labels` name each of the `k` clusters (labels from `k`
/// up are not counted). A cluster file's `sizes`.
///
/// ```
/// assert_eq!(clipcid_store::clusters::cluster_sizes(&[2, 0, 2, 5], 3), vec![1, 0, 2]);
/// ```
pub fn cluster_sizes(labels: &[u32], k: usize) -> Vec<u32> {
    let mut sizes = vec![0u32; k];
    for &l in labels {
        if let Some(s) = sizes.get_mut(l as usize) {
            *s = s.saturating_add(1);
        }
    }
    sizes
}

/// What [`read_clusters`] refuses, checked before [`write_clusters`] writes too, so that no
/// file is written that cannot be read: counts that do not fit `K`, a centroid count other
/// than `K x D`, a label not below `K`, `sizes` other than the labels' counts, and a
/// non-finite centroid.
fn check_contents(file: &ClusterFile) -> Result<(), String> {
    let k = file.k;
    if file.labels.len() != file.ids.len() || file.sizes.len() != k {
        return Err(format!(
            "{} labels, {} ids and {} sizes for {k} clusters",
            file.labels.len(),
            file.ids.len(),
            file.sizes.len()
        ));
    }
    if k.checked_mul(file.dim) != Some(file.centroids.len()) {
        return Err(format!(
            "{} centroid values for {k} centroids of width {}",
            file.centroids.len(),
            file.dim
        ));
    }
    if let Some(l) = file.labels.iter().find(|&&l| l as usize >= k) {
        return Err(format!("label {l} is not below K = {k}"));
    }
    let counted = cluster_sizes(&file.labels, k);
    if let Some(c) = (0..k).find(|&c| counted[c] != file.sizes[c]) {
        return Err(format!(
            "`sizes` says cluster {c} holds {} rows, but {} labels name it",
            file.sizes[c], counted[c]
        ));
    }
    if file.centroids.iter().any(|v| !v.is_finite()) {
        return Err("non-finite value in `centroids`".into());
    }
    Ok(())
}

/// Writes a cluster file atomically: `centroids` f32 `[K, D]`, `labels` u32 `[n]`, `ids` i64
/// `[n]`, `sizes` u32 `[K]`; metadata `summary` (JSON, also written beside it as
/// `<name>.json`) and `embeddings` (the provenance of the embeddings clustered), when known.
/// Contents that [`read_clusters`] would refuse are an error naming `path`, and nothing is
/// written.
pub fn write_clusters(path: &Path, file: &ClusterFile) -> Result<(), StoreError> {
    let cpu = Device::Cpu;
    check_contents(file).map_err(|msg| StoreError::file(path, format!("not written: {msg}")))?;
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
    crate::io::write_with_summary(
        path,
        tensors,
        CLUSTERS_KIND,
        &file.summary,
        file.embeddings.as_deref(),
    )?;
    Ok(())
}

/// Reads a cluster file written by [`write_clusters`], checking names and shapes, and that
/// the contents fit together: every label below `K`, `sizes` the labels' counts, the
/// centroids finite.
pub fn read_clusters(path: &Path) -> Result<ClusterFile, StoreError> {
    let bad = |msg: String| StoreError::file(path, msg);
    let header = crate::io::read_header(path)?;
    let mut t = crate::io::load_tensors(path)?;
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
    let mut integers = |name: &str, dtype: candle_core::DType| {
        crate::io::integer_vector(path, name, take(name)?, dtype)
    };
    let labels: Vec<u32> = integers("labels", candle_core::DType::U32)?.to_vec1()?;
    let ids: Vec<i64> = integers("ids", candle_core::DType::I64)?.to_vec1()?;
    let sizes: Vec<u32> = integers("sizes", candle_core::DType::U32)?.to_vec1()?;
    let summary = match header.metadata.get("summary") {
        Some(s) => {
            serde_json::from_str(s).map_err(|e| bad(format!("bad `summary` metadata: {e}")))?
        }
        None => ClusterSummary::default(),
    };
    let file = ClusterFile {
        centroids,
        k,
        dim,
        labels,
        ids,
        sizes,
        summary,
        embeddings: header.metadata.get(crate::EMBEDDINGS_META).cloned(),
    };
    check_contents(&file).map_err(bad)?;
    Ok(file)
}
