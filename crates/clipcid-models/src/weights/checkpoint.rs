//! Checkpoint discovery and loading: which file in a folder, which config (metadata, a file
//! beside it, or tensor shapes), tensors checked against the config; locked-text tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{
    detect_layout, hf_tensor_shapes, init_tensors, open_clip_to_hf, Layout, CONFIG_METADATA_KEY,
};
use crate::config::{Activation, ClipConfig, TextConfig, TextTowerKind, VisionConfig};
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

/// How to read a checkpoint: what to override and what the files cannot say.
///
/// ```
/// use clipcid_models::{Activation, LoadOptions};
/// let opts = LoadOptions { activation: Some(Activation::Gelu), ..LoadOptions::default() };
/// assert!(opts.config.is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Model config to use instead of the one found with the checkpoint.
    pub config: Option<ClipConfig>,
    /// MLP activation of both towers, overriding the config's. Required for a checkpoint
    /// that comes with no config at all (its tensor shapes do not say which it is).
    pub activation: Option<Activation>,
}

impl Checkpoint {
    /// Reads a checkpoint. `path` is a checkpoint file or a folder holding one:
    ///
    /// - safetensors: `model.safetensors`, `open_clip_model.safetensors`, or any single
    ///   `.safetensors` file;
    /// - sharded safetensors: `model.safetensors.index.json` and the shards it names (how
    ///   large models such as ViT-bigG/14 are published);
    /// - PyTorch pickles (`pytorch_model.bin`, `open_clip_pytorch_model.bin`, `.pt`,
    ///   `.pth`, also sharded with `pytorch_model.bin.index.json`): a state dict, or a
    ///   training checkpoint with one under `state_dict` (a `module.` prefix is dropped).
    ///   TorchScript archives (OpenAI's original `.pt` files) hold no state dict and are
    ///   refused.
    ///
    /// Pass `config` to override the config found with the file. Every tensor is checked
    /// against the config: a missing one or a shape mismatch is an error naming the tensor
    /// and both shapes.
    pub fn read(path: &Path, config: Option<ClipConfig>) -> Result<Self, ModelError> {
        Self::read_with(
            path,
            &LoadOptions {
                config,
                ..LoadOptions::default()
            },
        )
    }

