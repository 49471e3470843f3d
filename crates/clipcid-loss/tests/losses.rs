#![allow(clippy::unwrap_used)]
//! Every loss against a plain f64 reference, gradients against central finite differences,
//! PartialFC sampling properties, stability at large logits, and errors.

use candle_core::{DType, Device, Tensor, Var};
use clipcid_loss::{
    cross_entropy, ensure_finite, ClipLoss, ClusterDistillLoss, EmbeddingL1, InstanceDistillLoss,
    KlDistill, LossError, Margin, PartialFc, PicCollageLoss, Sampled, TemperatureSchedule,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Mat = Vec<Vec<f64>>;

fn rand_mat(rng: &mut ChaCha8Rng, r: usize, c: usize, scale: f64) -> Mat {
    (0..r)
        .map(|_| {
            (0..c)
                .map(|_| rng.random_range(-1.0..1.0) * scale)
                .collect()
        })
        .collect()
}

fn tensor(m: &Mat) -> Tensor {
    let (r, c) = (m.len(), m[0].len());
    Tensor::from_vec(m.concat(), (r, c), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

// ---- f64 references -------------------------------------------------------------------

fn norm_rows(m: &Mat) -> Mat {
    m.iter()
        .map(|r| {
            let n = (r.iter().map(|v| v * v).sum::<f64>() + 1e-12).sqrt();
            r.iter().map(|v| v / n).collect()
        })
        .collect()
}

fn dot_t(a: &Mat, b: &Mat) -> Mat {
    a.iter()
        .map(|x| {
            b.iter()
                .map(|y| x.iter().zip(y).map(|(p, q)| p * q).sum())
                .collect()
        })
        .collect()
}

fn transpose(m: &Mat) -> Mat {
    (0..m[0].len())
        .map(|j| m.iter().map(|r| r[j]).collect())
        .collect()
}

fn log_softmax(r: &[f64]) -> Vec<f64> {
    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    r.iter().map(|v| v - lse).collect()
}

fn ce(logits: &Mat, targets: &[usize]) -> f64 {
    logits
        .iter()
        .zip(targets)
        .map(|(r, &t)| -log_softmax(r)[t])
        .sum::<f64>()
        / logits.len() as f64
}

fn scale(m: &Mat, s: f64) -> Mat {
    m.iter()
        .map(|r| r.iter().map(|v| v * s).collect())
        .collect()
}

fn sym_info_nce(a: &Mat, b: &Mat, s: f64) -> f64 {
    let logits = scale(&dot_t(&norm_rows(a), &norm_rows(b)), s);
    let diag: Vec<usize> = (0..a.len()).collect();
    (ce(&logits, &diag) + ce(&transpose(&logits), &diag)) / 2.0
}

fn kl_ref(student: &Mat, teacher: &Mat, t: f64) -> f64 {
    let mut total = 0.0;
    for (s, q) in student.iter().zip(teacher) {
        let ls = log_softmax(&s.iter().map(|v| v / t).collect::<Vec<_>>());
        let lt = log_softmax(&q.iter().map(|v| v / t).collect::<Vec<_>>());
        total += lt
            .iter()
            .zip(&ls)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
    }
    t * t * total / student.len() as f64
}

fn margin_ref(cos: f64, m: Margin) -> f64 {
    match m {
        Margin::None => cos,
        Margin::CosFace(m) => cos - m,
        Margin::ArcFace(m) => {
            let th = (std::f64::consts::PI - m).cos();
            if cos > th {
                (cos.acos() + m).cos()
            } else {
                cos - (std::f64::consts::PI - m).sin() * m
            }
        }
    }
}

fn partial_fc_ref(x: &Mat, w: &Mat, sampled: &Sampled, margin: Margin, s: f64) -> f64 {
    let ws: Mat = sampled
        .index
        .iter()
        .map(|&i| w[i as usize].clone())
        .collect();
    let mut cos = dot_t(&norm_rows(x), &norm_rows(&ws));
    for (r, &l) in sampled.labels.iter().enumerate() {
        cos[r][l as usize] = margin_ref(cos[r][l as usize], margin);
    }
    let targets: Vec<usize> = sampled.labels.iter().map(|&l| l as usize).collect();
    ce(&scale(&cos, s), &targets)
}

// ---- finite differences ---------------------------------------------------------------

/// Checks d loss / d input for every element of every input against central differences.
fn check_grads(inputs: &[Mat], loss: impl Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|m| Var::from_tensor(&tensor(m)).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&ts).backward().unwrap();
    let h = 1e-6;
    for (k, m) in inputs.iter().enumerate() {
        let g: Vec<f64> = grads
            .get(&vars[k])
            .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
            .unwrap_or_else(|| vec![0.0; m.len() * m[0].len()]);
        for e in 0..m.len() * m[0].len() {
            let at = |delta: f64| {
                let mut p: Vec<Tensor> = inputs.iter().map(tensor).collect();
                let mut mm = m.clone();
                mm[e / m[0].len()][e % m[0].len()] += delta;
                p[k] = tensor(&mm);
                scalar(&loss(&p))
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (g[e] - fd).abs() <= 1e-3 * fd.abs() + 1e-7,
                "input {k} element {e}: backprop {} vs finite difference {fd}",
                g[e]
            );
        }
    }
}

fn logit_scale(v: f64) -> Mat {
    vec![vec![v]]
}

// ---- tests -----------------------------------------------------------------------------

#[test]
fn clip_loss_value_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (img, txt) = (rand_mat(&mut rng, 5, 4, 1.0), rand_mat(&mut rng, 5, 4, 1.0));
    let ls = 2.0f64;
    let got = ClipLoss::new()
        .forward(&tensor(&img), &tensor(&txt), &tensor(&logit_scale(ls)))
        .unwrap();
    assert!((scalar(&got) - sym_info_nce(&img, &txt, ls.exp())).abs() < 1e-12);
    check_grads(&[img.clone(), txt.clone(), logit_scale(ls)], |t| {
        ClipLoss::new().forward(&t[0], &t[1], &t[2]).unwrap()
    });
    // Past the clamp (exp(5) > 100): scale 100 and no gradient to the logit scale.
    let clamped = ClipLoss::new()
        .forward(&tensor(&img), &tensor(&txt), &tensor(&logit_scale(5.0)))
        .unwrap();
    assert!((scalar(&clamped) - sym_info_nce(&img, &txt, 100.0)).abs() < 1e-10);
    let v = Var::from_tensor(&tensor(&logit_scale(5.0))).unwrap();
    let g = ClipLoss::new()
        .forward(&tensor(&img), &tensor(&txt), v.as_tensor())
        .unwrap()
        .backward()
        .unwrap();
    let gs = g
        .get(&v)
        .map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0])
        .unwrap_or(0.0);
    assert_eq!(gs, 0.0);
}

