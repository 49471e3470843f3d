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

/// Whether this build can switch clipcid's CUDA kernels off on `device` (a GPU, `cuda`).
fn gpu_kernels_switchable(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// Switches clipcid's CUDA kernels on or off (no-op without the `cuda` feature).
fn set_gpu_kernels(on: bool) {
    #[cfg(feature = "cuda")]
    clipcid_kernels::cuda::set_enabled(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// Whether bf16 attention may take the tensor-core kernels; a no-op without `cuda`.
fn set_attention_tensor_cores(on: bool) {
    #[cfg(feature = "cuda")]
    clipcid_kernels::cuda::set_attention_tensor_cores(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// Whether trainable GPU encoder layers run as one autograd node; a no-op without `cuda`.
fn set_block_node(on: bool) {
    #[cfg(feature = "cuda")]
    clipcid_kernels::cuda::set_block_node(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
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

/// The ViT-B/32 preset with seeded random weights in bf16 on `device`.
fn vit_b32_bf16(device: &Device) -> Result<(ClipConfig, ClipModel), PipelineError> {
    let cfg = ClipConfig::preset("vit-b-32")?;
    let model = ClipModel::from_tensors(&cfg, init_tensors(&cfg, 0)?, device, DType::BF16)?;
    Ok((cfg, model))
}

/// The CLIP loss of a student batch as the trainer computes it: the towers in `m`'s dtype,
/// the embeddings back in f32, the logit scale from the f32 weights.
fn student_clip_loss(
    m: &ClipModel,
    px: &Tensor,
    tok: &Tensor,
    logit_scale: &Tensor,
) -> Result<Tensor, PipelineError> {
    Ok(ClipLoss::new().forward(
        &m.encode_image(px)?.to_dtype(DType::F32)?,
        &m.encode_text(tok)?.to_dtype(DType::F32)?,
        logit_scale,
    )?)
}

/// A training batch for `cfg`'s student: `b` random f32 images and `b` full-length rows of
/// token ids spread over the vocabulary.
fn student_batch(
    cfg: &ClipConfig,
    b: usize,
    device: &Device,
) -> Result<(Tensor, Tensor), PipelineError> {
    let s = cfg.vision_config.image_size;
    let px = Tensor::randn(0f32, 1.0, (b, 3, s, s), device)?;
    let ctx = cfg.text_config.max_position_embeddings;
    let vocab = cfg.text_config.vocab_size as u32;
    let ids: Vec<u32> = (0..(b * ctx) as u32).map(|i| (i * 7919) % vocab).collect();
    Ok((px, Tensor::from_vec(ids, (b, ctx), device)?))
}

/// The image tower's median throughput on `batch` random bf16 images.
fn images_per_second(
    model: &ClipModel,
    cfg: &ClipConfig,
    batch: usize,
    device: &Device,
    repeats: usize,
) -> Result<f64, PipelineError> {
    let s = cfg.vision_config.image_size;
    let px = Tensor::randn(0f32, 1.0, (batch, 3, s, s), device)?.to_dtype(DType::BF16)?;
    let secs = time(device, repeats, || {
        model.encode_image(&px)?;
        Ok(())
    })?;
    Ok(batch as f64 / secs)
}

/// Measures, on `device` with seeded random weights and inputs: the ViT-B/32 image tower in
/// bf16 (images/s), one training step of the CLIP loss for the PicCollage-size student
/// (width 384, 6 layers; AdamW in f32; samples/s) in f32 and in bf16 with f32 master
/// weights, and near-duplicate removal with f16 tiles
/// over `dedup_rows` rows of width 512 (seconds); in that order, then the median
/// milliseconds of each training step's forward pass with the loss, backward pass and
/// AdamW update, and of the trainer's gradient norm (unit `ms (gradient norm)`; f32, then
/// bf16). On a GPU in a `cuda` build, last, the training rows again
/// with each trainable encoder layer as one autograd node (units `samples/s (one node per
/// layer)`, `ms (one node per layer)`), then with clipcid's CUDA kernels switched off (units
/// `samples/s (candle ops)`, `ms (candle ops)`).
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

    let (b32, tower) = vit_b32_bf16(device)?;
    rows.push(BenchRow {
        workload: format!("ViT-B/32 image tower, bf16, batch {b}"),
        value: images_per_second(&tower, &b32, b, device, sizes.repeats)?,
        unit: "images/s",
    });
    drop(tower);

    let cfg = ClipConfig::preset("piccollage-s12")?;
    let (student, varmap) = ClipModel::trainable_from(&cfg, init_tensors(&cfg, 0)?, device)?;
    let mut opt =
        clipcid_train::AdamW::new(crate::parity::named_vars(&varmap)?, Default::default())?;
    let (px, tok) = student_batch(&cfg, b, device)?;
    // f32, then bf16 as the trainer's `precision = "bf16"` runs it: towers on bf16 working
    // copies of the f32 weights, the loss in f32, AdamW on the f32 weights and the copies. On a GPU both again with
    // each trainable encoder layer as one autograd node (`cuda::set_block_node`, off by
    // default until these rows say it pays), and with clipcid's CUDA kernels switched off
    // (candle's primitive ops only): what they are worth.
    let mut phase_rows = vec![];
    let mut other_rows = vec![];
    // (clipcid's CUDA kernels, one node per layer)
    let settings: &[(bool, bool)] = if gpu_kernels_switchable(device) {
        &[(true, false), (true, true), (false, false)]
    } else {
        &[(true, false)]
    };
    // The defaults back however the loop ends (an error included).
    struct DefaultsBack;
    impl Drop for DefaultsBack {
        fn drop(&mut self) {
            set_gpu_kernels(true);
            set_block_node(false);
        }
    }
    let _defaults_back = DefaultsBack;
    for &(kernels, one_node) in settings {
        set_gpu_kernels(kernels);
        set_block_node(one_node);
        let headline = kernels && !one_node;
        // The headline rows are the defaults; the comparison rows carry their own units, so
        // gpu-check.py's parser passes over them.
        let (suffix, per_second, ms) = match (kernels, one_node) {
            (true, false) => ("", "samples/s", "ms"),
            (true, true) => (
                ", one node per layer",
                "samples/s (one node per layer)",
                "ms (one node per layer)",
            ),
            (false, _) => (
                ", candle ops only",
                "samples/s (candle ops)",
                "ms (candle ops)",
            ),
        };
        let mut setting_rows = vec![];
        let mut setting_phases = vec![];
        let measured = (|| -> Result<(), PipelineError> {
            for bf16 in [false, true] {
                // bf16 as the trainer runs it: the towers on AdamW's bf16 working copies,
                // which each update refreshes.
                let half = if bf16 {
                    let copies = opt.working_copies(DType::BF16, |n| n != "logit_scale")?;
                    Some(student.cast_using(DType::BF16, &copies.into_iter().collect())?)
                } else {
                    opt.clear_working_copies();
                    None
                };
                let forward = || {
                    let m = half.as_ref().unwrap_or(&student);
                    student_clip_loss(m, &px, &tok, student.logit_scale())
                };
                let secs = time(device, sizes.repeats, || {
                    opt.step(&forward()?.backward()?, 1e-4)?;
                    Ok(())
                })?;
                let precision = if bf16 { "bf16 (f32 master)" } else { "f32" };
                setting_rows.push(BenchRow {
                    workload: format!(
                        "student (w384 L6) CLIP train step, {precision}, batch {b}{suffix}"
                    ),
                    value: b as f64 / secs,
                    unit: per_second,
                });
                // Where a step's time goes (a device sync between phases): the rows that say
                // what to make faster first. Milliseconds, so gpu-check.py's comparison skips
                // them.
                let mut phases = [vec![], vec![], vec![]];
                // The trainer also takes the gradients' global norm each step (for clipping),
                // which the step above leaves out, as PyTorch's does.
                let mut norm = vec![];
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
                    let t4 = Instant::now();
                    opt.grad_norm(&grads)?;
                    norm.push(t4.elapsed().as_secs_f64());
                }
                for (name, mut t) in ["forward and loss", "backward", "AdamW update"]
                    .into_iter()
                    .zip(phases)
                {
                    t.sort_by(f64::total_cmp);
                    setting_phases.push(BenchRow {
                        workload: format!("train step phase, {precision}{suffix}: {name}"),
                        value: 1e3 * t[t.len() / 2],
                        unit: ms,
                    });
                }
                norm.sort_by(f64::total_cmp);
                setting_phases.push(BenchRow {
                    workload: format!(
                        "train step, {precision}{suffix}: the trainer's gradient norm (not in the step)"
                    ),
                    value: 1e3 * norm[norm.len() / 2],
                    unit: "ms (gradient norm)",
                });
            }
            Ok(())
        })();
        match (measured, headline) {
            (Ok(()), true) => {
                rows.extend(setting_rows);
                phase_rows.extend(setting_phases);
            }
            (Ok(()), false) => {
                other_rows.extend(setting_rows);
                other_rows.extend(setting_phases);
            }
            (Err(e), true) => return Err(e),
            // A comparison that fails (a path not yet run on this GPU) leaves the headline
            // rows and the other comparisons standing; the error goes to stderr.
            (Err(e), false) => eprintln!("the training rows{suffix} failed: {e}"),
        }
    }
    drop(_defaults_back);

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
    rows.extend(other_rows);
    Ok(rows)
}

/// Where the image tower's time goes: each op of a ViT-B/32 encoder layer alone, at the
/// tower's shapes for `sizes.batch` images (50 tokens, width 768, 12 heads) in bf16, as the
/// median milliseconds of `sizes.repeats` synced runs; then the host's cost of one tiny op
/// (microseconds, from 1,000 additions of two one-element tensors and one sync), which bounds
/// how fast a sequence of small ops can go whatever the GPU. Twelve layers of the op rows
/// against the tower's own time say whether the tower is bound by its kernels or by the host.
///
/// ```
/// let rows = clipcid_pipeline::op_profile(
///     &candle_core::Device::Cpu,
///     clipcid_pipeline::BenchSizes::SMOKE,
/// )?;
/// assert!(rows.iter().all(|r| r.value.is_finite() && r.value >= 0.0));
/// # Ok::<(), clipcid_pipeline::PipelineError>(())
/// ```
pub fn op_profile(device: &Device, sizes: BenchSizes) -> Result<Vec<BenchRow>, PipelineError> {
    let (b, t, w, heads) = (sizes.batch, 50usize, 768usize, 12usize);
    let rows = b * t;
    let dt = DType::BF16;
    let r = |shape: &[usize]| -> Result<Tensor, PipelineError> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dt)?)
    };
    let x = r(&[b, t, w])?;
    let x2 = x.reshape((rows, w))?;
    let wqkv = r(&[3 * w, w])?;
    let w1 = r(&[4 * w, w])?;
    let b1 = r(&[4 * w])?;
    let h = r(&[rows, 4 * w])?;
    let gain = r(&[w])?;
    let shift = r(&[w])?;
    let q = r(&[b, heads, t, w / heads])?;
    let scores = r(&[b, heads, t, t])?;
    let fc1 = candle_nn::Linear::new(w1.clone(), Some(b1.clone()));
    let mut out = vec![];
    let mut op = |name: &str, f: &mut dyn FnMut() -> Result<Tensor, PipelineError>| {
        let timed = time(device, sizes.repeats, || {
            f()?;
            Ok(())
        });
        match timed {
            Ok(secs) => out.push(BenchRow {
                workload: format!("op, bf16, batch {b}: {name}"),
                value: 1e3 * secs,
                unit: "ms (op)",
            }),
            // An op that fails (a path not yet run on this GPU) costs its own row, not the
            // profile's; the error goes to stderr.
            Err(e) => eprintln!("op profile, {name}: {e}"),
        }
        Ok::<(), PipelineError>(())
    };
    use candle_core::Module;
    op(
        "matmul [B*50, 768] x [768, 2304] (q/k/v sized)",
        &mut || Ok(x2.matmul(&wqkv.t()?)?),
    )?;
    op(
        "matmul [B*50, 768] x [768, 3072] (fc1, no bias)",
        &mut || Ok(x2.matmul(&w1.t()?)?),
    )?;
    op(
        "candle_nn::Linear fc1 on [B, 50, 768] (matmul + bias)",
        &mut || Ok(fc1.forward(&x)?),
    )?;
    op("bias add [B*50, 3072] (broadcast_add)", &mut || {
        Ok(h.broadcast_add(&b1)?)
    })?;
    op("quick_gelu [B*50, 3072]", &mut || {
        Ok(clipcid_models::nn::quick_gelu(&h)?)
    })?;
    op("residual add [B, 50, 768]", &mut || Ok((&x + &x)?))?;
    op("layer norm [B*50, 768] (candle fused)", &mut || {
        Ok(candle_nn::ops::layer_norm(&x2, &gain, &shift, 1e-5)?)
    })?;
    op(
        "head split [B, 50, 12, 64] -> [B, 12, 50, 64] copy",
        &mut || {
            Ok(x.reshape((b, t, heads, w / heads))?
                .transpose(1, 2)?
                .contiguous()?)
        },
    )?;
    op("scores q k^T [B, 12, 50, 64]", &mut || {
        Ok(q.matmul(&q.t()?)?)
    })?;
    op("softmax [B, 12, 50, 50] (candle fused)", &mut || {
        Ok(candle_nn::ops::softmax_last_dim(&scores)?)
    })?;
    op("scores x v [B, 12, 50, 50] x [B, 12, 50, 64]", &mut || {
        Ok(scores.matmul(&q)?)
    })?;
    // clipcid's own kernels at the same shapes, where they take bf16 on this device.
    if clipcid_kernels::gpu_kernels_take(&[&x]) {
        let qkv = r(&[rows, 3 * w])?;
        let spec = clipcid_kernels::cpu::AttentionSpec {
            positions: t,
            heads,
            causal: false,
            queries: clipcid_kernels::cpu::Queries::All,
        };
        op(
            "clipcid attention [B*50, 3*768] -> [B*50, 768], 12 heads (one op)",
            &mut || Ok(clipcid_kernels::cpu::attention(&qkv, spec)?),
        )?;
        let var = candle_core::Var::from_tensor(&qkv)?;
        op(
            "clipcid attention forward and backward (sum as the loss)",
            &mut || {
                let y = clipcid_kernels::cpu::attention(var.as_tensor(), spec)?;
                let grads = y.sum_all()?.backward()?;
                Ok(grads.get(var.as_tensor()).cloned().unwrap_or(y))
            },
        )?;
        op("clipcid layer norm [B*50, 768]", &mut || {
            Ok(clipcid_kernels::cpu::layer_norm(&x2, &gain, &shift, 1e-5)?)
        })?;
        // The student's training step (docs/guide.md, "CUDA kernels"): attention forward and
        // backward at its two towers' shapes, on the f32-arithmetic kernels and on tensor
        // cores.
        let student_shapes = [
            (
                "image tower (50 positions, 12 heads of 32)",
                50,
                12,
                32,
                false,
            ),
            (
                "text tower (77 positions, causal, 8 heads of 64)",
                77,
                8,
                64,
                true,
            ),
        ];
        for (kernels, tensor_cores) in [("f32 kernels", false), ("tensor cores", true)] {
            set_attention_tensor_cores(tensor_cores);
            for &(name, t, heads, d, causal) in &student_shapes {
                let qkv = candle_core::Var::from_tensor(&r(&[b * t, 3 * heads * d])?)?;
                let spec = clipcid_kernels::cpu::AttentionSpec {
                    positions: t,
                    heads,
                    causal,
                    queries: clipcid_kernels::cpu::Queries::All,
                };
                op(
                    &format!("clipcid attention, student {name}, {kernels}: forward"),
                    &mut || Ok(clipcid_kernels::cpu::attention(qkv.as_tensor(), spec)?),
                )?;
                let y = clipcid_kernels::cpu::attention(qkv.as_tensor(), spec)?;
                let grad = r(y.dims())?;
                op(
                    &format!("clipcid attention, student {name}, {kernels}: backward alone"),
                    &mut || {
                        Ok(clipcid_kernels::cpu::attention_backward(
                            qkv.as_tensor(),
                            &grad,
                            spec,
                        )?)
                    },
                )?;
                op(
                    &format!("clipcid attention, student {name}, {kernels}: forward and backward"),
                    &mut || {
                        let y = clipcid_kernels::cpu::attention(qkv.as_tensor(), spec)?;
                        let grads = y.sum_all()?.backward()?;
                        Ok(grads.get(qkv.as_tensor()).cloned().unwrap_or(y))
                    },
                )?;
            }
        }
        set_attention_tensor_cores(true);
        // Each tower of the bf16 student step alone, forward and backward (sum as the loss),
        // and forward alone; and the cast of the f32 master weights that each step begins
        // with.
        let cfg = ClipConfig::preset("piccollage-s12")?;
        let (student, varmap) = ClipModel::trainable_from(&cfg, init_tensors(&cfg, 0)?, device)?;
        let (px, tok) = student_batch(&cfg, b, device)?;
        // candle's autograd starts each node's input gradient as zeros and adds the first
        // gradient into it (`GradStore::or_insert`): the cost of that for one q/k/v-sized
        // activation of the text tower.
        let dqkv = r(&[b * 77, 3 * 512])?;
        op(
            "zeros_like + add on [B*77, 1536] (autograd's gradient start)",
            &mut || Ok(dqkv.zeros_like()?.add(&dqkv)?),
        )?;
        // The text tower's token embedding, forward and backward (its gradient weighted by a
        // random output gradient): candle's `index_select`, whose backward `index_add` walks
        // all B * 77 ids in one block, against `gather_rows`; for ids spread over the
        // vocabulary (the training step's) and for captions of 16 tokens padded with one id.
        let vocab = cfg.text_config.vocab_size;
        let table = candle_core::Var::from_tensor(&r(&[vocab, 512])?)?;
        let gy = r(&[b * 77, 512])?;
        let spread: Vec<u32> = (0..(b * 77) as u32)
            .map(|i| (i * 7919) % vocab as u32)
            .collect();
        let padded: Vec<u32> = (0..(b * 77) as u32)
            .map(|i| match i % 77 {
                p @ 0..16 => (i / 77 * 16 + p) * 31 % vocab as u32,
                _ => 0,
            })
            .collect();
        for (name, ids) in [("spread ids", &spread), ("padded captions", &padded)] {
            let idx = Tensor::new(ids.as_slice(), device)?;
            let lookups: [(&str, &dyn Fn() -> candle_core::Result<Tensor>); 2] = [
                ("index_select", &|| table.as_tensor().index_select(&idx, 0)),
                ("gather_rows", &|| {
                    clipcid_kernels::gather_rows(table.as_tensor(), ids)
                }),
            ];
            for (how, lookup) in lookups {
                op(
                    &format!(
                        "token embedding [B*77] of [{vocab}, 512], {name}, {how}: forward and \
                         backward"
                    ),
                    &mut || {
                        let y = lookup()?;
                        let grads = (&y * &gy)?.sum_all()?.backward()?;
                        Ok(grads.get(table.as_tensor()).cloned().unwrap_or(y))
                    },
                )?;
            }
        }
        op("student (w384 L6) weights, f32 to bf16 cast", &mut || {
            let m = student.cast(DType::BF16)?;
            Ok(m.logit_scale().clone())
        })?;
        // A whole bf16 training step of the CLIP loss both ways: the towers on casts of the
        // f32 weights made each step (whose backward pass widens every gradient), and on
        // AdamW's working copies, which its update refreshes (what the trainer runs).
        let mut opt =
            clipcid_train::AdamW::new(crate::parity::named_vars(&varmap)?, Default::default())?;
        let clip_step = |m: &ClipModel, opt: &mut clipcid_train::AdamW| {
            let loss = student_clip_loss(m, &px, &tok, student.logit_scale())?;
            opt.step(&loss.backward()?, 1e-4)?;
            Ok::<Tensor, PipelineError>(loss)
        };
        op(
            "student (w384 L6) CLIP train step, bf16, casts made each step",
            &mut || clip_step(&student.cast(DType::BF16)?, &mut opt),
        )?;
        let copies = opt.working_copies(DType::BF16, |n| n != "logit_scale")?;
        let half = student.cast_using(DType::BF16, &copies.into_iter().collect())?;
        op(
            "student (w384 L6) CLIP train step, bf16, working copies",
            &mut || clip_step(&half, &mut opt),
        )?;
        drop((opt, half));
        // One tower of the bf16 casts on a batch: forward, and with `backward` the backward
        // pass of the sum of its embeddings.
        let tower_pass = |image: bool, px: &Tensor, tok: &Tensor, backward: bool| {
            let m = student.cast(DType::BF16)?;
            let y = match image {
                true => m.encode_image(px)?,
                false => m.encode_text(tok)?,
            };
            if backward {
                y.to_dtype(DType::F32)?.sum_all()?.backward()?;
            }
            Ok::<Tensor, PipelineError>(y)
        };
        let towers = [
            ("image tower (w384 L6)", true),
            ("text tower (w512 L12, 77 tokens)", false),
        ];
        for (tower, image) in towers {
            op(
                &format!("student {tower}, bf16 casts: forward"),
                &mut || tower_pass(image, &px, &tok, false),
            )?;
            op(
                &format!("student {tower}, bf16 casts: forward and backward"),
                &mut || tower_pass(image, &px, &tok, true),
            )?;
        }
        // Each encoder layer as one autograd node with a hand-written backward pass
        // (`cuda::set_block_node`, off by default until these rows say it pays).
        set_block_node(true);
        for (tower, image) in towers {
            op(
                &format!("student {tower}, bf16 casts, one node per layer: forward and backward"),
                &mut || tower_pass(image, &px, &tok, true),
            )?;
        }
        set_block_node(false);
        // The same at a quarter of the batch: a time that shrinks less than the batch means
        // the GPU waits on the host (launches, autograd's bookkeeping).
        let quarter = (b / 4).max(1);
        let (px, tok) = student_batch(&cfg, quarter, device)?;
        for (tower, image) in towers {
            op(
                &format!("student {tower} at batch {quarter}, bf16 casts: forward and backward"),
                &mut || tower_pass(image, &px, &tok, true),
            )?;
        }
    }
    // The whole tower at a quarter and at twice the batch: throughput that grows with the
    // batch means a smaller batch leaves the GPU waiting for the host.
    let (b32, tower) = vit_b32_bf16(device)?;
    for batch in [(b / 4).max(1), 2 * b] {
        out.push(BenchRow {
            workload: format!("ViT-B/32 image tower, bf16, batch {batch}"),
            value: images_per_second(&tower, &b32, batch, device, sizes.repeats)?,
            unit: "images/s (batch sweep)",
        });
    }
    drop(tower);
    // The host's side of one op: many tiny ones, one sync.
    let one = Tensor::ones(1, DType::F32, device)?;
    let n = 1000;
    let secs = time(device, sizes.repeats, || {
        let mut acc = one.clone();
        for _ in 0..n {
            acc = (&acc + &one)?;
        }
        Ok(())
    })?;
    out.push(BenchRow {
        workload: "host cost of one tiny op (1,000 dependent additions, one sync)".into(),
        value: 1e6 * secs / n as f64,
        unit: "us per op",
    });
    Ok(out)
}
