//! Errors of the ONNX export.

use std::path::{Path, PathBuf};

/// What can go wrong while building or writing an ONNX graph.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The model cannot be expressed (a missing tensor, a value f16 cannot hold).
    #[error("ONNX export: {0}")]
    Model(String),
    /// A part of the model ONNX export does not cover.
    #[error("ONNX export: {0}")]
    Unsupported(String),
    /// A tensor operation failed while reading the model's weights.
    #[error("ONNX export: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Writing the graph or its external data failed (a full disk, a folder in the way).
    #[error(transparent)]
    Write(#[from] clipcid_store::StoreError),
    /// Writing or reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl OnnxError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
