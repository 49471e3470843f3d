//! Rows of a table by index (an embedding lookup, a sampled set of class centres, the pooled
//! position of each sequence) with a backward pass that sums each row's gradients in a fixed
//! order, the same on every device.
//!
//! candle's `index_select` takes its gradient with `index_add`, whose CUDA kernel gives each
//! of the row's `W` columns one thread and loops over every index in turn: a text tower's
//! token embedding at batch 256 (19,712 ids, `W` = 512) is then one block of 512 threads
//! walking 19,712 dependent read-modify-writes, on one of the GPU's streaming
//! multiprocessors. Here the host, which holds the ids anyway, groups the positions by row;
//! the gradient is then a sum over each group, in pieces of at most [`GRADIENT_PIECE`]
//! positions (a GPU block each) whose partial sums are added in order (a block per row).
//! [`RowSums`] does the same sums in the same order on the CPU, which is what the tests
//! compare the GPU's with.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::node::PrecomputedOutput;
use crate::pool;

/// Positions of one row summed one after another before the pieces' sums are added in order
/// (on the CPU and the GPU alike, so both add in one order).
pub(crate) const GRADIENT_PIECE: usize = 64;

const OP: &str = "clipcid-gather-rows";

/// Table rows one task of the CPU kernel covers (most of a text tower's vocabulary is never
/// read in a batch: a span costs its binary searches and little else).
const TABLE_ROWS_PER_TASK: usize = 256;

/// The rows `ids` of `table` `[N, W]`, as `[ids.len(), W]`, differentiable in `table`
/// (`index_select` on dimension 0). Where clipcid's CUDA kernels take the table (a GPU, f32,
/// bf16 or f16) and it tracks a gradient, the backward pass sums each row's gradients in f32
/// in a fixed order (positions of one row ascending, in pieces of 64 whose sums are added in
/// order), in two launches however many ids repeat. Elsewhere (the CPU) candle's
/// `index_select`, whose gradient is the same sums in f32 where no row repeats more than
/// 64 times.
///
/// An id outside the table is an error naming it.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
///
/// let table = Var::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
/// let rows = clipcid_kernels::gather_rows(table.as_tensor(), &[2, 0, 2])?;
/// assert_eq!(rows.to_vec2::<f32>()?, [[5.0, 6.0], [1.0, 2.0], [5.0, 6.0]]);
/// // Row 2 was read twice, row 1 never.
/// let grads = rows.sum_all()?.backward()?;
/// let d = grads.get(table.as_tensor()).expect("the table has a gradient");
/// assert_eq!(d.to_vec2::<f32>()?, [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]);
/// assert!(clipcid_kernels::gather_rows(table.as_tensor(), &[3]).is_err());
/// assert!(clipcid_kernels::gather_rows(&table.as_tensor().flatten_all()?, &[0]).is_err());
/// # Ok(()) }
/// ```
pub fn gather_rows(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (n, w) = rows_and_width(table, "table")?;
    check_ids(ids, n)?;
    if ids.is_empty() || w == 0 {
        return Tensor::zeros((ids.len(), w), table.dtype(), table.device());
    }
    let idx = Tensor::from_slice(ids, ids.len(), table.device())?;
    // On the CPU candle's `index_add` is a plain loop and the cost is the memory: the node's
    // table-sized sum before autograd adds it into its own (a 100 MB f32 text embedding)
    // made the lookup's forward and backward 1.6x slower on the 2-core CI machine. A GPU
    // zeroes such a buffer in microseconds.
    if !table.track_op() || !crate::gpu_kernels_take(&[table]) {
        return table.index_select(&idx, 0);
    }
    let y = table.detach().index_select(&idx, 0)?;
    table.apply_op1(GatherNode {
        out: PrecomputedOutput::new(y)?,
        index: Arc::new(RowIndex::new(ids, w)),
        table_rows: n,
    })
}

/// An error naming the first id outside a table of `table_rows` rows, or more ids than the
/// index's `u32` positions hold.
fn check_ids(ids: &[u32], table_rows: usize) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= table_rows) {
        bail!("{OP}: row {bad} of a table of {table_rows} rows");
    }
    if u32::try_from(ids.len()).is_err() {
        bail!("{OP}: {} ids is more than one call takes", ids.len());
    }
    Ok(())
}

/// The dimensions of `t` `[rows, W]`, or an error naming it (`what`) and its shape.
fn rows_and_width(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    match t.dims() {
        &[rows, w] => Ok((rows, w)),
        dims => bail!("{OP}: expected a {what} of rows [N, W], got shape {dims:?}"),
    }
}

