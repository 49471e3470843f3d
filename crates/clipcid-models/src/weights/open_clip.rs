//! OpenCLIP <-> Hugging Face: tensor names (fused q/k/v, transposed projections) and
//! open_clip's model config files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{Activation, ClipConfig, TextConfig, VisionConfig};
use crate::ModelError;

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

#[derive(Deserialize)]
pub(super) struct OpenClipConfigFile {
    pub(super) model_cfg: OpenClipModelCfg,
}

#[derive(Deserialize)]
pub(super) struct OpenClipModelCfg {
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

pub(super) fn open_clip_config(m: OpenClipModelCfg) -> ClipConfig {
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
