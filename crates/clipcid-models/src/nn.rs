//! Transformer building blocks shared by both towers.
//!
//! Every block is built from tensors looked up by their Hugging Face name in a map of named
//! tensors, so the same code serves a frozen teacher loaded from disk and a trainable student
//! whose tensors are `candle_nn::Var`s. On the CPU in f32 an encoder runs its layers on rows
//! `[B * T, W]` through `clipcid_kernels::cpu`: for inference one q/k/v product, attention as
//! one op, the activation in place and the residuals inside the products; for training each
//! layer as one autograd node (`cpu::transformer_block`). On a GPU in f32, bf16 or f16 an encoder
//! also runs on rows, with one q/k/v product and attention as one op with its own backward
//! pass (clipcid's CUDA kernels, `clipcid_kernels::cuda`, where a head's rows fit a block's
//! shared memory); those kernels also take the linear layers' bias (with QuickGELU after
//! `fc1`) and layer norm with its backward pass; with `clipcid_kernels::cuda::set_block_node`
//! a trainable layer runs as one autograd node there too (`cpu::transformer_block`, built from
//! those kernels). The products, and other dtypes and devices, run on candle's ops.

use std::collections::HashMap;

use candle_core::{DType, IndexOp, Module, Result, Tensor, D};

use crate::config::Activation;
use clipcid_kernels::cpu::{self, Queries};

/// Name -> tensor map a model is built from.
pub(crate) type Params = HashMap<String, Tensor>;

pub(crate) fn get(p: &Params, name: &str) -> Result<Tensor> {
    p.get(name)
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))
}

fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Softmax over the last dimension, differentiable when its input tracks gradients.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if needs_grad(&[x]) {
        if cpu::is_cpu_f32(x) || clipcid_kernels::gpu_kernels_take(&[x]) {
            return cpu::softmax_last_dim(x);
        }
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

pub use clipcid_kernels::{all_finite, max_abs_diff};

/// `x * sigmoid(1.702 x)`, OpenAI CLIP's activation; differentiable, and a fused kernel with a
/// hand-written backward pass for f32 CPU tensors that track gradients.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y: Vec<f32> = clipcid_models::nn::quick_gelu(&x)?.to_vec1()?;
/// assert_eq!(y[1], 0.0);
/// assert!((y[2] - 2.0 / (1.0 + (-3.404f32).exp())).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if needs_grad(&[x]) && cpu::is_cpu_f32(x) {
        return cpu::quick_gelu(x);
    }
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Layer normalisation over the last dimension with learned scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(p: &Params, prefix: &str, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: get(p, &format!("{prefix}.weight"))?,
            bias: get(p, &format!("{prefix}.bias"))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let params = [x, &self.weight, &self.bias];
        if params.iter().all(|t| cpu::is_cpu_f32(t)) || clipcid_kernels::gpu_kernels_take(&params) {
            // The fused op with its backward pass (CPU, or clipcid's CUDA kernels, whose
            // forward reads each row once).
            return cpu::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        // candle's fused kernel has no backward pass and no f64 form.
        if !needs_grad(&[x, &self.weight, &self.bias]) && x.dtype() != DType::F64 {
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            );
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// `y = x W^T + b` over the last dimension. On the CPU in f32 the product goes through
/// OpenBLAS (`cpu::matmul`, with its own backward pass); elsewhere through candle's matmul.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// The `[out, in]` weight.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Linear {
    /// The bias, where clipcid's CUDA kernels take this layer on `x` (a GPU, f32, bf16 or f16):
    /// then the product runs on candle and the bias (and activation) in one kernel, where
    /// candle's broadcast add was most of a ViT tower's time on an H200.
    #[cfg(feature = "cuda")]
    fn gpu_bias(&self, x: &Tensor) -> Option<&Tensor> {
        let b = self.bias.as_ref()?;
        clipcid_kernels::gpu_kernels_take(&[x, &self.weight, b]).then_some(b)
    }

    /// `x W^T` alone, on candle (the GPU path adds the bias in a kernel of its own).
    #[cfg(feature = "cuda")]
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::Linear::new(self.weight.clone(), None).forward(x)
    }

    /// `quick_gelu(x W^T + b)`; on a GPU the bias and activation in one kernel.
    pub(crate) fn forward_quick_gelu(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(b) = self.gpu_bias(x) {
            return clipcid_kernels::cuda::bias_quick_gelu(&self.product(x)?, b);
        }
        quick_gelu(&self.forward(x)?)
    }

    /// `x W^T + b` for f32 CPU rows `[rows, in]` on BLAS.
    fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => cpu::linear(x, &self.weight, b),
            None => cpu::matmul(&x.contiguous()?, &self.weight.t()?),
        }
    }

    /// `residual + self(x)`: on the CPU in f32 with a bias, one op that adds the residual
    /// inside the product and passes no gradient (for inference); on a GPU the bias and the
    /// residual in one differentiable kernel after the product; elsewhere an addition.
    pub(crate) fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(b) = self.gpu_bias(x) {
            if clipcid_kernels::gpu_kernels_take(&[x, residual]) {
                return clipcid_kernels::cuda::bias_residual_add(&self.product(x)?, b, residual);
            }
        }
        match &self.bias {
            Some(b)
                if [x, &self.weight, b, residual]
                    .iter()
                    .all(|t| cpu::is_cpu_f32(t))
                    && !needs_grad(&[x, &self.weight, b, residual]) =>
            {
                if x.rank() == 2 {
                    return cpu::linear_residual(x, &self.weight, b, residual);
                }
                let (out, k) = self.weight.dims2()?;
                let rows = x.elem_count() / k.max(1);
                let y = cpu::linear_residual(
                    &x.reshape((rows, k))?,
                    &self.weight,
                    b,
                    &residual.reshape((rows, out))?,
                )?;
                y.reshape(residual.shape())
            }
            _ => residual + self.forward(x)?,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let on_blas = cpu::is_cpu_f32(x)
            && cpu::is_cpu_f32(&self.weight)
            && self.bias.as_ref().is_none_or(cpu::is_cpu_f32);
        if !on_blas {
            #[cfg(feature = "cuda")]
            if let Some(b) = self.gpu_bias(x) {
                return clipcid_kernels::cuda::bias_add(&self.product(x)?, b);
            }
            return candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x);
        }
        // Rows go in as they are: a reshape is an autograd node whose backward pass copies
        // the gradient, so one is made only for inputs of another rank.
        if x.rank() == 2 {
            return self.forward_rows(x);
        }
        let (out, k) = self.weight.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let y = self.forward_rows(&x.reshape((rows, k))?)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        y.reshape(dims)
    }
}

