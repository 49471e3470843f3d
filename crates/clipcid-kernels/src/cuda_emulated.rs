//! clipcid's CUDA kernels run on the CPU through `clipcid-cuda-emulator` (the same source
//! text NVRTC compiles), so that every kernel is checked on machines without a GPU:
//!
//! - the many-tensor kernels (`clipcid_adamw_many`, `clipcid_squares_many`) with the tables
//!   [`crate::many`] builds for a GPU, against the CPU's AdamW bit for bit;
//! - every typed kernel in bf16 and f16 against its own f32 variant: a kernel widens its
//!   inputs to f32 exactly and computes in f32, so the bf16 or f16 variant's output must be
//!   the f32 variant's output rounded, bit for bit, whatever the kernel computes;
//! - the f32 kernels against the CPU ops they stand in for (layer norm and its backward
//!   chain, softmax, attention and its backward pass, the head split and patch matrix, the
//!   gathered rows' gradient), and the tensor-core attention to bf16 precision.
//!
//! Launches through [`run`] go twice, threads and blocks in both orders, and must agree bit
//! for bit (a race check). The launch shapes mirror the host code in `cuda/mod.rs` (named at
//! each).
#![allow(unsafe_code)] // emulated launches; each states the kernel's arguments and sizes.

use candle_core::{DType, Device, Tensor, Var};
use clipcid_cuda_emulator::{
    launch, launch_in_order, Args, GuardedBuffer, LaunchConfig, ThreadOrder,
};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::cpu::{self, AdamWParam, AdamWStep};
use crate::many::{self, DeviceValues, MANY_CHUNK, MANY_THREADS};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// The largest absolute difference between two outputs of one length.
fn worst_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "outputs of different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The largest magnitude among `v`.
fn largest(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// The kernels' storage dtypes, with their dtype codes and 16-bit roundings.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ty {
    F32,
    Bf16,
    F16,
}

impl Ty {
    fn suffix(self) -> &'static str {
        match self {
            Ty::F32 => "f32",
            Ty::Bf16 => "bf16",
            Ty::F16 => "f16",
        }
    }

    fn code(self) -> u64 {
        match self {
            Ty::F32 => 0,
            Ty::Bf16 => 1,
            Ty::F16 => 2,
        }
    }

    fn dtype(self) -> DType {
        match self {
            Ty::F32 => DType::F32,
            Ty::Bf16 => DType::BF16,
            Ty::F16 => DType::F16,
        }
    }

    /// The 16 bits of `x` rounded to nearest-even (bf16 or f16).
    fn bits(self, x: f32) -> u16 {
        match self {
            Ty::Bf16 => bf16::from_f32(x).to_bits(),
            _ => f16::from_f32(x).to_bits(),
        }
    }

    fn widen(self, h: u16) -> f32 {
        match self {
            Ty::Bf16 => bf16::from_bits(h).to_f32(),
            _ => f16::from_bits(h).to_f32(),
        }
    }

    /// `x` rounded to this dtype and widened back.
    fn round(self, x: f32) -> f32 {
        match self {
            Ty::F32 => x,
            t => t.widen(t.bits(x)),
        }
    }
}

/// A buffer of one storage dtype.
enum Buf {
    F32(GuardedBuffer<f32>),
    Half(Ty, GuardedBuffer<u16>),
    U32(GuardedBuffer<u32>),
}

impl Buf {
    fn of(ty: Ty, values: &[f32]) -> Self {
        match ty {
            Ty::F32 => Buf::F32(GuardedBuffer::new(values)),
            t => Buf::Half(
                t,
                GuardedBuffer::new(&values.iter().map(|&v| t.bits(v)).collect::<Vec<_>>()),
            ),
        }
    }

    fn address(&self) -> u64 {
        match self {
            Buf::F32(b) => b.as_ptr() as u64,
            Buf::Half(_, b) => b.as_ptr() as u64,
            Buf::U32(b) => b.as_ptr() as u64,
        }
    }

    fn values(&self) -> Vec<f32> {
        match self {
            Buf::F32(b) => b.values(),
            Buf::Half(t, b) => b.values().into_iter().map(|h| t.widen(h)).collect(),
            Buf::U32(b) => b.values().into_iter().map(|v| v as f32).collect(),
        }
    }

    fn check(&self) -> R<()> {
        match self {
            Buf::F32(b) => b.check_guards()?,
            Buf::Half(_, b) => b.check_guards()?,
            Buf::U32(b) => b.check_guards()?,
        }
        Ok(())
    }

    /// The device values of this buffer as the many-tensor tables take them.
    fn device_values(&self) -> DeviceValues {
        let (count, code, size) = match self {
            Buf::F32(b) => (b.len(), 0, 4),
            Buf::Half(t, b) => (b.len(), t.code(), 2),
            Buf::U32(b) => (b.len(), 0, 4),
        };
        DeviceValues {
            address: self.address(),
            count,
            code,
            size,
        }
    }
}

/// One argument of a typed kernel.
#[derive(Debug, Clone)]
enum A {
    /// An input in the kernel's dtype (`const T *`).
    In(Vec<f32>),
    /// An f32 input (`const float *`).
    InF32(Vec<f32>),
    /// An index input (`const unsigned int *`).
    InU32(Vec<u32>),
    /// An output in the kernel's dtype (`T *`), of this many values, zeros at first.
    Out(usize),
    /// An f32 output (`float *`).
    OutF32(usize),
    U32(u32),
    I32(i32),
    F32(f32),
}