#[test]
fn instance_distill_value_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let m: Vec<Mat> = (0..4).map(|_| rand_mat(&mut rng, 4, 3, 1.0)).collect();
    let loss = InstanceDistillLoss {
        image_text_weight: 0.7,
        text_image_weight: 0.4,
    };
    let got = loss
        .forward(
            &tensor(&m[0]),
            &tensor(&m[1]),
            &tensor(&m[2]),
            &tensor(&m[3]),
            &tensor(&logit_scale(1.5)),
        )
        .unwrap();
    let s = 1.5f64.exp();
    let want = 0.7 * sym_info_nce(&m[0], &m[3], s) + 0.4 * sym_info_nce(&m[1], &m[2], s);
    assert!((scalar(&got) - want).abs() < 1e-12);
    check_grads(&[m[0].clone(), m[1].clone(), logit_scale(1.5)], |t| {
        loss.forward(&t[0], &t[1], &tensor(&m[2]), &tensor(&m[3]), &t[2])
            .unwrap()
    });
    // Teacher inputs are detached: no gradient reaches them.
    let tv = Var::from_tensor(&tensor(&m[2])).unwrap();
    let g = loss
        .forward(
            &tensor(&m[0]),
            &tensor(&m[1]),
            tv.as_tensor(),
            &tensor(&m[3]),
            &tensor(&logit_scale(1.5)),
        )
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&tv).is_none());
}