fn linear(p: &Params, prefix: &str) -> Result<Linear> {
    Ok(Linear {
        weight: get(p, &format!("{prefix}.weight"))?,
        bias: p.get(&format!("{prefix}.bias")).cloned(),
    })
}

/// Multi-head self-attention with separate q/k/v projections (HF layout).
#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    /// The q, k and v projections as one `[3W, W]` weight and `[3W]` bias, made once for a
    /// frozen f32 CPU model or a frozen GPU model, the ones that read it (a trainable one
    /// concatenates its variables in each forward pass, so that gradients reach them). It
    /// holds a copy of the q/k/v weights, a quarter of a tower's, where concatenating them for
    /// each batch would copy as much (85 MB for ViT-B/32's image tower in f32) per batch.
    fused_qkv: Option<(Tensor, Tensor)>,
}

impl SelfAttention {
    fn new(q: Linear, k: Linear, v: Linear, out: Linear, heads: usize) -> Result<Self> {
        let mut attn = Self {
            q,
            k,
            v,
            out,
            heads,
            fused_qkv: None,
        };
        let frozen = |on: fn(&Tensor) -> bool| {
            [&attn.q, &attn.k, &attn.v].iter().all(|l| {
                std::iter::once(&l.weight)
                    .chain(&l.bias)
                    .all(|t| !t.is_variable() && on(t))
            })
        };
        if frozen(cpu::is_cpu_f32) || frozen(|t| t.device().is_cuda()) {
            attn.fused_qkv = attn.concat_qkv()?;
        }
        Ok(attn)
    }

    /// The q, k and v weights and biases concatenated (differentiable), when all three have
    /// a bias.
    fn concat_qkv(&self) -> Result<Option<(Tensor, Tensor)>> {
        let (Some(bq), Some(bk), Some(bv)) = (&self.q.bias, &self.k.bias, &self.v.bias) else {
            return Ok(None);
        };
        let w = Tensor::cat(&[&self.q.weight, &self.k.weight, &self.v.weight], 0)?;
        Ok(Some((w, Tensor::cat(&[bq, bk, bv], 0)?)))
    }