/// Runs `{kernel}_{ty}` over `config` with `args` (inputs rounded to `ty`) and returns its
/// outputs in order, widened to f32, each with whether it is in the kernel's dtype.
fn run(kernel: &str, ty: Ty, config: LaunchConfig, args: &[A]) -> R<Vec<(bool, Vec<f32>)>> {
    run_as(&format!("{kernel}_{}", ty.suffix()), ty, config, args)
}

/// [`run`] for a kernel of one dtype, by its whole name. The kernel runs twice, blocks and
/// threads first to last and then last to first, on fresh buffers: a kernel whose threads
/// race (read another's shared or global values with no barrier between) tends to give
/// other results in the other order, which is an error here.
fn run_as(name: &str, ty: Ty, config: LaunchConfig, args: &[A]) -> R<Vec<(bool, Vec<f32>)>> {
    let forward = run_in_order(name, ty, config, args, ThreadOrder::Forward)?;
    let reverse = run_in_order(name, ty, config, args, ThreadOrder::Reverse)?;
    for (k, ((_, a), (_, b))) in forward.iter().zip(&reverse).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        if !same {
            return Err(format!("{name}: output {k} depends on the order threads run in").into());
        }
    }
    Ok(forward)
}

/// One run of [`run_as`], in `order`.
fn run_in_order(
    name: &str,
    ty: Ty,
    config: LaunchConfig,
    args: &[A],
    order: ThreadOrder,
) -> R<Vec<(bool, Vec<f32>)>> {
    let bufs: Vec<Option<Buf>> = args
        .iter()
        .map(|a| match a {
            A::In(v) => Some(Buf::of(ty, v)),
            A::InF32(v) => Some(Buf::F32(GuardedBuffer::new(v))),
            A::InU32(v) => Some(Buf::U32(GuardedBuffer::new(v))),
            A::Out(n) => Some(Buf::of(ty, &vec![0.0; *n])),
            A::OutF32(n) => Some(Buf::F32(GuardedBuffer::new(&vec![0.0; *n]))),
            _ => None,
        })
        .collect();
    let mut list = Args::new();
    for (a, b) in args.iter().zip(&bufs) {
        list = match (a, b) {
            (_, Some(b)) => list.u64(b.address()),
            (A::U32(v), None) => list.u32(*v),
            (A::I32(v), None) => list.i32(*v),
            (A::F32(v), None) => list.f32(*v),
            _ => unreachable!("every buffer argument has a buffer"),
        };
    }
    // SAFETY: each case below gives the kernel's parameters in order (pointers as 64-bit
    // addresses of buffers sized for the launch), as the host code in cuda/mod.rs does.
    unsafe { launch_in_order(name, config, &list, order) }.map_err(|e| format!("{name}: {e}"))?;
    let mut outs = vec![];
    for (a, b) in args.iter().zip(&bufs) {
        if let Some(b) = b {
            b.check().map_err(|e| format!("{name}: {e}"))?;
            match a {
                A::Out(_) => outs.push((true, b.values())),
                A::OutF32(_) => outs.push((false, b.values())),
                _ => {}
            }
        }
    }
    Ok(outs)
}

/// Inputs in `ty`'s values (so that the f32 variant sees exactly what the 16-bit one does).
fn rounded(args: &[A], ty: Ty) -> Vec<A> {
    args.iter()
        .map(|a| match a {
            A::In(v) => A::In(v.iter().map(|&x| ty.round(x)).collect()),
            other => other.clone(),
        })
        .collect()
}

/// The property every typed kernel has: its bf16 and f16 outputs are its f32 outputs (on the
/// same, rounded, inputs) rounded to the dtype, bit for bit; its f32 side outputs equal.
fn check_typed(kernel: &str, config: LaunchConfig, args: &[A]) -> R<()> {
    for ty in [Ty::Bf16, Ty::F16] {
        let args = rounded(args, ty);
        let wide = run(kernel, Ty::F32, config, &args)?;
        let narrow = run(kernel, ty, config, &args)?;
        for (k, ((typed, w), (_, n))) in wide.iter().zip(&narrow).enumerate() {
            assert!(
                w.iter().any(|v| *v != 0.0),
                "{kernel}: output {k} is all zeros: the case tests nothing"
            );
            for (i, (a, b)) in w.iter().zip(n).enumerate() {
                let want = if *typed { ty.round(*a) } else { *a };
                assert!(
                    want.to_bits() == b.to_bits() || (want.is_nan() && b.is_nan()),
                    "{kernel}_{}: output {k}[{i}] is {b:e}, the f32 kernel's rounded {want:e}",
                    ty.suffix()
                );
            }
        }
    }
    Ok(())
}

/// `clipcid_swap_middle`'s arguments: x of dims `dims` into an output of x's size.
fn swap_middle_args(x: &[f32], dims: [u32; 4]) -> Vec<A> {
    let mut args = vec![A::In(x.to_vec()), A::Out(x.len())];
    args.extend(dims.map(A::U32));
    args
}

/// `clipcid_patchify`'s arguments: `b` images of `c` channels, `s` x `s`, in patches of `p`
/// (with `scatter`, the inverse permutation).
fn patchify_args(img: &[f32], [b, c, s, p]: [u32; 4], scatter: bool) -> Vec<A> {
    let mut args = vec![A::In(img.to_vec()), A::Out(img.len())];
    args.extend([b, c, s, p].map(A::U32));
    args.push(A::I32(i32::from(scatter)));
    args
}

