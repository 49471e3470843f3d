//! Model shapes: [`ClipConfig`] with its vision and text towers, and the named presets.
//!
//! The serialised form is the Hugging Face `config.json` of a `CLIPModel`, so a config written
//! by clipcid opens in `transformers` and a config from the Hub opens here.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Most positions a tower may have (image patches + 1, or text context).
const MAX_POSITIONS: usize = 1 << 16;
/// Most parameters a config may ask for (about 20 billion).
const MAX_PARAMETERS: u128 = 20_000_000_000;

/// Non-linearity inside the transformer MLP blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, used by OpenAI's CLIP checkpoints.
    #[default]
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU, used by most OpenCLIP models trained from scratch.
    #[serde(rename = "gelu")]
    Gelu,
}

impl std::str::FromStr for Activation {
    type Err = String;
    /// `gelu` or `quick_gelu` (also `quick-gelu`, `quickgelu`), as `config.json` spells them.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "gelu" => Ok(Self::Gelu),
            "quick_gelu" | "quick-gelu" | "quickgelu" => Ok(Self::QuickGelu),
            _ => Err(format!("unknown activation `{s}` (gelu or quick_gelu)")),
        }
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Gelu => "gelu",
            Self::QuickGelu => "quick_gelu",
        })
    }
}

/// Shape of the vision transformer (the image tower).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Transformer width (`hidden_size`).
    pub hidden_size: usize,
    /// MLP hidden width, usually `4 * hidden_size`.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Input resolution (square), in pixels.
    pub image_size: usize,
    /// Patch size (square), in pixels; must divide `image_size`.
    pub patch_size: usize,
    /// Input channels (3 for RGB).
    pub num_channels: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        // Hugging Face's CLIPVisionConfig defaults (ViT-B/32).
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl TextConfig {
    /// Tokens per text row when encoding: CLIP's full context (77), or for a BERT tower at
    /// most 64 of its 512 positions (padding is masked, so a longer row gives the same
    /// features; captions longer than 64 WordPiece tokens are cut).
    pub fn default_context_length(&self) -> usize {
        match self.kind {
            TextTowerKind::Clip => self.max_position_embeddings,
            TextTowerKind::Bert => self.max_position_embeddings.min(64),
        }
    }
}

impl VisionConfig {
    /// Number of patches along one side of the image.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Sequence length seen by the transformer: one class token plus one token per patch.
    pub fn num_positions(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }
}

/// Which architecture the text tower has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TextTowerKind {
    /// CLIP's causal transformer, pooled at the end token (`CLIPTextModel`).
    #[default]
    #[serde(rename = "clip_text_model")]
    Clip,
    /// A BERT encoder, mean-pooled over the non-padding tokens as sentence-transformers
    /// does: the frozen text tower of a locked-text (LiT) teacher such as all-MiniLM-L6-v2.
    /// Its tensors use `transformers`' `BertModel` names under `text_model.`, as in a
    /// `VisionTextDualEncoderModel`.
    #[serde(rename = "bert")]
    Bert,
}

/// Shape of the text transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Architecture: CLIP text transformer (default) or BERT.
    #[serde(rename = "model_type")]
    pub kind: TextTowerKind,
    /// Vocabulary size of the token embedding.
    pub vocab_size: usize,
    /// Context length (`max_position_embeddings`), 77 for CLIP.
    pub max_position_embeddings: usize,
    /// Transformer width.
    pub hidden_size: usize,
    /// MLP hidden width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// Token whose final hidden state is the sentence embedding. `None` (or the legacy value 2
    /// found in old Hub configs) pools at the highest token id, as OpenAI's code does.
    pub eos_token_id: Option<u32>,
    /// Padding token id. BERT towers leave it out of the mean pooling; CLIP ignores it.
    pub pad_token_id: u32,
    /// BERT only: number of token types (segment embeddings).
    pub type_vocab_size: usize,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            kind: TextTowerKind::Clip,
            pad_token_id: 0,
            type_vocab_size: 2,
            vocab_size: 49408,
            max_position_embeddings: 77,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: Some(49407),
        }
    }
}

