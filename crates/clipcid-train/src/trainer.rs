//! The distillation loop: one [`Trainer`] owns the student, the loss terms, the optimiser,
//! the data order and the run folder (checkpoints, metrics, loss curves).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use clipcid_data::Preprocess;
use clipcid_loss::{ClipLoss, ClusterDistillLoss, InstanceDistillLoss, PartialFc};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::{Needs, TrainBatch, TrainingSet};
use crate::{
    all_gather_rows, all_reduce_mean, clip_factor, AdamW, Collective, DistillConfig, LossScale,
    Mode, SingleProcess, TrainError, TrainPrecision, WarmupCosine,
};

mod checkpoint;
mod metrics;
mod prefetch;

use metrics::{append_metrics, write_metrics};
pub use metrics::{read_metrics, StepMetrics};

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Optimiser steps done in total.
    pub steps: u64,
    /// Steps done by this call.
    pub steps_this_run: u64,
    /// Samples per second over this call's steps.
    pub samples_per_second: f64,
    /// Last step's metrics.
    pub last: Option<StepMetrics>,
    /// Newest checkpoint folder.
    pub checkpoint: Option<PathBuf>,
    /// Hugging Face model folder of the finished student (when the run completed).
    pub student: Option<PathBuf>,
}

/// Trains a student CLIP from a [`DistillConfig`], writing into a run folder:
///
/// - `checkpoints/step-NNNNNNNN/`: `model.safetensors` + `config.json` (Hugging Face CLIP
///   layout, f32) and `trainer.safetensors` (AdamW moments, cluster centres; step, sampler
///   position and the config in its metadata). Written to a `.tmp` folder and renamed, so a
///   checkpoint is whole or absent; `checkpoints/latest` names the newest.
/// - `metrics.jsonl`: one [`StepMetrics`] per step; `loss.png`: the curves.
/// - `student/`: the final student, a Hugging Face model folder (weights, config, tokenizer
///   files when the run has a tokenizer, `preprocessor_config.json`).
///
/// Data order is a seeded permutation per epoch and PartialFC sampling is seeded, so a run
/// resumed from a checkpoint ([`Trainer::resume`]) ends with bit-identical weights to an
/// uninterrupted one on the same machine.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_train::{DistillConfig, Trainer};
/// let config = DistillConfig::from_file("examples/configs/clip-cluster-instance.toml".as_ref())?;
/// let mut trainer = Trainer::new(config, "runs/ablation-3".as_ref(), &candle_core::Device::Cpu)?;
/// let summary = trainer.run(None, true)?;
/// println!("student in {:?}", summary.student);
/// # Ok(()) }
/// ```
pub struct Trainer {
    config: DistillConfig,
    out_dir: PathBuf,
    device: Device,
    set: Arc<TrainingSet>,
    /// Digests of the training rows and their pseudo-labels ([`TrainingSet::ids_digest`],
    /// [`TrainingSet::labels_digest`]), taken at the first checkpoint save or load (a pass
    /// over 12 bytes a row).
    inputs: std::sync::OnceLock<(String, Option<String>)>,
    /// Batches being decoded ahead of the step (`prefetch > 0`).
    prefetch: Option<prefetch::Prefetcher>,
    model: ClipModel,
    /// The model of a bf16 or f16 run: working copies of the weights (see `half_model`).
    half: Option<ClipModel>,
    varmap: candle_nn::VarMap,
    optimizer: AdamW,
    cluster: Option<ClusterDistillLoss>,
    tokenizer: Option<ClipTokenizer>,
    /// Frozen-text features by token row (`student.freeze_text`): a caption seen once is never
    /// encoded again, which makes locked-text tuning cost only the image tower.
    frozen_text: HashMap<Vec<u32>, Vec<f32>>,
    preprocess: Preprocess,
    schedule: WarmupCosine,
    /// Dynamic loss scale of an f16 run (`None` otherwise).
    loss_scale: Option<LossScale>,
    steps_per_epoch: u64,
    step: u64,
    order: Option<(u64, Vec<usize>)>,
    last_checkpoint: Option<PathBuf>,
    history: Vec<StepMetrics>,
    /// The ranks training this model together (data parallel); one rank by default.
    collective: std::sync::Arc<dyn Collective>,
    /// The run folder is this trainer's alone while it lives (rank 0's; the other ranks of a
    /// data-parallel run write nothing).
    _lock: Option<clipcid_store::io::OutputLock>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("out_dir", &self.out_dir)
            .field("rows", &self.set.len())
            .field("step", &self.step)
            .field("total_steps", &self.total_steps())
            .finish()
    }
}

