//! PartialFC margin softmax over sampled class centres, and CLIP-CID's cluster-level loss.

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{cross_entropy, normalize, KlDistill, LossError};

/// Margin applied to the target class's cosine before scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", content = "m")]
pub enum Margin {
    /// Plain normalised softmax: the target logit is `cos(theta)`.
    #[default]
    None,
    /// ArcFace additive angular margin: `cos(theta + m)` (InsightFace's form: when
    /// `theta + m` would pass pi, `cos(theta) - m sin(m)` keeps it monotonic).
    ArcFace(f64),
    /// CosFace additive cosine margin: `cos(theta) - m`.
    CosFace(f64),
}

/// Which class centres take part in one step, and the batch labels renumbered into them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampled {
    /// Class ids, ascending: every label of the batch plus sampled negatives.
    pub index: Vec<u32>,
    /// Each batch label's position in `index`.
    pub labels: Vec<u32>,
}

/// What [`PartialFc::forward`] computed.
#[derive(Debug, Clone)]
pub struct PartialFcOutput {
    /// Mean margin-softmax cross-entropy (scalar).
    pub loss: Tensor,
    /// `normalize(x) . normalize(W_sampled)^T`, `[B, S]`, before margin and scale.
    pub cosine: Tensor,
    /// The sampled centres.
    pub sampled: Sampled,
}

/// PartialFC (An et al. 2022): a softmax classifier over `K` class centres `W` `[K, D]`
/// (initialised from the k-means centroids: without that init cluster distillation
/// collapses) where each step uses only the centres of the batch's labels plus a random
/// `sample_rate` share of the others.
///
/// With sampled centres `W_S` and `cos = normalize(x) normalize(W_S)^T`, the target entry
/// of each row gets the [`Margin`], everything is multiplied by `scale`, and the loss is the
/// mean softmax cross-entropy against the labels renumbered into `S`. Only sampled rows of
/// `W` receive gradient. Sampling is drawn from a ChaCha8 generator seeded at construction,
/// so a run is reproducible; `sample_rate >= 1` is the full softmax.
#[derive(Debug)]
pub struct PartialFc {
    weight: Var,
    /// Share of the `K` centres used per step (positives are always in).
    pub sample_rate: f64,
    /// Logit scale `s` applied after the margin.
    pub scale: f64,
    /// Target-class margin.
    pub margin: Margin,
    rng: ChaCha8Rng,
}

