//! Checkpoints: writing one for the current step, and resuming a run from the newest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Var};
use serde::{Deserialize, Serialize};

use super::{read_metrics, write_metrics, Trainer, CENTRES};
use crate::{DistillConfig, TrainError};

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    partial_fc_rng: Option<String>,
    config: String,
    /// Provenance of the teacher embeddings the run trains on (absent in older checkpoints).
    #[serde(default)]
    embeddings: Option<String>,
    /// AdamW's own step count when it differs from `step` (f16 runs skip overflowed steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    optimizer_steps: Option<u64>,
    /// An f16 run's loss scale and its streak of finite steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scale: Option<(f64, u64)>,
    /// Ranks of a data-parallel run (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    world_size: Option<usize>,
    /// Digest of the training rows ([`TrainingSet::ids_digest`](crate::TrainingSet::ids_digest));
    /// absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rows: Option<String>,
    /// Digest of their pseudo-labels, in a run with a cluster file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<String>,
}

impl Trainer {
    /// [`Trainer::new`], then restores the newest checkpoint in `out_dir` (named by
    /// `checkpoints/latest`): weights, optimiser moments, cluster centres, step and sampler
    /// position. Metrics after that step are dropped from `metrics.jsonl`. A config that
    /// changes the data order (batch size, accumulation, seed, epochs) or the rows
    /// (`data.subset`, `subset_seed`) is refused, and so are inputs rewritten since the
    /// checkpoint: other rows (a new keep file) or other pseudo-labels (a new cluster file).
    pub fn resume(
        config: DistillConfig,
        out_dir: &Path,
        device: &Device,
    ) -> Result<Self, TrainError> {
        Self::resume_data_parallel(
            config,
            out_dir,
            device,
            std::sync::Arc::new(crate::SingleProcess),
        )
    }

