//! Reading rows of the `image` tensors of embedding shards on demand, by positioned reads,
//! so that a stage touches only the rows it needs and never holds the whole matrix.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{ShardLayout, StoreError};

/// Where one shard's `image` rows lie in its file.
#[derive(Debug, Clone)]
struct ShardRows {
    path: PathBuf,
    /// Byte offset of row 0 in the file.
    offset: u64,
    dtype: DType,
    /// Global index of the shard's first row.
    first: usize,
    rows: usize,
}

/// The `image` (or `text`, [`RowReader::open_tensor`]) rows of a [`ShardLayout`], read by
/// global row position (shard order) with
/// positioned reads: `rows(a..b)` reads `(b - a) * D` values from the files, whatever the
/// size of the shards. Rows come back as [`unit_rows`] makes them (each scaled to unit L2
/// norm exactly as [`EmbeddingShard::unit_image_rows`](crate::EmbeddingShard::unit_image_rows)
/// does), so a stage reading rows here computes on the same values as one that loads the
/// shards whole.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use candle_core::{Device, Tensor};
/// use clipcid_store::{io::write_safetensors, shard_path, RowReader, ShardLayout};
/// let dir = tempfile::tempdir()?;
/// for (i, rows) in [vec![3f32, 4.0, 1.0, 0.0], vec![0.0, 2.0]].into_iter().enumerate() {
///     let n = rows.len() / 2;
///     let image = Tensor::from_vec(rows, (n, 2), &Device::Cpu)?;
///     write_safetensors(&shard_path(dir.path(), i), [("image".to_string(), image)], &Default::default())?;
/// }
/// let reader = RowReader::open(ShardLayout::open(&[dir.path().to_path_buf()])?)?;
/// assert_eq!(reader.rows(1..3)?, vec![1.0, 0.0, 0.0, 1.0]); // across the shard boundary
/// assert_eq!(reader.gather(&[2, 0])?, vec![0.0, 1.0, 0.6, 0.8]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RowReader {
    layout: ShardLayout,
    shards: Vec<ShardRows>,
    /// [`RowReader::row_ids`], read on first use.
    ids: std::sync::OnceLock<Vec<i64>>,
}

impl RowReader {
    /// Reads each shard's header once to find its `image` rows.
    pub fn open(layout: ShardLayout) -> Result<Self, StoreError> {
        Self::open_tensor(layout, "image")
    }

    /// [`RowReader::open`] for another `[n, D]` tensor of the shards (`text`): every shard
    /// with rows must have it, with the layout's row count and width.
    pub fn open_tensor(layout: ShardLayout, name: &str) -> Result<Self, StoreError> {
        let mut shards = vec![];
        let mut first = 0;
        for (path, &rows) in layout.shards.iter().zip(&layout.counts) {
            let header = crate::io::read_header(path)?;
            let info = header
                .tensors
                .get(name)
                .ok_or_else(|| StoreError::file(path, format!("no `{name}` tensor")))?;
            if rows > 0 && info.shape != [rows, layout.dim] {
                return Err(StoreError::file(
                    path,
                    format!(
                        "`{name}` is {:?} but `image` is [{rows}, {}]",
                        info.shape, layout.dim
                    ),
                ));
            }
            let dtype = crate::shard::embedding_dtype(path, name, &info.dtype)?;
            shards.push(ShardRows {
                path: path.clone(),
                offset: header.data_start + info.data_offsets[0] as u64,
                dtype,
                first,
                rows,
            });
            first += rows;
        }
        Ok(Self {
            layout,
            shards,
            ids: std::sync::OnceLock::new(),
        })
    }

    /// The shards this reader reads.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The dataset id of every row ([`ShardLayout::row_ids`]), read once and kept: a
    /// balance merge needs them for its pair files' digest and again for its keep file.
    pub fn row_ids(&self) -> Result<&[i64], StoreError> {
        if let Some(ids) = self.ids.get() {
            return Ok(ids);
        }
        let ids = self.layout.row_ids()?;
        Ok(self.ids.get_or_init(|| ids))
    }

    /// Rows in all shards.
    pub fn len(&self) -> usize {
        self.layout.total()
    }