/// Row kernels: a block of 128 threads per row (`row_config`); a warp per row, four rows per
/// block (`warp_rows_config`).
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(rows as u32, 128)
}

fn per_warp_row(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(4) as u32, 128)
}

/// Blocks of (32, 8) over 32 columns and a chunk of rows each (`column_config`).
fn columns(n: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid: [n.div_ceil(32) as u32, chunks as u32, 1],
        block: [32, 8, 1],
        shared_bytes: 0,
    }
}

/// An attention launch (`AttentionDims::config` and `shared_bytes`): a block per (item,
/// head) of `warps` warps, `which` 0 forward, 1 dq, 2 dk and dv.
fn attention_config(
    b: usize,
    h: usize,
    t: usize,
    tq: usize,
    d: usize,
    warps: usize,
    which: usize,
) -> LaunchConfig {
    let p = d + 1;
    let shared = [
        16 * warps * (d + t) + 4 * 2 * t * p,
        16 * warps * (2 * d + 2 * t) + 4 * 2 * t * p,
        16 * warps * (2 * d + 2 * tq) + 4 * (2 * tq * p + 2 * tq),
    ][which];
    LaunchConfig {
        grid: [b as u32, h as u32, 1],
        block: [32 * warps as u32, 1, 1],
        shared_bytes: shared,
    }
}

#[test]
fn row_kernels_in_bf16_and_f16_are_their_f32_kernels_rounded() -> R<()> {
    let (rows, d, eps) = (6usize, 40usize, 1e-5f32);
    let x = normals(rows * d, 1);
    let w: Vec<f32> = normals(d, 2).iter().map(|v| 1.0 + 0.2 * v).collect();
    let b = normals(d, 3);
    let g = normals(rows * d, 4);
    // Layer norm forward: (x, w, b, y, [rows,] d, eps).
    let xwby = vec![
        A::In(x.clone()),
        A::In(w.clone()),
        A::In(b.clone()),
        A::Out(rows * d),
    ];
    let tail = |sizes: &[usize]| -> Vec<A> {
        let mut v = xwby.clone();
        v.extend(sizes.iter().map(|&n| A::U32(n as u32)));
        v.push(A::F32(eps));
        v
    };
    check_typed("clipcid_ln_fwd", per_row(rows), &tail(&[d]))?;
    check_typed("clipcid_ln_fwd_warp", per_warp_row(rows), &tail(&[rows, d]))?;
    check_typed(
        "clipcid_ln_bwd_rows",
        per_row(rows),
        &[
            A::In(x.clone()),
            A::In(w.clone()),
            A::In(g.clone()),
            A::Out(rows * d),
            A::OutF32(2 * rows),
            A::U32(d as u32),
            A::F32(eps),
        ],
    )?;
    let stats: Vec<f32> = (0..rows)
        .flat_map(|r| [0.1 * r as f32, 1.0 + 0.05 * r as f32])
        .collect();
    let chunk = 4;
    let chunks = rows.div_ceil(chunk);
    check_typed(
        "clipcid_ln_bwd_columns",
        columns(d, chunks),
        &[
            A::In(x.clone()),
            A::In(g.clone()),
            A::InF32(stats),
            A::OutF32(chunks * 2 * d),
            A::U32(rows as u32),
            A::U32(d as u32),
            A::U32(chunk as u32),
        ],
    )?;
    check_typed(
        "clipcid_ln_bwd_total",
        LaunchConfig::linear((2 * d).div_ceil(32) as u32, 32),
        &[
            A::InF32(normals(chunks * 2 * d, 5)),
            A::Out(2 * d),
            A::U32(chunks as u32),
            A::U32(2 * d as u32),
        ],
    )?;
    check_typed(
        "clipcid_softmax_fwd",
        per_warp_row(rows),
        &[
            A::In(x.clone()),
            A::Out(rows * d),
            A::U32(rows as u32),
            A::U32(d as u32),
        ],
    )?;
    let y: Vec<f32> = x.iter().map(|v| v.abs() / 10.0).collect();
    check_typed(
        "clipcid_softmax_bwd",
        per_warp_row(rows),
        &[
            A::In(y),
            A::In(g.clone()),
            A::Out(rows * d),
            A::U32(rows as u32),
            A::U32(d as u32),
        ],
    )?;
    check_typed(
        "clipcid_column_partial",
        columns(d, chunks),
        &[
            A::In(g),
            A::OutF32(chunks * d),
            A::U32(rows as u32),
            A::U32(d as u32),
            A::U32(chunk as u32),
        ],
    )?;
    Ok(())
}

#[test]
fn elementwise_and_layout_kernels_in_bf16_and_f16_are_their_f32_kernels_rounded() -> R<()> {
    let (rows, n) = (5usize, 24usize);
    let total = rows * n;
    let (x, b, r, g) = (
        normals(total, 6),
        normals(n, 7),
        normals(total, 8),
        normals(total, 9),
    );
    // Two blocks of 64 threads: the grid-stride loops go round.
    let grid = LaunchConfig::linear(2, 64);
    let sizes = [A::U32(total as u32), A::U32(n as u32)];
    let with = |head: Vec<A>| [head, sizes.to_vec()].concat();
    check_typed(
        "clipcid_bias_add",
        grid,
        &with(vec![A::In(x.clone()), A::In(b.clone()), A::Out(total)]),
    )?;
    check_typed(
        "clipcid_bias_residual",
        grid,
        &with(vec![
            A::In(x.clone()),
            A::In(b.clone()),
            A::In(r),
            A::Out(total),
        ]),
    )?;
    check_typed(
        "clipcid_bias_quick_gelu",
        grid,
        &with(vec![A::In(x.clone()), A::In(b.clone()), A::Out(total)]),
    )?;
    check_typed(
        "clipcid_bias_quick_gelu_bwd",
        grid,
        &with(vec![A::In(x.clone()), A::In(b), A::In(g), A::Out(total)]),
    )?;
    check_typed(
        "clipcid_swap_middle",
        grid,
        &swap_middle_args(&x, [2, 3, 5, 4]),
    )?;
    // Two 3-channel 4x4 images in 2x2 patches, and back.
    let img = normals(2 * 3 * 16, 10);
    for scatter in [false, true] {
        check_typed(
            "clipcid_patchify",
            grid,
            &patchify_args(&img, [2, 3, 4, 2], scatter),
        )?;
    }
    Ok(())
}

