//! Pseudo-classes for CLIP-CID's cluster-level distillation: k-means with
//! [faiss](https://github.com/facebookresearch/faiss) over L2-normalised teacher image
//! embeddings, giving a centroid matrix `[K, D]` (normalised; it initialises the student's
//! classifier) and a pseudo-label per image.
//!
//! [`KMeans`] wraps `faiss::Clustering` (spherical by default, as in the paper: centroids are
//! renormalised after each iteration and points are assigned by inner product, which on
//! unit-norm rows faiss computes through its faster L2 search; see [`KMeans::spherical`]). It
//! samples the training set itself (at most `max_points_per_centroid * K` rows, seeded), so the
//! caller can stream: [`train_from_shards`] reads only the sampled rows of embedding shards,
//! and [`assign_shards`] labels every kept row shard by shard against the trained
//! [`Centroids`]. Optionally the centroids start from a seeded k-means++ draw
//! ([`KMeansInit::PlusPlus`]; faiss's C API only offers random points, which can leave two
//! centroids in one well-separated cluster).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use clipcid_cluster::{adjusted_rand_index, KMeans, KMeansInit};
//! // Two tight groups on the unit circle.
//! let x: Vec<f32> = [[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0], [0.0998, 0.995]]
//!     .concat();
//! let fit = KMeans::new(2).iterations(5).seed(7).init(KMeansInit::PlusPlus).fit_slice(&x, 2)?;
//! assert_eq!(fit.centroids.k(), 2);
//! assert_eq!(adjusted_rand_index(&fit.labels, &[0, 0, 1, 1])?, 1.0);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod faiss;
mod init;
mod params;
mod plot;
mod shards;
mod stats;

pub use clipcid_store::clusters::{
    cluster_sizes, read_clusters, write_clusters, ClusterFile, ClusterSummary, KMeansInit,
    SizeSummary,
};
pub use faiss::{Assigner, Centroids, DeviceAssigner, KMeansResult};
pub use params::KMeans;
pub use plot::plot_size_histogram;
pub use shards::{assign_shards, cluster_shards, train_from_shards, ShardRows};
pub use stats::adjusted_rand_index;

/// Errors of the clustering stage.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Bad options or input.
    #[error("{0}")]
    Config(String),
    /// faiss reported an error.
    #[error("faiss: {0}")]
    Faiss(#[from] ::faiss::error::Error),
    /// Reading or writing an embedding shard, keep file or cluster file failed.
    #[error(transparent)]
    Store(#[from] clipcid_store::StoreError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Drawing the histogram failed.
    #[error("{path}: cannot draw the histogram: {message}")]
    Plot {
        /// The PNG being written.
        path: String,
        /// What went wrong.
        message: String,
    },
}
