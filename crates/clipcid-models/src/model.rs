//! [`ClipModel`]: both towers, loading, saving and the trainable constructor.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError};

use candle_core::Var;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;

use crate::config::{Activation, ClipConfig, TextConfig, TextTowerKind, VisionConfig};
use crate::nn::{get, linear_no_bias, Encoder, LayerNorm, Linear, Params};
use crate::weights::{
    check_tensors, hf_tensor_shapes, init_tensors, Checkpoint, CONFIG_METADATA_KEY,
};
use crate::ModelError;
use clipcid_kernels::{cpu, l2_normalize};
use clipcid_store::io;

/// The image tower: patch embedding, class token, pre-norm transformer, projection.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    cfg: VisionConfig,
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    encoder: Encoder,
    post_norm: LayerNorm,
    projection: Linear,
}

impl VisionTransformer {
    fn load(p: &Params, cfg: &VisionConfig) -> candle_core::Result<Self> {
        let e = cfg.layer_norm_eps;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embedding: get(p, "vision_model.embeddings.patch_embedding.weight")?,
            class_embedding: get(p, "vision_model.embeddings.class_embedding")?,
            position_embedding: get(p, "vision_model.embeddings.position_embedding.weight")?,
            pre_norm: LayerNorm::load(p, "vision_model.pre_layrnorm", e)?,
            encoder: Encoder::load(
                p,
                "vision_model",
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.hidden_act,
                e,
            )?,
            post_norm: LayerNorm::load(p, "vision_model.post_layernorm", e)?,
            projection: linear_no_bias(p, "visual_projection.weight")?,
        })
    }

    /// Patch embedding `[B, grid^2, W]` of pixels `[B, C, S, S]`: a convolution with stride =
    /// kernel = patch size, written as cutting the image into patches and one matmul (exact)
    /// because candle's CPU conv2d backward (a dilated direct convolution for the kernel
    /// gradient) cost ~15% of a training step of the 384-wide student.
    fn patch_embed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, s, _) = x.dims4()?;
        let (p, width) = (self.cfg.patch_size, self.cfg.hidden_size);
        let g = s / p;
        let patches = patch_matrix(x, p)?;
        let kernel = self.patch_embedding.reshape((width, c * p * p))?;
        let embedded = if cpu::is_cpu_f32(&patches) && cpu::is_cpu_f32(&kernel) {
            cpu::matmul(&patches, &kernel.t()?)?
        } else {
            patches.matmul(&kernel.t()?)?
        };
        embedded.reshape((b, g * g, width))
    }

    /// Pooled, projected image features `[B, projection_dim]` (not normalised) from
    /// preprocessed pixels `[B, C, H, W]`.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if (c, h, w) != (self.cfg.num_channels, s, s) {
            candle_core::bail!(
                "image batch has shape [{b}, {c}, {h}, {w}] but the model takes [B, {}, {s}, {s}]",
                self.cfg.num_channels
            );
        }
        let x = pixels.to_dtype(self.patch_embedding.dtype())?;
        let width = self.cfg.hidden_size;
        let x = self.patch_embed(&x)?; // [B, grid^2, W]
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let x = add_positions(&x, &self.position_embedding)?;
        let x = self.pre_norm.forward(&x)?;
        let pooled = self.post_norm.forward(&self.encoder.forward_first(&x)?)?;
        self.projection.forward(&pooled)
    }
}

/// The patch matrix `[B * g * g, C * p * p]` of images `[B, C, S, S]` (`g = S / p`): on a GPU
/// one copy kernel (`clipcid_kernels::cuda::patchify`), elsewhere a six-dimensional permute.
fn patch_matrix(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let (b, c, s, _) = x.dims4()?;
    #[cfg(feature = "cuda")]
    if clipcid_kernels::gpu_kernels_take(&[x]) && p > 0 && s % p == 0 {
        return clipcid_kernels::cuda::patchify(x, p);
    }
    let g = s / p;
    x.reshape((b, c, g, p, g, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b * g * g, c * p * p))
}

/// `x + positions` for `x` `[B, T, W]` and positions `[T, W]`: on a GPU one bias kernel over
/// rows of `T * W` (`clipcid_kernels::cuda::bias_add`), elsewhere a broadcast add.
fn add_positions(x: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if clipcid_kernels::gpu_kernels_take(&[x, positions]) {
        let (b, t, w) = x.dims3()?;
        let flat = positions.contiguous()?.reshape(t * w)?;
        let y = clipcid_kernels::cuda::bias_add(&x.reshape((b, t * w))?, &flat)?;
        return y.reshape((b, t, w));
    }
    x.broadcast_add(positions)
}