#[test]
fn kl_l1_and_piccollage_values_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (s, t) = (rand_mat(&mut rng, 3, 6, 3.0), rand_mat(&mut rng, 3, 6, 3.0));
    for temp in [1.0, 2.0, 4.0] {
        let got = KlDistill::new(temp)
            .forward(&tensor(&s), &tensor(&t))
            .unwrap();
        assert!(
            (scalar(&got) - kl_ref(&s, &t, temp)).abs() < 1e-12,
            "T={temp}"
        );
        check_grads(std::slice::from_ref(&s), |x| {
            KlDistill::new(temp).forward(&x[0], &tensor(&t)).unwrap()
        });
    }
    // KL of a distribution with itself is 0.
    assert!(
        scalar(
            &KlDistill::new(2.0)
                .forward(&tensor(&s), &tensor(&s))
                .unwrap()
        )
        .abs()
            < 1e-12
    );

    let l1 = EmbeddingL1.forward(&tensor(&s), &tensor(&t)).unwrap();
    let want: f64 = s
        .concat()
        .iter()
        .zip(t.concat())
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
        / 18.0;
    assert!((scalar(&l1) - want).abs() < 1e-12);
    check_grads(std::slice::from_ref(&s), |x| {
        EmbeddingL1.forward(&x[0], &tensor(&t)).unwrap()
    });

    let sched = TemperatureSchedule::default();
    assert_eq!(
        [sched.at(0), sched.at(9), sched.at(10), sched.at(40)],
        [4.0, 4.0, 2.0, 2.0]
    );
    let pc = PicCollageLoss {
        kl_weight: 0.5,
        l1_weight: 2.0,
        ..Default::default()
    };
    for (epoch, temp) in [(0, 4.0), (12, 2.0)] {
        let got = pc.forward(&tensor(&s), &tensor(&t), epoch).unwrap();
        assert!((scalar(&got) - (0.5 * kl_ref(&s, &t, temp) + 2.0 * want)).abs() < 1e-12);
    }
    check_grads(std::slice::from_ref(&s), |x| {
        pc.forward(&x[0], &tensor(&t), 3).unwrap()
    });
}

fn centres(rng: &mut ChaCha8Rng, k: usize, d: usize) -> Mat {
    rand_mat(rng, k, d, 1.0)
}

#[test]
fn partial_fc_full_rate_is_full_softmax_for_every_margin() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (x, w) = (rand_mat(&mut rng, 6, 5, 1.0), centres(&mut rng, 9, 5));
    let labels = [3u32, 0, 8, 3, 5, 1];
    for margin in [Margin::None, Margin::CosFace(0.35), Margin::ArcFace(0.5)] {
        let mut fc = PartialFc::new(&tensor(&w), 1.0, 16.0, margin, 0).unwrap();
        let out = fc.forward(&tensor(&x), &labels).unwrap();
        assert_eq!(out.sampled.index, (0..9).collect::<Vec<u32>>());
        assert_eq!(out.sampled.labels, labels.to_vec());
        let want = partial_fc_ref(&x, &w, &out.sampled, margin, 16.0);
        assert!((scalar(&out.loss) - want).abs() < 1e-10, "{margin:?}");
        // Full softmax, written out: scaled margin cosines against the original labels.
        if margin == Margin::None {
            let cos = dot_t(&norm_rows(&x), &norm_rows(&w));
            let t: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            assert!((scalar(&out.loss) - ce(&scale(&cos, 16.0), &t)).abs() < 1e-10);
        }
    }
}

#[test]
fn partial_fc_sampling_keeps_positives_is_seeded_and_sized() {
    let w = Tensor::zeros((50, 4), DType::F64, &Device::Cpu).unwrap();
    let mut a = PartialFc::new(&w, 0.3, 1.0, Margin::None, 7).unwrap();
    let mut b = PartialFc::new(&w, 0.3, 1.0, Margin::None, 7).unwrap();
    let mut c = PartialFc::new(&w, 0.3, 1.0, Margin::None, 8).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut differs = false;
    for step in 0..200 {
        let n = rng.random_range(1..30);
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..50)).collect();
        let s = a.sample(&labels).unwrap();
        assert_eq!(
            s,
            b.sample(&labels).unwrap(),
            "step {step}: same seed, same draw"
        );
        differs |= s != c.sample(&labels).unwrap();
        let mut pos = labels.clone();
        pos.sort_unstable();
        pos.dedup();
        assert_eq!(s.index.len(), pos.len().max(15), "step {step}");
        assert!(s.index.windows(2).all(|p| p[0] < p[1]) && *s.index.last().unwrap() < 50);
        for (l, r) in labels.iter().zip(&s.labels) {
            assert_eq!(
                s.index[*r as usize], *l,
                "step {step}: label remapped into the sample"
            );
        }
    }
    assert!(differs, "another seed draws other negatives");
    // A checkpointed sampler position continues the same sequence of draws.
    let mut restored = PartialFc::new(&w, 0.3, 1.0, Margin::None, 7).unwrap();
    restored.set_rng_position(a.rng_position());
    for _ in 0..20 {
        let labels: Vec<u32> = (0..5).map(|_| rng.random_range(0..50)).collect();
        assert_eq!(
            a.sample(&labels).unwrap(),
            restored.sample(&labels).unwrap()
        );
    }
}

