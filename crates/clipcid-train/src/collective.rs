//! What data-parallel training needs from the processes (ranks) that train one model
//! together: gathering every rank's rows, and summing gradients. [`InProcessGroup`] runs the
//! ranks as threads of one process (the equality tests); [`TcpRank`] joins processes as
//! torchrun starts them (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) over TCP;
//! `NcclRank` (the `nccl` feature) joins GPUs on NCCL behind the same [`Collective`] trait.
//!
//! The data-parallel rule used with it ([`all_gather_rows`], [`all_reduce_mean`]): every
//! rank computes the loss of the *global* batch from the gathered features, whose own slice
//! carries the gradient scaled by the world size; the parameter gradients are then averaged
//! over the ranks. The averaged gradient equals the one-process gradient of the global batch
//! (contrastive negatives from every rank, parameters used directly by the loss such as the
//! logit scale counted once), so N ranks at batch `b` train as one process at batch `N b`.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

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
    /// The element-wise sum over the ranks of `t` (any shape; summed in f32), on `t`'s
    /// device. By default the values pass through host memory
    /// ([`Collective::all_reduce_sum`]); a collective of GPUs (`NcclRank`, with the `nccl`
    /// feature) sums the device buffer itself.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, TrainError> {
        all_reduce_sum_via_host(self, t)
    }
}

