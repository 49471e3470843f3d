//! Locked-text (LiT) teachers: a pretrained sentence encoder frozen as the text tower and a
//! CLIP image tower trained contrastively against it, for when no pretrained CLIP is at hand.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clipcid_models::{locked_text_tensors, ClipModel, VisionConfig};
use serde::{Deserialize, Serialize};

use crate::{DistillConfig, RunSummary, TrainError, Trainer};

/// What a locked-text teacher is built from. Saved as `teacher.json` beside the model, with
/// digests of the dataset ([`clipcid_data::Dataset::fingerprint`]) and of the text tower's
/// files; a folder whose record equals the request, digests included, is reused instead of
/// trained again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedTextOptions {
    /// The frozen text tower: a BERT folder with `config.json`, `model.safetensors` and
    /// `tokenizer.json` (e.g. sentence-transformers all-MiniLM-L6-v2).
    pub text_tower: PathBuf,
    /// Captioned training images (WebDataset shards, a captions file...).
    pub dataset: PathBuf,
    /// Shape of the image tower trained against the text tower.
    pub vision: VisionConfig,
    /// Passes over the data.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak AdamW learning rate (warm-up then cosine decay).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Tokens per caption.
    pub context_length: usize,
    /// Seed of the image tower's init and of the data order.
    pub seed: u64,
}

/// A build's `teacher.json`: its options and digests of the inputs they name, so that a
/// build is reused for the same data and text tower, not merely the same paths (a
/// re-fetched dataset or another tower copied to the same folder reused a stale teacher).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BuildRecord {
    #[serde(flatten)]
    options: LockedTextOptions,
    /// [`clipcid_data::Dataset::fingerprint`] of `options.dataset`.
    dataset_fingerprint: String,
    /// SHA-256 of the text tower's `config.json`, `model.safetensors` and `tokenizer.json`.
    text_tower_digest: String,
}

impl BuildRecord {
    fn of(options: &LockedTextOptions) -> Result<Self, TrainError> {
        let dataset_fingerprint = clipcid_data::Dataset::open(&options.dataset)?.fingerprint()?;
        let mut files = vec![];
        for name in ["config.json", "model.safetensors", "tokenizer.json"] {
            let path = options.text_tower.join(name);
            // A missing file is reported by the build itself, naming it.
            let bytes = std::fs::read(&path).unwrap_or_default();
            files.push(name.as_bytes().to_vec());
            files.push((bytes.len() as u64).to_le_bytes().to_vec());
            files.push(bytes);
        }
        Ok(Self {
            options: options.clone(),
            dataset_fingerprint,
            text_tower_digest: clipcid_store::sha256_hex(&files),
        })
    }
}

impl LockedTextOptions {
    /// The defaults clipcid's demo uses: a 32 px, patch-8, width-128, 4-layer image tower,
    /// 4 epochs of batch 128 at learning rate 1e-3, 32 caption tokens.
    pub fn new(text_tower: &Path, dataset: &Path) -> Self {
        Self {
            text_tower: text_tower.to_path_buf(),
            dataset: dataset.to_path_buf(),
            vision: VisionConfig {
                hidden_size: 128,
                intermediate_size: 512,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                ..VisionConfig::default()
            },
            epochs: 4,
            batch_size: 128,
            lr: 1e-3,
            warmup_steps: 50,
            context_length: 32,
            seed: 0,
        }
    }