/// A micro-batch's weighted loss, its unweighted terms by name, and the mean
/// student-teacher cosine.
struct MicroLoss {
    total: Tensor,
    terms: Vec<(String, Tensor)>,
    cos: Option<Tensor>,
}

const CENTRES: &str = "cluster.centres";

/// Validates `config` and locks `out_dir` (created if needed) for one writing run.
pub(crate) fn claim(
    config: &DistillConfig,
    out_dir: &Path,
) -> Result<clipcid_store::io::OutputLock, TrainError> {
    config.validate().map_err(TrainError::Config)?;
    Ok(clipcid_store::io::lock_output_dir(out_dir)?)
}

/// [`claim`] on rank 0, which writes the run folder; the other ranks of a data-parallel run
/// only validate the config (`None`: no lock).
pub(crate) fn claim_as_rank(
    config: &DistillConfig,
    out_dir: &Path,
    collective: &dyn Collective,
) -> Result<Option<clipcid_store::io::OutputLock>, TrainError> {
    if collective.rank() == 0 {
        return claim(config, out_dir).map(Some);
    }
    config.validate().map_err(TrainError::Config)?;
    Ok(None)
}

/// The files of a run in `out_dir` (checkpoints, metrics, loss curves, student, and hidden
/// temporary files a failed write left).
fn run_files(out_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = ["checkpoints", "metrics.jsonl", "loss.png", "student"]
        .iter()
        .map(|n| out_dir.join(n))
        .filter(|p| p.exists())
        .collect();
    if let Ok(entries) = std::fs::read_dir(out_dir) {
        found.extend(
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"))
                }),
        );
    }
    found
}

/// Resolves `student.model`: a preset name, or the config of a model path (a Hugging Face
/// `config.json` or open_clip's, a model folder, or a `.safetensors` file carrying its
/// config, as `clipcid init-model` writes; [`ClipConfig::from_path`]), checked, errors naming
/// the file.
pub fn student_config(model: &str) -> Result<ClipConfig, TrainError> {
    if let Ok(c) = ClipConfig::preset(model) {
        return Ok(c);
    }
    let path = Path::new(model);
    if !path.exists() {
        return Err(TrainError::Config(format!(
            "student.model `{model}` is neither a preset ({}) nor a config file, model folder or checkpoint",
            clipcid_models::PRESETS.join(", ")
        )));
    }
    Ok(ClipConfig::from_path(path)?)
}

impl DistillConfig {
    /// What the enabled loss terms read.
    pub fn needs(&self) -> Needs {
        match self.mode {
            Mode::Piccollage => Needs::default(),
            Mode::ClipCid => {
                let l = &self.loss;
                Needs {
                    captions: l.clip.enabled || l.instance.enabled,
                    teacher_text: l.instance.enabled,
                    clusters: l.cluster.enabled,
                }
            }
        }
    }

    fn compares_with_teacher(&self) -> bool {
        self.mode == Mode::Piccollage || self.loss.cluster.enabled || self.loss.instance.enabled
    }
}

impl Trainer {
    /// [`Trainer::new`] in a folder that may hold an earlier run, which is removed first
    /// (checkpoints, metrics, loss curves, student, leftover temporary files; nothing else in
    /// the folder is touched). `clipcid distill --overwrite`.
    pub fn new_overwriting(
        config: DistillConfig,
        out_dir: &Path,
        device: &Device,
    ) -> Result<Self, TrainError> {
        Self::new_overwriting_data_parallel(config, out_dir, device, Arc::new(SingleProcess))
    }

