//! Checkpoint discovery and loading: which file in a folder, which config (metadata, a file
//! beside it, or tensor shapes), tensors checked against the config; locked-text tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::open_clip::{open_clip_config, OpenClipConfigFile};
use super::{
    detect_layout, hf_tensor_shapes, init_tensors, open_clip_to_hf, Layout, CONFIG_METADATA_KEY,
};
use crate::config::{ClipConfig, TextConfig, VisionConfig};
use crate::ModelError;
use clipcid_store::io;

/// A checkpoint read from disk: its config and its tensors under Hugging Face names (CPU).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// File the tensors came from.
    pub path: PathBuf,
    /// Model shape, from the file's metadata, a `config.json` / `open_clip_config.json` beside
    /// it, or inferred from the tensor shapes (in that order).
    pub config: ClipConfig,
    /// Where the config came from, for reports.
    pub config_source: String,
    /// Naming convention found in the file.
    pub layout: Layout,
    /// Tensors under Hugging Face names.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads a checkpoint. `path` is a `.safetensors` file or a folder holding
    /// `model.safetensors` / `open_clip_model.safetensors` (or a single `.safetensors` file).
    /// Pass `config` to override the config found with the file.
    ///
    /// Every tensor is checked against the config: a missing one or a shape mismatch is an
    /// error naming the tensor and both shapes.
    pub fn read(path: &Path, config: Option<ClipConfig>) -> Result<Self, ModelError> {
        let file = resolve_checkpoint_file(path)?;
        let header = io::read_header(&file)?;
        let raw = io::load_tensors(&file)?;
        let layout = detect_layout(raw.keys());
        let mut tensors = match layout {
            Layout::HuggingFace => raw,
            Layout::OpenClip => open_clip_to_hf(raw, &file)?,
        };
        tensors.retain(|name, _| !name.ends_with("position_ids"));
        if let Some(ls) = tensors.get("logit_scale") {
            if ls.dims() == [1] {
                let s = ls.reshape(())?;
                tensors.insert("logit_scale".into(), s);
            }
        }
        let (config, config_source) = match config {
            Some(c) => (c, "given".to_string()),
            None => find_config(&file, &header.metadata, &tensors)?,
        };
        config.validate()?;
        check_tensors(&file, &config, &tensors)?;
        Ok(Self {
            path: file,
            config,
            config_source,
            layout,
            tensors,
        })
    }
}

/// Checks a tensor map against the shapes `cfg` implies: every tensor present with the right
/// shape, and no unexpected tensor.
pub fn check_tensors(
    path: &Path,
    cfg: &ClipConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), ModelError> {
    let expected = hf_tensor_shapes(cfg);
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => {
                return Err(ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                })
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                })
            }
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|n| !expected.contains_key(*n))
        .collect();
    if !extra.is_empty() {
        extra.sort();
        let shown: Vec<_> = extra.iter().take(5).map(|s| s.as_str()).collect();
        return Err(ModelError::file(
            path,
            format!(
                "{} tensor(s) the model config does not use, e.g. {}; is the config (layer count) right?",
                extra.len(),
                shown.join(", ")
            ),
        ));
    }
    Ok(())
}

fn resolve_checkpoint_file(path: &Path) -> Result<PathBuf, ModelError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(ModelError::file(path, "no such checkpoint file or folder"));
    }
    for name in ["model.safetensors", "open_clip_model.safetensors"] {
        let p = path.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| ModelError::file(path, format!("cannot list folder: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ModelError::file(
            path,
            "folder holds no .safetensors checkpoint",
        )),
        _ => Err(ModelError::file(
            path,
            "folder holds several .safetensors files and no model.safetensors; name the file",
        )),
    }
}

