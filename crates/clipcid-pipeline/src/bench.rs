//! Throughput of the three workloads the GPU check compares with PyTorch: the ViT-B/32 image
//! tower, a student training step, and the near-duplicate distance tiles. Measured here,
//! never asserted: `clipcid self-check --bench` prints them, `scripts/gpu-check.sh` puts
//! them beside PyTorch's on the same GPU.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clipcid_loss::ClipLoss;
use clipcid_models::weights::init_tensors;
use clipcid_models::{ClipConfig, ClipModel};

use crate::PipelineError;

/// Sizes of one benchmark run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchSizes {
    /// Images per batch (image tower and training step).
    pub batch: usize,
    /// Rows balanced (the tiles cover all pairs).
    pub dedup_rows: usize,
    /// Timed repetitions after one warm-up.
    pub repeats: usize,
}

impl BenchSizes {
    /// The GPU check's sizes: batch 256, 1M rows.
    pub const FULL: Self = Self {
        batch: 256,
        dedup_rows: 1_000_000,
        repeats: 10,
    };
    /// A smoke run on a CPU (candle's CPU bf16 is slow): batch 1, 1,000 rows, once.
    pub const SMOKE: Self = Self {
        batch: 1,
        dedup_rows: 1_000,
        repeats: 1,
    };
}

/// One measured workload.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// What ran.
    pub workload: String,
    /// Items per second (images, samples), or seconds for the dedup row.
    pub value: f64,
    /// Unit of `value`.
    pub unit: &'static str,
}

fn sync(device: &Device) -> Result<(), PipelineError> {
    Ok(device.synchronize()?)
}

/// Median seconds of `repeats` timed calls of `f` after one warm-up.
fn time(
    device: &Device,
    repeats: usize,
    mut f: impl FnMut() -> Result<(), PipelineError>,
) -> Result<f64, PipelineError> {
    f()?;
    sync(device)?;
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        sync(device)?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Measures, on `device` with seeded random weights and inputs: the ViT-B/32 image tower in
/// bf16 (images/s), one training step of the CLIP loss for the PicCollage-size student
/// (width 384, 6 layers; AdamW in f32; samples/s) in f32 and in bf16 with f32 master
/// weights, and near-duplicate removal with f16 tiles
/// over `dedup_rows` rows of width 512 (seconds); in that order, then the median
/// milliseconds of each training step's forward pass with the loss, backward pass and
/// AdamW update (f32, then bf16).
///
/// ```no_run
/// // A GPU run of the check's sizes (the tests run `BenchSizes::SMOKE` on the CPU).
/// let gpu = candle_core::Device::new_cuda(0)?;
/// for row in clipcid_pipeline::throughput(&gpu, clipcid_pipeline::BenchSizes::FULL)? {
///     println!("{}: {:.1} {}", row.workload, row.value, row.unit);
/// }
/// # Ok::<(), clipcid_pipeline::PipelineError>(())
/// ```
pub fn throughput(device: &Device, sizes: BenchSizes) -> Result<Vec<BenchRow>, PipelineError> {
    let b = sizes.batch;
    let mut rows = vec![];

    let b32 = ClipConfig::preset("vit-b-32")?;
    let tower = ClipModel::from_tensors(&b32, init_tensors(&b32, 0)?, device, DType::BF16)?;
    let s = b32.vision_config.image_size;
    let px = Tensor::randn(0f32, 1.0, (b, 3, s, s), device)?.to_dtype(DType::BF16)?;
    let secs = time(device, sizes.repeats, || {
        tower.encode_image(&px)?;
        Ok(())
    })?;
    drop(tower);
    rows.push(BenchRow {
        workload: format!("ViT-B/32 image tower, bf16, batch {b}"),
        value: b as f64 / secs,
        unit: "images/s",
    });

    let cfg = ClipConfig::preset("piccollage-s12")?;
    let (student, varmap) = ClipModel::trainable_from(&cfg, init_tensors(&cfg, 0)?, device)?;
    let mut opt =
        clipcid_train::AdamW::new(crate::parity::named_vars(&varmap)?, Default::default())?;
    let px = Tensor::randn(0f32, 1.0, (b, 3, s, s), device)?;
    let ctx = cfg.text_config.max_position_embeddings;
    let vocab = cfg.text_config.vocab_size as u32;
    let ids: Vec<u32> = (0..(b * ctx) as u32).map(|i| (i * 7919) % vocab).collect();
    let tok = Tensor::from_vec(ids, (b, ctx), device)?;
    // f32, then bf16 as the trainer's `precision = "bf16"` runs it: towers on bf16 casts of
    // the f32 weights, the loss in f32, AdamW on the f32 weights.
    let mut phase_rows = vec![];
    for bf16 in [false, true] {
        let forward = || -> Result<Tensor, PipelineError> {
            let cast = if bf16 {
                Some(student.cast(DType::BF16)?)
            } else {
                None
            };
            let m = cast.as_ref().unwrap_or(&student);
            Ok(ClipLoss::new().forward(
                &m.encode_image(&px)?.to_dtype(DType::F32)?,
                &m.encode_text(&tok)?.to_dtype(DType::F32)?,
                student.logit_scale(),
            )?)
        };
        let secs = time(device, sizes.repeats, || {
            opt.step(&forward()?.backward()?, 1e-4)?;
            Ok(())
        })?;
        let precision = if bf16 { "bf16 (f32 master)" } else { "f32" };
        rows.push(BenchRow {
            workload: format!("student (w384 L6) CLIP train step, {precision}, batch {b}"),
            value: b as f64 / secs,
            unit: "samples/s",
        });
        // Where a step's time goes (a device sync between phases): the rows that say what
        // to make faster first. Milliseconds, so gpu-check.py's comparison skips them.
        let mut phases = [vec![], vec![], vec![]];
        for _ in 0..sizes.repeats.max(1) {
            let t0 = Instant::now();
            let loss = forward()?;
            sync(device)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            sync(device)?;
            let t2 = Instant::now();
            opt.step(&grads, 1e-4)?;
            sync(device)?;
            let t3 = Instant::now();
            for (p, (a, z)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
                p.push((z - a).as_secs_f64());
            }
        }
        for (name, mut t) in ["forward and loss", "backward", "AdamW update"]
            .into_iter()
            .zip(phases)
        {
            t.sort_by(f64::total_cmp);
            phase_rows.push(BenchRow {
                workload: format!("train step phase, {precision}: {name}"),
                value: 1e3 * t[t.len() / 2],
                unit: "ms",
            });
        }
    }

    let x = Tensor::randn(0f32, 1.0, (sizes.dedup_rows, 512), device)?;
    let opts = clipcid_dedup::BalanceOptions {
        f16: !device.is_cpu(),
        ..Default::default()
    };
    let start = Instant::now();
    clipcid_dedup::balance(&x, &opts)?;
    sync(device)?;
    rows.push(BenchRow {
        workload: format!(
            "balance, {} x 512, {} tiles",
            sizes.dedup_rows,
            if opts.f16 { "f16" } else { "f32" }
        ),
        value: start.elapsed().as_secs_f64(),
        unit: "s",
    });
    rows.extend(phase_rows);
    Ok(rows)
}
