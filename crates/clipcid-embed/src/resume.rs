//! Resuming an embedding run: which shards on disk are complete and can be kept.

use std::path::Path;

use clipcid_store::SHARD_KIND;

/// What a shard written by this run must look like to be kept on resume.
pub(crate) struct Expect {
    pub dim: usize,
    pub dtype: crate::EmbedDtype,
    pub with_text: bool,
    pub shard_size: u64,
    pub provenance: Provenance,
}

impl Expect {
    /// The provenance as each shard and the run's end record store it.
    pub(crate) fn provenance_json(&self) -> String {
        serde_json::to_string(&self.provenance).unwrap_or_default()
    }
}

/// What produced a run's shards, recorded in each (metadata `provenance`, JSON) and
/// compared on every re-run into the same folder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Provenance {
    /// SHA-256 of the teacher's config and weights.
    pub teacher: String,
    /// SHA-256 identifying the dataset (`Dataset::fingerprint`).
    pub data: String,
    /// SHA-256 of the tokenizer, when captions are embedded.
    pub tokenizer: Option<String>,
    /// Image preprocessing, as `Debug` text.
    pub preprocess: String,
    /// The image decoders (`clipcid_data::IMAGE_DECODER`); absent in shards written before
    /// JPEG went through libjpeg-turbo.
    #[serde(default)]
    pub decoder: Option<String>,
    /// Storage precision.
    pub dtype: String,
    /// Input samples per shard.
    pub shard_size: u64,
}

impl Provenance {
    /// The fields that differ from `other`, named for a message.
    pub(crate) fn differences(&self, other: &Self) -> Vec<&'static str> {
        let mut d = vec![];
        if self.teacher != other.teacher {
            d.push("teacher");
        }
        if self.data != other.data {
            d.push("dataset");
        }
        if self.tokenizer != other.tokenizer {
            d.push("tokenizer");
        }
        if self.preprocess != other.preprocess {
            d.push("preprocessing");
        }
        if self.decoder != other.decoder {
            d.push("image decoder");
        }
        if self.dtype != other.dtype {
            d.push("--dtype");
        }
        if self.shard_size != other.shard_size {
            d.push("--shard-size");
        }
        d
    }
}

/// The provenance recorded in a shard file: `Some(None)` when its header reads but records
/// none (another producer, or an older clipcid), `None` when the header cannot be read (a
/// damaged or partial file, which the run redoes like any incomplete shard).
pub(crate) fn recorded(path: &Path) -> Option<Option<Provenance>> {
    let h = clipcid_store::io::read_header(path).ok()?;
    Some(
        h.metadata
            .get("provenance")
            .and_then(|p| serde_json::from_str(p).ok()),
    )
}

/// The input samples that the shard at `path` covers, when it is a complete shard of this run's
/// kind starting at `first`: the header parses, the file is as long as the header says, the
/// width, precision and tensors match, and its range is `first..first + n` with `n` at most
/// the shard size. A shorter range is the dataset's last shard: the caller keeps it only when
/// the data still ends there.
pub(crate) fn is_complete(path: &Path, first: u64, expect: &Expect) -> Option<u64> {
    if !path.exists() {
        return None;
    }
    let check = || -> Result<u64, String> {
        let h = clipcid_store::io::read_header(path).map_err(|e| e.to_string())?;
        let meta = |k: &str| h.metadata.get(k).cloned().unwrap_or_default();
        if meta("clipcid.kind") != SHARD_KIND {
            return Err("not an embedding shard".into());
        }
        if serde_json::from_str::<Provenance>(&meta("provenance"))
            .ok()
            .as_ref()
            != Some(&expect.provenance)
        {
            return Err("written by another run".into());
        }
        let end = meta("end_index").parse::<u64>().ok();
        let covered = match end {
            Some(end) if meta("first_index") == first.to_string() => end.checked_sub(first),
            _ => None,
        };
        let Some(covered) = covered.filter(|&n| n > 0 && n <= expect.shard_size) else {
            let (a, b, most) = (meta("first_index"), meta("end_index"), expect.shard_size);
            return Err(format!(
                "covers samples {a}..{b}, this run's shard starts at {first} and holds at most {most}"
            ));
        };
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
        // Shards of older runs have no image digests, and are kept.
        if let Some(d) = h.tensors.get(clipcid_store::IMAGE_DIGEST_TENSOR) {
            if d.shape != [img.shape[0], clipcid_store::IMAGE_DIGEST_BYTES] || d.dtype != "U8" {
                return Err(format!("image digests are {:?} {}", d.shape, d.dtype));
            }
        }
        let keys: Vec<String> =
            serde_json::from_str(&meta("keys")).map_err(|e| format!("bad keys metadata: {e}"))?;
        if keys.len() != img.shape[0] {
            return Err("key count differs from row count".into());
        }
        Ok(covered)
    };
    match check() {
        Ok(covered) => Some(covered),
        Err(why) => {
            log::warn!("{}: recomputing shard ({why})", path.display());
            None
        }
    }
}
