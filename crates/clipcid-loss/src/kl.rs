//! Distribution matching: KL with temperature, L1, and PicCollage's combination.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::{log_softmax, same_2d, LossError};

/// Knowledge distillation with temperature (Hinton et al. 2015):
///
/// `L = T^2 * (1/B) * sum_b sum_k p_t[b,k] (log p_t[b,k] - log p_s[b,k])`,
/// `p_t = softmax(teacher / T)`, `p_s = softmax(student / T)`,
///
/// i.e. `KL(teacher || student)`, batch mean, scaled by `T^2` so gradient magnitudes do not
/// shrink as `T` grows (PyTorch's `KLDivLoss(reduction="batchmean")` times `T^2`). The
/// teacher side is detached.
#[derive(Debug, Clone, Copy)]
pub struct KlDistill {
    /// Softening temperature `T` (> 0).
    pub temperature: f64,
}

impl KlDistill {
    /// KL at this temperature.
    pub fn new(temperature: f64) -> Self {
        Self { temperature }
    }

    /// `student` and `teacher` logits, `[B, C]`.
    pub fn forward(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor, LossError> {
        let (b, _) = same_2d("KlDistill", student, teacher)?;
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(LossError::Config(format!(
                "KL temperature must be positive, got {t}"
            )));
        }
        let log_s = log_softmax(&(student / t)?)?;
        let log_t = log_softmax(&(teacher.detach().to_dtype(student.dtype())? / t)?)?;
        let kl = (log_t.exp()? * (log_t - log_s)?)?.sum_all()?;
        Ok((kl * (t * t / b as f64))?)
    }
}

/// Mean absolute difference between student and teacher embeddings:
/// `L = (1 / (B D)) * sum |s - t|` (teacher detached).
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbeddingL1;

impl EmbeddingL1 {
    /// `student` and `teacher`, `[B, D]`.
    pub fn forward(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor, LossError> {
        same_2d("EmbeddingL1", student, teacher)?;
        let t = teacher.detach().to_dtype(student.dtype())?;
        Ok((student - t)?.abs()?.mean_all()?)
    }
}

/// A piecewise-constant temperature: `(first_epoch, T)` steps, sorted by epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemperatureSchedule {
    /// `(first epoch, temperature)` pairs; the last one whose epoch has been reached applies.
    pub steps: Vec<(usize, f64)>,
}

impl Default for TemperatureSchedule {
    /// PicCollage's: temperature 4 for the first 10 epochs, then 2.
    fn default() -> Self {
        Self {
            steps: vec![(0, 4.0), (10, 2.0)],
        }
    }
}

impl TemperatureSchedule {
    /// The temperature at `epoch` (0-based).
    pub fn at(&self, epoch: usize) -> f64 {
        self.steps
            .iter()
            .take_while(|(e, _)| *e <= epoch)
            .last()
            .or(self.steps.first())
            .map(|(_, t)| *t)
            .unwrap_or(1.0)
    }
}

/// PicCollage's image-tower distillation loss between student and teacher image embeddings:
///
/// `L = kl_weight * T(epoch)^2 * KL(softmax(t / T) || softmax(s / T)) + l1_weight * mean|s - t|`
///
/// where the embedding dimensions play the role of classes ([`KlDistill`]) and `T` follows
/// the [`TemperatureSchedule`] (4, then 2 from epoch 10). Weights default to 1 each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PicCollageLoss {
    /// Weight of the KL term.
    pub kl_weight: f64,
    /// Weight of the L1 term.
    pub l1_weight: f64,
    /// Temperature per epoch.
    pub schedule: TemperatureSchedule,
}

impl Default for PicCollageLoss {
    fn default() -> Self {
        Self {
            kl_weight: 1.0,
            l1_weight: 1.0,
            schedule: TemperatureSchedule::default(),
        }
    }
}

impl PicCollageLoss {
    /// The loss at `epoch` for `[B, D]` student and teacher embeddings.
    pub fn forward(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        epoch: usize,
    ) -> Result<Tensor, LossError> {
        let kl = KlDistill::new(self.schedule.at(epoch)).forward(student, teacher)?;
        let l1 = EmbeddingL1.forward(student, teacher)?;
        Ok(((kl * self.kl_weight)? + (l1 * self.l1_weight)?)?)
    }
}
