#![allow(clippy::unwrap_used)]
//! AdamW against a scalar reference, decay rule, schedule, clipping, exact resume.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use clipcid_train::{
    clip_factor, clip_grad_norm, grad_norm, AdamW, AdamWConfig, LossScale, LossScaleConfig,
    WarmupCosine,
};

/// PyTorch's AdamW on one scalar.
struct RefAdamW {
    p: f64,
    m: f64,
    v: f64,
    t: i32,
}

impl RefAdamW {
    fn step(&mut self, g: f64, lr: f64, c: &AdamWConfig, decay: bool) {
        self.t += 1;
        if decay {
            self.p -= lr * c.weight_decay * self.p;
        }
        self.m = c.beta1 * self.m + (1.0 - c.beta1) * g;
        self.v = c.beta2 * self.v + (1.0 - c.beta2) * g * g;
        let mh = self.m / (1.0 - c.beta1.powi(self.t));
        let vh = self.v / (1.0 - c.beta2.powi(self.t));
        self.p -= lr * mh / (vh.sqrt() + c.eps);
    }
}

/// Loss sum_i a_i * p_i^3 + p_i: gradients that change with p.
fn loss(vars: &[&Var], a: &[f64]) -> Tensor {
    let mut total: Option<Tensor> = None;
    for v in vars {
        let x = v.as_tensor();
        let av = Tensor::new(a, &Device::Cpu)
            .unwrap()
            .reshape(x.shape())
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap();
        let term = ((x.powf(3.0).unwrap() * &av).unwrap() + x)
            .unwrap()
            .sum_all()
            .unwrap();
        total = Some(match total {
            None => term,
            Some(t) => (t + term).unwrap(),
        });
    }
    total.unwrap()
}

#[test]
fn adamw_matches_the_reference_with_and_without_decay() {
    let c = AdamWConfig::default();
    let w = Var::new(&[[0.5f64, -0.3]], &Device::Cpu).unwrap();
    let b = Var::new(&[0.2f64, 0.7], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vec![
            ("layer.bias".into(), b.clone()),
            ("layer.weight".into(), w.clone()),
        ],
        c,
    )
    .unwrap();
    assert_eq!(opt.decayed(), vec!["layer.weight"]);
    let a = [0.3, -0.8];
    let mut rw: Vec<RefAdamW> = [0.5, -0.3].map(reference).into();
    let mut rb: Vec<RefAdamW> = [0.2, 0.7].map(reference).into();
    let sched = WarmupCosine {
        peak_lr: 0.05,
        warmup_steps: 3,
        total_steps: 12,
        min_lr: 0.001,
    };
    for step in 0..12 {
        let lr = sched.lr(step);
        for (r, ai) in rw.iter_mut().zip(a) {
            let g = 3.0 * ai * r.p * r.p + 1.0;
            r.step(g, lr, &c, true);
        }
        for (r, ai) in rb.iter_mut().zip(a) {
            let g = 3.0 * ai * r.p * r.p + 1.0;
            r.step(g, lr, &c, false);
        }
        let grads = loss(&[&w, &b], &a).backward().unwrap();
        opt.step(&grads, lr).unwrap();
    }
    let got_w: Vec<f64> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let got_b: Vec<f64> = b.as_tensor().to_vec1().unwrap();
    // Moments are kept in f32, so agreement is to f32 precision.
    for (g, r) in got_w.iter().zip(&rw).chain(got_b.iter().zip(&rb)) {
        assert!((g - r.p).abs() < 1e-5, "{g} vs {}", r.p);
    }
    assert_eq!(opt.steps(), 12);
}

#[test]
fn decay_rule_follows_open_clip() {
    assert!(AdamW::decays(
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        2
    ));
    for (name, rank) in [
        ("vision_model.encoder.layers.0.mlp.fc1.bias", 1),
        ("vision_model.post_layernorm.weight", 1),
        ("text_model.final_layer_norm.weight", 1),
        ("logit_scale", 0),
        ("vision_model.embeddings.position_embedding.weight", 2),
        ("vision_model.embeddings.class_embedding", 1),
    ] {
        assert!(!AdamW::decays(name, rank), "{name}");
    }
}

