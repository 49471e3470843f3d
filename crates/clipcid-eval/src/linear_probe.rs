//! Linear probe: multinomial logistic regression on frozen image features, fitted with
//! L-BFGS (argmin's, More-Thuente line search), the L2 strength chosen on a validation split
//! by the parametric sweep of CLIP's paper (appendix A.3).
//!
//! The objective is the mean cross-entropy plus `l2 / 2 * ||W||^2` (the bias is not
//! penalised), so `l2 = 1 / (C * n)` matches scikit-learn's `LogisticRegression(C=C)` on `n`
//! samples. The products run in f64 through ndarray's BLAS (the system OpenBLAS).

use std::sync::Mutex;

use argmin::core::{CostFunction, Executor, Gradient, State};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::{Classification, EvalError};

/// Row-major features `[n, dim]` with a class per row.
#[derive(Debug, Clone)]
pub struct LabelledFeatures {
    x: Array2<f64>,
    y: Vec<usize>,
}

impl LabelledFeatures {
    /// Checks shapes, labels (`< classes`) and finiteness.
    pub fn new(
        features: &[f32],
        dim: usize,
        labels: &[usize],
        classes: usize,
    ) -> Result<Self, EvalError> {
        if dim == 0 || features.len() != labels.len() * dim {
            return Err(EvalError::Input(format!(
                "{} feature values are not {} rows of width {dim}",
                features.len(),
                labels.len()
            )));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(EvalError::Input(format!(
                "feature row {} holds a non-finite value",
                i / dim
            )));
        }
        if let Some(&c) = labels.iter().find(|&&c| c >= classes) {
            return Err(EvalError::Input(format!(
                "label {c} is out of range for {classes} classes"
            )));
        }
        let x = Array2::from_shape_vec(
            (labels.len(), dim),
            features.iter().map(|&v| v as f64).collect(),
        )
        .map_err(|e| EvalError::Input(e.to_string()))?;
        Ok(Self {
            x,
            y: labels.to_vec(),
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Feature width.
    pub fn dim(&self) -> usize {
        self.x.ncols()
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Self {
        Self {
            x: self.x.select(Axis(0), idx),
            y: idx.iter().map(|&i| self.y[i]).collect(),
        }
    }

    /// The labels.
    pub fn labels(&self) -> &[usize] {
        &self.y
    }
}

/// The objective and its gradient at `params` = `[W (classes x dim, row-major), b (classes)]`:
/// `mean_i [logsumexp(W x_i + b) - (W x_i + b)_{y_i}] + l2 / 2 * ||W||^2`.
pub fn objective(
    params: &[f64],
    data: &LabelledFeatures,
    classes: usize,
    l2: f64,
) -> Result<(f64, Vec<f64>), EvalError> {
    let d = data.dim();
    if params.len() != classes * (d + 1) {
        return Err(EvalError::Input(format!(
            "{} parameters do not fit {classes} classes x {d} features + bias",
            params.len()
        )));
    }
    let w = ArrayView2::from_shape((classes, d), &params[..classes * d])
        .map_err(|e| EvalError::Input(e.to_string()))?;
    let b = ArrayView1::from(&params[classes * d..]);
    let mut probs = data.x.dot(&w.t()) + b;
    let n = data.len().max(1) as f64;
    let mut loss = 0.0;
    for (mut row, &y) in probs.rows_mut().into_iter().zip(&data.y) {
        let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
        loss += lse - row[y];
        row.mapv_inplace(|v| (v - lse).exp() / n);
        row[y] -= 1.0 / n;
    }
    let loss = loss / n + 0.5 * l2 * w.iter().map(|v| v * v).sum::<f64>();
    let gw = probs.t().dot(&data.x) + &(&w * l2);
    let gb = probs.sum_axis(Axis(0));
    let mut grad = gw.into_raw_vec_and_offset().0;
    grad.extend(gb.iter());
    Ok((loss, grad))
}

/// The argmin problem; caches the last evaluation since the line search asks for the cost
/// and the gradient at the same point separately.
/// The point last evaluated, its objective and its gradient.
type Evaluation = (Vec<f64>, f64, Vec<f64>);

struct Problem<'a> {
    data: &'a LabelledFeatures,
    classes: usize,
    l2: f64,
    last: Mutex<Option<Evaluation>>,
}

impl Problem<'_> {
    fn eval(&self, p: &[f64]) -> Result<(f64, Vec<f64>), argmin::core::Error> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((q, f, g)) = last.as_ref() {
            if q.as_slice() == p {
                return Ok((*f, g.clone()));
            }
        }
        let (f, g) = objective(p, self.data, self.classes, self.l2)?;
        if !f.is_finite() {
            return Err(EvalError::Input("the linear-probe loss became non-finite".into()).into());
        }
        *last = Some((p.to_vec(), f, g.clone()));
        Ok((f, g))
    }
}

impl CostFunction for Problem<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Vec<f64>) -> Result<f64, argmin::core::Error> {
        Ok(self.eval(p)?.0)
    }
}

