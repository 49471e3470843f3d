#![allow(clippy::unwrap_used)]
//! Hub repository ids resolve through the standard Hugging Face cache layout; offline and
//! not cached is a clear error. (No network: HF_HUB_OFFLINE is set.)

use std::path::Path;

use candle_core::{DType, Device};
use clipcid_models::{is_repo_id, resolve_model, ClipConfig, ClipModel};

/// Writes `owner/name` at revision `rev` into a cache folder the way hf-hub lays it out.
fn fake_cached_repo(cache: &Path, repo: &str, rev: &str) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), rev).unwrap();
    let snap = folder.join("snapshots").join(rev);
    let model = ClipModel::random(&ClipConfig::preset("tiny").unwrap(), 5, &Device::Cpu).unwrap();
    model.save_pretrained(&snap, DType::F32).unwrap();
}

#[test]
fn repo_ids_resolve_from_the_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    fake_cached_repo(&cache, "someone/tiny-clip", "0123abcd");
    // One test function owns the process environment (tests run in threads).
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let path = resolve_model("someone/tiny-clip").unwrap();
    assert_eq!(
        path,
        cache.join("models--someone--tiny-clip/snapshots/0123abcd")
    );
    let model = ClipModel::load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.config(), &ClipConfig::preset("tiny").unwrap());

    let e = resolve_model("someone/not-cached").unwrap_err().to_string();
    assert!(
        e.starts_with("Hugging Face Hub: `someone/not-cached` is not cached")
            && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    // A cached index whose shards are not all cached is not a cached model.
    let sharded = cache.join("models--someone--sharded");
    std::fs::create_dir_all(sharded.join("refs")).unwrap();
    std::fs::write(sharded.join("refs/main"), "r1").unwrap();
    let snap = sharded.join("snapshots/r1");
    std::fs::create_dir_all(&snap).unwrap();
    ClipConfig::preset("tiny")
        .unwrap()
        .save_json(&snap.join("config.json"))
        .unwrap();
    std::fs::write(
        snap.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(snap.join("model-00001-of-00002.safetensors"), b"x").unwrap();
    let e = resolve_model("someone/sharded").unwrap_err().to_string();
    assert!(e.contains("is not cached"), "{e}");
    std::fs::write(snap.join("model-00002-of-00002.safetensors"), b"x").unwrap();
    assert_eq!(resolve_model("someone/sharded").unwrap(), snap);
    let e = resolve_model("no/such/path.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such file or folder"), "{e}");
    // A local path wins over the repo-id reading.
    assert_eq!(
        resolve_model(dir.path().to_str().unwrap()).unwrap(),
        dir.path()
    );
    assert!(is_repo_id("openai/clip-vit-base-patch32"));
    assert!(!is_repo_id("a/b/c") && !is_repo_id("../x") && !is_repo_id("model.safetensors"));
}