#[test]
fn schedule_warms_up_then_follows_the_cosine() {
    let s = WarmupCosine {
        peak_lr: 1.0,
        warmup_steps: 4,
        total_steps: 14,
        min_lr: 0.1,
    };
    let lrs: Vec<f64> = (0..16).map(|t| s.lr(t)).collect();
    assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
    assert!((lrs[4] - 1.0).abs() < 1e-12);
    assert!((lrs[9] - 0.55).abs() < 1e-12, "half way: {}", lrs[9]);
    assert!((lrs[14] - 0.1).abs() < 1e-12 && (lrs[15] - 0.1).abs() < 1e-12);
    assert!(lrs[4..15].windows(2).all(|w| w[1] <= w[0]));
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let x = Var::new(&[3.0f64, 0.0], &Device::Cpu).unwrap();
    let y = Var::new(&[[0.0f64, 4.0]], &Device::Cpu).unwrap();
    // d/dx of sum(x^2)/2 = x: gradients (3, 0) and (0, 4), global norm 5.
    let l = ((x.as_tensor().sqr().unwrap().sum_all().unwrap()
        + y.as_tensor().sqr().unwrap().sum_all().unwrap())
    .unwrap()
        * 0.5)
        .unwrap();
    let mut g = l.backward().unwrap();
    assert!((clip_grad_norm(&mut g, &[&x, &y], 10.0).unwrap() - 5.0).abs() < 1e-12);
    assert_eq!(g.get(&x).unwrap().to_vec1::<f64>().unwrap(), vec![3.0, 0.0]);
    let norm = clip_grad_norm(&mut g, &[&x, &y], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let gx = g.get(&x).unwrap().to_vec1::<f64>().unwrap();
    let gy = g
        .get(&y)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!((gx[0] - 0.6).abs() < 1e-6 && (gy[1] - 0.8).abs() < 1e-6);
    // A NaN gradient is reported, not scaled away.
    let z = Var::new(&[f64::NAN], &Device::Cpu).unwrap();
    let mut gz = z.as_tensor().sum_all().unwrap().backward().unwrap();
    gz.insert(&z, Tensor::new(&[f64::NAN], &Device::Cpu).unwrap());
    assert!(clip_grad_norm(&mut gz, &[&z], 1.0).unwrap().is_nan());
}

/// A step with a gradient factor (how the trainer clips and unscales) gives the same bits
/// as a plain step on gradients multiplied beforehand, on every device, for parameters
/// updated in place (f32, several at once) and by tensor ops (f64); and [`grad_norm`] is the
/// norm of all the gradients together.
#[test]
fn a_scaled_step_is_a_step_on_scaled_gradients_on_every_device() {
    for dev in clipcid_kernels::available_devices() {
        let make = || {
            let w = Var::new(&[[0.5f32, -0.3, 2.0], [0.1, 0.0, -1.5]], &dev).unwrap();
            let b = Var::new(&[0.2f32, 0.7], &dev).unwrap();
            let s = Var::new(&[0.25f64], &dev).unwrap();
            let named = vec![
                ("layer.weight".to_string(), w.clone()),
                ("layer.bias".to_string(), b.clone()),
                ("scale".to_string(), s.clone()),
            ];
            (
                AdamW::new(named, AdamWConfig::default()).unwrap(),
                [w, b, s],
            )
        };
        let (mut scaled, vs) = make();
        let (mut plain, vp) = make();
        let factor = 0.3;
        let grads_of = |v: &[Var; 3]| {
            let cube = |x: &Var| {
                let t = x.as_tensor().to_dtype(DType::F64).unwrap();
                (t.sqr().unwrap() * &t).unwrap().sum_all().unwrap()
            };
            ((cube(&v[0]) + cube(&v[1])).unwrap() + cube(&v[2]))
                .unwrap()
                .backward()
                .unwrap()
        };
        for step in 0..3 {
            let lr = 0.01 * (step + 1) as f64;
            let g = grads_of(&vs);
            let refs: Vec<&Var> = vs.iter().collect();
            let want: f64 = vs
                .iter()
                .map(|v| {
                    let g = g.get(v).unwrap().to_dtype(DType::F64).unwrap();
                    let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    g.iter().map(|x| x * x).sum::<f64>()
                })
                .sum::<f64>()
                .sqrt();
            let norm = grad_norm(&g, &refs).unwrap();
            assert!(
                (norm - want).abs() <= 1e-6 * want,
                "{dev:?}: {norm} vs {want}"
            );
            scaled.step_scaled(&g, lr, factor).unwrap();
            let mut g = grads_of(&vp);
            for v in &vp {
                let times = (g.get(v).unwrap() * factor).unwrap();
                g.insert(v, times);
            }
            plain.step(&g, lr).unwrap();
        }
        for (a, b) in vs.iter().zip(&vp) {
            let bits = |v: &Var| {
                let t = v.as_tensor().to_dtype(DType::F64).unwrap();
                let t = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
                t.to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(a), bits(b), "{dev:?}");
        }
        assert!(scaled.step_scaled(&grads_of(&vs), 0.1, f64::NAN).is_err());
    }
    assert_eq!(clip_factor(5.0, 10.0), 1.0);
    assert!((clip_factor(5.0, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
}

#[test]
fn saved_state_continues_bit_identically() {
    let init = [[0.4f32, -0.1, 0.9], [0.3, 0.2, -0.5]];
    let a = [0.5, -0.2, 0.1, 0.7, -0.9, 0.3];
    let sched = WarmupCosine {
        peak_lr: 0.02,
        warmup_steps: 2,
        total_steps: 8,
        min_lr: 0.0,
    };
    let run = |split: Option<u64>| -> Vec<f32> {
        let w = Var::new(&init, &Device::Cpu).unwrap();
        let mut opt =
            AdamW::new(vec![("w.weight".into(), w.clone())], AdamWConfig::default()).unwrap();
        for step in 0..8u64 {
            if Some(step) == split {
                // Save, rebuild everything from the saved tensors, continue.
                let (state, steps) = opt.state().unwrap();
                let saved: HashMap<String, Tensor> = state
                    .into_iter()
                    .map(|(k, t)| (k, t.copy().unwrap()))
                    .collect();
                let weights = w.as_tensor().copy().unwrap();
                let w2 = Var::from_tensor(&weights).unwrap();
                let mut opt2 = AdamW::new(
                    vec![("w.weight".into(), w2.clone())],
                    AdamWConfig::default(),
                )
                .unwrap();
                opt2.load_state(&saved, steps).unwrap();
                for step in step..8 {
                    let g = loss(&[&w2], &a).backward().unwrap();
                    opt2.step(&g, sched.lr(step)).unwrap();
                }
                return w2.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            }
            let g = loss(&[&w], &a).backward().unwrap();
            opt.step(&g, sched.lr(step)).unwrap();
        }
        w.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    let straight = run(None);
    let resumed = run(Some(4));
    assert_eq!(straight, resumed);
    assert_ne!(straight, init.concat());
    // Missing or mis-shaped state is an error naming the tensor.
    let w = Var::new(&init, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![("w.weight".into(), w)], AdamWConfig::default()).unwrap();
    let e = opt.load_state(&HashMap::new(), 3).unwrap_err().to_string();
    assert!(e.contains("adamw.m.w.weight"), "{e}");
    let bad: HashMap<String, Tensor> = ["m", "v"]
        .iter()
        .map(|k| {
            (
                format!("adamw.{k}.w.weight"),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let e = opt.load_state(&bad, 3).unwrap_err().to_string();
    assert!(e.contains("[3]") && e.contains("[2, 3]"), "{e}");
}

/// The reference at `p`, before its first step.
fn reference(p: f64) -> RefAdamW {
    RefAdamW {
        p,
        m: 0.0,
        v: 0.0,
        t: 0,
    }
}

/// A tensor's values, widened to f64.
fn values(t: &Tensor) -> Vec<f64> {
    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    t.to_vec1().unwrap()
}

/// Gradients near `eps` (1e-6), where it is half the denominator: updated in place (f32)
/// and by tensor ops (f64), each parameter follows the reference.
#[test]
fn adamw_follows_the_reference_where_eps_matters() {
    let c = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let f32s = Var::new(&[1.0f32, -0.5], &Device::Cpu).unwrap();
    let f64s = Var::new(&[1.0f64, -0.5], &Device::Cpu).unwrap();
    let named = vec![("a".into(), f32s.clone()), ("b".into(), f64s.clone())];
    let mut opt = AdamW::new(named, c).unwrap();
    let mut refs: Vec<RefAdamW> = [1.0, -0.5, 1.0, -0.5].map(reference).into();
    for _ in 0..5 {
        // Loss 1e-6 sum(p^2 / 2): gradient 1e-6 p.
        let half_sq = |v: &Var| {
            let t = v.as_tensor().to_dtype(DType::F64).unwrap();
            (t.sqr().unwrap().sum_all().unwrap() * 0.5e-6).unwrap()
        };
        let grads = (half_sq(&f32s) + half_sq(&f64s))
            .unwrap()
            .backward()
            .unwrap();
        for r in &mut refs {
            let g = 1e-6 * r.p;
            r.step(g, 0.1, &c, false);
        }
        opt.step(&grads, 0.1).unwrap();
    }
    let got = [values(&f32s), values(&f64s)].concat();
    for (g, r) in got.iter().zip(&refs) {
        assert!((g - r.p).abs() < 1e-5, "{g} vs {}", r.p);
    }
    // Without eps each step would move each value by the whole learning rate.
    assert!((got[0] - (1.0 - 0.5)).abs() > 0.05, "{got:?}");
}

/// Working copies ([`AdamW::working_copies`]): a step reads a parameter's gradient from its
/// copy and its own together, updates the f32 or f64 parameter as the reference does, and
/// leaves the copy holding the parameter rounded to bf16; after
/// [`AdamW::clear_working_copies`] the copies are left alone.
#[test]
fn working_copies_carry_gradients_and_hold_the_rounded_parameters() {
    let dev = Device::Cpu;
    let w = Var::new(&[0.5f32, -0.3, 1.7], &dev).unwrap(); // updated in place
    let s = Var::new(&[0.25f64, -2.0], &dev).unwrap(); // updated by tensor ops
    let b = Var::new(&[0.2f32, -0.7], &dev).unwrap(); // no copy
    let c = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let named = vec![
        ("w".to_string(), w.clone()),
        ("s".to_string(), s.clone()),
        ("b".to_string(), b.clone()),
    ];
    let mut opt = AdamW::new(named, c).unwrap();
    let names: Vec<&str> = opt.params().map(|(n, _)| n).collect();
    assert_eq!(names, ["b", "s", "w"]);
    let e = opt
        .working_copies(DType::F32, |_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bf16 or f16"), "{e}");
    let copies = opt.working_copies(DType::BF16, |n| n != "b").unwrap();
    let names: Vec<&str> = copies.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["s", "w"]);
    assert!(copies.iter().all(|(_, v)| v.dtype() == DType::BF16));
    let (s16, w16) = (copies[0].1.clone(), copies[1].1.clone());
    let ids = |vars: Vec<Var>| vars.iter().map(|v| v.id()).collect::<Vec<_>>();
    assert_eq!(ids(opt.gradient_vars()), [b.id(), s16.id(), w16.id()]);

    let mut refs: Vec<Vec<RefAdamW>> = [&b, &s, &w]
        .map(|v| values(v).into_iter().map(reference).collect())
        .into();
    let lr = 0.05;
    for _ in 0..6 {
        let sq = |v: &Var, k: f64| {
            let t = v.as_tensor().to_dtype(DType::F64).unwrap();
            (t.sqr().unwrap().sum_all().unwrap() * k).unwrap()
        };
        let cube = (b.as_tensor().powf(3.0).unwrap().sum_all().unwrap() / 3.0).unwrap();
        let loss = [sq(&w16, 1.5), sq(&w, 1.0), sq(&s16, 1.5), sq(&s, 1.0)]
            .into_iter()
            .fold(cube.to_dtype(DType::F64).unwrap(), |a, t| (a + t).unwrap());
        let grads = loss.backward().unwrap();
        // Each update reads 3 copy (a bf16 gradient, as the copy is bf16) + 2 parameter, and
        // b^2 for b, which has no copy.
        let through = |copy: &Var, param: &Var| -> Vec<f64> {
            let c = (copy.as_tensor().to_dtype(DType::F64).unwrap() * 3.0).unwrap();
            let c = values(&c.to_dtype(DType::BF16).unwrap());
            c.iter()
                .zip(values(param))
                .map(|(c, p)| c + 2.0 * p)
                .collect()
        };
        let want = [
            values(&b).iter().map(|x| x * x).collect::<Vec<_>>(),
            through(&s16, &s),
            through(&w16, &w),
        ];
        let norm = want.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
        let got = opt.grad_norm(&grads).unwrap();
        assert!((got - norm).abs() <= 1e-6 * norm, "{got} vs {norm}");
        for (rs, gs) in refs.iter_mut().zip(&want) {
            for (r, g) in rs.iter_mut().zip(gs) {
                r.step(*g, lr, &c, false);
            }
        }
        opt.step(&grads, lr).unwrap();
        for ((v, rs), copy) in [&b, &s, &w]
            .iter()
            .zip(&refs)
            .zip([None, Some(&s16), Some(&w16)])
        {
            for (g, r) in values(v).iter().zip(rs) {
                assert!((g - r.p).abs() < 1e-5, "{g} vs {}", r.p);
            }
            if let Some(copy) = copy {
                let rounded = v.as_tensor().to_dtype(DType::BF16).unwrap();
                assert_eq!(values(copy), values(&rounded));
            }
        }
    }

    opt.clear_working_copies();
    assert_eq!(ids(opt.gradient_vars()), [b.id(), s.id(), w.id()]);
    let before = (values(&w16), values(&s16), values(&w));
    let loss = (w
        .as_tensor()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        + s.as_tensor().sum_all().unwrap())
    .unwrap();
    opt.step(&loss.backward().unwrap(), lr).unwrap();
    assert_eq!((values(&w16), values(&s16)), (before.0, before.1));
    assert_ne!(values(&w), before.2);
}

/// A learning rate or gradient factor that is negative or not finite is refused before
/// anything changes; zero is a usable value of either (a schedule may end at a rate of 0).
#[test]
fn steps_refuse_unusable_rates_and_take_zero() {
    let w = Var::new(&[[0.5f32, -0.3]], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![("w.bias".into(), w.clone())], AdamWConfig::default()).unwrap();
    let grads = loss(&[&w], &[0.3, -0.8]).backward().unwrap();
    for lr in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.1] {
        let e = opt.step(&grads, lr).unwrap_err().to_string();
        assert!(e.contains("learning rate"), "{lr}: {e}");
    }
    for scale in [f64::NAN, f64::INFINITY, -0.5] {
        let e = opt.step_scaled(&grads, 0.1, scale).unwrap_err().to_string();
        assert!(e.contains("gradient scale"), "{scale}: {e}");
    }
    assert_eq!(opt.steps(), 0);
    let start = values(&w);
    // Zero gradients leave the moments at zero and the update 0 / (0 + eps); then a rate of 0.
    opt.step_scaled(&grads, 0.1, 0.0).unwrap();
    opt.step(&grads, 0.0).unwrap();
    assert_eq!((values(&w), opt.steps()), (start, 2));
}

/// An infinite gradient norm is returned and nothing is scaled (scaling by
/// `max / (inf + eps)` would turn the gradients into NaN and zeros); a norm exactly at the
/// limit is not clipped.
#[test]
fn clipping_leaves_infinite_and_limit_norms_alone() {
    let z = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let mut grads = z.as_tensor().sum_all().unwrap().backward().unwrap();
    let inf = Tensor::new(&[f64::INFINITY, 3.0], &Device::Cpu).unwrap();
    grads.insert(&z, inf);
    assert_eq!(
        clip_grad_norm(&mut grads, &[&z], 1.0).unwrap(),
        f64::INFINITY
    );
    assert_eq!(values(grads.get(&z).unwrap()), [f64::INFINITY, 3.0]);
    assert_eq!(clip_factor(2.0, 2.0), 1.0);
}

/// [`LossScale`] follows `torch.amp.GradScaler.update`: the scale backs off at once on an
/// overflow and grows after `growth_interval` finite steps in a row, and the streak starts
/// again at either change.
#[test]
fn loss_scale_follows_grad_scaler() {
    let mut s = LossScale::new(LossScaleConfig {
        init: 8.0,
        growth_factor: 2.0,
        backoff_factor: 0.25,
        growth_interval: 3,
    });
    let mut trace = vec![(s.scale(), s.good_steps())];
    for finite in [true, true, false, true, true, true, true] {
        s.update(finite);
        trace.push((s.scale(), s.good_steps()));
    }
    let want = [
        (8.0, 0),
        (8.0, 1),
        (8.0, 2),
        (2.0, 0),
        (2.0, 1),
        (2.0, 2),
        (4.0, 0),
        (4.0, 1),
    ];
    assert_eq!(trace, want);
    s.restore(64.0, 2);
    assert_eq!((s.scale(), s.good_steps()), (64.0, 2));
    s.update(true);
    assert_eq!((s.scale(), s.good_steps()), (128.0, 0));
}