    /// [`Checkpoint::read`] with [`LoadOptions`].
    pub fn read_with(path: &Path, opts: &LoadOptions) -> Result<Self, ModelError> {
        let files = CheckpointFiles::find(path)?;
        let (raw, metadata) = files.load()?;
        let file = files.main.clone();
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
        let (mut config, mut config_source) = match &opts.config {
            Some(c) => (c.clone(), "given".to_string()),
            None => find_config(&file, &metadata, &tensors, layout, opts.activation)?,
        };
        if let Some(act) = opts.activation {
            config.vision_config.hidden_act = act;
            if config.text_config.kind == TextTowerKind::Clip {
                config.text_config.hidden_act = act;
            }
            config_source.push_str(&format!(", activation {act:?} given"));
        }
        config
            .validate()
            .map_err(|e| ModelError::file(&file, format!("{e} (config: {config_source})")))?;
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

/// The file(s) a checkpoint argument names.
struct CheckpointFiles {
    /// The file reported in errors and beside which configs are looked for (the index of a
    /// sharded checkpoint).
    main: PathBuf,
    /// Files holding the tensors, with the tensor names each must supply (sharded only).
    parts: Vec<(PathBuf, Vec<String>)>,
}

/// Tensors by name.
type TensorMap = HashMap<String, Tensor>;

/// Checkpoint file names looked for in a folder (and fetched from the Hub), in open_clip's
/// order of preference: safetensors before PyTorch pickles, one file before shards.
pub const CHECKPOINT_FILES: [&str; 8] = [
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.pth",
];

fn is_pickle(p: &Path) -> bool {
    p.extension()
        .is_some_and(|x| x == "bin" || x == "pt" || x == "pth" || x == "ckpt")
}

impl CheckpointFiles {
    fn find(path: &Path) -> Result<Self, ModelError> {
        let file = if path.is_file() {
            path.to_path_buf()
        } else if path.is_dir() {
            Self::pick_in(path)?
        } else {
            return Err(ModelError::file(path, "no such checkpoint file or folder"));
        };
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".index.json") {
            return Self::sharded(&file);
        }
        Ok(Self {
            parts: vec![(file.clone(), vec![])],
            main: file,
        })
    }

    fn pick_in(dir: &Path) -> Result<PathBuf, ModelError> {
        for name in CHECKPOINT_FILES {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::file(dir, format!("cannot list folder: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || is_pickle(p))
            .collect();
        found.sort();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(ModelError::file(
                dir,
                "folder holds no checkpoint (.safetensors, a model.safetensors.index.json, or a PyTorch .bin/.pt/.pth)",
            )),
            _ => Err(ModelError::file(
                dir,
                format!(
                    "folder holds several checkpoint files and none of the usual names ({}); name the file",
                    CHECKPOINT_FILES.join(", ")
                ),
            )),
        }
    }

    /// A `*.index.json`: `{"weight_map": {tensor: shard file}}`, shards beside the index.
    fn sharded(index: &Path) -> Result<Self, ModelError> {
        let weight_map = read_index(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut parts: Vec<(PathBuf, Vec<String>)> = vec![];
        for (tensor, shard) in weight_map {
            let p = dir.join(&shard);
            match parts.iter_mut().find(|(q, _)| *q == p) {
                Some((_, names)) => names.push(tensor),
                None => parts.push((p, vec![tensor])),
            }
        }
        for (p, _) in &parts {
            if !p.is_file() {
                return Err(ModelError::file(
                    index,
                    format!("names shard {} which does not exist", p.display()),
                ));
            }
        }
        Ok(Self {
            main: index.to_path_buf(),
            parts,
        })
    }

    /// All tensors (CPU, as stored) and the safetensors metadata of the first part.
    fn load(&self) -> Result<(TensorMap, HashMap<String, String>), ModelError> {
        let mut all = HashMap::new();
        let mut metadata = HashMap::new();
        for (i, (file, expected)) in self.parts.iter().enumerate() {
            let tensors = if is_pickle(file) {
                read_pickle(file)?
            } else {
                if i == 0 {
                    metadata = io::read_header(file)?.metadata;
                }
                io::load_tensors(file)?
            };
            for name in expected {
                if !tensors.contains_key(name) {
                    return Err(ModelError::file(
                        file,
                        format!(
                            "the index {} puts tensor `{name}` in this shard, but it is not there",
                            self.main.display()
                        ),
                    ));
                }
            }
            for (name, t) in tensors {
                if all.insert(name.clone(), t).is_some() {
                    return Err(ModelError::file(
                        file,
                        format!("tensor `{name}` is also in another shard"),
                    ));
                }
            }
        }
        Ok((all, metadata))
    }
}

/// A weight must be floating point (an integer tensor where a float is expected is a wrong
/// file, not something to cast) and finite (NaN or infinite weights make every embedding
/// NaN).
fn check_values(path: &Path, name: &str, t: &Tensor) -> Result<(), ModelError> {
    use candle_core::DType;
    if !matches!(
        t.dtype(),
        DType::F32 | DType::F16 | DType::BF16 | DType::F64
    ) {
        return Err(ModelError::file(
            path,
            format!(
                "tensor `{name}` holds {:?} values; model weights are floating point",
                t.dtype()
            ),
        ));
    }
    match clipcid_kernels::all_finite(t) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ModelError::file(
            path,
            format!("tensor `{name}` holds NaN or infinite values"),
        )),
        Err(e) => Err(ModelError::file(path, format!("tensor `{name}`: {e}"))),
    }
}

/// The `weight_map` of a sharded checkpoint's `*.index.json`: tensor name to shard file name,
/// each a plain file name beside the index.
fn read_index(index: &Path) -> Result<std::collections::BTreeMap<String, String>, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index)
        .map_err(|e| ModelError::file(index, format!("cannot read: {e}")))?;
    let idx: Index = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(index, format!("not a sharded-checkpoint index: {e}")))?;
    if idx.weight_map.is_empty() {
        return Err(ModelError::file(index, "weight_map lists no tensors"));
    }
    if let Some(shard) = idx
        .weight_map
        .values()
        .find(|s| Path::new(s).components().count() != 1 || s.starts_with('.'))
    {
        return Err(ModelError::file(
            index,
            format!("shard `{shard}` is not a file name beside the index"),
        ));
    }
    Ok(idx.weight_map)
}

