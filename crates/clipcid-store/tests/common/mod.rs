//! Set-up shared by the store's test files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use clipcid_store::io::write_safetensors;

/// Writes `tensors` (name, value) to `path` as a safetensors file with no metadata.
pub fn write_tensors<'a>(path: &Path, tensors: impl IntoIterator<Item = (&'a str, Tensor)>) {
    let tensors = tensors.into_iter().map(|(n, t)| (n.to_string(), t));
    write_safetensors(path, tensors, &HashMap::new()).unwrap();
}
