//! AdamW's update in place, three streaming passes instead of a dozen tensor ops.
//!
//! Written with candle's tensor ops, one AdamW step over a 12 M-parameter student was about
//! twelve ops per parameter tensor, each allocating and writing a full-size result, and
//! candle runs its scalar ops (`affine`, `sqrt`, `sqr`) on one thread: 5% of a training step,
//! with the pool's other thread idle. Here the two moments and the parameter are updated in
//! place, each in one pass over candle's pool. On CUDA the same three passes are kernels
//! (see `clipcid_kernels::cuda`).

use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::{f32_slice, math, ELEMENTS_PER_TASK};
use crate::pool;

/// One AdamW step's scalars (PyTorch's `torch.optim.AdamW`, decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the second moment's square root.
    pub eps: f64,
    /// Decoupled weight decay (0 for parameters without it).
    pub weight_decay: f64,
    /// The step number, from 1 (for the bias corrections).
    pub step: i32,
}

/// Updates `param` and its moments `m` and `v` in place from `grad` (f32 tensors of one
/// shape on the CPU, or on a GPU in a `cuda` build; `param`, `m` and `v` contiguous; see
/// [`adamw_runs_in_place`]):
/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `param = param (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use clipcid_kernels::cpu::{adamw_update, AdamWStep};
/// let dev = &Device::Cpu;
/// let p = Tensor::new(&[1f32, -1.0], dev)?;
/// let (m, v) = (p.zeros_like()?, p.zeros_like()?);
/// let g = Tensor::new(&[0.5f32, -2.0], dev)?;
/// let step = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
/// adamw_update(&p, &g, &m, &v, step)?;
/// // The first step moves each parameter by lr against its gradient's sign.
/// let got = p.to_vec1::<f32>()?;
/// assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 0.9).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: AdamWStep,
) -> Result<()> {
    update_scaled(param, &grad.contiguous()?, m, v, step, 1.0)
}

/// [`adamw_update`] with the gradient multiplied by `scale` first (in f32, in the kernels);
/// `grad` contiguous.
fn update_scaled(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: AdamWStep,
    scale: f32,
) -> Result<()> {
    m.inplace_op2(
        grad,
        &Moment {
            decay: step.beta1,
            square: false,
            scale,
        },
    )?;
    v.inplace_op2(
        grad,
        &Moment {
            decay: step.beta2,
            square: true,
            scale,
        },
    )?;
    param.inplace_op3(m, v, &Apply(step))
}

/// One parameter of [`adamw_update_many`]: the tensors [`adamw_update`] takes, and whether
/// the step's weight decay applies to it.
#[derive(Debug, Clone, Copy)]
pub struct AdamWParam<'a> {
    /// The parameter, updated in place.
    pub param: &'a Tensor,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// Its first moment, updated in place.
    pub m: &'a Tensor,
    /// Its second moment, updated in place.
    pub v: &'a Tensor,
    /// Whether `weight_decay` applies (open_clip decays matrices only).
    pub decays: bool,
}

/// [`adamw_update`] for many parameters at once, each gradient multiplied by `grad_scale`
/// first (the factor of gradient clipping and of f16 loss scaling; 1 for neither), and the
/// step's `weight_decay` applied only where [`AdamWParam::decays`]. Same tensors and formula
/// as [`adamw_update`], same bits on every device.
///
/// On a GPU where clipcid's kernels take the tensors (a `cuda` build, kernels on, all f32
/// on one GPU), one kernel launch updates every parameter, reading their addresses from a
/// table: a CLIP student's step is about 300 parameter tensors, and three launches each were
/// 3.5 ms on an H200, for about 0.3 ms of memory traffic. Elsewhere, one [`adamw_update`]
/// each.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use clipcid_kernels::cpu::{adamw_update_many, AdamWParam, AdamWStep};
/// let dev = &Device::Cpu;
/// let (w, b) = (Tensor::new(&[[1f32, -1.0]], dev)?, Tensor::new(&[2f32], dev)?);
/// let (gw, gb) = (Tensor::new(&[[0.5f32, -2.0]], dev)?, Tensor::new(&[4f32], dev)?);
/// let moments = |t: &Tensor| Ok::<_, candle_core::Error>((t.zeros_like()?, t.zeros_like()?));
/// let ((mw, vw), (mb, vb)) = (moments(&w)?, moments(&b)?);
/// let step = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5, step: 1 };
/// adamw_update_many(
///     &[
///         AdamWParam { param: &w, grad: &gw, m: &mw, v: &vw, decays: true },
///         AdamWParam { param: &b, grad: &gb, m: &mb, v: &vb, decays: false },
///     ],
///     step,
///     0.5,
/// )?;
/// // The first step moves each value by lr against its gradient's sign; the matrix also
/// // decays by lr * weight_decay, the bias does not.
/// let (w, b) = (w.to_vec2::<f32>()?, b.to_vec1::<f32>()?);
/// assert!((w[0][0] - 0.85).abs() < 1e-6 && (w[0][1] + 0.85).abs() < 1e-6);
/// assert!((b[0] - 1.9).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn adamw_update_many(
    params: &[AdamWParam<'_>],
    step: AdamWStep,
    grad_scale: f64,
) -> Result<()> {
    let grads = params
        .iter()
        .map(|p| p.grad.contiguous())
        .collect::<Result<Vec<_>>>()?;
    const OP: &str = "adamw_update_many";
    let mut ts = Vec::with_capacity(4 * params.len());
    for (p, g) in params.iter().zip(&grads) {
        ts.extend([p.param, p.m, p.v, g]);
    }
    check_update_ranges(&f32_ranges(&ts, OP)?, OP)?;
    let scale = grad_scale as f32;
    #[cfg(feature = "cuda")]
    if ts
        .first()
        .is_some_and(|t| t.device().is_cuda() && crate::gpu_kernels_take(&[t]))
    {
        return crate::cuda::adamw_many(params, &grads, &step, scale);
    }
    for (p, g) in params.iter().zip(&grads) {
        let step = AdamWStep {
            weight_decay: if p.decays { step.weight_decay } else { 0.0 },
            ..step
        };
        update_scaled(p.param, g, p.m, p.v, step, scale)?;
    }
    Ok(())
}

/// The byte range `[start, end)` of each tensor's contiguous f32 values, in host memory (all
/// on the CPU) or in one GPU's (a `cuda` build); otherwise an error.
fn f32_ranges(ts: &[&Tensor], op: &str) -> Result<Vec<(u64, u64)>> {
    #[cfg(feature = "cuda")]
    if ts.first().is_some_and(|t| t.device().is_cuda()) {
        return crate::cuda::f32_ranges(ts, op);
    }
    ts.iter().map(|t| cpu_f32_range(t, op)).collect()
}

/// The byte range `[start, end)` of a contiguous f32 CPU tensor's values in host memory.
fn cpu_f32_range(t: &Tensor, op: &str) -> Result<(u64, u64)> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        bail!("{op}: tensors on more than one device")
    };
    let v = f32_slice(s, layout, op)?;
    let start = v.as_ptr() as u64;
    Ok((start, start + 4 * v.len() as u64))
}

/// Checks [`adamw_update_many`]'s tensors given as byte ranges, four per parameter
/// (parameter, first moment, second moment, gradient): each four of one size, and no range
/// that the update writes (a parameter or a moment) overlapping any other range; otherwise
/// the update would read values another part of it has already changed.
pub(crate) fn check_update_ranges(ranges: &[(u64, u64)], op: &str) -> Result<()> {
    let mut written = Vec::with_capacity(ranges.len());
    for (i, four) in ranges.chunks(4).enumerate() {
        let n: Vec<u64> = four.iter().map(|(a, b)| (b - a) / 4).collect();
        if n.iter().any(|&k| k != n[0]) {
            bail!(
                "{op}: parameter {i} has {} values, its moments {} and {}, its gradient {}",
                n[0],
                n[1],
                n[2],
                n[3]
            );
        }
        written.extend(four[..3].iter().copied().filter(|(a, b)| a < b));
    }
    written.sort_unstable();
    if written.windows(2).any(|w| w[0].1 > w[1].0) {
        bail!("{op}: two parameters or moments share memory");
    }
    for &(a, end) in ranges.chunks(4).map(|four| &four[3]) {
        let before = written.partition_point(|w| w.0 < end);
        if a < end && before > 0 && written[before - 1].1 > a {
            bail!("{op}: a gradient shares memory with a parameter or a moment");
        }
    }
    Ok(())
}

/// The sum of the squares of each tensor's values, in f64: the square root of their total is
/// the global gradient norm of `torch.nn.utils.clip_grad_norm_`. On a GPU where clipcid's
/// kernels take the tensors (a `cuda` build, kernels on, all f32 on one GPU), one launch and
/// one copy to the host for all of them (f32 totals of chunks of 65,536 values, added in
/// f64 in order), where a sum per tensor waited for the GPU once per tensor; elsewhere per
/// tensor in f64.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
/// let b = Tensor::new(&[[1f32], [2.0]], &Device::Cpu)?;
/// assert_eq!(clipcid_kernels::cpu::squared_norms(&[&a, &b])?, vec![25.0, 5.0]);
/// # Ok(()) }
/// ```
pub fn squared_norms(ts: &[&Tensor]) -> Result<Vec<f64>> {
    #[cfg(feature = "cuda")]
    if let Some(first) = ts.first() {
        if crate::gpu_kernels_take(&[first])
            && ts.iter().all(|t| {
                t.dtype() == candle_core::DType::F32 && t.device().same_device(first.device())
            })
        {
            let c = ts
                .iter()
                .map(|t| t.contiguous())
                .collect::<Result<Vec<_>>>()?;
            return crate::cuda::squares_many(&c.iter().collect::<Vec<_>>());
        }
    }
    ts.iter()
        .map(|t| {
            t.to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()
        })
        .collect()
}