    /// The fused q/k/v weight and bias (the layer must have all three biases).
    fn qkv(&self) -> Result<(Tensor, Tensor)> {
        if let Some(f) = &self.fused_qkv {
            return Ok(f.clone());
        }
        self.concat_qkv()?
            .ok_or_else(|| candle_core::Error::Msg("q/k/v projections without a bias".into()))
    }

    /// Primitive-op attention (any device and dtype); `mask` is added to the scores.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, w) = x.dims3()?;
        let hd = w / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            let y = y.reshape((b, t, self.heads, hd))?;
            #[cfg(feature = "cuda")]
            if clipcid_kernels::gpu_kernels_take(&[&y]) {
                return clipcid_kernels::cuda::swap_middle_dims(&y);
            }
            y.transpose(1, 2)?.contiguous()
        };
        let q = split((self.q.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut att = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = softmax_last_dim(&att)?;
        let y = att.matmul(&v)?;
        #[cfg(feature = "cuda")]
        if clipcid_kernels::gpu_kernels_take(&[&y]) {
            let y = clipcid_kernels::cuda::swap_middle_dims(&y)?.reshape((b, t, w))?;
            return self.out.forward(&y);
        }
        let y = y.transpose(1, 2)?.reshape((b, t, w))?;
        self.out.forward(&y)
    }
}

/// One pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    /// The block on `x` `[B, T, W]` from candle's primitive ops (any device and dtype); with
    /// [`Queries::First`] only position 0 goes on past attention, giving `[B, W]`.
    fn forward(&self, x: &Tensor, causal: bool, queries: Queries) -> Result<Tensor> {
        let mask = match causal {
            true => Some(causal_mask(x.dim(1)?, x.dtype(), x.device())?),
            false => None,
        };
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask.as_ref())?)?;
        let x = match queries {
            Queries::All => x,
            Queries::First => x.i((.., 0, ..))?,
        };
        let h = self.mlp_hidden(&x)?;
        x + self.fc2.forward(&h)?
    }

    /// The MLP's hidden activations for `x`: `act(fc1(ln2(x)))`, on a GPU the bias and
    /// QuickGELU in one kernel.
    fn mlp_hidden(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln2.forward(x)?;
        match self.act {
            Activation::QuickGelu => self.fc1.forward_quick_gelu(&h),
            Activation::Gelu => self.fc1.forward(&h)?.gelu_erf(),
        }
    }

    /// Every tensor of the block.
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        let norms = [&self.ln1, &self.ln2]
            .into_iter()
            .flat_map(|n| [&n.weight, &n.bias]);
        let a = &self.attn;
        let linears = [&a.q, &a.k, &a.v, &a.out, &self.fc1, &self.fc2]
            .into_iter()
            .flat_map(|l| std::iter::once(&l.weight).chain(&l.bias));
        norms.chain(linears)
    }

    /// Whether [`EncoderLayer::forward_rows`] applies: f32 CPU tensors, and a bias on every
    /// product (CLIP's layers all have one).
    fn fusable(&self) -> bool {
        let a = &self.attn;
        let biased = [&a.q, &a.k, &a.v, &a.out, &self.fc1, &self.fc2]
            .iter()
            .all(|l| l.bias.is_some());
        biased && self.tensors().all(cpu::is_cpu_f32)
    }

    /// Whether a gradient flows through the block: its input or one of its tensors tracks one.
    fn trains(&self, x: &Tensor) -> bool {
        needs_grad(&[x]) || self.tensors().any(Tensor::track_op)
    }

    /// The block as one autograd node (`cpu::transformer_block`) on rows `x`, its tensors
    /// packed into one vector.
    fn as_one_node<'b>(&'b self, x: &Tensor, attention: cpu::AttentionSpec) -> Result<Tensor> {
        let pair = |l: &'b Linear| -> Result<(&'b Tensor, &'b Tensor)> {
            match &l.bias {
                Some(b) => Ok((&l.weight, b)),
                None => candle_core::bail!("a block product without a bias"),
            }
        };
        let a = &self.attn;
        let params = cpu::pack_block_params(&cpu::BlockParams {
            ln1: (&self.ln1.weight, &self.ln1.bias),
            q: pair(&a.q)?,
            k: pair(&a.k)?,
            v: pair(&a.v)?,
            out: pair(&a.out)?,
            ln2: (&self.ln2.weight, &self.ln2.bias),
            fc1: pair(&self.fc1)?,
            fc2: pair(&self.fc2)?,
        })?;
        let spec = cpu::BlockSpec {
            attention,
            activation: match self.act {
                Activation::QuickGelu => cpu::Activation::QuickGelu,
                Activation::Gelu => cpu::Activation::Gelu,
            },
            eps: self.ln1.eps as f32,
        };
        cpu::transformer_block(x, &params, spec)
    }

    /// The block through the fused f32 CPU kernels, on rows `[B * T, W]` (`T` = `positions`):
    /// one q/k/v product, attention as one op and, when no gradient is needed, the activation
    /// in place and the residual additions inside the products. Gives `[B * T, W]`, or
    /// `[B, W]` with [`Queries::First`].
    fn forward_rows(
        &self,
        x: &Tensor,
        positions: usize,
        causal: bool,
        queries: Queries,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if !cpu::is_cpu_f32(x) {
            return self.forward_rows_gpu(x, positions, causal, queries);
        }
        let train = self.trains(x);
        let spec = cpu::AttentionSpec {
            positions,
            heads: self.attn.heads,
            causal,
            queries,
        };
        if train {
            // The whole block as one autograd node (see `cpu::transformer_block`).
            return self.as_one_node(x, spec);
        }
        let (w_qkv, b_qkv) = self.attn.qkv()?;
        let qkv = cpu::linear(&self.ln1.forward(x)?, &w_qkv, &b_qkv)?;
        let a = cpu::attention(&qkv, spec)?;
        let x = self
            .attn
            .out
            .forward_residual(&a, &query_rows(x, positions, queries)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        match self.act {
            Activation::QuickGelu => cpu::quick_gelu_in_place(&h)?,
            Activation::Gelu => cpu::gelu_in_place(&h)?,
        }
        self.fc2.forward_residual(&h, &x)
    }
}