    /// True when the shards hold no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.layout.dim
    }

    /// Rows `range` (global positions), unit-normalised, row-major `[range.len(), D]`.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>, StoreError> {
        self.rows_through(range, &mut None)
    }

    /// [`RowReader::rows`], reading through `open` (the last shard file opened, by index),
    /// which it keeps open for the next call.
    fn rows_through(
        &self,
        range: std::ops::Range<usize>,
        open: &mut Option<(usize, std::fs::File)>,
    ) -> Result<Vec<f32>, StoreError> {
        if range.end > self.len() || range.start > range.end {
            return Err(StoreError::Invalid(format!(
                "rows {range:?} asked of {} rows",
                self.len()
            )));
        }
        let mut out = Vec::with_capacity(range.len() * self.dim());
        for (i, s) in self.shards.iter().enumerate() {
            let (a, b) = (range.start.max(s.first), range.end.min(s.first + s.rows));
            if a < b {
                let file = take_or_open(open, i, &s.path)?;
                let run = self.read_run(&file, s, a - s.first, b - a);
                *open = Some((i, file));
                out.extend(run?);
            }
        }
        Ok(out)
    }

    /// The rows at `positions` (any order, repeats allowed), unit-normalised, in that order.
    /// Each shard the positions fall in is opened once per call.
    pub fn gather(&self, positions: &[u32]) -> Result<Vec<f32>, StoreError> {
        let d = self.dim();
        let mut out = vec![0f32; positions.len() * d];
        // Positions sorted, so each run of consecutive rows is one read.
        let mut order: Vec<usize> = (0..positions.len()).collect();
        order.sort_by_key(|&k| positions[k]);
        let mut open = None;
        let mut k = 0;
        while k < order.len() {
            let start = positions[order[k]] as usize;
            let mut end = start + 1;
            let mut m = k + 1;
            while m < order.len() && (positions[order[m]] as usize) <= end {
                end = end.max(positions[order[m]] as usize + 1);
                m += 1;
            }
            let run = self.rows_through(start..end, &mut open)?;
            for &slot in &order[k..m] {
                let r = positions[slot] as usize - start;
                out[slot * d..(slot + 1) * d].copy_from_slice(&run[r * d..(r + 1) * d]);
            }
            k = m;
        }
        Ok(out)
    }

    /// `count` rows from row `start` of shard `s` (open as `file`), unit-normalised.
    fn read_run(
        &self,
        file: &std::fs::File,
        s: &ShardRows,
        start: usize,
        count: usize,
    ) -> Result<Vec<f32>, StoreError> {
        let d = self.dim();
        let size = s.dtype.size_in_bytes();
        let mut bytes = vec![0u8; count * d * size];
        read_file_at(
            file,
            &s.path,
            s.offset + (start * d * size) as u64,
            &mut bytes,
        )?;
        let values: Vec<f32> =
            Tensor::from_raw_buffer(&bytes, s.dtype, &[count * d], &Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
        unit_rows(&values, d, |r, bad| {
            StoreError::file(
                &s.path,
                format!("non-finite value {bad} in row {}", start + r),
            )
        })
    }
}

/// Each `d`-wide row of `values` scaled to unit L2 norm (a zero row stays zero): the one
/// normalisation every stage applies to stored embeddings. A non-finite value is the error
/// `bad(row, value)` makes.
pub fn unit_rows(
    values: &[f32],
    d: usize,
    bad: impl Fn(usize, f32) -> StoreError,
) -> Result<Vec<f32>, StoreError> {
    let mut out = Vec::with_capacity(values.len());
    for (r, row) in values.chunks_exact(d.max(1)).enumerate() {
        push_unit_row(row, &mut out).map_err(|v| bad(r, v))?;
    }
    Ok(out)
}

/// Appends `row` scaled to unit L2 norm to `out` (a zero row stays zero); a non-finite value
/// is returned as the error. The one normalisation of [`unit_rows`] and
/// [`EmbeddingShard::unit_image_rows`](crate::EmbeddingShard::unit_image_rows).
pub(crate) fn push_unit_row(row: &[f32], out: &mut Vec<f32>) -> Result<(), f32> {
    if let Some(v) = row.iter().find(|v| !v.is_finite()) {
        return Err(*v);
    }
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    out.extend(row.iter().map(|v| v / norm));
    Ok(())
}

/// Fills `buf` from byte `offset` of `path`.
pub(crate) fn read_at(path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
    read_file_at(&open_rows(path)?, path, offset, buf)
}

/// The file of shard `shard` (at `path`) for [`read_file_at`]: the one `open` holds when it
/// is that shard's, else opened; the caller puts it back into `open` for the next read.
pub(crate) fn take_or_open(
    open: &mut Option<(usize, std::fs::File)>,
    shard: usize,
    path: &Path,
) -> Result<std::fs::File, StoreError> {
    match open.take() {
        Some((held, file)) if held == shard => Ok(file),
        _ => open_rows(path),
    }
}

/// Opens `path` for [`read_file_at`].
fn open_rows(path: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::File::open(path).map_err(|e| StoreError::file(path, format!("cannot open: {e}")))
}

/// Fills `buf` from byte `offset` of `file`, opened from `path` (named in errors).
pub(crate) fn read_file_at(
    file: &std::fs::File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    #[cfg(unix)]
    let read = {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    };
    #[cfg(not(unix))]
    let read = {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = file;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(buf))
    };
    read.map_err(|e| {
        StoreError::file(
            path,
            format!("cannot read rows at byte {offset}: {e} (did the file change?)"),
        )
    })
}
