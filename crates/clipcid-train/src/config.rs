//! The distillation run's TOML configuration: every loss term switchable and weighted.

use std::path::{Path, PathBuf};

use clipcid_loss::Margin;
use serde::{Deserialize, Serialize};

use crate::{AdamWConfig, TrainError};

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// CLIP-CID: both towers, `L = w_clip L_clip + w_cluster L_cluster + w_instance L_instance`.
    #[default]
    ClipCid,
    /// PicCollage: the image tower only, KL (temperature schedule) + L1 to the teacher.
    Piccollage,
}

/// Inputs of the run (paths relative to the config file's folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset the teacher embedded (captions file, tar shards, or labelled folder), as
    /// `clipcid embed --data` takes it: also a pattern such as `shards/{00000..00099}.tar`,
    /// `shards/*.tar` or several sources joined by `::` (each relative to the config file).
    pub dataset: PathBuf,
    /// Folder of teacher embedding shards from `clipcid embed`. Needed by every term that
    /// compares with the teacher (cluster, instance, PicCollage); a CLIP-only run (the
    /// no-distillation baseline) without it trains on every captioned sample.
    pub embeddings: Option<PathBuf>,
    /// Keep file from `clipcid balance` (optional: all rows are used without it).
    pub keep: Option<PathBuf>,
    /// Cluster file from `clipcid cluster` (needed by the cluster loss).
    pub clusters: Option<PathBuf>,
    /// `tokenizer.json` for the captions.
    pub tokenizer: Option<PathBuf>,
    /// Train on this many of the rows (after the keep list and the caption filter), drawn
    /// at random with `subset_seed`: a data-limited run. The draw depends on the rows and
    /// `subset_seed` only, not on `seed`, so runs of several seeds and loss terms share it.
    /// More than the rows there are is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<usize>,
    /// Seed of the `subset` draw.
    #[serde(default)]
    pub subset_seed: u64,
}

/// The student CLIP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    /// A preset name (`vit-b-32`, `piccollage-s12`, `tiny`, ...) or, for any other size, a
    /// path (relative to the config file): a Hugging Face or open_clip config file, a model
    /// folder, or a `.safetensors` checkpoint carrying its config (`clipcid init-model`'s).
    pub model: String,
    /// Start from these weights instead of a seeded random init.
    pub init: Option<PathBuf>,
    /// Locked-text tuning (LiT): keep the text tower and text projection as initialised
    /// (from `init`) and train only the image tower and the logit scale against it. The text
    /// features are detached, so no gradient is computed through the text tower.
    #[serde(default)]
    pub freeze_text: bool,
    /// Tokens per caption; defaults to the text tower's `max_position_embeddings` (77 for
    /// CLIP; set it for BERT towers, whose 512 positions are far more than a caption needs).
    pub context_length: Option<usize>,
}

impl Default for StudentConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            init: None,
            freeze_text: false,
            context_length: None,
        }
    }
}

/// A loss term that can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TermConfig {
    /// Whether the term is in the loss.
    pub enabled: bool,
    /// Its weight.
    pub weight: f64,
}

impl Default for TermConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            weight: 1.0,
        }
    }
}

/// The cluster-level term ([`clipcid_loss::ClusterDistillLoss`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterTermConfig {
    /// Whether the term is in the loss.
    pub enabled: bool,
    /// Its weight.
    pub weight: f64,
    /// PartialFC share of centres per step.
    pub sample_rate: f64,
    /// Logit scale.
    pub scale: f64,
    /// Target margin.
    pub margin: Margin,
    /// Weight of the teacher-student KL inside the term.
    pub kl_weight: f64,
    /// Temperature of that KL.
    pub kl_temperature: f64,
}

impl Default for ClusterTermConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            weight: 1.0,
            sample_rate: 0.1,
            scale: 64.0,
            margin: Margin::None,
            kl_weight: 1.0,
            kl_temperature: 1.0,
        }
    }
}

/// The instance-level term ([`clipcid_loss::InstanceDistillLoss`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceTermConfig {
    /// Whether the term is in the loss.
    pub enabled: bool,
    /// Its weight.
    pub weight: f64,
    /// Student image vs teacher text.
    pub image_text_weight: f64,
    /// Student text vs teacher image.
    pub text_image_weight: f64,
}