/// A whole CLIP model: both towers and the shared embedding width.
///
/// ```
/// use clipcid_models::ClipConfig;
/// let cfg = ClipConfig::preset("piccollage-s12").unwrap();
/// assert_eq!(cfg.vision_config.hidden_size, 384);
/// assert_eq!(cfg.projection_dim, 512);
/// ```
///
/// Deserialising reads a Hugging Face `config.json` as `transformers`' `CLIPConfig` does:
/// omitted fields take `CLIPConfig`'s defaults, `null` means "not set", unknown keys are
/// ignored, and the legacy `text_config_dict` / `vision_config_dict` (found in OpenAI's and
/// LAION's Hub configs) override `text_config` / `vision_config` key by key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, try_from = "serde_json::Value")]
pub struct ClipConfig {
    /// Width of the joint image-text embedding space.
    pub projection_dim: usize,
    /// Initial value of the learnable log logit scale, `ln(1 / 0.07)` in CLIP.
    pub logit_scale_init_value: f64,
    /// Image tower.
    pub vision_config: VisionConfig,
    /// Text tower.
    pub text_config: TextConfig,
}

/// The fields of a Hub `config.json` after [`hf_overlay`]; the same shape as [`ClipConfig`].
#[derive(Deserialize)]
#[serde(default)]
struct HfClipConfig {
    projection_dim: usize,
    logit_scale_init_value: f64,
    vision_config: VisionConfig,
    text_config: TextConfig,
}

impl Default for HfClipConfig {
    fn default() -> Self {
        let c = ClipConfig::default();
        Self {
            projection_dim: c.projection_dim,
            logit_scale_init_value: c.logit_scale_init_value,
            vision_config: c.vision_config,
            text_config: c.text_config,
        }
    }
}

/// Top-level `model_type`s whose tensors use the names clipcid reads.
const MODEL_TYPES: [&str; 2] = ["clip", "vision-text-dual-encoder"];

/// Merges `{tower}_config_dict` over `{tower}_config` and drops `null` values (so defaults
/// apply), as `transformers`' `CLIPConfig.__init__` does; checks the `model_type`s.
fn hf_overlay(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
    let obj = v
        .as_object_mut()
        .ok_or("a model config must be a JSON object")?;
    if let Some(t) = obj.get("model_type").and_then(|t| t.as_str()) {
        if !MODEL_TYPES.contains(&t) {
            return Err(format!(
                "model_type `{t}` is not a CLIP model (clipcid reads {})",
                MODEL_TYPES.join(", ")
            ));
        }
    }
    for tower in ["text", "vision"] {
        let mut merged = serde_json::Map::new();
        for key in [format!("{tower}_config"), format!("{tower}_config_dict")] {
            match obj.remove(&key) {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::Object(m)) => merged.extend(m),
                Some(other) => return Err(format!("`{key}` must be an object, not {other}")),
            }
        }
        // `null` means "use the default", except for the one optional field, where it means
        // "none" (a BERT tower has no end token), as in `transformers`.
        merged.retain(|k, v| !v.is_null() || k == "eos_token_id");
        let kind = merged.get("model_type").and_then(|t| t.as_str());
        let known: &[&str] = match tower {
            "text" => &["clip_text_model", "clip", "bert"],
            _ => &["clip_vision_model", "clip"],
        };
        if let Some(k) = kind.filter(|k| !known.contains(k)) {
            return Err(format!(
                "{tower} tower model_type `{k}` is not supported (clipcid reads {})",
                known.join(", ")
            ));
        }
        if tower == "text" && kind == Some("clip") {
            merged.insert("model_type".into(), "clip_text_model".into());
        }
        obj.insert(format!("{tower}_config"), serde_json::Value::Object(merged));
    }
    obj.retain(|_, v| !v.is_null());
    Ok(v)
}

impl TryFrom<serde_json::Value> for ClipConfig {
    type Error = String;

