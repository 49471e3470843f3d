//! Multi-head self-attention as one op with its own backward pass.
//!
//! Built from candle's primitive ops, a layer's attention was three head splits (reshape,
//! transpose, copy), a batched product for the scores on candle's `gemm` crate (on rayon's
//! threads), a softmax, a second batched product and a merge copy, plus a dozen autograd
//! nodes and their materialised gradients: 9% of a student forward's profile and more of a
//! training step. Here the op reads the fused q/k/v projection `[B, T, 3W]` where it lies:
//! for each batch item and head, the scores are one `sgemm` on strided views of q and k, the
//! softmax runs in place on a `T x T` scratch, and the weighted sum is a second `sgemm` that
//! writes the head's columns of the output directly, so nothing is transposed or copied.
//! Batch items are spread over candle's CPU pool, each task running its small products on its
//! own thread (what ONNX Runtime's CPU attention does with MLAS). The backward pass
//! recomputes the probabilities from q and k (cheap next to storing `[B, H, T, T]`) and
//! writes the q, k and v gradients into one `[B, T, 3W]` tensor, again without copies. On a
//! GPU (a `cuda` build) the same op runs clipcid's CUDA kernels, laid out the same way
//! (`clipcid_kernels::cuda`).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2, ShapeBuilder};

use super::f32_slice;
use super::math::{dot, simd, softmax_in_place};
use crate::{blas, pool};

/// Which query positions [`attention`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queries {
    /// Every position: the output is `[B, T, W]`.
    All,
    /// Position 0 alone: the output is `[B, W]`. What a tower that pools its class token needs
    /// from its last layer; keys and values still cover every position.
    First,
}

/// The shape of an [`attention`] call besides its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSpec {
    /// Positions per sequence: the input's rows are `positions` rows of each batch item in
    /// turn.
    pub positions: usize,
    /// Number of heads; the width must divide into them.
    pub heads: usize,
    /// Whether position `i` attends only to positions `<= i` (a text tower's causal mask).
    pub causal: bool,
    /// Which query positions to compute.
    pub queries: Queries,
}

/// Multi-head self-attention (f32 on the CPU; f32, bf16 or f16 on a GPU in a `cuda` build, where
/// `clipcid_kernels::cuda::attention_fits` says which sizes the CUDA kernels take),
/// differentiable: `qkv` is `[B * T, 3W]` (`T` = `spec.positions`), the q, k and v
/// projections side by side (head `h` in columns `h*D..(h+1)*D` of each, `D = W / heads`).
/// Each head computes `softmax(q k^T / sqrt(D)) v` and the heads are merged back to width
/// `W`, as PyTorch's `nn.MultiheadAttention` and Hugging Face's CLIP attention do. The
/// output is `[B * T, W]` (`[B, W]` for [`Queries::First`]). Rows rather than `[B, T, 3W]`
/// because a reshape is a node of candle's autograd whose backward pass copies the whole
/// gradient, and a transformer block's products work on rows anyway.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use clipcid_kernels::cpu::{attention, AttentionSpec, Queries};
///
/// // Two sequences of 5 positions, width 8 in 2 heads.
/// let qkv = Tensor::randn(0f32, 1.0, (2 * 5, 3 * 8), &Device::Cpu)?;
/// let spec = AttentionSpec { positions: 5, heads: 2, causal: true, queries: Queries::All };
/// let y = attention(&qkv, spec)?;
/// assert_eq!(y.dims(), [10, 8]);
/// // Under the causal mask, position 0 sees only itself: its output is its own value row.
/// let v0 = qkv.narrow(1, 16, 8)?.narrow(0, 5, 1)?;
/// assert!(clipcid_kernels::max_abs_diff(&y.narrow(0, 5, 1)?, &v0)? < 1e-6);
/// # Ok(()) }
/// ```
pub fn attention(qkv: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp(spec))
}

