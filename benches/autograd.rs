//! candle's backward pass through primitive ops on the CPU: a pre-norm transformer encoder
//! (layer norm, q/k/v, softmax attention, GELU MLP, residuals) built from candle's tensor ops
//! (softmax too: `candle_nn::ops::softmax_last_dim` is applied without a backward pass),
//! as every candle model is and as clipcid's towers are wherever no fused kernel takes them.
//! Each op is an autograd node, and the backward pass hands each node's input its gradient.
//! The table splits the step into forward and backward, so two builds of candle (for example
//! with and without clipcid's patch in `vendor/candle-core`, see `vendor/README.md`) compare
//! on the backward column.
//!
//! `cargo bench --bench autograd [-- --batch 32 --layers 6 --width 384 --reps 10 --warmup 2]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use clipcid_suite::{bench_arg as arg, median, peak_rss_mb};

fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_matmul(&w.t()?)?.broadcast_add(b)
}

/// One layer's parameters: ln1 w, b; q, k, v, out (w, b each); ln2 w, b; fc1 w, b; fc2 w, b.
fn layer_params(width: usize) -> candle_core::Result<Vec<Var>> {
    let dev = Device::Cpu;
    let shapes: [&[usize]; 16] = [
        &[width],
        &[width],
        &[width, width],
        &[width],
        &[width, width],
        &[width],
        &[width, width],
        &[width],
        &[width, width],
        &[width],
        &[width],
        &[width],
        &[4 * width, width],
        &[4 * width],
        &[width, 4 * width],
        &[width],
    ];
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = match (i, s.len()) {
                (0 | 10, _) => Tensor::ones(*s, DType::F32, &dev)?,
                (_, 1) => Tensor::zeros(*s, DType::F32, &dev)?,
                _ => (Tensor::randn(0f32, 1.0, *s, &dev)? / (s[1] as f64).sqrt())?,
            };
            Var::from_tensor(&t)
        })
        .collect()
}

/// The layer on `x` `[B, T, W]`, `heads` heads.
fn layer(x: &Tensor, p: &[Var], heads: usize) -> candle_core::Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    let d = w / heads;
    let p: Vec<&Tensor> = p.iter().map(|v| v.as_tensor()).collect();
    let h = layer_norm(x, p[0], p[1])?;
    let split = |y: Tensor| y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous();
    let q = split((linear(&h, p[2], p[3])? * (1.0 / (d as f64).sqrt()))?)?;
    let k = split(linear(&h, p[4], p[5])?)?;
    let v = split(linear(&h, p[6], p[7])?)?;
    let scores = q.matmul(&k.t()?)?;
    let e = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    let attn = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let a = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, w))?;
    let x = (x + linear(&a, p[8], p[9])?)?;
    let u = linear(&layer_norm(&x, p[10], p[11])?, p[12], p[13])?.gelu_erf()?;
    x + linear(&u, p[14], p[15])?
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (batch, layers, width) = (arg("--batch", 32), arg("--layers", 6), arg("--width", 384));
    let (reps, warmup) = (arg("--reps", 10), arg("--warmup", 2));
    let (positions, heads) = (50, width / 64);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "candle CPU, {threads} threads: a {layers}-layer encoder of width {width} ({heads} heads) \
         from candle's ops, batch {batch} x {positions} positions, f32, median of {reps} \
         after {warmup} warm-up"
    );
    let params = (0..layers)
        .map(|_| layer_params(width))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = Tensor::randn(0f32, 1.0, (batch, positions, width), &Device::Cpu)?;
    let (mut forward, mut backward) = (vec![], vec![]);
    for rep in 0..warmup + reps {
        let t0 = Instant::now();
        let mut y = x.clone();
        for p in &params {
            y = layer(&y, p, heads)?;
        }
        let loss = y.sqr()?.mean_all()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        for p in params.iter().flatten() {
            if grads.get(p).is_none() {
                return Err(format!("no gradient for a parameter of shape {:?}", p.dims()).into());
            }
        }
        if rep >= warmup {
            forward.push((t1 - t0).as_secs_f64());
            backward.push((t2 - t1).as_secs_f64());
        }
    }
    let (f, b) = (median(forward), median(backward));
    println!();
    println!("| forward+loss s | backward s | step s | samples/s | peak RSS MB |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {f:.3} | {b:.3} | {:.3} | {:.1} | {:.0} |",
        f + b,
        batch as f64 / (f + b),
        peak_rss_mb()
    );
    Ok(())
}
