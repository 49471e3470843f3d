//! The fused ops against candle's primitive-op formulas on every available device (the CPU;
//! a GPU in a `cuda` build, in f32, bf16 and f16): layer norm and softmax with the gradients of
//! all their inputs, multi-head attention with its q/k/v gradient, and AdamW's in-place
//! step. On the CPU these are the CPU kernels; on a GPU clipcid's CUDA kernels
//! (`clipcid_kernels::cuda`).
#![allow(clippy::unwrap_used)] // tests: a failed setup step should panic

use candle_core::{DType, Device, Result, Tensor, Var, D};
use clipcid_kernels::{available_devices, cpu};
use rand::SeedableRng;
use rand_distr::Distribution;

/// Seeded standard-normal f32 values on `dev`.
fn randn(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

/// Largest `|a - b|` relative to the largest `|b|` (at least 1), compared on the CPU in f32.
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    clipcid_kernels::max_abs_diff(&a, &b).unwrap() / scale.max(1.0)
}

/// The dtypes each device's kernels take.
fn dtypes(dev: &Device) -> Vec<DType> {
    if dev.is_cuda() {
        vec![DType::F32, DType::BF16, DType::F16]
    } else {
        vec![DType::F32]
    }
}

/// f32 results agree to rounding; bf16 ones to bf16's 8 bits of mantissa (f16 has 11).
fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// Layer norm written with candle's primitive ops, in f32.
fn layer_norm_formula(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Runs `f` on Vars made from `inputs` (cast to `dtype`) and returns its output and the
/// gradients of `sum(f(inputs) * r)` with respect to each input, all in f32.
fn value_and_grads(
    inputs: &[Tensor],
    r: &Tensor,
    dtype: DType,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let loss = (y.to_dtype(DType::F32).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        })
        .collect();
    (y.to_dtype(DType::F32).unwrap(), gs)
}

/// 300 rows (not a multiple of the CUDA column kernel's 64-row chunks) of width 200 (not a
/// multiple of a warp or a block; the CUDA forward's warp-per-row form) and 1100 (its
/// block-per-row form).
#[test]
fn layer_norm_and_its_gradients_match_the_formula_on_every_device() {
    for dev in available_devices() {
        for (dtype, width) in dtypes(&dev).into_iter().flat_map(|t| [(t, 200), (t, 1100)]) {
            let x = randn(&[3, 100, width], 1, &dev).affine(3.0, 0.5).unwrap();
            let w = (randn(&[width], 2, &dev) + 1.0).unwrap();
            let b = randn(&[width], 3, &dev);
            let r = randn(&[3, 100, width], 4, &dev);
            let inputs = [x, w, b];
            let (y, g) = value_and_grads(&inputs, &r, dtype, |t| {
                cpu::layer_norm(&t[0], &t[1], &t[2], 1e-5)
            });
            // The reference: the same bf16-rounded inputs, all arithmetic in f32.
            let rounded: Vec<Tensor> = inputs
                .iter()
                .map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
                .collect();
            let (y_ref, g_ref) = value_and_grads(&rounded, &r, DType::F32, |t| {
                layer_norm_formula(&t[0], &t[1], &t[2], 1e-5)
            });
            let tol = tolerance(dtype);
            let d = relative_diff(&y, &y_ref);
            assert!(d <= tol, "{dev:?} {dtype:?}: output differs by {d}");
            for (name, (a, b)) in ["x", "scale", "shift"].iter().zip(g.iter().zip(&g_ref)) {
                let d = relative_diff(a, b);
                assert!(
                    d <= tol,
                    "{dev:?} {dtype:?}: gradient of {name} differs by {d}"
                );
            }
        }
    }
}

