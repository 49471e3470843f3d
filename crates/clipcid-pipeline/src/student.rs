//! Student shapes derived from a teacher.

use std::path::Path;

use candle_core::{DType, Device};
use clipcid_models::{ClipConfig, ClipModel, TextTowerKind, VisionConfig};

use crate::PipelineError;

/// Halves a transformer's width (and MLP width) and depth, keeping its head count where the
/// new width still divides by it (else the largest divisor below it).
fn halve(hidden: &mut usize, mlp: &mut usize, layers: &mut usize, heads: &mut usize) {
    *hidden = (*hidden / 2).max(1);
    *mlp = (*mlp / 2).max(1);
    *layers = (*layers / 2).max(1);
    *heads = (1..=(*heads).max(1))
        .rev()
        .find(|h| hidden.is_multiple_of(*h))
        .unwrap_or(1);
}

/// PicCollage's student recipe for any teacher: the image tower at half the width and half
/// the layers (ViT-B/32's 768 x 12 becomes 384 x 6, heads kept), same patch and resolution,
/// projecting into the teacher's embedding width so the two can be compared. A CLIP text
/// tower is halved the same way (same vocabulary and context, so the teacher's tokenizer
/// serves the student); a BERT text tower (locked-text teacher) is replaced by the `tiny`
/// preset's CLIP text tower, whose byte-level tokenizer `clipcid tokenizer` writes.
///
/// ```
/// let teacher = clipcid_models::ClipConfig::preset("vit-b-32")?;
/// let student = clipcid_pipeline::half_size_student(&teacher)?;
/// let v = &student.vision_config;
/// assert_eq!((v.hidden_size, v.num_hidden_layers, v.num_attention_heads), (384, 6, 12));
/// assert_eq!(student.projection_dim, teacher.projection_dim);
/// # Ok::<(), clipcid_pipeline::PipelineError>(())
/// ```
pub fn half_size_student(teacher: &ClipConfig) -> Result<ClipConfig, PipelineError> {
    let mut c = teacher.clone();
    let v = &mut c.vision_config;
    halve(
        &mut v.hidden_size,
        &mut v.intermediate_size,
        &mut v.num_hidden_layers,
        &mut v.num_attention_heads,
    );
    if c.text_config.kind == TextTowerKind::Clip {
        let t = &mut c.text_config;
        halve(
            &mut t.hidden_size,
            &mut t.intermediate_size,
            &mut t.num_hidden_layers,
            &mut t.num_attention_heads,
        );
    } else {
        c.text_config = ClipConfig::preset("tiny")?.text_config;
    }
    c.validate()?;
    Ok(c)
}

/// Loads the teacher (file, folder, or a Hub id already resolved with
/// [`crate::resolve_model_path`]), derives its [`half_size_student`] and writes it as a
/// Hugging Face `config.json` to `path` (what a run config's `student.model` names); returns
/// the student config.
pub fn write_half_size_student(teacher: &Path, path: &Path) -> Result<ClipConfig, PipelineError> {
    let config = if teacher.is_dir() {
        teacher.join("config.json")
    } else {
        teacher.to_path_buf()
    };
    clipcid_store::io::check_not_an_input(path, [teacher, config.as_path()])?;
    let teacher = ClipModel::load(teacher, &Device::Cpu)?;
    let student = half_size_student(teacher.config())?;
    student.save_json(path)?;
    Ok(student)
}

/// PicCollage's student of `teacher`, ready for `mode = "piccollage"`: a freshly initialised
/// image tower of shape `vision` (seeded; PicCollage's own is
/// `half_size_student(teacher.config())?.vision_config`), projecting into the teacher's
/// embedding width, with the teacher's text tower, text projection and logit scale copied
/// unchanged. PicCollage trains only the image tower and searches with the teacher's text
/// embeddings, so the student needs the teacher's text side (and its tokenizer) as it is.
///
/// ```
/// use candle_core::Device;
/// use clipcid_models::{ClipConfig, ClipModel};
/// let teacher = ClipModel::random(&ClipConfig::preset("tiny")?, 1, &Device::Cpu)?;
/// let vision = clipcid_pipeline::half_size_student(teacher.config())?.vision_config;
/// let student = clipcid_pipeline::image_tower_student(&teacher, &vision, 7)?;
/// assert_eq!(student.config().vision_config.hidden_size, 16);
/// let name = "text_projection.weight";
/// let same = |m: &ClipModel| m.tensors()[name].flatten_all()?.to_vec1::<f32>();
/// assert_eq!(same(&student)?, same(&teacher)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn image_tower_student(
    teacher: &ClipModel,
    vision: &VisionConfig,
    seed: u64,
) -> Result<ClipModel, PipelineError> {
    let mut cfg = teacher.config().clone();
    cfg.vision_config = vision.clone();
    let mut tensors = clipcid_models::weights::init_tensors(&cfg, seed)?;
    // What PicCollage keeps from the teacher: the text side and the shared logit scale.
    for (name, t) in teacher.tensors() {
        if clipcid_models::weights::is_text_tensor(name) || name == "logit_scale" {
            tensors.insert(
                name.clone(),
                t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            );
        }
    }
    Ok(ClipModel::from_tensors(
        &cfg,
        tensors,
        &Device::Cpu,
        DType::F32,
    )?)
}

/// Loads the teacher, builds its [`image_tower_student`] at half the image tower's width
/// and depth with `seed`, and writes it to the folder `out` in the Hugging Face layout
/// (`config.json`, `model.safetensors`, and the teacher's tokenizer as `tokenizer.json`
/// when one is beside it): what a PicCollage run's `student.model` (`out/config.json`) and `student.init`
/// (`out/model.safetensors`) name. `clipcid init-model --image-tower-of TEACHER`.
pub fn write_image_tower_student(
    teacher: &Path,
    seed: u64,
    out: &Path,
) -> Result<ClipModel, PipelineError> {
    crate::models::check_not_model_folder(out, teacher)?;
    let model = ClipModel::load(teacher, &Device::Cpu)?;
    let vision = half_size_student(model.config())?.vision_config;
    let student = image_tower_student(&model, &vision, seed)?;
    let tokenizer = match clipcid_models::ClipTokenizer::find_beside(teacher) {
        Some(tok) => {
            let context = model.config().text_config.default_context_length();
            Some(clipcid_models::ClipTokenizer::load(&tok, context)?)
        }
        None => None,
    };
    // The weights and the tokenizer are moved into `out` together.
    clipcid_store::io::write_folder_replacing(out, "model", |dir| {
        student.save_pretrained(dir, DType::F32)?;
        if let Some(tok) = &tokenizer {
            tok.save(&dir.join("tokenizer.json"))?;
        }
        Ok::<_, PipelineError>(())
    })?;
    Ok(student)
}