/// Where each table row's gradient comes from: the positions of `ids` grouped by row (rows
/// ascending, positions ascending within a row), cut into pieces of at most
/// [`GRADIENT_PIECE`] positions. Packed for a device as one `u32` vector: `order`, `piece`,
/// `first`, `rows`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowIndex {
    /// The positions, sorted by (row, position).
    order: Vec<u32>,
    /// Piece `p` is `order[piece[p]..piece[p + 1]]`.
    piece: Vec<u32>,
    /// Row `rows[k]`'s pieces are `first[k]..first[k + 1]`.
    first: Vec<u32>,
    /// The rows some position reads, ascending.
    rows: Vec<u32>,
    /// The row width.
    width: usize,
}

impl RowIndex {
    /// The grouping of `ids` (at most `u32::MAX` of them) for rows of `width`.
    pub(crate) fn new(ids: &[u32], width: usize) -> Self {
        // (row, position) in one u64: the sort is by row, then position, and all keys differ.
        let mut keys: Vec<u64> = ids
            .iter()
            .enumerate()
            .map(|(p, &id)| (u64::from(id) << 32) | p as u64)
            .collect();
        keys.sort_unstable();
        let mut index = Self {
            order: keys.iter().map(|&k| k as u32).collect(),
            piece: vec![],
            first: vec![],
            rows: vec![],
            width,
        };
        let mut i = 0;
        while i < keys.len() {
            let row = (keys[i] >> 32) as u32;
            let end = i + keys[i..].partition_point(|&k| (k >> 32) as u32 == row);
            index.rows.push(row);
            index.first.push(index.piece.len() as u32);
            for start in (i..end).step_by(GRADIENT_PIECE) {
                index.piece.push(start as u32);
            }
            i = end;
        }
        index.piece.push(keys.len() as u32);
        index.first.push((index.piece.len() - 1) as u32);
        index
    }

    /// Positions (the gradient's rows).
    pub(crate) fn positions(&self) -> usize {
        self.order.len()
    }

    /// Pieces of at most [`GRADIENT_PIECE`] positions.
    pub(crate) fn pieces(&self) -> usize {
        self.piece.len() - 1
    }

    /// Distinct rows read.
    pub(crate) fn used(&self) -> usize {
        self.rows.len()
    }

    /// The row width.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// `order`, `piece`, `first` and `rows` end to end.
    fn packed(&self) -> Vec<u32> {
        [&self.order[..], &self.piece, &self.first, &self.rows].concat()
    }

    /// The length of [`RowIndex::packed`].
    pub(crate) fn packed_len(&self) -> usize {
        self.positions() + self.pieces() + 1 + self.used() + 1 + self.used()
    }

    /// Where the four parts lie in [`RowIndex::packed`]: `order`, `piece`, `first`, `rows`.
    pub(crate) fn parts(&self) -> [std::ops::Range<usize>; 4] {
        let ends = [
            self.positions(),
            self.positions() + self.pieces() + 1,
            self.positions() + self.pieces() + self.used() + 2,
            self.packed_len(),
        ];
        [
            0..ends[0],
            ends[0]..ends[1],
            ends[1]..ends[2],
            ends[2]..ends[3],
        ]
    }

    /// The four parts of a packed index of this shape: `order`, `piece`, `first`, `rows`.
    fn split<'a, T>(&self, packed: &'a [T]) -> Result<[&'a [T]; 4]> {
        if packed.len() != self.packed_len() {
            bail!(
                "{OP}: a packed row index of {} values, {} expected",
                packed.len(),
                self.packed_len()
            );
        }
        Ok(self.parts().map(|r| &packed[r]))
    }
}

/// [`gather_rows`]'s backward pass alone: the gradient of a table of `table_rows` rows,
/// `[table_rows, W]` in `grad`'s dtype, from the gradient `grad` `[ids.len(), W]` of the rows
/// `ids` read. Row `r` is the sum of the rows of `grad` at the positions where `ids` holds `r`
/// (zero where it holds none), added in f32 in [`gather_rows`]'s fixed order: on a GPU (f32,
/// bf16 or f16) its CUDA kernels, on the CPU (any dtype) the same sums in the same order, so
/// the two give the same bits.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
///
/// let grad = Tensor::new(&[[1f32, 2.0], [10.0, 20.0], [100.0, 200.0]], &Device::Cpu)?;
/// let table_grad = clipcid_kernels::gather_rows_backward(&grad, &[2, 0, 2], 3)?;
/// assert_eq!(table_grad.to_vec2::<f32>()?, [[10.0, 20.0], [0.0, 0.0], [101.0, 202.0]]);
/// assert!(clipcid_kernels::gather_rows_backward(&grad, &[2, 0, 3], 3).is_err());
/// # Ok(()) }
/// ```
pub fn gather_rows_backward(grad: &Tensor, ids: &[u32], table_rows: usize) -> Result<Tensor> {
    let (positions, w) = rows_and_width(grad, "gradient")?;
    if positions != ids.len() {
        bail!("{OP}: a gradient of {positions} rows for {} ids", ids.len());
    }
    check_ids(ids, table_rows)?;
    if ids.is_empty() || w == 0 {
        return Tensor::zeros((table_rows, w), grad.dtype(), grad.device());
    }
    row_sums(grad, &Arc::new(RowIndex::new(ids, w)), table_rows)
}

