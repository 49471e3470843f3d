//! Tensor names and shapes: the Hugging Face CLIP names a config implies, and which naming
//! convention a checkpoint uses.

use std::collections::BTreeMap;

use crate::config::{ClipConfig, TextConfig, TextTowerKind};

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

/// Whether a Hugging Face CLIP tensor belongs to the text side: the text tower
/// (`text_model.`, CLIP or BERT) or the text projection. The logit scale is shared by both
/// towers and is not counted.
///
/// ```
/// use clipcid_models::weights::is_text_tensor;
/// assert!(is_text_tensor("text_model.embeddings.token_embedding.weight"));
/// assert!(is_text_tensor("text_projection.weight"));
/// assert!(!is_text_tensor("visual_projection.weight") && !is_text_tensor("logit_scale"));
/// ```
pub fn is_text_tensor(name: &str) -> bool {
    name.starts_with("text_model.") || name.starts_with("text_projection.")
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
