//! Embedding shard files: naming, listing, header checks and reading.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::StoreError;

/// Value of the `clipcid.kind` metadata key in embedding shards.
pub const SHARD_KIND: &str = "embeddings";

/// Path of shard `index` in `dir`: `embeddings-00042.safetensors`.
pub fn shard_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("embeddings-{index:05}.safetensors"))
}

/// The index [`shard_path`] gave `path` (`embeddings-00042.safetensors` is 42), or `None`
/// for another name.
///
/// ```
/// use std::path::Path;
/// assert_eq!(clipcid_store::shard_index(Path::new("out/embeddings-00042.safetensors")), Some(42));
/// assert_eq!(clipcid_store::shard_index(Path::new("out/keep.safetensors")), None);
/// ```
pub fn shard_index(path: &Path) -> Option<usize> {
    path.file_name()?
        .to_str()?
        .strip_prefix("embeddings-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Expands command-line inputs into shard files: a folder becomes its
/// `embeddings-*.safetensors` in order, a file stays itself. No input at all is an error, and
/// so is one file reached twice (listed twice, or listed beside its folder): its rows would
/// count twice, every one a duplicate of itself, and a shard without recorded sample ranges
/// (one another tool wrote) gives no other sign of it.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use candle_core::{Device, Tensor};
/// use clipcid_store::{expand_shard_inputs, io::write_safetensors};
/// let dir = tempfile::tempdir()?;
/// let file = dir.path().join("plain.safetensors");
/// let image = Tensor::ones((3, 4), candle_core::DType::F32, &Device::Cpu)?;
/// write_safetensors(&file, [("image".to_string(), image)], &Default::default())?;
/// assert_eq!(expand_shard_inputs(&[file.clone()])?, vec![file.clone()]);
/// let twice = expand_shard_inputs(&[file.clone(), file]).unwrap_err();
/// assert!(twice.to_string().contains("given twice"), "{twice}");
/// # Ok(()) }
/// ```
pub fn expand_shard_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, StoreError> {
    let mut shards = Vec::new();
    for p in inputs {
        if p.is_dir() {
            shards.extend(list_shards(p)?);
        } else {
            shards.push(p.clone());
        }
    }
    if shards.is_empty() {
        return Err(StoreError::Invalid("no embedding shards given".into()));
    }
    if let Some((again, msg)) = repeated_shard(&shards) {
        return Err(StoreError::file(again, msg));
    }
    Ok(shards)
}

/// The first of `shards` that names the same file as an earlier one, by any spelling (`a/./x`,
/// a link), with the message saying so: `given twice (also as EARLIER): ...`. A path that does
/// not resolve is compared as written (reading it names the problem). Every shard list, of
/// embeddings or of tar shards, refuses such a repeat: its rows would be read twice.
///
/// ```
/// use std::path::PathBuf;
/// let dir = tempfile::tempdir().unwrap();
/// let a = dir.path().join("a.tar");
/// std::fs::write(&a, b"").unwrap();
/// let again = dir.path().join(".").join("a.tar");
/// let (path, msg) = clipcid_store::repeated_shard(&[a.clone(), again.clone()]).unwrap();
/// assert!(path == again && msg.starts_with("given twice"), "{msg}");
/// assert!(clipcid_store::repeated_shard(&[a]).is_none());
/// ```
pub fn repeated_shard(shards: &[PathBuf]) -> Option<(PathBuf, String)> {
    let mut seen = std::collections::HashMap::with_capacity(shards.len());
    shards.iter().find_map(|shard| {
        let resolved = std::fs::canonicalize(shard).unwrap_or_else(|_| shard.clone());
        seen.insert(resolved, shard).map(|first| {
            (
                shard.clone(),
                format!(
                    "given twice (also as {}): list each shard, or its folder, once",
                    first.display()
                ),
            )
        })
    })
}

/// The embedding shards in `dir`, in order.
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", dir.display())))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("embeddings-") && n.ends_with(".safetensors"))
        })
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(StoreError::Invalid(format!(
            "{}: no embeddings-*.safetensors shards",
            dir.display()
        )));
    }
    Ok(v)
}

/// One embedding shard, read and checked.
#[derive(Debug, Clone)]
pub struct EmbeddingShard {
    /// The file.
    pub path: PathBuf,
    /// L2-normalised image embeddings `[n, D]`, f32 (converted from f16 if stored so).
    pub image: Tensor,
    /// Caption embeddings `[n, D]`, f32, when the shard has them.
    pub text: Option<Tensor>,
    /// Per row, whether the sample had a caption (all true when absent from the file).
    pub has_text: Vec<bool>,
    /// Sample positions in the source dataset.
    pub ids: Vec<i64>,
    /// Sample keys.
    pub keys: Vec<String>,
    /// Keys of samples dropped as unreadable while this shard was written.
    pub skipped: Vec<String>,
}