#[cfg(feature = "cuda")]
impl EncoderLayer {
    /// Whether [`EncoderLayer::forward_rows_gpu`] takes `x` `[B, T, W]`: clipcid's CUDA
    /// kernels take it (a GPU, f32, bf16 or f16), q, k and v have biases (CLIP's all do) and a
    /// head's `T` rows fit the attention kernels' shared memory.
    fn gpu_fusable(&self, x: &Tensor) -> bool {
        let a = &self.attn;
        let Ok((_, t, w)) = x.dims3() else {
            return false;
        };
        let biased = [&a.q, &a.k, &a.v].iter().all(|l| l.bias.is_some());
        biased
            && a.heads > 0
            && w % a.heads == 0
            && clipcid_kernels::gpu_kernels_take(&[x])
            && clipcid_kernels::cuda::attention_fits(x.device(), t, w / a.heads)
    }

    /// The block on a GPU, on rows `[B * T, W]` (`T` = `positions`): one q/k/v product and
    /// attention as one op (`cpu::attention`'s CUDA kernels, with their own backward pass),
    /// where candle's ops took three products, a scaling, three head splits, two batched
    /// products, a mask, a softmax and a merge, each an autograd node with a materialised
    /// gradient, and `[B, H, T, T]` scores in memory. Gives `[B * T, W]`, or `[B, W]` with
    /// [`Queries::First`].
    fn forward_rows_gpu(
        &self,
        x: &Tensor,
        positions: usize,
        causal: bool,
        queries: Queries,
    ) -> Result<Tensor> {
        let a = &self.attn;
        let spec = cpu::AttentionSpec {
            positions,
            heads: a.heads,
            causal,
            queries,
        };
        let biased = [&a.out, &self.fc1, &self.fc2]
            .iter()
            .all(|l| l.bias.is_some());
        if clipcid_kernels::cuda::block_node()
            && biased
            && self.act == Activation::QuickGelu
            && self.trains(x)
        {
            // One autograd node for the block (`cuda::set_block_node`).
            return self.as_one_node(x, spec);
        }
        let (w_qkv, b_qkv) = a.qkv()?;
        let qkv = Linear {
            weight: w_qkv,
            bias: Some(b_qkv),
        }
        .forward(&self.ln1.forward(x)?)?;
        let attended = cpu::attention(&qkv, spec)?;
        let x = a
            .out
            .forward_residual(&attended, &query_rows(x, positions, queries)?)?;
        self.fc2.forward_residual(&self.mlp_hidden(&x)?, &x)
    }
}

