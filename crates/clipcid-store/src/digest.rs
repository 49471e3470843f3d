//! Which image bytes each embedding row was made from: `clipcid embed` stores a short digest
//! of every embedded image's encoded bytes beside its embedding, and a stage that reads the
//! images again (distillation) checks that it reads the same ones.

use std::sync::Arc;

use crate::shard::ShardIndex;
use crate::{ShardLayout, StoreError};

/// Bytes kept of each image's digest.
pub const IMAGE_DIGEST_BYTES: usize = 8;

/// The first [`IMAGE_DIGEST_BYTES`] bytes of the SHA-256 of an image's encoded bytes (the
/// file, or the tar member, as the dataset holds it).
pub type ImageDigest = [u8; IMAGE_DIGEST_BYTES];

/// Name of the embedding shards' `[n, 8]` u8 tensor of [`ImageDigest`]s, one row per
/// embedding row. Shards written before it (or by other tools) have none.
pub const IMAGE_DIGEST_TENSOR: &str = "image_digest";

/// The [`ImageDigest`] of an image's encoded bytes.
///
/// ```
/// use clipcid_store::image_digest;
/// // SHA-256("abc") begins ba 78 16 bf 8f 01 cf ea.
/// assert_eq!(image_digest(b"abc"), [0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea]);
/// ```
pub fn image_digest(bytes: &[u8]) -> ImageDigest {
    use sha2::Digest;
    let full = sha2::Sha256::digest(bytes);
    let mut out = [0u8; IMAGE_DIGEST_BYTES];
    out.copy_from_slice(&full[..IMAGE_DIGEST_BYTES]);
    out
}

/// The [`IMAGE_DIGEST_TENSOR`] rows of a [`ShardLayout`], read by global row position
/// (shard order) with positioned reads, as [`RowReader`](crate::RowReader) reads
/// embeddings: memory does not grow with the shards. A shard without the tensor gives `None`
/// for its rows; one whose tensor is not u8 `[n, 8]` for its `n` rows is an error naming it.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use candle_core::{Device, Tensor};
/// use clipcid_store::{image_digest, io::write_safetensors, shard_path, ImageDigests, ShardLayout};
/// let dir = tempfile::tempdir()?;
/// let digests: Vec<u8> = [&b"first image"[..], b"second image"].iter().flat_map(|b| image_digest(b)).collect();
/// let tensors = [
///     ("image".to_string(), Tensor::ones((2, 4), candle_core::DType::F32, &Device::Cpu)?),
///     ("image_digest".to_string(), Tensor::from_vec(digests, (2, 8), &Device::Cpu)?),
/// ];
/// write_safetensors(&shard_path(dir.path(), 0), tensors, &Default::default())?;
/// let image = Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu)?;
/// write_safetensors(&shard_path(dir.path(), 1), [("image".to_string(), image)], &Default::default())?;
///
/// let digests = ImageDigests::open(&ShardLayout::open(&[dir.path().to_path_buf()])?)?;
/// assert_eq!(digests.gather(&[1, 2])?, vec![Some(image_digest(b"second image")), None]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ImageDigests {
    /// Per shard, the byte offset of its row 0's digest in the file; `None` when the shard
    /// has no digests.
    offsets: Vec<Option<u64>>,
    /// The shards' files and rows, shared with the layout's row readers.
    index: Arc<ShardIndex>,
}

impl ImageDigests {
    /// The digest rows of the layout's shards, where the layout found them in the headers.
    pub fn open(layout: &ShardLayout) -> Result<Self, StoreError> {
        let mut offsets = vec![];
        for i in 0..layout.shards.len() {
            let (path, rows, tensors) = layout.shard(i)?;
            let offset = match tensors.get(IMAGE_DIGEST_TENSOR) {
                None => None,
                Some((info, offset)) => {
                    if info.dtype != "U8" || info.shape != [rows, IMAGE_DIGEST_BYTES] {
                        return Err(StoreError::file(
                            path,
                            format!(
                                "`{IMAGE_DIGEST_TENSOR}` is {:?} {}, expected [{rows}, {IMAGE_DIGEST_BYTES}] U8 (one image digest per row)",
                                info.shape, info.dtype
                            ),
                        ));
                    }
                    Some(offset)
                }
            };
            offsets.push(offset);
        }
        Ok(Self {
            offsets,
            index: layout.index().clone(),
        })
    }

    /// True when some shard has digests.
    pub fn any(&self) -> bool {
        self.offsets.iter().any(Option::is_some)
    }

    /// The shard file that holds row `position`.
    pub fn shard_of(&self, position: u32) -> Option<&std::path::Path> {
        let i = self.index.shard_holding(position as usize)?;
        Some(self.index.path(i))
    }

    /// The digests of the rows at `positions` (global, any order), `None` for rows of a
    /// shard without digests. A position past the last row is an error. The shard files are
    /// the layout's ([`ShardLayout::open_files`]), shared with its row readers.
    pub fn gather(&self, positions: &[u32]) -> Result<Vec<Option<ImageDigest>>, StoreError> {
        let mut out = vec![None; positions.len()];
        let mut order: Vec<usize> = (0..positions.len()).collect();
        order.sort_by_key(|&k| positions[k]);
        for k in order {
            let p = positions[k];
            let i = self.index.shard_holding(p as usize).ok_or_else(|| {
                StoreError::Invalid(format!("image digest of row {p} asked of fewer rows"))
            })?;
            let Some(offset) = self.offsets[i] else {
                continue;
            };
            let mut digest = [0u8; IMAGE_DIGEST_BYTES];
            let row = (p as usize - self.index.rows_of(i).start) as u64;
            crate::rows::read_file_at(
                &*self.index.file(i)?,
                self.index.path(i),
                offset + row * IMAGE_DIGEST_BYTES as u64,
                &mut digest,
            )?;
            out[k] = Some(digest);
        }
        Ok(out)
    }
}