impl PartialFc {
    /// Centres start as a copy of `centroids` `[K, D]` (a trainable [`Var`]).
    pub fn new(
        centroids: &Tensor,
        sample_rate: f64,
        scale: f64,
        margin: Margin,
        seed: u64,
    ) -> Result<Self, LossError> {
        let (k, _) = centroids.dims2().map_err(|_| {
            LossError::Config(format!(
                "PartialFc: centroids must be [K, D], got {:?}",
                centroids.dims()
            ))
        })?;
        if k == 0 {
            return Err(LossError::Config("PartialFc: no class centres".into()));
        }
        if !(sample_rate > 0.0 && sample_rate.is_finite()) {
            return Err(LossError::Config(format!(
                "PartialFc: sample rate must be in (0, 1], got {sample_rate}"
            )));
        }
        Ok(Self {
            weight: Var::from_tensor(&centroids.copy()?)?,
            sample_rate,
            scale,
            margin,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The trainable centres `[K, D]` (hand them to the optimiser).
    pub fn weight(&self) -> &Var {
        &self.weight
    }

    /// Position of the sampling generator in its stream, for a checkpoint: with the same
    /// seed, [`PartialFc::set_rng_position`] resumes the exact sequence of draws.
    pub fn rng_position(&self) -> u128 {
        self.rng.get_word_pos()
    }

    /// Moves the sampling generator to a position [`PartialFc::rng_position`] returned.
    pub fn set_rng_position(&mut self, position: u128) {
        self.rng.set_word_pos(position);
    }

    /// Number of classes `K`.
    pub fn num_classes(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Draws this step's centres: all labels of the batch, then negatives uniformly without
    /// replacement until `max(ceil(sample_rate * K), positives)` centres are chosen.
    pub fn sample(&mut self, labels: &[u32]) -> Result<Sampled, LossError> {
        let k = self.num_classes();
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= k) {
            return Err(LossError::Config(format!(
                "PartialFc: label {bad} is out of range for {k} classes"
            )));
        }
        let mut positives: Vec<u32> = labels.to_vec();
        positives.sort_unstable();
        positives.dedup();
        let want = ((self.sample_rate * k as f64).ceil() as usize).clamp(positives.len(), k);
        let index: Vec<u32> = if want == k {
            (0..k as u32).collect()
        } else {
            let negatives = k - positives.len();
            let picks = rand::seq::index::sample(&mut self.rng, negatives, want - positives.len());
            let mut picks = picks.into_vec();
            picks.sort_unstable();
            // Map the j-th non-positive class to its id by walking past the positives.
            let mut index = positives.clone();
            let mut p = 0usize;
            for j in picks {
                let mut id = j as u32 + p as u32;
                while p < positives.len() && positives[p] <= id {
                    p += 1;
                    id = j as u32 + p as u32;
                }
                index.push(id);
            }
            index.sort_unstable();
            index
        };
        let labels = labels
            .iter()
            .map(|l| index.binary_search(l).map(|i| i as u32))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                LossError::Config("PartialFc: a positive centre was not sampled".into())
            })?;
        Ok(Sampled { index, labels })
    }

    /// Samples centres for `labels` and computes the loss for embeddings `x` `[B, D]`.
    pub fn forward(&mut self, x: &Tensor, labels: &[u32]) -> Result<PartialFcOutput, LossError> {
        let sampled = self.sample(labels)?;
        self.forward_sampled(x, sampled)
    }

    /// The loss over an already drawn set of centres (see [`PartialFc::sample`]).
    pub fn forward_sampled(
        &self,
        x: &Tensor,
        sampled: Sampled,
    ) -> Result<PartialFcOutput, LossError> {
        let (b, d) = x.dims2().map_err(|_| {
            LossError::Config(format!(
                "PartialFc: embeddings must be [B, D], got {:?}",
                x.dims()
            ))
        })?;
        let wd = self.weight.dim(1)?;
        if d != wd || sampled.labels.len() != b {
            return Err(LossError::Config(format!(
                "PartialFc: {b} embeddings of width {d} with {} labels; centres are {wd} wide",
                sampled.labels.len()
            )));
        }
        let cosine = self.cosine(x, &sampled.index)?;
        let targets = Tensor::from_vec(sampled.labels.clone(), b, x.device())?;
        let logits = (apply_margin(&cosine, &sampled.labels, self.margin)? * self.scale)?;
        let loss = cross_entropy(&logits, &targets)?;
        Ok(PartialFcOutput {
            loss,
            cosine,
            sampled,
        })
    }

    /// `normalize(x) . normalize(W[index])^T`, `[B, S]`.
    pub fn cosine(&self, x: &Tensor, index: &[u32]) -> Result<Tensor, LossError> {
        let w = self.sampled_weight(index)?.to_dtype(x.dtype())?;
        Ok(normalize(x)?.matmul(&normalize(&w)?.t()?)?)
    }

    fn sampled_weight(&self, index: &[u32]) -> Result<Tensor, LossError> {
        if index.len() == self.num_classes() {
            return Ok(self.weight.as_tensor().clone());
        }
        // Sampled centres' gradients in parallel on a GPU, where `index_select`'s backward
        // pass walks every sampled index in one block.
        Ok(clipcid_kernels::gather_rows(
            self.weight.as_tensor(),
            index,
        )?)
    }
}

/// Replaces each row's target cosine `t` (column `labels[row]`) by its margin form.
fn apply_margin(cosine: &Tensor, labels: &[u32], margin: Margin) -> Result<Tensor, LossError> {
    if margin == Margin::None {
        return Ok(cosine.clone());
    }
    let (b, s) = cosine.dims2()?;
    let dev = cosine.device();
    let mut hot = vec![0f32; b * s];
    for (r, &l) in labels.iter().enumerate() {
        hot[r * s + l as usize] = 1.0;
    }
    let hot = Tensor::from_vec(hot, (b, s), dev)?.to_dtype(cosine.dtype())?;
    let idx = Tensor::from_vec(labels.to_vec(), (b, 1), dev)?;
    let t = cosine.gather(&idx, 1)?;
    let new_t = match margin {
        Margin::None => t.clone(),
        Margin::CosFace(m) => (&t - m)?,
        Margin::ArcFace(m) => {
            // sin(theta) from cos(theta), kept away from 0 so its gradient stays finite.
            let sin = (1.0 - t.sqr()?)?.clamp(1e-12, 1.0)?.sqrt()?;
            let phi = ((&t * m.cos())? - (sin * m.sin())?)?;
            let th = (std::f64::consts::PI - m).cos();
            let mm = (std::f64::consts::PI - m).sin() * m;
            let fallback = (&t - mm)?;
            t.gt(th)?.where_cond(&phi, &fallback)?
        }
    };
    Ok((cosine + hot.broadcast_mul(&(new_t - t)?)?)?)
}

/// Parts of [`ClusterDistillLoss::forward`].
#[derive(Debug, Clone)]
pub struct ClusterDistillOutput {
    /// `classification + kl_weight * kl` (scalar).
    pub loss: Tensor,
    /// PartialFC cross-entropy of the student against the pseudo-labels.
    pub classification: Tensor,
    /// KL(teacher || student) of the class distributions.
    pub kl: Tensor,
    /// The centres used this step.
    pub sampled: Sampled,
}

/// CLIP-CID's cluster-level distillation:
///
/// `L_cluster = L_cls + kl_weight * KL_T(teacher || student)`
///
/// `L_cls` is [`PartialFc`] on the student image embeddings and their pseudo-labels (k-means
/// clusters of the teacher embeddings). Both student and teacher embeddings go through the
/// same sampled centre layer, `scale * normalize(x) normalize(W_S)^T` (no margin), and
/// [`KlDistill`] at `kl_temperature` aligns the student's class distribution with the
/// teacher's (teacher side detached, centres included). Defaults: `kl_weight` 1,
/// `kl_temperature` 1 (plain config values; the paper's are not legible in our copy).
#[derive(Debug)]
pub struct ClusterDistillLoss {
    /// The classifier over cluster centres.
    pub fc: PartialFc,
    /// Weight of the KL term.
    pub kl_weight: f64,
    /// Temperature of the KL term.
    pub kl_temperature: f64,
}

impl ClusterDistillLoss {
    /// Cluster loss around a PartialFC layer.
    pub fn new(fc: PartialFc) -> Self {
        Self {
            fc,
            kl_weight: 1.0,
            kl_temperature: 1.0,
        }
    }

    /// Student and teacher image embeddings `[B, D]`, pseudo-labels of the batch.
    pub fn forward(
        &mut self,
        student: &Tensor,
        teacher: &Tensor,
        labels: &[u32],
    ) -> Result<ClusterDistillOutput, LossError> {
        if student.dims() != teacher.dims() {
            return Err(LossError::Config(format!(
                "ClusterDistillLoss: student {:?} and teacher {:?} differ",
                student.dims(),
                teacher.dims()
            )));
        }
        let sampled = self.fc.sample(labels)?;
        let out = self.fc.forward_sampled(student, sampled)?;
        let teacher = teacher.detach().to_dtype(student.dtype())?;
        let teacher_logits =
            (self.fc.cosine(&teacher, &out.sampled.index)?.detach() * self.fc.scale)?;
        let student_logits = (&out.cosine * self.fc.scale)?;
        let kl = KlDistill::new(self.kl_temperature).forward(&student_logits, &teacher_logits)?;
        let loss = (&out.loss + (&kl * self.kl_weight)?)?;
        Ok(ClusterDistillOutput {
            loss,
            classification: out.loss,
            kl,
            sampled: out.sampled,
        })
    }
}