impl Default for InstanceTermConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            weight: 1.0,
            image_text_weight: 1.0,
            text_image_weight: 1.0,
        }
    }
}

/// The loss terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Student's own image-text InfoNCE.
    pub clip: TermConfig,
    /// Cluster-level distillation.
    pub cluster: ClusterTermConfig,
    /// Instance-level distillation.
    pub instance: InstanceTermConfig,
    /// PicCollage mode's loss.
    pub piccollage: clipcid_loss::PicCollageLoss,
}

/// Optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// AdamW.
    pub adamw: AdamWConfig,
    /// Clip gradients to this global norm (0: off).
    pub clip_grad_norm: f64,
    /// Micro-batches per optimiser step.
    pub accumulate: usize,
    /// Compute precision of the student's forward and backward passes. `bf16` is open_clip's
    /// `amp_bf16`: the weights, AdamW's moments and the losses stay f32 (master weights);
    /// each step runs the towers on bf16 casts of the weights, and the gradients flow back
    /// through the casts to the f32 weights (bf16 has f32's exponent range and needs no loss
    /// scaling). `f16` is the same with f16 casts and dynamic loss
    /// scaling ([`LossScale`](crate::LossScale), set in `loss_scale`).
    pub precision: TrainPrecision,
    /// Dynamic loss scaling of f16 runs (ignored otherwise); PyTorch GradScaler's defaults.
    pub loss_scale: crate::LossScaleConfig,
}

/// Compute precision of a training step ([`OptimConfig::precision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// Everything in f32.
    #[default]
    F32,
    /// Towers in bfloat16, weights, optimiser state and losses in f32.
    Bf16,
    /// Towers in float16 with dynamic loss scaling; weights, optimiser state and losses in
    /// f32. Steps whose scaled gradients overflow are skipped.
    F16,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            min_lr: 0.0,
            warmup_steps: 100,
            adamw: AdamWConfig::default(),
            clip_grad_norm: 1.0,
            accumulate: 1,
            precision: TrainPrecision::F32,
            loss_scale: crate::LossScaleConfig::default(),
        }
    }
}

/// A whole distillation run, as read from TOML. [`Default`] gives what an empty file's
/// `[data]`-only config gives (batch 32, 1 epoch, seed 0, a checkpoint every 500 steps), so
/// `..DistillConfig::default()` fills a config built in code the way TOML defaults do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// CLIP-CID or PicCollage.
    #[serde(default)]
    pub mode: Mode,
    /// Inputs.
    pub data: DataConfig,
    /// The student.
    #[serde(default)]
    pub student: StudentConfig,
    /// Loss terms.
    #[serde(default)]
    pub loss: LossConfig,
    /// Optimisation.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Samples per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Passes over the data.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Seed of the init, the data order and PartialFC sampling.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint every this many optimiser steps (and at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Micro-batches read and decoded ahead of the step on a worker thread (0: each step
    /// decodes its own). Changes when decoding happens, never what the batches hold.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            data: DataConfig::default(),
            student: StudentConfig::default(),
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
            batch_size: default_batch(),
            epochs: default_epochs(),
            seed: 0,
            checkpoint_every: default_checkpoint_every(),
            prefetch: default_prefetch(),
        }
    }
}

fn default_prefetch() -> usize {
    2
}

fn default_batch() -> usize {
    32
}

fn default_epochs() -> usize {
    1
}

fn default_checkpoint_every() -> u64 {
    500
}

