//! Safetensors helpers shared by every stage: atomic writes and header-only reads.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::StoreError;

/// Writes `tensors` to `path` as safetensors with `metadata`, atomically: the data goes to a
/// temporary file in the same folder, which is renamed over `path` only once complete, so a
/// crash never leaves a half-written file under the final name.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use candle_core::{Device, Tensor};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("x.safetensors");
/// let t = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 3))?;
/// clipcid_store::io::write_safetensors(&path, [("x".to_string(), t)], &Default::default())?;
/// let header = clipcid_store::io::read_header(&path)?;
/// assert_eq!(header.tensors["x"].shape, vec![2, 3]);
/// # Ok(()) }
/// ```
pub fn write_safetensors(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    metadata: &HashMap<String, String>,
) -> Result<(), StoreError> {
    let bytes = serialize(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// Writes a stage's output file the way every clipcid stage does: the tensors, with
/// metadata `clipcid.kind = kind`, `summary` (`summary` as pretty JSON) and, when given,
/// the provenance of the embeddings the file was made from (key
/// [`EMBEDDINGS_META`](crate::EMBEDDINGS_META)), atomically; and the same summary JSON
/// beside it as `<name>.json`.
pub fn write_with_summary(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    kind: &str,
    summary: &impl serde::Serialize,
    embeddings: Option<&str>,
) -> Result<(), StoreError> {
    let summary =
        serde_json::to_string_pretty(summary).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let mut meta: HashMap<String, String> = [
        ("clipcid.kind".to_string(), kind.to_string()),
        ("summary".to_string(), summary.clone()),
    ]
    .into();
    if let Some(e) = embeddings {
        meta.insert(crate::EMBEDDINGS_META.to_string(), e.to_string());
    }
    let bytes = serialize(tensors, &meta)?;
    // Both files or neither: a full disk after the tensors were written left a new
    // `.safetensors` beside no summary (or an earlier run's).
    write_atomic_files(&[
        (&path.with_extension("json"), summary.as_bytes()),
        (path, &bytes),
    ])
}

/// Serialises tensors to safetensors bytes with tensors and metadata in sorted order.
///
/// Written here rather than with `safetensors::serialize` because that takes the metadata
/// as a `HashMap` and emits it in random order, so the same content would give different
/// bytes on every run; sorted keys make outputs byte-reproducible (resume checks, checksums).
pub fn serialize(
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, StoreError> {
    use safetensors::View;
    let sorted: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut offset = 0usize;
    for (name, t) in &sorted {
        let len = t.data_len();
        let dtype =
            serde_json::to_value(View::dtype(t)).map_err(|e| StoreError::Invalid(e.to_string()))?;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| StoreError::Invalid(e.to_string()))?;
    // The data section must start 8-byte aligned; pad the header with spaces.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for t in sorted.values() {
        out.extend_from_slice(&View::data(t));
    }
    Ok(out)
}

/// `t` (the tensor `name` of the file `path`) as a flat vector of `dtype`, refusing float
/// values: ids, labels, counts and flags are integers, and a cast would read a float tensor
/// (3.7 as 3, 0.4 as 0) without a word.
pub(crate) fn integer_vector(
    path: &Path,
    name: &str,
    t: Tensor,
    dtype: DType,
) -> Result<Tensor, StoreError> {
    if t.dtype().is_float() {
        return Err(StoreError::file(
            path,
            format!(
                "`{name}` holds {:?} values; it must hold integers",
                t.dtype()
            ),
        ));
    }
    let flat = t.flatten_all()?;
    // A narrowing cast wraps (an i64 label 2^32 + 1 read as 1): the values must fit.
    let top: Option<i64> = match dtype {
        DType::U8 => Some(u8::MAX.into()),
        DType::U32 => Some(u32::MAX.into()),
        _ => None,
    };
    if let (Some(top), true) = (top, flat.dtype() != dtype && flat.elem_count() > 0) {
        let (lo, hi) = match flat.dtype() {
            DType::I64 => (
                flat.min(0)?.to_scalar::<i64>()?,
                flat.max(0)?.to_scalar::<i64>()?,
            ),
            DType::U32 => (0, flat.max(0)?.to_scalar::<u32>()?.into()),
            DType::U8 => (0, flat.max(0)?.to_scalar::<u8>()?.into()),
            _ => {
                let wide = flat.to_dtype(DType::I64)?;
                (
                    wide.min(0)?.to_scalar::<i64>()?,
                    wide.max(0)?.to_scalar::<i64>()?,
                )
            }
        };
        if lo < 0 || hi > top {
            let v = if lo < 0 { lo } else { hi };
            return Err(StoreError::file(
                path,
                format!("`{name}` holds {v}, outside 0..={top} ({dtype:?})"),
            ));
        }
    }
    Ok(flat.to_dtype(dtype)?)
}

/// Refuses to write `out` when it is one of `inputs` (the same file, by any name): the run
/// would replace a file it reads (`balance --out emb/embeddings-00000.safetensors` wrote a
/// keep file over a shard). An output that does not exist yet is no input.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let shard = dir.path().join("embeddings-00000.safetensors");
/// std::fs::write(&shard, b"rows")?;
/// let inputs = [shard.as_path()];
/// clipcid_store::io::check_not_an_input(&dir.path().join("keep.safetensors"), inputs)?;
/// let again = dir.path().join(".").join("embeddings-00000.safetensors");
/// assert!(clipcid_store::io::check_not_an_input(&again, inputs).is_err());
/// # Ok(()) }
/// ```
pub fn check_not_an_input<'a>(
    out: &Path,
    inputs: impl IntoIterator<Item = &'a Path>,
) -> Result<(), StoreError> {
    let Ok(target) = std::fs::canonicalize(out) else {
        return Ok(());
    };
    for input in inputs {
        if std::fs::canonicalize(input).is_ok_and(|i| i == target) {
            return Err(StoreError::file(
                out,
                format!(
                    "this output is an input of the run (`{}`); writing it would replace what is read: choose another path",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The UTF-8 text inside the gzip-compressed `bytes`, inflated to at most `max_bytes` (a
/// whole number of MiB, as the error says it): a crafted gzip can inflate a thousandfold, so
/// reading stops past the bound rather than filling memory. The error says what is wrong
/// (corrupt gzip, too large, not UTF-8), for the caller to name its file.
///
/// ```
/// use std::io::Write;
/// let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
/// gz.write_all(&vec![b'a'; 3 << 20])?;
/// let bytes = gz.finish()?;
/// assert_eq!(clipcid_store::io::gunzip_text(&bytes, 4 << 20).unwrap().len(), 3 << 20);
/// let e = clipcid_store::io::gunzip_text(&bytes, 2 << 20).unwrap_err();
/// assert_eq!(e, "decompresses to more than 2 MiB");
/// assert!(clipcid_store::io::gunzip_text(b"not gzip", 2 << 20).unwrap_err().starts_with("corrupt gzip"));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn gunzip_text(bytes: &[u8], max_bytes: u64) -> Result<String, String> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut text)
        .map_err(|e| format!("corrupt gzip: {e}"))?;
    if text.len() as u64 > max_bytes {
        return Err(format!("decompresses to more than {} MiB", max_bytes >> 20));
    }
    // Read as bytes first: a bound falling inside a multi-byte character is "too large",
    // not "not UTF-8".
    String::from_utf8(text).map_err(|e| format!("not UTF-8 inside the gzip: {e}"))
}

/// Writes bytes to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_files(&[(path, bytes)])
}

/// Writes several files as one unit: each to its temporary name first ([`temp_path`]), and
/// only once all are whole are they renamed into place, in the order given (put the file
/// that readers look for last). A failed write (a full disk) removes every temporary file
/// and leaves each path as it was, and so does a folder standing where one of the files
/// goes (checked before anything is written); only a rename failing for another reason
/// after an earlier one succeeded (renames take no space) could leave part of the set in
/// place.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let (a, b) = (dir.path().join("a.json"), dir.path().join("b.txt"));
/// clipcid_store::io::write_atomic_files(&[(&a, b"{}"), (&b, b"hello")])?;
/// assert_eq!(std::fs::read(&b)?, b"hello");
/// # Ok(()) }
/// ```
pub fn write_atomic_files(files: &[(&Path, &[u8])]) -> Result<(), StoreError> {
    // A rename onto a folder fails; found after the first rename, it would leave that file
    // in place without the rest of its set.
    if let Some((path, _)) = files.iter().find(|(p, _)| p.is_dir()) {
        return Err(StoreError::file(
            path,
            "is a folder where a file is written",
        ));
    }
    let temps: Vec<PathBuf> = files.iter().map(|(p, _)| temp_path(p)).collect();
    let remove_temps = || {
        for t in &temps {
            let _ = std::fs::remove_file(t);
        }
    };
    for ((path, bytes), tmp) in files.iter().zip(&temps) {
        if let Err(e) = std::fs::write(tmp, bytes) {
            remove_temps();
            return Err(StoreError::file(path, format!("cannot write: {e}")));
        }
    }
    for ((path, _), tmp) in files.iter().zip(&temps) {
        if let Err(e) = std::fs::rename(tmp, path) {
            remove_temps();
            return Err(StoreError::file(path, format!("cannot write: {e}")));
        }
    }
    Ok(())
}

/// Copies `from` to `to` atomically (to [`temp_path`] of `to`, then renamed), so a failed copy
/// (a full disk) leaves no cut-short file under the final name. Returns the bytes copied.
pub fn copy_atomic(from: &Path, to: &Path) -> Result<u64, StoreError> {
    let tmp = temp_path(to);
    let copied = std::fs::copy(from, &tmp)
        .map_err(|e| StoreError::file(to, format!("cannot copy {}: {e}", from.display())))
        .and_then(|n| {
            std::fs::rename(&tmp, to)
                .map_err(|e| StoreError::file(to, format!("cannot write: {e}")))?;
            Ok(n)
        });
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

/// How long a staging folder of a process that no longer runs here stays untouched before
/// [`write_folder`] removes it.
pub const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(3600);

/// Name of the hidden folder inside an output folder that [`write_folder`] stages its files
/// in (with the process id after it).
pub const STAGING_PREFIX: &str = ".clipcid-staging-";

/// `text` (an error message) with every staged path of [`write_folder`] written as the path
/// the file was going to: `out/.clipcid-staging-4242/model.safetensors` becomes
/// `out/model.safetensors`. A write that fails inside [`write_folder`] names the staged file,
/// and the staging folder is gone once the call returns, so the message would name a path
/// that never existed for the user; the command line prints its errors through this.
///
/// ```
/// use clipcid_store::io::without_staging;
/// assert_eq!(
///     without_staging("cannot write out/.clipcid-staging-4242/model.safetensors: disk full"),
///     "cannot write out/model.safetensors: disk full",
/// );
/// assert_eq!(without_staging("out/.clipcid-staging-7: cannot create"), "out: cannot create");
/// // Only a staging folder's name (the prefix, then a process id) is touched.
/// assert_eq!(without_staging("a/.clipcid-staging-x/b"), "a/.clipcid-staging-x/b");
/// ```
pub fn without_staging(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(STAGING_PREFIX) {
        let after = &rest[at + STAGING_PREFIX.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let before = &rest[..at];
        let is_folder = before.ends_with(['/', '\\'])
            && digits > 0
            && after[digits..]
                .chars()
                .next()
                .is_none_or(|c| !c.is_alphanumeric() && c != '-' && c != '_');
        if is_folder {
            // Drop the separator before the folder's name too: `out/` + `/model` reads `out/model`.
            out.push_str(&before[..before.len() - 1]);
            rest = &after[digits..];
        } else {
            out.push_str(&rest[..at + STAGING_PREFIX.len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Creates the output folder `dir` and its parents where they are missing. A file where the
/// folder goes (`--out model.safetensors` for a command that writes a folder) is an error
/// saying so, not the system's bare "File exists".
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_store::io::create_output_folder;
/// let dir = tempfile::tempdir()?;
/// create_output_folder(&dir.path().join("runs/a"))?;
/// assert!(dir.path().join("runs/a").is_dir());
/// std::fs::write(dir.path().join("model.safetensors"), b"")?;
/// let e = create_output_folder(&dir.path().join("model.safetensors")).unwrap_err();
/// assert!(e.to_string().contains("is a file where an output folder goes"), "{e}");
/// # Ok(()) }
/// ```
pub fn create_output_folder(dir: &Path) -> Result<(), StoreError> {
    if dir.exists() && !dir.is_dir() {
        return Err(StoreError::file(
            dir,
            "is a file where an output folder goes: name a folder (a new one, or one of this command's earlier outputs)",
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::file(dir, format!("cannot create the folder: {e}")))
}

/// Writes a folder of outputs (a model folder: weights, config, tokenizer, preprocessing) as
/// one unit. `write` fills a fresh hidden folder inside `dir` (`.clipcid-staging-PID`); only
/// once it returns `Ok` are the staged files renamed into `dir` (sub-folders merged, files of
/// the same name replaced, other files of `dir` left alone). When `write` fails (a full disk,
/// a tensor error) the staging folder is removed and `dir` holds what it held before, never
/// new weights beside an earlier export's preprocessing; a `dir` this call created is
/// removed again when it is left empty. The staging folders of processes that have ended
/// (a killed export) are removed first: those whose process id runs on no process of this
/// machine and that nothing has touched for an hour (a folder on a shared disk may be
/// another machine's). A second write into `dir` while one is under way (another process,
/// or another thread) is refused, naming the folder. [`write_folder_replacing`] also removes
/// what an earlier write of the same output left that this one does not write.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_store::{io, StoreError};
/// let dir = tempfile::tempdir()?;
/// let out = dir.path().join("model");
/// io::write_folder(&out, |staging| -> Result<(), StoreError> {
///     io::write_atomic(&staging.join("config.json"), b"{}")?;
///     io::write_atomic(&staging.join("model.safetensors"), b"...")
/// })?;
/// assert!(out.join("config.json").is_file());
/// // A failure after some files were written leaves none of them.
/// let failed = io::write_folder(&dir.path().join("other"), |staging| -> Result<(), StoreError> {
///     io::write_atomic(&staging.join("config.json"), b"{}")?;
///     Err(StoreError::Invalid("the disk is full".into()))
/// });
/// assert!(failed.is_err() && !dir.path().join("other").exists());
/// # Ok(()) }
/// ```
pub fn write_folder<T, E: From<StoreError>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let created = !dir.exists();
    create_output_folder(dir)?;
    let _writing = lock_folder(dir)?;
    remove_stale_staging(dir);
    let staging = dir.join(format!("{STAGING_PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = std::fs::create_dir(&staging)
        .map_err(|e| StoreError::file(&staging, format!("cannot create the folder: {e}")).into())
        .and_then(|()| write(&staging))
        .and_then(|value| {
            // Every move is checked before the first is made, so a clash (a folder where a
            // file goes) leaves `dir` untouched too.
            check_moves(&staging, dir)?;
            move_into(&staging, dir)?;
            Ok(value)
        });
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() && created {
        // Only an empty folder goes: remove_dir refuses one with files.
        let _ = std::fs::remove_dir(dir);
    }
    result
}

/// Removes the staging folders in `dir` of processes that have ended (a killed export leaves
/// a model's worth of files there): no process of this id runs here, and the folder is
/// untouched for [`STALE_STAGING`]. Where `/proc` cannot say which processes run, none is
/// removed.
fn remove_stale_staging(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(STAGING_PREFIX))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            let untouched = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= STALE_STAGING);
            if untouched && !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// An exclusive lock on the folder itself (`flock` on its descriptor, so no lock file is left
/// in a model folder), held while [`write_folder`] writes into it: a second writer into the
/// same folder (two evaluations started with one `--out`) is refused instead of leaving one
/// run's report beside the other's plots and records. On a filesystem whose folders cannot
/// be locked the write goes on unlocked.
fn lock_folder(dir: &Path) -> Result<Option<std::fs::File>, StoreError> {
    let Ok(handle) = std::fs::File::open(dir) else {
        return Ok(None);
    };
    match handle.try_lock() {
        Ok(()) => Ok(Some(handle)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::file(
            dir,
            "another clipcid run is writing to this folder; wait for it or use another output folder",
        )),
        Err(std::fs::TryLockError::Error(_)) => Ok(None),
    }
}

/// [`write_folder`] for an output that replaces its own earlier writes (a report, a study,
/// an export): besides the files this write puts into `dir`, it removes those that the last
/// write of the same `kind` put there and this one does not (an earlier report's plots and
/// CLIP_benchmark records of models no longer evaluated, an earlier export's open_clip weights
/// or tokenizer beside this export's weights), and sub-folders that leaves empty. Files that
/// no write of this kind made (the user's own, another kind's outputs) stay. What a write put
/// where is recorded in `dir/.clipcid-KIND-outputs.json`, moved in with the files; only
/// plain relative paths in it are ever removed.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_store::{io, StoreError};
/// let dir = tempfile::tempdir()?;
/// let out = dir.path().join("report");
/// io::write_folder_replacing(&out, "eval", |d| -> Result<(), StoreError> {
///     io::write_atomic(&d.join("report.md"), b"# a and b")?;
///     io::write_atomic(&d.join("confusion-b.png"), b"png")
/// })?;
/// io::write_folder_replacing(&out, "eval", |d| -> Result<(), StoreError> {
///     io::write_atomic(&d.join("report.md"), b"# a alone")
/// })?;
/// assert!(out.join("report.md").is_file() && !out.join("confusion-b.png").exists());
/// # Ok(()) }
/// ```
pub fn write_folder_replacing<T, E: From<StoreError>>(
    dir: &Path,
    kind: &str,
    write: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let record = format!(".clipcid-{kind}-outputs.json");
    let (mut before, mut written) = (vec![], vec![]);
    let value = write_folder(dir, |staging| -> Result<T, E> {
        // Read under the folder's lock: no other write lands between this and the move.
        before = read_outputs_record(&dir.join(&record));
        let value = write(staging)?;
        written = files_under(staging, Path::new(""))?;
        let json = serde_json::to_vec_pretty(&written)
            .map_err(|e| StoreError::Invalid(format!("outputs record: {e}")))?;
        write_atomic(&staging.join(&record), &json)?;
        Ok(value)
    })?;
    for stale in before.iter().filter(|p| !written.contains(p)) {
        let path = dir.join(stale);
        if path.is_file() && std::fs::remove_file(&path).is_ok() {
            // Sub-folders the removal emptied go too (remove_dir refuses a folder with files).
            let mut parent = path.parent();
            while let Some(p) = parent.filter(|p| *p != dir && p.starts_with(dir)) {
                if std::fs::remove_dir(p).is_err() {
                    break;
                }
                parent = p.parent();
            }
        }
    }
    Ok(value)
}

/// The relative paths an outputs record lists, only those made of plain names (no root, no
/// `..`): a damaged or crafted record can name nothing outside its folder. Unreadable: none.
fn read_outputs_record(path: &Path) -> Vec<String> {
    let listed: Vec<String> = std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    listed
        .into_iter()
        .filter(|p| {
            !p.is_empty()
                && Path::new(p)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .collect()
}

/// Every file under `root.join(rel)`, as `/`-joined paths relative to `root`, sorted.
fn files_under(root: &Path, rel: &Path) -> Result<Vec<String>, StoreError> {
    let mut out = vec![];
    for name in sorted_names(&root.join(rel))? {
        let rel = rel.join(&name);
        if root.join(&rel).is_dir() {
            out.extend(files_under(root, &rel)?);
        } else {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    Ok(out)
}

/// The names in the folder `dir`, sorted.
fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>, StoreError> {
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| StoreError::file(dir, format!("cannot list: {e}")))?;
    names.sort();
    Ok(names)
}

/// That every file under `from` can be renamed to its place under `to`: no folder stands where
/// a file goes, and no file where a folder goes.
fn check_moves(from: &Path, to: &Path) -> Result<(), StoreError> {
    for name in sorted_names(from)? {
        let (src, dst) = (from.join(&name), to.join(&name));
        match (src.is_dir(), dst.is_dir()) {
            (true, true) => check_moves(&src, &dst)?,
            (true, false) if dst.exists() => {
                return Err(StoreError::file(
                    &dst,
                    "is a file where a folder is written",
                ))
            }
            (false, true) => {
                return Err(StoreError::file(
                    &dst,
                    "is a folder where a file is written",
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Renames every file under `from` to the same place under `to`, making sub-folders as needed.
fn move_into(from: &Path, to: &Path) -> Result<(), StoreError> {
    for name in sorted_names(from)? {
        let (src, dst) = (from.join(&name), to.join(&name));
        if src.is_dir() {
            std::fs::create_dir_all(&dst)
                .map_err(|e| StoreError::file(&dst, format!("cannot create the folder: {e}")))?;
            move_into(&src, &dst)?;
        } else {
            std::fs::rename(&src, &dst)
                .map_err(|e| StoreError::file(&dst, format!("cannot move into place: {e}")))?;
        }
    }
    Ok(())
}

/// The temporary name [`write_safetensors`] and [`write_atomic`] write to before renaming.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TensorInfo {
    /// Element type as spelled in the file (`F32`, `F16`, `U64`...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub data_offsets: [usize; 2],
}

/// A parsed safetensors header, read without touching the tensor data.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The `__metadata__` string map.
    pub metadata: HashMap<String, String>,
    /// Byte offset in the file where the data section (offset 0 of `data_offsets`) starts.
    pub data_start: u64,
}

/// Reads only the header of a safetensors file and checks that the file is complete (its
/// length is the header's and the data's, which the tensors' byte ranges tile with no gap or
/// overlap) and that each tensor's shape and dtype fill exactly its byte range, so a shape
/// read here never promises more than the file holds.
pub fn read_header(path: &Path) -> Result<Header, StoreError> {
    read_header_of(&mut open_file(path)?, path)
}

/// `path` opened for reading, an error naming it where it cannot be.
pub(crate) fn open_file(path: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::File::open(path).map_err(|e| StoreError::file(path, format!("cannot open: {e}")))
}

/// [`read_header`] of `f`, just opened from `path` (named in errors), for a reader that goes
/// on to read tensors from the same file without opening it again.
pub(crate) fn read_header_of(f: &mut std::fs::File, path: &Path) -> Result<Header, StoreError> {
    read_header_without(f, path, &[])
}

/// [`read_header_of`], leaving out the metadata values named in `skip`: they are scanned as
/// JSON but neither kept nor checked to be strings (their reader,
/// [`RowIndex::read`](crate::RowIndex::read) for `keys`, reads the whole header and refuses
/// any other value). An embedding shard's `keys` list is nearly all of its header (0.24 MB
/// at 10,000 rows), and neither [`ShardLayout::open`](crate::ShardLayout::open) nor
/// [`RowIds::read`](crate::RowIds::read) needs any of it.
pub(crate) fn read_header_without(
    f: &mut std::fs::File,
    path: &Path,
    skip: &[&str],
) -> Result<Header, StoreError> {
    let bad = |msg: String| StoreError::file(path, msg);
    let file_len = f
        .metadata()
        .map_err(|e| bad(format!("cannot stat: {e}")))?
        .len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("not a safetensors file (shorter than 8 bytes)".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!(
            "not a safetensors file (header length {n}, file length {file_len})"
        )));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .map_err(|e| bad(format!("cannot read header: {e}")))?;
    let mut json = serde_json::Deserializer::from_slice(&buf);
    let (entries, metadata) =
        serde::de::DeserializeSeed::deserialize(HeaderJson { skip }, &mut json)
            .and_then(|parsed| json.end().map(|()| parsed))
            .map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
    let mut header = Header {
        data_start: 8 + n,
        metadata,
        ..Header::default()
    };
    for (name, value) in entries {
        let info: TensorInfo = serde_json::from_value(value)
            .map_err(|e| bad(format!("corrupt entry for `{name}`: {e}")))?;
        check_entry(&name, &info).map_err(bad)?;
        header.tensors.insert(name, info);
    }
    let data_end = check_ranges_tile(&header.tensors).map_err(bad)?;
    if (data_end as u64).checked_add(8 + n) != Some(file_len) {
        return Err(bad(format!(
            "truncated or padded file: header promises {} data bytes, file holds {}",
            data_end,
            file_len - 8 - n
        )));
    }
    Ok(header)
}

/// A safetensors header's JSON object, read in one pass: each tensor entry as a small
/// `serde_json::Value` (read into a [`TensorInfo`] after, so an error names the tensor), and
/// the `__metadata__` string map without the values named in `skip`. A name given twice
/// keeps its last value, as `serde_json`'s own map does.
struct HeaderJson<'s> {
    skip: &'s [&'s str],
}

/// Tensor entries by name and the kept metadata.
type HeaderParts = (BTreeMap<String, serde_json::Value>, HashMap<String, String>);

impl<'de> serde::de::DeserializeSeed<'de> for HeaderJson<'_> {
    type Value = HeaderParts;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for HeaderJson<'_> {
    type Value = HeaderParts;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of tensor entries and `__metadata__`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = BTreeMap::new();
        let mut metadata = HashMap::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                metadata = map.next_value_seed(MetadataJson { skip: self.skip })?;
            } else {
                entries.insert(name, map.next_value()?);
            }
        }
        Ok((entries, metadata))
    }
}

/// The `__metadata__` object: strings, but for those named in `skip`, scanned as any JSON
/// value and dropped.
struct MetadataJson<'s> {
    skip: &'s [&'s str],
}

impl<'de> serde::de::DeserializeSeed<'de> for MetadataJson<'_> {
    type Value = HashMap<String, String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for MetadataJson<'_> {
    type Value = HashMap<String, String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("`__metadata__` as an object of strings")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if self.skip.contains(&key.as_str()) {
                // Scanned, neither unescaped nor copied: half the instructions of reading
                // an embedding shard's header into a layout (callgrind, 20 shards).
                map.next_value::<serde::de::IgnoredAny>()?;
                out.remove(&key);
            } else {
                out.insert(key, map.next_value::<String>()?);
            }
        }
        Ok(out)
    }
}

/// Bytes per element of a safetensors dtype name; `None` for a name safetensors does not
/// define.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// A header entry is usable only if its shape, at its dtype's size, fills exactly its byte
/// range: the shape is what readers allocate from, so it must be bounded by the data.
fn check_entry(name: &str, info: &TensorInfo) -> Result<(), String> {
    let size = dtype_size(&info.dtype)
        .ok_or_else(|| format!("`{name}` has unknown dtype `{}`", info.dtype))?;
    let [start, end] = info.data_offsets;
    let bytes = info
        .shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d));
    if start > end || bytes != Some(end - start) {
        return Err(format!(
            "`{name}`: shape {:?} of {} does not fill its data range {start}..{end}",
            info.shape, info.dtype
        ));
    }
    Ok(())
}

/// The end of the data section when the tensors' byte ranges, in order of their starts, tile
/// it from 0 with no gap and no overlap, as the `safetensors` crate (and so Python's
/// `safetensors` and candle) requires: two tensors over the same bytes would each read the
/// other's values, and a file that one reader here takes should not be refused by the next.
fn check_ranges_tile(tensors: &BTreeMap<String, TensorInfo>) -> Result<usize, String> {
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .map(|(name, info)| (info.data_offsets[0], info.data_offsets[1], name.as_str()))
        .collect();
    ranges.sort_unstable();
    let mut end = 0;
    for (start, stop, name) in ranges {
        if start < end {
            return Err(format!(
                "`{name}`'s data range {start}..{stop} overlaps the tensors before it, which end at byte {end}"
            ));
        }
        if start > end {
            return Err(format!(
                "`{name}`'s data range {start}..{stop} leaves bytes {end}..{start} unused"
            ));
        }
        end = stop;
    }
    Ok(end)
}

/// Loads every tensor of a safetensors file onto the CPU, with the file named in any error.
/// A `U64` tensor (ids as numpy and other tools write them; candle has no unsigned 64-bit
/// type, and refused the whole file) is read as `I64`, a value past `i64::MAX` an error
/// naming the tensor; a `BOOL` tensor (numpy's bool) is read as `U8`.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>, StoreError> {
    use candle_core::safetensors::Load;
    let bytes =
        std::fs::read(path).map_err(|e| StoreError::file(path, format!("cannot read: {e}")))?;
    let invalid = |e: &dyn std::fmt::Display| {
        StoreError::file(path, format!("not a valid safetensors file: {e}"))
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| invalid(&e))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = match view.dtype() {
                safetensors::Dtype::U64 => u64_as_i64(path, &name, view.data(), view.shape())?,
                // numpy's bool (a keep mask from Python): one byte, 0 or 1.
                safetensors::Dtype::BOOL => {
                    Tensor::from_raw_buffer(view.data(), DType::U8, view.shape(), &Device::Cpu)?
                }
                _ => view.load(&Device::Cpu).map_err(|e| invalid(&e))?,
            };
            Ok((name, t))
        })
        .collect()
}

/// Little-endian `u64` values (`data`, of `shape`) as an `I64` tensor; a value past
/// `i64::MAX` is an error naming the tensor `name` of the file `path`.
pub(crate) fn u64_as_i64(
    path: &Path,
    name: &str,
    data: &[u8],
    shape: &[usize],
) -> Result<Tensor, StoreError> {
    let values = data
        .chunks_exact(8)
        .map(|b| {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            let v = u64::from_le_bytes(le);
            i64::try_from(v).map_err(|_| {
                StoreError::file(
                    path,
                    format!("`{name}` holds {v}, past the largest id clipcid keeps (2^63 - 1)"),
                )
            })
        })
        .collect::<Result<Vec<i64>, _>>()?;
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Name of the lock file a writing run holds in its output folder.
pub const LOCK_FILE: &str = ".clipcid.lock";

/// An exclusive claim on an output folder for one writing run: an OS file lock on
/// [`LOCK_FILE`] inside it, released when the value is dropped or the process ends (also by
/// `kill -9`, so a crashed run never leaves the folder locked).
#[derive(Debug)]
pub struct OutputLock {
    _files: Vec<std::fs::File>,
}

/// Locks `dir` (created if needed) for this run; a second writer gets an error naming the
/// folder instead of interleaving its files with the first one's.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let lock = clipcid_store::io::lock_output_dir(dir.path()).unwrap();
/// assert!(clipcid_store::io::lock_output_dir(dir.path()).is_err()); // held
/// drop(lock);
/// assert!(clipcid_store::io::lock_output_dir(dir.path()).is_ok());
/// ```
pub fn lock_output_dir(dir: &Path) -> Result<OutputLock, StoreError> {
    Ok(OutputLock {
        _files: vec![lock_file(dir, LOCK_FILE, false)?],
    })
}

/// The lock of one part of a run split over processes that share `dir`, each writing only
/// its own files: [`LOCK_FILE`] held shared (so parts run together but a whole run into the
/// folder is refused, and the other way round) and `part_lock` (`.clipcid-part-1-of-4.lock`)
/// held exclusively (so the same part cannot run twice at once).
///
/// ```
/// use clipcid_store::io::{lock_output_dir, lock_output_dir_part};
/// let dir = tempfile::tempdir().unwrap();
/// let a = lock_output_dir_part(dir.path(), ".part-0.lock").unwrap();
/// let b = lock_output_dir_part(dir.path(), ".part-1.lock").unwrap(); // parts together
/// assert!(lock_output_dir_part(dir.path(), ".part-1.lock").is_err()); // one part twice
/// assert!(lock_output_dir(dir.path()).is_err()); // a whole run beside parts
/// drop((a, b));
/// assert!(lock_output_dir(dir.path()).is_ok());
/// ```
pub fn lock_output_dir_part(dir: &Path, part_lock: &str) -> Result<OutputLock, StoreError> {
    Ok(OutputLock {
        _files: vec![
            lock_file(dir, LOCK_FILE, true)?,
            lock_file(dir, part_lock, false)?,
        ],
    })
}

fn lock_file(dir: &Path, name: &str, shared: bool) -> Result<std::fs::File, StoreError> {
    create_output_folder(dir)?;
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::file(&path, format!("cannot open the lock file: {e}")))?;
    let locked = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::file(
            dir,
            format!("another clipcid run is writing to this folder (it holds {name}); wait for it or use another output folder"),
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::file(&path, format!("cannot lock: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of header `json` (as given) and `data` bytes.
    fn raw_file(dir: &Path, json: &str, data: &[u8]) -> PathBuf {
        let path = dir.join("raw.safetensors");
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_header_read_without_named_metadata_is_the_whole_header_less_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.safetensors");
        // Keys with the characters JSON escapes, inside a string that is itself JSON.
        let keys = serde_json::to_string(&["a\"b", "c\\d", "e\nf", "g/h", "ü"]).unwrap();
        let metadata: HashMap<String, String> = [
            ("keys", keys.as_str()),
            ("skipped", "[\"x\"]"),
            ("provenance", "{\"teacher\":\"t\"}"),
            ("first_index", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let image = Tensor::ones((5, 3), DType::F16, &Device::Cpu).unwrap();
        let ids = Tensor::arange(0i64, 5, &Device::Cpu).unwrap();
        write_safetensors(
            &path,
            [("image".to_string(), image), ("ids".to_string(), ids)],
            &metadata,
        )
        .unwrap();

        let whole = read_header(&path).unwrap();
        assert_eq!(whole.metadata, metadata, "every value, unescaped");
        let part = read_header_without(&mut open_file(&path).unwrap(), &path, &["keys", "skipped"])
            .unwrap();
        let mut less = metadata.clone();
        less.remove("keys");
        less.remove("skipped");
        assert_eq!(part.metadata, less);
        assert_eq!(part.tensors, whole.tensors);
        assert_eq!(part.data_start, whole.data_start);
        assert_eq!(part.tensors["ids"].shape, vec![5]);
    }

    #[test]
    fn malformed_headers_are_refused_whether_or_not_a_value_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let entry = r#""x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
        let read = |json: &str, skip: &[&str]| {
            let path = raw_file(dir.path(), json, &[0; 4]);
            read_header_without(&mut open_file(&path).unwrap(), &path, skip)
        };
        let refused = [
            // A kept metadata value that is not a string.
            (
                format!(r#"{{"__metadata__":{{"other":3}},{entry}}}"#),
                "corrupt safetensors header",
            ),
            // A skipped value that is not JSON at all.
            (
                format!(r#"{{"__metadata__":{{"keys":[1,}},{entry}}}"#),
                "corrupt safetensors header",
            ),
            // Something after the object, an entry of the wrong form, not an object.
            (format!(r#"{{{entry}}} x"#), "corrupt safetensors header"),
            (
                r#"{"x":{"dtype":"F32","shape":"1","data_offsets":[0,4]}}"#.to_string(),
                "corrupt entry for `x`",
            ),
            (r#"[1, 2]"#.to_string(), "corrupt safetensors header"),
        ];
        for (json, want) in &refused {
            for skip in [&[][..], &["keys"][..]] {
                let e = read(json, skip).unwrap_err().to_string();
                assert!(
                    e.contains(want) && e.contains("raw.safetensors"),
                    "{json}: {e}"
                );
            }
        }
        // A skipped value is scanned as any JSON value: a `keys` that is not a string is
        // refused by the reader that keeps it (the row index), and dropped by the layout's.
        for keys in ["3", r#"["a"]"#] {
            let json = format!(r#"{{"__metadata__":{{"keys":{keys},"p":"q"}},{entry}}}"#);
            let e = read(&json, &[]).unwrap_err().to_string();
            assert!(e.contains("corrupt safetensors header"), "{e}");
            let header = read(&json, &["keys"]).unwrap();
            assert_eq!(
                header.metadata,
                HashMap::from([("p".to_string(), "q".to_string())])
            );
        }
        // Padding with spaces after the object, as safetensors writers align the data, is
        // part of a well-formed header.
        let header = read(&format!("{{{entry}}}      "), &["keys"]).unwrap();
        assert_eq!(header.tensors["x"].shape, vec![1]);
    }

    /// Each entry's shape must fill its byte range, the ranges must tile the data section
    /// (as the `safetensors` crate requires), and the file must end where the data does; a
    /// header length past the file or past safetensors' 100,000,000-byte bound is no
    /// safetensors file. Each refusal names the file and what is wrong.
    #[test]
    fn entries_must_fill_and_tile_the_data_section() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |name: &str, dtype: &str, shape: &str, range: [usize; 2]| {
            format!(
                r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{},{}]}}"#,
                range[0], range[1]
            )
        };
        let refused = [
            (
                entry("x", "F32", "[2]", [0, 4]),
                4,
                "`x`: shape [2] of F32 does not fill its data range 0..4",
            ),
            (
                entry("x", "F32", "[]", [8, 4]),
                8,
                "does not fill its data range 8..4",
            ),
            (
                entry("x", "F128", "[1]", [0, 16]),
                16,
                "`x` has unknown dtype `F128`",
            ),
            (
                format!(
                    "{},{}",
                    entry("x", "F32", "[1]", [0, 4]),
                    entry("y", "I32", "[1]", [0, 4])
                ),
                4,
                "`y`'s data range 0..4 overlaps the tensors before it, which end at byte 4",
            ),
            (
                entry("x", "F32", "[1]", [4, 8]),
                8,
                "`x`'s data range 4..8 leaves bytes 0..4 unused",
            ),
            (
                entry("x", "F32", "[2]", [0, 8]),
                4,
                "header promises 8 data bytes, file holds 4",
            ),
            (
                entry("x", "F32", "[1]", [0, 4]),
                8,
                "header promises 4 data bytes, file holds 8",
            ),
        ];
        for (entries, data, want) in refused {
            let json = format!("{{{entries}}}");
            let path = raw_file(dir.path(), &json, &vec![0; data]);
            let e = read_header(&path).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("raw.safetensors"),
                "{json}: {e}"
            );
        }
        // Ranges in any order of names that tile the data are one file.
        let json = format!(
            "{{{},{}}}",
            entry("a", "U8", "[2, 2]", [4, 8]),
            entry("b", "F32", "[1]", [0, 4])
        );
        let header = read_header(&raw_file(dir.path(), &json, &[0; 8])).unwrap();
        assert_eq!(header.tensors["a"].data_offsets, [4, 8]);

        // Not an object, or metadata that is not one: the error says what was expected.
        for (json, want) in [
            (
                "[1, 2]",
                "a JSON object of tensor entries and `__metadata__`",
            ),
            (
                r#"{"__metadata__":[1]}"#,
                "`__metadata__` as an object of strings",
            ),
        ] {
            let e = read_header(&raw_file(dir.path(), json, &[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{json}: {e}");
        }

        // Header lengths: past the file, or past the bound (a sparse file long enough for
        // it); at the bound itself the header is read, and then found not to be JSON.
        let with_length = |n: u64, len: u64| {
            let path = dir.path().join("long.safetensors");
            std::fs::write(&path, n.to_le_bytes()).unwrap();
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(len).unwrap();
            read_header(&path).unwrap_err().to_string()
        };
        let e = with_length(1000, 500);
        assert!(
            e.contains("not a safetensors file (header length 1000, file length 500)"),
            "{e}"
        );
        let e = with_length(100_000_001, 100_000_100);
        assert!(
            e.contains("not a safetensors file (header length 100000001"),
            "{e}"
        );
        let e = with_length(100_000_000, 100_000_100);
        assert!(e.contains("corrupt safetensors header"), "{e}");
    }

    /// Integer tensors of every integer dtype become the asked one exactly, up to and
    /// including its largest value; a value outside it (named, the negative one first) and
    /// any float tensor are refused.
    #[test]
    fn integer_vectors_convert_exactly_and_refuse_what_does_not_fit() {
        let path = Path::new("ids.safetensors");
        let cpu = Device::Cpu;
        let convert = |t: Tensor, to: DType| integer_vector(path, "ids", t, to);
        let as_i64 = |t: Tensor| t.to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap();
        let sources = [
            Tensor::new(&[[0u8, 7], [255, 1]], &cpu).unwrap(),
            Tensor::new(&[[0u32, 7], [255, 1]], &cpu).unwrap(),
            Tensor::new(&[[0i64, 7], [255, 1]], &cpu).unwrap(),
            Tensor::new(&[[0i32, 7], [255, 1]], &cpu).unwrap(),
        ];
        for t in sources {
            for to in [DType::U8, DType::U32, DType::I64] {
                let got = convert(t.clone(), to).unwrap();
                assert_eq!((got.dtype(), got.dims()), (to, &[4][..]));
                assert_eq!(as_i64(got), [0, 7, 255, 1], "{:?} to {to:?}", t.dtype());
            }
        }
        let top = Tensor::new(&[u32::MAX as i64, 0], &cpu).unwrap();
        assert_eq!(
            as_i64(convert(top, DType::U32).unwrap()),
            [u32::MAX as i64, 0]
        );
        let empty = Tensor::zeros(0, DType::I64, &cpu).unwrap();
        assert_eq!(convert(empty, DType::U8).unwrap().dims(), [0]);

        let refused = [
            (
                Tensor::new(&[3i64, 256], &cpu).unwrap(),
                DType::U8,
                "`ids` holds 256, outside 0..=255 (U8)",
            ),
            (
                Tensor::new(&[300u32], &cpu).unwrap(),
                DType::U8,
                "holds 300, outside 0..=255",
            ),
            (
                Tensor::new(&[-1i32, 2], &cpu).unwrap(),
                DType::U8,
                "holds -1, outside 0..=255",
            ),
            (
                Tensor::new(&[-3i64, 300], &cpu).unwrap(),
                DType::U8,
                "holds -3,",
            ),
            (
                Tensor::new(&[1i64 << 32], &cpu).unwrap(),
                DType::U32,
                "holds 4294967296, outside 0..=4294967295 (U32)",
            ),
            (
                Tensor::new(&[-1i64], &cpu).unwrap(),
                DType::U32,
                "holds -1, outside 0..=4294967295",
            ),
            (
                Tensor::new(&[1f32], &cpu).unwrap(),
                DType::I64,
                "`ids` holds F32 values; it must hold integers",
            ),
            (
                Tensor::new(&[1f64], &cpu).unwrap(),
                DType::U8,
                "holds F64 values",
            ),
        ];
        for (t, to, want) in refused {
            let e = convert(t, to).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("ids.safetensors"),
                "{want}: {e}"
            );
        }
    }

    /// The bound is inclusive: text of exactly `max_bytes` is read, one byte more is not.
    #[test]
    fn gunzip_reads_up_to_its_bound_exactly() {
        use std::io::Write;
        let gz = |len: usize| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&vec![b'a'; len]).unwrap();
            e.finish().unwrap()
        };
        assert_eq!(gunzip_text(&gz(1 << 20), 1 << 20).unwrap().len(), 1 << 20);
        let e = gunzip_text(&gz((1 << 20) + 1), 1 << 20).unwrap_err();
        assert_eq!(e, "decompresses to more than 1 MiB");
    }

    /// Only a staging folder's own name (the prefix, a process id, then a separator or the
    /// end) after a separator is taken out; anything else that holds the prefix stays.
    #[test]
    fn without_staging_takes_out_staging_folders_only() {
        let cases = [
            (
                "a/.clipcid-staging-1/x and b/.clipcid-staging-22/y",
                "a/x and b/y",
            ),
            (r"out\.clipcid-staging-42\m", r"out\m"),
            ("out/.clipcid-staging-42: gone", "out: gone"),
            (
                "a/.clipcid-staging-x/.clipcid-staging-3/z",
                "a/.clipcid-staging-x/z",
            ),
            ("a/.clipcid-staging-/b", "a/.clipcid-staging-/b"),
            ("x.clipcid-staging-42/m", "x.clipcid-staging-42/m"),
            ("out/.clipcid-staging-42x/m", "out/.clipcid-staging-42x/m"),
            ("out/.clipcid-staging-42-b/m", "out/.clipcid-staging-42-b/m"),
            ("out/.clipcid-staging-42_b/m", "out/.clipcid-staging-42_b/m"),
            ("no staging here", "no staging here"),
        ];
        for (text, want) in cases {
            assert_eq!(without_staging(text), want, "{text}");
        }
    }
}
