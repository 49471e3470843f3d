//! Resuming an embedding run: which shards on disk are complete and can be kept.

use std::path::Path;

use clipcid_store::SHARD_KIND;

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
        let h = clipcid_store::io::read_header(path).map_err(|e| e.to_string())?;
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
