//! Reading embedding shards for balancing, writing the keep file.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clipcid_embed::EmbeddingShard;

use crate::{BalanceResult, DedupError};

/// Image embeddings gathered from shards, in shard order.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// `[n, D]` f32 image embeddings.
    pub image: Tensor,
    /// Dataset position of each row.
    pub ids: Vec<i64>,
    /// Shards read, in order.
    pub shards: Vec<PathBuf>,
}

/// Reads the `image` tensors of embedding shards (a folder of `embeddings-*.safetensors`,
/// or single files), checking that every shard has the same width and no NaN/inf values, and
/// L2-normalises the rows. The rows are gathered into one buffer as each shard is read, so
/// peak memory is the matrix plus one shard.
pub fn load_embeddings(inputs: &[PathBuf], device: &Device) -> Result<Embeddings, DedupError> {
    let shards = clipcid_embed::expand_shard_inputs(inputs)?;
    // Reserve the whole matrix from the headers: growing the buffer shard by shard would
    // briefly hold old and new copies.
    let mut capacity = 0usize;
    for path in &shards {
        let header = clipcid_models::io::read_header(path)?;
        if let Some(info) = header.tensors.get("image") {
            capacity += info.shape.iter().product::<usize>();
        }
    }
    let mut data: Vec<f32> = Vec::with_capacity(capacity);
    let mut ids = Vec::new();
    let mut width: Option<(usize, &Path)> = None;
    for path in &shards {
        let shard = EmbeddingShard::read(path)?;
        if shard.is_empty() {
            continue;
        }
        let d = shard.dim();
        match width {
            Some((w, first)) if w != d => {
                return Err(DedupError::Config(format!(
                    "{}: embeddings are {d} wide but {} has {w}",
                    path.display(),
                    first.display()
                )))
            }
            None => width = Some((d, path)),
            _ => {}
        }
        data.extend(shard.unit_image_rows(|_| true)?);
        ids.extend(shard.ids);
    }
    let Some((d, _)) = width else {
        return Err(DedupError::Config(
            "the embedding shards hold no rows".into(),
        ));
    };
    let n = data.len() / d;
    let image = Tensor::from_vec(data, (n, d), &Device::Cpu)?.to_device(device)?;
    Ok(Embeddings { image, ids, shards })
}

/// Writes the balance result as safetensors (atomically): `keep` u8 `[n]`, `set_id` u32
/// `[n]`, `representatives` u32 `[sets]`, `ids` i64 `[n]`; metadata `summary` (JSON). The
/// summary is also written beside it as `<name>.json`.
pub fn write_keep_file(path: &Path, result: &BalanceResult, ids: &[i64]) -> Result<(), DedupError> {
    let cpu = Device::Cpu;
    let n = result.keep.len();
    if ids.len() != n {
        return Err(DedupError::Config(format!(
            "{}: {} ids for {n} balanced rows",
            path.display(),
            ids.len()
        )));
    }
    let keep: Vec<u8> = result.keep.iter().map(|&k| k as u8).collect();
    let tensors = vec![
        ("keep".to_string(), Tensor::from_vec(keep, n, &cpu)?),
        (
            "set_id".to_string(),
            Tensor::from_vec(result.set_id.clone(), n, &cpu)?,
        ),
        (
            "representatives".to_string(),
            Tensor::from_vec(
                result.representatives.clone(),
                result.representatives.len(),
                &cpu,
            )?,
        ),
        (
            "ids".to_string(),
            Tensor::from_vec(ids.to_vec(), ids.len(), &cpu)?,
        ),
    ];
    clipcid_models::io::write_with_summary(path, tensors, "balance", &result.summary)?;
    Ok(())
}

/// A keep file read back: which balanced rows survive, and their dataset ids.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepList {
    /// Per balanced row (shard order): kept?
    pub keep: Vec<bool>,
    /// Per balanced row: dataset id.
    pub ids: Vec<i64>,
}

impl KeepList {
    /// Reads `keep` and `ids` from a file written by [`write_keep_file`]; a missing tensor or
    /// mismatched lengths are errors naming the file.
    pub fn read(path: &Path) -> Result<Self, DedupError> {
        let bad = |msg: String| DedupError::Config(format!("{}: {msg}", path.display()));
        let mut t = clipcid_models::io::load_tensors(path)?;
        let keep = t.remove("keep").ok_or_else(|| {
            bad("no `keep` tensor (not a keep file from `clipcid balance`?)".into())
        })?;
        let keep: Vec<bool> = keep
            .flatten_all()?
            .to_dtype(candle_core::DType::U8)?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|b| b != 0)
            .collect();
        let ids: Vec<i64> = match t.remove("ids") {
            Some(x) => x
                .flatten_all()?
                .to_dtype(candle_core::DType::I64)?
                .to_vec1()?,
            None => return Err(bad("no `ids` tensor".into())),
        };
        if ids.len() != keep.len() {
            return Err(bad(format!(
                "{} keep flags but {} ids",
                keep.len(),
                ids.len()
            )));
        }
        Ok(Self { keep, ids })
    }

    /// Number of kept rows.
    pub fn kept(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }
}