    /// [`Trainer::resume`] for one rank of a data-parallel run
    /// ([`Trainer::new_data_parallel`]): every rank loads rank 0's newest checkpoint; rank
    /// 0 alone locks the folder and trims `metrics.jsonl`. The number of ranks must be the
    /// checkpoint's (it sets the global batch, and so the data order).
    pub fn resume_data_parallel(
        config: DistillConfig,
        out_dir: &Path,
        device: &Device,
        collective: std::sync::Arc<dyn crate::Collective>,
    ) -> Result<Self, TrainError> {
        let lock = super::claim_as_rank(&config, out_dir, collective.as_ref())?;
        let latest = out_dir.join("checkpoints").join("latest");
        let name = std::fs::read_to_string(&latest)
            .map_err(|e| TrainError::io(&latest, "no checkpoint to resume from", e))?;
        let dir = out_dir.join("checkpoints").join(name.trim());
        let mut t = Self::build(config, out_dir, device, lock, collective)?;
        t.load_checkpoint(&dir)?;
        Ok(t)
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<(), TrainError> {
        let file = dir.join("trainer.safetensors");
        let header = clipcid_store::io::read_header(&file)?;
        let state: TrainerState = header
            .metadata
            .get("state")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                TrainError::Input(format!(
                    "{}: no trainer state in the metadata",
                    file.display()
                ))
            })?;
        if let (Some(then), Some(now)) = (&state.embeddings, self.set.provenance()) {
            let fields = clipcid_store::differing_fields(then, now);
            if !fields.is_empty() {
                return Err(TrainError::Config(format!(
                    "{}: the checkpoint was trained on other teacher embeddings than `{}` holds now (different {}); resuming would mix two teachers",
                    dir.display(),
                    self.config
                        .data
                        .embeddings
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display(),
                    fields.join(", ")
                )));
            }
        }
        let saved: DistillConfig = toml::from_str(&state.config)
            .map_err(|e| TrainError::Input(format!("{}: bad saved config: {e}", file.display())))?;
        for (what, a, b) in [
            (
                "batch_size",
                saved.batch_size as u64,
                self.config.batch_size as u64,
            ),
            (
                "optim.accumulate",
                saved.optim.accumulate as u64,
                self.config.optim.accumulate as u64,
            ),
            ("seed", saved.seed, self.config.seed),
            ("epochs", saved.epochs as u64, self.config.epochs as u64),
        ] {
            if a != b {
                return Err(TrainError::Config(format!(
                    "{}: the checkpoint was trained with {what} = {a}, this config says {b}; resuming would not continue the same run",
                    dir.display()
                )));
            }
        }
        // The rows themselves: another subset trains on other data.
        let rows = |d: &crate::DataConfig| match d.subset {
            Some(n) => format!("data.subset = {n} (subset_seed = {})", d.subset_seed),
            None => "every row (no data.subset)".to_string(),
        };
        let (then_rows, now_rows) = (rows(&saved.data), rows(&self.config.data));
        if then_rows != now_rows {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint was trained on {then_rows}, this config says {now_rows}; resuming would not continue the same run",
                dir.display()
            )));
        }
        // The rows and labels themselves: a keep file, dataset or cluster file rewritten
        // since the checkpoint (another balance threshold, another k-means) trained on
        // without a word.
        let (rows_now, labels_now) = self.input_digests();
        if state.rows.as_ref().is_some_and(|then| then != rows_now) {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint was trained on other rows than this config gives now (the keep file, the dataset or its captions changed since); resuming would not continue the same run",
                dir.display()
            )));
        }
        if let (Some(then), Some(now)) = (&state.labels, labels_now) {
            if then != now {
                return Err(TrainError::Config(format!(
                    "{}: the checkpoint was trained with other pseudo-labels than `{}` gives now (the cluster file was remade since); resuming would not continue the same run",
                    dir.display(),
                    self.config
                        .data
                        .clusters
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display()
                )));
            }
        }
        let (then, now) = (state.world_size.unwrap_or(1), self.collective.world_size());
        if then != now {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint was trained by {then} rank(s), this run has {now}; the global batch and data order would change",
                dir.display()
            )));
        }
        if saved.mode != self.config.mode {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint is a {:?} run, this config is {:?}",
                dir.display(),
                saved.mode,
                self.config.mode
            )));
        }
        let ckpt = clipcid_models::Checkpoint::read(
            &dir.join("model.safetensors"),
            Some(self.model.config().clone()),
        )?;
        let tensors = clipcid_store::io::load_tensors(&file)?;
        check_trainer_state(&file, &tensors, state.loss_scale)?;
        // Every student parameter (frozen ones too: the text tower in PicCollage mode).
        let vars: Vec<(String, Var)> = {
            let data = self
                .varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Config("parameter map lock poisoned".into()))?;
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
        };
        for (name, var) in &vars {
            let src = ckpt.tensors.get(name).ok_or_else(|| {
                TrainError::Input(format!("{}: checkpoint lacks `{name}`", dir.display()))
            })?;
            var.set(&src.to_device(&self.device)?.to_dtype(var.dtype())?)?;
        }
        if let Some(c) = &self.cluster {
            let src = tensors.get(CENTRES).ok_or_else(|| {
                TrainError::Input(format!("{}: checkpoint lacks `{CENTRES}`", file.display()))
            })?;
            let w = c.fc.weight();
            if src.dims() != w.dims() {
                return Err(TrainError::Input(format!(
                    "{}: `{CENTRES}` is {:?} but the cluster file gives {:?}",
                    file.display(),
                    src.dims(),
                    w.dims()
                )));
            }
            w.set(&src.to_device(&self.device)?.to_dtype(w.dtype())?)?;
        }
        self.optimizer
            .load_state(&tensors, state.optimizer_steps.unwrap_or(state.step))
            .map_err(|e| TrainError::Input(format!("{}: {e}", file.display())))?;
        // A bf16 or f16 run's working copies are made again from the loaded weights.
        self.half = None;
        if let (Some(s), Some((scale, good))) = (self.loss_scale.as_mut(), state.loss_scale) {
            s.restore(scale, good);
        }
        if let (Some(c), Some(pos)) = (self.cluster.as_mut(), state.partial_fc_rng.as_deref()) {
            let pos: u128 = pos.parse().map_err(|_| {
                TrainError::Input(format!("{}: bad sampler position", file.display()))
            })?;
            c.fc.set_rng_position(pos);
        }
        self.step = state.step;
        self.last_checkpoint = Some(dir.to_path_buf());
        self.history = read_metrics(&self.out_dir.join("metrics.jsonl"))?
            .into_iter()
            .filter(|m| m.step <= self.step)
            .collect();
        if self.is_writer() {
            write_metrics(&self.out_dir.join("metrics.jsonl"), &self.history)?;
        }
        Ok(())
    }

    /// Writes a checkpoint for the current step (see [`Trainer`] for the layout) and points
    /// `checkpoints/latest` at it. Only the three newest step folders are kept.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let root = self.out_dir.join("checkpoints");
        let name = format!("step-{:08}", self.step);
        let dir = root.join(&name);
        // Not `io::write_folder`, which merges new files into a folder's old ones: a step's
        // folder is replaced whole (a checkpoint holds exactly one save's files). The run
        // folder's lock keeps other processes out, so the hidden name needs no process id.
        let tmp = root.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let written = self.write_checkpoint_files(&tmp);
        if written.is_err() {
            // A failed write leaves no hidden half-checkpoint behind.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)
            .map_err(|e| TrainError::io(&dir, "cannot move the checkpoint into place", e))?;
        clipcid_store::io::write_atomic(&root.join("latest"), name.as_bytes())?;
        self.last_checkpoint = Some(dir.clone());
        self.prune_checkpoints(&root, &dir)?;
        Ok(dir)
    }

    /// The digests of the training rows and of their pseudo-labels, taken once.
    fn input_digests(&self) -> (&str, Option<&str>) {
        let (rows, labels) = self
            .inputs
            .get_or_init(|| (self.set.ids_digest(), self.set.labels_digest()));
        (rows, labels.as_deref())
    }

    /// The files of a checkpoint (weights, optimiser state, sampler position, config) in `tmp`.
    fn write_checkpoint_files(&self, tmp: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(tmp)
            .map_err(|e| TrainError::io(tmp, "cannot create checkpoint folder", e))?;
        self.model.save_pretrained(tmp, DType::F32)?;
        let (mut tensors, steps) = self.optimizer.state()?;
        if let Some(c) = &self.cluster {
            tensors.push((CENTRES.into(), c.fc.weight().as_tensor().clone()));
        }
        let state = TrainerState {
            step: self.step,
            optimizer_steps: (steps != self.step).then_some(steps),
            loss_scale: self.loss_scale.map(|s| (s.scale(), s.good_steps())),
            world_size: (self.collective.world_size() > 1).then(|| self.collective.world_size()),
            partial_fc_rng: self
                .cluster
                .as_ref()
                .map(|c| c.fc.rng_position().to_string()),
            config: toml::to_string(&self.config)
                .map_err(|e| TrainError::Config(format!("cannot serialise the config: {e}")))?,
            embeddings: self.set.provenance().map(str::to_string),
            rows: Some(self.input_digests().0.to_string()),
            labels: self.input_digests().1.map(str::to_string),
        };
        let meta: HashMap<String, String> = [(
            "state".to_string(),
            serde_json::to_string(&state).map_err(|e| TrainError::Config(e.to_string()))?,
        )]
        .into();
        clipcid_store::io::write_safetensors(&tmp.join("trainer.safetensors"), tensors, &meta)?;
        Ok(())
    }

    /// Keeps the three newest step folders, never `current` (the one just written).
    fn prune_checkpoints(&self, root: &Path, current: &Path) -> Result<(), TrainError> {
        let mut old: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| TrainError::io(root, "cannot list checkpoints", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-"))
            })
            .collect();
        old.sort();
        if old.len() > 3 {
            for p in old[..old.len() - 3]
                .iter()
                .filter(|p| p.as_path() != current)
            {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(())
    }
}

