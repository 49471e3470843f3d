//! Transformer building blocks shared by both towers.
//!
//! Every block is built from tensors looked up by their Hugging Face name in a map of named
//! tensors, so the same code serves a frozen teacher loaded from disk and a trainable student
//! whose tensors are `candle_nn::Var`s. Layer norm and softmax use candle's fused kernels when no
//! gradient is needed (they have no backward pass). When one is, f32 CPU tensors go through
//! the fused kernels with hand-written backward passes of `clipcid_kernels::cpu`, and other
//! devices and dtypes through differentiable primitive ops.

use std::collections::HashMap;

use candle_core::{DType, Module, Result, Tensor, D};

use crate::config::Activation;
use clipcid_kernels::cpu;

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
        if cpu::is_cpu_f32(x) {
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
        if !needs_grad(&[x, &self.weight, &self.bias]) {
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            );
        }
        if [x, &self.weight, &self.bias]
            .iter()
            .all(|t| cpu::is_cpu_f32(t))
        {
            return cpu::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
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

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let on_blas = cpu::is_cpu_f32(x)
            && cpu::is_cpu_f32(&self.weight)
            && self.bias.as_ref().is_none_or(cpu::is_cpu_f32);
        if !on_blas {
            return candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x);
        }
        let (out, k) = self.weight.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let x2 = x.contiguous()?.reshape((rows, k))?;
        let y = match &self.bias {
            Some(b) => cpu::linear(&x2, &self.weight, b)?,
            None => cpu::matmul(&x2, &self.weight.t()?)?,
        };
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
}

impl SelfAttention {
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, w) = x.dims3()?;
        let hd = w / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut att = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, w))?;
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
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = match self.act {
            Activation::QuickGelu => quick_gelu(&h)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }
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
                Ok(EncoderLayer {
                    ln1: LayerNorm::load(p, &format!("{l}.layer_norm1"), eps)?,
                    attn: SelfAttention {
                        q: linear(p, &format!("{l}.self_attn.q_proj"))?,
                        k: linear(p, &format!("{l}.self_attn.k_proj"))?,
                        v: linear(p, &format!("{l}.self_attn.v_proj"))?,
                        out: linear(p, &format!("{l}.self_attn.out_proj"))?,
                        heads,
                    },
                    ln2: LayerNorm::load(p, &format!("{l}.layer_norm2"), eps)?,
                    fc1: linear(p, &format!("{l}.mlp.fc1"))?,
                    fc2: linear(p, &format!("{l}.mlp.fc2"))?,
                    act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }
}

/// Loads a bias-free linear layer (the projections into the joint embedding space).
pub(crate) fn linear_no_bias(p: &Params, name: &str) -> Result<Linear> {
    Ok(Linear {
        weight: get(p, name)?,
        bias: None,
    })
}