/// The head split and the patch matrix are permutations: their f32 kernels move each value
/// where the CPU's reshapes put it.
#[test]
fn layout_kernels_move_every_value_where_the_cpu_reshape_puts_it() -> R<()> {
    let x = normals(2 * 3 * 5 * 4, 11);
    let out = run(
        "clipcid_swap_middle",
        Ty::F32,
        LaunchConfig::linear(2, 64),
        &swap_middle_args(&x, [2, 3, 5, 4]),
    )?;
    let want = Tensor::from_vec(x, (2, 3, 5, 4), &Device::Cpu)?
        .transpose(1, 2)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(out[0].1, want);
    let img = normals(2 * 3 * 4 * 4, 12);
    let out = run(
        "clipcid_patchify",
        Ty::F32,
        LaunchConfig::linear(2, 64),
        &patchify_args(&img, [2, 3, 4, 2], false),
    )?;
    // [B, C, g, p, g, p] -> [B, g, g, C, p, p]
    let want = Tensor::from_vec(img, (2, 3, 2, 2, 2, 2), &Device::Cpu)?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(out[0].1, want);
    Ok(())
}

/// The gathered table's gradient in two kernels (`row_sums_typed`): pieces of at most 64
/// positions of one row summed in order, then each row's pieces in order; checked against the
/// same sums in Rust, bit for bit, and in bf16 / f16 against f32.
#[test]
fn row_sum_kernels_sum_each_rows_gradients_in_position_order() -> R<()> {
    let (w, positions, table_rows) = (40usize, 150usize, 7usize);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let ids: Vec<u32> = (0..positions)
        .map(|_| rng.random_range(0..5u32) * 3 % 7)
        .collect();
    let g = normals(positions * w, 14);
    // Positions grouped by row (stable), pieces of at most 64 positions.
    let mut order: Vec<u32> = (0..positions as u32).collect();
    order.sort_by_key(|&i| ids[i as usize]);
    let (mut piece, mut first, mut rows) = (vec![0u32], vec![0u32], vec![]);
    let mut i = 0;
    while i < positions {
        let row = ids[order[i] as usize];
        rows.push(row);
        while i < positions && ids[order[i] as usize] == row {
            let end = (i + 64).min(positions);
            let mut j = i;
            while j < end && ids[order[j] as usize] == row {
                j += 1;
            }
            piece.push(j as u32);
            i = j;
        }
        first.push((piece.len() - 1) as u32);
    }
    let pieces = piece.len() - 1;
    let pieces_args = vec![
        A::In(g.clone()),
        A::InU32(order.clone()),
        A::InU32(piece.clone()),
        A::OutF32(pieces * w),
        A::U32(w as u32),
    ];
    check_typed(
        "clipcid_row_sum_pieces",
        LaunchConfig::linear(pieces as u32, 32),
        &pieces_args,
    )?;
    let partial = run(
        "clipcid_row_sum_pieces",
        Ty::F32,
        LaunchConfig::linear(pieces as u32, 32),
        &pieces_args,
    )?
    .remove(0)
    .1;
    let rows_args = vec![
        A::InF32(partial.clone()),
        A::InU32(first.clone()),
        A::InU32(rows.clone()),
        A::Out(table_rows * w),
        A::U32(w as u32),
    ];
    check_typed(
        "clipcid_row_sum_rows",
        LaunchConfig::linear(rows.len() as u32, 32),
        &rows_args,
    )?;
    let out = run(
        "clipcid_row_sum_rows",
        Ty::F32,
        LaunchConfig::linear(rows.len() as u32, 32),
        &rows_args,
    )?
    .remove(0)
    .1;
    let mut want = vec![0f32; table_rows * w];
    for (k, &row) in rows.iter().enumerate() {
        for c in 0..w {
            let mut s = 0f32;
            for p in first[k]..first[k + 1] {
                let mut piece_sum = 0f32;
                for &pos in &order[piece[p as usize] as usize..piece[p as usize + 1] as usize] {
                    piece_sum += g[pos as usize * w + c];
                }
                assert_eq!(piece_sum.to_bits(), partial[p as usize * w + c].to_bits());
                s += piece_sum;
            }
            want[row as usize * w + c] = s;
        }
    }
    assert_eq!(out, want);
    Ok(())
}

