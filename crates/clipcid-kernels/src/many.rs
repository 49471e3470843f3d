//! The address tables of the many-tensor CUDA kernels (`clipcid_adamw_many` and
//! `clipcid_squares_many` in `cuda/kernels.cu`): a row of device addresses, counts and dtype
//! codes per chunk of a tensor. They are built here, outside the `cuda` feature, so that the
//! tests run those kernels on `clipcid-cuda-emulator` with exactly the tables a GPU gets.

use std::ops::Range;

use candle_core::{bail, Result};

use crate::cpu::{check_update_ranges, AdamWParam, AdamWStep, Extent};

/// Elements of one tensor that one block of the many-tensor kernels takes.
pub(crate) const MANY_CHUNK: usize = 1 << 16;
/// Threads per block of the many-tensor kernels (a multiple of the warp size).
pub(crate) const MANY_THREADS: u32 = 256;

/// A tensor's contiguous values in (device) memory, as the many-tensor kernels' tables give
/// them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceValues {
    /// The first value's address.
    pub address: u64,
    /// How many values.
    pub count: usize,
    /// The kernels' dtype code: 0 f32, 1 bf16, 2 f16.
    pub code: u64,
    /// Bytes per value.
    pub size: u64,
}

impl DeviceValues {
    /// The address of value `i`.
    pub fn at(&self, i: usize) -> u64 {
        self.address + self.size * i as u64
    }

    /// The same values as [`check_update_ranges`] takes them.
    pub fn extent(&self) -> Extent {
        Extent {
            start: self.address,
            end: self.at(self.count),
            count: self.count,
        }
    }
}

/// The chunks of at most [`MANY_CHUNK`] values of a tensor of `n`: `(first, values)`.
pub(crate) fn chunks_of(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(MANY_CHUNK)
        .map(move |o| (o, MANY_CHUNK.min(n - o)))
}

/// `clipcid_adamw_many`'s table, seven words per chunk (see the kernel), for `params` whose
/// tensors are `at[groups[i]]`: f32 parameter and moments, the gradient (f32, bf16 or f16),
/// then the working copy if the parameter has one. First [`check_update_ranges`]: no range
/// the kernel writes (a parameter, a moment, a copy) may overlap another range it reads or
/// writes, so that each block writes its own values and what one block writes no other reads.
pub(crate) fn adamw_table(
    params: &[AdamWParam<'_>],
    at: &[DeviceValues],
    groups: &[Range<usize>],
    step: &AdamWStep,
    op: &str,
) -> Result<Vec<u64>> {
    let extents: Vec<_> = at.iter().map(DeviceValues::extent).collect();
    let per_param: Vec<_> = groups.iter().map(|r| &extents[r.clone()]).collect();
    check_update_ranges(&per_param, op)?;
    let plain = step.scalars_with_decay(0.0);
    let decayed = step.scalars_with_decay(step.weight_decay);
    let mut table = vec![];
    for (p, k) in params.iter().zip(groups.iter().map(|r| r.start)) {
        let [pv, mv, vv, gv] = [at[k], at[k + 1], at[k + 2], at[k + 3]];
        if [pv, mv, vv].iter().any(|t| t.code != 0) {
            bail!("{op}: parameters and moments must be f32");
        }
        let copy = p.copy.map(|_| at[k + 4]);
        let keep = if p.decays { decayed.keep } else { plain.keep };
        let codes = gv.code | copy.map_or(0, |c| c.code) << 8;
        for (o, n) in chunks_of(pv.count) {
            table.extend([pv.at(o), mv.at(o), vv.at(o), gv.at(o)]);
            table.push(copy.map_or(0, |c| c.at(o)));
            table.push(n as u64 | (u64::from(keep.to_bits()) << 32));
            table.push(codes);
        }
    }
    Ok(table)
}

/// `clipcid_adamw_many`'s scalar arguments after the table, in order: the moments' decays
/// and their complements, the gradient factor, then the step's learning rate, bias
/// corrections and epsilon.
pub(crate) fn adamw_scalars(step: &AdamWStep, grad_scale: f32) -> [f32; 9] {
    let s = step.scalars_with_decay(0.0);
    [
        step.beta1 as f32,
        (1.0 - step.beta1) as f32,
        step.beta2 as f32,
        (1.0 - step.beta2) as f32,
        grad_scale,
        s.lr,
        s.inv_bias1,
        s.inv_bias2,
        s.eps,
    ]
}

/// `clipcid_squares_many`'s table (two words per chunk: address, then count with the dtype
/// code in the high half) and the tensor each chunk belongs to.
pub(crate) fn squares_table(at: &[DeviceValues]) -> (Vec<u64>, Vec<usize>) {
    let mut owner = vec![];
    let mut table = vec![];
    for (t, v) in at.iter().enumerate() {
        for (o, n) in chunks_of(v.count) {
            owner.push(t);
            table.extend([v.at(o), n as u64 | v.code << 32]);
        }
    }
    (table, owner)
}

/// Each of `tensors` tensors' sum of squares: its chunks' f32 totals added in f64, in order.
pub(crate) fn add_partials(owner: &[usize], partials: &[f32], tensors: usize) -> Vec<f64> {
    let mut sums = vec![0f64; tensors];
    for (&t, &p) in owner.iter().zip(partials) {
        sums[t] += f64::from(p);
    }
    sums
}
