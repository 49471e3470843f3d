//! The towers' activations, GELU (exact, through `erf`) and QuickGELU, as one pass each
//! forward and backward, plus in-place forms for inference.
//!
//! candle's `gelu_erf` calls a scalar `erf` per element and was 4.5% of a student forward's
//! profile; here both activations are vectorised polynomials ([`super::math`]). When no
//! gradient is needed the activation overwrites the linear layer's output it follows
//! ([`gelu_in_place`]), which saves a `[rows, 4W]` allocation and its page faults per layer.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, InplaceOp1, Layout, Result, Shape, Tensor,
};

use super::math::{gelu as gelu_fn, gelu_grad, sigmoid, simd, QUICK_GELU_ALPHA};
use super::{f32_slice, same_size_pair, ELEMENTS_PER_TASK};
use crate::pool;

/// A transformer MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x Φ(x)`, the exact GELU.
    Gelu,
    /// `x sigmoid(1.702 x)`, OpenAI CLIP's approximation.
    QuickGelu,
}

impl Activation {
    /// `out[i] = f(x[i])` over candle's pool, vectorised.
    pub(crate) fn forward(self, x: &[f32], out: &mut [f32]) {
        pool::for_each_chunk_mut(out, ELEMENTS_PER_TASK, |span, ys| {
            let xs = &x[span];
            match self {
                Activation::Gelu => {
                    simd(|| ys.iter_mut().zip(xs).for_each(|(o, &v)| *o = gelu_fn(v)))
                }
                Activation::QuickGelu => simd(|| {
                    ys.iter_mut()
                        .zip(xs)
                        .for_each(|(o, &v)| *o = v * sigmoid(QUICK_GELU_ALPHA * v))
                }),
            }
        });
    }

    /// `x[i] = f(x[i])` over candle's pool, vectorised.
    fn in_place(self, x: &mut [f32]) {
        pool::for_each_chunk_mut(x, ELEMENTS_PER_TASK, |_, xs| match self {
            Activation::Gelu => simd(|| xs.iter_mut().for_each(|v| *v = gelu_fn(*v))),
            Activation::QuickGelu => simd(|| {
                xs.iter_mut()
                    .for_each(|v| *v *= sigmoid(QUICK_GELU_ALPHA * *v))
            }),
        });
    }

    /// `dx[i] = g[i] f'(x[i])` over candle's pool, vectorised.
    pub(crate) fn backward(self, x: &[f32], g: &[f32], dx: &mut [f32]) {
        pool::for_each_chunk_mut(dx, ELEMENTS_PER_TASK, |span, out| {
            let (xs, gs) = (&x[span.clone()], &g[span]);
            match self {
                Activation::Gelu => simd(|| {
                    for ((o, &v), &gv) in out.iter_mut().zip(xs).zip(gs) {
                        *o = gv * gelu_grad(v);
                    }
                }),
                // d/dx x s(ax) = s + a x s (1 - s), with s = sigmoid(a x).
                Activation::QuickGelu => simd(|| {
                    for ((o, &v), &gv) in out.iter_mut().zip(xs).zip(gs) {
                        let s = sigmoid(QUICK_GELU_ALPHA * v);
                        *o = gv * (s + QUICK_GELU_ALPHA * v * s * (1.0 - s));
                    }
                }),
            }
        });
    }

    fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "clipcid-gelu",
            Activation::QuickGelu => "clipcid-quick-gelu",
        }
    }
}

/// `x Φ(x)`, GELU with the exact normal CDF (PyTorch's `nn.GELU()`, candle's `gelu_erf`;
/// f32, CPU), differentiable. Within 2e-7 of the f64 function.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y: Vec<f32> = clipcid_kernels::cpu::gelu(&x)?.to_vec1()?;
/// assert_eq!(y[1], 0.0);
/// assert!((y[2] - 1.954_5).abs() < 1e-4); // 2 Φ(2)
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActivationOp(Activation::Gelu))
}

