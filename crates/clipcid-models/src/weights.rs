//! Tensor layout on disk: the Hugging Face CLIP names and shapes a config implies, the
//! OpenCLIP <-> Hugging Face name mapping, seeded initialisation, and checkpoint loading.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Deserialize;

use crate::config::{Activation, ClipConfig, TextConfig, TextTowerKind, VisionConfig};
use crate::io;
use crate::ModelError;

/// Safetensors metadata key under which clipcid stores the model's `config.json`.
pub const CONFIG_METADATA_KEY: &str = "clipcid.config";

/// Naming convention of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `vision_model.encoder.layers.N.self_attn.q_proj.weight`, ... (transformers' `CLIPModel`).
    HuggingFace,
    /// `visual.transformer.resblocks.N.attn.in_proj_weight`, ... (open_clip).
    OpenClip,
}

/// Every tensor of a CLIP model in Hugging Face names, with its shape, in a stable order.
/// A BERT text tower ([`TextTowerKind::Bert`]) has `transformers`' `BertModel` names under
/// `text_model.` (without the pooler, which mean pooling does not use).
pub fn hf_tensor_shapes(cfg: &ClipConfig) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let v = &cfg.vision_config;
    let t = &cfg.text_config;
    let mut tower = |prefix: &str, w: usize, inter: usize, layers: usize| {
        for i in 0..layers {
            let l = format!("{prefix}.encoder.layers.{i}");
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                m.insert(format!("{l}.self_attn.{p}.weight"), vec![w, w]);
                m.insert(format!("{l}.self_attn.{p}.bias"), vec![w]);
            }
            for ln in ["layer_norm1", "layer_norm2"] {
                m.insert(format!("{l}.{ln}.weight"), vec![w]);
                m.insert(format!("{l}.{ln}.bias"), vec![w]);
            }
            m.insert(format!("{l}.mlp.fc1.weight"), vec![inter, w]);
            m.insert(format!("{l}.mlp.fc1.bias"), vec![inter]);
            m.insert(format!("{l}.mlp.fc2.weight"), vec![w, inter]);
            m.insert(format!("{l}.mlp.fc2.bias"), vec![w]);
        }
    };
    tower(
        "vision_model",
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
    );
    if t.kind == TextTowerKind::Clip {
        tower(
            "text_model",
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
        );
    }
    let vw = v.hidden_size;
    m.insert("vision_model.embeddings.class_embedding".into(), vec![vw]);
    m.insert(
        "vision_model.embeddings.patch_embedding.weight".into(),
        vec![vw, v.num_channels, v.patch_size, v.patch_size],
    );
    m.insert(
        "vision_model.embeddings.position_embedding.weight".into(),
        vec![v.num_positions(), vw],
    );
    for ln in ["pre_layrnorm", "post_layernorm"] {
        m.insert(format!("vision_model.{ln}.weight"), vec![vw]);
        m.insert(format!("vision_model.{ln}.bias"), vec![vw]);
    }
    let tw = t.hidden_size;
    match t.kind {
        TextTowerKind::Clip => {
            m.insert(
                "text_model.embeddings.token_embedding.weight".into(),
                vec![t.vocab_size, tw],
            );
            m.insert(
                "text_model.embeddings.position_embedding.weight".into(),
                vec![t.max_position_embeddings, tw],
            );
            m.insert("text_model.final_layer_norm.weight".into(), vec![tw]);
            m.insert("text_model.final_layer_norm.bias".into(), vec![tw]);
        }
        TextTowerKind::Bert => bert_tensor_shapes(t, &mut m),
    }
    m.insert(
        "visual_projection.weight".into(),
        vec![cfg.projection_dim, vw],
    );
    m.insert(
        "text_projection.weight".into(),
        vec![cfg.projection_dim, tw],
    );
    m.insert("logit_scale".into(), vec![]);
    m
}