#[test]
fn partial_fc_gradients_only_reach_sampled_centres() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (x, w) = (rand_mat(&mut rng, 4, 3, 1.0), centres(&mut rng, 12, 3));
    let labels = [2u32, 7, 2, 10];
    let mut probe = PartialFc::new(&tensor(&w), 0.5, 8.0, Margin::None, 3).unwrap();
    let sampled = probe.sample(&labels).unwrap();
    assert_eq!(sampled.index.len(), 6);
    for margin in [Margin::None, Margin::CosFace(0.2), Margin::ArcFace(0.3)] {
        let run = |t: &[Tensor]| {
            PartialFc::new(&t[1], 0.5, 8.0, margin, 3)
                .unwrap()
                .forward_sampled(&t[0], sampled.clone())
                .unwrap()
                .loss
        };
        assert!(
            (scalar(&run(&[tensor(&x), tensor(&w)]))
                - partial_fc_ref(&x, &w, &sampled, margin, 8.0))
            .abs()
                < 1e-10
        );
        check_grads(std::slice::from_ref(&x), |t| {
            run(&[t[0].clone(), tensor(&w)])
        });
        // Gradient of the centres through the layer's own Var, against finite differences.
        let fc = PartialFc::new(&tensor(&w), 0.5, 8.0, margin, 3).unwrap();
        let g = fc
            .forward_sampled(&tensor(&x), sampled.clone())
            .unwrap()
            .loss
            .backward()
            .unwrap();
        let gw: Vec<Vec<f64>> = g.get(fc.weight()).unwrap().to_vec2().unwrap();
        for (k, row) in gw.iter().enumerate() {
            let in_sample = sampled.index.contains(&(k as u32));
            for (j, &gv) in row.iter().enumerate() {
                if !in_sample {
                    assert_eq!(gv, 0.0, "centre {k} was not sampled but got gradient");
                    continue;
                }
                let at = |delta: f64| {
                    let mut ww = w.clone();
                    ww[k][j] += delta;
                    scalar(&run(&[tensor(&x), tensor(&ww)]))
                };
                let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
                assert!(
                    (gv - fd).abs() <= 1e-3 * fd.abs() + 1e-7,
                    "{margin:?} centre {k}: {gv} vs {fd}"
                );
            }
        }
    }
}

/// ArcFace past `pi - m`: InsightFace's fallback `cos - m sin(pi - m)` replaces
/// `cos(theta + m)` for target cosines at or below `cos(pi - m)`, which random embeddings
/// (cosines near 0) never reach. Rows on both sides of that threshold, value and gradients.
#[test]
fn arcface_past_pi_minus_m_takes_insightfaces_fallback() {
    let m = 0.5;
    let th = (std::f64::consts::PI - m).cos(); // -0.8776
    let x: Mat = vec![
        vec![1.0, 0.2, -0.3],
        vec![0.1, 1.0, 0.4],
        vec![-0.5, 0.3, 1.0],
        vec![0.7, -0.6, 0.2],
    ];
    // Each row's target centre is its own embedding turned nearly around, by different
    // amounts: target cosines of about -0.99, -0.96, -0.87 and -0.67.
    let w: Mat = vec![
        vec![-1.0, -0.2, 0.15],
        vec![0.0, -1.0, -0.1],
        vec![0.3, -1.0, -1.0],
        vec![-0.2, 0.6, 0.3],
        vec![0.3, 0.3, 0.3],
    ];
    let labels = [0u32, 1, 2, 3];
    let cos = dot_t(&norm_rows(&x), &norm_rows(&w));
    let target: Vec<f64> = (0..4).map(|r| cos[r][r]).collect();
    assert!(
        target.iter().filter(|&&c| c <= th).count() == 2
            && target.iter().filter(|&&c| c > th).count() == 2,
        "the rows must straddle cos(pi - m) = {th}: {target:?}"
    );
    let sampled = Sampled {
        index: (0..5).collect(),
        labels: labels.to_vec(),
    };
    let run = |t: &[Tensor]| {
        PartialFc::new(&tensor(&w), 1.0, 8.0, Margin::ArcFace(m), 0)
            .unwrap()
            .forward_sampled(&t[0], sampled.clone())
            .unwrap()
            .loss
    };
    let got = scalar(&run(&[tensor(&x)]));
    let want = partial_fc_ref(&x, &w, &sampled, Margin::ArcFace(m), 8.0);
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");
    check_grads(std::slice::from_ref(&x), run);
}

