//! AdamW, the learning-rate schedule, gradient clipping and f16 loss scaling.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use clipcid_kernels::cpu;

use crate::TrainError;

/// AdamW hyper-parameters. Defaults follow the paper where it says (beta2 0.98) and
/// open_clip otherwise (beta1 0.9, eps 1e-6, weight decay 0.2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay (0.98 in CLIP-CID).
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied only to matrices that are not norms (see
    /// [`AdamW::decays`]).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW (Loshchilov & Hutter) as PyTorch's `torch.optim.AdamW` computes it, per parameter
/// `p` with gradient `g` at step `t` (1-based) and learning rate `lr`:
///
/// ```text
/// p <- p - lr * wd * p                      (only where weight decay applies)
/// m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
/// p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
/// ```
///
/// Moments are kept in f32 whatever the parameter dtype. Parameters without a gradient in
/// a step are left alone (their moments too). [`AdamW::state`] and [`AdamW::load_state`]
/// save and restore the moments and the step count for exact resume.
pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
    step: u64,
    /// On a GPU: whether the in-place kernels loaded (checked at the first step).
    gpu_in_place: Option<bool>,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.slots.len())
            .field("config", &self.config)
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    /// Optimises these named parameters (names as in the checkpoint, e.g. from a `VarMap`),
    /// sorted by name so the state layout does not depend on the caller's order.
    pub fn new(mut params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self, TrainError> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = params.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(TrainError::Config(format!(
                "parameter `{}` is listed twice",
                w[0].0
            )));
        }
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let decay = Self::decays(&name, var.rank());
                // Two allocations: the moments are updated in place (CPU and CUDA).
                let m = var.zeros_like()?.to_dtype(DType::F32)?;
                let v = m.zeros_like()?;
                Ok(Slot {
                    name,
                    var,
                    decay,
                    m,
                    v,
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(Self {
            slots,
            config,
            step: 0,
            gpu_in_place: None,
        })
    }

    /// Whether weight decay applies to a parameter: open_clip's rule, decay matrices only;
    /// no decay for anything of rank < 2 (biases, norm gains, the logit scale) or named as
    /// a norm, an embedding of positions, or a class token.
    pub fn decays(name: &str, rank: usize) -> bool {
        let skip = [
            "norm",
            "bias",
            "logit_scale",
            "position_embedding",
            "class_embedding",
        ];
        rank >= 2 && !skip.iter().any(|s| name.contains(s))
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| s.decay)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The parameters, by name.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// One update with these gradients at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<(), TrainError> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(TrainError::Config(format!(
                "learning rate {lr} is not usable"
            )));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let gpu_in_place = self.gpu_in_place();
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.var) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let p = slot.var.as_tensor();
            let device = p.device();
            if [p, &g, &slot.m, &slot.v]
                .iter()
                .all(|t| cpu::adamw_runs_in_place(t) && t.device().same_device(device))
                && [p, &slot.m, &slot.v].iter().all(|t| t.is_contiguous())
                && (device.is_cpu() || (gpu_in_place && clipcid_kernels::gpu_kernels_take(&[p])))
            {
                // One in-place pass per tensor (see `cpu::adamw_update`; three kernels on a
                // GPU instead of about sixteen tensor ops); same formula.
                let step = cpu::AdamWStep {
                    lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: if slot.decay { c.weight_decay } else { 0.0 },
                    step: t,
                };
                cpu::adamw_update(p, &g, &slot.m, &slot.v, step)?;
                continue;
            }
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&slot.m / bias1)? / ((&slot.v / bias2)?.sqrt()? + c.eps)?)?;
            let p = slot.var.as_tensor().to_dtype(DType::F32)?;
            let p = if slot.decay {
                (&p * (1.0 - lr * c.weight_decay))?
            } else {
                p
            };
            let p = (p - (update * lr)?)?;
            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    /// Whether the parameters' GPU takes the in-place update: its kernels are compiled
    /// (NVRTC) and loaded at the first step; if that fails, a warning says why and the steps
    /// use tensor ops (same formula, more kernel launches).
    fn gpu_in_place(&mut self) -> bool {
        if let Some(ok) = self.gpu_in_place {
            return ok;
        }
        let Some(device) = self.slots.first().map(|s| s.var.device().clone()) else {
            return false;
        };
        if device.is_cpu() {
            return false;
        }
        #[cfg(feature = "cuda")]
        let ok = match clipcid_kernels::cuda::load(&device) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("clipcid's CUDA kernels did not load ({e}); AdamW uses tensor ops");
                false
            }
        };
        #[cfg(not(feature = "cuda"))]
        let ok = false;
        self.gpu_in_place = Some(ok);
        ok
    }

    /// The optimiser state as named tensors (`adamw.m.<param>`, `adamw.v.<param>`) plus the
    /// step count, for a checkpoint. The tensors are copies (the moments are updated in
    /// place by later steps).
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64), TrainError> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            out.push((format!("adamw.m.{}", s.name), s.m.copy()?));
            out.push((format!("adamw.v.{}", s.name), s.v.copy()?));
        }
        Ok((out, self.step))
    }

    /// Restores what [`AdamW::state`] returned; every moment must be present with the
    /// parameter's shape.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: u64,
    ) -> Result<(), TrainError> {
        for s in &mut self.slots {
            for (kind, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("adamw.{kind}.{}", s.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TrainError::Config(format!("optimizer state lacks `{key}`")))?;
                if t.dims() != s.var.dims() {
                    return Err(TrainError::Config(format!(
                        "optimizer state `{key}` is {:?} but the parameter is {:?}",
                        t.dims(),
                        s.var.dims()
                    )));
                }
                // A copy: the moments are updated in place, and the caller's map keeps its own.
                *slot = t.to_dtype(DType::F32)?.to_device(s.var.device())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay to `min_lr` at
/// `total_steps` (and `min_lr` after).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    /// Learning rate at the end of warmup.
    pub peak_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Steps in the whole run.
    pub total_steps: u64,
    /// Floor of the cosine.
    pub min_lr: f64,
}

impl WarmupCosine {
    /// Learning rate for step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr
            + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`), and returns the norm before clipping. A non-finite
/// norm is returned as is and nothing is scaled, so the caller can stop the run.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[&Var],
    max_norm: f64,
) -> Result<f64, TrainError> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            total += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if !norm.is_finite() || norm <= max_norm {
        return Ok(norm);
    }
    let scale = max_norm / (norm + 1e-6);
    for v in vars {
        if let Some(g) = grads.get(v) {
            let scaled = (g * scale)?;
            grads.insert(v, scaled);
        }
    }
    Ok(norm)
}

/// Dynamic loss scaling for f16 training, with the defaults and update rule of PyTorch's
/// `torch.amp.GradScaler`. Set in `[optim.loss_scale]`; used only when
/// [`OptimConfig::precision`](crate::OptimConfig::precision) is `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossScaleConfig {
    /// Scale of the first step (2^16).
    pub init: f64,
    /// Multiplies the scale after `growth_interval` steps in a row with finite gradients (2).
    pub growth_factor: f64,
    /// Multiplies the scale after a step whose gradients overflowed (0.5).
    pub backoff_factor: f64,
    /// Finite steps in a row before the scale grows (2000).
    pub growth_interval: u64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self {
            init: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The loss scale of an f16 run: the loss is multiplied by [`LossScale::scale`] before the
/// backward pass so that small gradients survive f16's narrow range, and the gradients are
/// divided by it before clipping and the optimiser. A step whose gradients are not finite
/// (they overflowed f16) is skipped (no weight or moment changes) and the scale backs off;
/// after `growth_interval` finite steps in a row it grows. This is `GradScaler.update`.
///
/// ```
/// use clipcid_train::{LossScale, LossScaleConfig};
/// let mut s = LossScale::new(LossScaleConfig { growth_interval: 2, ..Default::default() });
/// assert_eq!(s.scale(), 65536.0);
/// s.update(false); // overflow: skip the step, halve
/// assert_eq!(s.scale(), 32768.0);
/// s.update(true);
/// s.update(true); // two finite steps in a row: double
/// assert_eq!(s.scale(), 65536.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    config: LossScaleConfig,
    scale: f64,
    good_steps: u64,
}

impl LossScale {
    /// Starts at `config.init`.
    pub fn new(config: LossScaleConfig) -> Self {
        Self {
            config,
            scale: config.init,
            good_steps: 0,
        }
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Finite steps in a row since the last change of scale.
    pub fn good_steps(&self) -> u64 {
        self.good_steps
    }

    /// Restores a saved scale and streak (from a checkpoint).
    pub fn restore(&mut self, scale: f64, good_steps: u64) {
        self.scale = scale;
        self.good_steps = good_steps;
    }

    /// After a step: `finite` says whether its unscaled gradients were all finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.config.growth_interval {
                self.scale *= self.config.growth_factor;
                self.good_steps = 0;
            }
        } else {
            self.scale *= self.config.backoff_factor;
            self.good_steps = 0;
        }
    }
}