impl EmbeddingShard {
    /// Reads a shard written by `clipcid_embed::embed_dataset`, or any safetensors file with an
    /// `image` `[n, D]` tensor. Its ids are its `ids` tensor (I64, or U64 as other tools
    /// write it), else the lines of its sidecar ([`sidecar_ids_path`]), else `0..n`; keys
    /// are the ids' decimal strings unless the metadata lists them.
    /// Mismatched row counts or widths are errors naming the file.
    pub fn read(path: &Path) -> Result<Self, StoreError> {
        let bad = |msg: String| StoreError::File {
            path: path.to_path_buf(),
            msg,
        };
        let header = crate::io::read_header(path)?;
        for name in ["image", "text"] {
            if let Some(info) = header.tensors.get(name) {
                embedding_dtype(path, name, &info.dtype)?;
            }
        }
        let mut t = crate::io::load_tensors(path)?;
        let image = t
            .remove("image")
            .ok_or_else(|| bad("no `image` tensor".into()))?;
        let (n, d) = image
            .dims2()
            .map_err(|_| bad(format!("`image` must be [n, D], found {:?}", image.dims())))?;
        let image = image.to_dtype(DType::F32)?;
        let text = match t.remove("text") {
            Some(x) if x.dims() != [n, d] => {
                return Err(bad(format!(
                    "`text` is {:?} but `image` is [{n}, {d}]",
                    x.dims()
                )));
            }
            Some(x) => Some(x.to_dtype(DType::F32)?),
            None => None,
        };
        let rows = RowIds::from_parts(
            path,
            sample_range(&header.metadata),
            n,
            text.is_some(),
            t.remove("has_text"),
            t.remove("ids"),
        )?;
        let index = RowIndex::with_keys(&header, rows)?;
        let RowIndex {
            ids,
            has_text,
            keys,
            skipped,
            ..
        } = index;
        Ok(Self {
            path: path.to_path_buf(),
            image,
            text,
            has_text,
            ids,
            keys,
            skipped,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the shard holds no row.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.image.dims().get(1).copied().unwrap_or(0)
    }

    /// The `image` rows for which `select(row)` holds, in order, each scaled to unit L2
    /// norm, as one row-major buffer. A non-finite value in a selected row is an error
    /// naming the shard, the row and its sample key.
    pub fn unit_image_rows(&self, select: impl Fn(usize) -> bool) -> Result<Vec<f32>, StoreError> {
        let d = self.dim();
        let values: Vec<f32> = self.image.flatten_all()?.to_vec1()?;
        let mut out = Vec::with_capacity(values.len());
        for (r, row) in values.chunks_exact(d.max(1)).enumerate() {
            if !select(r) {
                continue;
            }
            crate::rows::push_unit_row(row, &mut out).map_err(|bad| StoreError::File {
                path: self.path.clone(),
                msg: format!(
                    "non-finite value {bad} in row {r} (sample `{}`)",
                    self.keys[r]
                ),
            })?;
        }
        Ok(out)
    }

    /// Moves the embeddings to `device`.
    pub fn to_device(mut self, device: &Device) -> Result<Self, StoreError> {
        self.image = self.image.to_device(device)?;
        self.text = self.text.map(|t| t.to_device(device)).transpose()?;
        Ok(self)
    }
}

/// A shard's rows by sample id, without their embeddings or keys: the ids and caption flags,
/// read from the header and the small `ids` / `has_text` tensors only (positioned reads),
/// with the checks [`EmbeddingShard::read`] makes of them. The header's `keys` and `skipped`
/// lists, nearly all of its bytes, are scanned as JSON but neither decoded nor kept. What a
/// stage reads to join rows by id while the embeddings stay on disk
/// ([`RowReader`](crate::RowReader)); [`RowIndex`] is the same with the keys.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use candle_core::{DType, Device, Tensor};
/// use clipcid_store::{io::write_safetensors, EmbeddingShard, RowIds};
/// let dir = tempfile::tempdir()?;
/// let path = clipcid_store::shard_path(dir.path(), 0);
/// let tensors = [
///     ("image".to_string(), Tensor::ones((3, 4), DType::F16, &Device::Cpu)?),
///     ("ids".to_string(), Tensor::new(&[7i64, 3, 9], &Device::Cpu)?),
///     ("has_text".to_string(), Tensor::new(&[1u8, 0, 1], &Device::Cpu)?),
/// ];
/// write_safetensors(&path, tensors, &Default::default())?;
/// let (rows, whole) = (RowIds::read(&path)?, EmbeddingShard::read(&path)?);
/// assert_eq!((rows.ids, rows.has_text), (whole.ids, whole.has_text));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowIds {
    /// The file.
    pub path: PathBuf,
    /// Whether the shard has a `text` tensor.
    pub has_text_tensor: bool,
    /// Per row, whether the sample had a caption.
    pub has_text: Vec<bool>,
    /// Sample positions in the source dataset.
    pub ids: Vec<i64>,
}

impl RowIds {
    /// Reads the ids and caption flags of the shard at `path`, without its embeddings or keys.
    pub fn read(path: &Path) -> Result<Self, StoreError> {
        // One open for the header and the small tensors.
        let mut file = crate::io::open_file(path)?;
        let header = crate::io::read_header_without(&mut file, path, &["keys", "skipped"])?;
        let samples = sample_range(&header.metadata);
        Self::read_at(&file, path, &header.tensors, header.data_start, samples)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the shard holds no row.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The ids and flags of the shard in `file` (open at `path`) whose header lists
    /// `tensors`, with the data section from byte `data_start`, and records the input
    /// range `samples`: the `image` row count from the entries, the small tensors by
    /// positioned reads.
    fn read_at(
        file: &std::fs::File,
        path: &Path,
        tensors: &std::collections::BTreeMap<String, crate::io::TensorInfo>,
        data_start: u64,
        samples: Option<(u64, u64)>,
    ) -> Result<Self, StoreError> {
        let info = tensors
            .get("image")
            .ok_or_else(|| StoreError::file(path, "no `image` tensor"))?;
        let n = match info.shape[..] {
            [n, _] => n,
            _ => {
                return Err(StoreError::file(
                    path,
                    format!("`image` must be [n, D], found {:?}", info.shape),
                ))
            }
        };
        let small = |name: &str| -> Result<Option<Tensor>, StoreError> {
            let Some(info) = tensors.get(name) else {
                return Ok(None);
            };
            let [a, b] = info.data_offsets;
            let mut bytes = vec![0u8; b - a];
            crate::rows::read_file_at(file, path, data_start + a as u64, &mut bytes)?;
            let dtype = match info.dtype.as_str() {
                "U64" => return crate::io::u64_as_i64(path, name, &bytes, &info.shape).map(Some),
                "I64" => DType::I64,
                "U8" | "BOOL" => DType::U8,
                "U32" => DType::U32,
                other => {
                    return Err(StoreError::file(
                        path,
                        format!("`{name}` has dtype {other}"),
                    ))
                }
            };
            Ok(Some(Tensor::from_raw_buffer(
                &bytes,
                dtype,
                &info.shape,
                &candle_core::Device::Cpu,
            )?))
        };
        Self::from_parts(
            path,
            samples,
            n,
            tensors.contains_key("text"),
            small("has_text")?,
            small("ids")?,
        )
    }

    /// The ids and flags of a shard of `n` rows from its small tensors, checked: as many of
    /// each as rows, no id twice, ids inside the input range `samples` it records.
    fn from_parts(
        path: &Path,
        samples: Option<(u64, u64)>,
        n: usize,
        has_text_tensor: bool,
        has_text: Option<Tensor>,
        ids: Option<Tensor>,
    ) -> Result<Self, StoreError> {
        let bad = |msg: String| StoreError::file(path, msg);
        let has_text = match has_text {
            Some(x) => crate::io::integer_vector(path, "has_text", x, DType::U8)?
                .to_vec1::<u8>()?
                .into_iter()
                .map(|b| b != 0)
                .collect(),
            None => vec![has_text_tensor; n],
        };
        let ids: Vec<i64> = match ids {
            Some(x) => crate::io::integer_vector(path, "ids", x, DType::I64)?.to_vec1()?,
            None => match sidecar_ids(path, n)? {
                Some(ids) => ids,
                None => (0..n as i64).collect(),
            },
        };
        if ids.len() != n || has_text.len() != n {
            return Err(bad(format!(
                "{n} image rows but {} ids, {} has_text flags",
                ids.len(),
                has_text.len()
            )));
        }
        if let Some(dup) = first_duplicate(&ids) {
            return Err(bad(format!(
                "sample id {dup} appears twice (a shard of two runs mixed?)"
            )));
        }
        if let Some((first, end)) = samples {
            if let Some(out) = ids.iter().find(|&&i| i < first as i64 || i >= end as i64) {
                return Err(bad(format!(
                    "sample id {out} is outside the shard's range {first}..{end}"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            has_text_tensor,
            has_text,
            ids,
        })
    }
}

/// A shard's rows without their embeddings: ids, caption flags and keys, read from the header
/// and the small `ids` / `has_text` tensors only (positioned reads), with the checks
/// [`EmbeddingShard::read`] makes. A stage that joins rows by id needs only
/// [`RowIds`], which leaves the keys undecoded: about a third of the instructions of this
/// read at 10,000 rows a shard (`cargo bench --bench shard_open`).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use candle_core::{DType, Device, Tensor};
/// use clipcid_store::{io::write_safetensors, EmbeddingShard, RowIndex};
/// let dir = tempfile::tempdir()?;
/// let path = clipcid_store::shard_path(dir.path(), 0);
/// let tensors = [
///     ("image".to_string(), Tensor::ones((3, 4), DType::F16, &Device::Cpu)?),
///     ("ids".to_string(), Tensor::new(&[7i64, 3, 9], &Device::Cpu)?),
///     ("has_text".to_string(), Tensor::new(&[1u8, 0, 1], &Device::Cpu)?),
/// ];
/// write_safetensors(&path, tensors, &Default::default())?;
/// let (index, whole) = (RowIndex::read(&path)?, EmbeddingShard::read(&path)?);
/// assert_eq!((index.ids, index.has_text, index.keys), (whole.ids, whole.has_text, whole.keys));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RowIndex {
    /// The file.
    pub path: PathBuf,
    /// Whether the shard has a `text` tensor.
    pub has_text_tensor: bool,
    /// Per row, whether the sample had a caption.
    pub has_text: Vec<bool>,
    /// Sample positions in the source dataset.
    pub ids: Vec<i64>,
    /// Sample keys.
    pub keys: Vec<String>,
    /// Keys of samples dropped as unreadable while this shard was written.
    pub skipped: Vec<String>,
}

impl RowIndex {
    /// Reads the row index of the shard at `path` without reading its embeddings.
    pub fn read(path: &Path) -> Result<Self, StoreError> {
        // One open for the header and the small tensors.
        let mut file = crate::io::open_file(path)?;
        let header = crate::io::read_header_of(&mut file, path)?;
        let samples = sample_range(&header.metadata);
        let rows = RowIds::read_at(&file, path, &header.tensors, header.data_start, samples)?;
        Self::with_keys(&header, rows)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the shard holds no row.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// `rows` with the keys and skipped keys its shard's `header` lists (the ids' decimal
    /// strings when it lists no keys), checked: one key per row.
    fn with_keys(header: &crate::io::Header, rows: RowIds) -> Result<Self, StoreError> {
        let path = rows.path.as_path();
        let bad = |msg: String| StoreError::file(path, msg);
        let keys: Vec<String> = match header.metadata.get("keys") {
            Some(k) => {
                serde_json::from_str(k).map_err(|e| bad(format!("bad `keys` metadata: {e}")))?
            }
            None => rows.ids.iter().map(|i| i.to_string()).collect(),
        };
        let skipped = match header.metadata.get("skipped") {
            Some(k) => {
                serde_json::from_str(k).map_err(|e| bad(format!("bad `skipped` metadata: {e}")))?
            }
            None => vec![],
        };
        if keys.len() != rows.len() {
            return Err(bad(format!(
                "{} image rows but {} keys",
                rows.len(),
                keys.len()
            )));
        }
        let RowIds {
            path,
            has_text_tensor,
            has_text,
            ids,
        } = rows;
        Ok(Self {
            path,
            has_text_tensor,
            has_text,
            ids,
            keys,
            skipped,
        })
    }
}

/// The first value that occurs more than once, if any.
///
/// ```
/// assert_eq!(clipcid_store::first_duplicate(&[4, 1, 9, 1]), Some(1));
/// assert_eq!(clipcid_store::first_duplicate(&[4, 1, 9]), None);
/// ```
pub fn first_duplicate(ids: &[i64]) -> Option<i64> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// The dtype of an embedding tensor `name` stored as safetensors' `dtype`: F32, F16 or BF16,
/// anything else (integers, F64) an error naming `path`.
pub(crate) fn embedding_dtype(path: &Path, name: &str, dtype: &str) -> Result<DType, StoreError> {
    match dtype {
        "F32" => Ok(DType::F32),
        "F16" => Ok(DType::F16),
        "BF16" => Ok(DType::BF16),
        other => Err(StoreError::file(
            path,
            format!("`{name}` is {other}; embeddings are F32, F16 or BF16"),
        )),
    }
}

/// The file in an embedding folder where `clipcid embed` records, when a run (or each part of
/// a split run) has passed the end of its data, how many input samples the data holds
/// ([`EmbedEnd`]).
pub const EMBED_END_RECORD: &str = ".clipcid-embed-end.json";

/// What a finished embedding run records in its folder's [`EMBED_END_RECORD`]: the input
/// samples in its data and the provenance its shards record. A shard of such a run carries the
/// metadata key [`EmbedEnd::SHARD_KEY`], and [`ShardLayout::open`] then holds the folder to the
/// record: no record, or another run's, is a run not finished, and shards that stop short of
/// `samples` have lost their tail (a part of a split run not run, a file lost), which their
/// recorded ranges alone cannot show.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_store::EmbedEnd;
/// let dir = tempfile::tempdir()?;
/// assert_eq!(EmbedEnd::read(dir.path())?, None);
/// let end = EmbedEnd { samples: 1000, provenance: r#"{"data":"ab12"}"#.into() };
/// end.write(dir.path())?;
/// assert_eq!(EmbedEnd::read(dir.path())?, Some(end));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmbedEnd {
    /// Input samples in the data, skipped ones included (the end of the last shard's range).
    pub samples: u64,
    /// The provenance the run's shards record (their `provenance` metadata, verbatim).
    pub provenance: String,
}

impl EmbedEnd {
    /// The metadata key of a shard whose run writes an end record; its value is the record's
    /// file name.
    pub const SHARD_KEY: &'static str = "end_record";

    /// Writes the record into `dir` atomically. Parts of a split run each write the same
    /// record when they end.
    pub fn write(&self, dir: &Path) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| StoreError::Invalid(format!("cannot encode the end record: {e}")))?;
        crate::io::write_atomic(&dir.join(EMBED_END_RECORD), &json)
    }

    /// The record in `dir`, `None` when there is none; one that does not parse is an error
    /// naming it.
    pub fn read(dir: &Path) -> Result<Option<Self>, StoreError> {
        let path = dir.join(EMBED_END_RECORD);
        let bytes = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            r => r.map_err(|e| StoreError::file(&path, format!("cannot read: {e}")))?,
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::file(&path, format!("not an embed end record: {e}")))
    }
}

/// A folder of embed shards must hold all of its run's shards from sample 0 on: sorted by
/// their recorded sample ranges, each starts where the one before ends. A gap is a shard
/// that is missing (a part of a split `embed --part` run that has not run, or a file lost),
/// and reading on would leave its samples out without a word. Shards that record no range
/// (another tool's) are not checked, and neither are files listed one by one (a chosen
/// subset). Where the folder's shards carry [`EmbedEnd::SHARD_KEY`], the run's end record
/// must be there and be theirs (`provenance`); where a record of their provenance is there
/// (with the key or without: shards of an older clipcid resumed by a newer one), its sample
/// count must be covered too, which catches missing shards after the last one present.
fn check_complete(
    folder: &Path,
    shards: &[PathBuf],
    ranges: &[(u64, u64, &Path)],
    end_recorded: &[&Path],
    provenance: Option<&str>,
) -> Result<(), StoreError> {
    let mine = |p: &Path| p.parent() == Some(folder);
    let expects_record = end_recorded.iter().any(|p| mine(p));
    let how = "run the same `clipcid embed` again to finish it (every `--part I/N` of a split run; finished shards are kept), or list shard files one by one to read those only";
    let samples = match EmbedEnd::read(folder)? {
        None if expects_record => {
            return Err(StoreError::file(
                folder,
                format!(
                    "no {EMBED_END_RECORD}: the embedding run that wrote these shards has not finished (or the folder was copied without that file); {how}"
                ),
            ))
        }
        Some(end) if expects_record && Some(end.provenance.as_str()) != provenance => {
            return Err(StoreError::file(
                folder,
                format!(
                    "{EMBED_END_RECORD} is another embedding run's than these shards': the run that wrote them has not finished; {how}"
                ),
            ))
        }
        // Shards from before the record existed, resumed by a run that then wrote one: held
        // to it as well.
        Some(end) if Some(end.provenance.as_str()) == provenance => Some(end.samples),
        _ => None,
    };
    let listed = shards.iter().filter(|p| mine(p)).count();
    let mut own: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| mine(r.2))
        .map(|r| (r.0, r.1))
        .collect();
    if own.len() != listed {
        return Ok(());
    }
    own.sort();
    let missing = |from: u64, to: u64| {
        StoreError::file(
            folder,
            format!(
                "no shard covers samples {from}..{to}: a shard of this embedding run is missing (a part of a split `embed --part` run that has not run or not finished, or a lost file); complete it with the same embed options (the missing part's `--part I/N`, or one process without `--part`, which keeps the shards already there)"
            ),
        )
    };
    let mut covered = 0;
    for (first, end) in own {
        if first > covered {
            return Err(missing(covered, first));
        }
        covered = covered.max(end);
    }
    match samples {
        Some(samples) if covered < samples => Err(missing(covered, samples)),
        _ => Ok(()),
    }
}

