//! AdamW's update in place, three streaming passes instead of a dozen tensor ops.
//!
//! Written with candle's tensor ops, one AdamW step over a 12 M-parameter student was about
//! twelve ops per parameter tensor, each allocating and writing a full-size result, and
//! candle runs its scalar ops (`affine`, `sqrt`, `sqr`) on one thread: 5% of a training step,
//! with the pool's other thread idle. Here the two moments and the parameter are updated in
//! place, each in one pass over candle's pool. On CUDA the same three passes are kernels
//! (see `clipcid_kernels::cuda`), and a whole optimizer step ([`adamw_update_many`], with
//! mixed precision's working copies) is one kernel; [`squared_norms`] gives the global
//! gradient norm that clipping needs.

use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};

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

/// One parameter of [`adamw_update_many`]: the tensors [`adamw_update`] takes, whether the
/// step's weight decay applies to it, and its working copy if it has one.
#[derive(Debug, Clone, Copy)]
pub struct AdamWParam<'a> {
    /// The parameter (f32), updated in place.
    pub param: &'a Tensor,
    /// Its gradient: f32, or bf16 / f16 (the gradient of a mixed-precision working copy).
    pub grad: &'a Tensor,
    /// Its first moment (f32), updated in place.
    pub m: &'a Tensor,
    /// Its second moment (f32), updated in place.
    pub v: &'a Tensor,
    /// Whether `weight_decay` applies (open_clip decays matrices only).
    pub decays: bool,
    /// A working copy (bf16 or f16, the parameter's size) that receives the updated
    /// parameter rounded to its dtype: the weights that a mixed-precision model computes
    /// with, refreshed in the update's own pass instead of cast anew each step.
    pub copy: Option<&'a Var>,
}

/// [`adamw_update`] for many parameters at once, each gradient multiplied by `grad_scale`
/// first (the factor of gradient clipping and of f16 loss scaling; 1 for neither), the step's
/// `weight_decay` applied only where [`AdamWParam::decays`], and each working copy
/// ([`AdamWParam::copy`]) set to its updated parameter, rounded. Same formula as
/// [`adamw_update`], same bits on every device.
///
/// On a GPU where clipcid's kernels take the tensors (a `cuda` build, kernels on, all on one
/// GPU), one kernel launch updates every parameter and its copy, reading their addresses from
/// a table: a CLIP student's step is about 300 parameter tensors, and three launches each were
/// 3.5 ms on an H200, for about 0.3 ms of memory traffic; the bf16 copies cost a cast per
/// tensor each step besides. Elsewhere, one [`adamw_update`] each, then the copy's cast.
/// Tensors it writes (parameters, moments, copies) must not share memory with any other of
/// its tensors: an error says so, before anything changes.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{DType, Device, Tensor, Var};
/// use clipcid_kernels::cpu::{adamw_update_many, AdamWParam, AdamWStep};
/// let dev = &Device::Cpu;
/// let (w, b) = (Tensor::new(&[[1f32, -1.0]], dev)?, Tensor::new(&[2f32], dev)?);
/// // The matrix computes in bf16 from a working copy, whose gradient is bf16 too.
/// let w16 = Var::from_tensor(&w.to_dtype(DType::BF16)?)?;
/// let gw = Tensor::new(&[[0.5f32, -2.0]], dev)?.to_dtype(DType::BF16)?;
/// let gb = Tensor::new(&[4f32], dev)?;
/// let moments = |t: &Tensor| Ok::<_, candle_core::Error>((t.zeros_like()?, t.zeros_like()?));
/// let ((mw, vw), (mb, vb)) = (moments(&w)?, moments(&b)?);
/// let step = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5, step: 1 };
/// adamw_update_many(
///     &[
///         AdamWParam { param: &w, grad: &gw, m: &mw, v: &vw, decays: true, copy: Some(&w16) },
///         AdamWParam { param: &b, grad: &gb, m: &mb, v: &vb, decays: false, copy: None },
///     ],
///     step,
///     0.5,
/// )?;
/// // The first step moves each value by lr against its gradient's sign; the matrix also
/// // decays by lr * weight_decay, the bias does not.
/// let (w, b) = (w.to_vec2::<f32>()?, b.to_vec1::<f32>()?);
/// assert!((w[0][0] - 0.85).abs() < 1e-6 && (w[0][1] + 0.85).abs() < 1e-6);
/// assert!((b[0] - 1.9).abs() < 1e-6);
/// // The copy holds the new matrix in bf16.
/// assert_eq!(w16.to_dtype(DType::F32)?.to_vec2::<f32>()?, [[0.8515625, -0.8515625]]);
/// # Ok(()) }
/// ```
pub fn adamw_update_many(
    params: &[AdamWParam<'_>],
    step: AdamWStep,
    grad_scale: f64,
) -> Result<()> {
    const OP: &str = "adamw_update_many";
    let grads = params
        .iter()
        .map(|p| p.grad.contiguous())
        .collect::<Result<Vec<_>>>()?;
    // Each parameter's tensors: parameter, moments, gradient, then its copy if any.
    let mut ts = Vec::with_capacity(5 * params.len());
    let mut groups = Vec::with_capacity(params.len());
    for (p, g) in params.iter().zip(&grads) {
        let k = ts.len();
        ts.extend([p.param, p.m, p.v, g]);
        ts.extend(p.copy.map(|c| c.as_tensor()));
        groups.push(k..ts.len());
    }
    let scale = grad_scale as f32;
    #[cfg(feature = "cuda")]
    if ts
        .first()
        .is_some_and(|t| t.device().is_cuda() && crate::gpu_kernels_take(&[t]))
    {
        // The kernel's own pass over the addresses runs the checks below.
        return crate::cuda::adamw_many(params, &ts, &groups, &step, scale);
    }
    let extents = extents(&ts, OP)?;
    let groups: Vec<&[Extent]> = groups.into_iter().map(|r| &extents[r]).collect();
    check_update_ranges(&groups, OP)?;
    for (p, g) in params.iter().zip(&grads) {
        let step = AdamWStep {
            weight_decay: if p.decays { step.weight_decay } else { 0.0 },
            ..step
        };
        // Widening a bf16 or f16 gradient to f32 is exact.
        update_scaled(p.param, &g.to_dtype(DType::F32)?, p.m, p.v, step, scale)?;
        if let Some(c) = p.copy {
            c.set(&p.param.to_dtype(c.dtype())?)?;
        }
    }
    Ok(())
}

/// Where a tensor's contiguous values lie (host or GPU memory) and how many there are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent {
    /// The first value's address.
    pub start: u64,
    /// One past the last value's last byte.
    pub end: u64,
    /// How many values.
    pub count: usize,
}

