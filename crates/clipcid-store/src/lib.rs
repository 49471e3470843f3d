//! The file formats every clipcid stage reads and writes, in one crate below all stages, so
//! that each stage depends on the formats and not on the stage that wrote them.
//!
//! - [`io`]: safetensors written atomically (temporary file, then rename) with sorted,
//!   byte-reproducible headers; header-only reads that check a file is complete; gzip text
//!   inflated to a bound.
//! - [`EmbeddingShard`] and [`ShardLayout`]: the teacher embedding shards of `clipcid embed`
//!   (`image` `[n, D]`, optional `text` `[n, D]`, `ids`, keys in the metadata), and
//!   [`EmbedEnd`], the record a finished run leaves beside them; [`RowIds`] and [`RowIndex`]:
//!   a shard's sample ids and caption flags (and keys) without its embeddings.
//! - [`KeepList`] and [`write_keep_file`]: the keep file of `clipcid balance`.
//! - [`ClusterFile`]: the centroids and pseudo-labels of `clipcid cluster`.
//! - [`RowReader`]: rows of the shards by position, read on demand (positioned reads), and
//!   [`ImageDigests`]: the digest of the image bytes each row was embedded from.
//! - [`Part`]: one process's share of a stage run by many (`--part I/N`, torchrun's or a
//!   Slurm array's environment).
//! - [`check_same_embeddings`]: keep and cluster files record the provenance of the
//!   embeddings they were made from, and are refused with other embeddings.
//!
//! Every error is a [`StoreError`] naming the file and what is wrong with it.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{Device, Tensor};
//! use clipcid_store::{io, shard_path, EmbeddingShard};
//!
//! let dir = tempfile::tempdir()?;
//! let path = shard_path(dir.path(), 0);
//! let image = Tensor::new(&[[3f32, 4.0], [0.0, 2.0]], &Device::Cpu)?;
//! io::write_safetensors(&path, [("image".to_string(), image)], &Default::default())?;
//!
//! let shard = EmbeddingShard::read(&path)?;
//! assert_eq!((shard.len(), shard.dim()), (2, 2));
//! assert_eq!(shard.unit_image_rows(|_| true)?, vec![0.6, 0.8, 0.0, 1.0]);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod clusters;
mod digest;
mod error;
pub mod io;
mod keep;
mod part;
mod provenance;
mod rows;
mod shard;

pub use clusters::{
    read_clusters, write_clusters, ClusterFile, ClusterSummary, KMeansInit, SizeSummary,
};
pub use digest::{
    image_digest, ImageDigest, ImageDigests, IMAGE_DIGEST_BYTES, IMAGE_DIGEST_TENSOR,
};
pub use error::StoreError;
pub use keep::{write_keep_file, KeepList, KEEP_KIND};
pub use part::Part;
pub use provenance::{check_same_embeddings, differing_fields, EMBEDDINGS_META};
pub use rows::{raise_open_files_limit, unit_rows, RowReader};
pub use shard::{
    expand_shard_inputs, first_duplicate, list_shards, repeated_shard, row_ids_digest, sha256_hex,
    shard_index, shard_path, sidecar_ids_path, EmbedEnd, EmbeddingShard, RowIds, RowIndex,
    ShardLayout, EMBED_END_RECORD, SHARD_KIND,
};