/// The input range `first_index..end_index` a shard records in its metadata (embed shards do).
fn sample_range(metadata: &std::collections::HashMap<String, String>) -> Option<(u64, u64)> {
    let get = |k: &str| metadata.get(k).and_then(|v| v.parse::<u64>().ok());
    Some((get("first_index")?, get("end_index")?))
}

/// The row count of every shard and their common embedding width, read from the headers
/// only (no tensor data), so a set of shards larger than memory can be planned.
///
/// The layout also keeps where each shard's tensors lie in its file, so the readers opened
/// from it ([`RowReader`](crate::RowReader), [`ImageDigests`](crate::ImageDigests)) read no
/// header again, and the shard files those readers open, shared by all of them (and by the
/// layout's clones) and kept open between reads, at most [`ShardLayout::open_files`] at
/// once. A shard file those readers open must still have the length and modification time it
/// had when the layout read its header: one rewritten since is an error naming it, not rows
/// read at the places its old header gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// Shards in order.
    pub shards: Vec<PathBuf>,
    /// Rows in each shard.
    pub counts: Vec<usize>,
    /// Embedding width shared by every non-empty shard.
    pub dim: usize,
    /// The provenance every shard records (metadata `provenance`, written by `clipcid
    /// embed`), or `None` when they record none.
    pub provenance: Option<String>,
    /// The teacher's name the first shard records (metadata `teacher`, written by `clipcid
    /// embed`), or `None` when it records none.
    pub teacher: Option<String>,
    /// Each shard's tensor entries and rows, as the layout found them when it was opened,
    /// and the shard files open for reading rows: shared by the layout's clones and its
    /// readers, so a run holds one copy.
    index: std::sync::Arc<ShardIndex>,
}