/// [`Collective::all_reduce_sum_tensor`] through host memory.
fn all_reduce_sum_via_host<C: Collective + ?Sized>(
    c: &C,
    t: &Tensor,
) -> Result<Tensor, TrainError> {
    let mut values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    c.all_reduce_sum(&mut values)?;
    Ok(Tensor::from_vec(values, t.shape(), t.device())?)
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

/// The exchange of an [`InProcessGroup`]: each round every rank puts its values in its slot;
/// the last to arrive starts the round's reading, and the last reader empties the slots for
/// the next round.
#[derive(Default)]
struct Exchange {
    slots: Vec<Option<Vec<f32>>>,
    /// Rounds completed.
    round: u64,
    /// Ranks yet to read the completed round's slots.
    readers_left: usize,
    /// A rank whose handle was dropped (its thread ended, by an error or a panic).
    left: Option<usize>,
}

struct Shared {
    exchange: Mutex<Exchange>,
    changed: Condvar,
}

/// One rank of an [`InProcessGroup`]: ranks are threads of this process exchanging through
/// shared memory. For tests of the data-parallel path, where it stands in for NCCL. When a
/// rank's handle is dropped (its thread returned an error or panicked), the ranks waiting for
/// it get an error naming it instead of waiting for ever.
pub struct InProcessRank {
    rank: usize,
    world: usize,
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
            exchange: Mutex::new(Exchange {
                slots: vec![None; world],
                ..Exchange::default()
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcessRank {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl InProcessRank {
    fn gone(left: usize) -> TrainError {
        TrainError::Config(format!(
            "rank {left} of the in-process group ended (an error or a panic on its thread) while the others waited for it"
        ))
    }
}

impl Drop for InProcessRank {
    fn drop(&mut self) {
        let mut ex = self
            .shared
            .exchange
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ex.left.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

impl Collective for InProcessRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, TrainError> {
        let poisoned = || TrainError::Config("a rank of the in-process group panicked".into());
        let wait = |ex| self.shared.changed.wait(ex).map_err(|_| poisoned());
        let mut ex = self.shared.exchange.lock().map_err(|_| poisoned())?;
        // The previous round must be read by everyone before its slots are reused.
        while ex.readers_left > 0 {
            ex = wait(ex)?;
        }
        ex.slots[self.rank] = Some(local.to_vec());
        if ex.slots.iter().all(Option::is_some) {
            ex.round += 1;
            ex.readers_left = self.world;
            self.shared.changed.notify_all();
        } else {
            let round = ex.round;
            while ex.round == round {
                if let Some(left) = ex.left {
                    return Err(Self::gone(left));
                }
                ex = wait(ex)?;
            }
        }
        let all = ex
            .slots
            .iter()
            .map(|s| s.clone().unwrap_or_default())
            .collect();
        ex.readers_left -= 1;
        if ex.readers_left == 0 {
            ex.slots.iter_mut().for_each(|s| *s = None);
            self.shared.changed.notify_all();
        }
        Ok(all)
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), TrainError> {
        let all = self.all_gather(data)?;
        sum_in_rank_order(&all, data)
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
/// gradient on this rank counts as zeros, so every rank makes the same calls). The gradients
/// travel as one flat buffer on their device, one collective call per step (as a DDP bucket
/// does), and the sum is divided by the world size element by element.
pub fn all_reduce_mean(
    c: &dyn Collective,
    grads: &mut GradStore,
    vars: &[&Var],
) -> Result<(), TrainError> {
    if c.world_size() == 1 || vars.is_empty() {
        return Ok(());
    }
    let mut flat = Vec::with_capacity(vars.len());
    for v in vars {
        let t = v.as_tensor();
        flat.push(match grads.get(t) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(t.elem_count(), DType::F32, t.device())?,
        });
    }
    let summed = c.all_reduce_sum_tensor(&Tensor::cat(&flat, 0)?)?;
    let world = Tensor::new(c.world_size() as f32, summed.device())?;
    let mean = summed.broadcast_div(&world)?;
    let mut offset = 0;
    for v in vars {
        let t = v.as_tensor();
        let n = t.elem_count();
        // In f32 whatever the variable's dtype (a bf16 working copy's gradient too).
        let g = mean.narrow(0, offset, n)?.reshape(t.shape())?;
        grads.insert(t, g);
        offset += n;
    }
    Ok(())
}

/// One rank of a group of processes that exchange over TCP, launched as torchrun launches
/// them (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`): rank 0 listens on the master
/// address and every other rank connects to it (a star; each gather goes through rank 0).
/// It carries CPU training across processes or machines without a communication library;
/// GPUs want NCCL behind the same [`Collective`] trait.
pub struct TcpRank {
    rank: usize,
    world: usize,
    /// Rank 0: the stream of each other rank (index `r - 1`); others: the stream to rank 0.
    streams: Mutex<Vec<std::net::TcpStream>>,
}

/// How long a rank waits for the others (connecting, or in a collective call) before it
/// gives up with an error naming what it waited for, unless [`TIMEOUT_VAR`] says otherwise:
/// 10 minutes, torch.distributed's default for NCCL and torchrun's rendezvous join.
pub const TCP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The environment variable that overrides [`TCP_TIMEOUT`] for [`TcpRank::from_env`], in
/// seconds (`CLIPCID_DIST_TIMEOUT=60`): a short limit lets a job whose rank never starts fail
/// fast; a long one lets rank 0 wait out slow first steps on the others.
pub const TIMEOUT_VAR: &str = "CLIPCID_DIST_TIMEOUT";

impl TcpRank {
    /// Joins the group from torchrun's environment variables; `None` when `WORLD_SIZE` is
    /// unset or 1. Every wait is limited by [`TIMEOUT_VAR`] when set, else [`TCP_TIMEOUT`].
    pub fn from_env() -> Result<Option<Self>, TrainError> {
        let var = |k: &str| std::env::var(k).ok();
        let num = |k: &str| -> Result<Option<usize>, TrainError> {
            var(k)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        TrainError::Config(format!("environment variable {k}=`{v}` is not a count"))
                    })
                })
                .transpose()
        };
        let world = num("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(None);
        }
        let rank = num("RANK")?
            .ok_or_else(|| TrainError::Config("WORLD_SIZE is set but RANK is not".into()))?;
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = num("MASTER_PORT")?.unwrap_or(29500);
        let timeout = Self::timeout_of(var(TIMEOUT_VAR).as_deref())?;
        Self::connect_within(rank, world, &format!("{addr}:{port}"), timeout).map(Some)
    }

    /// The wait limit that a value of [`TIMEOUT_VAR`] sets: positive seconds, fractions
    /// allowed; [`TCP_TIMEOUT`] when unset. Anything else is an error naming the variable.
    ///
    /// ```
    /// use clipcid_train::{TcpRank, TCP_TIMEOUT};
    /// use std::time::Duration;
    /// assert_eq!(TcpRank::timeout_of(None)?, TCP_TIMEOUT);
    /// assert_eq!(TcpRank::timeout_of(Some("90"))?, Duration::from_secs(90));
    /// assert_eq!(TcpRank::timeout_of(Some(" 0.5 "))?, Duration::from_millis(500));
    /// for bad in ["0", "-3", "ten", "inf", "NaN"] {
    ///     let e = TcpRank::timeout_of(Some(bad)).unwrap_err().to_string();
    ///     assert!(e.contains("CLIPCID_DIST_TIMEOUT"), "{e}");
    /// }
    /// # Ok::<(), clipcid_train::TrainError>(())
    /// ```
    pub fn timeout_of(value: Option<&str>) -> Result<std::time::Duration, TrainError> {
        let Some(v) = value else {
            return Ok(TCP_TIMEOUT);
        };
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0)
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "environment variable {TIMEOUT_VAR}=`{v}` is not a positive number of seconds"
                ))
            })
    }

    /// Joins group of `world` ranks as `rank`, rank 0 listening at `master` (`host:port`),
    /// waiting at most [`TCP_TIMEOUT`] for the others.
    pub fn connect(rank: usize, world: usize, master: &str) -> Result<Self, TrainError> {
        Self::connect_within(rank, world, master, TCP_TIMEOUT)
    }

    /// [`TcpRank::connect`] with another limit on every wait: rank 0 for the other ranks to
    /// join, the others for rank 0 to listen, and everyone for a peer inside a collective
    /// call. A rank whose process ends closes its streams, so the others learn it at once
    /// (an error naming it), not after the limit.
    pub fn connect_within(
        rank: usize,
        world: usize,
        master: &str,
        timeout: std::time::Duration,
    ) -> Result<Self, TrainError> {
        use std::io::{Read, Write};
        let err = |what: &str, e: std::io::Error| {
            TrainError::Config(format!("rank {rank} of {world}: {what} {master}: {e}"))
        };
        if rank >= world {
            return Err(TrainError::Config(format!(
                "RANK {rank} is not below WORLD_SIZE {world}"
            )));
        }
        let mut streams = vec![];
        if rank == 0 {
            let listener =
                std::net::TcpListener::bind(master).map_err(|e| err("cannot listen on", e))?;
            let mut by_rank: Vec<Option<std::net::TcpStream>> = (1..world).map(|_| None).collect();
            // Polled, so that ranks that never come are an error after `timeout`, not a hang.
            listener
                .set_nonblocking(true)
                .map_err(|e| err("cannot poll", e))?;
            let start = std::time::Instant::now();
            for joined in 0..world - 1 {
                let mut s = loop {
                    match listener.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if start.elapsed() > timeout {
                                return Err(TrainError::Config(format!(
                                    "rank 0 of {world}: {joined} of the {} other ranks reached {master} within {:.1} s",
                                    world - 1,
                                    timeout.as_secs_f64()
                                )));
                            }
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        Err(e) => return Err(err("cannot accept on", e)),
                    }
                };
                s.set_nonblocking(false)
                    .map_err(|e| err("cannot block on", e))?;
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| err("cannot set a timeout on", e))?;
                let mut r = [0u8; 8];
                s.read_exact(&mut r)
                    .map_err(|e| err("no rank from a peer of", e))?;
                let r = u64::from_le_bytes(r) as usize;
                match by_rank.get_mut(r.wrapping_sub(1)) {
                    Some(slot @ None) => *slot = Some(s),
                    _ => {
                        return Err(TrainError::Config(format!(
                            "rank 0 of {world}: a peer of {master} says it is rank {r} (twice, or out of range)"
                        )))
                    }
                }
            }
            streams.extend(by_rank.into_iter().flatten());
        } else {
            let start = std::time::Instant::now();
            let mut s = loop {
                match std::net::TcpStream::connect(master) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() > timeout => {
                        return Err(err("cannot reach rank 0 at", e))
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                }
            };
            s.set_read_timeout(Some(timeout))
                .map_err(|e| err("cannot set a timeout on", e))?;
            s.write_all(&(rank as u64).to_le_bytes())
                .map_err(|e| err("cannot send to", e))?;
            streams.push(s);
        }
        Ok(Self {
            rank,
            world,
            streams: Mutex::new(streams),
        })
    }
}

