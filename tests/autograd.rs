//! candle's backward pass as clipcid builds it: candle-core 0.11.1 with the patch in
//! `vendor/candle-core` (vendor/README.md), which stores the first gradient to reach a tensor
//! instead of adding it to a fresh tensor of zeros. These tests hold the patched rules to
//! central differences in f64, check that every gradient keeps what clipcid's kernels need
//! (contiguous, the tensor's shape and dtype), that a wrong gradient is still an error, and
//! that the patch is in the build at all.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var, D};

/// A loss over `a` `[3, 4]`, `b` `[4]` and `c` `[3, 4]` that sends gradients through every
/// kind of rule: fan-in (each input feeds many ops, `a` twice into one), the rules that
/// subtract (the right side of `-` and `/`, `neg`, `cos`, `tanh`, `recip`), broadcasts,
/// transposes, reshapes, both halves of concatenations along each dimension, a maximum,
/// a matrix product and element-wise functions.
fn loss(t: &[Tensor]) -> Result<Tensor> {
    let (a, b, c) = (&t[0], &t[1], &t[2]);
    let terms = [
        (a * c)?.exp()?,
        (a - c.cos()?)?.sqr()?,
        (a.tanh()? / (c.sqr()? + 1.0)?)?,
        a.broadcast_mul(b)?.neg()?,
        (a.broadcast_add(b)?.sqr()? + 0.5)?.recip()?,
        // One tensor on both sides of a subtraction: both of its rules reach `a`.
        a.sub(a)?.affine(3.0, 1.0)?,
        (c - a)?.sqr()?,
        a.t()?.matmul(c)?.t()?.sin()?,
        Tensor::cat(&[a, c], 0)?.narrow(0, 1, 4)?.sqr()?,
        Tensor::cat(&[c, a], 1)?.affine(0.3, 0.0)?.exp()?,
        c.reshape((4, 3))?
            .t()?
            .broadcast_mul(&a.max_keepdim(D::Minus1)?)?,
        (b.sqr()? + 1.0)?.sqrt()?.log()?.unsqueeze(0)?,
    ];
    let mut total = Tensor::zeros((), DType::F64, &Device::Cpu)?;
    for (i, term) in terms.iter().enumerate() {
        total = (total + (term.sum_all()? * (1.0 + 0.1 * i as f64))?)?;
    }
    Ok(total)
}

fn inputs() -> Result<Vec<Tensor>> {
    let values = |n: usize, seed: f64| -> Vec<f64> {
        (0..n)
            .map(|i| ((i as f64 + 1.0) * seed).sin() * 0.9)
            .collect()
    };
    Ok(vec![
        Tensor::from_vec(values(12, 1.3), (3, 4), &Device::Cpu)?,
        Tensor::from_vec(values(4, 2.1), 4, &Device::Cpu)?,
        Tensor::from_vec(values(12, 0.7), (3, 4), &Device::Cpu)?,
    ])
}

#[test]
fn every_gradient_equals_central_differences_in_f64() -> Result<()> {
    let xs = inputs()?;
    let vars = xs
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&tracked)?.backward()?;
    let h = 1e-5;
    for (k, var) in vars.iter().enumerate() {
        let g = grads
            .get(var)
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for input {k}")))?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let x = xs[k].flatten_all()?.to_vec1::<f64>()?;
        for i in 0..x.len() {
            let at = |d: f64| -> Result<f64> {
                let mut moved = x.clone();
                moved[i] += d;
                let mut ts = xs.clone();
                ts[k] = Tensor::from_vec(moved, xs[k].shape(), &Device::Cpu)?;
                loss(&ts)?.to_scalar::<f64>()
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            assert!(
                (g[i] - numeric).abs() <= 1e-6 * numeric.abs().max(1.0),
                "input {k}, value {i}: backward {} against central differences {numeric}",
                g[i]
            );
        }
    }
    Ok(())
}