/// What the readers of one [`ShardLayout`] share: where each shard's tensors and rows lie,
/// and the shard files they have open. A reader keeps this, not the layout's public shard
/// list, so it reads each row where the layout found it when it was opened.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ShardIndex {
    shards: Vec<ShardTensors>,
    files: crate::rows::OpenShards,
}

/// Where one shard's tensors lie in its file: its header's entries without the metadata
/// (the `keys` list is most of a header, and no reader of rows needs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShardTensors {
    /// The shard file.
    path: PathBuf,
    /// Byte offset of the data section in the file.
    data_start: u64,
    tensors: std::collections::BTreeMap<String, crate::io::TensorInfo>,
    /// The shard's rows, as global positions (shard order).
    rows: std::ops::Range<usize>,
    /// The input range `first_index..end_index` its metadata records, if any.
    samples: Option<(u64, u64)>,
    /// The file as it was when its header was read.
    stamp: crate::rows::FileStamp,
}

impl ShardTensors {
    /// The entry of tensor `name` and the file offset of its first byte.
    pub(crate) fn get(&self, name: &str) -> Option<(&crate::io::TensorInfo, u64)> {
        let info = self.tensors.get(name)?;
        Some((info, self.data_start + info.data_offsets[0] as u64))
    }
}

impl ShardIndex {
    /// Shard `i`'s file, as the layout opened it.
    pub(crate) fn path(&self, i: usize) -> &Path {
        &self.shards[i].path
    }