fn bert_tensor_shapes(t: &TextConfig, m: &mut BTreeMap<String, Vec<usize>>) {
    let (w, inter) = (t.hidden_size, t.intermediate_size);
    let e = "text_model.embeddings";
    m.insert(format!("{e}.word_embeddings.weight"), vec![t.vocab_size, w]);
    m.insert(
        format!("{e}.position_embeddings.weight"),
        vec![t.max_position_embeddings, w],
    );
    m.insert(
        format!("{e}.token_type_embeddings.weight"),
        vec![t.type_vocab_size, w],
    );
    let mut norm = |prefix: String| {
        m.insert(format!("{prefix}.LayerNorm.weight"), vec![w]);
        m.insert(format!("{prefix}.LayerNorm.bias"), vec![w]);
    };
    norm(e.to_string());
    for i in 0..t.num_hidden_layers {
        let l = format!("text_model.encoder.layer.{i}");
        norm(format!("{l}.attention.output"));
        norm(format!("{l}.output"));
    }
    for i in 0..t.num_hidden_layers {
        let l = format!("text_model.encoder.layer.{i}");
        for (name, out, inp) in [
            ("attention.self.query", w, w),
            ("attention.self.key", w, w),
            ("attention.self.value", w, w),
            ("attention.output.dense", w, w),
            ("intermediate.dense", inter, w),
            ("output.dense", w, inter),
        ] {
            m.insert(format!("{l}.{name}.weight"), vec![out, inp]);
            m.insert(format!("{l}.{name}.bias"), vec![out]);
        }
    }
}

