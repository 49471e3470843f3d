//! Reading embedding shards for balancing, writing the keep file.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
pub use clipcid_store::KeepList;
use clipcid_store::ShardLayout;

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
    /// What produced the shards, as they record it ([`ShardLayout::provenance`]).
    pub provenance: Option<String>,
}

/// Reads the `image` tensors of embedding shards (a folder of `embeddings-*.safetensors`,
/// or single files), checking that every shard has the same width ([`ShardLayout`]) and no
/// NaN/inf values, and L2-normalises the rows. The rows are gathered into one buffer as each
/// shard is read, so peak memory is the matrix plus one shard.
pub fn load_embeddings(inputs: &[PathBuf], device: &Device) -> Result<Embeddings, DedupError> {
    let layout = ShardLayout::open(inputs)?;
    // Reserve the whole matrix from the headers: growing the buffer shard by shard would
    // briefly hold old and new copies.
    let mut data: Vec<f32> = Vec::with_capacity(layout.total() * layout.dim);
    let mut ids = Vec::with_capacity(layout.total());
    for (i, &count) in layout.counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let shard = layout.read(i)?;
        data.extend(shard.unit_image_rows(|_| true)?);
        ids.extend(shard.ids);
    }
    let n = ids.len();
    let image = Tensor::from_vec(data, (n, layout.dim), &Device::Cpu)?.to_device(device)?;
    Ok(Embeddings {
        image,
        ids,
        shards: layout.shards,
        provenance: layout.provenance,
    })
}

/// Writes the balance result as a keep file ([`clipcid_store::write_keep_file`], atomically):
/// `keep` u8 `[n]`, `set_id` u32 `[n]`, `representatives` u32 `[sets]`, `ids` i64 `[n]`;
/// metadata `summary` (JSON, also written beside it as `<name>.json`) and the provenance of
/// `embeddings` (the rows `result` balanced), so that later stages refuse the keep file with
/// other embeddings.
pub fn write_keep_file(
    path: &Path,
    result: &BalanceResult,
    embeddings: &Embeddings,
) -> Result<(), DedupError> {
    Ok(clipcid_store::write_keep_file(
        path,
        &result.keep,
        &result.set_id,
        &result.representatives,
        &embeddings.ids,
        &result.summary,
        embeddings.provenance.as_deref(),
    )?)
}
