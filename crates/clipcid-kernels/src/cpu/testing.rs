//! Helpers for the kernels' tests: seeded inputs, and the comparison of a fused op with its
//! primitive-op reference in f64, forward and backward.
#![allow(clippy::unwrap_used)] // tests: a failed setup step should panic

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var, D};

use super::{AttentionSpec, Queries};

/// A standard-normal f32 tensor from a seed.
pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// [`crate::max_abs_diff`], panicking on error.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    crate::max_abs_diff(a, b).unwrap()
}

/// Forward values and the gradients of `sum(f(inputs) * r)` with respect to every input,
/// for the fused f32 op and the f64 reference; returns the largest difference of each.
pub(crate) fn compare(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> (f32, Vec<f32>) {
    let run = |dtype: DType, f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let r = randn(y.dims(), 99).to_dtype(dtype).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<Tensor> = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
        (y, g)
    };
    let (y1, g1) = run(DType::F32, &fused);
    let (y2, g2) = run(DType::F64, &reference);
    let gd = g1
        .iter()
        .zip(&g2)
        .map(|(a, b)| max_abs_diff(a, b))
        .collect();
    (max_abs_diff(&y1, &y2), gd)
}

/// Checks the autograd gradient of `sum(f(x) * r)` (for a seeded `r`) with respect to `x`
/// against central differences of step `h` at the elements `at`, to within `tol`.
pub(crate) fn check_gradient_by_finite_differences(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
    at: &[usize],
    h: f32,
    tol: f64,
) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor()).unwrap();
    let r = randn(y.dims(), 98);
    let loss = |x: &Tensor| -> f64 {
        let y = f(x).unwrap();
        (y * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    for &i in at {
        let moved = |delta: f32| {
            let mut v = xs.clone();
            v[i] += delta;
            Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap()
        };
        let fd = (loss(&moved(h)) - loss(&moved(-h))) / (2.0 * h as f64);
        assert!(
            (fd - g[i] as f64).abs() < tol,
            "element {i}: analytic {} vs finite differences {fd}",
            g[i]
        );
    }
}

/// Attention from candle's primitive ops (head split, batched products, masked softmax,
/// merge), run in f64 by the comparisons.
pub(crate) fn attention_ref(qkv: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    let (rows, w3) = qkv.dims2()?;
    let t = spec.positions;
    let b = rows / t;
    let qkv = qkv.reshape((b, t, w3))?;
    let (w, heads) = (w3 / 3, spec.heads);
    let d = w / heads;
    let split = |i: usize| -> Result<Tensor> {
        qkv.narrow(2, i * w, w)?
            .reshape((b, t, heads, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = (split(0)? * (d as f64).powf(-0.5))?;
    let (k, v) = (split(1)?, split(2)?);
    let mut s = q.matmul(&k.t()?.contiguous()?)?;
    if spec.causal {
        let mask: Vec<f64> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), qkv.device())?.to_dtype(s.dtype())?;
        s = s.broadcast_add(&mask)?;
    }
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let y = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, w))?;
    match spec.queries {
        Queries::All => y.reshape((b * t, w)),
        Queries::First => y.i((.., 0, ..))?.contiguous(),
    }
}
