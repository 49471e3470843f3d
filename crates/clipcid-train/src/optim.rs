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
    /// The working copy a mixed-precision model computes with ([`AdamW::working_copies`]).
    copy: Option<Var>,
}

impl Slot {
    /// This parameter's gradient in `grads`: its own, its working copy's, or (both present)
    /// their sum in f32.
    fn gradient(&self, grads: &GradStore) -> Result<Option<Tensor>, TrainError> {
        let copy = self.copy.as_ref().and_then(|c| grads.get(c));
        Ok(match (grads.get(&self.var), copy) {
            (None, None) => None,
            (Some(g), None) | (None, Some(g)) => Some(g.clone()),
            (Some(a), Some(b)) => Some((a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?)?),
        })
    }
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
                    copy: None,
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
        self.step_scaled(grads, lr, 1.0)
    }

    /// Working copies in `dtype` (bf16 or f16) of the parameters whose names `select` picks:
    /// new [`Var`]s holding each parameter rounded to `dtype`, for a model that computes in
    /// `dtype` (`ClipModel::cast_using`). Each step then takes a parameter's gradient from its
    /// copy (summed in f32 with the parameter's own where both have one), updates the f32
    /// parameter, and writes it, rounded, into the copy: on a GPU in the update's own launch.
    /// This is PyTorch AMP's mixed precision (f32 master weights and optimizer state,
    /// low-precision working weights) without casting every weight each step, and every
    /// gradient back to f32, as a model cast each step ([`ClipModel::cast`]) does. Calling it
    /// again makes fresh copies (after the parameters were set from outside, as a resumed
    /// checkpoint does); the previous ones are no longer updated.
    ///
    /// [`ClipModel::cast`]: clipcid_models::ClipModel::cast
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_train::TrainError> {
    /// use candle_core::{DType, Device, Var};
    /// use clipcid_train::{AdamW, AdamWConfig};
    /// let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
    /// let config = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    /// let mut opt = AdamW::new(vec![("w".into(), w.clone())], config)?;
    /// let copies = opt.working_copies(DType::BF16, |_| true)?;
    /// let w16 = &copies[0].1;
    /// // The loss computes with the bf16 copy; its gradient updates the f32 weight.
    /// let grads = (w16.as_tensor() * 3.0)?.sum_all()?.backward()?;
    /// opt.step(&grads, 0.1)?;
    /// // Both gradients are 3: the first step moves each weight by lr against that sign.
    /// let got = w.as_tensor().to_vec1::<f32>()?;
    /// assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.1).abs() < 1e-6);
    /// // The copy holds them rounded to bf16.
    /// let copy = w16.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    /// assert_eq!(copy, [0.8984375, -1.1015625]);
    /// # Ok(()) }
    /// ```
    pub fn working_copies(
        &mut self,
        dtype: DType,
        select: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, Var)>, TrainError> {
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(TrainError::Config(format!(
                "working copies are bf16 or f16, not {dtype:?}"
            )));
        }
        self.clear_working_copies();
        let mut out = vec![];
        for slot in &mut self.slots {
            if select(&slot.name) {
                let copy = Var::from_tensor(&slot.var.as_tensor().to_dtype(dtype)?)?;
                out.push((slot.name.clone(), copy.clone()));
                slot.copy = Some(copy);
            }
        }
        Ok(out)
    }

    /// Drops the working copies ([`AdamW::working_copies`]): later steps update the f32
    /// parameters alone.
    pub fn clear_working_copies(&mut self) {
        for slot in &mut self.slots {
            slot.copy = None;
        }
    }

    /// The variable whose gradient each parameter's update reads: its working copy where it
    /// has one, the parameter itself otherwise (what gradient accumulation and a
    /// data-parallel all-reduce go over). A step also adds the parameter's own gradient to
    /// its copy's where both have one, but a parameter with a copy should take its
    /// gradient through the copy alone, so that these variables carry them all.
    pub fn gradient_vars(&self) -> Vec<Var> {
        self.slots
            .iter()
            .map(|s| s.copy.clone().unwrap_or_else(|| s.var.clone()))
            .collect()
    }

    /// The global L2 norm of the gradients a step would read (each parameter's, its working
    /// copy's and their sum where both have one), as [`grad_norm`](crate::grad_norm) takes it.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64, TrainError> {
        let gs = self
            .slots
            .iter()
            .filter_map(|s| s.gradient(grads).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        global_norm(&gs.iter().collect::<Vec<_>>())
    }

    /// One update at learning rate `lr` with each gradient multiplied by `grad_scale` first:
    /// the factor of gradient clipping (see [`AdamW::grad_norm`]) and of f16 loss scaling
    /// (one over the loss scale) in one, where scaling each gradient beforehand would be a
    /// tensor op per parameter. The parameters that take the in-place update (f32 on the CPU, or on a
    /// GPU whose clipcid kernels loaded) are updated together by
    /// `clipcid_kernels::cpu::adamw_update_many` (one launch on a GPU, working copies
    /// included); others by tensor ops, with the same formula.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_train::TrainError> {
    /// use candle_core::{Device, Var};
    /// use clipcid_train::{AdamW, AdamWConfig};
    /// let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
    /// let config = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    /// let mut opt = AdamW::new(vec![("w".into(), w.clone())], config)?;
    /// let grads = (w.as_tensor() * 3.0)?.sum_all()?.backward()?;
    /// // Gradients of 3 halved to 1.5: AdamW's first step moves by lr against their sign
    /// // whatever their size.
    /// opt.step_scaled(&grads, 0.1, 0.5)?;
    /// let got = w.as_tensor().to_vec1::<f32>()?;
    /// assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.1).abs() < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn step_scaled(
        &mut self,
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), TrainError> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(TrainError::Config(format!(
                "learning rate {lr} is not usable"
            )));
        }
        if !grad_scale.is_finite() || grad_scale < 0.0 {
            return Err(TrainError::Config(format!(
                "gradient scale {grad_scale} is not usable"
            )));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let gpu_in_place = self.gpu_in_place();
        // (slot, its gradient): the in-place ones go to the kernels together.
        let mut in_place: Vec<(usize, Tensor)> = vec![];
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(g) = slot.gradient(grads)? else {
                continue;
            };
            let p = slot.var.as_tensor();
            let device = p.device();
            if [p, &slot.m, &slot.v]
                .iter()
                .all(|t| cpu::adamw_runs_in_place(t) && t.device().same_device(device))
                && [p, &slot.m, &slot.v].iter().all(|t| t.is_contiguous())
                && matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16)
                && g.device().same_device(device)
                && (device.is_cpu() || (gpu_in_place && clipcid_kernels::gpu_kernels_take(&[p])))
            {
                in_place.push((i, g));
                continue;
            }
            let g = g.to_dtype(DType::F32)?;
            let g = if grad_scale == 1.0 {
                g
            } else {
                (g * grad_scale)?
            };
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
            if let Some(copy) = &slot.copy {
                copy.set(&p.to_dtype(copy.dtype())?)?;
            }
        }
        // In place: the same formula in one pass per tensor (`cpu::adamw_update`), and on a
        // GPU in one launch for every parameter of a device, copies included (about 900
        // launches before, and a cast per copy).
        let step = cpu::AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: t,
        };
        let mut by_device: Vec<Vec<cpu::AdamWParam>> = vec![];
        for (i, g) in &in_place {
            let s = &self.slots[*i];
            let param = cpu::AdamWParam {
                param: s.var.as_tensor(),
                grad: g,
                m: &s.m,
                v: &s.v,
                decays: s.decay,
                copy: s.copy.as_ref(),
            };
            match by_device
                .iter_mut()
                .find(|d| d[0].param.device().same_device(param.param.device()))
            {
                Some(d) => d.push(param),
                None => by_device.push(vec![param]),
            }
        }
        for params in by_device {
            cpu::adamw_update_many(&params, step, grad_scale)?;
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

/// The global L2 norm of the gradients of `vars` (those that have one), as
/// `torch.nn.utils.clip_grad_norm_` computes it: the square root of the sum of every value's
/// square. On a GPU it waits for the device once for all the gradients
/// (`clipcid_kernels::cpu::squared_norms`), not once per gradient.
///
/// ```
/// # fn main() -> Result<(), clipcid_train::TrainError> {
/// use candle_core::{Device, Var};
/// let (a, b) = (Var::new(&[1f32, 2.0], &Device::Cpu)?, Var::new(&[5f32], &Device::Cpu)?);
/// // d/da of 3 sum(a) + 4 b is 3 for each of a's two values, and 4 for b.
/// let loss = ((a.as_tensor() * 3.0)?.sum_all()? + (b.as_tensor() * 4.0)?.sum_all()?)?;
/// let grads = loss.backward()?;
/// let norm = clipcid_train::grad_norm(&grads, &[&a, &b])?;
/// assert!((norm - 34f64.sqrt()).abs() < 1e-9);
/// # Ok(()) }
/// ```
pub fn grad_norm(grads: &GradStore, vars: &[&Var]) -> Result<f64, TrainError> {
    let present: Vec<&Tensor> = vars.iter().filter_map(|v| grads.get(v)).collect();
    global_norm(&present)
}

/// The L2 norm of all these tensors' values together.
fn global_norm(ts: &[&Tensor]) -> Result<f64, TrainError> {
    Ok(cpu::squared_norms(ts)?.iter().sum::<f64>().sqrt())
}

/// Scales the gradients of `vars` so their global L2 norm ([`grad_norm`]) is at most
/// `max_norm` (as `torch.nn.utils.clip_grad_norm_`), and returns the norm before clipping. A
/// non-finite norm is returned as is and nothing is scaled, so the caller can stop the run.
/// (The trainer passes the clipping factor to [`AdamW::step_scaled`] instead of scaling each
/// gradient.)
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[&Var],
    max_norm: f64,
) -> Result<f64, TrainError> {
    let norm = grad_norm(grads, vars)?;
    if !norm.is_finite() || norm <= max_norm {
        return Ok(norm);
    }
    let scale = clip_factor(norm, max_norm);
    for v in vars {
        if let Some(g) = grads.get(v) {
            let scaled = (g * scale)?;
            grads.insert(v, scaled);
        }
    }
    Ok(norm)
}

/// What gradients of global norm `norm` are multiplied by so that theirs is at most
/// `max_norm`: `max_norm / (norm + 1e-6)` above it (PyTorch's epsilon), 1 otherwise.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
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
