#![allow(clippy::unwrap_used)]
//! Evaluation measures against hand-computed and brute-force references.

use clipcid_eval::{
    average_precision_at_n, clip_benchmark_sweep, clip_benchmark_weight_decay, clip_paper_sweep,
    linear_probe, objective, plot_textness_grid, textness_sweep, top_n, AdamWProbe, Agreement,
    Classification, Features, LabelledFeatures, LogisticRegression, ProbeMethod, ProbeOptions,
    Retrieval, TextRenderer, TextnessDirection, ZeroShotClassifier, GRADIENT_TOLERANCE,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// `classes` well-separated clusters in `dim` dimensions: unit class means plus noise.
fn clusters(
    rng: &mut ChaCha8Rng,
    means: &[Vec<f32>],
    per_class: usize,
    noise: f32,
) -> (Vec<f32>, Vec<usize>) {
    let normal = Normal::new(0.0f32, noise).unwrap();
    let (mut x, mut y) = (vec![], vec![]);
    for i in 0..per_class * means.len() {
        let c = i % means.len();
        x.extend(means[c].iter().map(|m| m + normal.sample(rng)));
        y.push(c);
    }
    (x, y)
}

fn random_means(rng: &mut ChaCha8Rng, classes: usize, dim: usize) -> Vec<Vec<f32>> {
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    (0..classes)
        .map(|_| {
            let v: Vec<f32> = (0..dim).map(|_| normal.sample(rng)).collect();
            let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            v.into_iter().map(|a| a / n).collect()
        })
        .collect()
}

/// Train (30 a class) and test (10 a class) rows of `classes` well-separated clusters, and
/// the test rows' raw values and labels.
fn separable_sets(
    seed: u64,
    classes: usize,
    dim: usize,
) -> (LabelledFeatures, LabelledFeatures, Vec<f32>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let means = random_means(&mut rng, classes, dim);
    let (xtr, ytr) = clusters(&mut rng, &means, 30, 0.08);
    let (xte, yte) = clusters(&mut rng, &means, 10, 0.08);
    let train = LabelledFeatures::new(&xtr, dim, &ytr, classes).unwrap();
    let test = LabelledFeatures::new(&xte, dim, &yte, classes).unwrap();
    (train, test, xte, yte)
}

#[test]
fn zero_shot_on_separable_classes_is_perfect_and_averages_templates() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (classes, dim, templates) = (6, 32, 4);
    let means = random_means(&mut rng, classes, dim);
    // Each template's prompt embedding is the class mean plus a template-specific offset.
    let offsets = random_means(&mut rng, templates, dim);
    let mut text = vec![];
    for m in &means {
        for o in &offsets {
            text.extend(m.iter().zip(o).map(|(a, b)| a + 0.3 * b));
        }
    }
    let text = Features::normalized(text, dim).unwrap();
    let zs = ZeroShotClassifier::from_text_features(&text, templates).unwrap();
    // Brute force: the class weight is the normalised mean of that class's unit prompts.
    for c in 0..classes {
        let mut mean = vec![0f32; dim];
        for t in 0..templates {
            mean.iter_mut()
                .zip(text.row(c * templates + t))
                .for_each(|(m, v)| *m += v);
        }
        let n = mean.iter().map(|a| a * a).sum::<f32>().sqrt();
        for (a, b) in zs.weights.row(c).iter().zip(&mean) {
            assert!((a - b / n).abs() < 1e-6);
        }
    }
    let (x, y) = clusters(&mut rng, &means, 20, 0.05);
    let images = Features::normalized(x, dim).unwrap();
    let r = zs.classify(&images, &y).unwrap();
    assert_eq!((r.top1, r.top5, r.mean_per_class_recall), (1.0, 1.0, 1.0));
    assert!(r.confusion.iter().enumerate().all(|(i, row)| row[i] == 20));
}

#[test]
fn classification_metrics_match_a_hand_count() {
    // 3 classes, 4 samples; truth 0, 0, 1, 2.
    let scores = [
        0.9, 0.0, 0.1, // -> 0 (right)
        0.1, 0.8, 0.1, // -> 1 (wrong; the truth ties class 2 for 2nd place)
        0.3, 0.2, 0.5, // -> 2 (wrong; truth 1 ranks 3rd)
        0.0, 0.1, 0.9, // -> 2 (right)
    ];
    let c = Classification::from_scores(&scores, 3, &[0, 0, 1, 2]).unwrap();
    assert_eq!(c.predictions, vec![0, 1, 2, 2]);
    assert_eq!(c.top1, 0.5);
    // Only 3 classes: top-5 does not apply (it counted every sample), as in CLIP_benchmark.
    assert!(c.top5.is_nan());
    let five: Vec<f32> = [
        0.9, 0.0, 0.1, 0.0, 0.0, // truth 0 ranks 1st
        0.1, 0.8, 0.1, 0.0, 0.0, // truth 0 ranks 2nd
        0.1, 0.2, 0.3, 0.4, 0.9, // truth 0 ranks 5th
    ]
    .to_vec();
    let c5 = Classification::from_scores(&five, 5, &[0, 0, 0]).unwrap();
    assert_eq!((c5.top1, c5.top5), (1.0 / 3.0, 1.0));
    assert_eq!(c.per_class_recall, vec![0.5, 0.0, 1.0]);
    assert_eq!(c.mean_per_class_recall, 0.5);
    assert_eq!(
        c.confusion,
        vec![vec![1, 1, 0], vec![0, 0, 1], vec![0, 0, 1]]
    );
    assert!(Classification::from_scores(&scores, 3, &[0, 0, 1]).is_err());
    assert!(Classification::from_scores(&scores, 3, &[0, 0, 1, 3]).is_err());
    // A collapsed model (every class scores the same): ties go to the lower class, as for
    // top-1, so top-5 over 10 classes counts the 5 lowest classes' samples, not every one.
    let truth: Vec<usize> = (0..10).collect();
    let flat = Classification::from_scores(&[0.5; 100], 10, &truth).unwrap();
    assert_eq!((flat.top1, flat.top5), (0.1, 0.5));
    assert_eq!(flat.predictions, vec![0; 10]);
    // A NaN score never wins, and a NaN for the truth is never a hit, not even in the top 5
    // of 5 classes: it ranks last (no score is above a NaN, so counting the scores above
    // it would rank it first).
    let broken: Vec<f32> = [
        [f32::NAN, 0.1, 0.2, 0.3, 0.4],
        [0.4, f32::NAN, 0.3, 0.2, 0.1],
    ]
    .concat();
    let c = Classification::from_scores(&broken, 5, &[0, 0]).unwrap();
    assert_eq!(c.predictions, vec![4, 0]);
    assert_eq!((c.top1, c.top5), (0.5, 0.5));
}

