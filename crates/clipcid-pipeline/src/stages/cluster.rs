//! `clipcid cluster`: k-means pseudo-classes over the kept teacher embeddings.

use std::path::{Path, PathBuf};

use candle_core::{Device, DeviceLocation};
use clipcid_cluster::{ClusterFile, KMeans, KMeansInit, ShardRows};

use crate::PipelineError;

/// Options of [`cluster`] (the `clipcid cluster` arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ClusterArgs {
    /// Embedding shards: folders of `embeddings-*.safetensors` or single safetensors files.
    #[arg(long, required = true, num_args = 1..)]
    pub embeddings: Vec<PathBuf>,
    /// Keep file from `clipcid balance`; only kept rows are clustered (default: all rows).
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Output cluster file (`.safetensors`; summary `.json` and size histogram `.png` beside it).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of clusters (pseudo-classes).
    #[arg(long)]
    pub k: usize,
    /// Lloyd iterations per run.
    #[arg(long, default_value_t = 25)]
    pub iterations: usize,
    /// Runs with different seeds; the best objective is kept.
    #[arg(long, default_value_t = 1)]
    pub redo: usize,
    /// Seed of sampling, initialisation and faiss.
    #[arg(long, default_value_t = 1234)]
    pub seed: u32,
    /// Train on at most this many points per centroid (a seeded sample beyond that).
    #[arg(long, default_value_t = 256)]
    pub max_points_per_centroid: usize,
    /// Initial centroids: `random` (faiss's) or `kmeans++`.
    #[arg(long, default_value = "random")]
    pub init: KMeansInit,
    /// Plain L2 k-means instead of spherical (unit centroids, inner-product assignment).
    #[arg(long)]
    pub l2: bool,
    /// Another cluster file whose sizes are drawn in the same histogram (e.g. the same K
    /// before balancing: the paper's Figure 2d).
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl ClusterArgs {
    /// The command line's defaults (faiss's: 25 iterations, seed 1234, spherical) for `k`
    /// clusters of one shard folder or file, all rows kept, without a progress bar.
    pub fn new(embeddings: impl Into<PathBuf>, k: usize, out: impl Into<PathBuf>) -> Self {
        Self {
            embeddings: vec![embeddings.into()],
            keep: None,
            out: out.into(),
            k,
            iterations: 25,
            redo: 1,
            seed: 1234,
            max_points_per_centroid: 256,
            init: KMeansInit::Random,
            l2: false,
            compare: None,
            quiet: true,
        }
    }
}

/// `K` clusters trained where the run's tensors live: faiss on the same GPU for a `cuda:N`
/// device when built with `faiss-gpu` ([`crate::faiss_gpu`]), on the CPU otherwise. The one
/// place the pipeline builds a [`KMeans`], so every stage (the `cluster` command, the demo)
/// places k-means the same way.
///
/// ```
/// use candle_core::{Device, DeviceLocation};
/// let kmeans = clipcid_pipeline::kmeans_for(8, Device::Cpu.location());
/// assert_eq!((kmeans.k(), kmeans.get_gpu()), (8, None));
/// let on_gpu = clipcid_pipeline::kmeans_for(8, DeviceLocation::Cuda { gpu_id: 2 });
/// assert_eq!(on_gpu.get_gpu(), cfg!(feature = "faiss-gpu").then_some(2));
/// ```
pub fn kmeans_for(k: usize, location: DeviceLocation) -> KMeans {
    KMeans::new(k)
        .gpu(crate::faiss_gpu(location))
        .verbose(false)
}

/// What [`cluster`] did.
#[derive(Debug, Clone)]
pub struct ClusterOutcome {
    /// Centroids, labels, sizes and the summary (as written to `args.out`).
    pub file: ClusterFile,
    /// Rows in all shards (kept or not).
    pub total_rows: usize,
    /// The cluster-size histogram written beside the cluster file.
    pub histogram: PathBuf,
}

/// Trains k-means on the kept rows, labels every kept row, writes the cluster file
/// `args.out`, its summary `.json` and a size histogram `.png` beside it.
pub fn cluster(args: &ClusterArgs, device: &Device) -> Result<ClusterOutcome, PipelineError> {
    let kmeans = kmeans_for(args.k, device.location())
        .iterations(args.iterations)
        .redo(args.redo)
        .seed(args.seed)
        .max_points_per_centroid(args.max_points_per_centroid)
        .init(args.init)
        .spherical(!args.l2);
    let rows = ShardRows::open(&args.embeddings, args.keep.as_deref())?.on_device(device);
    let inputs = rows
        .layout
        .shards
        .iter()
        .chain(&args.keep)
        .chain(&args.compare);
    clipcid_store::io::check_not_an_input(&args.out, inputs.map(PathBuf::as_path))?;
    let file = clipcid_cluster::cluster_shards(&kmeans, &rows, !args.quiet)?;
    clipcid_cluster::write_clusters(&args.out, &file)?;
    let other = match &args.compare {
        Some(p) => Some(clipcid_cluster::read_clusters(p)?),
        None => None,
    };
    let name = if args.keep.is_some() {
        "kept rows"
    } else {
        "all rows"
    };
    let mut series: Vec<(&str, &[u32])> = vec![(name, &file.sizes)];
    if let Some(o) = &other {
        series.push(("compared file", &o.sizes));
    }
    let histogram = args.out.with_extension("png");
    clipcid_cluster::plot_size_histogram(
        &histogram,
        &format!("cluster sizes, K = {}", file.k),
        &series,
    )?;
    Ok(ClusterOutcome {
        file,
        total_rows: rows.total(),
        histogram,
    })
}

/// Clusters the kept rows of `embeddings` (all rows without `keep`) with `kmeans`, assigning
/// them on `device`, and writes the cluster file `out`; returns what it wrote.
pub fn cluster_to_file(
    kmeans: &KMeans,
    embeddings: &Path,
    keep: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<ClusterFile, PipelineError> {
    let rows = ShardRows::open(&[embeddings.to_path_buf()], keep)?.on_device(device);
    let file = clipcid_cluster::cluster_shards(kmeans, &rows, false)?;
    clipcid_cluster::write_clusters(out, &file)?;
    Ok(file)
}