/// The rows of `x` `[B * T, W]` (`T` = `positions`) that go on past attention: all of them,
/// or with [`Queries::First`] each batch item's position 0, `[B, W]`.
fn query_rows(x: &Tensor, positions: usize, queries: Queries) -> Result<Tensor> {
    match queries {
        Queries::All => Ok(x.clone()),
        Queries::First => x
            .reshape((x.dim(0)? / positions, positions, x.dim(1)?))?
            .i((.., 0, ..)),
    }
}

/// Additive causal mask `[T, T]`: 0 on and below the diagonal, minus infinity above.
fn causal_mask(t: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

/// A stack of [`EncoderLayer`]s under `{prefix}.encoder.layers.N`.
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub(crate) fn load(
        p: &Params,
        prefix: &str,
        num_layers: usize,
        heads: usize,
        act: Activation,
        eps: f64,
    ) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|i| {
                let l = format!("{prefix}.encoder.layers.{i}");
                let a = format!("{l}.self_attn");
                Ok(EncoderLayer {
                    ln1: LayerNorm::load(p, &format!("{l}.layer_norm1"), eps)?,
                    attn: SelfAttention::new(
                        linear(p, &format!("{a}.q_proj"))?,
                        linear(p, &format!("{a}.k_proj"))?,
                        linear(p, &format!("{a}.v_proj"))?,
                        linear(p, &format!("{a}.out_proj"))?,
                        heads,
                    )?,
                    ln2: LayerNorm::load(p, &format!("{l}.layer_norm2"), eps)?,
                    fc1: linear(p, &format!("{l}.mlp.fc1"))?,
                    fc2: linear(p, &format!("{l}.mlp.fc2"))?,
                    act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Whether every layer runs on rows through fused kernels for `x` `[B, T, W]`: the f32 CPU
    /// kernels, or (in a `cuda` build) clipcid's CUDA kernels.
    fn fusable(&self, x: &Tensor) -> bool {
        if cpu::is_cpu_f32(x) {
            return self.layers.iter().all(EncoderLayer::fusable);
        }
        #[cfg(feature = "cuda")]
        if self.layers.iter().all(|l| l.gpu_fusable(x)) {
            return true;
        }
        false
    }

    /// Every position of `x` `[B, T, W]` through every layer (position `i` seeing only
    /// positions `<= i` when `causal`).
    pub(crate) fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, t, w) = x.dims3()?;
        let mut x = x.clone();
        if self.fusable(&x) {
            // One reshape to rows and one back, not one pair per product.
            x = x.reshape((b * t, w))?;
            for layer in &self.layers {
                x = layer.forward_rows(&x, t, causal, Queries::All)?;
            }
            return x.reshape((b, t, w));
        }
        for layer in &self.layers {
            x = layer.forward(&x, causal, Queries::All)?;
        }
        Ok(x)
    }

    /// Position 0 of the last layer's output, `[B, W]`: what a tower that pools its class
    /// token reads. The last layer computes its queries, attention output and MLP for that
    /// position alone (keys and values still cover every position), which gives the same
    /// result as [`Encoder::forward`] and then taking position 0, with a sixth of a small
    /// tower's work left out.
    pub(crate) fn forward_first(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, w) = x.dims3()?;
        let Some((last, rest)) = self.layers.split_last() else {
            return x.i((.., 0, ..));
        };
        let mut x = x.clone();
        if self.fusable(&x) {
            x = x.reshape((b * t, w))?;
            for layer in rest {
                x = layer.forward_rows(&x, t, false, Queries::All)?;
            }
            return last.forward_rows(&x, t, false, Queries::First);
        }
        for layer in rest {
            x = layer.forward(&x, false, Queries::All)?;
        }
        last.forward(&x, false, Queries::First)
    }
}

/// Loads a bias-free linear layer (the projections into the joint embedding space).
pub(crate) fn linear_no_bias(p: &Params, name: &str) -> Result<Linear> {
    Ok(Linear {
        weight: get(p, name)?,
        bias: None,
    })
}
