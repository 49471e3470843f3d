//! Layer norm over the last dimension, one pass over the rows forward and one backward.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{f32_slice, math, row_width, ROWS_PER_TASK};
use crate::pool;

/// Layer norm over the last dimension with scale and shift (f32 on the CPU; f32, bf16 or f16 on a
/// GPU in a `cuda` build, see `clipcid_kernels::cuda`), differentiable in all three arguments.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )
}

/// Mean and reciprocal standard deviation of one row (two passes, as PyTorch does).
#[inline(always)]
fn row_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let d = xr.len() as f32;
    let mean = math::sum_by(xr, |v| v) / d;
    let var = math::sum_by(xr, |v| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "clipcid-layer-norm"
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
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let d = row_width(l1, self.name())?;
        if w.len() != d || b.len() != d {
            bail!(
                "{}: scale/shift of {}/{} values for rows of {d}",
                self.name(),
                w.len(),
                b.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        layer_norm_rows(x, w, b, self.eps, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::layer_norm_fwd((s1, l1), (s2, l2), (s3, l3), self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = layer_norm_backward(x, w, grad, self.eps)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// [`layer_norm`]'s gradients of its input, scale and shift from the input `x`, the scale `w`
/// and the output gradient, outside candle's autograd (what its node runs, and what a
/// hand-written backward pass calls).
pub(crate) fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d;
    // One pass gives all three gradients, packed as `[rows + 2, d]`: dx, then dw, then db.
    let packed = x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &grad.contiguous()?,
        &LayerNormGrad { eps },
    )?;
    let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
    let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
    let db = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
    Ok((dx, dw, db))
}

/// [`LayerNorm`]'s gradients, packed as `[rows + 2, d]`: see [`layer_norm_grad_rows`].
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "clipcid-layer-norm-grad"
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
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let d = row_width(l1, self.name())?;
        if w.len() != d || g.len() != x.len() {
            bail!("{}: input, scale and gradient sizes disagree", self.name());
        }
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, sums) = out.split_at_mut(rows * d);
        layer_norm_grad_rows(x, w, g, self.eps, dx, sums);
        let shape = Shape::from((rows + 2, d));
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::layer_norm_bwd((s1, l1), (s2, l2), (s3, l3), self.eps)
    }
}

/// `y = (x - mean) / sqrt(var + eps) * w + b` for each row of `x` (rows of `w.len()`), over
/// candle's pool.
pub(crate) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    pool::for_each_chunk_mut(y, d * ROWS_PER_TASK, |span, ys| {
        math::simd(|| {
            for (yr, xr) in ys.chunks_exact_mut(d).zip(x[span].chunks_exact(d)) {
                let (mean, rstd) = row_stats(xr, eps);
                for (((o, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *o = (xv - mean) * rstd * wv + bv;
                }
            }
        })
    });
}

/// Layer-norm gradients from the input `x`, the scale `w` and the output gradient `g`:
/// `dx` (one row per row of `x`), and `dw_db` = `dw` then `db` (`2 * w.len()` values,
/// overwritten). With `xh = (x - mean) * rstd` and `gh = g * w`,
/// `dx = rstd * (gh - mean(gh) - xh * mean(gh * xh))`, `dw = sum_rows(g * xh)`,
/// `db = sum_rows(g)`; the row sums are added task by task in a fixed order.
pub(crate) fn layer_norm_grad_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw_db: &mut [f32],
) {
    let d = w.len();
    let partials: Vec<Vec<f32>> = pool::map_chunks_mut(dx, d * ROWS_PER_TASK, |span, dxs| {
        let (xs, gs) = (&x[span.clone()], &g[span]);
        let mut part = vec![0f32; 2 * d];
        let (mut xh, mut gh) = (vec![0f32; d], vec![0f32; d]);
        math::simd(|| {
            let (dw, db) = part.split_at_mut(d);
            for ((dxr, xr), gr) in dxs
                .chunks_exact_mut(d)
                .zip(xs.chunks_exact(d))
                .zip(gs.chunks_exact(d))
            {
                let (mean, rstd) = row_stats(xr, eps);
                for (((h, gv), &xv), (&g, &wv)) in xh
                    .iter_mut()
                    .zip(gh.iter_mut())
                    .zip(xr)
                    .zip(gr.iter().zip(w))
                {
                    *h = (xv - mean) * rstd;
                    *gv = g * wv;
                }
                let mean_gh = math::sum_by(&gh, |v| v) / d as f32;
                let mean_ghxh = math::dot(&gh, &xh) / d as f32;
                for (((dwv, dbv), &g), &h) in dw.iter_mut().zip(db.iter_mut()).zip(gr).zip(&xh) {
                    *dwv += g * h;
                    *dbv += g;
                }
                for ((o, &gv), &h) in dxr.iter_mut().zip(&gh).zip(&xh) {
                    *o = rstd * (gv - mean_gh - h * mean_ghxh);
                }
            }
        });
        part
    });
    dw_db.iter_mut().for_each(|s| *s = 0.0);
    for part in &partials {
        dw_db.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
}