#[test]
fn cluster_distill_value_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (s, t, w) = (
        rand_mat(&mut rng, 4, 3, 1.0),
        rand_mat(&mut rng, 4, 3, 1.0),
        centres(&mut rng, 10, 3),
    );
    let labels = [1u32, 4, 4, 9];
    let make = || {
        let mut l = ClusterDistillLoss::new(
            PartialFc::new(&tensor(&w), 0.6, 5.0, Margin::ArcFace(0.2), 11).unwrap(),
        );
        l.kl_weight = 0.8;
        l.kl_temperature = 2.0;
        l
    };
    let out = make().forward(&tensor(&s), &tensor(&t), &labels).unwrap();
    let ws: Mat = out
        .sampled
        .index
        .iter()
        .map(|&i| w[i as usize].clone())
        .collect();
    let cls = partial_fc_ref(&s, &w, &out.sampled, Margin::ArcFace(0.2), 5.0);
    let sl = scale(&dot_t(&norm_rows(&s), &norm_rows(&ws)), 5.0);
    let tl = scale(&dot_t(&norm_rows(&t), &norm_rows(&ws)), 5.0);
    let kl = kl_ref(&sl, &tl, 2.0);
    assert!((scalar(&out.classification) - cls).abs() < 1e-10);
    assert!((scalar(&out.kl) - kl).abs() < 1e-10);
    assert!((scalar(&out.loss) - (cls + 0.8 * kl)).abs() < 1e-10);
    // Each call of `make` starts the same generator, so every evaluation samples alike.
    check_grads(std::slice::from_ref(&s), |x| {
        make().forward(&x[0], &tensor(&t), &labels).unwrap().loss
    });
    let tv = Var::from_tensor(&tensor(&t)).unwrap();
    let g = make()
        .forward(&tensor(&s), tv.as_tensor(), &labels)
        .unwrap()
        .loss
        .backward()
        .unwrap();
    assert!(g.get(&tv).is_none(), "teacher embeddings are detached");
}