/// The objective computed the slow way, in f64 loops.
fn reference_loss(
    params: &[f64],
    x: &[f32],
    y: &[usize],
    dim: usize,
    classes: usize,
    l2: f64,
) -> f64 {
    let n = y.len();
    let mut total = 0.0;
    for i in 0..n {
        let logits: Vec<f64> = (0..classes)
            .map(|c| {
                params[classes * dim + c]
                    + (0..dim)
                        .map(|d| params[c * dim + d] * x[i * dim + d] as f64)
                        .sum::<f64>()
            })
            .collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        total += -(logits[y[i]].exp() / z).ln();
    }
    let wsq: f64 = params[..classes * dim].iter().map(|w| w * w).sum();
    total / n as f64 + 0.5 * l2 * wsq
}

/// A fitted model's `[W, b]`, the layout [`objective`] takes.
fn params(m: &LogisticRegression) -> Vec<f64> {
    m.weights().iter().chain(m.bias()).copied().collect()
}

#[test]
fn logistic_loss_and_gradient_match_references() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n, dim, classes, l2) = (17, 5, 3, 0.37);
    let x: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<usize> = (0..n).map(|_| rng.random_range(0..classes)).collect();
    let data = LabelledFeatures::new(&x, dim, &y, classes).unwrap();
    let p: Vec<f64> = (0..classes * (dim + 1))
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let (loss, grad) = objective(&p, &data, classes, l2).unwrap();
    let want = reference_loss(&p, &x, &y, dim, classes, l2);
    assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
    // Central finite differences of the reference.
    for (k, g) in grad.iter().enumerate() {
        let h = 1e-6;
        let (mut a, mut b) = (p.clone(), p.clone());
        a[k] += h;
        b[k] -= h;
        let fd = (reference_loss(&a, &x, &y, dim, classes, l2)
            - reference_loss(&b, &x, &y, dim, classes, l2))
            / (2.0 * h);
        assert!((g - fd).abs() < 1e-7, "param {k}: {g} vs {fd}");
    }
    // The fit reaches a stationary point of that objective.
    let fit = LogisticRegression::fit(&data, classes, l2, 500, None).unwrap();
    let (fit_loss, g) = objective(&params(&fit), &data, classes, l2).unwrap();
    assert!((fit_loss - fit.loss).abs() < 1e-12);
    let gnorm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(
        gnorm <= GRADIENT_TOLERANCE,
        "gradient norm {gnorm} at the solution"
    );
    assert!(fit_loss < want);
    // Accuracy is the share of rows predicted right (these random labels are not all fitted).
    let hits = fit
        .predict(&data)
        .iter()
        .zip(&y)
        .filter(|(p, y)| p == y)
        .count();
    assert!(0 < hits && hits < n, "{hits} of {n}");
    assert_eq!(fit.accuracy(&data), hits as f64 / n as f64);
    // Warm-started at the solution, L-BFGS has nothing left to do; a previous fit of
    // another shape is no start (the fit starts from zero, as without one).
    let again = LogisticRegression::fit(&data, classes, l2, 500, Some(&fit)).unwrap();
    assert!(
        fit.iterations > 1 && again.iterations <= 1,
        "{} then {}",
        fit.iterations,
        again.iterations
    );
    let wider = LabelledFeatures::new(&[0.5; 6], dim + 1, &[1], classes).unwrap();
    let other = LogisticRegression::fit(&wider, classes, l2, 500, None).unwrap();
    let cold = LogisticRegression::fit(&data, classes, l2, 500, Some(&other)).unwrap();
    assert_eq!(
        (cold.weights(), cold.bias(), cold.iterations),
        (fit.weights(), fit.bias(), fit.iterations)
    );
}

#[test]
fn linear_probe_on_separable_classes_is_perfect_and_deterministic() {
    let (classes, dim) = (5, 24);
    let (train, test, xte, yte) = separable_sets(3, classes, dim);
    let opts = ProbeOptions {
        max_iterations: 300,
        ..ProbeOptions::default()
    };
    let r = linear_probe(&train, &test, classes, &opts).unwrap();
    assert_eq!(r.test.top1, 1.0, "sweep {:?}", r.sweep);
    // Grid two decades apart from 1e2 down to 1e-6, then refined to 1/8 decade.
    assert!(r.sweep.len() >= 9 && r.sweep.len() <= 5 + 2 * 4);
    // Each accuracy is over the held-out 20% of the 150 training rows: a count of 30.
    for &(_, acc) in &r.sweep {
        let right = acc * 30.0;
        assert!((right - right.round()).abs() < 1e-9, "{:?}", r.sweep);
    }
    let again = linear_probe(&train, &test, classes, &opts).unwrap();
    assert_eq!(r.l2, again.l2);
    assert_eq!(r.test.predictions, again.test.predictions);
    // Width mismatch is a clear error.
    let narrow = LabelledFeatures::new(&xte[..10 * 4], 4, &yte[..10], classes).unwrap();
    let e = linear_probe(&train, &narrow, classes, &opts).unwrap_err();
    assert!(e.to_string().contains("24-wide"), "{e}");
    assert!(LabelledFeatures::new(&[f32::NAN, 0.0], 2, &[0], 2).is_err());
}

