//! What data-parallel training needs from the processes (ranks) that train one model
//! together: gathering every rank's rows, and summing gradients. [`InProcessGroup`] runs the
//! ranks as threads of one process (the equality tests); a multi-process implementation
//! (NCCL across GPUs) plugs in behind the same [`Collective`] trait.
//!
//! The data-parallel rule used with it ([`all_gather_rows`], [`all_reduce_mean`]): every
//! rank computes the loss of the *global* batch from the gathered features, whose own slice
//! carries the gradient scaled by the world size; the parameter gradients are then averaged
//! over the ranks. The averaged gradient equals the one-process gradient of the global batch
//! (contrastive negatives from every rank, parameters used directly by the loss such as the
//! logit scale counted once), so N ranks at batch `b` train as one process at batch `N b`.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::TrainError;

/// A group of ranks training one model. Every rank must make the same calls in the same
/// order (as in NCCL); a call returns when every rank has made it.
pub trait Collective: Send + Sync {
    /// This rank, from 0.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's `local` values, one vector per rank in rank order (lengths may differ).
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, TrainError>;
    /// Element-wise sum over the ranks, in place; every rank gets the same values (summed in
    /// rank order).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), TrainError>;
}

/// The group of one: gathers and sums are the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, TrainError> {
        Ok(vec![local.to_vec()])
    }
    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<(), TrainError> {
        Ok(())
    }
}

struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

/// One rank of an [`InProcessGroup`]: ranks are threads of this process exchanging through
/// shared memory. For tests of the data-parallel path, where it stands in for NCCL.
pub struct InProcessRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// Makes the ranks of a group of `world` threads: hand one to each thread.
///
/// ```
/// use clipcid_train::{Collective, InProcessGroup};
/// let ranks = InProcessGroup::new(3);
/// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks
///         .iter()
///         .map(|r| s.spawn(move || {
///             let mut v = vec![r.rank() as f32, 1.0];
///             r.all_reduce_sum(&mut v).unwrap();
///             v
///         }))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(sums.iter().all(|v| v == &[3.0, 3.0]));
/// ```
pub struct InProcessGroup;

impl InProcessGroup {
    /// The `world` ranks of a new group (`world >= 1`).
    #[allow(clippy::new_ret_no_self)] // a group is its ranks
    pub fn new(world: usize) -> Vec<InProcessRank> {
        let world = world.max(1);
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![vec![]; world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| InProcessRank {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for InProcessRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared
            .slots
            .lock()
            .map(|s| s.len())
            .unwrap_or_default()
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, TrainError> {
        let poisoned = || TrainError::Config("a rank of the in-process group panicked".into());
        self.shared.slots.lock().map_err(|_| poisoned())?[self.rank] = local.to_vec();
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().map_err(|_| poisoned())?.clone();
        // Nobody writes the next round's slot before every rank has read this one.
        self.shared.barrier.wait();
        Ok(all)
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), TrainError> {
        let all = self.all_gather(data)?;
        if let Some(bad) = all.iter().find(|v| v.len() != data.len()) {
            return Err(TrainError::Config(format!(
                "all-reduce of {} values met a rank with {}",
                data.len(),
                bad.len()
            )));
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = all.iter().map(|v| v[i]).sum();
        }
        Ok(())
    }
}

/// Every rank's rows of `local` (`[b_r, D]`, f32), concatenated in rank order: `[sum b_r, D]`.
/// Other ranks' rows are constants; this rank's rows are `local` itself with its gradient
/// multiplied by the world size (value unchanged, bit for bit), so that averaging the
/// parameter gradients over the ranks ([`all_reduce_mean`]) gives the gradient of the
/// global batch's loss.
pub fn all_gather_rows(c: &dyn Collective, local: &Tensor) -> Result<Tensor, TrainError> {
    let (_, d) = local.dims2()?;
    let values: Vec<f32> = local.flatten_all()?.to_vec1()?;
    let all = c.all_gather(&values)?;
    let world = c.world_size() as f64;
    // x.detach() + (x - x.detach()) * k: the value of x exactly, the gradient k times x's.
    let mine = (local.detach() + ((local - local.detach())? * world)?)?;
    let mut parts = Vec::with_capacity(all.len());
    for (r, v) in all.into_iter().enumerate() {
        if r == c.rank() {
            parts.push(mine.clone());
        } else {
            let n = v.len() / d.max(1);
            parts.push(Tensor::from_vec(v, (n, d), local.device())?);
        }
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Replaces each gradient of `vars` by its mean over the ranks (a variable without a
/// gradient on this rank counts as zeros, so every rank makes the same calls).
pub fn all_reduce_mean(
    c: &dyn Collective,
    grads: &mut GradStore,
    vars: &[&Var],
) -> Result<(), TrainError> {
    if c.world_size() == 1 {
        return Ok(());
    }
    let world = c.world_size() as f32;
    for v in vars {
        let t = v.as_tensor();
        let mut values: Vec<f32> = match grads.get(t) {
            Some(g) => g
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            None => vec![0.0; t.elem_count()],
        };
        c.all_reduce_sum(&mut values)?;
        values.iter_mut().for_each(|x| *x /= world);
        let mean = Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
        grads.insert(t, mean);
    }
    Ok(())
}