    /// [`Trainer::new_overwriting`] for one rank of a data-parallel run
    /// ([`Trainer::new_data_parallel`]): rank 0 removes the earlier run.
    pub fn new_overwriting_data_parallel(
        config: DistillConfig,
        out_dir: &Path,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self, TrainError> {
        let Some(lock) = claim_as_rank(&config, out_dir, collective.as_ref())? else {
            return Self::build(config, out_dir, device, None, collective);
        };
        for p in run_files(out_dir) {
            let removed = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            removed.map_err(|e| TrainError::io(&p, "cannot remove the earlier run's file", e))?;
        }
        Self::build(config, out_dir, device, Some(lock), collective)
    }

    /// Loads the data, builds the student (seeded random, or `student.init`), the loss terms
    /// and the optimiser. `out_dir` is created. A folder that already holds a run is refused
    /// (continue it with [`Trainer::resume`], or replace it with
    /// [`Trainer::new_overwriting`]), so a fresh run never prunes or mixes with another's
    /// checkpoints.
    pub fn new(config: DistillConfig, out_dir: &Path, device: &Device) -> Result<Self, TrainError> {
        Self::new_data_parallel(config, out_dir, device, Arc::new(SingleProcess))
    }

    /// [`Trainer::new`] for one rank of a data-parallel run: every rank reads the same data
    /// and config, takes its `batch_size` rows of each global batch (`batch_size x world`
    /// consecutive rows of the epoch's order, rank `r` the `r`-th slice), gathers the
    /// features of the whole global batch for the losses ([`all_gather_rows`]) and averages
    /// the gradients ([`all_reduce_mean`]), so that N ranks at batch `b` train as one process
    /// at batch `N b`. Rank 0 alone locks and writes the run folder (metrics, checkpoints,
    /// student); the others write nothing.
    pub fn new_data_parallel(
        config: DistillConfig,
        out_dir: &Path,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self, TrainError> {
        let Some(lock) = claim_as_rank(&config, out_dir, collective.as_ref())? else {
            return Self::build(config, out_dir, device, None, collective);
        };
        if let Some(what) = run_files(out_dir).first() {
            return Err(TrainError::Config(format!(
                "{} already holds a run ({}): pass --resume to continue it, or --overwrite to start over (its checkpoints, metrics and student are removed)",
                out_dir.display(),
                what.display()
            )));
        }
        Self::build(config, out_dir, device, Some(lock), collective)
    }

    /// The trainer for a validated `config` in `out_dir`, whose lock the caller holds (see
    /// [`claim`]); the folder's contents are the caller's business ([`Trainer::resume`]
    /// builds on a used folder, then loads its checkpoint).
    pub(crate) fn build(
        config: DistillConfig,
        out_dir: &Path,
        device: &Device,
        lock: Option<clipcid_store::io::OutputLock>,
        collective: Arc<dyn Collective>,
    ) -> Result<Self, TrainError> {
        let needs = config.needs();
        let set = TrainingSet::load(&config.data, needs)?;
        let student_cfg = student_config(&config.student.model)?;
        if config.compares_with_teacher() && student_cfg.projection_dim != set.dim() {
            return Err(TrainError::Config(format!(
                "teacher embeddings in `{}` are {} wide but student `{}` projects to {}: pick a student with projection_dim = {}",
                config
                    .data
                    .embeddings
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display(),
                set.dim(),
                config.student.model,
                student_cfg.projection_dim,
                set.dim()
            )));
        }
        let tensors = match &config.student.init {
            Some(p) => clipcid_models::Checkpoint::read(p, Some(student_cfg.clone()))?.tensors,
            None => clipcid_models::weights::init_tensors(&student_cfg, config.seed)?,
        };
        let (model, varmap) = ClipModel::trainable_from(&student_cfg, tensors, device)?;
        let tokenizer = if needs.captions {
            let path = config.data.tokenizer.as_ref().ok_or_else(|| {
                TrainError::Config(
                    "the CLIP and instance loss terms need data.tokenizer (a tokenizer.json)"
                        .into(),
                )
            })?;
            let max = student_cfg.text_config.max_position_embeddings;
            let context = config.student.context_length.unwrap_or(max);
            if context > max {
                return Err(TrainError::Config(format!(
                    "student.context_length {context} exceeds the text tower's {max} positions"
                )));
            }
            let tok = ClipTokenizer::from_file(path, context)?;
            if tok.vocab_size() > student_cfg.text_config.vocab_size {
                return Err(TrainError::Config(format!(
                    "{}: the tokenizer has {} tokens but the student's vocabulary is {}",
                    path.display(),
                    tok.vocab_size(),
                    student_cfg.text_config.vocab_size
                )));
            }
            Some(tok)
        } else {
            None
        };
        let cluster = match set.centroids(device)? {
            Some(c) if needs.clusters => {
                let l = &config.loss.cluster;
                let fc = PartialFc::new(&c, l.sample_rate, l.scale, l.margin, config.seed)?;
                let mut loss = ClusterDistillLoss::new(fc);
                loss.kl_weight = l.kl_weight;
                loss.kl_temperature = l.kl_temperature;
                Some(loss)
            }
            _ => None,
        };
        let mut params: Vec<(String, Var)> = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Config("parameter map lock poisoned".into()))?;
            data.iter()
                .filter(|(name, _)| {
                    let text = clipcid_models::weights::is_text_tensor(name);
                    match config.mode {
                        Mode::ClipCid => !(config.student.freeze_text && text),
                        Mode::Piccollage => {
                            name.starts_with("vision_model.")
                                || name.starts_with("visual_projection.")
                        }
                    }
                })
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        if let Some(c) = &cluster {
            params.push((CENTRES.into(), c.fc.weight().clone()));
        }
        let optimizer = AdamW::new(params, config.optim.adamw)?;
        let world = collective.world_size();
        let per_step = config
            .batch_size
            .checked_mul(config.optim.accumulate)
            .and_then(|n| n.checked_mul(world))
            .map_or(u64::MAX, |n| n as u64);
        let steps_per_epoch = set.len() as u64 / per_step.max(1);
        if steps_per_epoch == 0 {
            return Err(TrainError::Config(format!(
                "{} training rows are fewer than one step's batch_size x optim.accumulate{} = {per_step}",
                set.len(),
                if world > 1 { " x ranks" } else { "" }
            )));
        }
        let total = steps_per_epoch.saturating_mul(config.epochs as u64);
        let schedule = WarmupCosine {
            peak_lr: config.optim.lr,
            warmup_steps: config.optim.warmup_steps.min(total),
            total_steps: total,
            min_lr: config.optim.min_lr,
        };
        clipcid_store::io::create_output_folder(out_dir)?;
        let loss_scale = (config.optim.precision == TrainPrecision::F16)
            .then(|| LossScale::new(config.optim.loss_scale));
        Ok(Self {
            preprocess: Preprocess::clip(student_cfg.vision_config.image_size),
            config,
            out_dir: out_dir.to_path_buf(),
            device: device.clone(),
            set: Arc::new(set),
            inputs: std::sync::OnceLock::new(),
            prefetch: None,
            model,
            half: None,
            varmap,
            optimizer,
            cluster,
            tokenizer,
            frozen_text: HashMap::new(),
            schedule,
            loss_scale,
            steps_per_epoch,
            step: 0,
            order: None,
            last_checkpoint: None,
            history: vec![],
            collective,
            _lock: lock,
        })
    }
}

impl Trainer {
    /// The student being trained.
    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// The joined training rows.
    pub fn training_set(&self) -> &TrainingSet {
        &self.set
    }