#[test]
fn clip_benchmark_sweep_asks_what_its_find_peak_asks() {
    // The indices CLIP_benchmark (48de38c, metrics/linear_probe.py) tries, recorded by running
    // its find_peak loop in Python on the same accuracy curves.
    // (accuracy curve, the peak, the indices asked for)
    type Case = (fn(usize) -> f64, usize, &'static [usize]);
    let cases: [Case; 4] = [
        (
            |i| 1.0 - (i as f64 - 37.0).abs() / 100.0,
            37,
            &[
                0, 16, 32, 48, 64, 80, 96, 24, 32, 40, 36, 40, 44, 34, 36, 38, 35, 36, 37,
            ],
        ),
        (
            |_| 0.5,
            0,
            &[
                0, 16, 32, 48, 64, 80, 96, 0, 0, 8, 0, 0, 4, 0, 0, 2, 0, 0, 1,
            ],
        ),
        (
            |i| {
                [0.2, 0.5, 0.5, 0.4, 0.3, 0.1, 0.1][(i / 16).min(6)]
                    + if i == 29 { 0.01 } else { 0.0 }
            },
            16,
            &[
                0, 16, 32, 48, 64, 80, 96, 8, 16, 24, 12, 16, 20, 14, 16, 18, 15, 16, 17,
            ],
        ),
        // Rising to the weakest decay: the right end is clamped to the grid's last index.
        (
            |i| i as f64 / 96.0,
            96,
            &[
                0, 16, 32, 48, 64, 80, 96, 88, 96, 96, 92, 96, 96, 94, 96, 96, 95, 96, 96,
            ],
        ),
    ];
    for (curve, peak, asked) in cases {
        let mut seen = vec![];
        let got = clip_benchmark_sweep(|i| -> Result<f64, ()> {
            seen.push(i);
            Ok(curve(i))
        })
        .unwrap();
        assert_eq!((got, seen.as_slice()), (peak, asked));
    }
    // numpy.logspace(-6, 2, 97).
    for (i, want) in [(0, 1e-6), (12, 1e-5), (48, 1e-2), (96, 1e2)] {
        let wd = clip_benchmark_weight_decay(i);
        assert!((wd / want - 1.0).abs() < 1e-12, "{i}: {wd}");
    }
}

#[test]
fn clip_paper_sweep_asks_the_grid_then_halves_around_the_best() {
    // (accuracy curve over log10 L2, the best point, the points asked for), worked by hand:
    // the grid 2, 0, ..., -6, then best + step and best - step for steps 1, 1/2, 1/4, 1/8.
    type Case = (fn(f64) -> f64, f64, &'static [f64]);
    let cases: [Case; 3] = [
        (
            |g| -(g + 3.3) * (g + 3.3),
            -3.25,
            &[
                2.0, 0.0, -2.0, -4.0, -6.0, -3.0, -5.0, -2.5, -3.5, -3.25, -3.75, -3.125, -3.375,
            ],
        ),
        // A flat curve: every tie goes to the stronger L2, and points above 2 are skipped.
        (
            |_| 0.5,
            2.0,
            &[2.0, 0.0, -2.0, -4.0, -6.0, 1.0, 1.5, 1.75, 1.875],
        ),
        // Best at the weak end: points below -6 are skipped; a tie with the best point
        // during refinement moves it only towards the stronger L2.
        (
            |g| if g <= -5.5 { 1.0 } else { 0.0 },
            -5.5,
            &[
                2.0, 0.0, -2.0, -4.0, -6.0, -5.0, -5.5, -5.25, -5.75, -5.375, -5.625,
            ],
        ),
    ];
    for (curve, best, asked) in cases {
        let mut seen = vec![];
        let got = clip_paper_sweep((-6.0, 2.0), 8.0, |g| -> Result<f64, ()> {
            seen.push(g);
            Ok(curve(g))
        })
        .unwrap();
        assert_eq!((got, seen.as_slice()), (best, asked));
    }
    // A range that is not a whole number of grid steps: the weak end itself is asked for in
    // the refinement (and nothing beyond it).
    let mut seen = vec![];
    let got = clip_paper_sweep((-5.0, 2.0), 8.0, |g| -> Result<f64, ()> {
        seen.push(g);
        Ok(-(g + 5.0).abs())
    });
    let asked = [2.0, 0.0, -2.0, -4.0, -3.0, -5.0, -4.5, -4.75, -4.875];
    assert_eq!((got, seen.as_slice()), (Ok(-5.0), asked.as_slice()));
    // No point is asked for twice, whatever the curve and range.
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..20 {
        let (lo, hi) = (rng.random_range(-9.0..-1.0), rng.random_range(0.0..3.0));
        let peak: f64 = rng.random_range(lo..hi);
        let mut seen: Vec<f64> = vec![];
        clip_paper_sweep((lo, hi), 16.0, |g| -> Result<f64, ()> {
            assert!(
                !seen.contains(&g) && (lo - 1e-9..=hi + 1e-9).contains(&g),
                "{g}"
            );
            seen.push(g);
            Ok(-(g - peak).abs())
        })
        .unwrap();
    }
    // Coarser resolution stops sooner; an error from a fit ends the sweep with it.
    let mut n = 0;
    let got = clip_paper_sweep((-6.0, 2.0), 2.0, |g| -> Result<f64, ()> {
        n += 1;
        Ok(-g.abs())
    });
    assert_eq!((got, n), (Ok(0.0), 5 + 2 * 2));
    let mut n = 0;
    let e = clip_paper_sweep((-6.0, 2.0), 8.0, |_| {
        n += 1;
        if n == 3 {
            Err("fit failed")
        } else {
            Ok(0.5)
        }
    });
    assert_eq!((e, n), (Err("fit failed"), 3));
}

#[test]
fn adamw_probe_takes_torch_adamw_steps_and_is_seeded() {
    // One full-batch step from the seeded initialisation: with Adam's bias corrections the
    // first update is lr * g / (|g| + eps) after the decoupled decay p *= 1 - lr * wd.
    let x = [0.3f32, -0.2, 0.9, -1.0, 0.5, 0.1];
    let data = LabelledFeatures::new(&x, 2, &[0, 1, 1], 2).unwrap();
    let tiny = AdamWProbe {
        lr: 1e-14,
        epochs: 1,
        batch_size: 3,
    };
    let p0: Vec<f64> = {
        let m = LogisticRegression::fit_adamw(&data, 2, 0.0, &tiny, 7).unwrap();
        params(&m)
    };
    let (_, g) = objective(&p0, &data, 2, 0.0).unwrap();
    let (lr, wd) = (0.05, 0.3);
    let step = AdamWProbe { lr, ..tiny };
    let m = LogisticRegression::fit_adamw(&data, 2, wd, &step, 7).unwrap();
    let p1 = params(&m);
    for ((a, p), g) in p1.iter().zip(&p0).zip(&g) {
        let want = p * (1.0 - lr * wd) - lr * g / (g.abs() + 1e-8);
        assert!((a - want).abs() < 1e-12, "{a} vs {want}");
    }
    assert_eq!(m.iterations, 1);
    // Same seed, same model; another seed, another initialisation and batch order.
    let recipe = AdamWProbe {
        batch_size: 2,
        ..AdamWProbe::default()
    };
    let a = LogisticRegression::fit_adamw(&data, 2, 1e-3, &recipe, 1).unwrap();
    let b = LogisticRegression::fit_adamw(&data, 2, 1e-3, &recipe, 1).unwrap();
    let c = LogisticRegression::fit_adamw(&data, 2, 1e-3, &recipe, 2).unwrap();
    assert_eq!(a.weights(), b.weights());
    assert_ne!(a.weights(), c.weights());
    assert_eq!(a.iterations, 10 * 2);
}

#[test]
fn clip_benchmark_probe_on_separable_classes_is_perfect_and_deterministic() {
    let classes = 5;
    let (train, test, _, _) = separable_sets(4, classes, 24);
    let opts = ProbeOptions {
        method: ProbeMethod::ClipBenchmark(AdamWProbe::default()),
        ..ProbeOptions::default()
    };
    let r = linear_probe(&train, &test, classes, &opts).unwrap();
    assert_eq!(r.test.top1, 1.0, "sweep {:?}", r.sweep);
    // 7 grid points, then at most two new ones per span (8, 4, 2, 1), each fitted once.
    assert!(r.sweep.len() >= 7 && r.sweep.len() <= 15, "{:?}", r.sweep);
    assert!((0..97).any(|i| clip_benchmark_weight_decay(i) == r.l2));
    let again = linear_probe(&train, &test, classes, &opts).unwrap();
    assert_eq!(
        (r.l2, &r.test.predictions),
        (again.l2, &again.test.predictions)
    );
    // Without a validation split: no search, weight decay 0 (CLIP_benchmark's rule).
    let none = ProbeOptions {
        validation_fraction: 0.0,
        ..opts.clone()
    };
    let r0 = linear_probe(&train, &test, classes, &none).unwrap();
    assert!(r0.sweep.is_empty() && r0.l2 == 0.0);
    // L-BFGS's sweep needs a validation split.
    let bad = ProbeOptions {
        validation_fraction: 0.0,
        ..ProbeOptions::default()
    };
    let e = linear_probe(&train, &test, classes, &bad).unwrap_err();
    assert!(e.to_string().contains("validation fraction 0"), "{e}");
}

#[test]
fn adamw_probe_follows_torch_adamw_over_the_cosine_schedule() {
    // torch.nn.Linear's initialisation drawn as the probe draws it (the weights row by row,
    // then the bias, uniform in +-1/sqrt(dim)), the rows shuffled each epoch by the same
    // generator and taken 4 at a time (two steps per epoch, the second of 2 rows), then
    // torch.optim.AdamW at CLIP_benchmark's cosine learning rate 0.5 (1 + cos(pi t / T)) lr
    // for step t of T.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (n, dim, classes) = (6, 16, 3);
    let x: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let data = LabelledFeatures::new(&x, dim, &[0, 1, 2, 0, 1, 2], classes).unwrap();
    let (lr, wd, epochs, batch_size, seed) = (0.1, 0.01, 3, 4, 5);
    let recipe = AdamWProbe {
        lr,
        epochs,
        batch_size,
    };
    let mut draws = ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (dim as f64).sqrt();
    let mut p: Vec<f64> = (0..classes * (dim + 1))
        .map(|_| draws.random_range(-bound..=bound))
        .collect();
    assert!(p.iter().any(|&v| v < -bound / 2.0) && p.iter().any(|&v| v > bound / 2.0));
    let (mut m, mut v) = (vec![0.0; p.len()], vec![0.0; p.len()]);
    let total = (epochs * 2) as f64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut t = 0;
    for _ in 0..epochs {
        order.shuffle(&mut draws);
        for batch in order.chunks(batch_size) {
            let lr_t = 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total).cos()) * lr;
            let (_, g) = objective(&p, &data.select(batch), classes, 0.0).unwrap();
            t += 1;
            let (b1, b2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
            for i in 0..p.len() {
                p[i] *= 1.0 - lr_t * wd;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                p[i] -= lr_t * (m[i] / b1) / ((v[i] / b2).sqrt() + 1e-8);
            }
        }
    }
    let fit = LogisticRegression::fit_adamw(&data, classes, wd, &recipe, seed).unwrap();
    let got = params(&fit);
    for (a, b) in got.iter().zip(&p) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
    assert_eq!(fit.iterations, t as u64);
    let loss = objective(&p, &data, classes, 0.0).unwrap().0;
    assert!((fit.loss - loss).abs() < 1e-9, "{} vs {loss}", fit.loss);
}

#[test]
fn probe_fits_refuse_what_they_cannot_fit() {
    let x = [1.0f32, 0.2, 0.9, -0.1, -1.0, 0.1, -0.8, 0.3];
    let data = LabelledFeatures::new(&x, 2, &[1, 1, 0, 0], 2).unwrap();
    let empty = LabelledFeatures::new(&[], 2, &[], 2).unwrap();
    let recipe = AdamWProbe::default();
    let refused = |r: Result<LogisticRegression, clipcid_eval::EvalError>, what: &str| {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    };
    for (rows, classes) in [(&empty, 2), (&data, 1)] {
        let what = "at least 2 classes";
        refused(LogisticRegression::fit(rows, classes, 1e-3, 50, None), what);
        refused(
            LogisticRegression::fit_adamw(rows, classes, 0.0, &recipe, 0),
            what,
        );
    }
    for bad in [-1e-3, f64::NAN, f64::INFINITY] {
        refused(
            LogisticRegression::fit(&data, 2, bad, 50, None),
            "L2 strength",
        );
        refused(
            LogisticRegression::fit_adamw(&data, 2, bad, &recipe, 0),
            "weight decay",
        );
    }
    for bad in [
        AdamWProbe { lr: 0.0, ..recipe },
        AdamWProbe {
            lr: f64::NAN,
            ..recipe
        },
        AdamWProbe {
            epochs: 0,
            ..recipe
        },
        AdamWProbe {
            batch_size: 0,
            ..recipe
        },
    ] {
        refused(
            LogisticRegression::fit_adamw(&data, 2, 0.0, &bad, 0),
            "AdamW probe needs",
        );
    }
    // A probe needs 2 training rows (one to fit, one to hold out), a validation fraction
    // below 1 and a sweep range it can walk.
    let opts = ProbeOptions {
        max_iterations: 50,
        ..ProbeOptions::default()
    };
    let one = data.select(&[0]);
    let e = linear_probe(&one, &data, 2, &opts).unwrap_err();
    assert!(e.to_string().contains("at least 2 training rows"), "{e}");
    let two = data.select(&[0, 2]);
    assert_eq!(
        linear_probe(&two, &data, 2, &opts).unwrap().sweep.len(),
        5 + 2 * 4 - 4
    );
    let all = ProbeOptions {
        validation_fraction: 1.0,
        ..opts.clone()
    };
    let e = linear_probe(&data, &data, 2, &all).unwrap_err();
    assert!(e.to_string().contains("validation fraction 1"), "{e}");
    for (range, per_decade) in [
        ((2.0, -6.0), 8.0),
        ((f64::NAN, 2.0), 8.0),
        ((-6.0, 2.0), 0.0),
    ] {
        let bad = ProbeOptions {
            log10_range: range,
            steps_per_decade: per_decade,
            ..opts.clone()
        };
        let e = linear_probe(&data, &data, 2, &bad).unwrap_err();
        assert!(e.to_string().contains("the L2 sweep needs"), "{e}");
    }
}

#[test]
fn retrieval_recall_matches_brute_force() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (images, texts) = (9, 20);
    let text_image: Vec<usize> = (0..texts).map(|j| j % images).collect();
    let ks = [1, 3, 5];
    // Distinct scores, then scores of 3 values (ties everywhere: a stable sort ranks a tie
    // by the lower index, the order the recall must count in), then all scores equal (a
    // collapsed model, which once scored 100% image -> text R@1).
    let distinct: Vec<f32> = (0..images * texts).map(|_| rng.random()).collect();
    let tied: Vec<f32> = (0..images * texts)
        .map(|_| rng.random_range(0..3u8) as f32)
        .collect();
    for sim in [distinct, tied, vec![0.25; images * texts]] {
        retrieval_against_brute_force(&sim, images, &text_image, &ks);
    }
    let sim = vec![0.0; images * texts];
    assert!(Retrieval::from_similarity(&sim, images, &[0, 99], &ks).is_err());
    // A matrix of another size, no captions, or no images: an error, not a recall of 0/0.
    assert!(Retrieval::from_similarity(&sim[..images * 3], images, &[0, 1], &ks).is_err());
    assert!(Retrieval::from_similarity(&[], images, &[], &ks).is_err());
    assert!(Retrieval::from_similarity(&[], 0, &[0], &ks).is_err());
}