    fn try_from(v: serde_json::Value) -> Result<Self, Self::Error> {
        let hf: HfClipConfig = serde_json::from_value(hf_overlay(v)?).map_err(|e| e.to_string())?;
        Ok(Self {
            projection_dim: hf.projection_dim,
            logit_scale_init_value: hf.logit_scale_init_value,
            vision_config: hf.vision_config,
            text_config: hf.text_config,
        })
    }
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            vision_config: VisionConfig::default(),
            text_config: TextConfig::default(),
        }
    }
}

/// Names accepted by [`ClipConfig::preset`].
pub const PRESETS: &[&str] = &[
    "vit-b-32",
    "vit-b-16",
    "piccollage-s12",
    "piccollage-s24",
    "tiny",
];

impl ClipConfig {
    /// A named model shape.
    ///
    /// - `vit-b-32`, `vit-b-16`: OpenAI CLIP ViT-B/32 and ViT-B/16.
    /// - `piccollage-s12`, `piccollage-s24`: PicCollage's distilled image towers (width 384,
    ///   6 layers, 12 or 24 heads, patch 32, output 512) paired with the ViT-B/32 text tower,
    ///   which PicCollage keeps from the teacher.
    /// - `tiny`: a very small model (width 32, 2 layers, 32 px images, 514-token vocabulary
    ///   of [`crate::ClipTokenizer::byte_level`]) for tests and smoke runs.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let b32 = Self::default();
        let piccollage = |heads| {
            let mut c = Self::default();
            c.vision_config.hidden_size = 384;
            c.vision_config.intermediate_size = 4 * 384;
            c.vision_config.num_hidden_layers = 6;
            c.vision_config.num_attention_heads = heads;
            c
        };
        let cfg = match name.to_ascii_lowercase().replace(['/', '_'], "-").as_str() {
            "vit-b-32" => b32,
            "vit-b-16" => {
                let mut c = b32;
                c.vision_config.patch_size = 16;
                c
            }
            "piccollage-s12" => piccollage(12),
            "piccollage-s24" => piccollage(24),
            "tiny" => Self {
                projection_dim: 16,
                logit_scale_init_value: 2.6592,
                vision_config: VisionConfig {
                    hidden_size: 32,
                    intermediate_size: 64,
                    num_hidden_layers: 2,
                    num_attention_heads: 2,
                    image_size: 32,
                    patch_size: 8,
                    ..VisionConfig::default()
                },
                text_config: TextConfig {
                    vocab_size: 514,
                    max_position_embeddings: 16,
                    hidden_size: 32,
                    intermediate_size: 64,
                    num_hidden_layers: 2,
                    num_attention_heads: 2,
                    eos_token_id: Some(513),
                    ..TextConfig::default()
                },
            },
            _ => {
                return Err(ModelError::Config(format!(
                    "unknown preset `{name}`; known presets: {}",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(cfg)
    }

    /// The pooling token, with the legacy Hub value 2 mapped to "highest id" pooling.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self.text_config.eos_token_id {
            Some(2) | None => None,
            id => id,
        }
    }

    /// Parameters the config asks for, from its shapes (attention, MLP, embeddings and
    /// projections; norms and biases left out), saturating rather than overflowing.
    fn approx_parameters(&self) -> u128 {
        let v = &self.vision_config;
        let t = &self.text_config;
        let u = |x: usize| x as u128;
        let blocks = |w: usize, mlp: usize, layers: usize| {
            u(layers).saturating_mul(
                u(w).saturating_mul(u(w))
                    .saturating_mul(4)
                    .saturating_add(u(w).saturating_mul(u(mlp)).saturating_mul(2)),
            )
        };
        let grid = u(v.image_size / v.patch_size.max(1));
        let patch = u(v.num_channels)
            .saturating_mul(u(v.patch_size).saturating_mul(u(v.patch_size)))
            .saturating_mul(u(v.hidden_size));
        let vision_pos = grid
            .saturating_mul(grid)
            .saturating_add(1)
            .saturating_mul(u(v.hidden_size));
        let text_emb = u(t.vocab_size)
            .saturating_add(u(t.max_position_embeddings))
            .saturating_mul(u(t.hidden_size));
        let proj = u(self.projection_dim)
            .saturating_mul(u(v.hidden_size).saturating_add(u(t.hidden_size)));
        [
            blocks(v.hidden_size, v.intermediate_size, v.num_hidden_layers),
            blocks(t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            patch,
            vision_pos,
            text_emb,
            proj,
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add)
    }

    /// Checks that the shapes are consistent (heads divide widths, patches tile the image...)
    /// and within bounds: at most 65,536 positions per tower and about 20 billion
    /// parameters (bigG/14 has 2.5 billion), so a hostile config is an error before any
    /// tensor is allocated.
    pub fn validate(&self) -> Result<(), ModelError> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let check = |ok: bool, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(ModelError::Config(msg))
            }
        };
        check(self.projection_dim > 0, "projection_dim must be > 0".into())?;
        for (tower, width, heads, layers, mlp) in [
            (
                "vision",
                v.hidden_size,
                v.num_attention_heads,
                v.num_hidden_layers,
                v.intermediate_size,
            ),
            (
                "text",
                t.hidden_size,
                t.num_attention_heads,
                t.num_hidden_layers,
                t.intermediate_size,
            ),
        ] {
            check(
                width > 0 && heads > 0 && layers > 0 && mlp > 0,
                format!("{tower}: width, heads, layers and intermediate size must all be > 0"),
            )?;
            check(
                width.is_multiple_of(heads),
                format!("{tower}: {heads} attention heads do not divide width {width}"),
            )?;
        }
        check(v.image_size > 0, "vision: image_size must be > 0".into())?;
        for (tower, eps) in [("vision", v.layer_norm_eps), ("text", t.layer_norm_eps)] {
            check(
                eps.is_finite() && eps > 0.0,
                format!("{tower}: layer_norm_eps must be a positive number, not {eps}"),
            )?;
        }
        check(
            self.logit_scale_init_value.is_finite(),
            format!(
                "logit_scale_init_value must be finite, not {}",
                self.logit_scale_init_value
            ),
        )?;
        check(
            v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
            format!(
                "vision: patch size {} does not tile image size {}",
                v.patch_size, v.image_size
            ),
        )?;
        check(
            v.num_channels > 0,
            "vision: num_channels must be > 0".into(),
        )?;
        check(
            t.vocab_size > 0 && t.max_position_embeddings > 0,
            "text: vocab_size and max_position_embeddings must be > 0".into(),
        )?;
        // Bounds that keep a hostile config from asking for more memory than any CLIP uses
        // (ViT-L/14-336 has 577 positions, bigG/14 2.5B parameters) before a tensor exists.
        let grid = (v.image_size / v.patch_size) as u128;
        let positions = grid * grid + 1;
        check(
            positions <= MAX_POSITIONS as u128 && t.max_position_embeddings <= MAX_POSITIONS,
            format!(
                "vision: {positions} positions (image {} / patch {}) or text: {} positions is beyond the {MAX_POSITIONS} clipcid supports",
                v.image_size, v.patch_size, t.max_position_embeddings
            ),
        )?;
        let params = self.approx_parameters();
        check(
            params <= MAX_PARAMETERS,
            format!(
                "about {params} parameters is beyond the {MAX_PARAMETERS} clipcid supports (a hostile or mistyped config?)"
            ),
        )?;
        if t.kind == TextTowerKind::Bert {
            check(
                (t.pad_token_id as usize) < t.vocab_size && t.type_vocab_size > 0,
                format!(
                    "text: BERT pad_token_id {} must be inside the vocabulary of {} and type_vocab_size > 0",
                    t.pad_token_id, t.vocab_size
                ),
            )?;
        } else if let Some(eos) = self.eos_token_id() {
            check(
                (eos as usize) < t.vocab_size,
                format!(
                    "text: eos_token_id {eos} is outside the vocabulary of {}",
                    t.vocab_size
                ),
            )?;
        }
        Ok(())
    }