    /// The run's configuration.
    pub fn config(&self) -> &DistillConfig {
        &self.config
    }

    /// Optimiser steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Optimiser steps per epoch (`rows / (batch_size * accumulate)`, the last partial
    /// batch dropped as open_clip does).
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        // Saturating: validation bounds epochs, so this never saturates on a valid config.
        self.steps_per_epoch
            .saturating_mul(self.config.epochs as u64)
    }

    /// Metrics of the steps so far (restored from `metrics.jsonl` on resume).
    pub fn history(&self) -> &[StepMetrics] {
        &self.history
    }

    /// The newest checkpoint written or resumed from.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }

    /// The run folder.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Training rows of `epoch` in order: a permutation drawn from ChaCha8 seeded with the
    /// run's seed on stream `epoch`, so it depends on nothing else.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(epoch);
        let mut order: Vec<usize> = (0..self.set.len()).collect();
        order.shuffle(&mut rng);
        order
    }

    fn nonfinite(&self, what: String) -> TrainError {
        TrainError::NonFinite {
            step: self.step + 1,
            what,
            last_checkpoint: self.last_checkpoint.clone(),
        }
    }

    /// Text features of a frozen text tower, from the cache or encoded once per distinct row;
    /// a constant (no gradient) tensor.
    fn frozen_text(&mut self, tokens: &Tensor) -> Result<Tensor, TrainError> {
        let rows = tokens.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut missing: Vec<&Vec<u32>> = rows
            .iter()
            .filter(|r| !self.frozen_text.contains_key(*r))
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            let flat: Vec<u32> = missing.iter().flat_map(|r| r.iter().copied()).collect();
            let ids = Tensor::from_vec(flat, (missing.len(), rows[0].len()), &self.device)?;
            let features = self
                .model
                .encode_text(&ids)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (row, f) in missing.into_iter().zip(features) {
                self.frozen_text.insert(row.clone(), f);
            }
        }
        let dim = self.model.config().projection_dim;
        let mut flat = Vec::with_capacity(rows.len() * dim);
        for r in &rows {
            flat.extend_from_slice(&self.frozen_text[r]);
        }
        Ok(Tensor::from_vec(flat, (rows.len(), dim), &self.device)?)
    }

    /// This rank's training rows of micro-batch `micro` of step `step` (0-based): of the
    /// `batch_size x world` consecutive rows of the epoch's order that make the global
    /// micro-batch, the slice of this rank.
    fn micro_rows(&self, step: u64, micro: usize) -> Vec<usize> {
        let (bs, accum) = (self.config.batch_size, self.config.optim.accumulate);
        let (world, rank) = (self.collective.world_size(), self.collective.rank());
        let in_epoch = (step % self.steps_per_epoch) as usize;
        let first = ((in_epoch * accum + micro) * world + rank) * bs;
        match &self.order {
            Some((_, o)) => o[first..first + bs].to_vec(),
            None => vec![],
        }
    }

    /// Whether this trainer writes the run folder (rank 0).
    fn is_writer(&self) -> bool {
        self.collective.rank() == 0
    }

    /// The micro-batch `key` (training rows `rows`): from the prefetch queue when it holds
    /// it next, else assembled here, after which (with `prefetch > 0`) a new queue starts on
    /// the rest of the epoch's micro-batches.
    fn next_batch(
        &mut self,
        key: prefetch::BatchKey,
        rows: &[usize],
    ) -> Result<TrainBatch, TrainError> {
        if let Some(batch) = self.prefetch.as_mut().and_then(|p| p.take(key)) {
            return batch;
        }
        let batch = self.set.batch(
            rows,
            &self.preprocess,
            self.tokenizer.as_ref(),
            &self.device,
        )?;
        if self.config.prefetch == 0 {
            return Ok(batch);
        }
        // Plan the epoch's remaining micro-batches after this one.
        let accum = self.config.optim.accumulate;
        let epoch_first = (self.step / self.steps_per_epoch) * self.steps_per_epoch;
        let plan: Vec<(prefetch::BatchKey, Vec<usize>)> = (key.0
            ..epoch_first + self.steps_per_epoch)
            .flat_map(|step| (0..accum).map(move |m| (step, m)))
            .filter(|&k| k > key)
            .map(|(step, m)| ((step, m), self.micro_rows(step, m)))
            .collect();
        self.prefetch = Some(prefetch::Prefetcher::start(
            self.set.clone(),
            plan,
            self.preprocess.clone(),
            self.tokenizer.clone(),
            self.device.clone(),
            self.config.prefetch,
        ));
        Ok(batch)
    }

    /// The model a bf16 or f16 run computes with (`None` in f32): the optimizer's working
    /// copies of the trained weights (`AdamW::working_copies`, refreshed by each update) and
    /// casts of the frozen ones, made at the first step and again after the weights are set
    /// from a checkpoint.
    fn half_model(&mut self) -> Result<Option<ClipModel>, TrainError> {
        let dtype = match self.config.optim.precision {
            TrainPrecision::F32 => return Ok(None),
            TrainPrecision::Bf16 => DType::BF16,
            TrainPrecision::F16 => DType::F16,
        };
        if self.half.is_none() {
            // The losses read the logit scale from the f32 weights: it takes its gradient
            // there, not through a copy.
            let copies = self
                .optimizer
                .working_copies(dtype, |n| n != CENTRES && n != "logit_scale")?;
            let copies: HashMap<String, Var> = copies.into_iter().collect();
            self.half = Some(self.model.cast_using(dtype, &copies)?);
        }
        Ok(self.half.clone())
    }

    /// The weighted loss of one micro-batch and its unweighted terms.
    fn micro_loss(&mut self, b: &TrainBatch, epoch: u64) -> Result<MicroLoss, TrainError> {
        // Mixed precision: the towers run on bf16 or f16 working copies of the f32 weights;
        // the embeddings come back to f32 for the losses.
        let half = self.half_model()?;
        let model = half.as_ref().unwrap_or(&self.model);
        let image = model.encode_image(&b.pixels)?.to_dtype(DType::F32)?;
        // Data parallel: the losses see the whole global batch, this rank's rows carrying
        // the gradient (all_gather_rows); teacher rows and labels are constants.
        let group = self.collective.clone();
        let dp = group.world_size() > 1;
        let gather = |t: &Tensor| -> Result<Tensor, TrainError> {
            if dp {
                all_gather_rows(group.as_ref(), t)
            } else {
                Ok(t.clone())
            }
        };
        let image = gather(&image)?;
        let teacher_image = if b.teacher_image.dim(1)? == 0 {
            Tensor::zeros((image.dim(0)?, 0), DType::F32, image.device())?
        } else {
            gather(&b.teacher_image)?
        };
        let teacher_text = b.teacher_text.as_ref().map(&gather).transpose()?;
        let labels: Vec<u32> = if dp {
            let local: Vec<f32> = b.labels.iter().map(|&l| l as f32).collect();
            // Labels are below 2^24 (cluster counts are), so f32 carries them exactly.
            group
                .all_gather(&local)?
                .concat()
                .into_iter()
                .map(|l| l as u32)
                .collect()
        } else {
            b.labels.clone()
        };
        let mut terms: Vec<(String, Tensor)> = vec![];
        let mut weighted: Vec<Tensor> = vec![];
        match self.config.mode {
            Mode::Piccollage => {
                let l =
                    self.config
                        .loss
                        .piccollage
                        .forward(&image, &teacher_image, epoch as usize)?;
                weighted.push(l.clone());
                terms.push(("piccollage".into(), l));
            }
            Mode::ClipCid => {
                let cfg = self.config.loss.clone();
                let text = match &b.tokens {
                    Some(t) if self.config.student.freeze_text => {
                        Some(gather(&self.frozen_text(t)?)?)
                    }
                    Some(t) => Some(gather(&model.encode_text(t)?.to_dtype(DType::F32)?)?),
                    None => None,
                };
                let scale = self.model.logit_scale().clone();
                if cfg.clip.enabled {
                    let text = text
                        .as_ref()
                        .ok_or_else(|| TrainError::Config("no captions".into()))?;
                    let l = ClipLoss::new().forward(&image, text, &scale)?;
                    weighted.push((&l * cfg.clip.weight)?);
                    terms.push(("clip".into(), l));
                }
                if cfg.cluster.enabled {
                    let c = self
                        .cluster
                        .as_mut()
                        .ok_or_else(|| TrainError::Config("no cluster file".into()))?;
                    let out = c.forward(&image, &teacher_image, &labels)?;
                    weighted.push((&out.loss * cfg.cluster.weight)?);
                    terms.push(("cluster".into(), out.loss));
                    terms.push(("cluster_cls".into(), out.classification));
                    terms.push(("cluster_kl".into(), out.kl));
                }
                if cfg.instance.enabled {
                    let (text, t_text) = match (&text, &teacher_text) {
                        (Some(a), Some(b)) => (a, b),
                        _ => return Err(TrainError::Config("no teacher text".into())),
                    };
                    let l = InstanceDistillLoss {
                        image_text_weight: cfg.instance.image_text_weight,
                        text_image_weight: cfg.instance.text_image_weight,
                    }
                    .forward(&image, text, &teacher_image, t_text, &scale)?;
                    weighted.push((&l * cfg.instance.weight)?);
                    terms.push(("instance".into(), l));
                }
            }
        }
        let mut total = weighted
            .first()
            .cloned()
            .ok_or_else(|| TrainError::Config("every loss term is disabled".into()))?;
        for w in &weighted[1..] {
            total = (total + w)?;
        }
        // Cosine between unit student and teacher image rows: the distillation's yardstick.
        let cos = if image.dim(1)? == teacher_image.dim(1)? {
            Some(
                clipcid_models::l2_normalize(&image.detach())?
                    .mul(&teacher_image)?
                    .sum(D::Minus1)?
                    .mean_all()?,
            )
        } else {
            None
        };
        Ok(MicroLoss { total, terms, cos })
    }

    /// One optimiser step: `accumulate` micro-batches (gradients summed, each loss divided
    /// by `accumulate`; contrastive negatives come from within each micro-batch), gradient
    /// clipping, AdamW at the scheduled learning rate. A non-finite loss term or gradient
    /// norm stops with [`TrainError::NonFinite`] before any weight changes; in an f16 run
    /// a non-finite gradient is an f16 overflow instead: the step is skipped (its batch is
    /// consumed, no weight changes, [`StepMetrics::skipped`]) and the loss scale backs off.
    pub fn step(&mut self) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        if self.step >= self.total_steps() {
            return Err(TrainError::Config(format!(
                "the run is complete ({} steps)",
                self.total_steps()
            )));
        }
        let epoch = self.step / self.steps_per_epoch;
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.order = Some((epoch, self.epoch_order(epoch)));
        }
        let accum = self.config.optim.accumulate;
        let mut grads: Option<GradStore> = None;
        let mut sums: std::collections::BTreeMap<String, f64> = Default::default();
        let (mut loss_sum, mut cos_sum, mut samples) = (0f64, None::<f64>, 0usize);
        for micro in 0..accum {
            let rows = self.micro_rows(self.step, micro);
            let batch = self.next_batch((self.step, micro), &rows)?;
            for s in &batch.skipped {
                log::warn!(
                    "step {}: skipped sample `{}`: {}",
                    self.step + 1,
                    s.key,
                    s.reason
                );
            }
            samples += batch.rows.len();
            let MicroLoss { total, terms, cos } = self.micro_loss(&batch, epoch)?;
            let factor = self.loss_scale.map_or(1.0, |s| s.scale()) / accum as f64;
            let g = (&total * factor)?.backward()?;
            // The loss values, read once the backward pass is queued: one wait for the device
            // instead of one per value before it. A non-finite term still stops the step
            // before any weight changes.
            let values = terms
                .iter()
                .map(|(_, t)| t)
                .chain([&total])
                .chain(cos.as_ref())
                .map(|t| t.to_dtype(DType::F64)?.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let values = Tensor::cat(&values, 0)?.to_vec1::<f64>()?;
            for ((name, _), &v) in terms.iter().zip(&values) {
                if !v.is_finite() {
                    return Err(self.nonfinite(format!("loss term `{name}` is {v}")));
                }
                *sums.entry(name.clone()).or_default() += v / accum as f64;
            }
            loss_sum += values[terms.len()] / accum as f64;
            if let Some(c) = values.get(terms.len() + 1) {
                cos_sum = Some(cos_sum.unwrap_or(0.0) + c / accum as f64);
            }
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    // Summed in f32: a working copy's bf16 or f16 gradients too, as a master
                    // weight's f32 ones were.
                    for var in self.optimizer.gradient_vars() {
                        if let Some(new) = g.get(&var) {
                            let sum = match acc.get(&var) {
                                Some(old) => {
                                    (old.to_dtype(DType::F32)? + new.to_dtype(DType::F32)?)?
                                }
                                None => new.clone(),
                            };
                            acc.insert(&var, sum);
                        }
                    }
                    acc
                }
            });
        }
        let mut grads = grads.ok_or_else(|| TrainError::Config("no micro-batch".into()))?;
        let vars = self.optimizer.gradient_vars();
        let refs: Vec<&Var> = vars.iter().collect();
        // Data parallel: every rank steps with the mean gradient, so the weights stay equal.
        all_reduce_mean(self.collective.as_ref(), &mut grads, &refs)?;
        if self.collective.world_size() > 1 {
            let all = self.collective.all_gather(&[samples as f32])?;
            samples = all.concat().iter().map(|&n| n as usize).sum();
        }
        let loss_scale = self.loss_scale.map(|s| s.scale());
        let max = if self.config.optim.clip_grad_norm > 0.0 {
            self.config.optim.clip_grad_norm
        } else {
            f64::INFINITY
        };
        // The norm of the unscaled gradients (GradScaler.unscale_ before clipping; with the
        // default scales, powers of two, dividing the norm is exact). Unscaling and clipping
        // reach the gradients as one factor inside AdamW's update, not as a tensor op each.
        let grad_norm = self.optimizer.grad_norm(&grads)? / loss_scale.unwrap_or(1.0);
        let grad_scale = clip_factor(grad_norm, max) / loss_scale.unwrap_or(1.0);
        let lr = self.schedule.lr(self.step);
        let skipped = match self.loss_scale.as_mut() {
            None if !grad_norm.is_finite() => {
                return Err(self.nonfinite(format!("gradient norm is {grad_norm}")));
            }
            None => false,
            Some(s) => {
                s.update(grad_norm.is_finite());
                // Below f16's smallest subnormal no scale can bring the gradients back.
                let scale = s.scale();
                if scale < 2f64.powi(-24) {
                    return Err(self.nonfinite(format!(
                        "gradient norm is {grad_norm} at every loss scale down to {scale}"
                    )));
                }
                !grad_norm.is_finite()
            }
        };
        if skipped {
            log::warn!(
                "step {}: f16 gradients overflowed at loss scale {}; step skipped, scale now {}",
                self.step + 1,
                loss_scale.unwrap_or(1.0),
                self.loss_scale.map_or(1.0, |s| s.scale())
            );
        } else {
            self.optimizer.step_scaled(&grads, lr, grad_scale)?;
        }
        self.step += 1;
        let m = StepMetrics {
            step: self.step,
            epoch,
            lr,
            loss: loss_sum,
            terms: sums,
            teacher_cosine: cos_sum,
            grad_norm,
            samples,
            seconds: start.elapsed().as_secs_f64(),
            loss_scale,
            skipped,
        };
        if self.is_writer() {
            append_metrics(&self.out_dir.join("metrics.jsonl"), &m)?;
        }
        self.history.push(m.clone());
        Ok(m)
    }

    /// Runs until `until` steps are done (the whole run with `None`), checkpointing every
    /// `checkpoint_every` steps and at the end. When the run completes, the student is also
    /// written as a Hugging Face model folder `student/` and the loss curves as `loss.png`.
    pub fn run(&mut self, until: Option<u64>, progress: bool) -> Result<RunSummary, TrainError> {
        let end = until.unwrap_or(u64::MAX).min(self.total_steps());
        let bar = progress_bar(progress, self.total_steps(), self.step);
        let started = Instant::now();
        let first = self.step;
        let mut samples = 0usize;
        let mut last = None;
        while self.step < end {
            let m = self.step()?;
            samples += m.samples;
            let rate = samples as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(self.step);
            bar.set_message(format!(
                "loss {:.4} {}|{} {rate:.1} samples/s",
                m.loss,
                m.terms
                    .iter()
                    .filter(|(k, _)| !k.contains('_'))
                    .map(|(k, v)| format!("{k} {v:.3} "))
                    .collect::<String>(),
                m.teacher_cosine
                    .map(|c| format!(" teacher cos {c:.3} |"))
                    .unwrap_or_default()
            ));
            last = Some(m);
            let every = self.config.checkpoint_every.max(1);
            if self.is_writer() && self.step.is_multiple_of(every) && self.step < self.total_steps()
            {
                self.save_checkpoint()?;
                crate::plot::plot_loss_curves(&self.out_dir.join("loss.png"), &self.history)?;
            }
        }
        bar.finish_and_clear();
        let done = self.step >= self.total_steps();
        if self.is_writer() && (self.step > first || done) {
            self.save_checkpoint()?;
            if !self.history.is_empty() {
                crate::plot::plot_loss_curves(&self.out_dir.join("loss.png"), &self.history)?;
            }
        }
        if self.collective.world_size() > 1 {
            // Every rank returns once rank 0's checkpoint is written (a resume reads it).
            self.collective.all_gather(&[])?;
        }
        let student = if done && self.is_writer() {
            let dir = self.out_dir.join("student");
            // Staged and moved in together (see `write_folder`): a full disk part way left
            // the new weights beside no tokenizer, or beside an earlier run's files.
            clipcid_store::io::write_folder(&dir, |staged| self.write_student(staged))?;
            Some(dir)
        } else {
            None
        };
        Ok(RunSummary {
            steps: self.step,
            steps_this_run: self.step - first,
            samples_per_second: samples as f64 / started.elapsed().as_secs_f64().max(1e-9),
            last: last.or_else(|| self.history.last().cloned()),
            checkpoint: self.last_checkpoint.clone(),
            student,
        })
    }

    /// The final student folder's files in `dir`: weights, tokenizer and preprocessing, what
    /// transformers' `CLIPModel` and `CLIPProcessor` load.
    fn write_student(&self, dir: &Path) -> Result<(), TrainError> {
        self.model.save_pretrained(dir, DType::F32)?;
        // A run that reads no captions (PicCollage) keeps its init's text tower, so its
        // init's tokenizer.
        let init_tokenizer = || -> Result<Option<ClipTokenizer>, TrainError> {
            let found = self
                .config
                .student
                .init
                .as_deref()
                .and_then(ClipTokenizer::find_beside);
            let context = self.model.config().text_config.default_context_length();
            Ok(found
                .map(|p| ClipTokenizer::load(&p, context))
                .transpose()?)
        };
        if let Some(tok) = &self.tokenizer {
            tok.save_pretrained(dir)?;
        } else if let Some(tok) = init_tokenizer()? {
            tok.save_pretrained(dir)?;
        }
        self.preprocess.save_hf_preprocessor_config(dir)?;
        Ok(())
    }
}

fn progress_bar(show: bool, total: u64, at: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "distill [{elapsed_precise}] {bar:30} {pos}/{len} steps (eta {eta}) {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_position(at);
    bar
}