/// `top_n`'s order is the one recall counts ranks in: for every entry, its position in the
/// full ordering is the number of entries that beat it (higher, or tied at a lower index);
/// NaN last, whatever its sign bit, and `-0.0` tied with `0.0`.
#[test]
fn top_n_ranks_as_recall_counts() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let values = [0.0f32, -0.0, 1.0, -1.0, f32::NAN, -f32::NAN, 0.5];
    for _ in 0..200 {
        let row: Vec<f32> = (0..9)
            .map(|_| values[rng.random_range(0..values.len())])
            .collect();
        let order = top_n(&row, row.len());
        let numbers = row.iter().filter(|v| !v.is_nan()).count();
        assert!(
            order[numbers..].iter().all(|&i| row[i].is_nan()),
            "{row:?}: {order:?}"
        );
        for (pos, &i) in order[..numbers].iter().enumerate() {
            let beaten_by = (0..row.len())
                .filter(|&k| row[k] > row[i] || (row[k] == row[i] && k < i))
                .count();
            assert_eq!(pos, beaten_by, "{row:?}: {order:?}");
        }
    }
}

fn retrieval_against_brute_force(sim: &[f32], images: usize, text_image: &[usize], ks: &[usize]) {
    let texts = text_image.len();
    let r = Retrieval::from_similarity(sim, images, text_image, ks).unwrap();
    for (ki, &k) in ks.iter().enumerate() {
        // Brute force by sorting.
        let mut hits = 0;
        for i in 0..images {
            let mut order: Vec<usize> = (0..texts).collect();
            order.sort_by(|&a, &b| sim[i * texts + b].total_cmp(&sim[i * texts + a]));
            hits += usize::from(order[..k].iter().any(|&j| text_image[j] == i));
        }
        assert_eq!(r.image_to_text[ki], hits as f64 / images as f64);
        let mut hits = 0;
        for j in 0..texts {
            let mut order: Vec<usize> = (0..images).collect();
            order.sort_by(|&a, &b| sim[b * texts + j].total_cmp(&sim[a * texts + j]));
            hits += usize::from(order[..k].contains(&text_image[j]));
        }
        assert_eq!(r.text_to_image[ki], hits as f64 / texts as f64);
    }
}