#[test]
fn every_gradient_is_contiguous_with_its_tensors_shape_and_dtype() -> Result<()> {
    // Gradients that reach their tensors as views: a transpose, a broadcast (summed back), a
    // slice of a concatenation along each dimension, a permutation. clipcid's kernels (AdamW,
    // the gradient norm) read gradients as contiguous memory.
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let v = |shape: &[usize]| -> Result<Var> {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dtype)?)
        };
        let (w, bias, x, y, z) = (
            v(&[5, 3])?,
            v(&[3])?,
            v(&[2, 3])?,
            v(&[2, 4])?,
            v(&[2, 3, 4])?,
        );
        let rows = Tensor::randn(0f32, 1.0, (6, 5), &dev)?.to_dtype(dtype)?;
        let out = [
            rows.matmul(w.as_tensor())?
                .broadcast_add(bias.as_tensor())?,
            Tensor::cat(&[x.as_tensor(), y.as_tensor()], 1)?.repeat((3, 1))?,
            z.as_tensor().permute((2, 0, 1))?.reshape((4, 6))?,
        ];
        let mut total = Tensor::zeros((), dtype, &dev)?;
        for o in &out {
            total = (total + o.sqr()?.sum_all()?)?;
        }
        let grads = total.backward()?;
        for var in [&w, &bias, &x, &y, &z] {
            let g = grads
                .get(var)
                .ok_or_else(|| candle_core::Error::Msg("a gradient is missing".into()))?;
            assert!(
                g.is_contiguous(),
                "{dtype:?}: gradient of {:?} is a view",
                var.dims()
            );
            assert_eq!(g.dims(), var.dims(), "{dtype:?}");
            assert_eq!(g.dtype(), dtype);
        }
    }
    Ok(())
}

/// Returns a gradient one value short: a custom op with a broken backward pass.
struct ShortGradient;

impl CustomOp1 for ShortGradient {
    fn name(&self) -> &'static str {
        "short-gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((s.clone(), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.flatten_all()?.narrow(
            0,
            1,
            grad.elem_count() - 1,
        )?))
    }
}

#[test]
fn a_gradient_of_the_wrong_shape_is_still_an_error() -> Result<()> {
    // Candle's zeros-and-add refused a gradient that did not match its tensor; storing the
    // first gradient as it is must not start accepting one.
    let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
    let err = match x
        .as_tensor()
        .apply_op1(ShortGradient)?
        .sum_all()?
        .backward()
    {
        Ok(_) => panic!("a gradient of 2 values for a tensor of 3 was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("shape mismatch"), "{err}");
    Ok(())
}

fn cpu_address(t: &Tensor) -> Result<usize> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            Ok(v.as_ptr() as usize + 4 * layout.start_offset())
        }
        _ => candle_core::bail!("expected an f32 CPU tensor"),
    }
}

#[test]
fn the_first_gradient_of_a_tensor_is_stored_not_added_to_zeros() -> Result<()> {
    // The patch is in the build: in `x + y` both inputs receive the sum's gradient, which
    // candle 0.11.1 as published added to two fresh tensors of zeros (two copies) and the
    // patched copy stores as it is (one tensor, read-only like every candle tensor). If this
    // fails after a candle upgrade, the upgrade dropped the patch (vendor/README.md).
    let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    let y = Var::new(&[0.5f32, 4.0, -1.0], &Device::Cpu)?;
    let w = Tensor::new(&[2f32, 3.0, 5.0], &Device::Cpu)?;
    let grads = ((x.as_tensor() + y.as_tensor())? * &w)?
        .sum_all()?
        .backward()?;
    let (gx, gy) = match (grads.get(&x), grads.get(&y)) {
        (Some(gx), Some(gy)) => (gx, gy),
        _ => panic!("a gradient is missing"),
    };
    assert_eq!(gx.to_vec1::<f32>()?, [2.0, 3.0, 5.0]);
    assert_eq!(gy.to_vec1::<f32>()?, [2.0, 3.0, 5.0]);
    assert_eq!(cpu_address(gx)?, cpu_address(gy)?);
    Ok(())
}