/// Attention's three kernels (forward, dq, dk/dv), causal or not, every position a query or
/// the first only, heads of 40 (past a warp's 32 lanes), 64 and 32, at the models' lengths
/// (ViT-B/32's 50 positions, a text tower's 77) and 1 to 32 warps a block (the range of
/// `set_attention_warps`): bf16 and f16 are f32 rounded; f32 matches the CPU op and its
/// backward pass.
#[test]
fn attention_kernels_match_the_cpu_and_their_f32_variants() -> R<()> {
    let (b, h) = (2usize, 2usize);
    // (positions, queries, causal, head size, warps per block)
    let cases = [
        (9usize, 9usize, false, 40usize, 2usize),
        (9, 9, true, 40, 2),
        (9, 1, false, 40, 2),
        (50, 50, false, 64, 8),
        (50, 1, false, 64, 8),
        (77, 77, true, 64, 1),
        (77, 77, true, 32, 32),
    ];
    for (t, tq, causal, d, warps) in cases {
        let w = h * d;
        let scale = 1.0 / (d as f32).sqrt();
        let qkv: Vec<f32> = normals(b * t * 3 * w, 15).iter().map(|v| 0.5 * v).collect();
        let g = normals(b * tq * w, 16);
        let dims = [
            A::U32(t as u32),
            A::U32(tq as u32),
            A::U32(h as u32),
            A::U32(d as u32),
            A::I32(causal as i32),
            A::F32(scale),
        ];
        let fwd_args = [vec![A::In(qkv.clone()), A::Out(b * tq * w)], dims.to_vec()].concat();
        let fwd = attention_config(b, h, t, tq, d, warps, 0);
        check_typed("clipcid_attention_fwd", fwd, &fwd_args)?;
        let dq_args = [
            vec![
                A::In(qkv.clone()),
                A::In(g.clone()),
                A::Out(b * t * 3 * w),
                A::OutF32(b * h * tq * 2),
            ],
            dims.to_vec(),
        ]
        .concat();
        let dq = attention_config(b, h, t, tq, d, warps, 1);
        check_typed("clipcid_attention_dq", dq, &dq_args)?;
        let dq_out = run("clipcid_attention_dq", Ty::F32, dq, &dq_args)?;
        let stats = dq_out[1].1.clone();
        let dkv_args = [
            vec![
                A::In(qkv.clone()),
                A::In(g.clone()),
                A::Out(b * t * 3 * w),
                A::InF32(stats),
            ],
            dims.to_vec(),
        ]
        .concat();
        let dkv = attention_config(b, h, t, tq, d, warps, 2);
        check_typed("clipcid_attention_dkv", dkv, &dkv_args)?;
        let dkv_out = run("clipcid_attention_dkv", Ty::F32, dkv, &dkv_args)?;

        // The CPU op, forward and backward.
        let spec = cpu::AttentionSpec {
            positions: t,
            heads: h,
            causal,
            queries: if tq == 1 {
                cpu::Queries::First
            } else {
                cpu::Queries::All
            },
        };
        let x = Var::from_tensor(&Tensor::from_vec(
            qkv.clone(),
            (b * t, 3 * w),
            &Device::Cpu,
        )?)?;
        let y = cpu::attention(x.as_tensor(), spec)?;
        let got = run("clipcid_attention_fwd", Ty::F32, fwd, &fwd_args)?
            .remove(0)
            .1;
        let close = |a: &[f32], b: &[f32], what: &str| {
            let worst = worst_diff(a, b);
            assert!(
                worst < 1e-5,
                "{what} (t {t}, tq {tq}, causal {causal}, d {d}, warps {warps}): {worst:e}"
            );
        };
        close(&got, &y.flatten_all()?.to_vec1::<f32>()?, "forward");
        let gy = Tensor::from_vec(g.clone(), y.shape(), &Device::Cpu)?;
        let grads = (y * gy)?.sum_all()?.backward()?;
        let dx = grads
            .get(x.as_tensor())
            .ok_or("no gradient")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // dq wrote the q columns, dk/dv the others (zeros elsewhere): their sum is dqkv.
        let both: Vec<f32> = dq_out[0]
            .1
            .iter()
            .zip(&dkv_out[0].1)
            .map(|(a, b)| a + b)
            .collect();
        close(&both, &dx, "backward");
    }
    Ok(())
}

/// f32 layer norm and softmax kernels against the CPU ops, rows of 1 to 1,024 values (the
/// warp-per-row layer norm's limit; ViT-B's 768).
#[test]
fn layer_norm_and_softmax_kernels_match_the_cpu_ops() -> R<()> {
    let rows = 6usize;
    for d in [1usize, 40, 768, 1024] {
        let x = normals(rows * d, 17);
        let w: Vec<f32> = normals(d, 18).iter().map(|v| 1.0 + 0.2 * v).collect();
        let b = normals(d, 19);
        let dev = &Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (rows, d), dev)?;
        let want = cpu::layer_norm(
            &xt,
            &Tensor::new(w.as_slice(), dev)?,
            &Tensor::new(b.as_slice(), dev)?,
            1e-5,
        )?
        .flatten_all()?
        .to_vec1::<f32>()?;
        for (kernel, config, extra) in [
            ("clipcid_ln_fwd", per_row(rows), vec![A::U32(d as u32)]),
            (
                "clipcid_ln_fwd_warp",
                per_warp_row(rows),
                vec![A::U32(rows as u32), A::U32(d as u32)],
            ),
        ] {
            let args = [
                vec![
                    A::In(x.clone()),
                    A::In(w.clone()),
                    A::In(b.clone()),
                    A::Out(rows * d),
                ],
                extra,
                vec![A::F32(1e-5)],
            ]
            .concat();
            let got = run(kernel, Ty::F32, config, &args)?.remove(0).1;
            let worst = worst_diff(&got, &want);
            assert!(worst < 1e-5, "{kernel} (d {d}): {worst:e}");
        }
        let got = run(
            "clipcid_softmax_fwd",
            Ty::F32,
            per_warp_row(rows),
            &[
                A::In(x),
                A::Out(rows * d),
                A::U32(rows as u32),
                A::U32(d as u32),
            ],
        )?
        .remove(0)
        .1;
        let want = candle_nn::ops::softmax_last_dim(&xt)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let worst = worst_diff(&got, &want);
        assert!(worst < 1e-6, "softmax (d {d}): {worst:e}");
    }
    Ok(())
}