#[test]
fn average_precision_identical_disjoint_and_partial() {
    let t: Vec<usize> = (0..10).collect();
    assert_eq!(average_precision_at_n(&t, &t, 10), 1.0);
    let disjoint: Vec<usize> = (10..20).collect();
    assert_eq!(average_precision_at_n(&disjoint, &t, 10), 0.0);
    // Student ranks [0, 11, 1, 12, 2]; relevant {0..4}: hits at 1, 3, 5 -> (1 + 2/3 + 3/5) / 5.
    let ap = average_precision_at_n(&[0, 11, 1, 12, 2], &[0, 1, 2, 3, 4], 5);
    assert!((ap - (1.0 + 2.0 / 3.0 + 3.0 / 5.0) / 5.0).abs() < 1e-12);
    // Same set, other order: [1, 0] vs [0, 1] is still 1 (both hits at full precision).
    assert_eq!(average_precision_at_n(&[1, 0], &[0, 1], 2), 1.0);
    // Agreement of a model with itself over N = 10..20 is 1; with reversed scores it is 0.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let sim: Vec<f32> = (0..3 * 50).map(|_| rng.random()).collect();
    let a = Agreement::from_similarity(&sim, &sim, 50, 10..=20).unwrap();
    assert_eq!(a.mean_map, 1.0);
    assert_eq!(a.map_at_n.len(), 11);
    let neg: Vec<f32> = sim.iter().map(|v| -v).collect();
    let a = Agreement::from_similarity(&sim, &neg, 50, 10..=20).unwrap();
    assert_eq!(a.mean_map, 0.0);
    // Over 8 images, N = 10..20 ranks the whole pool: a model agrees fully with itself
    // (it scored 8/N, from 0.8 down to 0.4).
    let small: Vec<f32> = (0..3 * 8).map(|_| rng.random()).collect();
    let a = Agreement::from_similarity(&small, &small, 8, 10..=20).unwrap();
    assert!(a.map_at_n.iter().all(|&(_, m)| m == 1.0), "{a:?}");
    // Teacher and student over other numbers of queries or images are refused.
    assert!(Agreement::from_similarity(&small, &small[..16], 8, 10..=20).is_err());
    assert!(Agreement::from_similarity(&small, &small, 5, 10..=20).is_err());
    assert!(Agreement::from_similarity(&[], &[], 0, 10..=20).is_err());
}

