//! OpenCLIP <-> Hugging Face: tensor names (fused q/k/v, transposed projections) and
//! open_clip's model config files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

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

/// A value open_clip would default, read from a tower config: the field's value when present
/// (and not `null`), else `default`.
fn field<T: serde::de::DeserializeOwned>(
    cfg: &serde_json::Map<String, serde_json::Value>,
    tower: &str,
    key: &str,
    default: T,
) -> Result<T, String> {
    match cfg.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| format!("{tower}.{key} = {v} is not valid: {e}")),
    }
}

/// Refuses a tower field that changes the architecture in a way clipcid does not build,
/// unless it holds open_clip's default (`ok` says which values are harmless).
fn refuse_unless(
    cfg: &serde_json::Map<String, serde_json::Value>,
    tower: &str,
    key: &str,
    ok: &[serde_json::Value],
) -> Result<(), String> {
    match cfg.get(key) {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(v) if ok.contains(v) => Ok(()),
        Some(v) => Err(format!(
            "{tower}.{key} = {v} is an open_clip architecture option clipcid does not implement"
        )),
    }
}

fn tower_object<'a>(
    m: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<std::borrow::Cow<'a, serde_json::Map<String, serde_json::Value>>, String> {
    match m.get(key) {
        None | Some(serde_json::Value::Null) => Ok(std::borrow::Cow::Owned(Default::default())),
        Some(serde_json::Value::Object(o)) => Ok(std::borrow::Cow::Borrowed(o)),
        Some(v) => Err(format!("{key} must be an object, not {v}")),
    }
}

/// See [`ClipConfig::from_open_clip_json`].
pub(crate) fn open_clip_config(json: &str) -> Result<ClipConfig, String> {
    let root: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let root = root
        .as_object()
        .ok_or("an open_clip config must be a JSON object")?;
    let m = match root.get("model_cfg") {
        Some(serde_json::Value::Object(m)) => m,
        Some(v) => return Err(format!("model_cfg must be an object, not {v}")),
        None if root.contains_key("embed_dim") || root.contains_key("vision_cfg") => root,
        None => {
            return Err(
                "neither an open_clip_config.json (`model_cfg`) nor an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`)"
                    .into(),
            )
        }
    };
    for key in ["custom_text", "multimodal_cfg", "init_logit_bias"] {
        if m.get(key)
            .is_some_and(|v| !v.is_null() && *v != serde_json::Value::Bool(false))
        {
            return Err(format!(
                "`{key}` is set: that open_clip model (CoCa, SigLIP, custom text tower) is not a CLIP clipcid builds"
            ));
        }
    }
    let embed_dim: usize =
        m.get("embed_dim")
            .and_then(|v| v.as_u64())
            .ok_or("model config has no embed_dim (open_clip requires it)")? as usize;
    let quick_gelu: bool = field(m, "model_cfg", "quick_gelu", false)?;
    let act = if quick_gelu {
        Activation::QuickGelu
    } else {
        Activation::Gelu
    };
    let v = tower_object(m, "vision_cfg")?;
    let t = tower_object(m, "text_cfg")?;
    let f = serde_json::Value::Bool(false);
    let none = serde_json::Value::Null;
    for (tower, cfg) in [("vision_cfg", &v), ("text_cfg", &t)] {
        for key in [
            "qk_norm",
            "scaled_cosine_attn",
            "scale_heads",
            "scale_attn_inner",
            "scale_attn",
            "scale_fc",
            "final_ln_after_pool",
        ] {
            refuse_unless(cfg, tower, key, std::slice::from_ref(&f))?;
        }
        for key in ["ls_init_value", "act_kwargs", "norm_kwargs"] {
            refuse_unless(cfg, tower, key, std::slice::from_ref(&none))?;
        }
        refuse_unless(cfg, tower, "block_type", &["default".into()])?;
    }
    refuse_unless(
        &v,
        "vision_cfg",
        "timm_model_name",
        std::slice::from_ref(&none),
    )?;
    for key in ["attentional_pool", "no_ln_pre"] {
        refuse_unless(&v, "vision_cfg", key, std::slice::from_ref(&f))?;
    }
    refuse_unless(&v, "vision_cfg", "pool_type", &["tok".into()])?;
    refuse_unless(&v, "vision_cfg", "pos_embed_type", &["learnable".into()])?;
    refuse_unless(&t, "text_cfg", "hf_model_name", std::slice::from_ref(&none))?;
    for key in ["embed_cls", "no_causal_mask", "proj_bias"] {
        refuse_unless(&t, "text_cfg", key, std::slice::from_ref(&f))?;
    }
    refuse_unless(&t, "text_cfg", "pool_type", &["argmax".into()])?;
    refuse_unless(&t, "text_cfg", "proj_type", &["linear".into()])?;
    if v.get("layers").is_some_and(|l| l.is_array()) {
        return Err("vision_cfg.layers is a list: a ModifiedResNet tower, not a ViT".into());
    }
    let square = |key: &str, default: usize| -> Result<usize, String> {
        match v.get(key) {
            Some(serde_json::Value::Array(a)) => {
                let s: Vec<usize> = serde_json::from_value(serde_json::Value::Array(a.clone()))
                    .map_err(|e| format!("vision_cfg.{key}: {e}"))?;
                match s.as_slice() {
                    [h, w] if h == w => Ok(*h),
                    _ => Err(format!(
                        "vision_cfg.{key} = {s:?}: only square sizes are supported"
                    )),
                }
            }
            _ => field(&v, "vision_cfg", key, default),
        }
    };
    let v_width: usize = field(&v, "vision_cfg", "width", 768)?;
    let head_width: usize = field(&v, "vision_cfg", "head_width", 64)?;
    if head_width == 0 || !v_width.is_multiple_of(head_width) {
        return Err(format!(
            "vision_cfg.head_width {head_width} does not divide width {v_width}"
        ));
    }
    let v_mlp: f64 = field(&v, "vision_cfg", "mlp_ratio", 4.0)?;
    let t_width: usize = field(&t, "text_cfg", "width", 512)?;
    let t_mlp: f64 = field(&t, "text_cfg", "mlp_ratio", 4.0)?;
    let vocab: usize = field(&t, "text_cfg", "vocab_size", 49408)?;
    if vocab == 0 {
        return Err("text_cfg.vocab_size must be > 0".into());
    }
    Ok(ClipConfig {
        projection_dim: embed_dim,
        vision_config: VisionConfig {
            hidden_size: v_width,
            // open_clip: mlp_width = int(width * mlp_ratio).
            intermediate_size: (v_width as f64 * v_mlp) as usize,
            num_hidden_layers: field(&v, "vision_cfg", "layers", 12)?,
            num_attention_heads: v_width / head_width,
            image_size: square("image_size", 224)?,
            patch_size: square("patch_size", 16)?,
            hidden_act: act,
            ..VisionConfig::default()
        },
        text_config: TextConfig {
            vocab_size: vocab,
            max_position_embeddings: field(&t, "text_cfg", "context_length", 77)?,
            hidden_size: t_width,
            intermediate_size: (t_width as f64 * t_mlp) as usize,
            num_hidden_layers: field(&t, "text_cfg", "layers", 12)?,
            num_attention_heads: field(&t, "text_cfg", "heads", 8)?,
            hidden_act: act,
            // pool_type 'argmax': the highest token id, CLIP's end token.
            eos_token_id: Some(vocab as u32 - 1),
            ..TextConfig::default()
        },
        ..ClipConfig::default()
    })
}

