//! Image-text data for clipcid: readers for a folder of images with a captions TSV/CSV,
//! WebDataset tar shards (as img2dataset writes them) and labelled image folders; CLIP
//! preprocessing as `transformers` or open_clip computes it (Pillow-exact resampling, each
//! family's crop rule), images decoded as Pillow decodes them ([`decode_image`]: JPEG by
//! libjpeg-turbo, Netpbm by Pillow's rules, TIFF in Pillow's modes);
//! parallel (rayon) decoding into candle batches. A corrupt or unreadable
//! sample is skipped, logged with its key and counted, never fatal.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use clipcid_data::{BatchIter, Dataset, Preprocess};
//!
//! // A labelled folder: root/class_name/*.png
//! let root = tempfile::tempdir()?;
//! for class in ["cat", "dog"] {
//!     std::fs::create_dir(root.path().join(class))?;
//!     image::RgbImage::new(48, 32).save(root.path().join(class).join("0.png"))?;
//! }
//! let ds = Dataset::open(root.path())?;
//! assert_eq!(ds.classes(), &["cat".to_string(), "dog".to_string()]);
//! let batches = BatchIter::new(ds.samples()?, Preprocess::clip(224), 32, candle_core::Device::Cpu);
//! for batch in batches {
//!     let batch = batch?;
//!     assert_eq!(batch.pixels.dims(), &[2, 3, 224, 224]);
//!     assert_eq!(batch.labels, vec![Some(0), Some(1)]);
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod batch;
mod clip_benchmark;
mod dataset;
mod decode;
mod error;
mod index;
mod lines;
mod pnm;
mod preprocess;
mod resample;
mod spec;
mod tif;

pub use batch::{decode_batch, Batch, BatchIter, Skipped};
pub use clip_benchmark::ClipBenchmarkSet;
pub use dataset::{
    image_files_in, Dataset, Sample, SampleStream, Source, IMAGE_EXTENSIONS,
    IMAGE_FOLDER_EXTENSIONS,
};
pub use decode::{
    decode_image, decode_image_with_mode, DecodedImage, PillowMode, IMAGE_DECODER,
    MAX_DECODED_BYTES,
};
pub use error::DataError;
pub use index::SampleIndex;
pub use lines::read_lines;
pub use preprocess::{
    AlphaRule, CropRule, Preprocess, PreprocessFamily, Resize, CLIP_MEAN, CLIP_STD,
};
pub use resample::{
    pil_resize, pil_resize_rgba, pil_resize_rgba_window, pil_resize_window, Resample, Window,
};
pub use spec::{expand_sources, is_pattern, MAX_EXPANSION, SOURCE_SEPARATOR};