/// Layer norm's backward pass as `cuda::layer_norm_bwd` runs it (rows kernel for dx and each
/// row's statistics, column partial sums over chunks of 64 rows, then the chunks' total for
/// dw and db) against the CPU op's gradients, in f32.
#[test]
fn layer_norm_backward_kernels_match_the_cpu_gradients() -> R<()> {
    let (rows, d, eps, chunk) = (150usize, 72usize, 1e-5f32, 64usize);
    let chunks = rows.div_ceil(chunk);
    let x = normals(rows * d, 80);
    let w: Vec<f32> = normals(d, 81).iter().map(|v| 1.0 + 0.2 * v).collect();
    let b = normals(d, 82);
    let g = normals(rows * d, 83);
    let mut out = run(
        "clipcid_ln_bwd_rows",
        Ty::F32,
        per_row(rows),
        &[
            A::In(x.clone()),
            A::In(w.clone()),
            A::In(g.clone()),
            A::Out(rows * d),
            A::OutF32(2 * rows),
            A::U32(d as u32),
            A::F32(eps),
        ],
    )?;
    let (stats, dx) = (out.remove(1).1, out.remove(0).1);
    let partial = run(
        "clipcid_ln_bwd_columns",
        Ty::F32,
        columns(d, chunks),
        &[
            A::In(x.clone()),
            A::In(g.clone()),
            A::InF32(stats),
            A::OutF32(chunks * 2 * d),
            A::U32(rows as u32),
            A::U32(d as u32),
            A::U32(chunk as u32),
        ],
    )?
    .remove(0)
    .1;
    let dwb = run(
        "clipcid_ln_bwd_total",
        Ty::F32,
        LaunchConfig::linear((2 * d).div_ceil(128) as u32, 128),
        &[
            A::InF32(partial),
            A::Out(2 * d),
            A::U32(chunks as u32),
            A::U32(2 * d as u32),
        ],
    )?
    .remove(0)
    .1;
    let dev = &Device::Cpu;
    let xv = Var::from_tensor(&Tensor::from_vec(x, (rows, d), dev)?)?;
    let wv = Var::from_tensor(&Tensor::new(w.as_slice(), dev)?)?;
    let bv = Var::from_tensor(&Tensor::new(b.as_slice(), dev)?)?;
    let y = cpu::layer_norm(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), eps)?;
    let grads = (y * Tensor::from_vec(g, (rows, d), dev)?)?
        .sum_all()?
        .backward()?;
    let grad = |v: &Var| -> R<Vec<f32>> {
        Ok(grads
            .get(v.as_tensor())
            .ok_or("no gradient")?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    for (what, got, want) in [
        ("dx", &dx[..], grad(&xv)?),
        ("dw", &dwb[..d], grad(&wv)?),
        ("db", &dwb[d..], grad(&bv)?),
    ] {
        let worst = worst_diff(got, &want);
        let top = largest(&want);
        assert!(worst <= 1e-5 * top.max(1.0), "{what}: {worst:e} of {top:e}");
    }
    Ok(())
}

/// One optimizer step over parameters of several sizes (one of two chunks), gradients in
/// f32, bf16 and f16, working copies in bf16 and f16, with and without weight decay: the
/// emulated `clipcid_adamw_many`, on the table [`many::adamw_table`] builds for a GPU, gives
/// the CPU's `adamw_update_many` bit for bit (parameters, moments and copies).
#[test]
fn adamw_for_many_parameters_on_the_gpu_table_gives_the_cpus_bits() -> R<()> {
    let dev = &Device::Cpu;
    // (values, gradient dtype, copy dtype, decays)
    let shapes = [
        (MANY_CHUNK + 4_464, Ty::Bf16, Some(Ty::Bf16), true),
        (300, Ty::F32, None, false),
        (5, Ty::F16, Some(Ty::F16), true),
        (1, Ty::F32, Some(Ty::F16), false),
    ];
    let step = AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
    };
    let grad_scale = 0.7f32;
    struct Param {
        p: Tensor,
        m: Tensor,
        v: Tensor,
        g: Tensor,
        copy: Option<Var>,
        bufs: Vec<Buf>,
    }
    let mut params = vec![];
    for (i, &(n, gt, ct, _)) in shapes.iter().enumerate() {
        let s = 10 * i as u64;
        let p = normals(n, s + 1);
        let m: Vec<f32> = normals(n, s + 2).iter().map(|x| 0.01 * x).collect();
        let v: Vec<f32> = normals(n, s + 3).iter().map(|x| 1e-4 * x * x).collect();
        let g: Vec<f32> = normals(n, s + 4).iter().map(|&x| gt.round(x)).collect();
        let mut bufs = vec![
            Buf::of(Ty::F32, &p),
            Buf::of(Ty::F32, &m),
            Buf::of(Ty::F32, &v),
            Buf::of(gt, &g),
        ];
        let copy = match ct {
            Some(ct) => {
                bufs.push(Buf::of(ct, &vec![0.0; n]));
                Some(Var::from_tensor(&Tensor::zeros(n, ct.dtype(), dev)?)?)
            }
            None => None,
        };
        params.push(Param {
            p: Tensor::from_vec(p, n, dev)?,
            m: Tensor::from_vec(m, n, dev)?,
            v: Tensor::from_vec(v, n, dev)?,
            g: Tensor::from_vec(g, n, dev)?.to_dtype(gt.dtype())?,
            copy,
            bufs,
        });
    }
    let list: Vec<AdamWParam<'_>> = params
        .iter()
        .zip(&shapes)
        .map(|(q, s)| AdamWParam {
            param: &q.p,
            grad: &q.g,
            m: &q.m,
            v: &q.v,
            decays: s.3,
            copy: q.copy.as_ref(),
        })
        .collect();
    // The GPU's table over the emulated buffers, in adamw_update_many's order.
    let mut at = vec![];
    let mut groups = vec![];
    for q in &params {
        let k = at.len();
        at.extend(q.bufs.iter().map(Buf::device_values));
        groups.push(k..at.len());
    }
    let table = many::adamw_table(&list, &at, &groups, &step, "test")?;
    assert_eq!(table.len(), 7 * 5, "the large parameter takes two chunks");
    let table = GuardedBuffer::new(&table);
    let mut args = Args::new().ptr(table.as_ptr());
    for s in many::adamw_scalars(&step, grad_scale) {
        args = args.f32(s);
    }
    // SAFETY: clipcid_adamw_many(table, nine floats); each table row addresses chunks of
    // live buffers of the sizes and dtypes its codes name.
    unsafe {
        launch(
            "clipcid_adamw_many",
            LaunchConfig::linear(5, MANY_THREADS),
            &args,
        )
    }?;
    table.check_guards()?;
    cpu::adamw_update_many(&list, step, f64::from(grad_scale))?;
    for (i, q) in params.iter().enumerate() {
        for b in &q.bufs {
            b.check()?;
        }
        for (k, t) in [&q.p, &q.m, &q.v].into_iter().enumerate() {
            let want: Vec<u32> = t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect();
            let got: Vec<u32> = q.bufs[k].values().iter().map(|v| v.to_bits()).collect();
            assert!(
                want == got,
                "parameter {i}, tensor {k} differs from the CPU's"
            );
        }
        if let Some(c) = &q.copy {
            let want = c.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            assert_eq!(q.bufs[4].values(), want, "parameter {i}'s working copy");
        }
    }
    Ok(())
}

