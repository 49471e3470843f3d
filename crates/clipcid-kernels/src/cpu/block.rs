//! A whole pre-norm transformer block as one op with its own backward pass, for training on
//! the CPU.
//!
//! Built from the separate fused ops, a block is a dozen nodes of candle's autograd, and
//! candle's backward pass accumulates every node's gradient by allocating a zero tensor and
//! adding into it. For a block of width `W` on `R` rows that is 19 `[R, W]`-sized zero fills
//! (serial, on the calling thread) and additions per step, on top of the products: 10-15% of
//! a student training step, with the pool's other thread spinning through the serial part.
//! Here the block is one node: the forward pass keeps the activations its backward pass
//! needs (the layer-norm outputs, q/k/v, the attention output, the MLP's input, pre-activation
//! and activation) inside the op, and the backward pass computes the input's gradient and
//! every parameter's in one go on those buffers, with the same kernels as the separate ops
//! (BLAS products on candle's pool, the attention kernel, the layer-norm and activation
//! passes). The parameters come in packed into one vector ([`pack_block_params`]), so the
//! op has two inputs; packing copies the block's weights once per step, far less than the
//! activation-sized work it saves (a seventh as much for the student at batch 32).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use ndarray::{ArrayView2, ArrayViewMut2};

use super::attention::{attention_grad_rows, attention_rows};
use super::norm::{layer_norm_grad_rows, layer_norm_rows};
use super::{f32_slice, linear_rows, Activation, AttentionSpec, Queries, ELEMENTS_PER_TASK};
use crate::{blas, pool};

/// What a [`transformer_block`] computes besides its inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSpec {
    /// The attention's positions per sequence, heads, mask and queries.
    pub attention: AttentionSpec,
    /// The MLP's activation.
    pub activation: Activation,
    /// Both layer norms' epsilon.
    pub eps: f32,
}

/// A block's tensors, in the order [`pack_block_params`] packs them: layer norm 1's scale and
/// shift; the q, k and v weights `[W, W]` and biases `[W]`; the attention output's weight and
/// bias; layer norm 2's scale and shift; the MLP's first weight `[M, W]` and bias `[M]`; its
/// second weight `[W, M]` and bias `[W]`.
#[derive(Debug, Clone, Copy)]
pub struct BlockParams<'a> {
    /// Layer norm 1 (before attention): scale and shift `[W]`.
    pub ln1: (&'a Tensor, &'a Tensor),
    /// Query projection: weight `[W, W]`, bias `[W]`.
    pub q: (&'a Tensor, &'a Tensor),
    /// Key projection.
    pub k: (&'a Tensor, &'a Tensor),
    /// Value projection.
    pub v: (&'a Tensor, &'a Tensor),
    /// Attention output projection.
    pub out: (&'a Tensor, &'a Tensor),
    /// Layer norm 2 (before the MLP).
    pub ln2: (&'a Tensor, &'a Tensor),
    /// MLP expansion: weight `[M, W]`, bias `[M]`.
    pub fc1: (&'a Tensor, &'a Tensor),
    /// MLP projection back: weight `[W, M]`, bias `[W]`.
    pub fc2: (&'a Tensor, &'a Tensor),
}