impl Gradient for Problem<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Vec<f64>) -> Result<Vec<f64>, argmin::core::Error> {
        Ok(self.eval(p)?.1)
    }
}

/// L-BFGS stops when the gradient's L2 norm is this small: scikit-learn's default `tol`
/// (which bounds the largest gradient component of the same mean-loss objective, so this is
/// a little stricter).
pub const GRADIENT_TOLERANCE: f64 = 1e-4;

/// A fitted multinomial logistic regression.
///
/// ```
/// use clipcid_eval::{LabelledFeatures, LogisticRegression};
/// // Two classes split by the sign of the first feature.
/// let x = [1.0, 0.2, 0.9, -0.1, -1.0, 0.1, -0.8, 0.3];
/// let data = LabelledFeatures::new(&x, 2, &[1, 1, 0, 0], 2).unwrap();
/// let fit = LogisticRegression::fit(&data, 2, 1e-3, 200, None).unwrap();
/// assert_eq!(fit.predict(&data), vec![1, 1, 0, 0]);
/// ```
#[derive(Debug, Clone, Serialize)]
pub struct LogisticRegression {
    classes: usize,
    dim: usize,
    /// `[W, b]` as in [`objective`].
    params: Vec<f64>,
    /// The L2 strength it was fitted with.
    pub l2: f64,
    /// L-BFGS iterations used.
    pub iterations: u64,
    /// The objective at the solution.
    pub loss: f64,
}

impl LogisticRegression {
    /// Fits by L-BFGS (memory 10) from zero, or from `warm` (a previous fit of the same
    /// shape), for at most `max_iterations`, stopping when the gradient's L2 norm falls to
    /// [`GRADIENT_TOLERANCE`] (or the objective stops changing).
    pub fn fit(
        data: &LabelledFeatures,
        classes: usize,
        l2: f64,
        max_iterations: u64,
        warm: Option<&LogisticRegression>,
    ) -> Result<Self, EvalError> {
        check_fit(data, classes, "L2 strength", l2)?;
        let dim = data.dim();
        let init = match warm {
            Some(w) if w.classes == classes && w.dim == dim => w.params.clone(),
            _ => vec![0.0; classes * (dim + 1)],
        };
        let problem = Problem {
            data,
            classes,
            l2,
            last: Mutex::new(None),
        };
        let solver = LBFGS::new(MoreThuenteLineSearch::new(), 10)
            .with_tolerance_grad(GRADIENT_TOLERANCE)
            .and_then(|s| s.with_tolerance_cost(1e-12))
            .map_err(|e| EvalError::Input(e.to_string()))?;
        let res = Executor::new(problem, solver)
            .configure(|s| s.param(init).max_iters(max_iterations))
            .run()
            .map_err(|e| EvalError::Input(format!("L-BFGS failed: {e}")))?;
        let state = res.state();
        let params = state
            .get_best_param()
            .cloned()
            .ok_or_else(|| EvalError::Input("L-BFGS returned no parameters".into()))?;
        Ok(Self {
            classes,
            dim,
            params,
            l2,
            iterations: state.get_iter(),
            loss: state.get_best_cost(),
        })
    }

