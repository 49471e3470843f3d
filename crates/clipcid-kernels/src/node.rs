//! An autograd node whose output was computed before the node was made: the ops that need a
//! backward pass of their own but whose forward pass is best left to candle's ops (on any
//! device) compute it on detached tensors, and the node hands the result on once.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Result, Shape, Storage, Tensor};

/// The output a node's forward pass hands on, taken once.
pub(crate) struct PrecomputedOutput(Mutex<Option<Tensor>>);

impl PrecomputedOutput {
    /// Holds `y`, copied first unless it is the whole of a contiguous storage from offset 0
    /// (the node hands on a copy of that storage).
    pub(crate) fn new(y: Tensor) -> Result<Self> {
        let y = if y.layout().start_offset() != 0 || !y.is_contiguous() {
            y.copy()?
        } else {
            y
        };
        Ok(Self(Mutex::new(Some(y))))
    }

    /// The output's storage and shape for the node `op`'s `cpu_fwd`; an error the second time.
    pub(crate) fn take_cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        self.take(op, |s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    /// The output's storage and shape for the node `op`'s `cuda_fwd`; an error the second
    /// time.
    #[cfg(feature = "cuda")]
    pub(crate) fn take_cuda(&self, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        self.take(op, |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    /// The output's storage and shape on the backend whose storage `pick` takes.
    fn take<S>(&self, op: &str, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
    {
        let y = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: the node ran twice")))?;
        let (storage, layout) = y.storage_and_layout();
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            None => bail!("{op}: the output is on another device than the node"),
        }
    }
}
