use std::path::PathBuf;

/// Everything that can go wrong building, loading or saving a model or tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor the model needs is not in the checkpoint.
    #[error("{}: missing tensor `{name}` (expected shape {expected:?})", path.display())]
    MissingTensor {
        /// Checkpoint file.
        path: PathBuf,
        /// Hugging Face name of the tensor.
        name: String,
        /// Shape the config asks for.
        expected: Vec<usize>,
    },
    /// A tensor has a different shape than the config implies.
    #[error("{}: tensor `{name}` has shape {found:?} but the model config expects {expected:?}", path.display())]
    ShapeMismatch {
        /// Checkpoint file.
        path: PathBuf,
        /// Hugging Face name of the tensor.
        name: String,
        /// Shape the config asks for.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A checkpoint or config file is unreadable or not what it should be.
    #[error("{}: {msg}", path.display())]
    File {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Inconsistent model shape.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A Hugging Face Hub repository could not be resolved to local files (not cached while
    /// offline, no network, no such repository or file).
    #[error("Hugging Face Hub: {0}")]
    Hub(String),
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<clipcid_store::StoreError> for ModelError {
    fn from(e: clipcid_store::StoreError) -> Self {
        match e {
            clipcid_store::StoreError::File { path, msg } => Self::File { path, msg },
            clipcid_store::StoreError::Invalid(msg) => Self::Config(msg),
            clipcid_store::StoreError::Candle(e) => Self::Candle(e),
        }
    }
}

impl ModelError {
    pub(crate) fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