    /// The Hugging Face `config.json` for this model.
    ///
    /// A BERT text tower makes it a `vision-text-dual-encoder` config (the tensor names are
    /// that class's, and `vision_config.model_type` is `clip_vision_model`, without which
    /// `transformers` would build another vision class and leave the tower's weights unused).
    /// `VisionTextDualEncoderModel.from_pretrained` then loads every weight but BERT's pooler,
    /// which a sentence-transformers tower does not have (transformers initialises it and
    /// warns): image features come out of `get_image_features` as clipcid computes them, but
    /// `get_text_features` pools through that pooler. clipcid mean-pools over the attention
    /// mask, as sentence-transformers does; in `transformers` that is
    ///
    /// ```text
    /// h = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    /// features = model.text_projection((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    /// ```
    ///
    /// (checked against transformers 5.24: equal to clipcid's text features to 1e-6).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            let (model_type, class) = match self.text_config.kind {
                TextTowerKind::Clip => ("clip", "CLIPModel"),
                TextTowerKind::Bert => ("vision-text-dual-encoder", "VisionTextDualEncoderModel"),
            };
            obj.insert("model_type".into(), model_type.into());
            obj.insert("architectures".into(), serde_json::json!([class]));
            // Without it `transformers` builds its default vision class for a dual encoder.
            if let Some(vision) = obj.get_mut("vision_config").and_then(|v| v.as_object_mut()) {
                vision.insert("model_type".into(), "clip_vision_model".into());
            }
        }
        v
    }

    /// Writes [`ClipConfig::to_hf_json`] as a pretty-printed Hugging Face `config.json` to
    /// `path`, atomically (what `transformers` and a run config's `student.model` read).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let cfg = clipcid_models::ClipConfig::preset("tiny")?;
    /// cfg.save_json(&dir.path().join("config.json"))?;
    /// let back: clipcid_models::ClipConfig =
    ///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    /// assert_eq!(back, cfg);
    /// # Ok(()) }
    /// ```
    pub fn save_json(&self, path: &std::path::Path) -> Result<(), ModelError> {
        let json = serde_json::to_vec_pretty(&self.to_hf_json())
            .map_err(|e| ModelError::Config(e.to_string()))?;
        Ok(clipcid_store::io::write_atomic(path, &json)?)
    }

    /// Reads an open_clip model config: the Hub's `open_clip_config.json` (`{"model_cfg": ..,
    /// "preprocess_cfg": ..}`) or a bare model config as in open_clip's `model_configs/*.json`
    /// (`{"embed_dim": .., "vision_cfg": .., "text_cfg": ..}`).
    ///
    /// Every omitted field takes the default of open_clip's `CLIPVisionCfg` / `CLIPTextCfg`
    /// (open_clip 3.x): vision width 768, 12 layers, head width 64, patch 16, 224 px; text width
    /// 512, **8 heads**, 12 layers, context 77, vocabulary 49,408; MLP ratio 4; `quick_gelu`
    /// false (exact GELU). Options that change the architecture beyond that (timm or Hugging Face
    /// towers, LayerScale, attentional pooling, other pooling, custom attention blocks, ...) are
    /// refused with the field's name rather than loaded wrongly.
    ///
    /// ```
    /// use clipcid_models::{Activation, ClipConfig};
    /// // open_clip's model_configs/ViT-B-32.json minus the fields open_clip defaults.
    /// let bare = r#"{"embed_dim": 512, "vision_cfg": {"patch_size": 32}, "text_cfg": {}}"#;
    /// let cfg = ClipConfig::from_open_clip_json(bare).unwrap();
    /// assert_eq!(cfg.text_config.num_attention_heads, 8);
    /// assert_eq!(cfg.vision_config.num_attention_heads, 12); // 768 / head_width 64
    /// assert_eq!(cfg.vision_config.hidden_act, Activation::Gelu);
    /// ```
    pub fn from_open_clip_json(json: &str) -> Result<Self, ModelError> {
        let cfg = crate::weights::open_clip::open_clip_config(json).map_err(ModelError::Config)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// open_clip's `model_cfg` for this model (what `open_clip_config.json` holds under
    /// `model_cfg`), with every shape field written out. Models open_clip cannot express (a
    /// BERT text tower, different activations per tower, ...) are an error saying why.
    ///
    /// ```
    /// use clipcid_models::ClipConfig;
    /// let cfg = ClipConfig::preset("vit-b-32").unwrap();
    /// let json = cfg.to_open_clip_json().unwrap().to_string();
    /// assert_eq!(ClipConfig::from_open_clip_json(&json).unwrap(), cfg);
    /// ```
    pub fn to_open_clip_json(&self) -> Result<serde_json::Value, ModelError> {
        crate::weights::open_clip::open_clip_model_cfg(self).map_err(ModelError::Config)
    }

    /// Reads a model config file of either family: a Hugging Face `config.json` (see
    /// [`ClipConfig`]'s deserialisation) or an open_clip config, wrapped or bare (see
    /// [`ClipConfig::from_open_clip_json`]). Errors name the file.
    pub fn from_json_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let bytes =
            std::fs::read(path).map_err(|e| ModelError::file(path, format!("cannot read: {e}")))?;
        // A checkpoint given where its config belongs: say so, not "invalid UTF-8".
        let text = String::from_utf8(bytes)
            .map_err(|_| ModelError::file(path, "not a JSON config (binary, not text)"))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::file(path, format!("not JSON: {e}")))?;
        let open_clip = ["model_cfg", "embed_dim", "vision_cfg", "text_cfg"]
            .iter()
            .any(|k| value.get(k).is_some());
        let cfg = if open_clip {
            Self::from_open_clip_json(&text)
                .map_err(|e| ModelError::file(path, format!("not an open_clip config: {e}")))?
        } else {
            let cfg: Self = serde_json::from_value(value)
                .map_err(|e| ModelError::file(path, format!("not a CLIP config: {e}")))?;
            cfg.validate().map_err(|e| ModelError::file(path, e))?;
            cfg
        };
        Ok(cfg)
    }

    /// The config of the model at `path`, read without its weights: a config file (as
    /// [`ClipConfig::from_json_file`]), a model folder (its `config.json`, else its
    /// `open_clip_config.json`), or a `.safetensors` checkpoint that carries its config in
    /// its metadata (what [`crate::ClipModel::save`] and `clipcid init-model` write). Errors
    /// name the file.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use clipcid_models::{ClipConfig, ClipModel};
    /// let dir = tempfile::tempdir()?;
    /// let cfg = ClipConfig::preset("tiny")?;
    /// let model = ClipModel::random(&cfg, 0, &candle_core::Device::Cpu)?;
    /// model.save(&dir.path().join("m.safetensors"), candle_core::DType::F32)?;
    /// model.save_pretrained(&dir.path().join("folder"), candle_core::DType::F32)?;
    /// for p in ["m.safetensors", "folder", "folder/config.json"] {
    ///     assert_eq!(ClipConfig::from_path(&dir.path().join(p))?, cfg);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn from_path(path: &std::path::Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            let file = crate::hub::HUB_CONFIG_FILES
                .iter()
                .map(|name| path.join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    ModelError::file(
                        path,
                        "a folder with no config.json or open_clip_config.json",
                    )
                })?;
            return Self::from_json_file(&file);
        }
        if path.extension().is_some_and(|e| e == "safetensors") {
            let header = clipcid_store::io::read_header(path)?;
            let cfg = Self::from_checkpoint_metadata(path, &header.metadata)?.ok_or_else(|| {
                ModelError::file(
                    path,
                    format!(
                        "a checkpoint with no `{}` metadata: give its config.json instead",
                        crate::weights::CONFIG_METADATA_KEY
                    ),
                )
            })?;
            cfg.validate().map_err(|e| ModelError::file(path, e))?;
            return Ok(cfg);
        }
        Self::from_json_file(path)
    }

    /// The config a checkpoint `file` carries in its `clipcid.config` metadata, `None` when
    /// it carries none; metadata that is not a config is an error naming the file.
    pub(crate) fn from_checkpoint_metadata(
        file: &std::path::Path,
        metadata: &std::collections::HashMap<String, String>,
    ) -> Result<Option<Self>, ModelError> {
        let key = crate::weights::CONFIG_METADATA_KEY;
        metadata
            .get(key)
            .map(|json| {
                serde_json::from_str(json)
                    .map_err(|e| ModelError::file(file, format!("corrupt `{key}` metadata: {e}")))
            })
            .transpose()
    }

    /// A locked-text config: a CLIP image tower of shape `vision` projected into the
    /// embedding space of the BERT text tower described by `bert_config_json` (a
    /// `transformers` `BertConfig` `config.json`, e.g. all-MiniLM-L6-v2's). The text
    /// projection is square (`projection_dim` = BERT width), so an identity projection keeps
    /// the sentence embedding exactly.
    ///
    /// ```
    /// use clipcid_models::{ClipConfig, TextTowerKind, VisionConfig};
    /// let bert = r#"{"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
    ///     "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
    ///     "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    ///     "pad_token_id": 0, "model_type": "bert"}"#;
    /// let cfg = ClipConfig::locked_text(VisionConfig::default(), bert).unwrap();
    /// assert_eq!(cfg.text_config.kind, TextTowerKind::Bert);
    /// assert_eq!(cfg.projection_dim, 384);
    /// ```
    pub fn locked_text(vision: VisionConfig, bert_config_json: &str) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Bert {
            vocab_size: usize,
            hidden_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            intermediate_size: usize,
            hidden_act: Activation,
            max_position_embeddings: usize,
            #[serde(default = "two")]
            type_vocab_size: usize,
            #[serde(default = "bert_eps")]
            layer_norm_eps: f64,
            #[serde(default)]
            pad_token_id: u32,
            #[serde(default)]
            model_type: Option<String>,
        }
        fn two() -> usize {
            2
        }
        fn bert_eps() -> f64 {
            1e-12
        }
        let b: Bert = serde_json::from_str(bert_config_json)
            .map_err(|e| ModelError::Config(format!("not a BERT config.json: {e}")))?;
        if let Some(t) = b.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(ModelError::Config(format!(
                "text tower model_type `{t}` is not `bert`"
            )));
        }
        let cfg = Self {
            projection_dim: b.hidden_size,
            logit_scale_init_value: Self::default().logit_scale_init_value,
            vision_config: vision,
            text_config: TextConfig {
                kind: TextTowerKind::Bert,
                vocab_size: b.vocab_size,
                max_position_embeddings: b.max_position_embeddings,
                hidden_size: b.hidden_size,
                intermediate_size: b.intermediate_size,
                num_hidden_layers: b.num_hidden_layers,
                num_attention_heads: b.num_attention_heads,
                hidden_act: b.hidden_act,
                layer_norm_eps: b.layer_norm_eps,
                eos_token_id: None,
                pad_token_id: b.pad_token_id,
                type_vocab_size: b.type_vocab_size,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_through_json() {
        for name in PRESETS {
            let cfg = ClipConfig::preset(name).expect("preset");
            cfg.validate().expect("valid");
            let json = serde_json::to_string(&cfg.to_hf_json()).expect("json");
            let back: ClipConfig = serde_json::from_str(&json).expect("parse");
            assert_eq!(back, cfg, "{name}");
        }
    }

    #[test]
    fn hub_style_config_parses_with_defaults() {
        let json = r#"{"projection_dim": 512, "text_config_dict": {"eos_token_id": 2},
                       "vision_config": {"patch_size": 16}, "model_type": "clip"}"#;
        let cfg: ClipConfig = serde_json::from_str(json).expect("parse");
        assert_eq!(cfg.vision_config.patch_size, 16);
        assert_eq!(cfg.vision_config.hidden_size, 768);
        assert_eq!(cfg.eos_token_id(), None);
    }

    #[test]
    fn bad_shapes_are_rejected() {
        let mut cfg = ClipConfig::preset("tiny").expect("preset");
        cfg.vision_config.num_attention_heads = 3;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("3 attention heads do not divide width 32"),
            "{err}"
        );
        assert!(ClipConfig::preset("vit-h-14").is_err());
    }
}