/// The text tower: token + position embeddings, causal transformer, pooled at the end token.
#[derive(Debug, Clone)]
pub struct TextTransformer {
    cfg: TextConfig,
    eos_token_id: Option<u32>,
    /// `[vocab, W]`, read by [`clipcid_kernels::gather_rows`].
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_norm: LayerNorm,
    projection: Linear,
}

impl TextTransformer {
    fn load(p: &Params, cfg: &TextConfig, eos_token_id: Option<u32>) -> candle_core::Result<Self> {
        let e = cfg.layer_norm_eps;
        Ok(Self {
            cfg: cfg.clone(),
            eos_token_id,
            token_embedding: get(p, "text_model.embeddings.token_embedding.weight")?,
            position_embedding: get(p, "text_model.embeddings.position_embedding.weight")?,
            encoder: Encoder::load(
                p,
                "text_model",
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.hidden_act,
                e,
            )?,
            final_norm: LayerNorm::load(p, "text_model.final_layer_norm", e)?,
            projection: linear_no_bias(p, "text_projection.weight")?,
        })
    }

    /// Pooled, projected text features `[B, projection_dim]` (not normalised) from token ids
    /// `[B, T]` (u32, `T <= max_position_embeddings`). The features are read at the first end
    /// token of each row (or at the highest id when the config has no end token), so tokens
    /// after it never change the result.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (_, rows) = checked_ids(ids, &self.cfg)?;
        // The host has the ids: `gather_rows` groups them for the backward pass, where
        // candle's `index_add` walks all B * T of them in one GPU block.
        let x = clipcid_kernels::gather_rows(&self.token_embedding, &rows.concat())?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let x = add_positions(&x, &self.position_embedding.narrow(0, 0, t)?)?;
        let x = self.encoder.forward(&x, true)?;
        let pos: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| (i * t + pool_position(row, self.eos_token_id)) as u32)
            .collect();
        let pooled =
            clipcid_kernels::gather_rows(&x.reshape((b * t, self.cfg.hidden_size))?, &pos)?;
        // The final layer norm works row by row: on the pooled rows alone it gives the same
        // features for a 77th of the work (and of the backward pass's).
        self.projection.forward(&self.final_norm.forward(&pooled)?)
    }
}

/// A BERT text tower (`candle_transformers`' `BertModel`), mean-pooled over the tokens that
/// are not padding, then projected: sentence-transformers' embedding when the projection is
/// the identity. Used frozen, as the text side of a locked-text (LiT) teacher.
#[derive(Clone)]
pub struct BertTextTower {
    cfg: TextConfig,
    bert: Arc<candle_transformers::models::bert::BertModel>,
    projection: Linear,
}

impl std::fmt::Debug for BertTextTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTextTower")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl BertTextTower {
    fn load(p: &Params, cfg: &TextConfig) -> candle_core::Result<Self> {
        use candle_transformers::models::bert;
        let any = get(p, "text_projection.weight")?;
        let hidden_act = match cfg.hidden_act {
            Activation::Gelu => bert::HiddenAct::Gelu,
            Activation::QuickGelu => {
                candle_core::bail!("a BERT text tower needs hidden_act `gelu`, not `quick_gelu`")
            }
        };
        let bert_cfg = bert::Config {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            intermediate_size: cfg.intermediate_size,
            hidden_act,
            max_position_embeddings: cfg.max_position_embeddings,
            type_vocab_size: cfg.type_vocab_size,
            layer_norm_eps: cfg.layer_norm_eps,
            pad_token_id: cfg.pad_token_id as usize,
            ..bert::Config::default()
        };
        let text: HashMap<String, Tensor> = p
            .iter()
            .filter_map(|(n, t)| Some((n.strip_prefix("text_model.")?.to_string(), t.clone())))
            .collect();
        // BERT always runs in f32: candle's BERT builds its attention mask as
        // `(1 - mask) * f32::MIN`, which is `0 * -inf = NaN` in f16.
        let vb = candle_nn::VarBuilder::from_tensors(text, DType::F32, any.device());
        Ok(Self {
            cfg: cfg.clone(),
            bert: Arc::new(bert::BertModel::load(vb, &bert_cfg)?),
            projection: linear_no_bias(p, "text_projection.weight")?,
        })
    }

    /// Mean-pooled, projected text features `[B, projection_dim]` (not normalised) from token
    /// ids `[B, T]`; positions holding the padding id are masked out of attention and pooling.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let (ids, rows) = checked_ids(ids, &self.cfg)?;
        // Padding is masked out of attention and pooling, so columns that are padding in
        // every row change nothing: drop them (captions are far shorter than the context).
        let pad = self.cfg.pad_token_id;
        let used = rows
            .iter()
            .map(|row| row.iter().rposition(|&id| id != pad).map_or(0, |p| p + 1))
            .max()
            .unwrap_or(0)
            .max(1);
        let ids = ids.narrow(1, 0, used.min(t))?.contiguous()?;
        let mask = ids.ne(pad)?.to_dtype(DType::F32)?;
        let hidden = self.bert.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let counts = mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
        let pooled = summed.broadcast_div(&counts)?;
        self.projection
            .forward(&pooled.to_dtype(self.projection.weight().dtype())?)
    }
}

