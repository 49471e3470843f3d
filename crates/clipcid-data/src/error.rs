use std::path::PathBuf;

/// Errors that stop reading a dataset (a bad sample is not one: it is skipped and counted).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A dataset file is malformed (captions file, tar shard).
    #[error("{}: {msg}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Building the batch tensor failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    /// A [`DataError::Io`] naming `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    /// A [`DataError::Format`] naming `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::Format {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