/// [`attention`]'s backward pass alone, outside candle's autograd: the gradient of `qkv`
/// (`[B * T, 3W]`, zeros in the q columns of rows that are no query) given the output
/// gradient `grad` (`[B * T, W]`, or `[B, W]` for [`Queries::First`]). It is what
/// `attention`'s node runs when `backward` reaches it; on its own it serves a hand-written
/// backward pass and timing the kernels without autograd's bookkeeping around them.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
/// use clipcid_kernels::cpu::{attention, attention_backward, AttentionSpec, Queries};
///
/// let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2 * 5, 3 * 8), &Device::Cpu)?)?;
/// let spec = AttentionSpec { positions: 5, heads: 2, causal: false, queries: Queries::All };
/// let r = Tensor::randn(0f32, 1.0, (10, 8), &Device::Cpu)?;
/// // The loss sum(attention(qkv) * r) has output gradient r.
/// let grads = (attention(qkv.as_tensor(), spec)? * &r)?.sum_all()?.backward()?;
/// let by_autograd = grads.get(qkv.as_tensor()).expect("qkv takes part in the loss");
/// let alone = attention_backward(qkv.as_tensor(), &r, spec)?;
/// assert!(clipcid_kernels::max_abs_diff(&alone, by_autograd)? < 1e-6);
/// # Ok(()) }
/// ```
pub fn attention_backward(qkv: &Tensor, grad: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    qkv.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &AttentionGrad(spec))
}

/// Sizes of one call, checked once.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    /// Positions (keys and values).
    t: usize,
    /// Query rows computed per batch item (`t`, or 1 for [`Queries::First`]).
    tq: usize,
    width: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
}

impl Geometry {
    fn new(spec: AttentionSpec, dims: &[usize], op: &str) -> Result<Self> {
        let t = spec.positions;
        let &[rows, w3] = dims else {
            bail!("{op}: expected q, k and v as [batch x positions, 3 x width], got shape {dims:?}")
        };
        let width = w3 / 3;
        if t == 0 || width == 0 || w3 % 3 != 0 || rows % t != 0 {
            bail!(
                "{op}: expected [batch x {t} positions, 3 x width] with a width above 0, got {dims:?}"
            );
        }
        let batch = rows / t;
        if spec.heads == 0 || width % spec.heads != 0 {
            bail!(
                "{op}: width {width} does not divide into {} heads",
                spec.heads
            );
        }
        let head_dim = width / spec.heads;
        Ok(Self {
            batch,
            t,
            tq: match spec.queries {
                Queries::All => t,
                Queries::First => 1,
            },
            width,
            heads: spec.heads,
            head_dim,
            causal: spec.causal,
            scale: (head_dim as f32).powf(-0.5),
        })
    }

    /// The whole batch's output `[batch * tq, W]` from `qkv` `[batch * T, 3W]`, batch items
    /// spread over candle's pool.
    fn forward_all(&self, qkv: &[f32], out: &mut [f32]) -> Result<()> {
        let (rows_in, rows_out) = (self.t * 3 * self.width, self.tq * self.width);
        let done = pool::map_chunks_mut(out, rows_out, |span, out| {
            let b = span.start / rows_out;
            blas::on_this_thread(|| self.forward(&qkv[b * rows_in..(b + 1) * rows_in], out))
        });
        done.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// The whole batch's q, k and v gradients `[batch * T, 3W]` (zeroed by the caller) from
    /// `qkv` and the output gradient.
    fn backward_all(&self, qkv: &[f32], grad: &[f32], dqkv: &mut [f32]) -> Result<()> {
        let (rows_in, rows_out) = (self.t * 3 * self.width, self.tq * self.width);
        let done = pool::map_chunks_mut(dqkv, rows_in, |span, dqkv| {
            let b = span.start / rows_in;
            let grad = &grad[b * rows_out..(b + 1) * rows_out];
            blas::on_this_thread(|| self.backward(&qkv[span], grad, dqkv))
        });
        done.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// The sizes the CUDA kernels take.
    #[cfg(feature = "cuda")]
    fn cuda_dims(&self) -> crate::cuda::AttentionDims {
        crate::cuda::AttentionDims {
            batch: self.batch,
            t: self.t,
            tq: self.tq,
            heads: self.heads,
            head_dim: self.head_dim,
            causal: self.causal,
            scale: self.scale,
            warps: crate::cuda::attention_warps(),
        }
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.batch * self.tq, self.width))
    }

    /// An error unless `grad` has the output's shape.
    fn check_gradient(&self, grad: &Layout, op: &str) -> Result<()> {
        if grad.shape() != &self.out_shape() {
            bail!(
                "{op}: gradient of shape {:?} for an output of shape {:?}",
                grad.dims(),
                self.out_shape().dims()
            );
        }
        Ok(())
    }

