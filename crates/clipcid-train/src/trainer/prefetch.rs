//! Micro-batches read and decoded on a worker thread ahead of the training step.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use candle_core::Device;
use clipcid_data::Preprocess;
use clipcid_models::ClipTokenizer;

use crate::data::{TrainBatch, TrainingSet};
use crate::TrainError;

/// Which micro-batch: (optimiser step, micro-batch within it).
pub(super) type BatchKey = (u64, usize);

/// A worker thread that assembles the planned micro-batches in order
/// ([`TrainingSet::batch`]: image reads, decoding, teacher rows) and hands them over through
/// a queue of at most `depth` batches, so the next batches are being decoded while the model
/// computes. The batches are exactly those the step would assemble itself; the queue only
/// changes when the work happens. Dropping it stops the worker after its current batch.
pub(super) struct Prefetcher {
    rx: Receiver<(BatchKey, Result<TrainBatch, TrainError>)>,
}

impl Prefetcher {
    /// Starts assembling `plan` (keys and their training rows, in the order they will be
    /// asked for).
    pub(super) fn start(
        set: Arc<TrainingSet>,
        plan: Vec<(BatchKey, Vec<usize>)>,
        preprocess: Preprocess,
        tokenizer: Option<ClipTokenizer>,
        device: Device,
        depth: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        std::thread::spawn(move || {
            for (key, rows) in plan {
                let batch = set.batch(&rows, &preprocess, tokenizer.as_ref(), &device);
                let failed = batch.is_err();
                if tx.send((key, batch)).is_err() || failed {
                    return;
                }
            }
        });
        Self { rx }
    }

    /// The batch for `key` when it is the next one queued; `None` when the plan went another
    /// way (the worker ended or queued another key), and the caller starts a new plan.
    pub(super) fn take(&mut self, key: BatchKey) -> Option<Result<TrainBatch, TrainError>> {
        match self.rx.recv() {
            Ok((k, batch)) if k == key => Some(batch),
            _ => None,
        }
    }
}
