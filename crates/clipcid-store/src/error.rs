use std::path::PathBuf;

/// Everything that can go wrong reading or writing a clipcid file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file is unreadable, incomplete, or not what it should be.
    #[error("{}: {msg}", path.display())]
    File {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Inputs that do not fit together (no shards given, mismatched lengths).
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl StoreError {
    /// A [`StoreError::File`] naming `path`.
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