fn find_config(
    file: &Path,
    metadata: &HashMap<String, String>,
    tensors: &HashMap<String, Tensor>,
) -> Result<(ClipConfig, String), ModelError> {
    if let Some(json) = metadata.get(CONFIG_METADATA_KEY) {
        let cfg = serde_json::from_str(json).map_err(|e| {
            ModelError::file(
                file,
                format!("corrupt `{CONFIG_METADATA_KEY}` metadata: {e}"),
            )
        })?;
        return Ok((cfg, "checkpoint metadata".into()));
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    let hf = dir.join("config.json");
    if hf.is_file() {
        let text = std::fs::read_to_string(&hf)
            .map_err(|e| ModelError::file(&hf, format!("cannot read: {e}")))?;
        let cfg = serde_json::from_str(&text)
            .map_err(|e| ModelError::file(&hf, format!("not a CLIP config: {e}")))?;
        return Ok((cfg, hf.display().to_string()));
    }
    let oc = dir.join("open_clip_config.json");
    if oc.is_file() {
        let text = std::fs::read_to_string(&oc)
            .map_err(|e| ModelError::file(&oc, format!("cannot read: {e}")))?;
        let f: OpenClipConfigFile = serde_json::from_str(&text)
            .map_err(|e| ModelError::file(&oc, format!("not an open_clip config: {e}")))?;
        return Ok((open_clip_config(f.model_cfg), oc.display().to_string()));
    }
    Ok((
        infer_config(file, tensors)?,
        "inferred from tensor shapes".into(),
    ))
}

/// Reconstructs a config from tensor shapes alone. Heads are taken as `width / 64` (OpenAI's
/// head width) and the activation as QuickGELU; give a config file when either differs.
fn infer_config(file: &Path, t: &HashMap<String, Tensor>) -> Result<ClipConfig, ModelError> {
    let dims = |name: &str| -> Result<Vec<usize>, ModelError> {
        t.get(name)
            .map(|x| x.dims().to_vec())
            .ok_or_else(|| ModelError::MissingTensor {
                path: file.to_path_buf(),
                name: name.to_string(),
                expected: vec![],
            })
    };
    let count_layers = |prefix: &str| {
        (0..)
            .take_while(|i| t.contains_key(&format!("{prefix}.encoder.layers.{i}.mlp.fc1.weight")))
            .count()
    };
    let heads = |w: usize| if w.is_multiple_of(64) { w / 64 } else { 1 };
    let patch = dims("vision_model.embeddings.patch_embedding.weight")?;
    let vpos = dims("vision_model.embeddings.position_embedding.weight")?;
    let vfc1 = dims("vision_model.encoder.layers.0.mlp.fc1.weight")?;
    let tok = dims("text_model.embeddings.token_embedding.weight")?;
    let tpos = dims("text_model.embeddings.position_embedding.weight")?;
    let tfc1 = dims("text_model.encoder.layers.0.mlp.fc1.weight")?;
    let proj = dims("visual_projection.weight")?;
    let (vw, p) = (patch[0], patch[2]);
    let grid = ((vpos[0].saturating_sub(1)) as f64).sqrt().round() as usize;
    Ok(ClipConfig {
        projection_dim: proj[0],
        vision_config: VisionConfig {
            hidden_size: vw,
            intermediate_size: vfc1[0],
            num_hidden_layers: count_layers("vision_model"),
            num_attention_heads: heads(vw),
            image_size: grid * p,
            patch_size: p,
            num_channels: patch[1],
            ..VisionConfig::default()
        },
        text_config: TextConfig {
            vocab_size: tok[0],
            max_position_embeddings: tpos[0],
            hidden_size: tok[1],
            intermediate_size: tfc1[0],
            num_hidden_layers: count_layers("text_model"),
            num_attention_heads: heads(tok[1]),
            eos_token_id: Some(tok[0] as u32 - 1),
            ..TextConfig::default()
        },
        ..ClipConfig::default()
    })
}

/// Tensors and config of a new locked-text (LiT) model: a seeded random CLIP image tower of
/// shape `vision` (see [`init_tensors`]) and the pretrained BERT text tower in `bert_dir` (a
/// `transformers` folder with `config.json` and `model.safetensors`, e.g. sentence-transformers
/// all-MiniLM-L6-v2), with an identity text projection so text features are exactly the
/// sentence embedding. The BERT pooler and `position_ids` buffer are dropped.
///
/// Train the image tower against the frozen text tower (clipcid-train's `train_locked_text`),
/// then build a [`crate::ClipModel`] from the result.
pub fn locked_text_tensors(
    bert_dir: &Path,
    vision: VisionConfig,
    seed: u64,
) -> Result<(ClipConfig, HashMap<String, Tensor>), ModelError> {
    let config_path = bert_dir.join("config.json");
    let json = std::fs::read_to_string(&config_path)
        .map_err(|e| ModelError::file(&config_path, format!("cannot read: {e}")))?;
    let cfg =
        ClipConfig::locked_text(vision, &json).map_err(|e| ModelError::file(&config_path, e))?;
    let weights = bert_dir.join("model.safetensors");
    let raw = io::load_tensors(&weights)?;
    let mut tensors = init_tensors(&cfg, seed)?;
    tensors.retain(|n, _| !n.starts_with("text_model."));
    for (name, t) in raw {
        let name = name.strip_prefix("bert.").unwrap_or(&name).to_string();
        if name.ends_with("position_ids") || name.starts_with("pooler.") {
            continue;
        }
        tensors.insert(
            format!("text_model.{name}"),
            t.to_dtype(candle_core::DType::F32)?,
        );
    }
    let p = cfg.projection_dim;
    tensors.insert(
        "text_projection.weight".into(),
        Tensor::eye(p, candle_core::DType::F32, &Device::Cpu)?,
    );
    check_tensors(&weights, &cfg, &tensors)?;
    Ok((cfg, tensors))
}
