//! The keep file written by `clipcid balance`: which embedding rows survive near-duplicate
//! removal.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::StoreError;

/// Value of the `clipcid.kind` metadata key in keep files.
pub const KEEP_KIND: &str = "balance";

/// A keep file: per balanced row (in shard order) whether it survives and its dataset id;
/// when written by the balance stage, also each row's duplicate set and each set's kept row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeepList {
    /// Per balanced row (shard order): kept?
    pub keep: Vec<bool>,
    /// Per balanced row: dataset id.
    pub ids: Vec<i64>,
    /// Provenance of the embeddings the list was made from, as their shards record it
    /// (absent when they record none); see [`check_same_embeddings`](crate::check_same_embeddings).
    pub embeddings: Option<String>,
}

impl KeepList {
    /// Reads `keep` and `ids` from a file written by [`write_keep_file`]; a missing tensor or
    /// mismatched lengths are errors naming the file. `keep` is a U8 (or BOOL) mask of 0/1
    /// flags, one per id, or (another tool's keep list, as DESIGN.md allows) an index list:
    /// the row positions of the kept ids in an integer tensor of another type (I64, U32,
    /// I32, U64), each below the number of ids and none twice.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use candle_core::{Device, Tensor};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("keep.safetensors");
    /// let tensors = [
    ///     ("keep".to_string(), Tensor::new(&[2i64, 0], &Device::Cpu)?), // rows 2 and 0
    ///     ("ids".to_string(), Tensor::new(&[10i64, 11, 12], &Device::Cpu)?),
    /// ];
    /// clipcid_store::io::write_safetensors(&path, tensors, &Default::default())?;
    /// let list = clipcid_store::KeepList::read(&path)?;
    /// assert_eq!(list.keep, vec![true, false, true]);
    /// # Ok(()) }
    /// ```
    pub fn read(path: &Path) -> Result<Self, StoreError> {
        let bad = |msg: &str| StoreError::file(path, msg);
        let embeddings = crate::io::read_header(path)?
            .metadata
            .remove(crate::EMBEDDINGS_META);
        let mut t = crate::io::load_tensors(path)?;
        let keep = t
            .remove("keep")
            .ok_or_else(|| bad("no `keep` tensor (not a keep file from `clipcid balance`?)"))?;
        let ids: Vec<i64> = match t.remove("ids") {
            Some(x) => crate::io::integer_vector(path, "ids", x, DType::I64)?.to_vec1()?,
            None => return Err(bad("no `ids` tensor")),
        };
        let keep = if keep.dtype() == DType::U8 {
            let flags: Vec<u8> =
                crate::io::integer_vector(path, "keep", keep, DType::U8)?.to_vec1()?;
            if let Some(i) = flags.iter().position(|&b| b > 1) {
                return Err(StoreError::file(
                    path,
                    format!("`keep` flag {i} is {}, not 0 or 1", flags[i]),
                ));
            }
            if ids.len() != flags.len() {
                return Err(StoreError::file(
                    path,
                    format!("{} keep flags but {} ids", flags.len(), ids.len()),
                ));
            }
            flags.into_iter().map(|b| b == 1).collect()
        } else {
            // An index list: I64 holds every position (U32, I32 and U64 convert exactly).
            let rows: Vec<i64> =
                crate::io::integer_vector(path, "keep", keep, DType::I64)?.to_vec1()?;
            let mut keep = vec![false; ids.len()];
            for (k, &r) in rows.iter().enumerate() {
                let slot = usize::try_from(r).ok().and_then(|r| keep.get_mut(r));
                match slot {
                    Some(s) if !*s => *s = true,
                    Some(_) => {
                        return Err(StoreError::file(
                            path,
                            format!("`keep` (an index list) names row {r} twice"),
                        ))
                    }
                    None => {
                        return Err(StoreError::file(
                            path,
                            format!(
                                "`keep` (an index list) entry {k} is row {r}, outside the {} ids",
                                ids.len()
                            ),
                        ))
                    }
                }
            }
            keep
        };
        Ok(Self {
            keep,
            ids,
            embeddings,
        })
    }