/// `x * sigmoid(1.702 x)` (OpenAI CLIP's activation; f32, CPU), differentiable.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1(ActivationOp(Activation::QuickGelu))
}

/// [`gelu`] written over `x` itself, with no gradient: for inference, on a tensor that
/// nothing else reads (a linear layer's fresh output). `x` must be a contiguous f32 CPU
/// tensor.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[0f32, 2.0], &Device::Cpu)?;
/// clipcid_kernels::cpu::gelu_in_place(&x)?;
/// assert!((x.to_vec1::<f32>()?[1] - 1.954_5).abs() < 1e-4);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gelu_in_place(x: &Tensor) -> Result<()> {
    x.inplace_op1(&ActivationInPlace(Activation::Gelu))
}

/// [`quick_gelu`] written over `x` itself, with no gradient (see [`gelu_in_place`]).
pub fn quick_gelu_in_place(x: &Tensor) -> Result<()> {
    x.inplace_op1(&ActivationInPlace(Activation::QuickGelu))
}

struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        self.0.forward(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(activation_backward(self.0, arg, grad)?))
    }
}

/// The gradient of `act` at `x` times the output gradient `grad` (f32, CPU), outside candle's
/// autograd.
pub(crate) fn activation_backward(act: Activation, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &ActivationGrad(act))
}

/// `dx = g f'(x)` from the activation's input `x` and its output gradient `g`.
struct ActivationGrad(Activation);

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Gelu => "clipcid-gelu-grad",
            Activation::QuickGelu => "clipcid-quick-gelu-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = same_size_pair(self.name(), (s1, l1), (s2, l2))?;
        let mut dx = vec![0f32; x.len()];
        self.0.backward(x, g, &mut dx);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct ActivationInPlace(Activation);

impl InplaceOp1 for ActivationInPlace {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let CpuStorage::F32(v) = s else {
            bail!("{}: expected an f32 tensor", self.name())
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("{}: expected a contiguous tensor", self.name())
        };
        self.0.in_place(&mut v[start..end]);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed setup step should panic
mod tests {
    use super::super::testing::{compare, max_abs_diff, randn};
    use super::*;

    fn quick_gelu_ref(x: &Tensor) -> Result<Tensor> {
        x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
    }

    #[test]
    fn quick_gelu_matches_primitive_ops_forward_and_backward() {
        let x = (randn(&[5, 9000], 9) * 4.0).unwrap();
        let (dy, dg) = compare(&[x], |t| quick_gelu(&t[0]), |t| quick_gelu_ref(&t[0]));
        assert!(dy < 1e-5, "forward differs by {dy}");
        assert!(dg[0] < 1e-5, "gradient differs by {}", dg[0]);
    }

    #[test]
    fn gelu_matches_candles_erf_gelu_forward_and_backward() {
        // candle's `gelu_erf` in f64 is the reference (its backward included).
        let x = (randn(&[5, 9000], 10) * 4.0).unwrap();
        let (dy, dg) = compare(&[x], |t| gelu(&t[0]), |t| t[0].gelu_erf());
        assert!(dy < 2e-6, "forward differs by {dy}");
        assert!(dg[0] < 2e-6, "gradient differs by {}", dg[0]);
    }

    #[test]
    fn in_place_forms_equal_the_differentiable_ones() {
        let x = (randn(&[3, 5000], 11) * 3.0).unwrap();
        for (op, in_place) in [
            (
                gelu as fn(&Tensor) -> Result<Tensor>,
                gelu_in_place as fn(&Tensor) -> Result<()>,
            ),
            (quick_gelu, quick_gelu_in_place),
        ] {
            let y = op(&x).unwrap();
            let z = x.copy().unwrap();
            in_place(&z).unwrap();
            assert_eq!(max_abs_diff(&y, &z), 0.0);
        }
        // A strided view cannot be overwritten in place.
        let e = gelu_in_place(&x.t().unwrap()).unwrap_err().to_string();
        assert!(e.contains("contiguous"), "{e}");
    }
}
