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
    let grad = grad.contiguous()?;
    m.inplace_op2(
        &grad,
        &Moment {
            decay: step.beta1,
            square: false,
        },
    )?;
    v.inplace_op2(
        &grad,
        &Moment {
            decay: step.beta2,
            square: true,
        },
    )?;
    param.inplace_op3(m, v, &Apply(step))
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

/// `acc = decay acc + (1 - decay) g` (or `g^2`).
struct Moment {
    decay: f64,
    square: bool,
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
        let square = self.square;
        pool::for_each_chunk_mut(acc, ELEMENTS_PER_TASK, |span, a| {
            let g = &g[span];
            math::simd(|| match square {
                false => a
                    .iter_mut()
                    .zip(g)
                    .for_each(|(a, &g)| *a = d * *a + rest * g),
                true => a
                    .iter_mut()
                    .zip(g)
                    .for_each(|(a, &g)| *a = d * *a + rest * g * g),
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
        crate::cuda::adamw_moment(s1, l1, s2, l2, self.decay, self.square)
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
        ApplyScalars {
            keep: (1.0 - self.lr * self.weight_decay) as f32,
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
