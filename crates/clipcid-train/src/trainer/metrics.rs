//! Per-step metrics: `metrics.jsonl`, one JSON object per optimiser step.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// What one optimiser step measured (one line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser steps done, this one included.
    pub step: u64,
    /// Epoch of this step (from 0).
    pub epoch: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Weighted total loss (mean over micro-batches).
    pub loss: f64,
    /// Each enabled term, unweighted, by name (`clip`, `cluster`, `cluster_cls`, `cluster_kl`,
    /// `instance`, `piccollage`).
    pub terms: std::collections::BTreeMap<String, f64>,
    /// Mean cosine similarity of student and teacher image embeddings in the batch (when
    /// the run has teacher embeddings of the student's width).
    pub teacher_cosine: Option<f64>,
    /// Global gradient norm before clipping (`inf` or `NaN` on an f16 step that overflowed,
    /// written to JSON as the string `"inf"` / `"NaN"`).
    #[serde(with = "float_or_name")]
    pub grad_norm: f64,
    /// Samples in the step (after dropping unreadable images).
    pub samples: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// The loss scale the step's backward pass used (f16 runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// The step's gradients overflowed f16 and the optimiser did not step (f16 runs only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// JSON has no infinities: finite numbers as numbers, the rest as `"inf"`, `"-inf"`, `"NaN"`.
mod float_or_name {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_str(&v.to_string())
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(f64),
        Name(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Either::deserialize(d)? {
            Either::Number(v) => Ok(v),
            Either::Name(n) => n
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("`{n}` is not a number"))),
        }
    }
}

pub(super) fn append_metrics(path: &Path, m: &StepMetrics) -> Result<(), TrainError> {
    let mut line = serde_json::to_string(m).map_err(|e| TrainError::Config(e.to_string()))?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, "cannot open", e))?;
    // One write of the whole line, newline included.
    f.write_all(line.as_bytes())
        .map_err(|e| TrainError::io(path, "cannot write", e))
}

/// Reads a `metrics.jsonl` (empty when the file does not exist); a bad line is an error
/// naming the file and line. A last line cut short (no newline, not JSON: the run stopped,
/// or the disk filled, while appending it) is left out with a warning, so a run that
/// failed there can still resume: that step came after its newest checkpoint, whose steps
/// are the only ones a resume keeps.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>, TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(TrainError::io(path, "cannot read", e)),
    };
    let last = text.lines().count();
    let cut = !text.ends_with('\n');
    let mut rows = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(m) => rows.push(m),
            Err(_) if cut && i + 1 == last => log::warn!(
                "{}: line {} is cut short (the run stopped while writing it); left out",
                path.display(),
                i + 1
            ),
            Err(e) => {
                return Err(TrainError::Input(format!(
                    "{}: line {}: {e}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(rows)
}

pub(super) fn write_metrics(path: &Path, rows: &[StepMetrics]) -> Result<(), TrainError> {
    let mut out = String::new();
    for m in rows {
        out.push_str(&serde_json::to_string(m).map_err(|e| TrainError::Config(e.to_string()))?);
        out.push('\n');
    }
    clipcid_store::io::write_atomic(path, out.as_bytes())?;
    Ok(())
}