/// Whether [`adamw_update`] takes `t`'s device and dtype: f32 on the CPU, and on CUDA in a
/// `cuda` build (other tensors take `clipcid_train::AdamW`'s tensor-op formula).
///
/// ```
/// let p = candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu)?;
/// assert!(clipcid_kernels::cpu::adamw_runs_in_place(&p));
/// assert!(!clipcid_kernels::cpu::adamw_runs_in_place(&p.to_dtype(candle_core::DType::BF16)?));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn adamw_runs_in_place(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32
        && (t.device().is_cpu() || (cfg!(feature = "cuda") && t.device().is_cuda()))
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expected an f32 tensor")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&mut v[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// `acc = decay acc + (1 - decay) x` (or `x^2`), `x = g scale`.
struct Moment {
    decay: f64,
    square: bool,
    /// The gradient's factor.
    scale: f32,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "clipcid-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let acc = slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        if acc.len() != g.len() {
            bail!(
                "{}: moment of {} values for a gradient of {}",
                self.name(),
                acc.len(),
                g.len()
            );
        }
        let (d, rest) = (self.decay as f32, (1.0 - self.decay) as f32);
        let (square, scale) = (self.square, self.scale);
        pool::for_each_chunk_mut(acc, ELEMENTS_PER_TASK, |span, a| {
            let g = &g[span];
            math::simd(|| match square {
                false => a
                    .iter_mut()
                    .zip(g)
                    .for_each(|(a, &g)| *a = d * *a + rest * (g * scale)),
                true => a.iter_mut().zip(g).for_each(|(a, &g)| {
                    let x = g * scale;
                    *a = d * *a + rest * x * x
                }),
            })
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda::adamw_moment(s1, l1, s2, l2, self.decay, self.square, self.scale)
    }
}

