//! FP16 export: the student as a Hugging Face CLIP folder in half precision, with a size
//! report and the embedding error FP16 introduces on a sample of images.

use std::path::Path;

use candle_core::{DType, Tensor};
use clipcid_models::{l2_normalize, ClipModel};
use serde::Serialize;

use crate::EvalError;

/// What an FP16 export cost and saved.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// Parameters of the model.
    pub parameters: usize,
    /// Of which in the image tower (what PicCollage ships).
    pub vision_parameters: usize,
    /// Tensor bytes in f32.
    pub fp32_bytes: u64,
    /// Tensor bytes in f16.
    pub fp16_bytes: u64,
    /// Size of the written `model.safetensors`.
    pub file_bytes: u64,
    /// Images compared.
    pub sample_images: usize,
    /// Largest absolute difference of any image-embedding value, FP16 model vs FP32.
    pub max_abs_diff: f64,
    /// Mean absolute difference of image-embedding values.
    pub mean_abs_diff: f64,
    /// Smallest cosine between an image's FP16 and FP32 embeddings.
    pub min_cosine: f64,
    /// How the FP16 model was run: `f16` (all compute in half precision) or `f32` (half
    /// weights upcast, when the device cannot compute in f16).
    pub compute: String,
}

/// Writes `model` to `out_dir` (`model.safetensors` in f16 + `config.json`), reads it back
/// and compares its image embeddings of `sample` (preprocessed pixels `[n, 3, H, W]`) with
/// `model`'s in f32.
pub fn export_fp16(
    model: &ClipModel,
    out_dir: &Path,
    sample: &Tensor,
) -> Result<ExportReport, EvalError> {
    model.save_pretrained(out_dir, DType::F16)?;
    let file = out_dir.join("model.safetensors");
    let file_bytes = std::fs::metadata(&file)
        .map_err(|e| EvalError::file(&file, e))?
        .len();
    let parameters = model.parameter_count();
    let vision_parameters: usize = model
        .tensors()
        .iter()
        .filter(|(n, _)| n.starts_with("vision_model.") || n.starts_with("visual_projection."))
        .map(|(_, t)| t.elem_count())
        .sum();
    let reference = l2_normalize(&model.encode_image(&sample.to_dtype(DType::F32)?)?)?;
    let device = model.device();
    // Half-precision compute where the device supports every op; else half weights in f32.
    let (half, compute) = match ClipModel::load_with(out_dir, None, device, DType::F16)
        .and_then(|m| m.encode_image(&sample.to_dtype(DType::F16)?))
    {
        Ok(e) => (e.to_dtype(DType::F32)?, "f16"),
        Err(e) => {
            log::warn!("f16 compute failed ({e}); comparing f16 weights run in f32");
            let m = ClipModel::load_with(out_dir, None, device, DType::F32)?;
            (m.encode_image(&sample.to_dtype(DType::F32)?)?, "f32")
        }
    };
    let half = l2_normalize(&half)?;
    let diff = (&half - &reference)?.abs()?;
    let cos = (&half * &reference)?.sum(1)?;
    let scalar = |t: Tensor| -> Result<f64, EvalError> { Ok(t.to_scalar::<f32>()? as f64) };
    let report = ExportReport {
        parameters,
        vision_parameters,
        fp32_bytes: 4 * parameters as u64,
        fp16_bytes: 2 * parameters as u64,
        file_bytes,
        sample_images: sample.dim(0)?,
        max_abs_diff: scalar(diff.flatten_all()?.max(0)?)?,
        mean_abs_diff: scalar(diff.mean_all()?)?,
        min_cosine: scalar(cos.min(0)?)?,
        compute: compute.to_string(),
    };
    if !(report.max_abs_diff.is_finite() && report.min_cosine.is_finite()) {
        return Err(EvalError::Input(format!(
            "the FP16 model in {} gives non-finite embeddings (values overflow half precision)",
            out_dir.display()
        )));
    }
    Ok(report)
}