    /// The weight matrix `[classes, dim]`.
    pub fn weights(&self) -> ArrayView2<'_, f64> {
        ArrayView2::from_shape(
            (self.classes, self.dim),
            &self.params[..self.classes * self.dim],
        )
        .expect("params hold classes x dim weights by construction")
    }

    /// The bias `[classes]`.
    pub fn bias(&self) -> &[f64] {
        &self.params[self.classes * self.dim..]
    }

    /// Class scores (logits) `[n, classes]`, row-major.
    pub fn scores(&self, data: &LabelledFeatures) -> Vec<f32> {
        let b = Array1::from(self.bias().to_vec());
        (data.x.dot(&self.weights().t()) + &b)
            .iter()
            .map(|&v| v as f32)
            .collect()
    }

    /// The best class of each row.
    pub fn predict(&self, data: &LabelledFeatures) -> Vec<usize> {
        self.scores(data)
            .chunks_exact(self.classes)
            .map(crate::metrics::argmax)
            .collect()
    }

    /// Fraction of rows predicted right.
    pub fn accuracy(&self, data: &LabelledFeatures) -> f64 {
        let p = self.predict(data);
        p.iter().zip(data.labels()).filter(|(a, b)| a == b).count() as f64
            / data.len().max(1) as f64
    }
}

/// CLIP_benchmark's linear-probe training (`clip_benchmark/metrics/linear_probe.py`): a
/// linear layer (PyTorch's default initialisation, seeded) trained with AdamW (betas 0.9 and
/// 0.999, eps 1e-8, decoupled weight decay on the weight and the bias) on mean cross-entropy,
/// in shuffled mini-batches, with a cosine learning rate from `lr` to 0 over all steps and no
/// warm-up. Its defaults are CLIP_benchmark's command-line defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWProbe {
    /// Peak learning rate (`--fewshot_lr`, 0.1).
    pub lr: f64,
    /// Passes over the training rows (`--fewshot_epochs`, 10).
    pub epochs: usize,
    /// Rows per step (`--batch_size`, 64).
    pub batch_size: usize,
}

impl Default for AdamWProbe {
    fn default() -> Self {
        Self {
            lr: 0.1,
            epochs: 10,
            batch_size: 64,
        }
    }
}

/// How [`linear_probe`] fits and what it sweeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProbeMethod {
    /// CLIP's paper (appendix A.3): L-BFGS to the optimum of the L2-regularised objective,
    /// the L2 strength swept on a log grid refined around the best value.
    Lbfgs,
    /// CLIP_benchmark's: AdamW for a fixed number of epochs, the weight decay swept over
    /// `logspace(-6, 2, 97)` (7 points, then spans 8, 4, 2, 1 around the peak), the final
    /// model trained on train + validation. Without a validation split (fraction 0) the
    /// weight decay is 0, as CLIP_benchmark does.
    ClipBenchmark(AdamWProbe),
}

impl LogisticRegression {
    /// Trains by [`AdamWProbe`]'s recipe with decoupled weight decay `weight_decay`, from
    /// PyTorch's default initialisation drawn with `seed` (which also shuffles the batches);
    /// the same seed gives the same model.
    pub fn fit_adamw(
        data: &LabelledFeatures,
        classes: usize,
        weight_decay: f64,
        recipe: &AdamWProbe,
        seed: u64,
    ) -> Result<Self, EvalError> {
        check_fit(data, classes, "weight decay", weight_decay)?;
        if !(recipe.lr.is_finite() && recipe.lr > 0.0)
            || recipe.epochs == 0
            || recipe.batch_size == 0
        {
            return Err(EvalError::Input(format!(
                "AdamW probe needs lr > 0, epochs > 0 and batch size > 0, not {recipe:?}"
            )));
        }
        let (n, dim) = (data.len(), data.dim());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // torch.nn.Linear's initialisation: weight and bias uniform in +-1/sqrt(fan_in).
        let bound = 1.0 / (dim.max(1) as f64).sqrt();
        let mut params: Vec<f64> = (0..classes * (dim + 1))
            .map(|_| rng.random_range(-bound..=bound))
            .collect();
        let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let mut m = vec![0.0; params.len()];
        let mut v = vec![0.0; params.len()];
        let steps_per_epoch = n.div_ceil(recipe.batch_size);
        let total = (recipe.epochs * steps_per_epoch) as f64;
        let mut order: Vec<usize> = (0..n).collect();
        let mut step = 0usize;
        for _ in 0..recipe.epochs {
            order.shuffle(&mut rng);
            for batch in order.chunks(recipe.batch_size) {
                let lr =
                    0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total).cos()) * recipe.lr;
                let (loss, grad) = objective(&params, &data.select(batch), classes, 0.0)?;
                if !loss.is_finite() {
                    return Err(EvalError::Input(format!(
                        "the AdamW linear probe diverged (loss {loss}) at step {step}, \
                         weight decay {weight_decay}"
                    )));
                }
                step += 1;
                let (bc1, bc2) = (1.0 - beta1.powi(step as i32), 1.0 - beta2.powi(step as i32));
                for (((p, g), m), v) in params.iter_mut().zip(&grad).zip(&mut m).zip(&mut v) {
                    *p *= 1.0 - lr * weight_decay;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *p -= lr / bc1 * *m / (v.sqrt() / bc2.sqrt() + eps);
                }
            }
        }
        let loss = objective(&params, data, classes, 0.0)?.0;
        Ok(Self {
            classes,
            dim,
            params,
            l2: weight_decay,
            iterations: step as u64,
            loss,
        })
    }
}