    /// Scaled scores `q k^T / sqrt(D)` of head `h`, turned into probabilities in place.
    fn probabilities(&self, qkv: &[f32], h: usize, p: &mut [f32]) -> Result<()> {
        let (t, tq, d, w) = (self.t, self.tq, self.head_dim, self.width);
        let q = view(qkv, h * d, tq, d, 3 * w)?;
        let k = view(qkv, w + h * d, t, d, 3 * w)?;
        general_mat_mul(self.scale, &q, &k.t(), 0.0, &mut view_mut(p, 0, tq, t, t)?);
        let causal = self.causal;
        simd(|| {
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                softmax_in_place(row, if causal { i + 1 } else { t });
            }
        });
        Ok(())
    }

    /// One batch item's output `[tq, W]` from its `[T, 3W]` rows.
    fn forward(&self, qkv: &[f32], out: &mut [f32]) -> Result<()> {
        let (t, tq, d, w) = (self.t, self.tq, self.head_dim, self.width);
        let mut p = vec![0f32; tq * t];
        for h in 0..self.heads {
            self.probabilities(qkv, h, &mut p)?;
            let v = view(qkv, 2 * w + h * d, t, d, 3 * w)?;
            let p = view(&p, 0, tq, t, t)?;
            general_mat_mul(1.0, &p, &v, 0.0, &mut view_mut(out, h * d, tq, d, w)?);
        }
        Ok(())
    }

    /// One batch item's q, k and v gradients `[T, 3W]` (zeroed by the caller: the q rows that
    /// [`Queries::First`] skips stay 0) from its rows and its output gradient `[tq, W]`.
    fn backward(&self, qkv: &[f32], grad: &[f32], dqkv: &mut [f32]) -> Result<()> {
        let (t, tq, d, w) = (self.t, self.tq, self.head_dim, self.width);
        let mut p = vec![0f32; tq * t];
        let mut ds = vec![0f32; tq * t];
        for h in 0..self.heads {
            self.probabilities(qkv, h, &mut p)?;
            let q = view(qkv, h * d, tq, d, 3 * w)?;
            let k = view(qkv, w + h * d, t, d, 3 * w)?;
            let v = view(qkv, 2 * w + h * d, t, d, 3 * w)?;
            let dout = view(grad, h * d, tq, d, w)?;
            let pv = view(&p, 0, tq, t, t)?;
            // dV = P^T dO
            general_mat_mul(
                1.0,
                &pv.t(),
                &dout,
                0.0,
                &mut view_mut(dqkv, 2 * w + h * d, t, d, 3 * w)?,
            );
            // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) / sqrt(D), in place.
            general_mat_mul(
                1.0,
                &dout,
                &v.t(),
                0.0,
                &mut view_mut(&mut ds, 0, tq, t, t)?,
            );
            let scale = self.scale;
            simd(|| {
                for (dsr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let dot = dot(dsr, pr);
                    for (g, &pv) in dsr.iter_mut().zip(pr) {
                        *g = scale * pv * (*g - dot);
                    }
                }
            });
            let dsv = view(&ds, 0, tq, t, t)?;
            // dQ = dS K, dK = dS^T Q
            general_mat_mul(
                1.0,
                &dsv,
                &k,
                0.0,
                &mut view_mut(dqkv, h * d, tq, d, 3 * w)?,
            );
            general_mat_mul(
                1.0,
                &dsv.t(),
                &q,
                0.0,
                &mut view_mut(dqkv, w + h * d, t, d, 3 * w)?,
            );
        }
        Ok(())
    }
}

/// [`attention`] on slices: `out` `[batch * tq, W]` from `qkv` `[rows, 3W]`.
pub(crate) fn attention_rows(
    spec: AttentionSpec,
    qkv: &[f32],
    rows: usize,
    out: &mut [f32],
) -> Result<()> {
    let g = Geometry::new(spec, &[rows, qkv.len() / rows.max(1)], "clipcid-attention")?;
    g.forward_all(qkv, out)
}

/// [`attention`]'s backward pass on slices: `dqkv` `[rows, 3W]` (overwritten) from `qkv`
/// and the output gradient `grad`.
pub(crate) fn attention_grad_rows(
    spec: AttentionSpec,
    qkv: &[f32],
    rows: usize,
    grad: &[f32],
    dqkv: &mut [f32],
) -> Result<()> {
    let g = Geometry::new(
        spec,
        &[rows, qkv.len() / rows.max(1)],
        "clipcid-attention-grad",
    )?;
    dqkv.iter_mut().for_each(|v| *v = 0.0);
    g.backward_all(qkv, grad, dqkv)
}

fn shape_error(e: ndarray::ShapeError) -> candle_core::Error {
    candle_core::Error::Msg(format!("clipcid-attention: {e}"))
}