    /// Shard `i`'s rows as global positions (shard order), as [`ShardLayout::open`] counted
    /// them; empty past the last shard.
    pub(crate) fn rows_of(&self, i: usize) -> std::ops::Range<usize> {
        self.shards.get(i).map_or(0..0, |t| t.rows.clone())
    }

    /// Rows in all shards, as [`ShardLayout::open`] counted them: [`ShardLayout::total`]
    /// without summing the counts again (a reader checks each run of rows it reads).
    pub(crate) fn rows_total(&self) -> usize {
        self.shards.last().map_or(0, |t| t.rows.end)
    }

    /// Index of the shard that holds global row `row` (shard order), found by binary search
    /// (a training batch asks for a few rows at a time of many thousand shards); `None` past
    /// the last row. The one lookup of the row and digest readers.
    pub(crate) fn shard_holding(&self, row: usize) -> Option<usize> {
        let at = self.shards.partition_point(|t| t.rows.end <= row);
        self.shards
            .get(at)
            .filter(|t| t.rows.start <= row)
            .map(|_| at)
    }

    /// The file of shard `i`, open for positioned reads: shared by every reader of the
    /// layout, at most [`ShardLayout::open_files`] open at once. One opened here must still
    /// be the file whose header the layout read (its length and modification time).
    pub(crate) fn file(&self, i: usize) -> Result<std::sync::Arc<std::fs::File>, StoreError> {
        let shard = &self.shards[i];
        self.files.get(i, &shard.path, shard.stamp)
    }
}

