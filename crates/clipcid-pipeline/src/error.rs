use std::path::PathBuf;

/// Everything that can stop a pipeline stage: the stage crates' own errors, unreadable
/// files, and inputs that do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Options or inputs that do not fit together (what is wrong, and what to pass instead).
    #[error("{0}")]
    Input(String),
    /// A file or folder could not be read or written.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// `read`, `write`, `create`...
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file format error.
    #[error(transparent)]
    Store(#[from] clipcid_store::StoreError),
    /// Reading a dataset failed.
    #[error(transparent)]
    Data(#[from] clipcid_data::DataError),
    /// Loading or saving a model or tokenizer failed.
    #[error(transparent)]
    Model(#[from] clipcid_models::ModelError),
    /// The embed stage failed.
    #[error(transparent)]
    Embed(#[from] clipcid_embed::EmbedError),
    /// The balance stage failed.
    #[error(transparent)]
    Dedup(#[from] clipcid_dedup::DedupError),
    /// The cluster stage failed.
    #[error(transparent)]
    Cluster(#[from] clipcid_cluster::ClusterError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] clipcid_train::TrainError),
    /// Evaluation, textness or export failed.
    #[error(transparent)]
    Eval(#[from] clipcid_eval::EvalError),
    /// The ONNX export failed.
    #[error(transparent)]
    Onnx(#[from] clipcid_onnx::OnnxError),
    /// A loss could not be computed (the device parity check).
    #[error(transparent)]
    Loss(#[from] clipcid_loss::LossError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl PipelineError {
    /// A [`PipelineError::Io`] naming `path`.
    pub fn io(path: impl Into<PathBuf>, what: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            what,
            source,
        }
    }
}

/// `Err(PipelineError::Input(format!(...)))`.
macro_rules! input_error {
    ($($arg:tt)*) => {
        return Err($crate::PipelineError::Input(format!($($arg)*)))
    };
}
pub(crate) use input_error;
