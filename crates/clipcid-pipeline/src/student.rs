//! Student shapes derived from a teacher.

use std::path::Path;

use candle_core::Device;
use clipcid_models::{ClipConfig, ClipModel, TextTowerKind};

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
    let teacher = ClipModel::load(teacher, &Device::Cpu)?;
    let student = half_size_student(teacher.config())?;
    student.save_json(path)?;
    Ok(student)
}