/// Sums of squares of tensors of each dtype, one over two chunks, through the GPU's table:
/// the emulated `clipcid_squares_many`'s chunk totals, added as [`many::add_partials`] adds
/// them, match f64 sums.
#[test]
fn squares_for_many_tensors_on_the_gpu_table_match_f64_sums() -> R<()> {
    let tensors = [
        (MANY_CHUNK + 1_000, Ty::F32),
        (1_000, Ty::Bf16),
        (3, Ty::F16),
        (0, Ty::F32),
    ];
    let bufs: Vec<(Buf, Vec<f32>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, &(n, ty))| {
            let v: Vec<f32> = normals(n, 40 + i as u64)
                .iter()
                .map(|&x| ty.round(x))
                .collect();
            (Buf::of(ty, &v), v)
        })
        .collect();
    let at: Vec<DeviceValues> = bufs.iter().map(|(b, _)| b.device_values()).collect();
    let (table, owner) = many::squares_table(&at);
    assert_eq!(owner, vec![0, 0, 1, 2]);
    let table = GuardedBuffer::new(&table);
    let partials = GuardedBuffer::new(&vec![f32::NAN; owner.len()]);
    let args = Args::new().ptr(table.as_ptr()).ptr(partials.as_ptr());
    // SAFETY: clipcid_squares_many(table, partials): a block per table row, each addressing
    // a live buffer's chunk; `partials` has a value per row.
    unsafe {
        launch(
            "clipcid_squares_many",
            LaunchConfig::linear(owner.len() as u32, MANY_THREADS),
            &args,
        )
    }?;
    partials.check_guards()?;
    let sums = many::add_partials(&owner, &partials.values(), tensors.len());
    for (i, (s, (_, v))) in sums.iter().zip(&bufs).enumerate() {
        let want: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!(
            (s - want).abs() <= 1e-5 * want.max(1e-30),
            "tensor {i}: {s} vs {want}"
        );
    }
    assert_eq!(sums[3], 0.0);
    Ok(())
}