/// [`gather_rows_backward`] with the ids grouped already.
fn row_sums(grad: &Tensor, index: &Arc<RowIndex>, table_rows: usize) -> Result<Tensor> {
    let dtype = grad.dtype();
    // The CPU kernel reads f32 (the GPU's read each dtype they take and add in f32 as well).
    let g = match grad.device().is_cpu() {
        true => grad.to_dtype(DType::F32)?,
        false => grad.clone(),
    };
    let packed = Tensor::from_vec(index.packed(), index.packed_len(), grad.device())?;
    let sums = g.contiguous()?.apply_op2_no_bwd(
        &packed,
        &RowSums {
            index: Arc::clone(index),
            table_rows,
        },
    )?;
    sums.to_dtype(dtype)
}

/// [`gather_rows`]'s node: the rows computed by `index_select` handed on, [`row_sums`] back.
struct GatherNode {
    out: PrecomputedOutput,
    index: Arc<RowIndex>,
    table_rows: usize,
}

impl CustomOp1 for GatherNode {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.take_cpu(OP)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.take_cuda(OP)
    }

    fn bwd(&self, _table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(row_sums(grad, &self.index, self.table_rows)?))
    }
}

/// The table-sized sums of a gradient's rows as a [`RowIndex`] groups them (its packed form
/// the op's second input).
pub(crate) struct RowSums {
    pub(crate) index: Arc<RowIndex>,
    pub(crate) table_rows: usize,
}

impl CustomOp2 for RowSums {
    fn name(&self) -> &'static str {
        "clipcid-row-sums"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        packed: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ix = &self.index;
        let w = ix.width();
        let g = crate::cpu::f32_slice(g, lg, self.name())?;
        let CpuStorage::U32(packed) = packed else {
            bail!("{}: expected a u32 row index", self.name());
        };
        let Some((p0, p1)) = lp.contiguous_offsets() else {
            bail!("{}: expected a contiguous row index", self.name());
        };
        let [order, piece, first, rows] = ix.split(&packed[p0..p1])?;
        if g.len() != ix.positions() * w {
            bail!(
                "{}: a gradient of {} values for {} rows of {w}",
                self.name(),
                g.len(),
                ix.positions()
            );
        }
        let idx = |i: u32| i as usize;
        // Each row read: the sum of its pieces' sums, in order (the GPU kernels' order), into
        // a table cut into spans of rows that the pool's threads take in turn.
        let mut table = vec![0f32; self.table_rows * w];
        pool::for_each_chunk_mut(&mut table, w * TABLE_ROWS_PER_TASK, |span, out| {
            let (r0, r1) = (span.start / w, span.end / w);
            let k0 = rows.partition_point(|&r| idx(r) < r0);
            let k1 = rows.partition_point(|&r| idx(r) < r1);
            let mut part = vec![0f32; w];
            for k in k0..k1 {
                let sum = &mut out[(idx(rows[k]) - r0) * w..][..w];
                for p in idx(first[k])..idx(first[k + 1]) {
                    part.fill(0.0);
                    for &pos in &order[idx(piece[p])..idx(piece[p + 1])] {
                        let src = &g[idx(pos) * w..][..w];
                        part.iter_mut().zip(src).for_each(|(s, x)| *s += x);
                    }
                    sum.iter_mut().zip(&part).for_each(|(s, x)| *s += x);
                }
            }
        });
        Ok((CpuStorage::F32(table), Shape::from((self.table_rows, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        packed: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::row_sums((g, lg), (packed, lp), &self.index, self.table_rows)?;
        Ok((out, Shape::from((self.table_rows, self.index.width()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_groups_positions_by_row_in_pieces() {
        // Row 7 read 130 times (three pieces: 64, 64, 2), row 1 twice, row 3 once.
        let mut ids = vec![7u32; 130];
        ids.insert(5, 1);
        ids.push(3);
        ids.push(1);
        let ix = RowIndex::new(&ids, 4);
        assert_eq!(ix.rows, [1, 3, 7]);
        assert_eq!(ix.first, [0, 1, 2, 5]);
        assert_eq!(ix.piece, [0, 2, 3, 67, 131, 133]);
        assert_eq!(&ix.order[..3], [5, 132, 131]);
        assert_eq!(
            ix.order[3..].to_vec(),
            (0..5).chain(6..131).collect::<Vec<u32>>()
        );
        let packed = ix.packed();
        assert_eq!(packed.len(), ix.packed_len());
        let [order, piece, first, rows] = ix.split(&packed).expect("split");
        assert_eq!(
            (order, piece, first, rows),
            (&ix.order[..], &ix.piece[..], &ix.first[..], &ix.rows[..])
        );
        assert!(ix.split(&packed[1..]).is_err());
    }
}
