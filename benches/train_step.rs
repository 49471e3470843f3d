//! Training step time of the PicCollage student image tower on CPU (width 384, 6 layers,
//! patch 32, image 224, output 512) at batch 32: forward + loss + backward + AdamW.
//!
//! `cargo bench --bench train_step [-- --batch 32 --reps 10 --warmup 3]`
//!
//! Two losses: `peer` is the loss of `../shared/peers/bench_vit.py` (MSE between unit
//! student and teacher rows + KL of batch similarity distributions, tau 0.07), so the
//! samples/s compare directly with open_clip on PyTorch; `piccollage` is clipcid's own
//! PicCollage loss (KL over embedding dims at T = 4 + L1). The step is split into forward
//! (with the loss), backward, and AdamW, and the table says where the time goes.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clipcid_loss::{log_softmax, normalize, PicCollageLoss};
use clipcid_models::{ClipConfig, ClipModel};
use clipcid_suite::{bench_arg as arg, median};
use clipcid_train::{AdamW, AdamWConfig};

/// `MSE(s, t) + KL(softmax(t t^T / tau) || softmax(s t^T / tau))` (batchmean), the peer's loss.
fn peer_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor, Box<dyn std::error::Error>> {
    let s = normalize(student)?;
    let t = normalize(teacher)?;
    let mse = (&s - &t)?.sqr()?.mean_all()?;
    let tau = 0.07;
    let target = (t.matmul(&t.t()?)? / tau)?;
    let log_p = log_softmax(&target)?;
    let p = log_p.exp()?;
    let log_q = log_softmax(&(s.matmul(&t.t()?)? / tau)?)?;
    let kl = (p * (log_p - log_q)?)?.sum_all()? / s.dim(0)? as f64;
    Ok((mse + kl?)?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (batch, reps, warmup) = (arg("--batch", 32), arg("--reps", 10), arg("--warmup", 3));
    let device = Device::Cpu;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("candle 0.11 CPU, {threads} threads, batch {batch}, f32, median of {reps} after {warmup} warm-up");
    println!("{}", clipcid_suite::blas_line());
    println!();
    println!("| student | loss | forward+loss s | backward s | AdamW s | step s | samples/s |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for heads in [6, 12] {
        let mut cfg = ClipConfig::preset("piccollage-s12")?;
        cfg.vision_config.num_attention_heads = heads;
        let (model, varmap) = ClipModel::trainable(&cfg, 0, &device)?;
        let params: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| "poisoned")?
            .iter()
            .filter(|(n, _)| n.starts_with("vision_model.") || n.starts_with("visual_projection."))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut opt = AdamW::new(
            params,
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        )?;
        let s = cfg.vision_config.image_size;
        let x = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &device)?.to_dtype(DType::F32)?;
        let tgt = Tensor::randn(0f32, 1.0, (batch, cfg.projection_dim), &device)?;
        let piccollage = PicCollageLoss::default();
        for loss_name in ["peer", "piccollage"] {
            let mut rows: Vec<[f64; 3]> = vec![];
            for rep in 0..warmup + reps {
                let t0 = Instant::now();
                let emb = model.encode_image(&x)?;
                let loss = match loss_name {
                    "peer" => peer_loss(&emb, &tgt)?,
                    _ => piccollage.forward(&emb, &normalize(&tgt)?, 0)?,
                };
                loss.to_scalar::<f32>()?;
                let t1 = Instant::now();
                let grads = loss.backward()?;
                let t2 = Instant::now();
                opt.step(&grads, 1e-4)?;
                // Force the last update to finish before stopping the clock.
                opt.params()
                    .last()
                    .map(|(_, v)| v.sum_all()?.to_scalar::<f32>())
                    .transpose()?;
                let t3 = Instant::now();
                if rep >= warmup {
                    rows.push([
                        (t1 - t0).as_secs_f64(),
                        (t2 - t1).as_secs_f64(),
                        (t3 - t2).as_secs_f64(),
                    ]);
                }
            }
            let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
            let step = median(rows.iter().map(|r| r.iter().sum()).collect());
            println!(
                "| w384 L6 h{heads} | {loss_name} | {:.3} | {:.3} | {:.3} | {step:.3} | {:.1} |",
                col(0),
                col(1),
                col(2),
                batch as f64 / step
            );
        }
    }
    Ok(())
}