/// A text tower: CLIP's transformer or a frozen BERT (see [`TextTowerKind`]).
#[derive(Debug, Clone)]
pub enum TextTower {
    /// CLIP's causal text transformer.
    Clip(TextTransformer),
    /// A mean-pooled BERT encoder.
    Bert(BertTextTower),
}

impl TextTower {
    fn load(p: &Params, config: &ClipConfig) -> candle_core::Result<Self> {
        Ok(match config.text_config.kind {
            TextTowerKind::Clip => Self::Clip(TextTransformer::load(
                p,
                &config.text_config,
                config.eos_token_id(),
            )?),
            TextTowerKind::Bert => Self::Bert(BertTextTower::load(p, &config.text_config)?),
        })
    }

    /// Projected text features `[B, projection_dim]` (not normalised) from token ids.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Clip(t) => t.forward(ids),
            Self::Bert(t) => t.forward(ids),
        }
    }
}

/// Token ids `[B, T]` as u32, and as rows, after checking `T` against the context length
/// and every id against the vocabulary (both towers).
fn checked_ids(ids: &Tensor, cfg: &TextConfig) -> candle_core::Result<(Tensor, Vec<Vec<u32>>)> {
    let (_, t) = ids.dims2()?;
    if t > cfg.max_position_embeddings {
        candle_core::bail!(
            "{t} tokens exceed the context length {}",
            cfg.max_position_embeddings
        );
    }
    let ids = ids.to_dtype(DType::U32)?;
    let rows = ids.to_vec2::<u32>()?;
    let vocab = cfg.vocab_size as u32;
    if let Some(bad) = rows.iter().flatten().find(|&&id| id >= vocab) {
        candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    Ok((ids, rows))
}

fn pool_position(row: &[u32], eos: Option<u32>) -> usize {
    let first_eos = eos.and_then(|e| row.iter().position(|&id| id == e));
    first_eos.unwrap_or_else(|| {
        // Highest id, first occurrence (OpenAI's `argmax`).
        let mut best = 0;
        for (i, &id) in row.iter().enumerate() {
            if id > row[best] {
                best = i;
            }
        }
        best
    })
}

/// A CLIP model: image tower, text tower and the learnable logit scale.
///
/// The same type is a frozen teacher ([`ClipModel::load`]) or a trainable student
/// ([`ClipModel::trainable`], whose parameters live in a [`VarMap`]).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use candle_core::{Device, Tensor};
/// use clipcid_models::{ClipConfig, ClipModel};
/// let cfg = ClipConfig::preset("tiny")?;
/// let model = ClipModel::random(&cfg, 0, &Device::Cpu)?;
/// let pixels = Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &Device::Cpu)?;
/// let emb = model.encode_image(&pixels)?;
/// assert_eq!(emb.dims(), &[2, 16]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClipModel {
    config: ClipConfig,
    vision: VisionTransformer,
    text: TextTower,
    logit_scale: Tensor,
    params: Params,
}

