//! Cross-crate properties: a teacher checkpoint in either naming convention gives the same
//! embedding shards; a real teacher in `../shared/teacher/` loads when present.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::collections::HashMap;

use candle_core::Device;
use clipcid_data::Dataset;
use clipcid_embed::{embed_dataset, EmbedOptions, EmbeddingShard};
use clipcid_models::weights::{hf_to_open_clip, init_tensors};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
use clipcid_store::io;
use image::{Rgb, RgbImage};

#[test]
fn open_clip_and_hf_teachers_write_identical_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut tsv = String::new();
    for i in 0..6u8 {
        RgbImage::from_fn(50, 36, |x, y| Rgb([i * 40, x as u8 * 5, y as u8 * 7]))
            .save(data.join(format!("{i}.png")))
            .unwrap();
        tsv.push_str(&format!("{i}.png\tcolour number {i}\n"));
    }
    std::fs::write(data.join("captions.tsv"), tsv).unwrap();
    let ds = Dataset::open(&data).unwrap();

    let cfg = ClipConfig::preset("tiny").unwrap();
    let hf = init_tensors(&cfg, 3).unwrap();
    let oc_path = dir.path().join("open_clip_model.safetensors");
    io::write_safetensors(&oc_path, hf_to_open_clip(&hf).unwrap(), &HashMap::new()).unwrap();
    let a = ClipModel::from_tensors(&cfg, hf, &Device::Cpu, candle_core::DType::F32).unwrap();
    let b = ClipModel::load_with(
        &oc_path,
        Some(cfg.clone()),
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let tok = ClipTokenizer::byte_level(16).unwrap();
    let opts = EmbedOptions {
        batch_size: 4,
        shard_size: 4,
        ..EmbedOptions::default()
    };
    let sa = embed_dataset(&a, Some(&tok), &ds, &dir.path().join("a"), &opts).unwrap();
    let sb = embed_dataset(&b, Some(&tok), &ds, &dir.path().join("b"), &opts).unwrap();
    assert_eq!(sa.shards.len(), 2);
    for (x, y) in sa.shards.iter().zip(&sb.shards) {
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
        assert_eq!(
            EmbeddingShard::read(x).unwrap().len(),
            if x == &sa.shards[0] { 4 } else { 2 }
        );
    }
}

#[test]
fn shared_teacher_loads_when_present() {
    let Some(teacher) = clipcid_suite::shared_dir()
        .map(|d| d.join("teacher"))
        .filter(|d| d.is_dir())
    else {
        println!("skipped: ../shared/teacher/ is absent (no real pretrained CLIP on this machine)");
        return;
    };
    let model = ClipModel::load(&teacher, &Device::Cpu).unwrap();
    let s = model.config().vision_config.image_size;
    let px =
        candle_core::Tensor::zeros((1, 3, s, s), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = model.encode_image(&px).unwrap();
    assert_eq!(e.dims(), &[1, model.config().projection_dim]);
}
