//! Model arguments: local files and folders, Hugging Face repository ids, and the tokenizer
//! that goes with each model.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clipcid_eval::EvalModel;
use clipcid_models::{ClipModel, ClipTokenizer};

use crate::{input_error, PipelineError};

/// Where a model's `tokenizer.json` is looked for: inside a model folder, or beside a file.
///
/// ```
/// use std::path::Path;
/// let t = clipcid_pipeline::tokenizer_beside(Path::new("runs/x/model.safetensors"));
/// assert_eq!(t, Path::new("runs/x/tokenizer.json"));
/// ```
pub fn tokenizer_beside(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("tokenizer.json")
    } else {
        model
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("tokenizer.json")
    }
}

/// A model argument as a local path: itself, or a Hugging Face repository id's cached
/// snapshot (downloaded unless `HF_HUB_OFFLINE` is set or the `hub` feature is off).
pub fn resolve_model_path(spec: &Path) -> Result<PathBuf, PipelineError> {
    let Some(s) = spec.to_str() else {
        input_error!("{}: not a UTF-8 path", spec.display());
    };
    Ok(clipcid_models::resolve_model(s)?)
}

/// Loads a model (f32) and its tokenizer (`tokenizer`, else the one beside the model), named
/// `name` in reports.
pub fn load_eval_model(
    name: &str,
    path: &Path,
    tokenizer: Option<&Path>,
    device: &Device,
) -> Result<EvalModel, PipelineError> {
    let path = &resolve_model_path(path)?;
    let model = ClipModel::load(path, device)?;
    let tok_path = tokenizer
        .map(Path::to_path_buf)
        .unwrap_or_else(|| tokenizer_beside(path));
    if !tok_path.is_file() {
        input_error!(
            "no tokenizer for {name} ({}): pass --tokenizer tokenizer.json or put one at {}",
            path.display(),
            tok_path.display()
        );
    }
    let ctx = model.config().text_config.default_context_length();
    let tokenizer = ClipTokenizer::from_file(&tok_path, ctx)?;
    Ok(EvalModel {
        name: name.to_string(),
        model,
        tokenizer,
    })
}

/// The non-empty, trimmed lines of a text file (queries, class names, words); none at all is
/// an error naming the file.
pub fn read_lines(path: &Path) -> Result<Vec<String>, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, "read", e))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        input_error!("{}: no lines", path.display());
    }
    Ok(lines)
}
