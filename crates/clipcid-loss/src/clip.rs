//! Contrastive losses: the student's own CLIP loss and instance-level distillation.

use candle_core::Tensor;

use crate::{cross_entropy, logit_scale_value, normalize, same_2d, LossError};

/// CLIP's symmetric InfoNCE (open_clip's `ClipLoss`, one device).
///
/// With `I = normalize(image)`, `T = normalize(text)` (`[B, D]`, row `i` of each a pair) and
/// `s = min(exp(logit_scale), 100)`:
/// `L = (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2`, where `CE` is the mean softmax
/// cross-entropy with the matching pair as the target of each row.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClipLoss;

impl ClipLoss {
    /// The loss.
    pub fn new() -> Self {
        Self
    }

    /// `logit_scale` is the learnable log-temperature (CLIP starts it at `ln(1 / 0.07)`).
    pub fn forward(
        &self,
        image: &Tensor,
        text: &Tensor,
        logit_scale: &Tensor,
    ) -> Result<Tensor, LossError> {
        same_2d("ClipLoss", image, text)?;
        let s = logit_scale_value(logit_scale)?.to_dtype(image.dtype())?;
        symmetric_info_nce(&normalize(image)?, &normalize(text)?, &s)
    }
}

/// `(CE(s A B^T, diag) + CE(s B A^T, diag)) / 2` for unit rows `a`, `b`.
fn symmetric_info_nce(a: &Tensor, b: &Tensor, s: &Tensor) -> Result<Tensor, LossError> {
    let n = a.dim(0)?;
    let logits = a.matmul(&b.t()?)?.broadcast_mul(s)?;
    let targets = Tensor::arange(0u32, n as u32, a.device())?;
    let forward = cross_entropy(&logits, &targets)?;
    let backward = cross_entropy(&logits.t()?, &targets)?;
    Ok(((forward + backward)? * 0.5)?)
}

/// CLIP-CID's instance-level distillation: offline teacher embeddings supervise the student
/// across modalities with in-batch negatives, both directions each:
///
/// `L = image_text_weight * InfoNCE(s_img, t_txt) + text_image_weight * InfoNCE(s_txt, t_img)`
///
/// where `InfoNCE(a, b)` is the symmetric loss of [`ClipLoss`] over `normalize(a)`,
/// `normalize(b)` with the given logit scale. Teacher embeddings are detached. Weights
/// default to 1 each (the paper's weights are not legible in our copy; they are plain
/// config values).
#[derive(Debug, Clone, Copy)]
pub struct InstanceDistillLoss {
    /// Weight of student image vs teacher text.
    pub image_text_weight: f64,
    /// Weight of student text vs teacher image.
    pub text_image_weight: f64,
}

impl Default for InstanceDistillLoss {
    fn default() -> Self {
        Self {
            image_text_weight: 1.0,
            text_image_weight: 1.0,
        }
    }
}

impl InstanceDistillLoss {
    /// All inputs `[B, D]`, row `i` of each from the same image-caption pair.
    pub fn forward(
        &self,
        student_image: &Tensor,
        student_text: &Tensor,
        teacher_image: &Tensor,
        teacher_text: &Tensor,
        logit_scale: &Tensor,
    ) -> Result<Tensor, LossError> {
        same_2d("InstanceDistillLoss", student_image, teacher_text)?;
        same_2d("InstanceDistillLoss", student_text, teacher_image)?;
        same_2d("InstanceDistillLoss", student_image, student_text)?;
        let dtype = student_image.dtype();
        let s = logit_scale_value(logit_scale)?.to_dtype(dtype)?;
        let t_img = normalize(&teacher_image.detach().to_dtype(dtype)?)?;
        let t_txt = normalize(&teacher_text.detach().to_dtype(dtype)?)?;
        let it = symmetric_info_nce(&normalize(student_image)?, &t_txt, &s)?;
        let ti = symmetric_info_nce(&normalize(student_text)?, &t_img, &s)?;
        Ok(((it * self.image_text_weight)? + (ti * self.text_image_weight)?)?)
    }
}
