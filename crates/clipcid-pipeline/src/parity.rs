//! Device parity: the same small computations run on a reference device (the CPU) and on
//! another, compared with the limits a user can rely on. `clipcid self-check` prints it, the
//! GPU check (`scripts/gpu-check.sh`) runs it on the device machine, and the tests run it
//! for every device of [`available_devices`](crate::available_devices).

use candle_core::{DType, Device, Tensor, Var};
use clipcid_kernels::{l2_normalize, max_abs_diff};
use clipcid_loss::{ClipLoss, InstanceDistillLoss, Margin, PartialFc};
use clipcid_models::weights::init_tensors;
use clipcid_models::{ClipConfig, ClipModel};
use rand::{Rng, SeedableRng};

use crate::PipelineError;

/// One compared quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct ParityRow {
    /// What was computed on both devices.
    pub check: &'static str,
    /// The measured difference (or cosine, for the half-precision rows).
    pub value: f64,
    /// The bound, as text (`<= 1e-4`, `>= 0.999`, `== 0`).
    pub limit: &'static str,
    /// Whether `value` is within the bound.
    pub pass: bool,
}

/// Seeded uniform values in `[-1, 1)` as a tensor of `shape` on `device`.
fn seeded(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor, PipelineError> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Smallest row cosine between two `[n, D]` tensors (compared in f32).
fn min_row_cosine(a: &Tensor, b: &Tensor) -> Result<f64, PipelineError> {
    let a = l2_normalize(&a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
    let b = l2_normalize(&b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
    let cos: Vec<f32> = (a * b)?.sum(1)?.to_vec1()?;
    Ok(cos.into_iter().fold(f64::INFINITY, |m, c| m.min(c as f64)))
}

/// `|a - b|` largest element, both moved to the CPU.
fn diff(a: &Tensor, b: &Tensor) -> Result<f64, PipelineError> {
    Ok(max_abs_diff(&a.to_device(&Device::Cpu)?, &b.to_device(&Device::Cpu)?)? as f64)
}

/// The trainable parameters of a `VarMap`, by name (what [`clipcid_train::AdamW`] takes).
pub(crate) fn named_vars(varmap: &candle_nn::VarMap) -> Result<Vec<(String, Var)>, PipelineError> {
    Ok(varmap
        .data()
        .lock()
        .map_err(|_| PipelineError::Input("poisoned parameter map".into()))?
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect())
}

fn row(check: &'static str, value: f64, limit: &'static str, pass: bool) -> ParityRow {
    ParityRow {
        check,
        value,
        limit,
        pass,
    }
}

/// Runs the parity checks of `device` against `reference` on a tiny CLIP (the `tiny`
/// preset, seeded weights and inputs): f32 image and text embeddings (max abs diff <= 1e-4),
/// bf16 and f16 embeddings against the f32 reference (min cosine >= 0.999), the CLIP,
/// instance and PartialFC losses (<= 1e-4), near-duplicate removal (identical keep flags and
/// sets), and one AdamW step of the CLIP loss (weights <= 1e-4).
///
/// ```
/// use candle_core::Device;
/// let rows = clipcid_pipeline::device_parity(&Device::Cpu, &Device::Cpu)?;
/// assert!(rows.iter().all(|r| r.pass), "{rows:?}");
/// # Ok::<(), clipcid_pipeline::PipelineError>(())
/// ```
pub fn device_parity(reference: &Device, device: &Device) -> Result<Vec<ParityRow>, PipelineError> {
    let cfg = ClipConfig::preset("tiny")?;
    let weights = init_tensors(&cfg, 7)?;
    let (b, s) = (8, cfg.vision_config.image_size);
    let ctx = cfg.text_config.max_position_embeddings.min(16);
    let vocab = cfg.text_config.vocab_size as u32;
    let ids: Vec<u32> = {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        (0..b * ctx).map(|_| rng.random_range(1..vocab)).collect()
    };
    let mut rows = vec![];

    // Inference in f32, bf16 and f16.
    let embed = |dev: &Device, dtype: DType| -> Result<(Tensor, Tensor), PipelineError> {
        let model = ClipModel::from_tensors(&cfg, weights.clone(), dev, dtype)?;
        let px = seeded(1, &[b, 3, s, s], dev)?.to_dtype(dtype)?;
        let tok = Tensor::from_vec(ids.clone(), (b, ctx), dev)?;
        Ok((model.encode_image(&px)?, model.encode_text(&tok)?))
    };
    let (ref_img, ref_txt) = embed(reference, DType::F32)?;
    let (img, txt) = embed(device, DType::F32)?;
    let d = diff(&ref_img, &img)?;
    rows.push(row(
        "image embeddings, f32 (max abs diff)",
        d,
        "<= 1e-4",
        d <= 1e-4,
    ));
    let d = diff(&ref_txt, &txt)?;
    rows.push(row(
        "text embeddings, f32 (max abs diff)",
        d,
        "<= 1e-4",
        d <= 1e-4,
    ));
    let half = [
        (
            DType::BF16,
            "image embeddings, bf16 vs f32 (min cosine)",
            "text embeddings, bf16 vs f32 (min cosine)",
        ),
        (
            DType::F16,
            "image embeddings, f16 vs f32 (min cosine)",
            "text embeddings, f16 vs f32 (min cosine)",
        ),
    ];
    for (dtype, image_check, text_check) in half {
        let (img16, txt16) = embed(device, dtype)?;
        for (check, reference, got) in [
            (image_check, &ref_img, img16),
            (text_check, &ref_txt, txt16),
        ] {
            let c = min_row_cosine(reference, &got)?;
            rows.push(row(check, c, ">= 0.999", c >= 0.999));
        }
    }

    // Losses on seeded embeddings.
    let losses = |dev: &Device| -> Result<Vec<Tensor>, PipelineError> {
        let (si, st) = (seeded(11, &[b, 16], dev)?, seeded(12, &[b, 16], dev)?);
        let (ti, tt) = (seeded(13, &[b, 16], dev)?, seeded(14, &[b, 16], dev)?);
        let scale = Tensor::new(2.6592f32, dev)?;
        let centres = l2_normalize(&seeded(15, &[6, 16], dev)?)?;
        let mut pfc = PartialFc::new(&centres, 0.5, 16.0, Margin::ArcFace(0.2), 5)?;
        let labels: Vec<u32> = (0..b as u32).map(|i| i % 6).collect();
        Ok(vec![
            ClipLoss::new().forward(&si, &st, &scale)?,
            InstanceDistillLoss::default().forward(&si, &st, &ti, &tt, &scale)?,
            pfc.forward(&si, &labels)?.loss,
        ])
    };
    let d = losses(reference)?
        .iter()
        .zip(losses(device)?)
        .map(|(a, b)| diff(a, &b))
        .try_fold(0f64, |m, d| d.map(|d| m.max(d)))?;
    rows.push(row(
        "CLIP, instance and PartialFC losses (max abs diff)",
        d,
        "<= 1e-4",
        d <= 1e-4,
    ));

    // Near-duplicate removal on rows with planted duplicates.
    let dedup = |dev: &Device| -> Result<clipcid_dedup::BalanceResult, PipelineError> {
        let base = seeded(21, &[64, 32], dev)?;
        let noise = (seeded(22, &[64, 32], dev)? * 0.004)?;
        let x = Tensor::cat(&[&base, &(&base + noise)?], 0)?;
        let opts = clipcid_dedup::BalanceOptions {
            block_size: 48,
            ..Default::default()
        };
        Ok(clipcid_dedup::balance(&x, &opts)?)
    };
    let (a, z) = (dedup(reference)?, dedup(device)?);
    let differing = a.keep.iter().zip(&z.keep).filter(|(x, y)| x != y).count()
        + a.set_id
            .iter()
            .zip(&z.set_id)
            .filter(|(x, y)| x != y)
            .count();
    // Both must also find the 64 planted pairs, so "no difference" is not two empty results.
    rows.push(row(
        "near-duplicate keep flags and sets (differences)",
        differing as f64,
        "== 0",
        differing == 0 && a.summary.kept == 64 && z.summary.kept == 64,
    ));

    // One AdamW step of the CLIP loss, all weights compared.
    let step = |dev: &Device| -> Result<Vec<(String, Var)>, PipelineError> {
        let (model, varmap) = ClipModel::trainable_from(&cfg, weights.clone(), dev)?;
        let px = seeded(1, &[b, 3, s, s], dev)?;
        let tok = Tensor::from_vec(ids.clone(), (b, ctx), dev)?;
        let loss = ClipLoss::new().forward(
            &model.encode_image(&px)?,
            &model.encode_text(&tok)?,
            model.logit_scale(),
        )?;
        let params = named_vars(&varmap)?;
        let mut opt = clipcid_train::AdamW::new(params.clone(), Default::default())?;
        opt.step(&loss.backward()?, 1e-3)?;
        Ok(params)
    };
    let (pa, mut pb) = (step(reference)?, step(device)?);
    pb.sort_by(|x, y| x.0.cmp(&y.0));
    let mut d = 0f64;
    for (name, var) in &pa {
        let other = pb
            .binary_search_by(|p| p.0.cmp(name))
            .map(|i| &pb[i].1)
            .map_err(|_| PipelineError::Input(format!("no parameter `{name}` on {device:?}")))?;
        d = d.max(diff(var.as_tensor(), other.as_tensor())?);
    }
    rows.push(row(
        "one AdamW step of the CLIP loss, weights (max abs diff)",
        d,
        "<= 1e-4",
        d <= 1e-4,
    ));
    #[cfg(feature = "nccl")]
    if !device.is_cpu() {
        rows.push(nccl_one_rank(device)?);
    }
    Ok(rows)
}

/// An NCCL group of one rank on `device`: its all-reduces (of a host slice, and of a CUDA
/// tensor in its device buffer, the gradients' path) and its gather must hand back what they
/// were given (the data-parallel path's plumbing, on the GPU; largest difference).
#[cfg(feature = "nccl")]
fn nccl_one_rank(device: &Device) -> Result<ParityRow, PipelineError> {
    use clipcid_train::Collective;
    let tcp = clipcid_train::TcpRank::connect(0, 1, "127.0.0.1:0")?;
    let nccl = clipcid_train::NcclRank::new(device, &tcp)?;
    let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut summed = values.clone();
    nccl.all_reduce_sum(&mut summed)?;
    let gathered = nccl.all_gather(&values[..333])?;
    // The gradients' path: a CUDA tensor summed in its device buffer (a view that starts
    // inside its buffer, so the op's offsets are exercised too).
    let on_device = candle_core::Tensor::from_slice(&values, (40, 25), device)?;
    let view = on_device.narrow(0, 10, 20)?;
    let tensor_sum: Vec<f32> = nccl
        .all_reduce_sum_tensor(&view)?
        .flatten_all()?
        .to_vec1()?;
    let mut d = summed
        .iter()
        .zip(&values)
        .chain(tensor_sum.iter().zip(&values[250..750]))
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0f64, f64::max);
    if gathered.len() != 1 || gathered[0] != values[..333] || tensor_sum.len() != 500 {
        d = f64::INFINITY;
    }
    Ok(row(
        "NCCL, one rank: all-reduce (host and device buffers) and gather return their input (max abs diff)",
        d,
        "== 0",
        d == 0.0,
    ))
}

/// The rows as a markdown table, with the two devices named.
pub fn parity_table(reference: &Device, device: &Device, rows: &[ParityRow]) -> String {
    let mut out = format!(
        "| check ({:?} vs {:?}) | value | limit | result |\n|---|---|---|---|\n",
        reference.location(),
        device.location()
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.3e} | {} | {} |\n",
            r.check,
            r.value,
            r.limit,
            if r.pass { "pass" } else { "FAIL" }
        ));
    }
    out
}
