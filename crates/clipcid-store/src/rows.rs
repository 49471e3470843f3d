//! Reading rows of the `image` tensors of embedding shards on demand, by positioned reads,
//! so that a stage touches only the rows it needs and never holds the whole matrix.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{ShardLayout, StoreError};

/// Where one shard's `image` rows lie in its file (the layout's shard index has the
/// file itself).
#[derive(Debug, Clone)]
struct ShardRows {
    /// Byte offset of row 0 in the file.
    offset: u64,
    dtype: DType,
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
    /// The `image` rows of the layout's shards, where the layout found them in the headers.
    pub fn open(layout: ShardLayout) -> Result<Self, StoreError> {
        Self::open_tensor(layout, "image")
    }

    /// [`RowReader::open`] for another `[n, D]` tensor of the shards (`text`): every shard
    /// with rows must have it, with the layout's row count and width. The tensors are found
    /// in the entries the layout read from the headers; no file is opened here.
    pub fn open_tensor(layout: ShardLayout, name: &str) -> Result<Self, StoreError> {
        let mut shards = vec![];
        for i in 0..layout.shards.len() {
            let (path, rows, tensors) = layout.shard(i)?;
            let (info, offset) = tensors
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
            shards.push(ShardRows { offset, dtype });
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
        self.layout.index().rows_total()
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
        if range.end > self.len() || range.start > range.end {
            return Err(StoreError::Invalid(format!(
                "rows {range:?} asked of {} rows",
                self.len()
            )));
        }
        let mut out = Vec::with_capacity(range.len() * self.dim());
        let index = self.layout.index();
        // From the shard that holds row `range.start` on.
        let from = index
            .shard_holding(range.start)
            .unwrap_or(self.shards.len());
        for (i, s) in self.shards.iter().enumerate().skip(from) {
            let rows = index.rows_of(i);
            if rows.start >= range.end {
                break;
            }
            let (a, b) = (range.start.max(rows.start), range.end.min(rows.end));
            if a < b {
                out.extend(self.read_run(i, s, a - rows.start, b - a)?);
            }
        }
        Ok(out)
    }

    /// The rows at `positions` (any order, repeats allowed), unit-normalised, in that order.
    /// Each run of consecutive rows is one read.
    pub fn gather(&self, positions: &[u32]) -> Result<Vec<f32>, StoreError> {
        let d = self.dim();
        let mut out = vec![0f32; positions.len() * d];
        // Positions sorted, so each run of consecutive rows is one read.
        let mut order: Vec<usize> = (0..positions.len()).collect();
        order.sort_by_key(|&k| positions[k]);
        let mut k = 0;
        while k < order.len() {
            let start = positions[order[k]] as usize;
            let mut end = start + 1;
            let mut m = k + 1;
            while m < order.len() && (positions[order[m]] as usize) <= end {
                end = end.max(positions[order[m]] as usize + 1);
                m += 1;
            }
            let run = self.rows(start..end)?;
            for &slot in &order[k..m] {
                let r = positions[slot] as usize - start;
                out[slot * d..(slot + 1) * d].copy_from_slice(&run[r * d..(r + 1) * d]);
            }
            k = m;
        }
        Ok(out)
    }

    /// `count` rows from row `start` of shard `i` (whose rows lie as `s` says),
    /// unit-normalised.
    fn read_run(
        &self,
        i: usize,
        s: &ShardRows,
        start: usize,
        count: usize,
    ) -> Result<Vec<f32>, StoreError> {
        let d = self.dim();
        let size = s.dtype.size_in_bytes();
        let mut bytes = vec![0u8; count * d * size];
        let index = self.layout.index();
        let path = index.path(i);
        read_file_at(
            &*index.file(i)?,
            path,
            s.offset + (start * d * size) as u64,
            &mut bytes,
        )?;
        let values: Vec<f32> =
            Tensor::from_raw_buffer(&bytes, s.dtype, &[count * d], &Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
        unit_rows(&values, d, |r, bad| {
            StoreError::file(path, format!("non-finite value {bad} in row {}", start + r))
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

/// What a file was when a stage read its header: its length and modification time. A shard
/// file opened later for its rows must still be the same, or the places found in the header
/// no longer hold what they held (a shard rewritten under a running stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// The stamp of `file`, open from `path` (named in errors).
    pub(crate) fn of(file: &std::fs::File, path: &Path) -> Result<Self, StoreError> {
        let meta = file
            .metadata()
            .map_err(|e| StoreError::file(path, format!("cannot stat: {e}")))?;
        Ok(Self {
            len: meta.len(),
            // `None` where the platform keeps no modification time: the length alone.
            modified: meta.modified().ok(),
        })
    }
}

/// The shard files the readers of one [`ShardLayout`] have open, by shard index, at most
/// [`ShardLayout::open_files`]: the least recently read is closed first. Reads are
/// positioned (`pread`), so one open file serves every thread at once.
///
/// A list scanned in full, not a hash map with a linked list: a lookup is at most 4096
/// comparisons of integers, beside a system call per read.
#[derive(Debug)]
pub(crate) struct OpenShards {
    /// Open files, the least recently read first.
    files: std::sync::Mutex<Vec<(usize, std::sync::Arc<std::fs::File>)>>,
    capacity: usize,
}

impl Default for OpenShards {
    fn default() -> Self {
        Self::with_capacity(open_files_budget())
    }
}

/// How many shard files the readers of one layout keep open: an eighth of this process's
/// soft limit on open files (`ulimit -n`), between 32 and 4096; 256 where there is no such
/// limit to read. 128 at Linux's usual 1024; 4096 once [`raise_open_files_limit`] has raised
/// the limit to 32,768 or more.
fn open_files_budget() -> usize {
    #[cfg(unix)]
    {
        // `None`: no limit.
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        (soft.unwrap_or(u64::MAX) / 8).clamp(32, 4096) as usize
    }
    #[cfg(not(unix))]
    {
        256
    }
}

/// Raises this process's soft limit on open files (`ulimit -n`) to its hard limit, at most
/// 65,536, and returns the soft limit in force afterwards (`None` where there is none: not
/// Unix). It never lowers the limit, and a refusal leaves it as it was. The `clipcid` binary
/// calls it at start, as Go's runtime does for every Go program: the soft limit (often 1024)
/// exists for programs that use `select`, which clipcid does not, and a bigger one lets each
/// [`ShardLayout`] keep more shard files open ([`ShardLayout::open_files`]).
///
/// ```
/// let before = clipcid_store::raise_open_files_limit();
/// let after = clipcid_store::raise_open_files_limit();
/// # #[cfg(unix)]
/// assert!(after.is_some() && after >= before);
/// ```
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let limit = getrlimit(Resource::Nofile);
        let target = limit.maximum.unwrap_or(u64::MAX).min(65_536);
        if limit.current.is_some_and(|soft| soft < target) {
            let raised = rustix::process::Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            };
            // Refused (a sandbox): the limit stays as it was, and so does every reader.
            let _ = setrlimit(Resource::Nofile, raised);
        }
        Some(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// A cache: layouts of the same shards are equal whatever files each holds open.
impl PartialEq for OpenShards {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for OpenShards {}

impl OpenShards {
    /// Keeps at most `capacity` (at least 1) files open.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            files: Default::default(),
            capacity: capacity.max(1),
        }
    }

    /// The file of shard `shard` (at `path`): the open one, else opened (closing the least
    /// recently read one when `capacity` are open). Where the process has run out of file
    /// handles, every file held here is closed and the open tried once more. A file opened
    /// here whose length or modification time is not `stamp` (what it was when its header was
    /// read) is an error naming it: it was rewritten since, and the places its header gave
    /// no longer hold those rows. A file already open stays the one that was read.
    pub(crate) fn get(
        &self,
        shard: usize,
        path: &Path,
        stamp: FileStamp,
    ) -> Result<std::sync::Arc<std::fs::File>, StoreError> {
        // A panic while the lock was held leaves at worst a file too many or too few here.
        let lock = || self.files.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut files = lock();
            if let Some(at) = files.iter().position(|(s, _)| *s == shard) {
                let entry = files.remove(at);
                let file = entry.1.clone();
                files.push(entry);
                return Ok(file);
            }
        }
        // Opened outside the lock: other threads' reads of open files go on meanwhile.
        let file = match std::fs::File::open(path) {
            #[cfg(unix)]
            Err(e) if rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::MFILE) => {
                lock().clear();
                std::fs::File::open(path)
            }
            r => r,
        }
        .map_err(|e| StoreError::file(path, format!("cannot open: {e}")))?;
        let now = FileStamp::of(&file, path)?;
        if now != stamp {
            return Err(StoreError::file(
                path,
                format!(
                    "changed since this stage read its header ({} bytes then, {} now{}): a shard rewritten while a stage reads it (another embed run into the same folder?); run the stage again once the shards are written",
                    stamp.len,
                    now.len,
                    if now.len == stamp.len { ", modified since" } else { "" }
                ),
            ));
        }
        let file = std::sync::Arc::new(file);
        let mut files = lock();
        // Another thread may have opened it meanwhile: keep one.
        files.retain(|(s, _)| *s != shard);
        if files.len() >= self.capacity {
            files.remove(0);
        }
        files.push((shard, file.clone()));
        Ok(file)
    }

    /// The most files kept open.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The shards whose files are open, the least recently read first.
    #[cfg(test)]
    fn open_shards(&self) -> Vec<usize> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.iter().map(|(s, _)| *s).collect()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Reads all of `file` from byte 0.
    fn content(file: &std::fs::File, path: &Path) -> Vec<u8> {
        let mut buf = vec![0u8; std::fs::metadata(path).unwrap().len() as usize];
        read_file_at(file, path, 0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn open_shard_files_are_each_shards_own_and_at_most_capacity_stay_open() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..5)
            .map(|i| {
                let p = dir.path().join(format!("{i}.bin"));
                std::fs::write(&p, format!("shard {i}")).unwrap();
                p
            })
            .collect();
        let stamp = |p: &Path| FileStamp::of(&std::fs::File::open(p).unwrap(), p).unwrap();
        let stamps: Vec<FileStamp> = paths.iter().map(|p| stamp(p)).collect();
        let files = OpenShards::with_capacity(3);
        // Every file handed out is its shard's, whatever was open or closed before.
        for i in [0, 1, 2, 0, 3, 4, 1, 1, 2, 4] {
            let file = files.get(i, &paths[i], stamps[i]).unwrap();
            assert_eq!(content(&file, &paths[i]), format!("shard {i}").into_bytes());
            assert!(files.open_shards().len() <= 3);
        }
        // The least recently read closed first: after 0 1 2 0 3 (1 closed), 4 (2 closed),
        // 1 (0 closed), 1, 2 (3 closed), 4, the open ones are 1 2 4 in order of use.
        assert_eq!(files.open_shards(), vec![1, 2, 4]);
        // An open file is handed out again, not opened again.
        let a = files.get(4, &paths[4], stamps[4]).unwrap();
        let b = files.get(4, &paths[4], stamps[4]).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        // A file that cannot be opened is an error naming it, and nothing is left open for it.
        let missing = dir.path().join("missing.bin");
        let err = files.get(7, &missing, stamps[0]).unwrap_err().to_string();
        assert!(
            err.contains("missing.bin") && err.contains("cannot open"),
            "{err}"
        );
        assert_eq!(files.open_shards(), vec![1, 2, 4]);
        // Files rewritten after their stamps: one still open is served as it was read, one
        // opened again is refused, whether its length or only its modification time changed.
        // (Shard 4 replaced as write_safetensors replaces a file: a new file renamed over it.)
        let replacement = dir.path().join("4.bin.tmp");
        std::fs::write(&replacement, "shard 4, rewritten").unwrap();
        std::fs::rename(&replacement, &paths[4]).unwrap();
        std::fs::write(&paths[0], "shard 0, rewritten").unwrap();
        std::fs::write(&paths[3], "shard 9").unwrap();
        let file = std::fs::File::options()
            .write(true)
            .open(&paths[3])
            .unwrap();
        let later = stamps[3].modified.unwrap() + std::time::Duration::from_secs(1);
        file.set_modified(later).unwrap();
        let mut first = [0u8; 7];
        read_file_at(&a, &paths[4], 0, &mut first).unwrap();
        assert_eq!(&first, b"shard 4");
        assert_eq!(a.metadata().unwrap().len(), 7);
        for (i, says) in [
            (0, "7 bytes then, 18 now"),
            (3, "7 bytes then, 7 now, modified since"),
        ] {
            let err = files.get(i, &paths[i], stamps[i]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{i}.bin"))
                    && err.contains(says)
                    && err.contains("changed since"),
                "{err}"
            );
        }
        assert_eq!(files.open_shards(), vec![1, 2, 4]);
    }

    /// The open-file budget follows the soft limit on open files (an eighth, within 32 and
    /// 4096), and raising the limit never lowers it. The limit is restored afterwards.
    #[cfg(unix)]
    #[test]
    fn the_open_file_budget_is_an_eighth_of_the_limit_and_raising_never_lowers_it() {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let saved = getrlimit(Resource::Nofile);
        let set = |soft: u64| {
            let limit = Rlimit {
                current: Some(soft),
                maximum: saved.maximum,
            };
            setrlimit(Resource::Nofile, limit).unwrap();
        };
        for (soft, budget) in [(200, 32), (1024, 128), (4000, 500)] {
            set(soft);
            assert_eq!(open_files_budget(), budget, "soft limit {soft}");
            assert_eq!(OpenShards::default().capacity(), budget);
        }
        set(1024);
        let raised = raise_open_files_limit().unwrap();
        let hard = saved.maximum.unwrap_or(u64::MAX);
        assert_eq!(raised, hard.clamp(1024, 65_536));
        assert_eq!(raise_open_files_limit(), Some(raised));
        setrlimit(Resource::Nofile, saved).unwrap();
    }
}
