#![allow(clippy::unwrap_used)]
//! FP16 export of a real (seeded random) model: half the bytes, the same embeddings to f16
//! precision, a loadable Hugging Face folder.

use candle_core::{DType, Device, Tensor};
use clipcid_eval::export_fp16;
use clipcid_models::{ClipConfig, ClipModel};

#[test]
fn fp16_export_halves_the_file_and_keeps_embeddings() {
    let device = Device::Cpu;
    let model = ClipModel::random(&ClipConfig::preset("tiny").unwrap(), 3, &device).unwrap();
    let size = model.config().vision_config.image_size;
    let sample = Tensor::randn(0f32, 1.0, (6, 3, size, size), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fp16");
    let r = export_fp16(&model, &out, &sample).unwrap();
    assert_eq!(r.fp32_bytes, 2 * r.fp16_bytes);
    // The file is the f16 tensors plus a header.
    assert!(r.file_bytes >= r.fp16_bytes && r.file_bytes < r.fp16_bytes + 64 * 1024);
    assert_eq!(r.sample_images, 6);
    assert_eq!(
        r.compute, "f16",
        "candle runs every op of the towers in f16 on the CPU"
    );
    assert!(r.min_cosine > 0.999, "{r:?}");
    assert!(r.max_abs_diff > 0.0 && r.max_abs_diff < 0.02, "{r:?}");
    assert!(r.mean_abs_diff <= r.max_abs_diff);
    let header = clipcid_store::io::read_header(&out.join("model.safetensors")).unwrap();
    assert!(header.tensors.values().all(|t| t.dtype == "F16"));
    assert!(out.join("config.json").exists());
    // The folder loads back as a model of the same shape.
    let back = ClipModel::load_with(&out, None, &device, DType::F32).unwrap();
    assert_eq!(back.config(), model.config());
}
