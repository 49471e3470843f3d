//! The losses of CLIP-CID and of PicCollage's image-tower distillation, as differentiable
//! candle operations (CPU, or GPU with the `cuda` feature). Every loss returns a scalar
//! tensor whose `backward()` reaches the student's parameters; teacher inputs are detached.
//!
//! | loss | formula |
//! |---|---|
//! | [`ClipLoss`] | symmetric InfoNCE over `s * norm(I) norm(T)^T`, `s = min(exp(logit_scale), 100)` |
//! | [`PartialFc`] | margin softmax over positive + sampled negative class centres |
//! | [`KlDistill`] | `T^2 * KL(softmax(t / T) \|\| softmax(s / T))`, batch mean |
//! | [`ClusterDistillLoss`] | `L_cls + kl_weight * KL` through the same (sampled) centre layer |
//! | [`InstanceDistillLoss`] | InfoNCE of student image vs teacher text and student text vs teacher image |
//! | [`EmbeddingL1`], [`PicCollageLoss`] | mean `\|s - t\|`; `kl_weight * KL_T + l1_weight * L1` with a temperature schedule |
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{Device, Tensor, Var};
//! use clipcid_loss::ClipLoss;
//! let dev = Device::Cpu;
//! let image = Var::new(&[[1.0f32, 0.0], [0.0, 1.0]], &dev)?;
//! let text = Tensor::new(&[[0.9f32, 0.1], [0.1, 0.9]], &dev)?;
//! let logit_scale = Var::new(&[(1.0f32 / 0.07).ln()], &dev)?;
//! let loss = ClipLoss::new().forward(image.as_tensor(), &text, logit_scale.as_tensor())?;
//! let grads = loss.backward()?;
//! assert!(loss.to_scalar::<f32>()? < 0.1);
//! assert!(grads.get(&image).is_some() && grads.get(&logit_scale).is_some());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod clip;
mod kl;
mod partial_fc;

use candle_core::{DType, Tensor, D};

pub use clip::{ClipLoss, InstanceDistillLoss};
pub use kl::{EmbeddingL1, KlDistill, PicCollageLoss, TemperatureSchedule};
pub use partial_fc::{
    ClusterDistillLoss, ClusterDistillOutput, Margin, PartialFc, PartialFcOutput, Sampled,
};

/// Errors of the losses.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// Bad shapes, labels or options.
    #[error("{0}")]
    Config(String),
    /// A loss came out NaN or infinite.
    #[error("loss `{name}` is not finite ({value}); lower the learning rate or check the inputs")]
    NonFinite {
        /// Which loss.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Rows scaled to unit L2 norm (differentiable; `eps` keeps zero rows finite).
pub fn normalize(x: &Tensor) -> Result<Tensor, LossError> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// `log(softmax(x))` along the last axis, shifted by the detached row maximum so logits of
/// any magnitude stay finite (the shift does not change the value or the gradient).
pub fn log_softmax(x: &Tensor) -> Result<Tensor, LossError> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Mean softmax cross-entropy of `logits` `[B, C]` against class indices `targets` (u32 `[B]`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor, LossError> {
    let (b, c) = logits.dims2()?;
    if targets.dims() != [b] {
        return Err(LossError::Config(format!(
            "{} targets for {b} rows of logits",
            targets.elem_count()
        )));
    }
    let t = targets.to_dtype(DType::U32)?;
    if let Some(bad) = t.to_vec1::<u32>()?.into_iter().find(|&v| v as usize >= c) {
        return Err(LossError::Config(format!(
            "target class {bad} is out of range for {c} classes"
        )));
    }
    let picked = log_softmax(logits)?.gather(&t.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// `exp(logit_scale)` clamped to at most 100, as CLIP does (the clamp passes no gradient
/// once it binds).
pub fn logit_scale_value(logit_scale: &Tensor) -> Result<Tensor, LossError> {
    Ok(logit_scale
        .flatten_all()?
        .exp()?
        .clamp(0f64, 100f64)?
        .reshape(())?)
}

/// Fails with [`LossError::NonFinite`] when the scalar `loss` is NaN or infinite.
pub fn ensure_finite(name: &'static str, loss: &Tensor) -> Result<(), LossError> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if value.is_finite() {
        Ok(())
    } else {
        Err(LossError::NonFinite { name, value })
    }
}

/// Checks that `a` and `b` are both `[B, D]` with the same shape.
fn same_2d(what: &str, a: &Tensor, b: &Tensor) -> Result<(usize, usize), LossError> {
    let da = a.dims2().map_err(|_| {
        LossError::Config(format!(
            "{what}: expected [B, D] inputs, got {:?}",
            a.dims()
        ))
    })?;
    if a.dims() != b.dims() {
        return Err(LossError::Config(format!(
            "{what}: shapes differ: {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(da)
}