impl ClipModel {
    /// Builds a model from Hugging Face-named tensors, checked against `config`. Tensors are
    /// moved to `device` and cast to `dtype`.
    pub fn from_tensors(
        config: &ClipConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        check_tensors(Path::new("<tensors>"), config, &tensors)?;
        let params = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(device)?.to_dtype(dtype)?)))
            .collect::<Result<Params, candle_core::Error>>()?;
        Self::build(config, params)
    }

    fn build(config: &ClipConfig, params: Params) -> Result<Self, ModelError> {
        Ok(Self {
            vision: VisionTransformer::load(&params, &config.vision_config)?,
            text: TextTower::load(&params, config)?,
            logit_scale: get(&params, "logit_scale")?,
            config: config.clone(),
            params,
        })
    }

    /// Loads a checkpoint file or folder (Hugging Face or OpenCLIP names; see
    /// [`Checkpoint::read`]) in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(path, None, device, DType::F32)
    }

    /// [`ClipModel::load`] with an explicit config override and compute dtype.
    pub fn load_with(
        path: &Path,
        config: Option<ClipConfig>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Self::from_checkpoint(Checkpoint::read(path, config)?, device, dtype)
    }

    /// A model from a [`Checkpoint`] already read (e.g. with [`Checkpoint::read_with`] to
    /// pass an activation, or to look at its layout first), on `device` in `dtype`.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_models::ModelError> {
    /// use candle_core::{DType, Device};
    /// use clipcid_models::{Activation, Checkpoint, ClipConfig, ClipModel, LoadOptions};
    /// let dir = tempfile::tempdir().unwrap();
    /// let cfg = ClipConfig::preset("tiny")?;
    /// ClipModel::random(&cfg, 0, &Device::Cpu)?.save_pretrained(dir.path(), DType::F32)?;
    /// let opts = LoadOptions { activation: Some(Activation::Gelu), ..LoadOptions::default() };
    /// let ckpt = Checkpoint::read_with(dir.path(), &opts)?;
    /// let model = ClipModel::from_checkpoint(ckpt, &Device::Cpu, DType::F32)?;
    /// assert_eq!(model.config().vision_config.hidden_act, Activation::Gelu);
    /// # Ok(()) }
    /// ```
    pub fn from_checkpoint(
        ckpt: Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Self::from_tensors(&ckpt.config, ckpt.tensors, device, dtype)
            .map_err(|e| ModelError::file(&ckpt.path, e))
    }

    /// A frozen model with seeded random weights ([`init_tensors`]): same seed, same model.
    pub fn random(config: &ClipConfig, seed: u64, device: &Device) -> Result<Self, ModelError> {
        Self::from_tensors(config, init_tensors(config, seed)?, device, DType::F32)
    }

    /// A trainable model with seeded random weights: every parameter is a [`Var`] in the
    /// returned [`VarMap`] under its Hugging Face name, ready for a `candle_nn` optimizer.
    pub fn trainable(
        config: &ClipConfig,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, VarMap), ModelError> {
        Self::trainable_from(config, init_tensors(config, seed)?, device)
    }

    /// A trainable model starting from the given tensors (e.g. a [`Checkpoint`]'s), in f32.
    pub fn trainable_from(
        config: &ClipConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<(Self, VarMap), ModelError> {
        config.validate()?;
        check_tensors(Path::new("<tensors>"), config, &tensors)?;
        let varmap = VarMap::new();
        let mut params = Params::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
            for (name, t) in tensors {
                let var = Var::from_tensor(&t.to_device(device)?.to_dtype(DType::F32)?)?;
                params.insert(name.clone(), var.as_tensor().clone());
                data.insert(name, var);
            }
        }
        Ok((Self::build(config, params)?, varmap))
    }

    /// The same model computing in `dtype`: its tensors are casts of this model's, so in a
    /// training step the gradients of a loss on the copy's outputs flow back to this model's
    /// (f32 master) weights. Mixed-precision training builds one per step.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_models::ModelError> {
    /// use candle_core::{DType, Device, Tensor};
    /// use clipcid_models::{ClipConfig, ClipModel};
    /// let cfg = ClipConfig::preset("tiny")?;
    /// let (model, varmap) = ClipModel::trainable(&cfg, 0, &Device::Cpu)?;
    /// let half = model.cast(DType::BF16)?;
    /// let px = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu)?;
    /// let loss = half.encode_image(&px)?.to_dtype(DType::F32)?.sqr()?.sum_all()?;
    /// let grads = loss.backward()?;
    /// // The f32 weights get f32 gradients through the casts.
    /// let vars = varmap.all_vars();
    /// let with_grad: Vec<_> = vars.iter().filter_map(|v| grads.get(v.as_tensor())).collect();
    /// assert!(!with_grad.is_empty() && with_grad.iter().all(|g| g.dtype() == DType::F32));
    /// # Ok(()) }
    /// ```
    pub fn cast(&self, dtype: DType) -> Result<Self, ModelError> {
        let params = self
            .params
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
            .collect::<Result<Params, candle_core::Error>>()?;
        Self::build(&self.config, params)
    }

    /// The same model computing in `dtype` on working copies: each tensor named in `copies`
    /// is taken from there (a `dtype` [`Var`] that an optimizer refreshes from the f32 master
    /// weight, as `clipcid_train::AdamW::working_copies` makes), the others are cast once and
    /// detached (frozen weights). Gradients of a loss on its outputs then go to the copies,
    /// where [`ClipModel::cast`]'s go through a cast of every weight, made each step.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_models::ModelError> {
    /// use std::collections::HashMap;
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use clipcid_models::{ClipConfig, ClipModel};
    /// let cfg = ClipConfig::preset("tiny")?;
    /// let (model, varmap) = ClipModel::trainable(&cfg, 0, &Device::Cpu)?;
    /// let name = "visual_projection.weight";
    /// let master = varmap.data().lock().unwrap()[name].clone();
    /// let copy = Var::from_tensor(&master.as_tensor().to_dtype(DType::BF16)?)?;
    /// let half = model.cast_using(DType::BF16, &HashMap::from([(name.to_string(), copy.clone())]))?;
    /// let px = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu)?;
    /// let loss = half.encode_image(&px)?.to_dtype(DType::F32)?.sqr()?.sum_all()?;
    /// let grads = loss.backward()?;
    /// // The copy gets a bf16 gradient; the master weight and the frozen casts get none.
    /// assert_eq!(grads.get(copy.as_tensor()).map(|g| g.dtype()), Some(DType::BF16));
    /// assert!(grads.get(master.as_tensor()).is_none());
    /// # Ok(()) }
    /// ```
    pub fn cast_using(
        &self,
        dtype: DType,
        copies: &HashMap<String, Var>,
    ) -> Result<Self, ModelError> {
        let params = self
            .params
            .iter()
            .map(|(n, t)| {
                let t = match copies.get(n) {
                    Some(c) if c.dims() != t.dims() || c.dtype() != dtype => {
                        return Err(ModelError::Config(format!(
                            "working copy `{n}` is {:?} {:?}, the model needs {:?} {dtype:?}",
                            c.dims(),
                            c.dtype(),
                            t.dims()
                        )))
                    }
                    Some(c) => c.as_tensor().clone(),
                    None => t.to_dtype(dtype)?.detach(),
                };
                Ok((n.clone(), t))
            })
            .collect::<Result<Params, ModelError>>()?;
        Self::build(&self.config, params)
    }

    /// The model's shape.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The image tower.
    pub fn vision(&self) -> &VisionTransformer {
        &self.vision
    }

    /// The text tower.
    pub fn text(&self) -> &TextTower {
        &self.text
    }

    /// Every parameter under its Hugging Face name.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.params
    }

    /// Number of scalar parameters (all tensors, both towers and the logit scale).
    pub fn parameter_count(&self) -> usize {
        self.params.values().map(Tensor::elem_count).sum()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.logit_scale.device()
    }

    /// Image features `[B, projection_dim]`, not normalised, in the model's dtype. Pixels of
    /// another float dtype are cast to the model's first (f32 pixels into a bf16 model).
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let dtype = self.logit_scale.dtype();
        if pixels.dtype() != dtype {
            return Ok(self.vision.forward(&pixels.to_dtype(dtype)?)?);
        }
        Ok(self.vision.forward(pixels)?)
    }

    /// Text features `[B, projection_dim]`, not normalised.
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.text.forward(ids)?)
    }

    /// The learnable log logit scale (a scalar tensor; the logit multiplier is its `exp`).
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// CLIP similarity logits `[B_img, B_txt]`: `exp(logit_scale) * norm(img) . norm(txt)^T`.
    pub fn logits(&self, pixels: &Tensor, ids: &Tensor) -> Result<Tensor, ModelError> {
        let i = l2_normalize(&self.encode_image(pixels)?)?;
        let t = l2_normalize(&self.encode_text(ids)?)?;
        let scale = self.logit_scale.to_dtype(i.dtype())?.exp()?;
        Ok(i.matmul(&t.t()?)?.broadcast_mul(&scale)?)
    }

    /// Saves the model in the Hugging Face tensor layout as `dtype` (f32 or f16 / bf16), with
    /// its config in the safetensors metadata, atomically. A `config.json` for `transformers`
    /// is written by [`ClipModel::save_pretrained`].
    pub fn save(&self, path: &Path, dtype: DType) -> Result<(), ModelError> {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert(
            CONFIG_METADATA_KEY.to_string(),
            self.config.to_hf_json().to_string(),
        );
        let order = hf_tensor_shapes(&self.config);
        let tensors = order
            .keys()
            .map(|n| Ok((n.clone(), get(&self.params, n)?.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        Ok(io::write_safetensors(path, tensors, &meta)?)
    }

    /// SHA-256 (hex) of the model: its config and every tensor's values (as f32, in name
    /// order). Recorded in the outputs a model produces so that a resume can tell whether the
    /// same model made them.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_models::ModelError> {
    /// use clipcid_models::{ClipConfig, ClipModel};
    /// let cfg = ClipConfig::preset("tiny")?;
    /// let dev = candle_core::Device::Cpu;
    /// let a = ClipModel::random(&cfg, 0, &dev)?.fingerprint()?;
    /// assert_eq!(a, ClipModel::random(&cfg, 0, &dev)?.fingerprint()?);
    /// assert_ne!(a, ClipModel::random(&cfg, 1, &dev)?.fingerprint()?);
    /// # Ok(()) }
    /// ```
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.config.to_hf_json().to_string().as_bytes());
        let mut names: Vec<&String> = self.params.keys().collect();
        names.sort();
        for name in names {
            let values: Vec<f32> = self.params[name]
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            h.update(name.as_bytes());
            for v in values {
                h.update(v.to_le_bytes());
            }
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// Writes open_clip's files into `dir`: `open_clip_model.safetensors` (open_clip's tensor
    /// names, `dtype`) and `open_clip_config.json` (`model_cfg` from
    /// [`ClipConfig::to_open_clip_json`], and `preprocess_cfg` when given), which
    /// `open_clip.create_model_and_transforms("local-dir:DIR")` loads. Models open_clip cannot
    /// express (a BERT text tower) are an error.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_models::ModelError> {
    /// use candle_core::{DType, Device};
    /// use clipcid_models::{ClipConfig, ClipModel};
    /// let dir = tempfile::tempdir().unwrap();
    /// let model = ClipModel::random(&ClipConfig::preset("tiny")?, 0, &Device::Cpu)?;
    /// model.save_open_clip(dir.path(), DType::F32, None)?;
    /// let back = ClipModel::load(dir.path(), &Device::Cpu)?; // reads open_clip folders too
    /// assert_eq!(back.config(), model.config());
    /// # Ok(()) }
    /// ```
    pub fn save_open_clip(
        &self,
        dir: &Path,
        dtype: DType,
        preprocess_cfg: Option<serde_json::Value>,
    ) -> Result<(), ModelError> {
        let model_cfg = self.config.to_open_clip_json()?;
        clipcid_store::io::create_output_folder(dir)?;
        let hf: HashMap<String, Tensor> = hf_tensor_shapes(&self.config)
            .keys()
            .map(|n| Ok((n.clone(), get(&self.params, n)?.to_dtype(dtype)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        let oc = crate::weights::hf_to_open_clip(&hf)?;
        let mut names: Vec<String> = oc.keys().cloned().collect();
        names.sort();
        let tensors: Vec<(String, Tensor)> = names
            .into_iter()
            .map(|n| {
                let t = oc[&n].clone();
                (n, t)
            })
            .collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        io::write_safetensors(&dir.join("open_clip_model.safetensors"), tensors, &meta)?;
        let mut config = serde_json::json!({ "model_cfg": model_cfg });
        if let Some(p) = preprocess_cfg {
            config["preprocess_cfg"] = p;
        }
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| ModelError::Config(e.to_string()))?;
        Ok(io::write_atomic(
            &dir.join("open_clip_config.json"),
            text.as_bytes(),
        )?)
    }

    /// Writes a Hugging Face model folder: `model.safetensors` and `config.json`.
    pub fn save_pretrained(&self, dir: &Path, dtype: DType) -> Result<(), ModelError> {
        clipcid_store::io::create_output_folder(dir)?;
        self.save(&dir.join("model.safetensors"), dtype)?;
        self.config.save_json(&dir.join("config.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_embedding_as_matmul_equals_the_strided_convolution() -> Result<(), ModelError> {
        let cfg = ClipConfig::preset("tiny")?;
        let model = ClipModel::random(&cfg, 3, &Device::Cpu)?;
        let v = model.vision();
        let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu)?;
        let conv = x
            .conv2d(&v.patch_embedding, 0, v.cfg.patch_size, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let diff = crate::nn::max_abs_diff(&v.patch_embed(&x)?, &conv)?;
        assert!(diff < 1e-5, "max difference {diff}");
        Ok(())
    }
}