impl DistillConfig {
    /// Reads a TOML file. Unknown keys, missing required keys and bad values are errors
    /// naming the file (and the key, as the TOML parser reports it); relative paths are
    /// resolved against the file's folder and must exist.
    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::Config(format!("{}: cannot read: {e}", path.display())))?;
        let mut cfg: Self = toml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        // Each `::`-joined source of a dataset pattern is relative on its own.
        match self.data.dataset.to_str() {
            Some(text) if text.contains(clipcid_data::SOURCE_SEPARATOR) => {
                let parts: Vec<String> = text
                    .split(clipcid_data::SOURCE_SEPARATOR)
                    .map(|part| {
                        let mut p = PathBuf::from(part);
                        fix(&mut p);
                        p.display().to_string()
                    })
                    .collect();
                self.data.dataset = PathBuf::from(parts.join(clipcid_data::SOURCE_SEPARATOR));
            }
            _ => fix(&mut self.data.dataset),
        }
        // `student.model` is a preset name or a path (config, folder, checkpoint) relative
        // to this file.
        if clipcid_models::ClipConfig::preset(&self.student.model).is_err()
            && Path::new(&self.student.model).is_relative()
        {
            self.student.model = base.join(&self.student.model).display().to_string();
        }
        for p in [
            &mut self.data.embeddings,
            &mut self.data.keep,
            &mut self.data.clusters,
            &mut self.data.tokenizer,
            &mut self.student.init,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// Every number in range: learning rates, AdamW's betas, epsilon and weight decay,
    /// gradient clipping, loss weights, temperatures and margins, PicCollage's temperature
    /// schedule (positive, rising epochs), and a step count that fits.
    fn validate_numbers(&self) -> Result<(), String> {
        let o = &self.optim;
        let a = &o.adamw;
        let in_range = |name: &str, v: f64, ok: bool, want: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(format!("{name} must be {want}, got {v}"))
            }
        };
        in_range(
            "optim.min_lr",
            o.min_lr,
            o.min_lr >= 0.0 && o.min_lr <= o.lr,
            "in [0, optim.lr]",
        )?;
        in_range(
            "optim.adamw.beta1",
            a.beta1,
            (0.0..1.0).contains(&a.beta1),
            "in [0, 1)",
        )?;
        in_range(
            "optim.adamw.beta2",
            a.beta2,
            (0.0..1.0).contains(&a.beta2),
            "in [0, 1)",
        )?;
        in_range("optim.adamw.eps", a.eps, a.eps > 0.0, "positive")?;
        in_range(
            "optim.adamw.weight_decay",
            a.weight_decay,
            a.weight_decay >= 0.0,
            "zero or positive",
        )?;
        in_range(
            "optim.clip_grad_norm",
            o.clip_grad_norm,
            o.clip_grad_norm >= 0.0,
            "zero (off) or positive",
        )?;
        let ls = &o.loss_scale;
        in_range("optim.loss_scale.init", ls.init, ls.init > 0.0, "positive")?;
        in_range(
            "optim.loss_scale.growth_factor",
            ls.growth_factor,
            ls.growth_factor >= 1.0,
            "at least 1",
        )?;
        in_range(
            "optim.loss_scale.backoff_factor",
            ls.backoff_factor,
            ls.backoff_factor > 0.0 && ls.backoff_factor < 1.0,
            "in (0, 1)",
        )?;
        if ls.growth_interval == 0 {
            return Err("optim.loss_scale.growth_interval must be at least 1".into());
        }
        let l = &self.loss;
        for (name, v) in [
            ("loss.clip.weight", l.clip.weight),
            ("loss.cluster.weight", l.cluster.weight),
            ("loss.cluster.kl_weight", l.cluster.kl_weight),
            ("loss.instance.weight", l.instance.weight),
            (
                "loss.instance.image_text_weight",
                l.instance.image_text_weight,
            ),
            (
                "loss.instance.text_image_weight",
                l.instance.text_image_weight,
            ),
            ("loss.piccollage.kl_weight", l.piccollage.kl_weight),
            ("loss.piccollage.l1_weight", l.piccollage.l1_weight),
        ] {
            in_range(name, v, v >= 0.0, "zero or positive")?;
        }
        in_range(
            "loss.cluster.scale",
            l.cluster.scale,
            l.cluster.scale > 0.0,
            "positive",
        )?;
        in_range(
            "loss.cluster.kl_temperature",
            l.cluster.kl_temperature,
            l.cluster.kl_temperature > 0.0,
            "positive",
        )?;
        match l.cluster.margin {
            Margin::None => {}
            Margin::ArcFace(m) => in_range(
                "loss.cluster.margin (arcface)",
                m,
                (0.0..std::f64::consts::PI).contains(&m),
                "an angle in [0, pi)",
            )?,
            Margin::CosFace(m) => in_range(
                "loss.cluster.margin (cosface)",
                m,
                (0.0..=2.0).contains(&m),
                "in [0, 2]",
            )?,
        }
        let steps = &l.piccollage.schedule.steps;
        if steps.is_empty() {
            return Err(
                "loss.piccollage.schedule.steps needs at least one [epoch, temperature]".into(),
            );
        }
        for (i, &(epoch, t)) in steps.iter().enumerate() {
            in_range(
                "a loss.piccollage.schedule temperature",
                t,
                t > 0.0,
                "positive",
            )?;
            if i > 0 && epoch <= steps[i - 1].0 {
                return Err(format!(
                    "loss.piccollage.schedule.steps must have rising epochs, but epoch {epoch} follows {}",
                    steps[i - 1].0
                ));
            }
        }
        // The step counter is epochs x steps per epoch: bound epochs so it cannot overflow.
        const MAX_EPOCHS: usize = 1_000_000;
        if self.epochs > MAX_EPOCHS {
            return Err(format!(
                "epochs = {} is beyond any run (at most {MAX_EPOCHS})",
                self.epochs
            ));
        }
        // One step's rows are batch_size x optim.accumulate (x ranks): bound both so the
        // product cannot overflow (it wrapped to 0 and divided by it).
        const MAX_BATCH: usize = 1 << 24;
        const MAX_ACCUMULATE: usize = 1 << 16;
        if self.batch_size > MAX_BATCH || self.optim.accumulate > MAX_ACCUMULATE {
            return Err(format!(
                "batch_size = {} or optim.accumulate = {} is beyond any run (at most {MAX_BATCH} and {MAX_ACCUMULATE})",
                self.batch_size, self.optim.accumulate
            ));
        }
        Ok(())
    }

    /// Checks values and that every named input exists.
    pub fn validate(&self) -> Result<(), String> {
        let must_exist = |what: &str, p: &Path| {
            if p.exists() {
                Ok(())
            } else {
                Err(format!("{what} `{}` does not exist", p.display()))
            }
        };
        // A pattern (`shards/{00000..00099}.tar`, globs, `::`) is checked when it is opened.
        if !self
            .data
            .dataset
            .to_str()
            .is_some_and(clipcid_data::is_pattern)
        {
            must_exist("data.dataset", &self.data.dataset)?;
        }
        for (what, p) in [
            ("data.embeddings", &self.data.embeddings),
            ("data.keep", &self.data.keep),
            ("data.clusters", &self.data.clusters),
            ("data.tokenizer", &self.data.tokenizer),
            ("student.init", &self.student.init),
        ] {
            if let Some(p) = p {
                must_exist(what, p)?;
            }
        }
        if self.student.freeze_text && self.student.init.is_none() {
            return Err(
                "student.freeze_text needs student.init: the locked text tower must be pretrained"
                    .into(),
            );
        }
        if self.data.subset == Some(0) {
            return Err("data.subset must be at least 1 row".into());
        }
        if self.student.context_length.is_some_and(|c| c < 2) {
            return Err("student.context_length must be at least 2 (start and end tokens)".into());
        }
        if self.batch_size == 0 || self.epochs == 0 || self.optim.accumulate == 0 {
            return Err("batch_size, epochs and optim.accumulate must be at least 1".into());
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return Err(format!("optim.lr must be positive, got {}", self.optim.lr));
        }
        self.validate_numbers()?;
        let l = &self.loss;
        let teacher_terms =
            self.mode == Mode::Piccollage || l.cluster.enabled || l.instance.enabled;
        if teacher_terms && self.data.embeddings.is_none() {
            return Err(
                "data.embeddings is required: the enabled loss terms compare with the teacher"
                    .into(),
            );
        }
        if self.data.embeddings.is_none() && self.data.keep.is_some() {
            return Err(
                "data.keep needs data.embeddings (the keep list names embedding rows)".into(),
            );
        }
        if self.mode == Mode::ClipCid {
            if !(l.clip.enabled || l.cluster.enabled || l.instance.enabled) {
                return Err("every loss term is disabled".into());
            }
            if l.cluster.enabled && self.data.clusters.is_none() {
                return Err("loss.cluster is enabled but data.clusters is not set".into());
            }
            if !(l.cluster.sample_rate > 0.0 && l.cluster.sample_rate <= 1.0) {
                return Err(format!(
                    "loss.cluster.sample_rate must be in (0, 1], got {}",
                    l.cluster.sample_rate
                ));
            }
        }
        Ok(())
    }
}
