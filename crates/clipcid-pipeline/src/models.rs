//! Model arguments: local files and folders, Hugging Face repository ids, and the tokenizer
//! that goes with each model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clipcid_data::{Preprocess, PreprocessFamily};
use clipcid_eval::EvalModel;
use clipcid_models::{
    Activation, Checkpoint, ClipConfig, ClipModel, ClipTokenizer, Layout, LoadOptions,
};

use crate::{input_error, PipelineError};

/// How a model argument is read (`--config`, `--activation`, `--preprocess`, `--rgb-first`).
///
/// ```
/// let opts = clipcid_pipeline::ModelOptions::default();
/// assert_eq!(opts.preprocess, clipcid_data::PreprocessFamily::Auto);
/// ```
#[derive(Debug, Clone, PartialEq, Default, clap::Args)]
pub struct ModelOptions {
    /// Model config overriding the one found with the checkpoint: a Hugging Face
    /// `config.json`, or an open_clip config (`open_clip_config.json` or a bare model config;
    /// omitted fields take open_clip's defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// MLP activation of the towers, `gelu` or `quick_gelu`, overriding the config's. Required
    /// for a checkpoint that comes with no config (its tensors cannot tell).
    #[arg(long)]
    pub activation: Option<Activation>,
    /// Image preprocessing: `auto` (the model's own: `preprocessor_config.json` means
    /// transformers', open_clip files or tensor names mean open_clip's), `transformers` (floor
    /// crop) or `open-clip` (torchvision's round crop).
    #[arg(long, default_value = "auto")]
    pub preprocess: PreprocessFamily,
    /// Preprocess each image as a loader that converts it to RGB first hands it over
    /// (torchvision's `ImageFolder`, which CLIP_benchmark's ImageNet and folder datasets and
    /// open_clip's `--imagenet-val` use; webdataset's `"pilrgb"`, as in open_clip's
    /// WebDataset training loader): transparency dropped, palette, 1-bit and CMYK images
    /// resized as RGB. Without it, images are preprocessed as `Image.open` gives them
    /// (open_clip's examples and CSV loader, CLIP_benchmark's WebDataset sets). RGB and gray
    /// photos are the same either way. Not recorded in the model files written.
    #[arg(long)]
    pub rgb_first: bool,
}

/// A model read from a model argument, with the preprocessing its family uses.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// Local path it was read from (a Hub id resolved to its cached snapshot).
    pub path: PathBuf,
    /// The model.
    pub model: ClipModel,
    /// Its image preprocessing.
    pub preprocess: Preprocess,
    /// Where the config and the preprocessing came from, for reports.
    pub source: String,
}

/// Reads a model argument (file, folder or Hub id) with `opts`, computing in `dtype`.
pub fn load_model(
    spec: &Path,
    opts: &ModelOptions,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel, PipelineError> {
    let config = match &opts.config {
        Some(p) => Some(ClipConfig::from_json_file(p)?),
        None => None,
    };
    let path = resolve_model_path(spec)?;
    let ckpt = Checkpoint::read_with(
        &path,
        &LoadOptions {
            config,
            activation: opts.activation,
        },
    )?;
    let open_clip = ckpt.layout == Layout::OpenClip;
    let config_source = ckpt.config_source.clone();
    let model = ClipModel::from_checkpoint(ckpt, device, dtype)?;
    let size = model.config().vision_config.image_size;
    let (mut preprocess, mut from) =
        Preprocess::for_model(&path, size, opts.preprocess, open_clip)?;
    if opts.rgb_first {
        preprocess = preprocess.with_rgb_first_loader();
        from.push_str(", images converted to RGB first");
    }
    Ok(LoadedModel {
        path,
        model,
        preprocess,
        source: format!("config from {config_source}; preprocessing: {from}"),
    })
}

/// Where a model's `tokenizer.json` is looked for: inside a model folder, or beside a file.
///
/// ```
/// use std::path::Path;
/// let t = clipcid_pipeline::tokenizer_beside(Path::new("runs/x/model.safetensors"));
/// assert_eq!(t, Path::new("runs/x/tokenizer.json"));
/// ```
pub fn tokenizer_beside(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("tokenizer.json")
    } else {
        model
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("tokenizer.json")
    }
}

/// Refuses writing model files (`model.safetensors`, `config.json`, the tokenizer) into
/// `out` when `out` is the folder the model at `model_path` (a folder, or a file in one) is
/// read from: they would replace the model's own (an export its weights with the f16 copy,
/// a PicCollage student the teacher it was made from).
pub(crate) fn check_not_model_folder(out: &Path, model_path: &Path) -> Result<(), PipelineError> {
    let folder = if model_path.is_dir() {
        model_path
    } else {
        model_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    clipcid_store::io::check_not_an_input(out, [folder]).map_err(|_| {
        PipelineError::Input(format!(
            "{}: the model is read from this folder; writing model files into it would replace its own: choose another folder",
            out.display()
        ))
    })
}

/// A model argument as a local path: itself, or a Hugging Face repository id's cached
/// snapshot (downloaded unless `HF_HUB_OFFLINE` is set or the `hub` feature is off).
pub fn resolve_model_path(spec: &Path) -> Result<PathBuf, PipelineError> {
    let Some(s) = spec.to_str() else {
        input_error!("{}: not a UTF-8 path", spec.display());
    };
    Ok(clipcid_models::resolve_model(s)?)
}

/// Loads a model read with `opts`, computing in `dtype` (features are normalised and
/// compared in f32 whatever it is), and its tokenizer (`tokenizer`, else the one beside the
/// model), named `name` in reports. `tokenizer_flag` is the command-line flag that gives
/// this model's tokenizer, for the error when it has none.
pub fn load_eval_model(
    name: &str,
    path: &Path,
    opts: &ModelOptions,
    tokenizer: Option<&Path>,
    tokenizer_flag: &str,
    device: &Device,
    dtype: DType,
) -> Result<EvalModel, PipelineError> {
    let loaded = load_model(path, opts, device, dtype)?;
    let path = &loaded.path;
    let Some(tok_path) = tokenizer
        .map(Path::to_path_buf)
        .or_else(|| ClipTokenizer::find_beside(path))
    else {
        input_error!(
            "no tokenizer for {name} ({}): pass {tokenizer_flag} tokenizer.json or put one at {}",
            path.display(),
            tokenizer_beside(path).display()
        );
    };
    let ctx = loaded.model.config().text_config.default_context_length();
    let tokenizer = ClipTokenizer::load(&tok_path, ctx)?;
    Ok(EvalModel {
        name: name.to_string(),
        model: loaded.model,
        tokenizer,
        preprocess: loaded.preprocess,
    })
}

/// The non-empty, trimmed lines of a text file (queries, class names, words); none at all is
/// an error naming the file. The same reader as [`clipcid_data::read_lines`].
pub fn read_lines(path: &Path) -> Result<Vec<String>, PipelineError> {
    Ok(clipcid_data::read_lines(path)?)
}