    /// Number of kept rows.
    pub fn kept(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }

    /// Dataset ids of the kept rows, in order.
    pub fn kept_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.ids
            .iter()
            .zip(&self.keep)
            .filter(|(_, &kept)| kept)
            .map(|(&id, _)| id)
    }
}

/// That the sets fit together as balance makes them: every row's set is one of the
/// `representatives`, each set's representative is a row of that set, and the kept rows are
/// exactly the representatives.
fn check_sets(keep: &[bool], set_id: &[u32], representatives: &[u32]) -> Result<(), String> {
    let sets = representatives.len();
    if let Some(r) = set_id.iter().position(|&s| s as usize >= sets) {
        return Err(format!(
            "row {r} is in set {}, but there are {sets} sets (representatives)",
            set_id[r]
        ));
    }
    for (s, &r) in representatives.iter().enumerate() {
        let row = r as usize;
        if !(set_id.get(row) == Some(&(s as u32)) && keep[row]) {
            return Err(format!(
                "set {s}'s representative, row {r}, is not a kept row of that set"
            ));
        }
    }
    let kept = keep.iter().filter(|&&k| k).count();
    if kept != sets {
        return Err(format!(
            "{kept} rows kept but {sets} sets: each set keeps exactly its representative"
        ));
    }
    Ok(())
}

/// Writes a keep file atomically: `keep` u8 `[n]`, `set_id` u32 `[n]` (each row's duplicate
/// set), `representatives` u32 `[sets]` (the row each set keeps), `ids` i64 `[n]`; metadata
/// `clipcid.kind = balance`, `summary` (JSON, also written beside it as `<name>.json`) and
/// `embeddings`, the provenance of the embeddings balanced, when they record one. Lengths
/// that differ, or sets that do not fit together (a set id with no representative, a
/// representative outside its set or not kept, a kept row that represents no set), are an
/// error naming `path`, and nothing is written.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_store::{write_keep_file, KeepList};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("keep.safetensors");
/// // Rows 0 and 1 are duplicates (set 0, represented by row 1); row 2 stands alone.
/// let keep = [false, true, true];
/// let provenance = Some(r#"{"teacher":"ab12"}"#);
/// write_keep_file(&path, &keep, &[0, 0, 1], &[1, 2], &[10, 11, 12], &"summary", provenance)?;
/// let list = KeepList::read(&path)?;
/// assert_eq!(list.kept_ids().collect::<Vec<_>>(), vec![11, 12]);
/// assert_eq!(list.embeddings.as_deref(), provenance);
/// # Ok(()) }
/// ```
pub fn write_keep_file(
    path: &Path,
    keep: &[bool],
    set_id: &[u32],
    representatives: &[u32],
    ids: &[i64],
    summary: &impl serde::Serialize,
    embeddings: Option<&str>,
) -> Result<(), StoreError> {
    let cpu = Device::Cpu;
    let n = keep.len();
    if ids.len() != n || set_id.len() != n {
        return Err(StoreError::file(
            path,
            format!(
                "{} ids and {} set ids for {n} balanced rows",
                ids.len(),
                set_id.len()
            ),
        ));
    }
    check_sets(keep, set_id, representatives)
        .map_err(|msg| StoreError::file(path, format!("not written: {msg}")))?;
    let keep: Vec<u8> = keep.iter().map(|&k| k as u8).collect();
    let tensors = vec![
        ("keep".to_string(), Tensor::from_vec(keep, n, &cpu)?),
        ("set_id".to_string(), Tensor::from_slice(set_id, n, &cpu)?),
        (
            "representatives".to_string(),
            Tensor::from_slice(representatives, representatives.len(), &cpu)?,
        ),
        ("ids".to_string(), Tensor::from_slice(ids, n, &cpu)?),
    ];
    crate::io::write_with_summary(path, tensors, KEEP_KIND, summary, embeddings)
}