#[test]
fn textness_fraction_rises_with_the_scale() {
    // Constructed embeddings: content directions for 4 topics, one textness axis. Half the
    // images of each topic show text (a component along the axis).
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let dim = 48;
    let basis = random_means(&mut rng, 5, dim);
    let (topics, axis) = (&basis[..4], &basis[4]);
    let normal = Normal::new(0.0f32, 0.06).unwrap();
    let make = |rng: &mut ChaCha8Rng, topic: usize, text: bool, strength: f32| -> Vec<f32> {
        (0..dim)
            .map(|d| {
                topics[topic][d] * strength
                    + if text { 0.6 * axis[d] } else { 0.0 }
                    + normal.sample(rng)
            })
            .collect()
    };
    let (mut pos, mut neg) = (vec![], vec![]);
    for i in 0..80 {
        pos.extend(make(&mut rng, i % 4, true, 1.0));
        neg.extend(make(&mut rng, i % 4, false, 1.0));
    }
    let dir = TextnessDirection::fit(
        &Features::normalized(pos, dim).unwrap(),
        &Features::normalized(neg, dim).unwrap(),
        1e-3,
    )
    .unwrap();
    assert_eq!(dir.train_accuracy, 1.0);
    let cos: f32 = dir.vector.iter().zip(axis).map(|(a, b)| a * b).sum();
    assert!(cos > 0.8, "direction vs planted axis cosine {cos}");
    // A search pool where text-bearing images are slightly less on-topic.
    let (mut pool, mut has_text) = (vec![], vec![]);
    for i in 0..200 {
        let text = i % 2 == 0;
        pool.extend(make(
            &mut rng,
            (i / 2) % 4,
            text,
            if text { 0.8 } else { 1.0 },
        ));
        has_text.push(text);
    }
    let pool = Features::normalized(pool, dim).unwrap();
    let queries = Features::normalized(topics.concat(), dim).unwrap();
    let scales = [-2.0, -1.0, 0.0, 1.0, 2.0];
    let rows = textness_sweep(&dir, &queries, &pool, &has_text, &scales, 10).unwrap();
    // Each row's fraction is its text-bearing share of the 4 x 10 images shown.
    for r in &rows {
        let shown: usize = r.top.iter().map(Vec::len).sum();
        let with_text = r.top.iter().flatten().filter(|&&i| has_text[i]).count();
        assert_eq!(shown, 40);
        assert_eq!(
            r.text_fraction,
            with_text as f64 / 40.0,
            "scale {}",
            r.scale
        );
    }
    let f: Vec<f64> = rows.iter().map(|r| r.text_fraction).collect();
    assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
    assert!(f[0] < 0.2 && f[4] > 0.8, "{f:?}");
    // A scale that is not a number, or a top of nothing, is refused (not a 0% row).
    for (scales, top, says) in [
        (&[0.0, f32::NAN][..], 10, "scale NaN"),
        (&[f32::INFINITY][..], 10, "scale inf"),
        (&scales[..], 0, "top 0"),
    ] {
        let e = textness_sweep(&dir, &queries, &pool, &has_text, scales, top)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{e}");
    }
    // Round trip through the file.
    let dir_path = tempfile::tempdir().unwrap();
    let p = dir_path.path().join("textness.safetensors");
    dir.save(&p).unwrap();
    let back = TextnessDirection::load(&p).unwrap();
    assert_eq!(back.vector, dir.vector);
    assert_eq!(back.raw_norm, dir.raw_norm);
}