impl ShardLayout {
    /// Expands `inputs` ([`expand_shard_inputs`]) and reads each shard's header: every shard
    /// needs an `image` `[n, D]` tensor, and every non-empty shard the same `D`. A shard of
    /// another width, a missing `image` tensor, or no row at all is an error naming the file;
    /// so are shards of two runs mixed: overlapping recorded sample ranges, or another
    /// recorded provenance than the first shard's; and a folder whose shards leave a gap in
    /// their recorded sample ranges (a shard missing: a split run's part not run), or whose
    /// run's [`EmbedEnd`] record is missing, another run's, or counts samples past its last
    /// shard (a run not finished).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use candle_core::{Device, Tensor};
    /// use clipcid_store::{io::write_safetensors, ShardLayout};
    /// let dir = tempfile::tempdir()?;
    /// for (i, n) in [3usize, 2].into_iter().enumerate() {
    ///     let image = Tensor::ones((n, 4), candle_core::DType::F32, &Device::Cpu)?;
    ///     let path = clipcid_store::shard_path(dir.path(), i);
    ///     write_safetensors(&path, [("image".to_string(), image)], &Default::default())?;
    /// }
    /// let layout = ShardLayout::open(&[dir.path().to_path_buf()])?;
    /// assert_eq!((layout.counts.clone(), layout.dim, layout.total()), (vec![3, 2], 4, 5));
    /// # Ok(()) }
    /// ```
    pub fn open(inputs: &[PathBuf]) -> Result<Self, StoreError> {
        let shards = expand_shard_inputs(inputs)?;
        let mut counts = Vec::with_capacity(shards.len());
        let mut tensors = Vec::with_capacity(shards.len());
        let mut width: Option<(usize, &Path)> = None;
        let mut ranges: Vec<(u64, u64, &Path)> = vec![];
        let mut end_recorded: Vec<&Path> = vec![];
        let mut provenance: Option<(Option<String>, &Path)> = None;
        let mut teacher = None;
        let mut first = 0;
        for (i, path) in shards.iter().enumerate() {
            let mut file = crate::io::open_file(path)?;
            let stamp = crate::rows::FileStamp::of(&file, path)?;
            // The sample keys are nearly all of a header, and the layout needs none of them.
            let mut header = crate::io::read_header_without(&mut file, path, &["keys", "skipped"])?;
            if i == 0 {
                teacher = header.metadata.remove("teacher");
            }
            let recorded = header.metadata.remove("provenance");
            match &provenance {
                None => provenance = Some((recorded, path)),
                Some((first, first_path)) if *first != recorded => {
                    let fields = match (first, &recorded) {
                        (Some(a), Some(b)) => crate::differing_fields(a, b).join(", "),
                        _ => "provenance recorded in one only".to_string(),
                    };
                    return Err(StoreError::file(
                        path,
                        format!(
                            "written by another embedding run than {} (different {fields}): shards of two runs are mixed; embed into an empty folder",
                            first_path.display()
                        ),
                    ));
                }
                Some(_) => {}
            }
            let samples = sample_range(&header.metadata);
            if let Some((a, b)) = samples {
                ranges.push((a, b, path));
            }
            if header.metadata.contains_key(EmbedEnd::SHARD_KEY) {
                end_recorded.push(path);
            }
            let info = header
                .tensors
                .get("image")
                .ok_or_else(|| StoreError::file(path, "no `image` tensor"))?;
            let [n, d] = info.shape[..] else {
                return Err(StoreError::file(
                    path,
                    format!("`image` must be [n, D], found {:?}", info.shape),
                ));
            };
            embedding_dtype(path, "image", &info.dtype)?;
            match width {
                Some((w, first)) if w != d && n > 0 => {
                    return Err(StoreError::file(
                        path,
                        format!("embeddings are {d} wide but {} has {w}", first.display()),
                    ))
                }
                None if n > 0 => width = Some((d, path)),
                _ => {}
            }
            counts.push(n);
            tensors.push(ShardTensors {
                path: path.clone(),
                data_start: header.data_start,
                tensors: header.tensors,
                rows: first..first + n,
                samples,
                stamp,
            });
            first += n;
        }
        let Some((dim, _)) = width else {
            return Err(StoreError::Invalid(
                "the embedding shards hold no rows".into(),
            ));
        };
        // Shards of one run cover disjoint input ranges; overlapping ones are two runs mixed.
        ranges.sort();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(StoreError::file(
                w[1].2,
                format!(
                    "covers samples {}..{}, overlapping {} ({}..{}): shards of two runs (another --shard-size?) are mixed; embed into an empty folder",
                    w[1].0,
                    w[1].1,
                    w[0].2.display(),
                    w[0].0,
                    w[0].1
                ),
            ));
        }
        let recorded = provenance.as_ref().and_then(|(p, _)| p.as_deref());
        for folder in inputs.iter().filter(|p| p.is_dir()) {
            check_complete(folder, &shards, &ranges, &end_recorded, recorded)?;
        }
        Ok(Self {
            provenance: provenance.and_then(|(p, _)| p),
            teacher,
            shards,
            counts,
            dim,
            index: std::sync::Arc::new(ShardIndex {
                shards: tensors,
                files: Default::default(),
            }),
        })
    }

    /// The most shard files the readers of this layout keep open at once (the least
    /// recently read is closed first): an eighth of the process's soft limit on open files
    /// when the layout was opened, between 32 and 4096 (128 at Linux's usual 1024; the
    /// `clipcid` binary raises the limit first, [`raise_open_files_limit`](crate::raise_open_files_limit)).
    /// A training batch reads its image digests, image rows and text rows in three passes
    /// over the same shards, so the second and third pass find the files open when the batch
    /// touches at most this many shards; with fewer shards than this, each file is opened
    /// once for a whole run. Where the process runs out of file handles all the same, the
    /// layout closes its files and opens again.
    pub fn open_files(&self) -> usize {
        self.index.files.capacity()
    }

    /// Shard `i`'s path, row count and tensor entries. The shard list is a public field: one
    /// changed after [`ShardLayout::open`] no longer matches the entries, and is an error.
    pub(crate) fn shard(&self, i: usize) -> Result<(&Path, usize, &ShardTensors), StoreError> {
        let entries = &self.index.shards;
        let same_length = self.shards.len() == entries.len() && self.counts.len() == entries.len();
        match (self.shards.get(i), self.counts.get(i), entries.get(i)) {
            (Some(path), Some(&rows), Some(t))
                if same_length && t.path == *path && t.rows.len() == rows =>
            {
                Ok((path, rows, t))
            }
            _ => Err(StoreError::Invalid(format!(
                "shard {i} of the layout is not the one ShardLayout::open read (its shard list was changed since): open the layout again"
            ))),
        }
    }

    /// Every shard's entries and rows and the open files, shared with the layout's readers:
    /// a reader checks the public fields against it once ([`ShardLayout::shard`]) and reads
    /// through it from then on.
    pub(crate) fn index(&self) -> &std::sync::Arc<ShardIndex> {
        &self.index
    }

    /// Rows in all shards.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The dataset id of every row, in shard order ([`ShardLayout::row_ids_of`] each shard;
    /// no header, embedding or key is read). A shard without an `ids` tensor gives its
    /// sidecar's ids ([`sidecar_ids_path`]), else its positions `0..n`.
    pub fn row_ids(&self) -> Result<Vec<i64>, StoreError> {
        let mut ids = Vec::with_capacity(self.total());
        for (i, &count) in self.counts.iter().enumerate() {
            if count > 0 {
                ids.extend(self.row_ids_of(i)?.ids);
            }
        }
        Ok(ids)
    }

    /// Shard `i`'s ids and caption flags, as [`RowIds::read`] reads them and with its
    /// checks, but from the places of the small tensors the layout found in the header
    /// when it was opened: no header is read again, and the file is the one the layout's
    /// row readers share.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use candle_core::{DType, Device, Tensor};
    /// use clipcid_store::{io::write_safetensors, shard_path, RowIds, ShardLayout};
    /// let dir = tempfile::tempdir()?;
    /// let tensors = [
    ///     ("image".to_string(), Tensor::ones((2, 4), DType::F16, &Device::Cpu)?),
    ///     ("ids".to_string(), Tensor::new(&[5i64, 2], &Device::Cpu)?),
    /// ];
    /// write_safetensors(&shard_path(dir.path(), 0), tensors, &Default::default())?;
    /// let layout = ShardLayout::open(&[dir.path().to_path_buf()])?;
    /// assert_eq!(layout.row_ids_of(0)?, RowIds::read(&layout.shards[0])?);
    /// assert_eq!(layout.row_ids_of(0)?.ids, vec![5, 2]);
    /// # Ok(()) }
    /// ```
    pub fn row_ids_of(&self, i: usize) -> Result<RowIds, StoreError> {
        let (path, _, shard) = self.shard(i)?;
        let file = self.index.file(i)?;
        RowIds::read_at(&file, path, &shard.tensors, shard.data_start, shard.samples)
    }

    /// Reads shard `i` and checks that it still has the row count and width its header had
    /// when the layout was opened.
    pub fn read(&self, i: usize) -> Result<EmbeddingShard, StoreError> {
        let path = self
            .shards
            .get(i)
            .ok_or_else(|| StoreError::Invalid(format!("no shard {i}")))?;
        let shard = EmbeddingShard::read(path)?;
        let (count, d) = (self.counts[i], shard.dim());
        if shard.len() != count || (count > 0 && d != self.dim) {
            return Err(StoreError::file(
                path,
                format!(
                    "changed while being read ({} x {d}, expected {count} x {})",
                    shard.len(),
                    self.dim
                ),
            ));
        }
        Ok(shard)
    }
}