/// Seeded initial tensors (CPU, f32) for every parameter, following open_clip's init scheme:
/// normal with std `width^-0.5` for attention inputs and projections, `(2 width)^-0.5` for
/// the MLP input, `width^-0.5 (2 layers)^-0.5` for residual outputs, 0.02 / 0.01 for text
/// token / position embeddings, unit layer norms, zero biases; a BERT text tower gets BERT's
/// normal(0.02) for every weight matrix. Same seed, same tensors.
pub fn init_tensors(cfg: &ClipConfig, seed: u64) -> Result<HashMap<String, Tensor>, ModelError> {
    cfg.validate()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in hf_tensor_shapes(cfg) {
        let (w, layers) = if name.starts_with("vision_model") || name.starts_with("visual") {
            (
                cfg.vision_config.hidden_size,
                cfg.vision_config.num_hidden_layers,
            )
        } else {
            (
                cfg.text_config.hidden_size,
                cfg.text_config.num_hidden_layers,
            )
        };
        let wf = w as f64;
        let proj_std = wf.powf(-0.5) * (2.0 * layers as f64).powf(-0.5);
        let n: usize = shape.iter().product();
        let fill = |v: f32| vec![v; n];
        let bert = cfg.text_config.kind == TextTowerKind::Bert && name.starts_with("text_model.");
        let data: Vec<f32> = if name == "logit_scale" {
            fill(cfg.logit_scale_init_value as f32)
        } else if name.ends_with(".bias") {
            fill(0.0)
        } else if name.to_ascii_lowercase().contains("norm") && name.ends_with(".weight") {
            fill(1.0)
        } else {
            let std = if bert || name.contains("token_embedding") {
                0.02
            } else if name.starts_with("text_model.embeddings.position_embedding") {
                0.01
            } else if name.contains("patch_embedding") {
                let v = &cfg.vision_config;
                ((v.num_channels * v.patch_size * v.patch_size) as f64).powf(-0.5)
            } else if name.contains("out_proj") || name.contains("fc2") {
                proj_std
            } else if name.contains("fc1") {
                (2.0 * wf).powf(-0.5)
            } else {
                wf.powf(-0.5)
            };
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    (z * std) as f32
                })
                .collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// Renames (and splits / transposes) OpenCLIP tensors into Hugging Face names.
///
/// `attn.in_proj_weight` [3W, W] is split into `q_proj`, `k_proj`, `v_proj`; `visual.proj`
/// and `text_projection` [W, P] are transposed into `[P, W]` linear weights. Buffers that carry
/// no parameters (`attn_mask`, `position_ids`) are dropped; any other unknown name is an error.
pub fn open_clip_to_hf(
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let (hf_prefix, rest) = if let Some(r) = name.strip_prefix("visual.") {
            ("vision_model", r.to_string())
        } else {
            ("text_model", name.clone())
        };
        let simple = match (hf_prefix, rest.as_str()) {
            ("vision_model", "class_embedding") => {
                Some("vision_model.embeddings.class_embedding".to_string())
            }
            ("vision_model", "positional_embedding") => {
                Some("vision_model.embeddings.position_embedding.weight".into())
            }
            ("vision_model", "conv1.weight") => {
                Some("vision_model.embeddings.patch_embedding.weight".into())
            }
            ("vision_model", r) if r.starts_with("ln_pre.") => {
                Some(r.replacen("ln_pre", "vision_model.pre_layrnorm", 1))
            }
            ("vision_model", r) if r.starts_with("ln_post.") => {
                Some(r.replacen("ln_post", "vision_model.post_layernorm", 1))
            }
            ("text_model", "token_embedding.weight") => {
                Some("text_model.embeddings.token_embedding.weight".into())
            }
            ("text_model", "positional_embedding") => {
                Some("text_model.embeddings.position_embedding.weight".into())
            }
            ("text_model", r) if r.starts_with("ln_final.") => {
                Some(r.replacen("ln_final", "text_model.final_layer_norm", 1))
            }
            ("text_model", "logit_scale") => Some("logit_scale".into()),
            _ => None,
        };
        if let Some(n) = simple {
            out.insert(n, t);
            continue;
        }
        match (hf_prefix, rest.as_str()) {
            ("vision_model", "proj") => {
                out.insert("visual_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            ("text_model", "text_projection") => {
                out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            _ => {}
        }
        if rest == "attn_mask" || rest.ends_with("position_ids") {
            continue;
        }
        let Some(block) = rest.strip_prefix("transformer.resblocks.") else {
            return Err(ModelError::file(
                path,
                format!("unexpected OpenCLIP tensor `{name}`"),
            ));
        };
        let (idx, leaf) = block.split_once('.').ok_or_else(|| {
            ModelError::file(path, format!("unexpected OpenCLIP tensor `{name}`"))
        })?;
        let l = format!("{hf_prefix}.encoder.layers.{idx}");
        match leaf {
            "attn.in_proj_weight" | "attn.in_proj_bias" => {
                let kind = if leaf.ends_with("weight") {
                    "weight"
                } else {
                    "bias"
                };
                let w = t.dim(0)? / 3;
                for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.insert(
                        format!("{l}.self_attn.{p}.{kind}"),
                        t.narrow(0, i * w, w)?.contiguous()?,
                    );
                }
            }
            _ => {
                let mapped = [
                    ("attn.out_proj.", "self_attn.out_proj."),
                    ("ln_1.", "layer_norm1."),
                    ("ln_2.", "layer_norm2."),
                    ("mlp.c_fc.", "mlp.fc1."),
                    ("mlp.c_proj.", "mlp.fc2."),
                ]
                .iter()
                .find_map(|(from, to)| leaf.strip_prefix(from).map(|s| format!("{l}.{to}{s}")))
                .ok_or_else(|| {
                    ModelError::file(path, format!("unexpected OpenCLIP tensor `{name}`"))
                })?;
                out.insert(mapped, t);
            }
        }
    }
    Ok(out)
}

/// The inverse of [`open_clip_to_hf`]: Hugging Face names to OpenCLIP names (q/k/v fused into
/// `in_proj_*`, projections transposed), for exporting a model to open_clip.
pub fn hf_to_open_clip(
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let (oc_prefix, rest) = if let Some(r) = name.strip_prefix("vision_model.") {
            ("visual.", r)
        } else if let Some(r) = name.strip_prefix("text_model.") {
            ("", r)
        } else {
            match name.as_str() {
                "visual_projection.weight" => {
                    out.insert("visual.proj".into(), t.t()?.contiguous()?)
                }
                "text_projection.weight" => {
                    out.insert("text_projection".into(), t.t()?.contiguous()?)
                }
                other => out.insert(other.to_string(), t.clone()),
            };
            continue;
        };
        let renamed = match rest {
            "embeddings.class_embedding" => "class_embedding".to_string(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
            "embeddings.patch_embedding.weight" => "conv1.weight".to_string(),
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
            r if r.starts_with("pre_layrnorm.") => r.replacen("pre_layrnorm", "ln_pre", 1),
            r if r.starts_with("post_layernorm.") => r.replacen("post_layernorm", "ln_post", 1),
            r if r.starts_with("final_layer_norm.") => {
                r.replacen("final_layer_norm", "ln_final", 1)
            }
            r => {
                let Some(block) = r.strip_prefix("encoder.layers.") else {
                    out.insert(name.clone(), t.clone());
                    continue;
                };
                let (idx, leaf) = block.split_once('.').unwrap_or((block, ""));
                let l = format!("transformer.resblocks.{idx}");
                if let Some(kind) = leaf.strip_prefix("self_attn.q_proj.") {
                    let parts = ["q_proj", "k_proj", "v_proj"]
                        .iter()
                        .map(|p| {
                            let n = format!(
                                "{}.encoder.layers.{idx}.self_attn.{p}.{kind}",
                                &name[..name.len() - rest.len() - 1]
                            );
                            tensors.get(&n).cloned().ok_or_else(|| {
                                ModelError::Config(format!(
                                    "cannot fuse attention: `{n}` is missing"
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    out.insert(
                        format!("{oc_prefix}{l}.attn.in_proj_{kind}"),
                        Tensor::cat(&parts, 0)?,
                    );
                    continue;
                }
                if leaf.starts_with("self_attn.k_proj.") || leaf.starts_with("self_attn.v_proj.") {
                    continue;
                }
                [
                    ("self_attn.out_proj.", "attn.out_proj."),
                    ("layer_norm1.", "ln_1."),
                    ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."),
                ]
                .iter()
                .find_map(|(from, to)| leaf.strip_prefix(from).map(|s| format!("{l}.{to}{s}")))
                .unwrap_or_else(|| rest.to_string())
            }
        };
        out.insert(format!("{oc_prefix}{renamed}"), t.clone());
    }
    Ok(out)
}

/// Detects the naming convention of a tensor map.
pub fn detect_layout(names: impl IntoIterator<Item = impl AsRef<str>>) -> Layout {
    let open_clip = names.into_iter().any(|n| {
        let n = n.as_ref();
        n.starts_with("visual.")
            || n.starts_with("transformer.resblocks.")
            || n == "token_embedding.weight"
    });
    if open_clip {
        Layout::OpenClip
    } else {
        Layout::HuggingFace
    }
}

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

#[derive(Deserialize)]
struct OpenClipConfigFile {
    model_cfg: OpenClipModelCfg,
}

#[derive(Deserialize)]
struct OpenClipModelCfg {
    embed_dim: usize,
    #[serde(default)]
    quick_gelu: bool,
    vision_cfg: OpenClipTowerCfg,
    text_cfg: OpenClipTowerCfg,
}

#[derive(Deserialize)]
struct OpenClipTowerCfg {
    width: usize,
    layers: usize,
    #[serde(default)]
    heads: Option<usize>,
    #[serde(default)]
    head_width: Option<usize>,
    #[serde(default)]
    mlp_ratio: Option<f64>,
    #[serde(default)]
    image_size: Option<usize>,
    #[serde(default)]
    patch_size: Option<usize>,
    #[serde(default)]
    context_length: Option<usize>,
    #[serde(default)]
    vocab_size: Option<usize>,
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

fn open_clip_config(m: OpenClipModelCfg) -> ClipConfig {
    let act = if m.quick_gelu {
        Activation::QuickGelu
    } else {
        Activation::Gelu
    };
    let heads = |t: &OpenClipTowerCfg| {
        t.heads
            .unwrap_or(t.width / t.head_width.unwrap_or(64).max(1))
    };
    let mlp = |t: &OpenClipTowerCfg| (t.width as f64 * t.mlp_ratio.unwrap_or(4.0)) as usize;
    let (v, t) = (&m.vision_cfg, &m.text_cfg);
    ClipConfig {
        projection_dim: m.embed_dim,
        vision_config: VisionConfig {
            hidden_size: v.width,
            intermediate_size: mlp(v),
            num_hidden_layers: v.layers,
            num_attention_heads: heads(v),
            image_size: v.image_size.unwrap_or(224),
            patch_size: v.patch_size.unwrap_or(16),
            hidden_act: act,
            ..VisionConfig::default()
        },
        text_config: TextConfig {
            vocab_size: t.vocab_size.unwrap_or(49408),
            max_position_embeddings: t.context_length.unwrap_or(77),
            hidden_size: t.width,
            intermediate_size: mlp(t),
            num_hidden_layers: t.layers,
            num_attention_heads: heads(t),
            hidden_act: act,
            eos_token_id: Some(t.vocab_size.unwrap_or(49408) as u32 - 1),
            ..TextConfig::default()
        },
        ..ClipConfig::default()
    }
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

/// Writes a seeded random BERT in `transformers`' folder layout — `config.json` (from
/// `bert_config_json`), `model.safetensors` and a WordPiece `tokenizer.json` whose
/// vocabulary is `[PAD] [UNK] [CLS] [SEP]` then `words` — for tests and smoke runs of
/// locked-text teachers, as [`crate::ClipModel::random`] is for CLIP. Same seed, same files.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_models::weights::{locked_text_tensors, write_random_bert};
/// use clipcid_models::ClipConfig;
/// let dir = tempfile::tempdir()?;
/// let bert = r#"{"vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
///     "num_attention_heads": 2, "intermediate_size": 32, "hidden_act": "gelu",
///     "max_position_embeddings": 16, "model_type": "bert"}"#;
/// write_random_bert(dir.path(), bert, &["red", "square"], 0)?;
/// let vision = ClipConfig::preset("tiny")?.vision_config;
/// let (cfg, _) = locked_text_tensors(dir.path(), vision, 0)?;
/// assert_eq!(cfg.projection_dim, 16);
/// # Ok(()) }
/// ```
pub fn write_random_bert(
    dir: &Path,
    bert_config_json: &str,
    words: &[&str],
    seed: u64,
) -> Result<(), ModelError> {
    use tokenizers::models::wordpiece::WordPiece;
    let vision = VisionConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        image_size: 8,
        patch_size: 8,
        ..VisionConfig::default()
    };
    let cfg = ClipConfig::locked_text(vision, bert_config_json)?;
    let mut vocab = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    vocab.extend(words);
    if vocab.len() > cfg.text_config.vocab_size {
        return Err(ModelError::Config(format!(
            "{} tokens do not fit the config's vocabulary of {}",
            vocab.len(),
            cfg.text_config.vocab_size
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::file(dir, format!("cannot create folder: {e}")))?;
    io::write_atomic(&dir.join("config.json"), bert_config_json.as_bytes())?;
    let tensors: Vec<(String, Tensor)> = init_tensors(&cfg, seed)?
        .into_iter()
        .filter_map(|(n, t)| Some((n.strip_prefix("text_model.")?.to_string(), t)))
        .collect();
    io::write_safetensors(&dir.join("model.safetensors"), tensors, &HashMap::new())?;
    let vocab_txt = dir.join("vocab.txt");
    io::write_atomic(&vocab_txt, vocab.join("\n").as_bytes())?;
    let model = WordPiece::from_file(&vocab_txt.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| ModelError::file(&vocab_txt, e))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(
        tokenizers::normalizers::bert::BertNormalizer::default(),
    ));
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::bert::BertPreTokenizer));
    let json = tok
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    io::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())
}