/// Number of weight decays in CLIP_benchmark's grid, `numpy.logspace(-6, 2, 97)`.
pub const CLIP_BENCHMARK_GRID: usize = 97;

/// Weight decay `i` of CLIP_benchmark's grid: `10^(-6 + 8 i / 96)`.
pub fn clip_benchmark_weight_decay(i: usize) -> f64 {
    10f64.powf(-6.0 + 8.0 * i as f64 / (CLIP_BENCHMARK_GRID - 1) as f64)
}

/// CLIP_benchmark's weight-decay search over grid indices: `accuracy(i)` is asked for
/// indices 0, 16, ..., 96, then for `[peak - s, peak, peak + s]` (clamped) with s = 8, 4, 2,
/// 1, in that order, as `find_peak` asks; the first strictly better accuracy wins (the peak
/// starts at index 0 with accuracy 0). Returns the final peak index.
pub fn clip_benchmark_sweep<E>(
    mut accuracy: impl FnMut(usize) -> Result<f64, E>,
) -> Result<usize, E> {
    let last = CLIP_BENCHMARK_GRID - 1;
    let mut find_peak = |idxs: &[usize]| -> Result<usize, E> {
        let (mut best, mut max_acc) = (0, 0.0);
        for &i in idxs {
            let acc = accuracy(i)?;
            if max_acc < acc {
                (best, max_acc) = (i, acc);
            }
        }
        Ok(best)
    };
    let mut peak = find_peak(&[0, 16, 32, 48, 64, 80, 96])?;
    let mut span = 8;
    while span > 0 {
        let (left, right) = (peak.saturating_sub(span), (peak + span).min(last));
        peak = find_peak(&[left, peak, right])?;
        span /= 2;
    }
    Ok(peak)
}

/// CLIP's L2-strength search (its paper's appendix A.3) over `log10` of the strength, in
/// `log10_range = (lo, hi)`: `accuracy(g)` is asked for the grid `hi, hi - 2, ...` down to
/// `lo` (strong to weak), then, with the step halved each round until it is
/// `1 / steps_per_decade`, for `best + step` and `best - step` in that order (those outside
/// the range are skipped). A strictly better accuracy moves the best point; ties go to the
/// stronger L2 (the larger `g`). Returns the best `g`. No point is asked for twice: each
/// point of a refinement round lies an odd number of its steps from `hi`, every earlier
/// point an even number.
///
/// ```
/// use clipcid_eval::clip_paper_sweep;
/// let mut asked = vec![];
/// let best = clip_paper_sweep((-6.0, 2.0), 8.0, |g| -> Result<f64, ()> {
///     asked.push(g);
///     Ok(-(g + 3.3f64).powi(2))
/// })
/// .unwrap();
/// assert_eq!(best, -3.25);
/// assert_eq!(asked[..5], [2.0, 0.0, -2.0, -4.0, -6.0]);
/// ```
pub fn clip_paper_sweep<E>(
    log10_range: (f64, f64),
    steps_per_decade: f64,
    mut accuracy: impl FnMut(f64) -> Result<f64, E>,
) -> Result<f64, E> {
    let (lo, hi) = log10_range;
    let mut step = 2.0;
    let mut best = (f64::NEG_INFINITY, hi);
    let mut g = hi;
    while g >= lo - 1e-9 {
        let acc = accuracy(g)?;
        if acc > best.0 {
            best = (acc, g);
        }
        g -= step;
    }
    while step > 1.0 / steps_per_decade + 1e-9 {
        step /= 2.0;
        let centre = best.1;
        for g in [centre + step, centre - step] {
            if g < lo - 1e-9 || g > hi + 1e-9 {
                continue;
            }
            let acc = accuracy(g)?;
            if acc > best.0 || (acc == best.0 && g > best.1) {
                best = (acc, g);
            }
        }
    }
    Ok(best.1)
}