/// The shard files a sharded checkpoint's index names, each once, in order.
pub(crate) fn shard_files(index: &Path) -> Result<Vec<String>, ModelError> {
    let mut files: Vec<String> = read_index(index)?.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// A PyTorch pickle's state dict (zip format, as `torch.save` writes since 1.6): the top
/// level, or its `state_dict` entry; a `module.` prefix (DistributedDataParallel) is dropped.
fn read_pickle(file: &Path) -> Result<HashMap<String, Tensor>, ModelError> {
    let bad = |e: candle_core::Error| {
        ModelError::file(
            file,
            format!("cannot read it as a PyTorch checkpoint (torch.save zip format): {e}"),
        )
    };
    let pairs = match candle_core::pickle::read_all_with_key(file, Some("state_dict")) {
        Ok(p) if !p.is_empty() => p,
        _ => candle_core::pickle::read_all(file).map_err(bad)?,
    };
    if pairs.is_empty() {
        return Err(ModelError::file(
            file,
            "holds no readable tensors under the top level or `state_dict` (tensor records that cannot be read are printed above as `skipping: ...`; or a TorchScript archive such as OpenAI's original .pt? load it in open_clip and save its state_dict, or use the Hub's safetensors)",
        ));
    }
    Ok(pairs
        .into_iter()
        .map(|(n, t)| {
            (
                n.strip_prefix("module.").map(str::to_string).unwrap_or(n),
                t,
            )
        })
        .collect())
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
            Some(t) => check_values(path, name, t)?,
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

fn find_config(
    file: &Path,
    metadata: &HashMap<String, String>,
    tensors: &HashMap<String, Tensor>,
    layout: Layout,
    activation: Option<Activation>,
) -> Result<(ClipConfig, String), ModelError> {
    if let Some(cfg) = ClipConfig::from_checkpoint_metadata(file, metadata)? {
        return Ok((cfg, "checkpoint metadata".into()));
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    // A Hub repository may hold both configs (LAION's do): the one of the tensors' family first.
    let names = match layout {
        Layout::HuggingFace => ["config.json", "open_clip_config.json"],
        Layout::OpenClip => ["open_clip_config.json", "config.json"],
    };
    for name in names {
        let p = dir.join(name);
        if p.is_file() {
            return Ok((ClipConfig::from_json_file(&p)?, p.display().to_string()));
        }
    }
    let Some(act) = activation else {
        return Err(ModelError::file(
            file,
            format!(
                "no config.json, open_clip_config.json or `{CONFIG_METADATA_KEY}` metadata with this checkpoint: its tensor shapes give the sizes but not the MLP activation; pass --activation quick_gelu (OpenAI's CLIPs) or --activation gelu (most OpenCLIP-trained models), or --config"
            ),
        ));
    };
    let mut cfg = infer_config(file, tensors)?;
    cfg.vision_config.hidden_act = act;
    cfg.text_config.hidden_act = act;
    Ok((
        cfg,
        "inferred from tensor shapes (heads = width / 64, as in every OpenAI and OpenCLIP ViT)"
            .into(),
    ))
}

/// Reconstructs a config from tensor shapes alone. Heads are taken as `width / 64` (the head
/// width of every OpenAI and OpenCLIP ViT); the caller sets the activation.
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
    let heads = |w: usize| {
        if w.is_multiple_of(64) {
            Ok(w / 64)
        } else {
            Err(ModelError::file(
                file,
                format!("width {w} is not a multiple of 64, so the head count cannot be inferred; pass --config"),
            ))
        }
    };
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
            num_attention_heads: heads(vw)?,
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
            num_attention_heads: heads(tok[1])?,
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