/// The sidecar ids file of a shard without an `ids` tensor: `embeddings-00000.ids.txt`
/// beside `embeddings-00000.safetensors`, one whole number per line (blank lines skipped),
/// as many as the shard has rows. `None` when there is none.
fn sidecar_ids(shard: &Path, n: usize) -> Result<Option<Vec<i64>>, StoreError> {
    let path = sidecar_ids_path(shard);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::file(&path, format!("cannot read: {e}"))),
    };
    let ids = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            l.trim().parse::<i64>().map_err(|_| {
                StoreError::file(
                    &path,
                    format!("line {}: `{}` is not a whole number", i + 1, l.trim()),
                )
            })
        })
        .collect::<Result<Vec<i64>, _>>()?;
    if ids.len() != n {
        return Err(StoreError::file(
            &path,
            format!("{} ids for the {n} rows of {}", ids.len(), shard.display()),
        ));
    }
    Ok(Some(ids))
}

/// The sidecar ids file of a shard that has no `ids` tensor: the shard's name with
/// `.ids.txt` for `.safetensors`, one whole number per line, as many as the shard's rows
/// ([`EmbeddingShard::read`], [`RowIds::read`] and [`RowIndex::read`] read it).
///
/// ```
/// use std::path::Path;
/// let p = clipcid_store::sidecar_ids_path(Path::new("emb/embeddings-00003.safetensors"));
/// assert_eq!(p, Path::new("emb/embeddings-00003.ids.txt"));
/// ```
pub fn sidecar_ids_path(shard: &Path) -> PathBuf {
    shard.with_extension("ids.txt")
}

