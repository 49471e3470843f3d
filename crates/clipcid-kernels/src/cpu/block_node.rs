//! A pre-norm transformer block as one autograd node built from tensor ops, for any device
//! and dtype the ops take (on a GPU: clipcid's CUDA kernels and cuBLAS products).
//!
//! candle's backward pass starts every node's input gradient as `zeros_like` and adds the
//! first gradient into it: for a block built from separate ops that is about twenty
//! activation-sized fills and additions per step (0.16 ms for one q/k/v-sized activation of
//! the student's text tower on an H200). Here the forward pass runs the block's ops on
//! detached tensors, keeping the activations its backward pass needs, and one node carries the
//! result into the graph; its backward pass is written out by hand (the products' transposes,
//! layer norm's and QuickGELU's gradient kernels, attention's backward pass, column sums for
//! the biases) and gives the input's gradient and the packed parameters' in one go, as the
//! CPU block op ([`super::transformer_block`] on f32 CPU tensors) does on slices.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::activation::activation_backward;
use super::block::Packing;
use super::norm::layer_norm_backward;
use super::{attention, attention_backward, layer_norm, Activation, BlockSpec, Queries};
use crate::node::PrecomputedOutput;

const OP: &str = "clipcid-transformer-block";

/// The block's tensors, as views of the packed parameters.
struct Weights {
    ln1: (Tensor, Tensor),
    qkv: (Tensor, Tensor),
    out: (Tensor, Tensor),
    ln2: (Tensor, Tensor),
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
}

impl Weights {
    /// Views of `p` (detached) laid out as [`Packing`] says.
    fn new(p: &Tensor, l: &Packing) -> Result<Self> {
        let (w, m) = (l.w, l.m);
        let vector = |at: usize, n: usize| p.narrow(0, at, n);
        // A product's weight `[out, in]` at `at`, its bias after it.
        let product = |at: usize, out: usize, inp: usize| -> Result<(Tensor, Tensor)> {
            Ok((
                vector(at, out * inp)?.reshape((out, inp))?,
                vector(at + out * inp, out)?,
            ))
        };
        Ok(Self {
            ln1: (vector(l.ln1, w)?, vector(l.ln1 + w, w)?),
            qkv: product(l.w_qkv, 3 * w, w)?,
            out: product(l.w_out, w, w)?,
            ln2: (vector(l.ln2, w)?, vector(l.ln2 + w, w)?),
            fc1: product(l.w_fc1, m, w)?,
            fc2: product(l.w_fc2, w, m)?,
        })
    }
}

