//! ONNX export of clipcid's CLIP models: each tower as its own ONNX graph (opset 17), in f32
//! or f16, for the runtimes users deploy on (ONNX Runtime on servers, phones and the web,
//! tract, Core ML converters).
//!
//! The graphs compute what `clipcid_models` computes, node for node: the image tower maps
//! `pixel_values` (f32 `[batch, C, S, S]`, already preprocessed) to `image_embeds` (f32
//! `[batch, projection_dim]`, projected, not normalised); the text tower maps `input_ids`
//! (int64 `[batch, sequence]`, any length up to the context) to `text_embeds`, pooled at each
//! row's first end token. Inputs and outputs stay f32 in an f16 export (casts at both ends,
//! as onnxconverter-common's `keep_io_types`), so callers change nothing but the file. Names
//! follow transformers.js's layout (`onnx/vision_model.onnx`, `onnx/text_model_fp16.onnx`).
//! Weights keep their Hugging Face names; the products' weights are stored transposed
//! (`[in, out]`, `MatMul`'s right operand) and q's carry the attention scale.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::Device;
//! use clipcid_models::{ClipConfig, ClipModel};
//! use clipcid_onnx::{OnnxModel, OnnxPrecision};
//!
//! let model = ClipModel::random(&ClipConfig::preset("tiny")?, 0, &Device::Cpu)?;
//! let image = OnnxModel::image_tower(&model, OnnxPrecision::F32)?
//!     .with_metadata("image_mean", "[0.481, 0.458, 0.408]");
//! assert_eq!(image.input_names(), ["pixel_values"]);
//! assert_eq!(image.output_names(), ["image_embeds"]);
//!
//! let dir = tempfile::tempdir()?;
//! let saved = image.save(&dir.path().join("vision_model.onnx"))?;
//! assert!(saved.bytes > 0 && saved.external_data.is_none());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod error;
mod graph;
pub mod proto;
mod towers;

use std::path::{Path, PathBuf};

use clipcid_models::ClipModel;
use prost::Message;

pub use error::OnnxError;
use proto::{ModelProto, OperatorSetIdProto, StringStringEntryProto, DATA_LOCATION_EXTERNAL};

/// The ONNX operator set the graphs use (17: the first with `LayerNormalization`).
pub const OPSET: i64 = 17;

/// The ONNX IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 8;

/// Weights above this many bytes go to an external data file beside the graph: protobuf
/// cannot read a message of 2 GiB or more.
pub const EXTERNAL_DATA_THRESHOLD: u64 = 1 << 30 | 1 << 29 | 1 << 28; // 1.75 GiB

/// The element type of a graph's weights and arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnnxPrecision {
    /// Single precision, what clipcid computes in on the CPU.
    F32,
    /// Half precision weights and arithmetic (inputs and outputs stay f32), half the size:
    /// what PicCollage shipped on iPhone.
    F16,
}

impl OnnxPrecision {
    /// The file-name suffix transformers.js uses: `""` or `"_fp16"`.
    pub fn file_suffix(self) -> &'static str {
        match self {
            Self::F32 => "",
            Self::F16 => "_fp16",
        }
    }
}

/// One tower as an ONNX model, ready to save.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    proto: ModelProto,
}

impl OnnxModel {
    /// The image tower of `model` (see the crate documentation for its inputs and outputs).
    pub fn image_tower(model: &ClipModel, precision: OnnxPrecision) -> Result<Self, OnnxError> {
        Ok(Self::wrap(towers::vision_graph(model, precision)?))
    }

    /// The text tower of `model`; an error for a BERT text tower (a locked-text teacher's).
    pub fn text_tower(model: &ClipModel, precision: OnnxPrecision) -> Result<Self, OnnxError> {
        Ok(Self::wrap(towers::text_graph(model, precision)?))
    }

    fn wrap(graph: proto::GraphProto) -> Self {
        Self {
            proto: ModelProto {
                ir_version: IR_VERSION,
                opset_import: vec![OperatorSetIdProto {
                    domain: String::new(),
                    version: OPSET,
                }],
                producer_name: "clipcid".into(),
                producer_version: env!("CARGO_PKG_VERSION").into(),
                doc_string: String::new(),
                graph: Some(graph),
                metadata_props: Vec::new(),
            },
        }
    }

