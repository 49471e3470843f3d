//! Fused CPU kernels with hand-written backward passes, for training on the CPU.
//!
//! Built from candle's primitive ops, a differentiable layer norm is eight ops and a softmax
//! four, each writing a fresh tensor and each broadcast materialised again by autograd; they
//! and their gradients were a third of a CPU training step. Here each is one pass over the
//! rows forward and one backward, as candle `CustomOp`s (candle's own fused `layer_norm` and
//! `softmax_last_dim` kernels have no backward pass). Only f32 CPU tensors take this path;
//! `clipcid_models::nn` keeps the primitive-op version for other devices and dtypes. Every kernel
//! reduces in a fixed order, so results do not depend on the thread count or scheduling.
//!
//! [`linear`] (a layer with a bias, as one op) and [`matmul`] send the linear layers' 2-D
//! products and their gradients to OpenBLAS `sgemm` (through ndarray, as clipcid-dedup does):
//! on the 2-core CI machine candle's CPU matmul (the `gemm` crate) reached 148 GFLOP/s where
//! OpenBLAS reaches 235, and the products were half of a training step. Large products are
//! cut into one single-threaded `sgemm` per thread of candle's pool ([`crate::blas`]), and the
//! kernels here run on that pool too, so a step uses one set of threads.
//!
//! Above those: [`attention`] (multi-head self-attention on the fused q/k/v rows, no head
//! copies), [`transformer_block`] (a whole pre-norm block as one autograd node, for
//! training), [`linear_residual`] and the in-place activations (for inference), and
//! [`adamw_update`]. Element-wise maths is vectorised for the CPU at hand (`math`).
//! docs/benchmarks.md ("CPU speed against ONNX Runtime and PyTorch") measures them.

use crate::pool;

mod activation;
mod adamw;
mod attention;
mod block;
mod block_node;
mod math;
mod norm;
#[cfg(test)]
mod testing;

pub use activation::{gelu, gelu_in_place, quick_gelu, quick_gelu_in_place, Activation};
#[cfg(feature = "cuda")]
pub(crate) use adamw::ApplyScalars;
pub use adamw::{
    adamw_runs_in_place, adamw_update, adamw_update_many, squared_norms, AdamWParam, AdamWStep,
};
#[cfg(any(feature = "cuda", test))]
pub(crate) use adamw::{check_update_ranges, Extent};
pub use attention::{attention, attention_backward, AttentionSpec, Queries};
pub use block::{pack_block_params, transformer_block, BlockParams, BlockSpec};
pub use block_node::transformer_block_by_ops;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
pub use norm::layer_norm;

/// Rows handed to one task of the thread pool.
pub(crate) const ROWS_PER_TASK: usize = 32;

/// Elements handed to one task of an element-wise kernel.
const ELEMENTS_PER_TASK: usize = 4096;

/// Whether `t` is an f32 tensor on the CPU (the tensors these kernels handle).
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expected an f32 tensor")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// A forward value and its gradient: two contiguous f32 slices of one size.
fn same_size_pair<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32])> {
    let (a, b) = (f32_slice(s1, l1, op)?, f32_slice(s2, l2, op)?);
    if a.len() != b.len() {
        bail!(
            "{op}: value and gradient sizes differ ({} vs {})",
            a.len(),
            b.len()
        );
    }
    Ok((a, b))
}

fn row_width(l: &Layout, op: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!("{op}: expected a tensor with a non-empty last dimension"),
    }
}

/// Softmax over the last dimension (f32 on the CPU; f32, bf16 or f16 on a GPU in a `cuda` build,
/// see `clipcid_kernels::cuda`), differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// `a @ b` for 2-D f32 CPU tensors through OpenBLAS, differentiable in both arguments. Either
/// argument may be a transposed view (`t()`); other strided views are copied first.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.apply_op2(b, Matmul)
}

/// `x @ w^T + b` for a 2-D f32 CPU input `[rows, in]`, weight `[out, in]` and bias `[out]`
/// through OpenBLAS, differentiable in all three. One op instead of a product and a broadcast
/// add: the bias is written into the output before `sgemm` adds the product to it, and the
/// weight's gradient comes out as `[out, in]` rather than as the transpose of a product.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
}