/// Options of [`linear_probe`].
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Fraction of the training rows held out to choose the L2 strength.
    pub validation_fraction: f64,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// L-BFGS iterations per fit.
    pub max_iterations: u64,
    /// log10 of the smallest and largest L2 strength of the sweep.
    pub log10_range: (f64, f64),
    /// Resolution the sweep refines to, in steps per decade (CLIP: 8).
    pub steps_per_decade: f64,
    /// How each model is fitted and what the sweep varies.
    pub method: ProbeMethod,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            validation_fraction: 0.2,
            seed: 0,
            max_iterations: 1000,
            log10_range: (-6.0, 2.0),
            steps_per_decade: 8.0,
            method: ProbeMethod::Lbfgs,
        }
    }
}

/// A linear-probe result.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    /// `(l2, validation accuracy)` of every fit of the sweep, in the order tried (the weight
    /// decay in place of the L2 strength for [`ProbeMethod::ClipBenchmark`]).
    pub sweep: Vec<(f64, f64)>,
    /// The chosen L2 strength (weight decay for [`ProbeMethod::ClipBenchmark`]).
    pub l2: f64,
    /// The final model, refitted on all training rows with `l2`.
    pub model: LogisticRegression,
    /// Test-split scores.
    pub test: Classification,
}

/// A linear probe by `opts.method`. [`ProbeMethod::Lbfgs`], CLIP's protocol: hold out
/// `validation_fraction` of `train`, sweep the L2 strength by [`clip_paper_sweep`] (a log
/// grid two decades apart, then the step halved around the best value until
/// `steps_per_decade` is reached; ties go to the stronger L2); refit on all of `train` with
/// the winner and score `test`.
/// [`ProbeMethod::ClipBenchmark`]: the same held-out split, CLIP_benchmark's weight-decay
/// search ([`clip_benchmark_sweep`]) with [`LogisticRegression::fit_adamw`], the final model
/// trained on all of `train`; with `validation_fraction` 0, no search and weight decay 0.
pub fn linear_probe(
    train: &LabelledFeatures,
    test: &LabelledFeatures,
    classes: usize,
    opts: &ProbeOptions,
) -> Result<ProbeResult, EvalError> {
    if train.dim() != test.dim() {
        return Err(EvalError::Input(format!(
            "train features are {}-wide, test features {}-wide",
            train.dim(),
            test.dim()
        )));
    }
    if train.len() < 2 {
        return Err(EvalError::Input(
            "a linear probe needs at least 2 training rows".into(),
        ));
    }
    let f = opts.validation_fraction;
    let no_validation_ok = matches!(opts.method, ProbeMethod::ClipBenchmark(_)) && f == 0.0;
    let in_range = f > 0.0 && f < 1.0;
    if !(in_range || no_validation_ok) {
        return Err(EvalError::Input(format!(
            "validation fraction {f} is not in (0, 1) (0 is allowed with CLIP_benchmark's method: no weight-decay search)"
        )));
    }
    if let ProbeMethod::ClipBenchmark(recipe) = opts.method {
        return clip_benchmark_probe(train, test, classes, opts, &recipe);
    }
    let ((lo, hi), per_decade) = (opts.log10_range, opts.steps_per_decade);
    if !(lo.is_finite() && hi.is_finite() && lo <= hi && per_decade.is_finite() && per_decade > 0.0)
    {
        return Err(EvalError::Input(format!(
            "the L2 sweep needs a finite log10 range low <= high and steps per decade > 0, \
             not ({lo}, {hi}) and {per_decade}"
        )));
    }
    let (fit_set, val_set) = validation_split(train, opts);
    let mut sweep: Vec<(f64, f64)> = vec![];
    // The grid runs strong to weak: each fit warm-starts the next, less regular one.
    let mut warm: Option<LogisticRegression> = None;
    let best = clip_paper_sweep((lo, hi), per_decade, |log10| {
        let l2 = 10f64.powf(log10);
        let m = LogisticRegression::fit(&fit_set, classes, l2, opts.max_iterations, warm.as_ref())?;
        let acc = m.accuracy(&val_set);
        warm = Some(m);
        sweep.push((l2, acc));
        Ok::<f64, EvalError>(acc)
    })?;
    let l2 = 10f64.powf(best);
    let model = LogisticRegression::fit(train, classes, l2, opts.max_iterations, warm.as_ref())?;
    let test_scores = Classification::from_scores(&model.scores(test), classes, test.labels())?;
    Ok(ProbeResult {
        sweep,
        l2,
        model,
        test: test_scores,
    })
}