/// Rows of 77 (the text tower's attention) and of 50 (the image tower's), with a causal
/// mask's -inf entries in the first.
#[test]
fn softmax_and_its_gradient_match_the_formula_on_every_device() {
    for dev in available_devices() {
        for dtype in dtypes(&dev) {
            for n in [77usize, 50] {
                let mut x = (randn(&[2, 8, n, n], 5, &dev) * 4.0).unwrap();
                if n == 77 {
                    let mask: Vec<f32> = (0..n * n)
                        .map(|k| {
                            if k % n > k / n {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, (n, n), &dev).unwrap();
                    x = x.broadcast_add(&mask).unwrap();
                }
                let r = randn(&[2, 8, n, n], 6, &dev);
                let (y, g) =
                    value_and_grads(&[x.clone()], &r, dtype, |t| cpu::softmax_last_dim(&t[0]));
                let rounded = x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let (y_ref, g_ref) = value_and_grads(&[rounded], &r, DType::F32, |t| {
                    let max = t[0].max_keepdim(D::Minus1)?;
                    let e = t[0].broadcast_sub(&max)?.exp()?;
                    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
                });
                let tol = tolerance(dtype);
                let d = relative_diff(&y, &y_ref);
                assert!(d <= tol, "{dev:?} {dtype:?} n={n}: output differs by {d}");
                let d = relative_diff(&g[0], &g_ref[0]);
                assert!(d <= tol, "{dev:?} {dtype:?} n={n}: gradient differs by {d}");
            }
        }
    }
}

/// Step `t` of the tests' AdamW (lr 1e-2, betas 0.9 and 0.98, eps 1e-6).
fn adamw_step(t: i32, weight_decay: f64) -> cpu::AdamWStep {
    cpu::AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay,
        step: t,
    }
}

/// Three in-place steps against the tensor-op formula (f32, with weight decay).
#[test]
fn adamw_in_place_matches_the_formula_on_every_device() {
    for dev in available_devices() {
        let p = randn(&[7, 1000], 1, &dev);
        assert!(cpu::adamw_runs_in_place(&p), "{dev:?}");
        let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
        let (mut pr, mut mr, mut vr) = (p.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
        for t in 1..=3 {
            let g = randn(&[7, 1000], 10 + t as u64, &dev);
            let s = adamw_step(t, 0.1);
            cpu::adamw_update(&p, &g, &m, &v, s).unwrap();
            mr = ((&mr * s.beta1).unwrap() + (&g * (1.0 - s.beta1)).unwrap()).unwrap();
            vr =
                ((&vr * s.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - s.beta2)).unwrap()).unwrap();
            let b1 = 1.0 - s.beta1.powi(t);
            let b2 = 1.0 - s.beta2.powi(t);
            let upd = ((&mr / b1).unwrap()
                / ((&vr / b2).unwrap().sqrt().unwrap() + s.eps).unwrap())
            .unwrap();
            pr = ((&pr * (1.0 - s.lr * s.weight_decay)).unwrap() - (upd * s.lr).unwrap()).unwrap();
        }
        for (name, a, b) in [("m", &m, &mr), ("v", &v, &vr), ("param", &p, &pr)] {
            let d = relative_diff(a, b);
            assert!(d <= 1e-6, "{dev:?}: {name} differs by {d}");
        }
    }
}

/// A step over many parameters at once (one launch on a GPU) against one `adamw_update` per
/// parameter on the CPU with the gradients widened to f32 and scaled beforehand and the
/// working copies cast afterwards: the same bits on every device, parameters and copies, for
/// sizes that cross the GPU kernel's chunks of 65,536 values, with and without weight decay,
/// f32, bf16 and f16 gradients, and bf16 and f16 copies; and `adamw_update` alone gives the
/// CPU's bits on every device too.
#[test]
fn adamw_for_many_parameters_gives_the_cpus_bits_on_every_device() {
    use DType::{BF16, F16, F32};
    // (shape, gradient dtype, working copy's dtype)
    let params: [(&[usize], DType, Option<DType>); 4] = [
        (&[300, 257], F32, None),
        (&[70_000], BF16, Some(BF16)),
        (&[7], F16, Some(F16)),
        (&[65_536], F32, Some(BF16)),
    ];
    let scale = 0.37;
    let decay = |i: usize| if i.is_multiple_of(2) { 0.1 } else { 0.0 };
    let bits = |ts: &[Tensor]| -> Vec<Vec<u32>> {
        ts.iter()
            .map(|t| {
                let v = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
                let v = v.to_dtype(F32).unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    };
    // Per parameter: the parameter, its moments and its copy (the parameter itself if none).
    let start = |dev: &Device| -> Vec<[Tensor; 4]> {
        params
            .iter()
            .enumerate()
            .map(|(i, (shape, _, copy))| {
                let p = randn(shape, i as u64, dev);
                let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
                let c = match copy {
                    Some(d) => Var::from_tensor(&p.to_dtype(*d).unwrap()).unwrap(),
                    None => Var::from_tensor(&p).unwrap(),
                };
                [p, m, v, c.as_tensor().clone()]
            })
            .collect()
    };
    let grads = |t: i32, dev: &Device| -> Vec<Tensor> {
        params
            .iter()
            .enumerate()
            .map(|(i, (shape, dtype, _))| {
                let g = randn(shape, 100 * t as u64 + i as u64, dev);
                g.to_dtype(*dtype).unwrap()
            })
            .collect()
    };
    // One adamw_update per parameter, then the copy's cast.
    let one_by_one = |state: &[[Tensor; 4]], g: &[Tensor], t: i32| {
        for (i, ([p, m, v, _], g)) in state.iter().zip(g).enumerate() {
            let g = (g.to_dtype(F32).unwrap() * scale).unwrap();
            cpu::adamw_update(p, &g, m, v, adamw_step(t, decay(i))).unwrap();
        }
    };
    let copies = |state: &[[Tensor; 4]]| -> Vec<Tensor> {
        state
            .iter()
            .zip(&params)
            .map(|([p, ..], (_, _, copy))| p.to_dtype(copy.unwrap_or(F32)).unwrap())
            .collect()
    };
    let reference = start(&Device::Cpu);
    for t in 1..=3 {
        one_by_one(&reference, &grads(t, &Device::Cpu), t);
    }
    let want_params = bits(
        &reference
            .iter()
            .flat_map(|s| s[..3].to_vec())
            .collect::<Vec<_>>(),
    );
    let want_copies = bits(&copies(&reference));
    for dev in available_devices() {
        let many = start(&dev);
        let separate = start(&dev);
        for t in 1..=3 {
            let g = grads(t, &dev);
            let copy_vars: Vec<Option<Var>> = many
                .iter()
                .zip(&params)
                .map(|(s, (_, _, copy))| copy.map(|_| Var::from_tensor(&s[3]).unwrap()))
                .collect();
            let update: Vec<cpu::AdamWParam> = many
                .iter()
                .zip(&g)
                .zip(&copy_vars)
                .enumerate()
                .map(|(i, (([p, m, v, _], g), c))| cpu::AdamWParam {
                    param: p,
                    grad: g,
                    m,
                    v,
                    decays: i.is_multiple_of(2),
                    copy: c.as_ref(),
                })
                .collect();
            cpu::adamw_update_many(&update, adamw_step(t, 0.1), scale).unwrap();
            one_by_one(&separate, &g, t);
        }
        let got: Vec<Tensor> = many.iter().flat_map(|s| s[..3].to_vec()).collect();
        assert!(bits(&got) == want_params, "{dev:?}: adamw_update_many");
        let got_copies: Vec<Tensor> = many
            .iter()
            .zip(&params)
            .map(|(s, (_, _, copy))| {
                if copy.is_some() {
                    s[3].clone()
                } else {
                    s[0].clone()
                }
            })
            .collect();
        assert!(bits(&got_copies) == want_copies, "{dev:?}: working copies");
        let got: Vec<Tensor> = separate.iter().flat_map(|s| s[..3].to_vec()).collect();
        assert!(bits(&got) == want_params, "{dev:?}: adamw_update");
    }
}

/// `adamw_update_many` refuses, on every device, tensors of different sizes within one
/// parameter (a working copy's included) and tensors it writes that share memory, naming the
/// problem, and changes nothing.
#[test]
fn adamw_for_many_parameters_refuses_mismatched_or_shared_tensors() {
    let s = adamw_step(1, 0.0);
    for dev in available_devices() {
        let p = randn(&[4, 5], 1, &dev);
        let before = p.copy().unwrap();
        let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
        let g = randn(&[4, 5], 2, &dev);
        let short = randn(&[3], 3, &dev);
        let one = |grad, m, v| cpu::AdamWParam {
            param: &p,
            grad,
            m,
            v,
            decays: false,
            copy: None,
        };
        // A copy of another size, and a copy that is the parameter's own storage.
        let small = Var::from_tensor(&short.to_dtype(DType::BF16).unwrap()).unwrap();
        let same = Var::from_tensor(&p).unwrap();
        let with_copy = |param, copy| cpu::AdamWParam {
            param,
            copy: Some(copy),
            ..one(&g, &m, &v)
        };
        let cases = [
            (one(&short, &m, &v), "its gradient 3"),
            (one(&g, &m, &m), "share memory"),
            (one(&m, &m, &v), "shares memory"),
            (with_copy(&p, &small), "its copy 3"),
            (with_copy(same.as_tensor(), &same), "share memory"),
        ];
        for (param, want) in cases {
            let e = cpu::adamw_update_many(&[param], s, 1.0)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{dev:?}: {e}");
        }
        // Two parameters that are one tensor.
        let twice = [one(&g, &m, &v), one(&g, &m, &v)];
        let e = cpu::adamw_update_many(&twice, s, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("share memory"), "{dev:?}: {e}");
        assert_eq!(clipcid_kernels::max_abs_diff(&p, &before).unwrap(), 0.0);
    }
}

/// Each tensor's sum of squares (one launch on a GPU) against an f64 sum on the CPU, for
/// sizes that cross the GPU kernel's chunks, a strided view, an empty tensor, bf16 and f16.
#[test]
fn squared_norms_match_an_f64_sum_on_every_device() {
    for dev in available_devices() {
        let a = randn(&[70_000], 1, &dev);
        let b = randn(&[33, 65], 2, &dev);
        let c = randn(&[0], 3, &dev);
        let d = randn(&[40, 3], 4, &dev).t().unwrap();
        let e = randn(&[1000], 5, &dev).to_dtype(DType::BF16).unwrap();
        let f = randn(&[999], 6, &dev).to_dtype(DType::F16).unwrap();
        let all = [&a, &b, &c, &d, &e, &f];
        let got = cpu::squared_norms(&all).unwrap();
        for (t, got) in all.into_iter().zip(got) {
            let v = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
            let want: f64 = v
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum();
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1.0),
                "{dev:?}: {got} vs {want}"
            );
        }
    }
}

/// The bias kernels (CUDA only) against candle's broadcast formula, values and gradients of
/// both inputs, over rows that are not a multiple of the column-sum chunk and a width that
/// is not a multiple of a warp.
#[cfg(feature = "cuda")]
#[test]
fn bias_kernels_and_their_gradients_match_the_formula_on_every_gpu() {
    use clipcid_kernels::cuda::{bias_add, bias_quick_gelu};
    let gpus: Vec<Device> = available_devices()
        .into_iter()
        .filter(|d| d.is_cuda())
        .collect();
    if gpus.is_empty() {
        eprintln!("no GPU here: the bias kernels are checked where one is");
    }
    for dev in gpus {
        for dtype in dtypes(&dev) {
            let x = randn(&[3, 100, 200], 7, &dev).affine(2.0, 0.0).unwrap();
            let b = randn(&[200], 8, &dev);
            let r = randn(&[3, 100, 200], 9, &dev);
            let rounded: Vec<Tensor> = [&x, &b]
                .iter()
                .map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
                .collect();
            type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;
            let cases: [(&str, Op, Op); 2] = [
                ("bias_add", bias_add, |x, b| x.broadcast_add(b)),
                ("bias_quick_gelu", bias_quick_gelu, |x, b| {
                    let h = x.broadcast_add(b)?;
                    let s = ((h.affine(-1.702, 0.0)?.exp()? + 1.0)?).recip()?;
                    h * s
                }),
            ];
            for (name, fused, formula) in cases {
                let (y, g) =
                    value_and_grads(&[x.clone(), b.clone()], &r, dtype, |t| fused(&t[0], &t[1]));
                let (y_ref, g_ref) =
                    value_and_grads(&rounded, &r, DType::F32, |t| formula(&t[0], &t[1]));
                let tol = tolerance(dtype);
                let d = relative_diff(&y, &y_ref);
                assert!(d <= tol, "{name} {dtype:?}: output differs by {d}");
                for (input, (a, e)) in ["x", "b"].iter().zip(g.iter().zip(&g_ref)) {
                    let d = relative_diff(a, e);
                    assert!(
                        d <= tol,
                        "{name} {dtype:?}: gradient of {input} differs by {d}"
                    );
                }
            }
        }
    }
}

/// The bias-and-residual kernel (CUDA only) against `x + b + r`, values and the gradients of
/// all three inputs.
#[cfg(feature = "cuda")]
#[test]
fn bias_residual_and_its_gradients_match_the_formula_on_every_gpu() {
    for dev in available_devices().into_iter().filter(|d| d.is_cuda()) {
        for dtype in dtypes(&dev) {
            let inputs = [
                randn(&[300, 200], 15, &dev),
                randn(&[200], 16, &dev),
                randn(&[300, 200], 17, &dev),
            ];
            let r = randn(&[300, 200], 18, &dev);
            let (y, g) = value_and_grads(&inputs, &r, dtype, |t| {
                clipcid_kernels::cuda::bias_residual_add(&t[0], &t[1], &t[2])
            });
            let rounded: Vec<Tensor> = inputs
                .iter()
                .map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
                .collect();
            let (y_ref, g_ref) = value_and_grads(&rounded, &r, DType::F32, |t| {
                t[0].broadcast_add(&t[1])? + &t[2]
            });
            let tol = tolerance(dtype);
            let d = relative_diff(&y, &y_ref);
            assert!(d <= tol, "{dtype:?}: output differs by {d}");
            for (input, (a, e)) in ["x", "b", "r"].iter().zip(g.iter().zip(&g_ref)) {
                let d = relative_diff(a, e);
                assert!(d <= tol, "{dtype:?}: gradient of {input} differs by {d}");
            }
        }
    }
}

/// The head split (CUDA only) is exactly candle's `transpose(1, 2)` copy, and so is its
/// gradient, for odd sizes in f32, bf16 and f16.
#[cfg(feature = "cuda")]
#[test]
fn head_split_is_a_transpose_with_its_gradient_on_every_gpu() {
    for dev in available_devices().into_iter().filter(|d| d.is_cuda()) {
        for dtype in dtypes(&dev) {
            let x = randn(&[3, 7, 5, 11], 10, &dev);
            let r = randn(&[3, 5, 7, 11], 11, &dev);
            let (y, g) = value_and_grads(std::slice::from_ref(&x), &r, dtype, |t| {
                clipcid_kernels::cuda::swap_middle_dims(&t[0])
            });
            let (y_ref, g_ref) =
                value_and_grads(&[x], &r, dtype, |t| t[0].transpose(1, 2)?.contiguous());
            assert_eq!(y.dims(), [3, 5, 7, 11]);
            assert_eq!(relative_diff(&y, &y_ref), 0.0, "{dtype:?}");
            assert_eq!(relative_diff(&g[0], &g_ref[0]), 0.0, "{dtype:?}");
        }
    }
}

/// The patch matrix (CUDA only) is exactly the six-dimensional permute it replaces, and so
/// is its gradient, in f32, bf16 and f16.
#[cfg(feature = "cuda")]
#[test]
fn patch_matrix_is_the_permute_with_its_gradient_on_every_gpu() {
    for dev in available_devices().into_iter().filter(|d| d.is_cuda()) {
        for dtype in dtypes(&dev) {
            let (b, c, s, p) = (2, 3, 12, 4);
            let g = s / p;
            let x = randn(&[b, c, s, s], 12, &dev);
            let r = randn(&[b * g * g, c * p * p], 13, &dev);
            let (y, grad) = value_and_grads(std::slice::from_ref(&x), &r, dtype, |t| {
                clipcid_kernels::cuda::patchify(&t[0], p)
            });
            let (y_ref, grad_ref) = value_and_grads(&[x], &r, dtype, |t| {
                t[0].reshape((b, c, g, p, g, p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .reshape((b * g * g, c * p * p))
            });
            assert_eq!(relative_diff(&y, &y_ref), 0.0, "{dtype:?}");
            assert_eq!(relative_diff(&grad[0], &grad_ref[0]), 0.0, "{dtype:?}");
        }
        let odd = randn(&[1, 3, 10, 10], 14, &dev);
        assert!(clipcid_kernels::cuda::patchify(&odd, 4).is_err());
    }
}

/// Multi-head attention written with candle's primitive ops, in f32: q/k/v rows `[B * t, 3W]`
/// to `[B * tq, W]` (`tq` = 1 for the class-token query alone).
fn attention_formula(qkv: &Tensor, spec: cpu::AttentionSpec) -> Result<Tensor> {
    let (rows, w3) = qkv.dims2()?;
    let (t, h) = (spec.positions, spec.heads);
    let (b, w) = (rows / t, w3 / 3);
    let d = w / h;
    let x = qkv.reshape((b, t, 3, h, d))?;
    let part = |k: usize| x.narrow(2, k, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let mut s = (q.matmul(&k.t()?.contiguous()?)? * (d as f64).powf(-0.5))?;
    if spec.causal {
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        s = s.broadcast_add(&Tensor::from_vec(mask, (t, t), qkv.device())?)?;
    }
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let y = p.matmul(&v)?;
    let (y, tq) = match spec.queries {
        cpu::Queries::All => (y, t),
        cpu::Queries::First => (y.narrow(2, 0, 1)?, 1),
    };
    y.transpose(1, 2)?.contiguous()?.reshape((b * tq, w))
}

/// Attention and its q/k/v gradient against the formula: the image tower's 50 positions, the
/// text tower's 77 under the causal mask, the class-token query alone, a head size that is
/// no multiple of a warp, and (on a GPU) 200 positions, whose rows need more than the 48 KiB
/// of shared memory a kernel gets without opting in. On a GPU bf16 runs twice: on the
/// tensor-core kernels (heads of 32 and 64, up to 80 positions, tile edges at 16, 64 and 80)
/// and on the f32-arithmetic ones.
#[test]
fn attention_and_its_gradient_match_the_formula_on_every_device() {
    use cpu::Queries::{All, First};
    // (batch, positions, heads, head size, causal, queries)
    let cases = [
        (2, 50, 3, 64, false, All),
        (2, 50, 3, 64, false, First),
        (3, 77, 2, 64, true, All),
        (5, 7, 3, 20, true, First),
        (2, 9, 2, 36, true, All),
        (2, 200, 1, 64, false, All),
        (2, 50, 4, 32, false, All),
        (3, 33, 2, 32, true, First),
        (2, 64, 2, 64, true, All),
        (2, 80, 2, 32, false, All),
        (4, 16, 2, 64, true, All),
    ];
    let mut runs: Vec<(Device, DType, bool)> = Vec::new();
    for dev in available_devices() {
        for dtype in dtypes(&dev) {
            runs.push((dev.clone(), dtype, true));
            if dtype == DType::BF16 {
                runs.push((dev.clone(), dtype, false));
            }
        }
    }
    for (dev, dtype, tensor_cores) in runs {
        #[cfg(feature = "cuda")]
        clipcid_kernels::cuda::set_attention_tensor_cores(tensor_cores);
        for (seed, &(b, t, h, d, causal, queries)) in cases.iter().enumerate() {
            let spec = cpu::AttentionSpec {
                positions: t,
                heads: h,
                causal,
                queries,
            };
            #[cfg(feature = "cuda")]
            if dev.is_cuda() {
                assert!(
                    clipcid_kernels::cuda::attention_fits(&dev, t, d),
                    "{spec:?}"
                );
            }
            let qkv = (randn(&[b * t, 3 * h * d], 20 + seed as u64, &dev) * 1.5).unwrap();
            let tq = if queries == All { t } else { 1 };
            let r = randn(&[b * tq, h * d], 40 + seed as u64, &dev);
            let (y, g) = value_and_grads(std::slice::from_ref(&qkv), &r, dtype, |x| {
                cpu::attention(&x[0], spec)
            });
            let rounded = qkv.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let (y_ref, g_ref) = value_and_grads(&[rounded], &r, DType::F32, |x| {
                attention_formula(&x[0], spec)
            });
            let tol = tolerance(dtype);
            let e = relative_diff(&y, &y_ref);
            assert!(
                e <= tol,
                "{dev:?} {dtype:?} {spec:?} (tensor cores {tensor_cores}): output differs \
                 by {e}"
            );
            let e = relative_diff(&g[0], &g_ref[0]);
            assert!(
                e <= tol,
                "{dev:?} {dtype:?} {spec:?} (tensor cores {tensor_cores}): gradient \
                 differs by {e}"
            );
        }
    }
    #[cfg(feature = "cuda")]
    clipcid_kernels::cuda::set_attention_tensor_cores(true);
}

/// A transformer block as one autograd node built from tensor ops
/// (`cpu::transformer_block_by_ops`, a trainable GPU layer's path under
/// `cuda::set_block_node`) against the CPU block op on slices: the output and the gradients of
/// the input and of the packed parameters, for the text tower's causal 77 positions in heads
/// of 64 (tensor-core attention in bf16 on a GPU) and the class-token query alone over 50, on
/// every device and dtype.
#[test]
fn block_by_ops_matches_the_cpu_block_op_on_every_device() {
    use cpu::Queries::{All, First};
    let (w, m, heads) = (128, 256, 2);
    let cpu_dev = Device::Cpu;
    // (batch, positions, causal, queries)
    for (seed, &(b, t, causal, queries)) in [(2, 77, true, All), (3, 50, false, First)]
        .iter()
        .enumerate()
    {
        let seed = 100 * (seed as u64 + 1);
        let n = |shape: &[usize], k: u64, scale: f64| randn(shape, seed + k, &cpu_dev) * scale;
        let ln = |k: u64| (n(&[w], k, 0.1).unwrap() + 1.0).unwrap();
        let small = |shape: &[usize], k: u64| n(shape, k, 0.05).unwrap();
        let tensors = [
            ln(1),
            small(&[w], 2),
            small(&[w, w], 3),
            small(&[w], 4),
            small(&[w, w], 5),
            small(&[w], 6),
            small(&[w, w], 7),
            small(&[w], 8),
            small(&[w, w], 9),
            small(&[w], 10),
            ln(11),
            small(&[w], 12),
            small(&[m, w], 13),
            small(&[m], 14),
            small(&[w, m], 15),
            small(&[w], 16),
        ];
        let p = &tensors;
        let params = cpu::pack_block_params(&cpu::BlockParams {
            ln1: (&p[0], &p[1]),
            q: (&p[2], &p[3]),
            k: (&p[4], &p[5]),
            v: (&p[6], &p[7]),
            out: (&p[8], &p[9]),
            ln2: (&p[10], &p[11]),
            fc1: (&p[12], &p[13]),
            fc2: (&p[14], &p[15]),
        })
        .unwrap();
        let spec = cpu::BlockSpec {
            attention: cpu::AttentionSpec {
                positions: t,
                heads,
                causal,
                queries,
            },
            activation: cpu::Activation::QuickGelu,
            eps: 1e-5,
        };
        let x = randn(&[b * t, w], seed, &cpu_dev);
        let rows = if queries == All { b * t } else { b };
        let r = randn(&[rows, w], seed + 50, &cpu_dev);
        for dev in available_devices() {
            for dtype in dtypes(&dev) {
                let round = |v: &Tensor| v.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let (y_ref, g_ref) =
                    value_and_grads(&[round(&x), round(&params)], &r, DType::F32, |v| {
                        cpu::transformer_block(&v[0], &v[1], spec)
                    });
                let on = |v: &Tensor| v.to_device(&dev).unwrap();
                let (y, g) = value_and_grads(&[on(&x), on(&params)], &on(&r), dtype, |v| {
                    cpu::transformer_block_by_ops(&v[0], &v[1], spec)
                });
                // bf16 rounds every activation and product input along the block's dozen steps.
                let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
                let e = relative_diff(&y, &y_ref);
                assert!(
                    e <= tol,
                    "{dev:?} {dtype:?} {spec:?}: output differs by {e}"
                );
                for (name, a, b) in [("input", &g[0], &g_ref[0]), ("parameter", &g[1], &g_ref[1])] {
                    let e = relative_diff(a, b);
                    assert!(
                        e <= tol,
                        "{dev:?} {dtype:?} {spec:?}: {name} gradient differs by {e}"
                    );
                }
            }
        }
    }
}

/// `gather_rows` and `gather_rows_backward` on every device, in f32, bf16 and f16: the rows
/// are `index_select`'s; the backward pass gives the same bits on every device, and agrees
/// with f32 `index_add` (the same bits where no row is read more than 64 times, which it adds
/// in the same order; to rounding where one row is read 300 times, in pieces of 64; in bf16
/// and f16, to one rounding of the f32 sums of the same half-precision output gradient, where
/// their own `index_add` rounds after every addition); the table's gradient through autograd is
/// `gather_rows_backward`'s where clipcid's GPU kernels take the table, `index_select`'s
/// elsewhere; an id outside the table is an error naming it.
#[test]
fn gathered_rows_and_their_gradient_match_index_select_on_every_device() {
    let (n, w) = (50, 70);
    let cpu_dev = Device::Cpu;
    let table = randn(&[n, w], 7, &cpu_dev);
    // Rows below 43 read up to five times each (43..50 never), then row 5 300 more times.
    let spread: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 43).collect();
    let heavy: Vec<u32> = spread.iter().copied().chain([5; 300]).collect();
    let bits = |a: &Tensor, b: &Tensor| {
        let a = a.to_device(&cpu_dev).unwrap().to_dtype(DType::F32).unwrap();
        clipcid_kernels::max_abs_diff(&a, &b.to_dtype(DType::F32).unwrap()).unwrap() == 0.0
    };
    for (ids, past_a_piece) in [(&spread, false), (&heavy, true)] {
        let r = randn(&[ids.len(), w], 9, &cpu_dev);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let round = |v: &Tensor| v.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            // f32 `index_add` of the output gradient the half-precision graph sees.
            let idx = Tensor::new(ids.as_slice(), &cpu_dev).unwrap();
            let reference = Tensor::zeros((n, w), DType::F32, &cpu_dev)
                .unwrap()
                .index_add(&idx, &round(&r), 0)
                .unwrap();
            let on_cpu =
                clipcid_kernels::gather_rows_backward(&r.to_dtype(dtype).unwrap(), ids, n).unwrap();
            for dev in available_devices() {
                let what = format!("{dev:?} {dtype:?} {} ids", ids.len());
                let on = |t: &Tensor| t.to_device(&dev).unwrap();
                let g = on(&r).to_dtype(dtype).unwrap();
                let backward = clipcid_kernels::gather_rows_backward(&g, ids, n).unwrap();
                assert!(bits(&backward, &on_cpu), "{what}: differs from the CPU's");
                let again = clipcid_kernels::gather_rows_backward(&g, ids, n).unwrap();
                assert!(
                    bits(&again, &on_cpu),
                    "{what}: differs from one run to the next"
                );
                let e = relative_diff(&backward, &reference);
                let tol = match (dtype, past_a_piece) {
                    (DType::F32, false) => 0.0,
                    (DType::F32, true) => 1e-6,
                    // One bf16 rounding (2^-9 relative; f16's is 2^-12) of sums up to the
                    // largest.
                    _ => 4e-3,
                };
                assert!(e <= tol, "{what}: differs from index_add by {e}");
                // Through autograd, against `index_select` on the same device.
                let idx = Tensor::new(ids.as_slice(), &dev).unwrap();
                let (y_ref, g_ref) = value_and_grads(&[on(&table)], &on(&r), dtype, |v| {
                    v[0].index_select(&idx, 0)
                });
                let (y, g) = value_and_grads(&[on(&table)], &on(&r), dtype, |v| {
                    clipcid_kernels::gather_rows(&v[0], ids)
                });
                assert!(bits(&y, &y_ref), "{what}: rows differ");
                let t = on(&table).to_dtype(dtype).unwrap();
                let expected = match clipcid_kernels::gpu_kernels_take(&[&t]) {
                    true => backward.to_dtype(DType::F32).unwrap(),
                    false => g_ref[0].clone(),
                };
                assert!(
                    bits(&g[0], &expected),
                    "{what}: autograd's gradient differs"
                );
            }
        }
    }
    for dev in available_devices() {
        let err = clipcid_kernels::gather_rows(&table.to_device(&dev).unwrap(), &[3, 50])
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 50 of a table of 50 rows"), "{err}");
    }
}