fn send_vec(s: &mut std::net::TcpStream, v: &[f32]) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = Vec::with_capacity(8 + v.len() * 4);
    bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    s.write_all(&bytes)
}

fn recv_vec(s: &mut std::net::TcpStream) -> std::io::Result<Vec<f32>> {
    use std::io::Read;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let n = usize::try_from(u64::from_le_bytes(n)).unwrap_or(usize::MAX);
    // A length no honest peer sends (over 16 GB of values) is a broken stream.
    if n > (1 << 32) {
        return Err(std::io::Error::other(format!(
            "a peer announced {n} values"
        )));
    }
    let mut bytes = vec![0u8; n * 4];
    s.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl Collective for TcpRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, TrainError> {
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| TrainError::Config("the TCP group's lock is poisoned".into()))?;
        // Rank 0 knows which peer it lost; the others only that rank 0 went (it ends the
        // group when any rank does).
        let lost = |peer: usize| {
            move |e: std::io::Error| {
                TrainError::Config(format!(
                    "rank {} of {}: lost rank {peer}{} ({e})",
                    self.rank,
                    self.world,
                    if peer == 0 {
                        ", which ends the group when any rank stops"
                    } else {
                        " (it stopped?)"
                    }
                ))
            }
        };
        if self.rank == 0 {
            let mut all = vec![local.to_vec()];
            for (i, s) in streams.iter_mut().enumerate() {
                all.push(recv_vec(s).map_err(lost(i + 1))?);
            }
            for (i, s) in streams.iter_mut().enumerate() {
                for v in &all {
                    send_vec(s, v).map_err(lost(i + 1))?;
                }
            }
            Ok(all)
        } else {
            let s = &mut streams[0];
            send_vec(s, local).map_err(lost(0))?;
            (0..self.world)
                .map(|_| recv_vec(s).map_err(lost(0)))
                .collect()
        }
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), TrainError> {
        let all = self.all_gather(data)?;
        sum_in_rank_order(&all, data)
    }
}