/// The tensor-core attention kernels (bf16 `mma.sync`, emulated from the PTX ISA's fragment
/// layout) against the CPU's f32 op on the same bf16 inputs, all four instances: ViT-B/32's
/// 50 positions (every one a query, or the class token only) and a text tower's 77 causal
/// positions, heads of 32 and 64, forward and backward. The launch is
/// `tensor_core::launch`'s: a block per (item, head), a warp per 16 positions.
#[test]
fn tensor_core_attention_kernels_match_the_cpu_op_to_bf16_precision() -> R<()> {
    let dev = &Device::Cpu;
    // (positions, queries, head size, 16-row tiles, causal)
    let cases = [
        (50usize, 50usize, 64usize, 4usize, false),
        (50, 1, 32, 4, false),
        (77, 77, 32, 5, true),
        (77, 77, 64, 5, true),
    ];
    for (t, tq, d, kt, causal) in cases {
        let (b, h) = (2usize, 2usize);
        let w = h * d;
        let scale = 1.0 / (d as f32).sqrt();
        let qkv: Vec<f32> = normals(b * t * 3 * w, 50 + t as u64)
            .iter()
            .map(|&v| Ty::Bf16.round(0.7 * v))
            .collect();
        let g: Vec<f32> = normals(b * tq * w, 60 + t as u64)
            .iter()
            .map(|&v| Ty::Bf16.round(v))
            .collect();
        let rows = 16 * t.div_ceil(16);
        let s = d + 8;
        let config = |shared: usize| LaunchConfig {
            grid: [b as u32, h as u32, 1],
            block: [32 * t.div_ceil(16) as u32, 1, 1],
            shared_bytes: shared,
        };
        let dims = [
            A::U32(t as u32),
            A::U32(tq as u32),
            A::U32(h as u32),
            A::I32(causal as i32),
            A::F32(scale),
        ];
        let fwd = run_as(
            &format!("clipcid_attention_tc_fwd_k{kt}_d{d}"),
            Ty::Bf16,
            config(2 * 3 * rows * s),
            &[vec![A::In(qkv.clone()), A::Out(b * tq * w)], dims.to_vec()].concat(),
        )?
        .remove(0)
        .1;
        let bwd = run_as(
            &format!("clipcid_attention_tc_bwd_k{kt}_d{d}"),
            Ty::Bf16,
            config(2 * (4 * rows * s + 2 * rows * (rows + 8))),
            &[
                vec![A::In(qkv.clone()), A::In(g.clone()), A::Out(b * t * 3 * w)],
                dims.to_vec(),
            ]
            .concat(),
        )?
        .remove(0)
        .1;
        let spec = cpu::AttentionSpec {
            positions: t,
            heads: h,
            causal,
            queries: if tq == 1 {
                cpu::Queries::First
            } else {
                cpu::Queries::All
            },
        };
        let x = Var::from_tensor(&Tensor::from_vec(qkv, (b * t, 3 * w), dev)?)?;
        let y = cpu::attention(x.as_tensor(), spec)?;
        let grads = (y.clone() * Tensor::from_vec(g, y.shape(), dev)?)?
            .sum_all()?
            .backward()?;
        let dx = grads
            .get(x.as_tensor())
            .ok_or("no gradient")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (what, got, want) in [
            ("forward", fwd, y.flatten_all()?.to_vec1::<f32>()?),
            ("backward", bwd, dx),
        ] {
            let top = largest(&want);
            let worst = worst_diff(&got, &want);
            // bf16 keeps 8 bits: outputs and the probabilities between the products round
            // to about 0.4% each.
            assert!(
                worst <= 0.02 * top,
                "{what} (t {t}, tq {tq}, d {d}): {worst:e} of {top:e}"
            );
        }
    }
    Ok(())
}

/// The per-tensor AdamW kernels (`adamw_moment` twice, then `adamw_apply`, as
/// `cuda::adamw_moment` and `cuda::adamw_apply` launch them) give the CPU's bits.
#[test]
fn per_tensor_adamw_kernels_give_the_cpus_bits() -> R<()> {
    let n = 1_000;
    let step = AdamWStep {
        lr: 0.003,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.2,
        step: 7,
    };
    let p = normals(n, 70);
    let m: Vec<f32> = normals(n, 71).iter().map(|x| 0.01 * x).collect();
    let v: Vec<f32> = normals(n, 72).iter().map(|x| 1e-4 * x * x).collect();
    let g = normals(n, 73);
    let bufs = [&p, &m, &v, &g].map(|x| GuardedBuffer::new(x));
    let grid = LaunchConfig::linear(2, 64);
    for (k, beta, square) in [(1, step.beta1, 0), (2, step.beta2, 1)] {
        let args = Args::new()
            .ptr(bufs[k].as_ptr())
            .ptr(bufs[3].as_ptr())
            .u32(n as u32)
            .f32(beta as f32)
            .f32((1.0 - beta) as f32)
            .i32(square)
            .f32(1.0);
        // SAFETY: clipcid_adamw_moment(acc, g, n, decay, rest, square, scale) over n values.
        unsafe { launch("clipcid_adamw_moment", grid, &args) }?;
    }
    let s = step.scalars_with_decay(step.weight_decay);
    let args = Args::new()
        .ptr(bufs[0].as_ptr())
        .ptr(bufs[1].as_ptr())
        .ptr(bufs[2].as_ptr())
        .u32(n as u32)
        .f32(s.keep)
        .f32(s.lr)
        .f32(s.inv_bias1)
        .f32(s.inv_bias2)
        .f32(s.eps);
    // SAFETY: clipcid_adamw_apply(p, m, v, n, keep, lr, inv_bias1, inv_bias2, eps).
    unsafe { launch("clipcid_adamw_apply", grid, &args) }?;
    let dev = &Device::Cpu;
    let ts = [&p, &m, &v, &g].map(|x| Tensor::new(x.as_slice(), dev));
    let [pt, mt, vt, gt] = ts;
    let (pt, mt, vt) = (pt?, mt?, vt?);
    cpu::adamw_update(&pt, &gt?, &mt, &vt, step)?;
    for (k, t) in [pt, mt, vt].iter().enumerate() {
        bufs[k].check_guards()?;
        let want: Vec<u32> = t.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect();
        let got: Vec<u32> = bufs[k].values().iter().map(|x| x.to_bits()).collect();
        assert!(want == got, "tensor {k} differs from the CPU's");
    }
    Ok(())
}
