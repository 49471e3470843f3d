//! What produced a set of teacher embeddings, carried from the shards into every file made
//! from them, so that a keep list or cluster file is never used with other embeddings.
//!
//! `clipcid embed` records its provenance in each shard (metadata `provenance`: JSON with
//! the teacher's and the dataset's SHA-256, tokenizer, preprocessing, precision, shard
//! size). The keep file of `clipcid balance` and the cluster file of `clipcid cluster`
//! copy it under the metadata key [`EMBEDDINGS_META`]; `cluster` and `distill` compare it
//! with the shards they read ([`check_same_embeddings`]).

use std::path::Path;

use crate::StoreError;

/// Metadata key under which keep and cluster files record the provenance of the embeddings
/// they were made from.
pub const EMBEDDINGS_META: &str = "embeddings";

/// The top-level fields in which two provenance records (JSON objects) differ, sorted. Text
/// that is not a JSON object counts as one field, `provenance`, when it differs.
///
/// ```
/// let a = r#"{"teacher":"aa","data":"dd","dtype":"f16"}"#;
/// let b = r#"{"teacher":"bb","data":"dd","dtype":"f32"}"#;
/// assert_eq!(clipcid_store::differing_fields(a, b), vec!["dtype", "teacher"]);
/// assert!(clipcid_store::differing_fields(a, a).is_empty());
/// ```
pub fn differing_fields(a: &str, b: &str) -> Vec<String> {
    let parse = |s: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s);
    match (parse(a), parse(b)) {
        (Ok(a), Ok(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(k.as_str()) != b.get(k.as_str()))
                .cloned()
                .collect()
        }
        _ if a == b => vec![],
        _ => vec!["provenance".to_string()],
    }
}

/// Checks that `file` (a keep or cluster file, described by `what`) was made from the
/// embeddings being read now. `recorded` is the provenance the file records
/// ([`EMBEDDINGS_META`]), `current` the one the shards record.
///
/// Refused, naming the differing fields: both recorded and different; or the file records
/// one and the shards none (the shards were replaced by another producer's). Accepted: the
/// same provenance, or a file that records none (written by another tool or an older
/// clipcid), whose rows are then only checked by id.
///
/// ```
/// use std::path::Path;
/// use clipcid_store::check_same_embeddings;
/// let p = Path::new("keep.safetensors");
/// let a = r#"{"teacher":"aa","data":"dd"}"#;
/// let b = r#"{"teacher":"bb","data":"dd"}"#;
/// assert!(check_same_embeddings(p, "keep file", Some(a), Some(a)).is_ok());
/// assert!(check_same_embeddings(p, "keep file", None, Some(a)).is_ok());
/// let e = check_same_embeddings(p, "keep file", Some(a), Some(b)).unwrap_err();
/// assert!(e.to_string().contains("different teacher"), "{e}");
/// ```
pub fn check_same_embeddings(
    file: &Path,
    what: &str,
    recorded: Option<&str>,
    current: Option<&str>,
) -> Result<(), StoreError> {
    match (recorded, current) {
        (Some(then), Some(now)) => {
            let fields = differing_fields(then, now);
            if fields.is_empty() {
                Ok(())
            } else {
                Err(StoreError::file(
                    file,
                    format!(
                        "this {what} was made from other teacher embeddings than the ones given (different {}); remake it from these embeddings",
                        fields.join(", ")
                    ),
                ))
            }
        }
        (Some(_), None) => Err(StoreError::file(
            file,
            format!(
                "this {what} was made from embeddings written by `clipcid embed`, but the embeddings given record no provenance (another producer's?); remake it from these embeddings"
            ),
        )),
        (None, _) => Ok(()),
    }
}