/// The f32 scalars of one parameter update, the same on every device:
/// `p = p keep - lr (m inv_bias1) / (sqrt(v inv_bias2) + eps)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ApplyScalars {
    pub keep: f32,
    pub lr: f32,
    pub inv_bias1: f32,
    pub inv_bias2: f32,
    pub eps: f32,
}

impl AdamWStep {
    /// This step's [`ApplyScalars`] (decay factor and bias corrections in f64, then f32).
    fn scalars(&self) -> ApplyScalars {
        self.scalars_with_decay(self.weight_decay)
    }

    /// [`Self::scalars`] with another weight decay.
    pub(crate) fn scalars_with_decay(&self, weight_decay: f64) -> ApplyScalars {
        ApplyScalars {
            keep: (1.0 - self.lr * weight_decay) as f32,
            lr: self.lr as f32,
            inv_bias1: (1.0 / (1.0 - self.beta1.powi(self.step))) as f32,
            inv_bias2: (1.0 / (1.0 - self.beta2.powi(self.step))) as f32,
            eps: self.eps as f32,
        }
    }
}

/// The parameter update from the updated moments.
struct Apply(AdamWStep);

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "clipcid-adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let p = slice_mut(s1, l1, self.name())?;
        let m = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        if p.len() != m.len() || p.len() != v.len() {
            bail!("{}: parameter and moments differ in size", self.name());
        }
        let ApplyScalars {
            keep,
            lr,
            inv_bias1,
            inv_bias2,
            eps,
        } = self.0.scalars();
        pool::for_each_chunk_mut(p, ELEMENTS_PER_TASK, |span, p| {
            let (m, v) = (&m[span.clone()], &v[span]);
            math::simd(|| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let update = (m * inv_bias1) / ((v * inv_bias2).sqrt() + eps);
                    *p = *p * keep - lr * update;
                }
            })
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::adamw_apply(s1, l1, s2, l2, s3, l3, &self.0.scalars())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed setup step should panic
mod tests {
    use super::super::testing::randn;
    use super::*;

    /// A gradient of another size is an error naming both sizes (the formula itself is
    /// checked on every device in `tests/fused_ops.rs`).
    #[test]
    fn a_gradient_of_another_size_is_an_error() {
        let p = randn(&[7, 1000], 1);
        let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
        let e = adamw_update(
            &p,
            &randn(&[3], 1),
            &m,
            &v,
            AdamWStep {
                lr: 1.0,
                beta1: 0.9,
                beta2: 0.9,
                eps: 1e-8,
                weight_decay: 0.0,
                step: 1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("moment of 7000 values for a gradient of 3"),
            "{e}"
        );
    }
}