/// open_clip's model config (`model_cfg` of an `open_clip_config.json`) for `cfg`, listing
/// every field clipcid's tower shape depends on (nothing left to open_clip's defaults).
pub(crate) fn open_clip_model_cfg(cfg: &ClipConfig) -> Result<serde_json::Value, String> {
    let (v, t) = (&cfg.vision_config, &cfg.text_config);
    if t.kind != crate::TextTowerKind::Clip {
        return Err("a BERT text tower has no open_clip equivalent clipcid can write".into());
    }
    if v.hidden_act != t.hidden_act {
        return Err("open_clip uses one activation for both towers; these differ".into());
    }
    if v.layer_norm_eps != 1e-5 || t.layer_norm_eps != 1e-5 {
        return Err("open_clip's LayerNorm epsilon is 1e-5; this model's differs".into());
    }
    if cfg
        .eos_token_id()
        .is_some_and(|e| e as usize + 1 != t.vocab_size)
    {
        return Err("open_clip pools the text at the highest token id; this model's end token is not the last id".into());
    }
    if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
        return Err("vision heads do not divide the width".into());
    }
    // open_clip builds int(width * mlp_ratio); a ratio half a unit above keeps that exact.
    let ratio = |mlp: usize, w: usize| {
        if mlp.is_multiple_of(w) {
            (mlp / w) as f64
        } else {
            (mlp as f64 + 0.5) / w as f64
        }
    };
    Ok(serde_json::json!({
        "embed_dim": cfg.projection_dim,
        "quick_gelu": v.hidden_act == Activation::QuickGelu,
        "vision_cfg": {
            "image_size": v.image_size,
            "layers": v.num_hidden_layers,
            "width": v.hidden_size,
            "head_width": v.hidden_size / v.num_attention_heads,
            "mlp_ratio": ratio(v.intermediate_size, v.hidden_size),
            "patch_size": v.patch_size,
        },
        "text_cfg": {
            "context_length": t.max_position_embeddings,
            "vocab_size": t.vocab_size,
            "width": t.hidden_size,
            "heads": t.num_attention_heads,
            "layers": t.num_hidden_layers,
            "mlp_ratio": ratio(t.intermediate_size, t.hidden_size),
        },
    }))
}