/// `residual + x @ w^T + b` in one op, for inference: the residual and bias are written into
/// the output and `sgemm` adds the product to them, which saves a transformer block's two
/// residual additions a pass over memory and an allocation each. Shapes as [`linear`], the
/// residual `[rows, out]`. No gradient flows through it (to any argument): use [`linear`]
/// and an addition when one is needed.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use clipcid_kernels::{cpu, max_abs_diff};
/// let x = Tensor::randn(0f32, 1.0, (4, 3), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1.0, (5, 3), &Device::Cpu)?;
/// let b = Tensor::randn(0f32, 1.0, 5, &Device::Cpu)?;
/// let r = Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu)?;
/// let y = cpu::linear_residual(&x, &w, &b, &r)?;
/// assert!(max_abs_diff(&y, &(cpu::linear(&x, &w, &b)? + &r)?)? < 1e-5);
/// # Ok(()) }
/// ```
pub fn linear_residual(x: &Tensor, w: &Tensor, b: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let op = LinearResidual {
        residual: residual.contiguous()?,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)
}

/// A 2-D view of a CPU f32 tensor that cblas accepts: row-major or column-major with a unit
/// inner stride; `None` for any other layout.
fn blas_view<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Option<ndarray::ArrayView2<'a, f32>>> {
    use ndarray::ShapeBuilder;
    let CpuStorage::F32(v) = s else {
        bail!("clipcid-matmul: expected an f32 tensor")
    };
    let [rows, cols] = l.dims() else {
        bail!(
            "clipcid-matmul: expected a 2-D tensor, got shape {:?}",
            l.dims()
        )
    };
    let (rows, cols) = (*rows, *cols);
    let st = l.stride();
    let (s0, s1) = (st[0], st[1]);
    let row_major = s1 == 1 || cols == 1;
    let col_major = s0 == 1 || rows == 1;
    if !(row_major || col_major) {
        return Ok(None);
    }
    let start = l.start_offset();
    let span = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * s0 + (cols - 1) * s1 + 1
    };
    let data = &v[start..start + span];
    let view = ndarray::ArrayView2::from_shape((rows, cols).strides((s0, s1)), data)
        .map_err(|e| candle_core::Error::Msg(format!("clipcid-matmul: {e}")))?;
    Ok(Some(view))
}