    /// Checks the options alone (no file is read): at least one epoch and one image per
    /// step, a positive finite learning rate, and an image tower whose shape is consistent
    /// ([`clipcid_models::ClipConfig::validate`]'s rules for the vision side).
    ///
    /// ```
    /// use clipcid_train::LockedTextOptions;
    /// let mut opts = LockedTextOptions::new("minilm".as_ref(), "shards".as_ref());
    /// assert!(opts.check().is_ok());
    /// opts.epochs = 0;
    /// assert!(opts.check().unwrap_err().to_string().contains("epochs"));
    /// ```
    pub fn check(&self) -> Result<(), TrainError> {
        let bad = |msg: String| Err(TrainError::Config(format!("locked-text teacher: {msg}")));
        if self.epochs == 0 || self.batch_size == 0 {
            return bad(format!(
                "epochs ({}) and batch size ({}) must be at least 1",
                self.epochs, self.batch_size
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!(
                "the learning rate must be positive, got {}",
                self.lr
            ));
        }
        if self.context_length == 0 {
            return bad("the context length must be at least 1 token".into());
        }
        let shape = clipcid_models::ClipConfig {
            vision_config: self.vision.clone(),
            ..clipcid_models::ClipConfig::default()
        };
        if let Err(e) = shape.validate() {
            return bad(format!("image tower: {e}"));
        }
        Ok(())
    }
}

/// A locked-text teacher folder.
#[derive(Debug, Clone)]
pub struct LockedTextTeacher {
    /// The Hugging Face-style model folder: `model.safetensors`, `config.json`,
    /// `tokenizer.json`, `teacher.json`, `TEACHER.md`.
    pub dir: PathBuf,
    /// Whether an existing folder built from the same options and inputs was reused.
    pub reused: bool,
    /// The training run's summary (`None` when reused).
    pub run: Option<RunSummary>,
}

/// Builds a locked-text teacher in `out_dir`, or reuses the one already there when its
/// `teacher.json` records the same options, the same dataset fingerprint and the same text
/// tower files (by SHA-256; a record without them, from before they were recorded, is
/// rebuilt once).
///
/// The text tower and its identity projection are loaded from `options.text_tower` and stay
/// frozen ([`crate::StudentConfig::freeze_text`]); the image tower starts from a seeded init
/// and is trained with the CLIP contrastive loss against the frozen caption embeddings, as
/// LiT does. The run's TOML is kept in `out_dir/run/lit.toml` (re-run it with
/// `clipcid distill`). The result is **not** an OpenAI CLIP: its text space is MiniLM's and
/// its image tower has seen only `options.dataset`.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_train::{build_locked_text_teacher, LockedTextOptions};
/// let opts = LockedTextOptions::new("data/raw/minilm".as_ref(), "data/shards".as_ref());
/// let teacher = build_locked_text_teacher(&opts, "data/teacher-lit".as_ref(), &candle_core::Device::Cpu)?;
/// let model = clipcid_models::ClipModel::load(&teacher.dir, &candle_core::Device::Cpu)?;
/// # Ok(()) }
/// ```
pub fn build_locked_text_teacher(
    options: &LockedTextOptions,
    out_dir: &Path,
    device: &Device,
) -> Result<LockedTextTeacher, TrainError> {
    options.check()?;
    // The teacher's model.safetensors and config.json would replace the tower's own.
    clipcid_store::io::check_not_an_input(out_dir, [options.text_tower.as_path()]).map_err(|_| {
        TrainError::Config(format!(
            "{}: the text tower is read from this folder; the teacher written into it would replace the tower's model.safetensors and config.json: choose another folder",
            out_dir.display()
        ))
    })?;
    let record_path = out_dir.join("teacher.json");
    let request = BuildRecord::of(options)?;
    if out_dir.join("model.safetensors").is_file() && out_dir.join("tokenizer.json").is_file() {
        let same = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<BuildRecord>(&b).ok())
            .is_some_and(|r| r == request);
        if same {
            return Ok(LockedTextTeacher {
                dir: out_dir.to_path_buf(),
                reused: true,
                run: None,
            });
        }
    }
    let tokenizer = options.text_tower.join("tokenizer.json");
    if !tokenizer.is_file() {
        return Err(TrainError::Config(format!(
            "{}: the text tower folder has no tokenizer.json",
            options.text_tower.display()
        )));
    }
    // This build replaces whatever the folder held. Its record goes first: a build that
    // fails part way left the earlier build's record beside this build's weights, and a
    // later request for the earlier options reused those weights as if they were its own.
    match std::fs::remove_file(&record_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(TrainError::io(&record_path, "cannot remove", e)),
    }
    let run_dir = out_dir.join("run");
    let init_dir = run_dir.join("init");
    let (cfg, tensors) =
        locked_text_tensors(&options.text_tower, options.vision.clone(), options.seed)?;
    ClipModel::from_tensors(&cfg, tensors, &Device::Cpu, DType::F32)?
        .save_pretrained(&init_dir, DType::F32)?;
    let toml_path = run_dir.join("lit.toml");
    let mut config = DistillConfig::default();
    // The run's TOML lives in `run/`, so every path in it is made absolute.
    let absolute =
        |p: &Path| std::path::absolute(p).map_err(|e| TrainError::io(p, "cannot resolve", e));
    config.data.dataset = absolute(&options.dataset)?;
    config.data.tokenizer = Some(absolute(&tokenizer)?);
    config.student.model = absolute(&init_dir.join("config.json"))?
        .to_string_lossy()
        .into_owned();
    config.student.init = Some(absolute(&init_dir.join("model.safetensors"))?);
    config.student.freeze_text = true;
    config.student.context_length = Some(options.context_length);
    config.loss.cluster.enabled = false;
    config.loss.instance.enabled = false;
    config.optim.lr = options.lr;
    config.optim.warmup_steps = options.warmup_steps;
    config.batch_size = options.batch_size;
    config.epochs = options.epochs;
    config.seed = options.seed;
    config.checkpoint_every = u64::MAX / 2;
    let body = format!(
        "# Locked-text (LiT) teacher: frozen text tower from {}, image tower trained with the\n# CLIP loss. Written by clipcid; re-run with `clipcid distill`.\n{}",
        options.text_tower.display(),
        toml::to_string(&config).map_err(|e| TrainError::Config(e.to_string()))?
    );
    clipcid_store::io::write_atomic(&toml_path, body.as_bytes())?;
    let config = DistillConfig::from_file(&toml_path)?;
    // The build folder is the builder's own: an earlier build there is replaced.
    let mut trainer = Trainer::new_overwriting(config, &run_dir, device)?;
    let run = trainer.run(None, true)?;
    let trained = trainer.model();
    trained.save_pretrained(out_dir, DType::F32)?;
    let copy = |from: &Path, name: &str| {
        let to = out_dir.join(name);
        clipcid_store::io::copy_atomic(from, &to)
    };
    copy(&tokenizer, "tokenizer.json")?;
    let readme = options.text_tower.join("README.md");
    if readme.is_file() {
        copy(&readme, "TEXT_TOWER_README.md")?;
    }
    let last = run.last.as_ref().map(|m| m.loss).unwrap_or(f64::NAN);
    let md = format!(
        "# Locked-text teacher (not OpenAI CLIP)\n\n\
         - Text tower: frozen BERT from `{}` (mean pooling, identity projection; all-MiniLM-L6-v2 when built by the demo, Apache-2.0).\n\
         - Image tower: ViT width {}, {} layers, {} heads, {} px, patch {}, trained here with the CLIP loss against the frozen caption embeddings (LiT) on `{}`: {} epochs, batch {}, lr {}, seed {}, {} steps, final loss {last:.4}.\n\
         - Run config: `run/lit.toml`; options: `teacher.json`.\n",
        options.text_tower.display(),
        options.vision.hidden_size,
        options.vision.num_hidden_layers,
        options.vision.num_attention_heads,
        options.vision.image_size,
        options.vision.patch_size,
        options.dataset.display(),
        options.epochs,
        options.batch_size,
        options.lr,
        options.seed,
        run.steps,
    );
    clipcid_store::io::write_atomic(&out_dir.join("TEACHER.md"), md.as_bytes())?;
    // The record goes last: a folder is reused only when everything above was written.
    let record =
        serde_json::to_vec_pretty(&request).map_err(|e| TrainError::Config(e.to_string()))?;
    clipcid_store::io::write_atomic(&record_path, &record)?;
    Ok(LockedTextTeacher {
        dir: out_dir.to_path_buf(),
        reused: false,
        run: Some(run),
    })
}