/// `rows x cols` of `data` from `offset`, rows `row_stride` apart.
fn view(
    data: &[f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
) -> Result<ArrayView2<'_, f32>> {
    ArrayView2::from_shape((rows, cols).strides((row_stride, 1)), &data[offset..])
        .map_err(shape_error)
}

fn view_mut(
    data: &mut [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
) -> Result<ArrayViewMut2<'_, f32>> {
    ArrayViewMut2::from_shape((rows, cols).strides((row_stride, 1)), &mut data[offset..])
        .map_err(shape_error)
}

struct AttentionOp(AttentionSpec);

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "clipcid-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(self.0, l.dims(), self.name())?;
        let mut out = vec![0f32; g.batch * g.tq * g.width];
        g.forward_all(f32_slice(s, l, self.name())?, &mut out)?;
        Ok((CpuStorage::F32(out), g.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(self.0, l.dims(), self.name())?;
        Ok((
            crate::cuda::attention_fwd(s, l, g.cuda_dims())?,
            g.out_shape(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &AttentionGrad(self.0),
        )?))
    }
}

/// The gradient of [`AttentionOp`] with respect to `qkv`, from `qkv` and the output gradient.
struct AttentionGrad(AttentionSpec);

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "clipcid-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(self.0, l1.dims(), self.name())?;
        let qkv = f32_slice(s1, l1, self.name())?;
        let grad = f32_slice(s2, l2, self.name())?;
        g.check_gradient(l2, self.name())?;
        let mut dqkv = vec![0f32; qkv.len()];
        g.backward_all(qkv, grad, &mut dqkv)?;
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(self.0, l1.dims(), self.name())?;
        g.check_gradient(l2, self.name())?;
        let dqkv = crate::cuda::attention_bwd((s1, l1), (s2, l2), g.cuda_dims())?;
        Ok((dqkv, l1.shape().clone()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed setup step should panic
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::cpu::testing::{
        attention_ref, check_gradient_by_finite_differences, compare, randn,
    };

    #[test]
    fn attention_matches_primitive_ops_forward_and_backward() {
        // Batch 3, 7 positions, width 12 in 3 heads of 4; every mask and query choice.
        let qkv = (randn(&[3 * 7, 36], 40) * 1.5).unwrap();
        for causal in [false, true] {
            for queries in [Queries::All, Queries::First] {
                let spec = AttentionSpec {
                    positions: 7,
                    heads: 3,
                    causal,
                    queries,
                };
                let (dy, dg) = compare(
                    std::slice::from_ref(&qkv),
                    |t| attention(&t[0], spec),
                    |t| attention_ref(&t[0], spec),
                );
                assert!(dy < 1e-5, "{spec:?}: forward differs by {dy}");
                assert!(dg[0] < 1e-5, "{spec:?}: gradient differs by {}", dg[0]);
            }
        }
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        let spec = AttentionSpec {
            positions: 5,
            heads: 2,
            causal: true,
            queries: Queries::All,
        };
        // A q, a k and a v element of each batch item, and one at the last position.
        check_gradient_by_finite_differences(
            &randn(&[2 * 5, 24], 41),
            |x| attention(x, spec),
            &[1, 9, 18, 120 + 3, 120 + 13, 239],
            1e-2,
            2e-3,
        );
    }

    #[test]
    fn products_above_blas_thresholds_and_many_batches_match() {
        // Positions and head size large enough for sgemm (not ndarray's small-matrix path)
        // and more batch items than threads.
        let qkv = randn(&[9 * 50, 3 * 64], 43);
        let spec = AttentionSpec {
            positions: 50,
            heads: 2,
            causal: false,
            queries: Queries::All,
        };
        let got = attention(&qkv, spec).unwrap();
        let want = attention_ref(&qkv.to_dtype(DType::F64).unwrap(), spec).unwrap();
        assert!(crate::max_abs_diff(&got, &want).unwrap() < 1e-5);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let spec = AttentionSpec {
            positions: 3,
            heads: 5,
            causal: false,
            queries: Queries::All,
        };
        let e = attention(&randn(&[6, 24], 1), spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not divide into 5 heads"), "{e}");
        for bad in [&[6, 25][..], &[7, 24], &[2, 3, 24]] {
            let e = attention(&randn(bad, 1), spec).unwrap_err().to_string();
            assert!(e.contains("3 x width"), "{bad:?}: {e}");
        }
    }
}