/// `data` = the element-wise sum of `all` (one vector per rank), added in rank order so every
/// rank gets the same bits.
fn sum_in_rank_order(all: &[Vec<f32>], data: &mut [f32]) -> Result<(), TrainError> {
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

/// One rank of a group on NCCL (the `nccl` feature, which links NVIDIA's libnccl): the
/// communication data-parallel training across GPUs wants. The ranks agree on NCCL's unique id
/// through a bootstrap group of the same ranks (a [`TcpRank`] from torchrun's variables);
/// gathers and sums then run on the GPU. The step's gradients stay on the device: they are
/// summed as one flat CUDA buffer ([`Collective::all_reduce_sum_tensor`], a candle custom op
/// around `ncclAllReduce` on the device's stream); the host-slice calls (row gathers) pass
/// through device buffers. Not yet run on a GPU: `scripts/gpu-check.sh` is where it will be.
#[cfg(feature = "nccl")]
pub struct NcclRank {
    comm: Mutex<nccl::Comm>,
    stream: Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    rank: usize,
    world: usize,
}

#[cfg(feature = "nccl")]
use candle_core::cuda_backend::cudarc::nccl;

// NCCL communicators may be called from any thread as long as calls on one communicator are
// not concurrent; the Mutex serialises them, and the stream's methods bind its context to the
// calling thread. cudarc's `Comm` holds a raw pointer and so is neither Send nor Sync itself.
#[cfg(feature = "nccl")]
#[allow(unsafe_code)]
unsafe impl Send for NcclRank {}
#[cfg(feature = "nccl")]
#[allow(unsafe_code)]
unsafe impl Sync for NcclRank {}

#[cfg(feature = "nccl")]
impl NcclRank {
    /// Joins the NCCL communicator of `bootstrap`'s ranks on `device` (this rank's GPU).
    pub fn new(
        device: &candle_core::Device,
        bootstrap: &dyn Collective,
    ) -> Result<Self, TrainError> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        let failed = |e: nccl::result::NcclError| {
            TrainError::Config(format!("rank {rank} of {world}: NCCL: {e:?}"))
        };
        let mine: Vec<f32> = if rank == 0 {
            nccl::Id::new()
                .map_err(failed)?
                .internal()
                .iter()
                .map(|&c| c as f32)
                .collect()
        } else {
            vec![]
        };
        let all = bootstrap.all_gather(&mine)?;
        let raw = all
            .first()
            .filter(|v| v.len() == 128)
            .ok_or_else(|| TrainError::Config("rank 0 sent no NCCL id".into()))?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(raw) {
            *d = *s as std::ffi::c_char;
        }
        let comm = nccl::Comm::from_rank(stream.clone(), rank, world, nccl::Id::uninit(internal))
            .map_err(failed)?;
        Ok(Self {
            comm: Mutex::new(comm),
            stream,
            rank,
            world,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, nccl::Comm>, TrainError> {
        self.comm
            .lock()
            .map_err(|_| TrainError::Config("the NCCL communicator's lock is poisoned".into()))
    }

    fn cuda(&self, e: impl std::fmt::Debug) -> TrainError {
        TrainError::Config(format!("rank {} of {}: CUDA: {e:?}", self.rank, self.world))
    }

    /// Every rank's `v` (all of one length), concatenated in rank order.
    fn gather_equal(&self, v: &[f32]) -> Result<Vec<f32>, TrainError> {
        let comm = self.lock()?;
        let send = self.stream.clone_htod(v).map_err(|e| self.cuda(e))?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(v.len() * self.world)
            .map_err(|e| self.cuda(e))?;
        comm.all_gather(&send, &mut recv)
            .map_err(|e| self.cuda(e))?;
        let out = self.stream.clone_dtoh(&recv).map_err(|e| self.cuda(e))?;
        self.stream.synchronize().map_err(|e| self.cuda(e))?;
        Ok(out)
    }
}

#[cfg(feature = "nccl")]
impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, TrainError> {
        // NCCL gathers buffers of one size: the lengths first, then the values padded.
        if local.len() >= 1 << 24 {
            return Err(TrainError::Config(format!(
                "a gather of {} values (at most 2^24 per rank)",
                local.len()
            )));
        }
        let lens: Vec<usize> = self
            .gather_equal(&[local.len() as f32])?
            .into_iter()
            .map(|n| n as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut padded = local.to_vec();
        padded.resize(max, 0.0);
        let all = self.gather_equal(&padded)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * max..r * max + n].to_vec())
            .collect())
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, TrainError> {
        if !t.device().is_cuda() {
            return all_reduce_sum_via_host(self, t);
        }
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        Ok(t.apply_op1_no_bwd(&NcclSum(self))?)
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), TrainError> {
        let comm = self.lock()?;
        let mut buf = self.stream.clone_htod(data).map_err(|e| self.cuda(e))?;
        comm.all_reduce_in_place(&mut buf, &nccl::ReduceOp::Sum)
            .map_err(|e| self.cuda(e))?;
        let out = self.stream.clone_dtoh(&buf).map_err(|e| self.cuda(e))?;
        self.stream.synchronize().map_err(|e| self.cuda(e))?;
        data.copy_from_slice(&out);
        Ok(())
    }
}

/// `ncclAllReduce` (sum) of a contiguous f32 CUDA tensor into a new buffer, as a candle op so
/// that the result is a tensor on the same device and stream.
#[cfg(feature = "nccl")]
struct NcclSum<'a>(&'a NcclRank);

#[cfg(feature = "nccl")]
impl candle_core::CustomOp1 for NcclSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("the NCCL sum takes CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL sum takes a contiguous tensor")
        };
        let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = storage.device.alloc_zeros::<f32>(end - start)?;
        let comm = self.0.comm.lock().map_err(|_| {
            candle_core::Error::Msg("the NCCL communicator's lock is poisoned".into())
        })?;
        comm.all_reduce(&src, &mut dst, &nccl::ReduceOp::Sum)
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "rank {} of {}: NCCL all-reduce: {e:?}",
                    self.0.rank, self.0.world
                ))
            })?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, storage.device.clone()),
            layout.shape().clone(),
        ))
    }
}