/// The optimiser state and cluster centres of `trainer.safetensors` are finite floating-point
/// values, AdamW's second moments are not negative (their square root divides each update),
/// and an f16 run's saved loss scale is a positive finite number: a damaged or hand-edited
/// checkpoint would otherwise resume into NaN weights a step later (or, with an infinite
/// scale, skip every step as an overflow) without naming the file.
fn check_trainer_state(
    file: &Path,
    tensors: &HashMap<String, candle_core::Tensor>,
    loss_scale: Option<(f64, u64)>,
) -> Result<(), TrainError> {
    let bad = |msg: String| TrainError::Input(format!("{}: {msg}", file.display()));
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if !t.dtype().is_float() {
            return Err(bad(format!(
                "`{name}` holds {:?} values, not floating point",
                t.dtype()
            )));
        }
        if !clipcid_kernels::all_finite(t)? {
            return Err(bad(format!("`{name}` holds NaN or infinite values")));
        }
        if name.starts_with("adamw.v.") && t.elem_count() > 0 {
            let min = t
                .flatten_all()?
                .to_dtype(DType::F32)?
                .min(0)?
                .to_scalar::<f32>()?;
            if min < 0.0 {
                return Err(bad(format!(
                    "`{name}` holds a negative second moment ({min})"
                )));
            }
        }
    }
    if let Some((scale, _)) = loss_scale {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(bad(format!(
                "the saved loss scale {scale} is not a positive finite number"
            )));
        }
    }
    Ok(())
}