/// The block's tensors flattened and concatenated into one vector (differentiable: the
/// gradient of the vector flows back to each tensor).
pub fn pack_block_params(p: &BlockParams) -> Result<Tensor> {
    let (q, k, v) = (p.q, p.k, p.v);
    let order = [
        p.ln1.0, p.ln1.1, q.0, k.0, v.0, q.1, k.1, v.1, p.out.0, p.out.1, p.ln2.0, p.ln2.1,
        p.fc1.0, p.fc1.1, p.fc2.0, p.fc2.1,
    ];
    let flat = order
        .iter()
        .map(|t| t.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// One pre-norm transformer block on rows `x` `[B * T, W]`, differentiable in `x` and in the
/// packed parameters ([`pack_block_params`]), as one autograd node (f32 on the CPU: kernels on
/// slices; elsewhere, a GPU's f32, bf16 or f16:
/// [`transformer_block_by_ops`](super::transformer_block_by_ops)):
/// `x1 = x + out(attention(qkv(ln1(x))))`, then `y = x1 + fc2(act(fc1(ln2(x1))))`, as Hugging
/// Face's `CLIPEncoderLayer` and open_clip's `ResidualAttentionBlock` compute it. Gives
/// `[B * T, W]`, or `[B, W]` when the attention computes [`Queries::First`] (the residual
/// stream then carries position 0 alone past attention).
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use clipcid_kernels::cpu::{self, Activation, AttentionSpec, BlockParams, BlockSpec, Queries};
///
/// let (w, m, dev) = (8, 32, &Device::Cpu);
/// let t = |shape: &[usize]| Tensor::randn(0f32, 0.2, shape, dev);
/// let (ones, zeros) = (Tensor::ones(w, candle_core::DType::F32, dev)?, Tensor::zeros(w, candle_core::DType::F32, dev)?);
/// let (wq, wk, wv, wo) = (t(&[w, w])?, t(&[w, w])?, t(&[w, w])?, t(&[w, w])?);
/// let (w1, b1, w2) = (t(&[m, w])?, t(&[m])?, t(&[w, m])?);
/// let params = cpu::pack_block_params(&BlockParams {
///     ln1: (&ones, &zeros), q: (&wq, &zeros), k: (&wk, &zeros), v: (&wv, &zeros),
///     out: (&wo, &zeros), ln2: (&ones, &zeros), fc1: (&w1, &b1), fc2: (&w2, &zeros),
/// })?;
/// let spec = BlockSpec {
///     attention: AttentionSpec { positions: 5, heads: 2, causal: false, queries: Queries::All },
///     activation: Activation::Gelu,
///     eps: 1e-5,
/// };
/// let x = t(&[3 * 5, w])?;
/// let y = cpu::transformer_block(&x, &params, spec)?;
/// assert_eq!(y.dims(), [15, 8]);
/// # Ok(()) }
/// ```
pub fn transformer_block(x: &Tensor, params: &Tensor, spec: BlockSpec) -> Result<Tensor> {
    if !(super::is_cpu_f32(x) && super::is_cpu_f32(params)) {
        return super::transformer_block_by_ops(x, params, spec);
    }
    let op = BlockOp {
        spec,
        saved: Arc::new(Mutex::new(None)),
    };
    x.contiguous()?.apply_op2(&params.contiguous()?, op)
}

/// The block's sizes, and where its tensors start in the packed parameters, for width `w`
/// and MLP width `m` (each product's bias follows its weight, a layer norm's shift its
/// scale).
#[derive(Debug, Clone, Copy)]
pub(super) struct Packing {
    pub(super) rows: usize,
    /// Rows after attention (`rows`, or the batch size for [`Queries::First`]).
    pub(super) rows_q: usize,
    pub(super) w: usize,
    pub(super) m: usize,
    pub(super) ln1: usize,
    pub(super) w_qkv: usize,
    pub(super) w_out: usize,
    pub(super) ln2: usize,
    pub(super) w_fc1: usize,
    pub(super) w_fc2: usize,
}

impl Packing {
    pub(super) fn new(spec: &BlockSpec, x: &Layout, params: usize, op: &str) -> Result<Self> {
        let &[rows, w] = x.dims() else {
            bail!(
                "{op}: expected rows [batch x positions, width], got shape {:?}",
                x.dims()
            )
        };
        let t = spec.attention.positions;
        if w == 0 || t == 0 || rows % t != 0 {
            bail!("{op}: {rows} rows of width {w} are not sequences of {t} positions");
        }
        // params = 4w^2 + 9w + m (2w + 1): the MLP width is what is left.
        let fixed = 4 * w * w + 9 * w;
        if params < fixed || !(params - fixed).is_multiple_of(2 * w + 1) {
            bail!("{op}: {params} packed parameters do not fit a block of width {w}");
        }
        let m = (params - fixed) / (2 * w + 1);
        let ln1 = 0;
        let w_qkv = ln1 + 2 * w;
        let w_out = w_qkv + 3 * w * w + 3 * w;
        let ln2 = w_out + w * w + w;
        let w_fc1 = ln2 + 2 * w;
        let w_fc2 = w_fc1 + m * w + m;
        let rows_q = match spec.attention.queries {
            Queries::All => rows,
            Queries::First => rows / t,
        };
        Ok(Self {
            rows,
            rows_q,
            w,
            m,
            ln1,
            w_qkv,
            w_out,
            ln2,
            w_fc1,
            w_fc2,
        })
    }

    /// Rows of `x` that carry on past attention: all, or position 0 of each sequence.
    fn residual_rows<'a>(&self, spec: &BlockSpec, x: &'a [f32]) -> Cow<'a, [f32]> {
        let (t, w) = (spec.attention.positions, self.w);
        match spec.attention.queries {
            Queries::All => Cow::Borrowed(x),
            Queries::First => x
                .chunks_exact(t * w)
                .flat_map(|s| &s[..w])
                .copied()
                .collect(),
        }
    }
}