/// A digest of rows' dataset ids in order: SHA-256 of the ids as little-endian `i64`, in hex.
/// Files that refer to rows by position (`balance pairs`'s pair files) record it, so that
/// rows given in another order, or other rows of the same count, are an error rather than
/// a silently wrong result.
///
/// ```
/// use clipcid_store::row_ids_digest;
/// assert_eq!(row_ids_digest(&[1, 2]), row_ids_digest(&[1, 2]));
/// assert_ne!(row_ids_digest(&[1, 2]), row_ids_digest(&[2, 1]));
/// assert_eq!(row_ids_digest(&[]).len(), 64);
/// ```
pub fn row_ids_digest(ids: &[i64]) -> String {
    sha256_hex(ids.iter().map(|id| id.to_le_bytes()))
}

/// SHA-256 of the concatenated byte chunks (each value's little-endian bytes, say), in hex:
/// the digests files record of the rows and labels they were made from
/// ([`row_ids_digest`], a training checkpoint's rows and pseudo-labels).
///
/// ```
/// let labels = [3u32, 1];
/// let bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
/// assert_eq!(
///     clipcid_store::sha256_hex(labels.iter().map(|l| l.to_le_bytes())),
///     clipcid_store::sha256_hex([bytes]),
/// );
/// ```
pub fn sha256_hex<C: AsRef<[u8]>>(chunks: impl IntoIterator<Item = C>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for c in chunks {
        h.update(c);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
