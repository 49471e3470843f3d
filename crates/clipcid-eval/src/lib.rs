//! Evaluation of CLIP students against their teacher, the way the papers measure them:
//!
//! - **zero-shot classification** ([`ZeroShotClassifier`]): class names x prompt templates
//!   ([`Templates`]: CLIP's 80 ImageNet templates, the per-dataset lists, or a file), text
//!   embeddings averaged per class; top-1/top-5 accuracy and mean per-class recall
//!   ([`Classification`]), as CLIP_benchmark reports;
//! - **linear probe** ([`linear_probe`]): multinomial logistic regression on frozen image
//!   features, L-BFGS, the L2 strength swept on a validation split as in CLIP's paper;
//! - **retrieval** ([`Retrieval`]): image->text and text->image recall@K;
//! - **teacher agreement** ([`Agreement`], PicCollage): mAP@N of the student's top-N images
//!   per text query against the teacher's, and the teacher-student embedding cosine;
//! - **textness bias** ([`TextnessDirection`]): a 2-class probe on images with and without
//!   rendered text ([`TextRenderer`]), its direction added to query embeddings;
//! - **FP16 export** ([`export_fp16`]) with a size and error report;
//! - the report ([`evaluate`]): all of the above for several models side by side, as
//!   markdown with plots ([`plot_per_class_recall`], [`plot_confusion`]) and JSON.
//!
//! Features are plain row-major `f32` matrices of unit rows ([`Features`]), so every score
//! can be computed from embeddings made anywhere.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use clipcid_eval::{Features, ZeroShotClassifier};
//! // Three classes along the axes, one template each; images near their class's axis.
//! let text = Features::normalized(vec![1., 0., 0., 0., 1., 0., 0., 0., 1.], 3)?;
//! let zs = ZeroShotClassifier::from_text_features(&text, 1)?;
//! let images = Features::normalized(vec![0.9, 0.1, 0.0, 0.1, 0.2, 0.9], 3)?;
//! let result = zs.classify(&images, &[0, 2])?;
//! assert_eq!((result.top1, result.mean_per_class_recall), (1.0, 1.0));
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod export;
mod features;
mod linear_probe;
mod metrics;
mod plot;
mod report;
mod templates;
mod textness;
mod zero_shot;

use std::path::Path;

pub use export::{export_fp16, ExportReport};
pub use features::{
    encode_dataset, encode_decoded_images, encode_images, encode_texts, EncodedImages, Features,
};
pub use linear_probe::{
    clip_benchmark_sweep, clip_benchmark_weight_decay, clip_paper_sweep, linear_probe, objective,
    AdamWProbe, LabelledFeatures, LogisticRegression, ProbeMethod, ProbeOptions, ProbeResult,
    CLIP_BENCHMARK_GRID, GRADIENT_TOLERANCE,
};
pub use metrics::{average_precision_at_n, top_n, Agreement, Classification, Retrieval};
pub use plot::{plot_confusion, plot_per_class_recall};
pub use report::{
    evaluate, AgreementPlan, ClipBenchmarkRecord, EvalModel, EvalPlan, EvalResults, ZeroShotPlan,
};
pub use templates::{
    clip_benchmark_class_names, clip_benchmark_datasets, Templates, CIFAR_TEMPLATES,
    IMAGENET_TEMPLATES, MNIST_TEMPLATES,
};
pub use textness::{
    first_shared_picture, load_images, load_named_images, plot_textness_grid, textness_study,
    textness_sweep, ScaleRow, TextRenderer, TextnessDirection, TextnessOptions, TextnessReport,
    DEFAULT_WORDS,
};
pub use zero_shot::ZeroShotClassifier;

/// Errors of the evaluation stage.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Bad input (shapes, labels, options).
    #[error("{0}")]
    Input(String),
    /// A file could not be used.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The textness study's real text image `text_image` has the pixels of image `image` of
    /// the images without text (positions in the two lists; [`first_shared_picture`]).
    #[error("real text image {text_image} has the pixels of image {image} of the images without text: one picture cannot be both")]
    SharedPicture {
        /// Position among the images without text.
        image: usize,
        /// Position among the real text images.
        text_image: usize,
    },
    /// A model failed to load or run.
    #[error(transparent)]
    Model(#[from] clipcid_models::ModelError),
    /// Reading or writing a safetensors file failed.
    #[error(transparent)]
    Store(#[from] clipcid_store::StoreError),
    /// A dataset failed to read.
    #[error(transparent)]
    Data(#[from] clipcid_data::DataError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl EvalError {
    /// An error about `path`.
    pub fn file(path: &Path, message: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}