/// The forward pass's activations that the backward pass reads.
struct Saved {
    /// Layer norm 1's output `[R, W]`.
    h1: Vec<f32>,
    /// q, k and v `[R, 3W]`.
    qkv: Vec<f32>,
    /// The attention output `[Rq, W]`.
    a: Vec<f32>,
    /// The residual stream after attention `[Rq, W]`.
    x1: Vec<f32>,
    /// Layer norm 2's output `[Rq, W]`.
    h2: Vec<f32>,
    /// The MLP's pre-activation `[Rq, M]`.
    u: Vec<f32>,
    /// The MLP's activation `[Rq, M]`.
    g: Vec<f32>,
}

fn view<'a>(data: &'a [f32], rows: usize, cols: usize, op: &str) -> Result<ArrayView2<'a, f32>> {
    ArrayView2::from_shape((rows, cols), data)
        .map_err(|e| candle_core::Error::Msg(format!("{op}: {e}")))
}

fn view_mut<'a>(
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    op: &str,
) -> Result<ArrayViewMut2<'a, f32>> {
    ArrayViewMut2::from_shape((rows, cols), data)
        .map_err(|e| candle_core::Error::Msg(format!("{op}: {e}")))
}

struct BlockOp {
    spec: BlockSpec,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl BlockOp {
    fn forward(&self, x: &[f32], p: &[f32], l: &Packing) -> Result<(Vec<f32>, Saved)> {
        let op = "clipcid-transformer-block";
        let (r, rq, w, m) = (l.rows, l.rows_q, l.w, l.m);
        let eps = self.spec.eps;
        let mut h1 = vec![0f32; r * w];
        layer_norm_rows(
            x,
            &p[l.ln1..l.ln1 + w],
            &p[l.ln1 + w..l.w_qkv],
            eps,
            &mut h1,
        );
        let qkv = product(p, l.w_qkv, (3 * w, w), &h1, None, op)?;
        let mut a = vec![0f32; rq * w];
        attention_rows(self.spec.attention, &qkv, r, &mut a)?;
        let residual = l.residual_rows(&self.spec, x);
        let x1 = product(p, l.w_out, (w, w), &a, Some(&residual), op)?;
        let mut h2 = vec![0f32; rq * w];
        layer_norm_rows(
            &x1,
            &p[l.ln2..l.ln2 + w],
            &p[l.ln2 + w..l.w_fc1],
            eps,
            &mut h2,
        );
        let u = product(p, l.w_fc1, (m, w), &h2, None, op)?;
        let mut g = vec![0f32; rq * m];
        self.spec.activation.forward(&u, &mut g);
        let y = product(p, l.w_fc2, (w, m), &g, Some(&x1), op)?;
        let saved = Saved {
            h1,
            qkv,
            a,
            x1,
            h2,
            u,
            g,
        };
        Ok((y, saved))
    }
}

/// `x w^T + b` (plus `residual`) for the packed weight `[out, in]` at `at`, whose bias follows
/// it, and rows `x` of width `in`.
fn product(
    p: &[f32],
    at: usize,
    (out, inp): (usize, usize),
    x: &[f32],
    residual: Option<&[f32]>,
    op: &str,
) -> Result<Vec<f32>> {
    let rows = x.len() / inp;
    let (w, b) = p[at..at + out * inp + out].split_at(out * inp);
    let mut y = vec![0f32; rows * out];
    let (x, w) = (view(x, rows, inp, op)?, view(w, out, inp, op)?);
    linear_rows(op, &x, &w, b, residual, &mut y)?;
    Ok(y)
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "clipcid-transformer-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, p) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let l = Packing::new(&self.spec, l1, p.len(), self.name())?;
        let (y, saved) = self.forward(x, p, &l)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(y), Shape::from((l.rows_q, l.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = BlockGrad {
            spec: self.spec,
            saved: self.saved.clone(),
        };
        // One pass gives both gradients, packed: dx (`[R * W]`), then the parameters'.
        let packed = x.apply_op3_no_bwd(params, &grad.contiguous()?, &op)?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dp = packed.narrow(0, n, params.elem_count())?;
        Ok((Some(dx), Some(dp)))
    }
}

/// [`BlockOp`]'s gradients from its inputs, the output gradient and the saved activations.
struct BlockGrad {
    spec: BlockSpec,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// Column sums of `g` `[rows, n]` into `out` `[n]`, as one product with a row of ones.
fn column_sums(g: &ArrayView2<f32>, out: &mut [f32], op: &str) -> Result<()> {
    let ones = vec![1f32; g.nrows()];
    let ones = view(&ones, 1, g.nrows(), op)?;
    blas::gemm(&ones, g, 0.0, &mut view_mut(out, 1, g.ncols(), op)?);
    Ok(())
}

impl CustomOp3 for BlockGrad {
    fn name(&self) -> &'static str {
        "clipcid-transformer-block-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let x = f32_slice(s1, l1, op)?;
        let p = f32_slice(s2, l2, op)?;
        let dy = f32_slice(s3, l3, op)?;
        let l = Packing::new(&self.spec, l1, p.len(), op)?;
        let (r, rq, w, m, t) = (l.rows, l.rows_q, l.w, l.m, self.spec.attention.positions);
        if dy.len() != rq * w {
            bail!(
                "{op}: gradient of {} values for an output of [{rq}, {w}]",
                dy.len()
            );
        }
        let guard = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = guard.as_ref() else {
            bail!("{op}: the forward pass's activations are missing")
        };
        let mut out = vec![0f32; r * w + p.len()];
        let (dx, dp) = out.split_at_mut(r * w);
        // Each product's backward pass writes its weight and bias gradients into their
        // places in `dp` (split off from the end) and returns its input's gradient.
        let (dp, dp_fc2) = dp.split_at_mut(l.w_fc2);
        let dg = product_backward(dy, &s.g, p, l.w_fc2, (w, m), dp_fc2, op)?;
        let mut du = vec![0f32; rq * m];
        self.spec.activation.backward(&s.u, &dg, &mut du);
        drop(dg);
        let (dp, dp_fc1) = dp.split_at_mut(l.w_fc1);
        let dh2 = product_backward(&du, &s.h2, p, l.w_fc1, (m, w), dp_fc1, op)?;
        drop(du);
        // Layer norm 2, plus the residual path: dx1 = dy + ln2'(dh2).
        let (dp, dp_ln2) = dp.split_at_mut(l.ln2);
        let mut dx1 = vec![0f32; rq * w];
        let ln2_w = &p[l.ln2..l.ln2 + w];
        layer_norm_grad_rows(&s.x1, ln2_w, &dh2, self.spec.eps, &mut dx1, dp_ln2);
        drop(dh2);
        add_into(&mut dx1, dy);
        let (dp, dp_out) = dp.split_at_mut(l.w_out);
        let da = product_backward(&dx1, &s.a, p, l.w_out, (w, w), dp_out, op)?;
        let mut dqkv = vec![0f32; r * 3 * w];
        attention_grad_rows(self.spec.attention, &s.qkv, r, &da, &mut dqkv)?;
        drop(da);
        let (dp_ln1, dp_qkv) = dp.split_at_mut(l.w_qkv);
        let dh1 = product_backward(&dqkv, &s.h1, p, l.w_qkv, (3 * w, w), dp_qkv, op)?;
        drop(dqkv);
        // Layer norm 1, plus the residual path from x1.
        layer_norm_grad_rows(x, &p[l.ln1..l.ln1 + w], &dh1, self.spec.eps, dx, dp_ln1);
        match self.spec.attention.queries {
            Queries::All => add_into(dx, &dx1),
            Queries::First => {
                for (seq, d1) in dx.chunks_exact_mut(t * w).zip(dx1.chunks_exact(w)) {
                    seq[..w].iter_mut().zip(d1).for_each(|(a, b)| *a += b);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(r * w + p.len())))
    }
}

/// The backward pass of [`product`] for the output gradient `g` (rows of width `out`):
/// `dw = g^T x` and `db = colsum(g)` into `dw_db` (`dw` then `db`, as packed), and
/// `dx = g w`, returned.
fn product_backward(
    g: &[f32],
    x: &[f32],
    p: &[f32],
    at: usize,
    (out, inp): (usize, usize),
    dw_db: &mut [f32],
    op: &str,
) -> Result<Vec<f32>> {
    let rows = g.len() / out;
    let (g, x) = (view(g, rows, out, op)?, view(x, rows, inp, op)?);
    let w = view(&p[at..at + out * inp], out, inp, op)?;
    let (dw, db) = dw_db.split_at_mut(out * inp);
    blas::gemm(&g.t(), &x, 0.0, &mut view_mut(dw, out, inp, op)?);
    column_sums(&g, db, op)?;
    let mut dx = vec![0f32; rows * inp];
    blas::gemm(&g, &w, 0.0, &mut view_mut(&mut dx, rows, inp, op)?);
    Ok(dx)
}

/// `acc += b`, element by element, over candle's pool.
fn add_into(acc: &mut [f32], b: &[f32]) {
    pool::for_each_chunk_mut(acc, ELEMENTS_PER_TASK, |span, a| {
        a.iter_mut().zip(&b[span]).for_each(|(x, y)| *x += y);
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed setup step should panic
mod tests {
    use candle_core::{IndexOp, D};

    use super::super::testing::{attention_ref, compare, randn};
    use super::*;

    fn layer_norm_ref(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    fn linear_ref(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.matmul(&w.t()?)?.broadcast_add(b)
    }

    /// The block from candle's primitive ops; `t` = [x, ln1 w, ln1 b, wq, bq, wk, bk, wv, bv,
    /// wo, bo, ln2 w, ln2 b, w1, b1, w2, b2].
    fn block_ref(t: &[Tensor], spec: BlockSpec) -> Result<Tensor> {
        let x = &t[0];
        let h = layer_norm_ref(x, &t[1], &t[2])?;
        let q = linear_ref(&h, &t[3], &t[4])?;
        let k = linear_ref(&h, &t[5], &t[6])?;
        let v = linear_ref(&h, &t[7], &t[8])?;
        let a = attention_ref(&Tensor::cat(&[q, k, v], 1)?, spec.attention)?;
        let pos = spec.attention.positions;
        let xs = match spec.attention.queries {
            Queries::All => x.clone(),
            Queries::First => x
                .reshape((x.dim(0)? / pos, pos, x.dim(1)?))?
                .i((.., 0, ..))?,
        };
        let x1 = (xs + linear_ref(&a, &t[9], &t[10])?)?;
        let u = linear_ref(&layer_norm_ref(&x1, &t[11], &t[12])?, &t[13], &t[14])?;
        let g = match spec.activation {
            Activation::Gelu => u.gelu_erf()?,
            Activation::QuickGelu => (&u * candle_nn::ops::sigmoid(&(&u * 1.702)?)?)?,
        };
        x1 + linear_ref(&g, &t[15], &t[16])?
    }

    fn block(t: &[Tensor], spec: BlockSpec, by_ops: bool) -> Result<Tensor> {
        let p = pack_block_params(&BlockParams {
            ln1: (&t[1], &t[2]),
            q: (&t[3], &t[4]),
            k: (&t[5], &t[6]),
            v: (&t[7], &t[8]),
            out: (&t[9], &t[10]),
            ln2: (&t[11], &t[12]),
            fc1: (&t[13], &t[14]),
            fc2: (&t[15], &t[16]),
        })?;
        match by_ops {
            false => transformer_block(&t[0], &p, spec),
            true => super::super::transformer_block_by_ops(&t[0], &p, spec),
        }
    }

    #[test]
    fn block_matches_primitive_ops_forward_and_backward() {
        // 3 sequences of 7 positions, width 12 in 3 heads, MLP width 20; every parameter
        // away from its usual start, so each gradient term matters.
        let (w, m, t) = (12, 20, 7);
        let shapes: Vec<Vec<usize>> = vec![
            vec![3 * t, w],
            vec![w],
            vec![w],
            vec![w, w],
            vec![w],
            vec![w, w],
            vec![w],
            vec![w, w],
            vec![w],
            vec![w, w],
            vec![w],
            vec![w],
            vec![w],
            vec![m, w],
            vec![m],
            vec![w, m],
            vec![w],
        ];
        let inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let scale = if i == 0 { 1.0 } else { 0.3 };
                let x = (randn(s, 70 + i as u64) * scale).unwrap();
                // Layer-norm scales around 1.
                if i == 1 || i == 11 {
                    (x + 1.0).unwrap()
                } else {
                    x
                }
            })
            .collect();
        for (causal, queries, activation) in [
            (false, Queries::All, Activation::Gelu),
            (true, Queries::All, Activation::QuickGelu),
            (false, Queries::First, Activation::Gelu),
        ] {
            let spec = BlockSpec {
                attention: AttentionSpec {
                    positions: t,
                    heads: 3,
                    causal,
                    queries,
                },
                activation,
                eps: 1e-5,
            };
            // The CPU op on slices, and the same block from tensor ops (the GPU's path).
            for (name, by_ops) in [("op", false), ("by ops", true)] {
                let (dy, dg) = compare(&inputs, |x| block(x, spec, by_ops), |x| block_ref(x, spec));
                assert!(dy < 1e-4, "{name} {spec:?}: forward differs by {dy}");
                for (i, d) in dg.iter().enumerate() {
                    assert!(
                        *d < 1e-4,
                        "{name} {spec:?}: gradient of input {i} differs by {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn misfitting_parameters_are_errors() {
        let spec = BlockSpec {
            attention: AttentionSpec {
                positions: 2,
                heads: 1,
                causal: false,
                queries: Queries::All,
            },
            activation: Activation::Gelu,
            eps: 1e-5,
        };
        let e = transformer_block(&randn(&[4, 3], 1), &randn(&[10], 2), spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit a block of width 3"), "{e}");
        let e = transformer_block(&randn(&[5, 3], 1), &randn(&[10], 2), spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sequences of 2 positions"), "{e}");
    }
}