    /// Adds (or replaces) a `metadata_props` entry, e.g. the preprocessing constants.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        let props = &mut self.proto.metadata_props;
        match props.iter_mut().find(|e| e.key == key) {
            Some(e) => e.value = value,
            None => props.push(StringStringEntryProto { key, value }),
        }
        self
    }

    /// The `metadata_props` entries in order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        self.proto
            .metadata_props
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
    }

    fn graph(&self) -> &proto::GraphProto {
        self.proto
            .graph
            .as_ref()
            .expect("both constructors set the graph")
    }

    /// The graph's input names.
    pub fn input_names(&self) -> Vec<&str> {
        self.graph().input.iter().map(|v| v.name.as_str()).collect()
    }

    /// The graph's output names.
    pub fn output_names(&self) -> Vec<&str> {
        self.graph()
            .output
            .iter()
            .map(|v| v.name.as_str())
            .collect()
    }

    /// Number of nodes in the graph.
    pub fn node_count(&self) -> usize {
        self.graph().node.len()
    }

    /// Bytes of all weights and constants.
    pub fn weight_bytes(&self) -> u64 {
        self.graph()
            .initializer
            .iter()
            .map(|t| t.raw_data.len() as u64)
            .sum()
    }

    /// The model as one protobuf message (weights inside); an error when the weights reach
    /// [`EXTERNAL_DATA_THRESHOLD`] (use [`OnnxModel::save`], which moves them out).
    pub fn to_bytes(&self) -> Result<Vec<u8>, OnnxError> {
        if self.weight_bytes() >= EXTERNAL_DATA_THRESHOLD {
            return Err(OnnxError::Unsupported(format!(
                "{} bytes of weights do not fit one protobuf message; save with external data",
                self.weight_bytes()
            )));
        }
        Ok(self.proto.encode_to_vec())
    }

    /// Writes the model to `path` (through a temporary file and a rename), with its weights
    /// inside, or beside it in `<path>.data` when they reach [`EXTERNAL_DATA_THRESHOLD`].
    pub fn save(&self, path: &Path) -> Result<SavedOnnx, OnnxError> {
        self.save_as(path, self.weight_bytes() >= EXTERNAL_DATA_THRESHOLD)
    }

    /// Writes the model to `path` with every weight of 1 KiB or more in `<path>.data` (ONNX's
    /// external data: location, offset and length in each tensor), as ONNX Runtime and tract
    /// read it for models of 2 GiB and more.
    pub fn save_with_external_data(&self, path: &Path) -> Result<SavedOnnx, OnnxError> {
        self.save_as(path, true)
    }

    fn save_as(&self, path: &Path, external: bool) -> Result<SavedOnnx, OnnxError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| OnnxError::Model(format!("{}: not a file name", path.display())))?;
        let mut proto = self.proto.clone();
        let data = external.then(|| {
            let data_name = format!("{name}.data");
            let bytes = move_to_external(&mut proto, &data_name);
            (path.with_file_name(data_name), bytes)
        });
        let graph = proto.encode_to_vec();
        // One unit, the data before the graph that names it: a failure (a full disk, a folder
        // where either goes) leaves both paths as they were.
        let mut files: Vec<(&Path, &[u8])> = vec![];
        if let Some((data_path, bytes)) = &data {
            files.push((data_path, bytes));
        }
        files.push((path, &graph));
        clipcid_store::io::write_atomic_files(&files)?;
        let (external_data, external_bytes) = match data {
            Some((p, b)) => (Some(p), b.len() as u64),
            None => (None, 0),
        };
        Ok(SavedOnnx {
            path: path.to_path_buf(),
            bytes: graph.len() as u64,
            external_data,
            external_bytes,
        })
    }
}

/// Moves every initializer of 1 KiB or more out of `proto` into the bytes of an external
/// data file (to be written as `data_name` beside the graph), and returns those bytes. Each
/// tensor's bytes leave `proto` as they are copied, so `proto` and the data together hold
/// the weights once.
fn move_to_external(proto: &mut ModelProto, data_name: &str) -> Vec<u8> {
    // Sized once: growing by doubling would hold up to twice the weights while it copies.
    let capacity: usize = proto
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .filter(|t| t.raw_data.len() >= 1024)
        .map(|t| t.raw_data.len() + 63)
        .sum();
    let mut out = Vec::with_capacity(capacity);
    for t in proto
        .graph
        .iter_mut()
        .flat_map(|g| g.initializer.iter_mut())
    {
        if t.raw_data.len() < 1024 {
            continue;
        }
        // 64-byte alignment, so a runtime that maps the file can use the tensors in place.
        out.resize(out.len().next_multiple_of(64), 0);
        let offset = out.len();
        let raw = std::mem::take(&mut t.raw_data);
        out.extend_from_slice(&raw);
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        t.external_data = vec![
            entry("location", data_name.to_string()),
            entry("offset", offset.to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DATA_LOCATION_EXTERNAL);
    }
    out
}

/// A written ONNX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedOnnx {
    /// The `.onnx` file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// The external data file, when the weights went there.
    pub external_data: Option<PathBuf>,
    /// Its size (0 without one).
    pub external_bytes: u64,
}

impl SavedOnnx {
    /// Bytes on disk, graph and external data together.
    pub fn total_bytes(&self) -> u64 {
        self.bytes + self.external_bytes
    }
}

/// What [`export_towers`] wrote.
#[derive(Debug, Clone)]
pub struct OnnxExport {
    /// `vision_model.onnx` (or `vision_model_fp16.onnx`).
    pub image: SavedOnnx,
    /// `text_model.onnx` (or `_fp16`), absent when the text tower is not exportable.
    pub text: Option<SavedOnnx>,
    /// Why the text tower was left out, when it was.
    pub text_skipped: Option<String>,
}

/// Writes both towers of `model` to `dir` as `vision_model{suffix}.onnx` and
/// `text_model{suffix}.onnx` (suffix from [`OnnxPrecision::file_suffix`]), each carrying
/// `metadata`. A BERT text tower is left out (and said so in [`OnnxExport::text_skipped`]).
pub fn export_towers(
    model: &ClipModel,
    dir: &Path,
    precision: OnnxPrecision,
    metadata: &[(String, String)],
) -> Result<OnnxExport, OnnxError> {
    std::fs::create_dir_all(dir).map_err(|e| OnnxError::io(dir, e))?;
    let with_meta = |mut m: OnnxModel| {
        for (k, v) in metadata {
            m = m.with_metadata(k.clone(), v.clone());
        }
        m
    };
    let suffix = precision.file_suffix();
    let image = with_meta(OnnxModel::image_tower(model, precision)?)
        .save(&dir.join(format!("vision_model{suffix}.onnx")))?;
    let (text, text_skipped) = match OnnxModel::text_tower(model, precision) {
        Ok(m) => (
            Some(with_meta(m).save(&dir.join(format!("text_model{suffix}.onnx")))?),
            None,
        ),
        Err(OnnxError::Unsupported(why)) => (None, Some(why)),
        Err(e) => return Err(e),
    };
    Ok(OnnxExport {
        image,
        text,
        text_skipped,
    })
}