struct Matmul;

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "clipcid-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some(a), Some(b)) = (blas_view(s1, l1)?, blas_view(s2, l2)?) else {
            bail!("clipcid-matmul: an argument is neither row- nor column-major")
        };
        let (m, k) = a.dim();
        let (k2, n) = b.dim();
        if k != k2 {
            bail!(
                "clipcid-matmul: shapes {:?} and {:?} do not multiply",
                a.dim(),
                b.dim()
            );
        }
        let mut out = vec![0f32; m * n];
        let mut c = ndarray::ArrayViewMut2::from_shape((m, n), &mut out)
            .map_err(|e| candle_core::Error::Msg(format!("clipcid-matmul: {e}")))?;
        crate::blas::gemm(&a, &b, 0.0, &mut c);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let da = g.apply_op2_no_bwd(&b.t()?, &Matmul)?;
        let db = a.t()?.apply_op2_no_bwd(&g, &Matmul)?;
        Ok((Some(da), Some(db)))
    }
}

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "clipcid-linear"
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
        linear_forward(self.name(), (s1, l1), (s2, l2), (s3, l3), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = g.apply_op2_no_bwd(w, &Matmul)?;
        let dw = g.t()?.apply_op2_no_bwd(x, &Matmul)?;
        // The bias gradient (column sums of `g`) as a product with a row of ones: candle's
        // sum over the first dimension walks `g` with a stride and was 5% of a training step.
        let ones = Tensor::ones((1, g.dim(0)?), g.dtype(), g.device())?;
        let db = ones.apply_op2_no_bwd(&g, &Matmul)?.squeeze(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `x @ w^T + b`, plus `residual` (`[rows, out]`, contiguous) where given, from storages.
fn linear_forward(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    residual: Option<&[f32]>,
) -> Result<(CpuStorage, Shape)> {
    let (Some(x), Some(w)) = (blas_view(s1, l1)?, blas_view(s2, l2)?) else {
        bail!("{op}: an argument is neither row- nor column-major")
    };
    let bias = f32_slice(s3, l3, op)?;
    let (rows, n) = (x.nrows(), w.nrows());
    let mut out = vec![0f32; rows * n];
    linear_rows(op, &x, &w, bias, residual, &mut out)?;
    Ok((CpuStorage::F32(out), Shape::from((rows, n))))
}

/// `out = x @ w^T + b` (plus `residual`, `[rows, out]`, where given) for `x` `[rows, in]` and
/// `w` `[out, in]`: the bias (and the residual) are written into `out`, then `sgemm` adds
/// the product to it.
pub(crate) fn linear_rows(
    op: &str,
    x: &ndarray::ArrayView2<f32>,
    w: &ndarray::ArrayView2<f32>,
    bias: &[f32],
    residual: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let ((rows, k), (n, k2)) = (x.dim(), w.dim());
    if k != k2 || bias.len() != n || out.len() != rows * n {
        bail!(
            "{op}: input {:?}, weight {:?} and bias of {} do not fit",
            x.dim(),
            w.dim(),
            bias.len()
        );
    }
    match residual {
        Some(r) if r.len() != out.len() => bail!(
            "{op}: residual of {} values for an output of [{rows}, {n}]",
            r.len()
        ),
        Some(r) => pool::for_each_chunk_mut(out, n * ROWS_PER_TASK, |span, ys| {
            for (yr, rr) in ys.chunks_exact_mut(n).zip(r[span].chunks_exact(n)) {
                for ((o, &rv), &bv) in yr.iter_mut().zip(rr).zip(bias) {
                    *o = rv + bv;
                }
            }
        }),
        None => pool::for_each_chunk_mut(out, n * ROWS_PER_TASK, |_, ys| {
            ys.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(bias));
        }),
    }
    let mut c = ndarray::ArrayViewMut2::from_shape((rows, n), out)
        .map_err(|e| candle_core::Error::Msg(format!("{op}: {e}")))?;
    crate::blas::gemm(x, &w.t(), 1.0, &mut c);
    Ok(())
}

/// [`linear_residual`]'s op: [`LinearOp`] with a residual added, and no backward pass.
struct LinearResidual {
    residual: Tensor,
}

impl CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "clipcid-linear-residual"
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
        let (storage, layout) = self.residual.storage_and_layout();
        let candle_core::Storage::Cpu(r) = &*storage else {
            bail!("{}: the residual is not on the CPU", self.name())
        };
        let r = f32_slice(r, layout, self.name())?;
        linear_forward(self.name(), (s1, l1), (s2, l2), (s3, l3), Some(r))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "clipcid-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let d = row_width(l, self.name())?;
        let mut y = vec![0f32; x.len()];
        pool::for_each_chunk_mut(&mut y, d * ROWS_PER_TASK, |span, ys| {
            ys.copy_from_slice(&x[span]);
            math::simd(|| {
                ys.chunks_exact_mut(d)
                    .for_each(|row| math::softmax_in_place(row, d))
            });
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::softmax_fwd(s, l)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `dx = y * (g - sum(g * y))` per row, from the softmax output `y` and its gradient `g`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "clipcid-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = same_size_pair(self.name(), (s1, l1), (s2, l2))?;
        let d = row_width(l1, self.name())?;
        let mut dx = vec![0f32; y.len()];
        pool::for_each_chunk_mut(&mut dx, d * ROWS_PER_TASK, |span, out| {
            let (ys, gs) = (&y[span.clone()], &g[span]);
            for ((o, yr), gr) in out
                .chunks_exact_mut(d)
                .zip(ys.chunks_exact(d))
                .zip(gs.chunks_exact(d))
            {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                    *o = yv * (gv - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::softmax_bwd((s1, l1), (s2, l2))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed setup step should panic
mod tests {
    use candle_core::{Device, D};

    use super::testing::{check_gradient_by_finite_differences, compare, max_abs_diff, randn};
    use super::*;

    /// Reference implementations from candle's primitive ops, run in f64.
    fn softmax_ref(x: &Tensor) -> Result<Tensor> {
        let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    fn layer_norm_ref(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    #[test]
    fn softmax_matches_primitive_ops_forward_and_backward() {
        // Attention-shaped input with a masked (-inf) column, as the text tower makes.
        let x = (randn(&[2, 3, 5, 7], 1) * 3.0).unwrap();
        let mask = Tensor::from_vec(
            vec![0f32, 0., 0., 0., 0., 0., f32::NEG_INFINITY],
            7,
            &Device::Cpu,
        )
        .unwrap();
        let x = x.broadcast_add(&mask).unwrap();
        let (dy, dg) = compare(&[x], |t| softmax_last_dim(&t[0]), |t| softmax_ref(&t[0]));
        assert!(dy < 1e-6, "forward differs by {dy}");
        assert!(dg[0] < 1e-5, "gradient differs by {}", dg[0]);
    }

    #[test]
    fn layer_norm_matches_primitive_ops_forward_and_backward() {
        // More rows than one task holds, so the per-task dw/db partial sums are exercised.
        let x = ((randn(&[3, 40, 24], 2) * 2.0).unwrap() + 0.5).unwrap();
        let w = (randn(&[24], 3) + 1.0).unwrap();
        let b = randn(&[24], 4);
        let (dy, dg) = compare(
            &[x, w, b],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| layer_norm_ref(&t[0], &t[1], &t[2], 1e-5),
        );
        assert!(dy < 1e-5, "forward differs by {dy}");
        for (name, d) in ["x", "weight", "bias"].iter().zip(&dg) {
            assert!(*d < 1e-4, "gradient of {name} differs by {d}");
        }
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let w = (randn(&[6], 6) + 1.0).unwrap();
        let b = randn(&[6], 7);
        check_gradient_by_finite_differences(
            &randn(&[4, 6], 5),
            |x| layer_norm(x, &w, &b, 1e-5),
            &[0, 5, 7, 13, 23],
            1e-2,
            5e-3,
        );
    }

    #[test]
    fn matmul_matches_primitive_ops_forward_and_backward() {
        // As a linear layer calls it: rows @ weight^T, the weight a transposed view.
        let x = randn(&[37, 24], 11);
        let w = randn(&[10, 24], 12);
        let (dy, dg) = compare(
            &[x, w],
            |t| matmul(&t[0], &t[1].t()?),
            |t| t[0].matmul(&t[1].t()?),
        );
        assert!(dy < 1e-4, "forward differs by {dy}");
        assert!(dg.iter().all(|&d| d < 1e-4), "gradients differ by {dg:?}");
        // A view that is neither row- nor column-major (strides 12 and 2) is refused.
        let z = randn(&[4, 6, 2], 13)
            .narrow(2, 0, 1)
            .unwrap()
            .squeeze(2)
            .unwrap();
        assert_eq!(z.stride(), [12, 2]);
        let e = matmul(&z, &randn(&[6, 3], 14)).unwrap_err().to_string();
        assert!(e.contains("neither row- nor column-major"), "{e}");
        // A column-major left argument and a narrowed (row-major, offset) right one are read
        // in place and give the same product as candle.
        let a = randn(&[5, 7], 15).t().unwrap();
        let b = randn(&[5, 9], 16).narrow(1, 2, 4).unwrap();
        let want = a
            .contiguous()
            .unwrap()
            .matmul(&b.contiguous().unwrap())
            .unwrap();
        assert!(max_abs_diff(&matmul(&a, &b).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn linear_matches_primitive_ops_forward_and_backward() {
        // Small (one sgemm) and large enough to be cut into per-thread blocks.
        for (rows, k, n, seed) in [(37, 24, 10, 20), (301, 96, 129, 30)] {
            let x = randn(&[rows, k], seed);
            let w = randn(&[n, k], seed + 1);
            let b = randn(&[n], seed + 2);
            let (dy, dg) = compare(
                &[x, w, b],
                |t| linear(&t[0], &t[1], &t[2]),
                |t| t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2]),
            );
            assert!(dy < 1e-3, "{rows}x{k}x{n}: forward differs by {dy}");
            assert!(
                dg.iter().all(|&d| d < 1e-3),
                "{rows}x{k}x{n}: gradients differ by {dg:?}"
            );
        }
        let e = linear(&randn(&[3, 4], 1), &randn(&[5, 4], 2), &randn(&[6], 3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
    }

    #[test]
    fn linear_residual_equals_linear_plus_residual() {
        // One sgemm, and cut into per-thread blocks; the residual is a strided view.
        for (rows, k, n, seed) in [(37, 24, 10, 50), (301, 96, 129, 60)] {
            let x = randn(&[rows, k], seed);
            let w = randn(&[n, k], seed + 1);
            let b = randn(&[n], seed + 2);
            let r = randn(&[n, rows], seed + 3).t().unwrap();
            let got = linear_residual(&x, &w, &b, &r).unwrap();
            let want = (linear(&x, &w, &b).unwrap() + &r).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-5, "{rows}x{k}x{n}");
        }
        let e = linear_residual(
            &randn(&[3, 4], 1),
            &randn(&[5, 4], 2),
            &randn(&[5], 3),
            &randn(&[3, 4], 4),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("residual of 12 values"), "{e}");
    }

    #[test]
    fn products_cut_into_blocks_match_one_product() {
        // Above the split threshold, cut by rows (m >= n) and by columns (n > m), with sizes
        // that leave a short last block; candle's own matmul is the reference.
        for (m, k, n) in [(301, 97, 131), (41, 129, 303)] {
            let a = randn(&[m, k], m as u64);
            let b = randn(&[k, n], n as u64);
            let got = matmul(&a, &b).unwrap();
            let want = a.matmul(&b).unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-3, "{m}x{k}x{n}: differs by {diff}");
        }
    }

    #[test]
    fn non_contiguous_inputs_are_made_contiguous() {
        let x = randn(&[4, 6], 10).t().unwrap();
        let a = softmax_last_dim(&x).unwrap();
        let b = softmax_ref(&x.contiguous().unwrap()).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-6);
    }
}