/// [`linear_probe`] by [`ProbeMethod::ClipBenchmark`].
fn clip_benchmark_probe(
    train: &LabelledFeatures,
    test: &LabelledFeatures,
    classes: usize,
    opts: &ProbeOptions,
    recipe: &AdamWProbe,
) -> Result<ProbeResult, EvalError> {
    let mut sweep: Vec<(f64, f64)> = vec![];
    let weight_decay = if opts.validation_fraction == 0.0 {
        0.0
    } else {
        let (fit_set, val_set) = validation_split(train, opts);
        // Every fit uses the same seed (CLIP_benchmark seeds each training alike), so a
        // grid point asked for twice gives the same accuracy: each is fitted once.
        let mut accuracy_at = vec![None; CLIP_BENCHMARK_GRID];
        let peak = clip_benchmark_sweep(|i| -> Result<f64, EvalError> {
            if let Some(acc) = accuracy_at[i] {
                return Ok(acc);
            }
            let wd = clip_benchmark_weight_decay(i);
            let m = LogisticRegression::fit_adamw(&fit_set, classes, wd, recipe, opts.seed)?;
            let acc = m.accuracy(&val_set);
            accuracy_at[i] = Some(acc);
            sweep.push((wd, acc));
            Ok(acc)
        })?;
        clip_benchmark_weight_decay(peak)
    };
    let model = LogisticRegression::fit_adamw(train, classes, weight_decay, recipe, opts.seed)?;
    let test_scores = Classification::from_scores(&model.scores(test), classes, test.labels())?;
    Ok(ProbeResult {
        sweep,
        l2: weight_decay,
        model,
        test: test_scores,
    })
}

/// The rows fitted on and the rows held out (`opts.validation_fraction` of `train`, at least
/// one each, drawn with `opts.seed`).
fn validation_split(
    train: &LabelledFeatures,
    opts: &ProbeOptions,
) -> (LabelledFeatures, LabelledFeatures) {
    let mut idx: Vec<usize> = (0..train.len()).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed));
    let n_val = ((train.len() as f64 * opts.validation_fraction).round() as usize)
        .clamp(1, train.len().saturating_sub(1).max(1));
    let (val_idx, fit_idx) = idx.split_at(n_val);
    (train.select(fit_idx), train.select(val_idx))
}

/// A fit needs rows, two classes and a regularisation strength `>= 0` (named `what`).
fn check_fit(
    data: &LabelledFeatures,
    classes: usize,
    what: &str,
    strength: f64,
) -> Result<(), EvalError> {
    if data.is_empty() || classes < 2 {
        return Err(EvalError::Input(format!(
            "a linear probe needs rows and at least 2 classes ({} rows, {classes} classes)",
            data.len()
        )));
    }
    if !(strength.is_finite() && strength >= 0.0) {
        return Err(EvalError::Input(format!("{what} {strength} is not >= 0")));
    }
    Ok(())
}
