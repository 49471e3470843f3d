//! Model locations: a local file or folder, or a Hugging Face Hub repository id fetched into
//! the standard Hugging Face cache with the `hf-hub` crate (feature `hub`).
//!
//! Environment, as `huggingface_hub` reads it: `HF_HUB_CACHE` (the cache folder), else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` never touches the
//! network and uses only what is cached; `HF_ENDPOINT` and `HF_TOKEN` as hf-hub reads them.

use std::path::{Path, PathBuf};

use crate::weights::checkpoint::shard_files;
use crate::weights::CHECKPOINT_FILES;
use crate::ModelError;

/// Config files of a CLIP repository, one of which must be there: `transformers`' and
/// open_clip's.
pub const HUB_CONFIG_FILES: [&str; 2] = ["config.json", "open_clip_config.json"];
/// Files fetched when present: tokenizer and preprocessing configs of either family.
pub const HUB_OPTIONAL_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
];

/// Whether `HF_HUB_OFFLINE` asks for no network (`1`, `true`, `yes`, `on`).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The Hugging Face cache folder (see the module docs).
pub fn hub_cache_dir() -> Result<PathBuf, ModelError> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Ok(p.into());
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Ok(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        .ok_or_else(|| ModelError::Hub("no cache folder: set HF_HUB_CACHE or HF_HOME".into()))
}

/// Whether `spec` reads as a Hub repository id (`owner/name`, no other slashes, not an
/// existing path).
pub fn is_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    !Path::new(spec).exists()
        && parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves a model argument to a local path: an existing file or folder as it is, or a Hub
/// repository id to its cached snapshot folder. A repository needs a config
/// ([`HUB_CONFIG_FILES`]) and a checkpoint ([`CHECKPOINT_FILES`], the first the repository
/// has; a sharded index brings its shards); [`HUB_OPTIONAL_FILES`] come along when present.
/// Unless offline, what the cache lacks is downloaded. Offline and not cached, or neither a
/// path nor a repository id, is an error that says what to do.
///
/// ```
/// # fn main() -> Result<(), clipcid_models::ModelError> {
/// // A local path is returned as it is.
/// let here = clipcid_models::resolve_model(".")?;
/// assert_eq!(here, std::path::PathBuf::from("."));
/// # Ok(()) }
/// ```
pub fn resolve_model(spec: &str) -> Result<PathBuf, ModelError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !is_repo_id(spec) {
        return Err(ModelError::file(
            path,
            "no such file or folder (and not a Hugging Face repository id `owner/name`)",
        ));
    }
    let cache = hf_hub::Cache::new(hub_cache_dir()?);
    let cached = cache.model(spec.to_string());
    if let Some(dir) = cached_snapshot(&cached)? {
        return Ok(dir);
    }
    if hub_offline() {
        return Err(ModelError::Hub(format!(
            "`{spec}` is not cached (no config and checkpoint under {}) and HF_HUB_OFFLINE is set, so nothing is downloaded: fetch it on a machine with network access (or unset HF_HUB_OFFLINE), or pass a local checkpoint path",
            cache.path().display()
        )));
    }
    download(spec, &cache)
}

/// The snapshot folder of a cached repository that holds a config and a whole checkpoint.
fn cached_snapshot(cached: &hf_hub::CacheRepo) -> Result<Option<PathBuf>, ModelError> {
    let Some(config) = HUB_CONFIG_FILES.iter().find_map(|f| cached.get(f)) else {
        return Ok(None);
    };
    for f in CHECKPOINT_FILES {
        let Some(p) = cached.get(f) else { continue };
        if f.ends_with(".index.json") {
            let shards = shard_files(&p)?;
            if !shards.iter().all(|s| cached.get(s).is_some()) {
                continue;
            }
        }
        return snapshot_dir(&config).map(Some);
    }
    Ok(None)
}

#[cfg(feature = "hub")]
fn download(spec: &str, cache: &hf_hub::Cache) -> Result<PathBuf, ModelError> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Hub(format!("cannot start the client: {e}")))?;
    let repo = api.model(spec.to_string());
    let fetch_first = |names: &[&str], what: &str| -> Result<(String, PathBuf), ModelError> {
        let mut errors = vec![];
        for f in names {
            match repo.get(f) {
                Ok(p) => return Ok((f.to_string(), p)),
                Err(e) => errors.push(format!("{f}: {e}")),
            }
        }
        Err(ModelError::Hub(format!(
            "cannot fetch {what} of `{spec}` (tried {}): is the repository id right, and is the network reachable? (set HF_HUB_OFFLINE=1 to use only the cache, or pass a local path)",
            errors.join("; ")
        )))
    };
    let (_, config) = fetch_first(&HUB_CONFIG_FILES, "a model config")?;
    let (name, checkpoint) = fetch_first(&CHECKPOINT_FILES, "a checkpoint")?;
    if name.ends_with(".index.json") {
        for shard in shard_files(&checkpoint)? {
            repo.get(&shard).map_err(|e| {
                ModelError::Hub(format!("cannot fetch shard {shard} of `{spec}`: {e}"))
            })?;
        }
    }
    for f in HUB_CONFIG_FILES.iter().chain(&HUB_OPTIONAL_FILES) {
        if let Err(e) = repo.get(f) {
            log::info!("`{spec}` has no {f}: {e}");
        }
    }
    snapshot_dir(&config)
}

#[cfg(not(feature = "hub"))]
fn download(spec: &str, _cache: &hf_hub::Cache) -> Result<PathBuf, ModelError> {
    Err(ModelError::Hub(format!(
        "`{spec}` is not cached and this build has no Hub client (enable the `hub` feature)"
    )))
}

fn snapshot_dir(file: &Path) -> Result<PathBuf, ModelError> {
    file.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ModelError::file(file, "cached file has no folder"))
}
