//! Tensor layout on disk: the Hugging Face CLIP names and shapes a config implies, the
//! OpenCLIP <-> Hugging Face name mapping, seeded initialisation, and checkpoint loading.

pub(crate) mod checkpoint;
mod init;
mod names;
pub(crate) mod open_clip;

pub use checkpoint::{
    check_tensors, locked_text_tensors, Checkpoint, LoadOptions, CHECKPOINT_FILES,
};
pub use init::{init_tensors, write_random_bert};
pub use names::{detect_layout, hf_tensor_shapes, is_text_tensor, Layout, CONFIG_METADATA_KEY};
pub use open_clip::{hf_to_open_clip, open_clip_to_hf};
