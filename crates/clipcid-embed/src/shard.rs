//! Embedding shard files: naming, completeness checks for resume, and reading.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::EmbedError;

/// Value of the `clipcid.kind` metadata key in embedding shards.
pub const SHARD_KIND: &str = "embeddings";

/// Path of shard `index` in `dir`: `embeddings-00042.safetensors`.
pub fn shard_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("embeddings-{index:05}.safetensors"))
}

/// Expands command-line inputs into shard files: a folder becomes its
/// `embeddings-*.safetensors` in order, a file stays itself. No input at all is an error.
pub fn expand_shard_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, EmbedError> {
    let mut shards = Vec::new();
    for p in inputs {
        if p.is_dir() {
            shards.extend(list_shards(p)?);
        } else {
            shards.push(p.clone());
        }
    }
    if shards.is_empty() {
        return Err(EmbedError::Config("no embedding shards given".into()));
    }
    Ok(shards)
}

/// The embedding shards in `dir`, in order.
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>, EmbedError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| EmbedError::Config(format!("{}: {e}", dir.display())))?;
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
        return Err(EmbedError::Config(format!(
            "{}: no embeddings-*.safetensors shards",
            dir.display()
        )));
    }
    Ok(v)
}

/// What a shard written by this run must look like to be kept on resume.
pub(crate) struct Expect {
    pub dim: usize,
    pub dtype: crate::EmbedDtype,
    pub with_text: bool,
    pub shard_size: u64,
}

/// True when `path` holds a complete, full shard of this run's kind starting at `first`: the
/// header parses, the file is as long as the header says, the range, width, precision and
/// tensors match.
pub(crate) fn is_complete(path: &Path, first: u64, expect: &Expect) -> bool {
    if !path.exists() {
        return false;
    }
    let check = || -> Result<(), String> {
        let h = clipcid_models::io::read_header(path).map_err(|e| e.to_string())?;
        let meta = |k: &str| h.metadata.get(k).cloned().unwrap_or_default();
        if meta("clipcid.kind") != SHARD_KIND {
            return Err("not an embedding shard".into());
        }
        if meta("first_index") != first.to_string()
            || meta("end_index") != (first + expect.shard_size).to_string()
        {
            return Err(format!(
                "covers samples {}..{}, this run wants {first}..{}",
                meta("first_index"),
                meta("end_index"),
                first + expect.shard_size
            ));
        }
        let img = h.tensors.get("image").ok_or("no `image` tensor")?;
        if img.shape.len() != 2 || img.shape[1] != expect.dim || img.dtype != expect.dtype.name() {
            return Err(format!(
                "image is {:?} {}, this run writes [n, {}] {}",
                img.shape,
                img.dtype,
                expect.dim,
                expect.dtype.name()
            ));
        }
        if h.tensors.contains_key("text") != expect.with_text {
            return Err("text embeddings present/absent unlike this run".into());
        }
        let keys: Vec<String> =
            serde_json::from_str(&meta("keys")).map_err(|e| format!("bad keys metadata: {e}"))?;
        if keys.len() != img.shape[0] {
            return Err("key count differs from row count".into());
        }
        Ok(())
    };
    match check() {
        Ok(()) => true,
        Err(why) => {
            log::warn!("{}: recomputing shard ({why})", path.display());
            false
        }
    }
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
    /// Reads a shard written by [`crate::embed_dataset`], or any safetensors file with an
    /// `image` `[n, D]` tensor (then ids are `0..n` and keys their decimal strings).
    /// Mismatched row counts or widths are errors naming the file.
    pub fn read(path: &Path) -> Result<Self, EmbedError> {
        let bad = |msg: String| EmbedError::Shard {
            path: path.to_path_buf(),
            msg,
        };
        let header = clipcid_models::io::read_header(path)?;
        let mut t = clipcid_models::io::load_tensors(path)?;
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
        let has_text = match t.remove("has_text") {
            Some(x) => x
                .to_dtype(DType::U8)?
                .to_vec1::<u8>()?
                .into_iter()
                .map(|b| b != 0)
                .collect(),
            None => vec![text.is_some(); n],
        };
        let ids: Vec<i64> = match t.remove("ids") {
            Some(x) => x.to_dtype(DType::I64)?.to_vec1()?,
            None => (0..n as i64).collect(),
        };
        let keys: Vec<String> = match header.metadata.get("keys") {
            Some(k) => {
                serde_json::from_str(k).map_err(|e| bad(format!("bad `keys` metadata: {e}")))?
            }
            None => ids.iter().map(|i| i.to_string()).collect(),
        };
        let skipped = match header.metadata.get("skipped") {
            Some(k) => {
                serde_json::from_str(k).map_err(|e| bad(format!("bad `skipped` metadata: {e}")))?
            }
            None => vec![],
        };
        if ids.len() != n || keys.len() != n || has_text.len() != n {
            return Err(bad(format!(
                "{n} image rows but {} ids, {} keys, {} has_text flags",
                ids.len(),
                keys.len(),
                has_text.len()
            )));
        }
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
    pub fn unit_image_rows(&self, select: impl Fn(usize) -> bool) -> Result<Vec<f32>, EmbedError> {
        let d = self.dim();
        let values: Vec<f32> = self.image.flatten_all()?.to_vec1()?;
        let mut out = Vec::with_capacity(values.len());
        for (r, row) in values.chunks_exact(d.max(1)).enumerate() {
            if !select(r) {
                continue;
            }
            if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
                return Err(EmbedError::Shard {
                    path: self.path.clone(),
                    msg: format!(
                        "non-finite value {bad} in row {r} (sample `{}`)",
                        self.keys[r]
                    ),
                });
            }
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            out.extend(row.iter().map(|v| v / norm));
        }
        Ok(out)
    }

    /// Moves the embeddings to `device`.
    pub fn to_device(mut self, device: &Device) -> Result<Self, EmbedError> {
        self.image = self.image.to_device(device)?;
        self.text = self.text.map(|t| t.to_device(device)).transpose()?;
        Ok(self)
    }
}