/// The probe needs both kinds of image at one width, and refuses to call a zero weight row a
/// direction; a direction file must hold a unit vector.
#[test]
fn textness_direction_refuses_what_it_cannot_fit_or_load() {
    let f = |rows: &[[f32; 3]]| Features::normalized(rows.concat(), 3).unwrap();
    let (a, b) = (
        f(&[[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]]),
        f(&[[0.0, 1.0, 0.0]]),
    );
    let narrow = Features::normalized(vec![1.0, 0.0], 2).unwrap();
    let none = Features::normalized(vec![], 3).unwrap();
    for (pos, neg) in [(&a, &narrow), (&narrow, &a), (&none, &b), (&a, &none)] {
        let e = TextnessDirection::fit(pos, neg, 1e-3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("both kinds of the same width"), "{e}");
    }
    // The same images on both sides: nothing tells them apart, and the probe says so.
    let e = TextnessDirection::fit(&a, &a, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("learned nothing"), "{e}");
    assert!(TextnessDirection::fit(&a, &b, 1e-3).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("textness.safetensors");
    for v in [vec![0.6f32, 0.0, 0.0], vec![]] {
        let n = v.len();
        let t = candle_core::Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap();
        clipcid_store::io::write_safetensors(
            &path,
            [("textness".to_string(), t)],
            &Default::default(),
        )
        .unwrap();
        let e = TextnessDirection::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("not a unit vector") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }
}

/// Features refuse values that are not rows and non-finite values, keep zero rows zero, and
/// average row cosines as the demo's "image cosine to teacher" column reads them; the
/// zero-shot classifier refuses prompt embeddings that are not classes x templates; encoding
/// refuses a preprocessing of another size than the model takes.
#[test]
fn features_zero_shot_and_encoding_refuse_shapes_that_do_not_fit() {
    assert!(Features::normalized(vec![1.0; 5], 2).is_err());
    assert!(Features::normalized(vec![1.0; 4], 0).is_err());
    let e = Features::normalized(vec![1.0, f32::NAN], 2).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    let f = Features::normalized(vec![0.0, 0.0, 3.0, 4.0], 2).unwrap();
    assert_eq!(f.data, [0.0, 0.0, 0.6, 0.8]);
    let a = Features::normalized(vec![1.0, 0.0, 0.0, 1.0], 2).unwrap();
    let b = Features::normalized(vec![1.0, 0.0, 0.6, 0.8], 2).unwrap();
    // Row cosines 1 and 0.8.
    let mean = a.mean_row_cosine(&b).unwrap();
    assert!((mean - 0.9).abs() < 1e-6, "{mean}");
    let c = Features::normalized(vec![1.0, 0.0, 0.0], 3).unwrap();
    let one_row = Features::normalized(vec![1.0, 0.0], 2).unwrap();
    assert!(a.mean_row_cosine(&c).is_err());
    assert!(a.mean_row_cosine(&one_row).is_err());
    // 2 classes x 2 templates: each class's weight is its prompts' normalised mean.
    let text = Features::normalized(vec![1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], 2).unwrap();
    let zs = ZeroShotClassifier::from_text_features(&text, 2).unwrap();
    assert_eq!(zs.classes(), 2);
    let s = zs.scores(&a).unwrap();
    let h = std::f32::consts::FRAC_1_SQRT_2;
    assert!((s[0] - h).abs() < 1e-6 && s[1] == 0.0 && (s[2] - h).abs() < 1e-6 && s[3] == 1.0);
    for (rows, templates) in [(4, 0), (0, 2), (3, 2)] {
        let t = Features::normalized(vec![1.0; rows * 2], 2).unwrap();
        let e = ZeroShotClassifier::from_text_features(&t, templates).unwrap_err();
        assert!(e.to_string().contains("whole number of classes"), "{e}");
    }
    let cfg = clipcid_models::ClipConfig::preset("tiny").unwrap();
    let model = clipcid_models::ClipModel::random(&cfg, 1, &candle_core::Device::Cpu).unwrap();
    let size = model.config().vision_config.image_size;
    let img = image::RgbImage::from_pixel(20, 20, image::Rgb([10, 20, 30]));
    let other = clipcid_data::Preprocess::clip(size + 1);
    let e = clipcid_eval::encode_images(&model, &other, std::slice::from_ref(&img), 4).unwrap_err();
    assert!(e.to_string().contains("preprocessing makes"), "{e}");
    let right = clipcid_data::Preprocess::clip(size);
    let f = clipcid_eval::encode_images(&model, &right, &[img], 4).unwrap();
    assert_eq!(f.rows(), 1);
}

#[test]
fn rendered_text_changes_only_a_bounded_region() {
    let r = TextRenderer::dejavu_sans().unwrap();
    let img = image::RgbImage::from_pixel(96, 64, image::Rgb([120, 140, 160]));
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let out = r.render(&img, "OPEN 24H", &mut rng);
    let changed: Vec<(u32, u32)> = out
        .enumerate_pixels()
        .filter(|(x, y, p)| *p != img.get_pixel(*x, *y))
        .map(|(x, y, _)| (x, y))
        .collect();
    let frac = changed.len() as f64 / (96.0 * 64.0);
    assert!(frac > 0.03 && frac < 0.6, "changed fraction {frac}");
    // Same seed, same picture.
    let again = r.render(&img, "OPEN 24H", &mut ChaCha8Rng::seed_from_u64(7));
    assert_eq!(out, again);
    let e = TextRenderer::from_file(std::path::Path::new("Cargo.toml")).unwrap_err();
    assert!(
        e.to_string().contains("Cargo.toml") && e.to_string().contains("font"),
        "{e}"
    );
}

#[test]
fn textness_grids_carry_the_query_and_each_rows_scale() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<image::RgbImage> = (0..4u8)
        .map(|i| image::RgbImage::from_pixel(20, 20, image::Rgb([200, 40 * i, 90])))
        .collect();
    let rows = vec![
        (-1.0f32, vec![0, 1, 2]),
        (0.0, vec![1, 2, 3]),
        (1.0, vec![3, 2, 0]),
    ];
    let has_text = [false, true, false, true];
    let tile = 64;
    let draw = |name: &str, query: &str| {
        let path = dir.path().join(name);
        plot_textness_grid(&path, query, &rows, &images, &has_text, tile).unwrap();
        image::open(&path).unwrap().to_rgb8()
    };
    let a = draw("a.png", "a stop sign");
    let b = draw("b.png", "a dog in the snow");
    let title_h = tile / 2;
    let dark = |img: &image::RgbImage, x0: u32, y0: u32, w: u32, h: u32| {
        (y0..y0 + h)
            .flat_map(|y| (x0..x0 + w).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count()
    };
    // The title band holds text, and it is the query's: two queries differ there only.
    assert!(dark(&a, 0, 0, a.width(), title_h) > 50);
    let band_differs =
        (0..title_h).any(|y| (0..a.width()).any(|x| a.get_pixel(x, y) != b.get_pixel(x, y)));
    let rest_same = (title_h..a.height())
        .all(|y| (0..a.width()).all(|x| a.get_pixel(x, y) == b.get_pixel(x, y)));
    assert!(band_differs && rest_same);
    // Each row's label column holds its scale in text, different for each row.
    let label_w = tile * 3 / 2;
    let labels: Vec<Vec<u8>> = (0..3)
        .map(|r| {
            let y0 = title_h + r * (tile + 4);
            assert!(dark(&a, 0, y0, label_w, tile) > 30, "row {r} has no label");
            (y0..y0 + tile)
                .flat_map(|y| (0..label_w).map(move |x| (x, y)))
                .map(|(x, y)| a.get_pixel(x, y).0[0])
                .collect()
        })
        .collect();
    assert!(labels[0] != labels[1] && labels[1] != labels[2]);
}

#[test]
fn textness_study_adds_real_text_images_to_probe_and_pool() {
    let cfg = clipcid_models::ClipConfig::preset("tiny").unwrap();
    let model = clipcid_models::ClipModel::random(&cfg, 1, &candle_core::Device::Cpu).unwrap();
    let tok = clipcid_models::ClipTokenizer::byte_level(16).unwrap();
    let photos: Vec<image::RgbImage> = (0..8u8)
        .map(|i| image::RgbImage::from_pixel(48, 48, image::Rgb([30 * i, 200 - 20 * i, 90])))
        .collect();
    let renderer = clipcid_eval::TextRenderer::dejavu_sans().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let real: Vec<image::RgbImage> = ["SALE", "EXIT", "STOP"]
        .iter()
        .map(|w| renderer.render(&photos[0], w, &mut rng))
        .collect();
    let decoded =
        |i: image::RgbImage| clipcid_data::DecodedImage::from(image::DynamicImage::from(i));
    let opts = clipcid_eval::TextnessOptions {
        real_text_images: real.into_iter().map(decoded).collect(),
        scales: vec![0.0, 1.0],
        // More than the pool holds: every entry is shown, and the report says how many.
        top: 20,
        ..clipcid_eval::TextnessOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let photos: Vec<_> = photos.into_iter().map(decoded).collect();
    let run = |opts: &clipcid_eval::TextnessOptions,
               photos: &[clipcid_data::DecodedImage],
               queries: &[String],
               out: &std::path::Path| {
        clipcid_eval::textness_study(
            &model,
            &tok,
            &clipcid_data::Preprocess::clip(model.config().vision_config.image_size),
            photos,
            queries,
            &renderer,
            opts,
            out,
        )
    };
    let study = |opts: &clipcid_eval::TextnessOptions, out: &std::path::Path| {
        run(opts, &photos, &["a photo".to_string()], out)
    };
    // A photo among the real text images is refused: one picture on both sides of the probe.
    let mut both = opts.clone();
    both.real_text_images.push(photos[5].clone());
    let e = study(&both, &dir.path().join("both"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("real text image 3 has the pixels of image 5"),
        "{e}"
    );
    assert!(!dir.path().join("both").exists());
    // No words to draw, no scales, no queries, or fewer than 4 photos: refused before
    // anything is written.
    let mut no_words = opts.clone();
    no_words.words.clear();
    let mut no_scales = opts.clone();
    no_scales.scales.clear();
    let empty = dir.path().join("empty");
    let with = |photos: &[clipcid_data::DecodedImage], queries: &[String]| {
        run(&opts, photos, queries, &empty)
    };
    for (k, (r, says)) in [
        (study(&no_words, &empty), "needs queries, words and scales"),
        (study(&no_scales, &empty), "needs queries, words and scales"),
        (with(&photos, &[]), "needs queries, words and scales"),
        (
            with(&photos[..3], &["a photo".into()]),
            "at least 4 images, got 3",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(says), "case {k}: {e}");
    }
    assert!(!empty.exists());
    let r = study(&opts, dir.path()).unwrap();
    // 4 probe photos (+ 2 real text images), 4 pool photos x 2 (+ 1 real) = 9 entries.
    assert!(
        r.markdown.contains("plus 2 real text-bearing images")
            && r.markdown
                .contains("plus 1 real text-bearing images (9 entries)"),
        "{}",
        r.markdown
    );
    assert_eq!((r.probe_images, r.pool_images, r.rows.len()), (4, 4, 2));
    assert!(
        r.markdown.contains("| text-bearing in top 9 |"),
        "{}",
        r.markdown
    );
    assert!(r.rows.iter().all(|row| row.top[0].len() == 9));
}

/// `load_images` keeps what the preprocessing needs: a transparent text image (black
/// letters on a clear background whose hidden colour is black too) is encoded as
/// transformers takes it, over white, and as open_clip takes it, alpha dropped; a palette
/// GIF is resized by nearest neighbour under open_clip's rule. Converting to RGB at load
/// (what it did before) gives the open_clip features under both rules.
#[test]
fn loaded_images_keep_transparency_and_palettes_for_the_preprocessing() {
    let cfg = clipcid_models::ClipConfig::preset("tiny").unwrap();
    let model = clipcid_models::ClipModel::random(&cfg, 1, &candle_core::Device::Cpu).unwrap();
    let size = model.config().vision_config.image_size;
    let dir = tempfile::tempdir().unwrap();
    let renderer = clipcid_eval::TextRenderer::dejavu_sans().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let letters = renderer.render(
        &image::RgbImage::from_pixel(64, 48, image::Rgb([255; 3])),
        "EXIT",
        &mut rng,
    );
    // Alpha: opaque where a letter is drawn, clear elsewhere; colour black under both.
    let sign = image::RgbaImage::from_fn(64, 48, |x, y| {
        let ink = letters.get_pixel(x, y).0[0] < 128;
        image::Rgba([0, 0, 0, if ink { 255 } else { 0 }])
    });
    assert!(sign.pixels().any(|p| p.0[3] == 255) && sign.pixels().any(|p| p.0[3] == 0));
    sign.save(dir.path().join("a-sign.png")).unwrap();
    // Stripes one pixel wide in two colours, as a GIF (palette): nearest neighbour keeps
    // whole stripes, bicubic blurs them.
    let stripes = image::RgbImage::from_fn(64, 48, |x, _| {
        if x % 2 == 0 {
            image::Rgb([250, 20, 20])
        } else {
            image::Rgb([20, 20, 250])
        }
    });
    stripes.save(dir.path().join("b-stripes.gif")).unwrap();
    let loaded = clipcid_eval::load_images(dir.path()).unwrap();
    assert_eq!(loaded.len(), 2);
    assert!(loaded[0].image.color().has_alpha() && !loaded[0].indexed());
    assert!(loaded[1].indexed());
    for (p, rgb_sign) in [
        (clipcid_data::Preprocess::transformers(size), [255u8; 3]),
        (clipcid_data::Preprocess::open_clip(size), [0u8; 3]),
    ] {
        let got = clipcid_eval::encode_decoded_images(&model, &p, &loaded, 1).unwrap();
        // The sign as the preprocessing sees it: letters on white or on black. One image a
        // batch, so batches of other sizes cannot change the last bits.
        let seen = image::RgbImage::from_fn(64, 48, |x, y| {
            if sign.get_pixel(x, y).0[3] == 255 {
                image::Rgb([0; 3])
            } else {
                image::Rgb(rgb_sign)
            }
        });
        let want = clipcid_eval::encode_images(&model, &p, &[seen], 1).unwrap();
        assert_eq!(got.row(0), want.row(0), "{:?}", p.alpha);
        let as_rgb: Vec<image::RgbImage> = loaded.iter().map(|d| d.image.to_rgb8()).collect();
        let photo = clipcid_eval::encode_images(&model, &p, &as_rgb, 1).unwrap();
        let nearest = p.alpha == clipcid_data::AlphaRule::Drop;
        assert_eq!(got.row(1) != photo.row(1), nearest, "{:?}", p.alpha);
    }
}

#[test]
fn every_bundled_clip_benchmark_template_set_and_class_list_loads() {
    let names = clipcid_eval::clip_benchmark_datasets();
    assert!(names.len() >= 30, "{names:?}");
    for name in &names {
        let t = clipcid_eval::Templates::named(name)
            .unwrap_or_else(|e| panic!("templates of {name}: {e}"));
        for p in t.prompts("zebra") {
            assert!(p.contains("zebra") && !p.contains("{c}"), "{name}: {p}");
        }
    }
    // CLIP's cleaned ImageNet names: 1,000 labels (two names occur twice, as in CLIP's list).
    let imagenet = clipcid_eval::clip_benchmark_class_names("imagenet1k").unwrap();
    let unique: std::collections::BTreeSet<_> = imagenet.iter().collect();
    assert_eq!((imagenet.len(), unique.len()), (1000, 998));
    assert_eq!(clipcid_eval::Templates::named("cifar10").unwrap().len(), 18);
}

/// A template file (`--templates FILE`): one template per line, blank lines and `#` lines
/// left out, each line trimmed; a file of no templates, or a line without the class name's
/// place, is refused naming the file.
#[test]
fn template_files_skip_blank_and_comment_lines() {
    use clipcid_eval::Templates;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("templates.txt");
    std::fs::write(&path, "# mine\n\na photo of {}.\n   a {c} drawing  \n\n").unwrap();
    let t = Templates::parse(path.to_str().unwrap()).unwrap();
    assert_eq!(t.prompts("cat"), ["a photo of cat.", "a cat drawing"]);
    for text in ["# only a comment\n\n", "a photo of {}.\na photo\n"] {
        std::fs::write(&path, text).unwrap();
        let e = Templates::from_file(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
}

/// A dataset encoded a few images at a time (each batch's features copied back after the
/// next batch is decoded) gives the rows, keys, labels and skips of one batch.
#[test]
fn encoding_a_dataset_in_batches_gives_the_one_batch_rows_in_order() {
    use candle_core::Device;
    use clipcid_data::{Dataset, Preprocess};
    use clipcid_models::{ClipConfig, ClipModel};
    let dir = tempfile::tempdir().unwrap();
    for (class, n) in [("cat", 4u8), ("dog", 3)] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(40, 36, |x, y| {
                image::Rgb([i * 40, x as u8 * 5, y as u8 * (3 + n)])
            });
            img.save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    std::fs::write(dir.path().join("dog/broken.png"), b"not a png").unwrap();
    let data = Dataset::open(dir.path()).unwrap();
    let cfg = ClipConfig::preset("tiny").unwrap();
    let model = ClipModel::random(&cfg, 3, &Device::Cpu).unwrap();
    let pre = Preprocess::clip(cfg.vision_config.image_size);
    let whole = clipcid_eval::encode_dataset(&model, &pre, &data, 64).unwrap();
    assert_eq!(whole.keys.len(), 7);
    assert_eq!(whole.skipped.len(), 1);
    for batch in [1, 2, 3] {
        let parts = clipcid_eval::encode_dataset(&model, &pre, &data, batch).unwrap();
        assert_eq!(parts.keys, whole.keys, "batch {batch}");
        assert_eq!(parts.labels, whole.labels, "batch {batch}");
        assert_eq!(parts.skipped, whole.skipped, "batch {batch}");
        let (a, b) = (&parts.features.data, &whole.features.data);
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "batch {batch}: rows differ by {worst}");
    }
}