/// Each tensor's [`Extent`] (all on the CPU, or all on one GPU in a `cuda` build; f32, bf16
/// or f16, contiguous); otherwise an error.
fn extents(ts: &[&Tensor], op: &str) -> Result<Vec<Extent>> {
    #[cfg(feature = "cuda")]
    if ts.first().is_some_and(|t| t.device().is_cuda()) {
        return crate::cuda::extents(ts, op);
    }
    ts.iter()
        .map(|t| {
            let (storage, layout) = t.storage_and_layout();
            let candle_core::Storage::Cpu(s) = &*storage else {
                bail!("{op}: tensors on more than one device")
            };
            let Some((a, b)) = layout.contiguous_offsets() else {
                bail!("{op}: expected a contiguous tensor")
            };
            let (base, size) = match s {
                CpuStorage::F32(v) => (v.as_ptr() as u64, 4),
                CpuStorage::BF16(v) => (v.as_ptr() as u64, 2),
                CpuStorage::F16(v) => (v.as_ptr() as u64, 2),
                _ => bail!(
                    "{op}: expected f32, bf16 or f16 tensors, not {:?}",
                    t.dtype()
                ),
            };
            Ok(Extent {
                start: base + size * a as u64,
                end: base + size * b as u64,
                count: b - a,
            })
        })
        .collect()
}

/// Checks [`adamw_update_many`]'s tensors, given per parameter as the extents of the
/// parameter, its two moments, its gradient and its copy if any: all of one size, and no
/// tensor that the update writes (all but the gradient) overlapping any other; otherwise the
/// update would read values another part of it has already changed.
pub(crate) fn check_update_ranges(params: &[&[Extent]], op: &str) -> Result<()> {
    let mut written = Vec::with_capacity(5 * params.len());
    for (i, ts) in params.iter().enumerate() {
        if ts.iter().any(|t| t.count != ts[0].count) {
            let counts: Vec<usize> = ts.iter().map(|t| t.count).collect();
            bail!(
                "{op}: parameter {i} has {} values, its moments {} and {}, its gradient {}{}",
                counts[0],
                counts[1],
                counts[2],
                counts[3],
                counts
                    .get(4)
                    .map(|c| format!(", its copy {c}"))
                    .unwrap_or_default()
            );
        }
        written.extend(
            ts.iter()
                .enumerate()
                .filter(|&(k, t)| k != 3 && t.start < t.end)
                .map(|(_, t)| (t.start, t.end)),
        );
    }
    written.sort_unstable();
    if written.windows(2).any(|w| w[0].1 > w[1].0) {
        bail!("{op}: two parameters, moments or copies share memory");
    }
    for g in params.iter().map(|ts| ts[3]) {
        let before = written.partition_point(|w| w.0 < g.end);
        if g.start < g.end && before > 0 && written[before - 1].1 > g.start {
            bail!("{op}: a gradient shares memory with a parameter, a moment or a copy");
        }
    }
    Ok(())
}

/// The sum of the squares of each tensor's values, in f64: the square root of their total is
/// the global gradient norm of `torch.nn.utils.clip_grad_norm_`. On a GPU where clipcid's
/// kernels take the tensors (a `cuda` build, kernels on, all on one GPU in f32, bf16 or f16),
/// one launch and one copy to the host for all of them (f32 totals of chunks of 65,536
/// values, added in f64 in order), where a sum per tensor waited for the GPU once per tensor;
/// elsewhere per tensor in f64.
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
                matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
                    && t.device().same_device(first.device())
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
        .map(|t| t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>())
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