/// `x w^T + b` (plus `residual`): on a GPU the bias kernels, elsewhere candle's broadcast add.
fn affine(x: &Tensor, (w, b): &(Tensor, Tensor), residual: Option<&Tensor>) -> Result<Tensor> {
    let xw = x.matmul(&w.t()?)?;
    #[cfg(feature = "cuda")]
    if crate::gpu_kernels_take(&[&xw, b]) {
        return match residual {
            Some(r) => crate::cuda::bias_residual_add(&xw, b, r),
            None => crate::cuda::bias_add(&xw, b),
        };
    }
    let y = xw.broadcast_add(b)?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// A bias's gradient: the output gradient's column sums.
fn column_sum(g: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::gpu_kernels_take(&[g]) {
        return crate::cuda::column_sum(g);
    }
    g.sum(0)
}

/// The MLP's activation of `pre + b` (`pre` the product before its bias).
fn activate(act: Activation, pre: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::gpu_kernels_take(&[pre, b]) && act == Activation::QuickGelu {
        return crate::cuda::bias_quick_gelu(pre, b);
    }
    let u = pre.broadcast_add(b)?;
    match act {
        Activation::Gelu => super::gelu(&u),
        Activation::QuickGelu => super::quick_gelu(&u),
    }
}

/// [`activate`]'s gradient with respect to `pre` (and so to the bias), from `grad`.
fn activate_backward(act: Activation, pre: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::gpu_kernels_take(&[pre, b, grad]) && act == Activation::QuickGelu {
        return crate::cuda::bias_quick_gelu_backward(pre, b, grad);
    }
    activation_backward(act, &pre.broadcast_add(b)?, grad)
}

/// The rows of `x` `[B * T, W]` that carry on past attention.
fn residual_rows(x: &Tensor, spec: &BlockSpec) -> Result<Tensor> {
    let t = spec.attention.positions;
    match spec.attention.queries {
        Queries::All => Ok(x.clone()),
        Queries::First => {
            let (rows, w) = x.dims2()?;
            x.reshape((rows / t, t, w))?
                .narrow(1, 0, 1)?
                .reshape((rows / t, w))
        }
    }
}

/// The activations the backward pass reads (detached).
#[derive(Clone)]
struct Saved {
    /// The block's input `[R, W]`.
    x: Tensor,
    /// Layer norm 1's output `[R, W]`.
    h1: Tensor,
    /// q, k and v `[R, 3W]`.
    qkv: Tensor,
    /// The attention output `[Rq, W]`.
    a: Tensor,
    /// The residual stream after attention `[Rq, W]`.
    x1: Tensor,
    /// Layer norm 2's output `[Rq, W]`.
    h2: Tensor,
    /// The MLP's first product before its bias `[Rq, M]`.
    pre: Tensor,
    /// The MLP's activation `[Rq, M]`.
    act: Tensor,
}

/// One pre-norm transformer block, the same as [`super::transformer_block`], built from
/// tensor ops on any device and dtype they take (f32, bf16 or f16 on a GPU in a `cuda` build,
/// where the MLP's activation must be QuickGELU; f32 on the CPU), as one autograd node with a
/// hand-written backward pass. [`super::transformer_block`] takes this path for tensors that
/// are not f32 on the CPU.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{DType, Device, Tensor, Var};
/// use clipcid_kernels::cpu::{self, Activation, AttentionSpec, BlockParams, BlockSpec, Queries};
///
/// let (w, m, dev) = (8, 32, &Device::Cpu);
/// let t = |shape: &[usize]| Tensor::randn(0f32, 0.2, shape, dev);
/// let (ones, zeros) = (Tensor::ones(w, DType::F32, dev)?, Tensor::zeros(w, DType::F32, dev)?);
/// let (wq, wk, wv, wo) = (t(&[w, w])?, t(&[w, w])?, t(&[w, w])?, t(&[w, w])?);
/// let (w1, b1, w2) = (t(&[m, w])?, t(&[m])?, t(&[w, m])?);
/// let params = cpu::pack_block_params(&BlockParams {
///     ln1: (&ones, &zeros), q: (&wq, &zeros), k: (&wk, &zeros), v: (&wv, &zeros),
///     out: (&wo, &zeros), ln2: (&ones, &zeros), fc1: (&w1, &b1), fc2: (&w2, &zeros),
/// })?;
/// let spec = BlockSpec {
///     attention: AttentionSpec { positions: 5, heads: 2, causal: true, queries: Queries::All },
///     activation: Activation::QuickGelu,
///     eps: 1e-5,
/// };
/// let x = Var::from_tensor(&t(&[3 * 5, w])?)?;
/// // The same values and input gradient as the CPU block op.
/// let y = cpu::transformer_block_by_ops(x.as_tensor(), &params, spec)?;
/// let y_op = cpu::transformer_block(x.as_tensor(), &params, spec)?;
/// assert!(clipcid_kernels::max_abs_diff(&y, &y_op)? < 1e-5);
/// let dx = y.sum_all()?.backward()?.remove(x.as_tensor()).expect("x has a gradient");
/// let dx_op = y_op.sum_all()?.backward()?.remove(x.as_tensor()).expect("x has a gradient");
/// assert!(clipcid_kernels::max_abs_diff(&dx, &dx_op)? < 1e-4);
/// # Ok(()) }
/// ```
pub fn transformer_block_by_ops(x: &Tensor, params: &Tensor, spec: BlockSpec) -> Result<Tensor> {
    let (x, params) = (x.contiguous()?, params.contiguous()?);
    if x.dtype() != params.dtype() || x.device().location() != params.device().location() {
        bail!(
            "{OP}: input ({:?} on {:?}) and parameters ({:?} on {:?}) differ",
            x.dtype(),
            x.device().location(),
            params.dtype(),
            params.device().location()
        );
    }
    if !x.device().is_cpu() && spec.activation != Activation::QuickGelu {
        bail!("{OP}: off the CPU the block's activation must be QuickGELU");
    }
    let l = Packing::new(&spec, x.layout(), params.elem_count(), OP)?;
    let p = Weights::new(&params.detach(), &l)?;
    let xd = x.detach();
    let h1 = layer_norm(&xd, &p.ln1.0, &p.ln1.1, spec.eps)?;
    let qkv = affine(&h1, &p.qkv, None)?;
    let a = attention(&qkv, spec.attention)?;
    let x1 = affine(&a, &p.out, Some(&residual_rows(&xd, &spec)?))?;
    let h2 = layer_norm(&x1, &p.ln2.0, &p.ln2.1, spec.eps)?;
    let pre = h2.matmul(&p.fc1.0.t()?)?;
    let act = activate(spec.activation, &pre, &p.fc1.1)?;
    let y = affine(&act, &p.fc2, Some(&x1))?;
    let node = BlockNode {
        spec,
        packing: l,
        out: PrecomputedOutput::new(y)?,
        saved: Arc::new(Saved {
            x: xd,
            h1,
            qkv,
            a,
            x1,
            h2,
            pre,
            act,
        }),
    };
    x.apply_op2(&params, node)
}

/// The node: its forward pass hands on the output computed above, its backward pass is
/// [`BlockNode::backward`].
struct BlockNode {
    spec: BlockSpec,
    packing: Packing,
    /// The output, taken by the forward pass.
    out: PrecomputedOutput,
    saved: Arc<Saved>,
}

impl BlockNode {
    /// The gradients of the input and of the packed parameters from the output's `gy`.
    fn backward(&self, params: &Tensor, gy: &Tensor) -> Result<(Tensor, Tensor)> {
        let (s, spec, l) = (&self.saved, &self.spec, &self.packing);
        let p = Weights::new(&params.detach(), l)?;
        let gy = gy.contiguous()?;
        // MLP: y = x1 + act(h2 w1^T + b1) w2^T + b2.
        let d_w2 = gy.t()?.matmul(&s.act)?;
        let d_b2 = column_sum(&gy)?;
        let d_act = gy.matmul(&p.fc2.0)?;
        let d_pre = activate_backward(spec.activation, &s.pre, &p.fc1.1, &d_act)?;
        let d_w1 = d_pre.t()?.matmul(&s.h2)?;
        let d_b1 = column_sum(&d_pre)?;
        let d_h2 = d_pre.matmul(&p.fc1.0)?;
        let (d_x1_ln, d_ln2_w, d_ln2_b) = layer_norm_backward(&s.x1, &p.ln2.0, &d_h2, spec.eps)?;
        let d_x1 = (&gy + d_x1_ln)?;
        // Attention: x1 = xq + attention(ln1(x) wqkv^T + bqkv) wo^T + bo.
        let d_wo = d_x1.t()?.matmul(&s.a)?;
        let d_bo = column_sum(&d_x1)?;
        let d_a = d_x1.matmul(&p.out.0)?;
        let d_qkv = attention_backward(&s.qkv, &d_a, spec.attention)?;
        let d_wqkv = d_qkv.t()?.matmul(&s.h1)?;
        let d_bqkv = column_sum(&d_qkv)?;
        let d_h1 = d_qkv.matmul(&p.qkv.0)?;
        let (d_x_ln, d_ln1_w, d_ln1_b) = layer_norm_backward(&s.x, &p.ln1.0, &d_h1, spec.eps)?;
        // The residual path: every row, or position 0 of each sequence.
        let dx = match spec.attention.queries {
            Queries::All => (d_x_ln + d_x1)?,
            Queries::First => {
                let (t, w) = (spec.attention.positions, l.w);
                let d3 = d_x_ln.reshape((l.rows / t, t, w))?;
                let first = (d3.narrow(1, 0, 1)? + d_x1.unsqueeze(1)?)?;
                let d3 = if t > 1 {
                    Tensor::cat(&[first, d3.narrow(1, 1, t - 1)?], 1)?
                } else {
                    first
                };
                d3.reshape((l.rows, w))?
            }
        };
        // In the order `pack_block_params` packs the tensors.
        let parts = [
            d_ln1_w, d_ln1_b, d_wqkv, d_bqkv, d_wo, d_bo, d_ln2_w, d_ln2_b, d_w1, d_b1, d_w2, d_b2,
        ];
        let flat = parts
            .iter()
            .map(|t| t.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        let dp = Tensor::cat(&flat, 0)?;
        if dp.elem_count() != params.elem_count() {
            bail!(
                "{OP}: {} parameter gradients for {} parameters",
                dp.elem_count(),
                params.elem_count()
            );
        }
        Ok((dx, dp))
    }
}

impl CustomOp2 for BlockNode {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.take_cpu(OP)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.take_cuda(OP)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.backward(params, grad)?;
        Ok((Some(dx), Some(dp)))
    }
}