#[test]
fn huge_logits_stay_finite() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (s, t) = (rand_mat(&mut rng, 3, 5, 1e4), rand_mat(&mut rng, 3, 5, 1e4));
    let check = |loss: Tensor, vars: &[&Var]| {
        let v = scalar(&loss);
        assert!(v.is_finite(), "loss {v}");
        let g = loss.backward().unwrap();
        for var in vars {
            let gv: Vec<f64> = g
                .get(var)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(gv.iter().all(|x| x.is_finite()), "{gv:?}");
        }
    };
    let sv = Var::from_tensor(&tensor(&s)).unwrap();
    check(
        KlDistill::new(1.0)
            .forward(sv.as_tensor(), &tensor(&t))
            .unwrap(),
        &[&sv],
    );
    let targets = Tensor::new(&[0u32, 4, 2], &Device::Cpu).unwrap();
    check(cross_entropy(sv.as_tensor(), &targets).unwrap(), &[&sv]);
    check(
        PicCollageLoss::default()
            .forward(sv.as_tensor(), &tensor(&t), 0)
            .unwrap(),
        &[&sv],
    );
    let ls = Var::from_tensor(&tensor(&logit_scale(1e4))).unwrap();
    check(
        ClipLoss::new()
            .forward(sv.as_tensor(), &tensor(&t), ls.as_tensor())
            .unwrap(),
        &[&sv],
    );
    let w = centres(&mut rng, 6, 5);
    for margin in [Margin::None, Margin::ArcFace(0.5), Margin::CosFace(0.4)] {
        let mut fc = PartialFc::new(&tensor(&w), 1.0, 1e4, margin, 0).unwrap();
        let out = fc.forward(sv.as_tensor(), &[0, 5, 5]).unwrap();
        check(out.loss, &[&sv, fc.weight()]);
    }
    // In f32 too.
    let s32 = Var::from_tensor(&tensor(&s).to_dtype(DType::F32).unwrap()).unwrap();
    let t32 = tensor(&t).to_dtype(DType::F32).unwrap();
    check(
        KlDistill::new(1.0).forward(s32.as_tensor(), &t32).unwrap(),
        &[&s32],
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dev = Device::Cpu;
    let a = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
    let ls = Tensor::new(&[1.0f32], &dev).unwrap();
    let msg = |e: LossError| e.to_string();
    assert!(msg(ClipLoss::new().forward(&a, &b, &ls).unwrap_err()).contains("[3, 4] and [3, 5]"));
    assert!(msg(KlDistill::new(0.0).forward(&a, &a).unwrap_err()).contains("temperature"));
    let t = Tensor::new(&[0u32, 9, 1], &dev).unwrap();
    assert!(msg(cross_entropy(&a, &t).unwrap_err()).contains("class 9"));
    let mut fc = PartialFc::new(&a, 0.5, 1.0, Margin::None, 0).unwrap();
    assert!(msg(fc.forward(&a, &[0, 3, 1]).unwrap_err()).contains("label 3"));
    assert!(msg(fc.forward(&b, &[0, 1, 2]).unwrap_err()).contains("width 5"));
    assert!(
        msg(PartialFc::new(&a, 0.0, 1.0, Margin::None, 0).unwrap_err()).contains("sample rate")
    );
    let nan = Tensor::new(f32::NAN, &dev).unwrap();
    let e = ensure_finite("cluster", &nan).unwrap_err();
    assert!(
        matches!(
            e,
            LossError::NonFinite {
                name: "cluster",
                ..
            }
        ) && msg(e).contains("not finite")
    );
    assert!(ensure_finite("ok", &Tensor::new(1.5f32, &dev).unwrap()).is_ok());
}

#[test]
fn clip_and_instance_losses_and_gradients_agree_on_every_device() {
    // The same f64 references and the CPU's gradients, on each device the build can use.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let m: Vec<Mat> = (0..4).map(|_| rand_mat(&mut rng, 6, 5, 1.0)).collect();
    let s = 1.2f64;
    let want_clip = sym_info_nce(&m[0], &m[1], s.exp());
    let want_instance = sym_info_nce(&m[0], &m[3], s.exp()) + sym_info_nce(&m[1], &m[2], s.exp());
    let grads_on = |device: &Device| {
        let on = |x: &Mat| tensor(x).to_device(device).unwrap();
        let (img, txt) = (
            Var::from_tensor(&on(&m[0])).unwrap(),
            Var::from_tensor(&on(&m[1])).unwrap(),
        );
        let scale = on(&logit_scale(s));
        let clip = ClipLoss::new().forward(&img, &txt, &scale).unwrap();
        let instance = InstanceDistillLoss::default()
            .forward(&img, &txt, &on(&m[2]), &on(&m[3]), &scale)
            .unwrap();
        assert!(
            (scalar(&clip) - want_clip).abs() < 1e-12,
            "{:?}",
            device.location()
        );
        assert!(
            (scalar(&instance) - want_instance).abs() < 1e-12,
            "{:?}",
            device.location()
        );
        let g = (clip + instance).unwrap().backward().unwrap();
        [&img, &txt].map(|v| {
            g.get(v)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
    };
    let cpu = grads_on(&Device::Cpu);
    for device in clipcid_kernels::available_devices() {
        let got = grads_on(&device);
        for (a, b) in cpu.iter().zip(&got) {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f64, f64::max);
            assert!(
                d < 1e-10,
                "gradients on {:?} differ by {d}",
                device.location()
            );
        }
    }
}
