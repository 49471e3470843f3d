//! Model locations: a local file or folder, or a Hugging Face Hub repository id fetched into
//! the standard Hugging Face cache with the `hf-hub` crate (feature `hub`).
//!
//! Environment, as `huggingface_hub` reads it: `HF_HUB_CACHE` (the cache folder), else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` never touches the
//! network and uses only what is cached; `HF_ENDPOINT` and `HF_TOKEN` as hf-hub reads them.

use std::path::{Path, PathBuf};

use crate::ModelError;

/// Files a CLIP model repository must hold (Hugging Face layout).
pub const HUB_FILES: [&str; 2] = ["config.json", "model.safetensors"];
/// Files fetched when present.
pub const HUB_OPTIONAL_FILES: [&str; 1] = ["tokenizer.json"];

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
        .ok_or_else(|| {
            ModelError::Config("no Hugging Face cache: set HF_HUB_CACHE or HF_HOME".into())
        })
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
/// repository id to its cached snapshot folder (downloading [`HUB_FILES`] and, when present,
/// [`HUB_OPTIONAL_FILES`] unless offline). Offline and not cached, or neither a path nor a
/// repository id, is an error that says what to do.
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
    let from_cache: Option<Vec<PathBuf>> = HUB_FILES.iter().map(|f| cached.get(f)).collect();
    if let Some(files) = from_cache {
        return snapshot_dir(&files[0]);
    }
    if hub_offline() {
        return Err(ModelError::Config(format!(
            "`{spec}` is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set: download it on a machine with network access (or unset HF_HUB_OFFLINE), or pass a local checkpoint path",
            cache.path().display()
        )));
    }
    download(spec, &cache)
}

#[cfg(feature = "hub")]
fn download(spec: &str, cache: &hf_hub::Cache) -> Result<PathBuf, ModelError> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Config(format!("Hugging Face Hub client: {e}")))?;
    let repo = api.model(spec.to_string());
    let mut first = None;
    for f in HUB_FILES {
        let p = repo.get(f).map_err(|e| {
            ModelError::Config(format!(
                "cannot fetch {f} of `{spec}` from the Hugging Face Hub: {e} (offline? set HF_HUB_OFFLINE=1 to use only the cache, or pass a local path)"
            ))
        })?;
        first.get_or_insert(p);
    }
    for f in HUB_OPTIONAL_FILES {
        if let Err(e) = repo.get(f) {
            log::info!("`{spec}` has no {f}: {e}");
        }
    }
    snapshot_dir(&first.ok_or_else(|| ModelError::Config("no files".into()))?)
}

#[cfg(not(feature = "hub"))]
fn download(spec: &str, _cache: &hf_hub::Cache) -> Result<PathBuf, ModelError> {
    Err(ModelError::Config(format!(
        "`{spec}` is not cached and this build has no Hub client (enable the `hub` feature)"
    )))
}

fn snapshot_dir(file: &Path) -> Result<PathBuf, ModelError> {
    file.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ModelError::file(file, "cached file has no folder"))
}
