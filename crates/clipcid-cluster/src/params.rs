//! k-means options: the [`KMeans`] builder, its getters and their checks.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{ClusterError, KMeansInit};

/// k-means configuration, built fluently; [`KMeans::fit`] trains and assigns.
#[derive(Debug, Clone)]
pub struct KMeans {
    pub(crate) k: usize,
    pub(crate) iterations: usize,
    pub(crate) redo: usize,
    pub(crate) seed: u32,
    pub(crate) spherical: bool,
    pub(crate) max_points_per_centroid: usize,
    pub(crate) init: KMeansInit,
    pub(crate) gpu: Option<i32>,
    pub(crate) verbose: bool,
}

impl KMeans {
    /// `k` clusters with faiss's defaults: 25 iterations, 1 run, seed 1234, at most 256
    /// training points per centroid; spherical (the paper clusters normalised embeddings).
    pub fn new(k: usize) -> Self {
        Self {
            k,
            iterations: 25,
            redo: 1,
            seed: 1234,
            spherical: true,
            max_points_per_centroid: 256,
            init: KMeansInit::Random,
            gpu: None,
            verbose: false,
        }
    }

    /// Lloyd iterations per run.
    pub fn iterations(mut self, n: usize) -> Self {
        self.iterations = n;
        self
    }

    /// Runs with different seeds; the one with the best objective is kept.
    pub fn redo(mut self, n: usize) -> Self {
        self.redo = n;
        self
    }

    /// Seed of the sampling, the initialisation and faiss's own random draws.
    pub fn seed(mut self, seed: u32) -> Self {
        self.seed = seed;
        self
    }

    /// Spherical k-means (unit centroids, inner-product assignment) or plain L2.
    ///
    /// When every training row has unit norm (within 2e-3 on the squared norm, as for
    /// normalised embeddings) and training runs on an x86-64 CPU with AVX2 (`.cargo/config.toml`
    /// then compiles faiss with AVX2), spherical training searches with faiss's L2 index: with
    /// unit centroids, `|x - c|^2 = |x|^2 + 1 - 2 x.c` ranks centroids exactly as the inner
    /// product does, and faiss 1.12 finds the nearest centroid by L2 in one fused AVX2 pass but
    /// by inner product with a separate scalar pass (about 5% of a run at 100k x 512 into
    /// 1,000). Only scores that tie to within a few 1e-7 can resolve differently. Other inputs,
    /// other CPUs and GPU training keep the inner-product index.
    pub fn spherical(mut self, yes: bool) -> Self {
        self.spherical = yes;
        self
    }

    /// Training uses at most `m * K` points, a seeded sample when there are more. `m` must
    /// be at least 1 ([`KMeans::fit`] refuses 0).
    pub fn max_points_per_centroid(mut self, m: usize) -> Self {
        self.max_points_per_centroid = m;
        self
    }

    /// Initialisation method.
    pub fn init(mut self, init: KMeansInit) -> Self {
        self.init = init;
        self
    }

    /// Train on this CUDA device with faiss's GPU flat index (needs the `faiss-gpu` feature).
    pub fn gpu(mut self, device: Option<i32>) -> Self {
        self.gpu = device;
        self
    }

    /// Let faiss print its per-iteration log. Spherical training on unit-norm rows searches
    /// with faiss's L2 index (same assignments, faster; see [`KMeans::spherical`]), so faiss
    /// logs the sum of squared distances there; [`Centroids::objective`](crate::Centroids::objective) is converted back.
    pub fn verbose(mut self, yes: bool) -> Self {
        self.verbose = yes;
        self
    }

    /// Number of clusters.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Iterations per run.
    pub fn get_iterations(&self) -> usize {
        self.iterations
    }

    /// Seed.
    pub fn get_seed(&self) -> u32 {
        self.seed
    }

    /// The GPU faiss trains on (`None`: the CPU).
    pub fn get_gpu(&self) -> Option<i32> {
        self.gpu
    }

    /// Whether the k-means is spherical (unit centroids, inner-product assignment).
    pub fn get_spherical(&self) -> bool {
        self.spherical
    }

    /// Initialisation method.
    pub fn get_init(&self) -> KMeansInit {
        self.init
    }

    /// Most training rows used: `max_points_per_centroid * K`.
    pub fn sample_limit(&self) -> usize {
        self.max_points_per_centroid.max(1).saturating_mul(self.k)
    }

    /// Which of `n` rows training uses: all of them, or a seeded sorted sample of
    /// [`KMeans::sample_limit`] rows. [`train_from_shards`](crate::train_from_shards) reads only these.
    pub fn training_rows(&self, n: usize) -> Vec<usize> {
        let limit = self.sample_limit();
        if n <= limit {
            return (0..n).collect();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed as u64);
        let mut rows = rand::seq::index::sample(&mut rng, n, limit).into_vec();
        rows.sort_unstable();
        rows
    }

    /// The options alone, before any data is read.
    pub(crate) fn check_options(&self) -> Result<(), ClusterError> {
        if self.k == 0 {
            return Err(ClusterError::Config("K must be at least 1".into()));
        }
        if self.iterations == 0 || self.redo == 0 {
            return Err(ClusterError::Config(
                "iterations and redo must be at least 1".into(),
            ));
        }
        if self.max_points_per_centroid == 0 {
            // It was read as 1: K training points, each its own centroid (objective 0 on
            // the sample, whatever the data).
            return Err(ClusterError::Config(
                "max points per centroid must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn check(&self, n: usize, d: usize) -> Result<(), ClusterError> {
        self.check_options()?;
        if d == 0 {
            return Err(ClusterError::Config("embedding width is 0".into()));
        }
        if self.k > n {
            return Err(ClusterError::Config(format!(
                "K = {} is larger than the number of points ({n})",
                self.k
            )));
        }
        if self.k > i32::MAX as usize || d > i32::MAX as usize {
            return Err(ClusterError::Config(format!(
                "K = {} or width {d} is too large for faiss",
                self.k
            )));
        }
        Ok(())
    }
}
