//! Locked-text (LiT) teachers: the text tower stays bit-identical, the image tower learns,
//! the folder is reused for the same options and rebuilt for others.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use clipcid_models::{ClipConfig, ClipModel, TextTowerKind};
use clipcid_train::{build_locked_text_teacher, LockedTextOptions};

const BERT: &str = r#"{"vocab_size": 24, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu",
    "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "model_type": "bert"}"#;

const WORDS: [&str; 8] = [
    "red", "green", "blue", "yellow", "a", "square", "of", "colour",
];

fn write_bert(dir: &Path) {
    clipcid_models::weights::write_random_bert(dir, BERT, &WORDS, 11).unwrap();
}

/// Solid-colour images captioned with their colour.
fn write_images(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let colours = [
        [220u8, 30, 30],
        [30, 170, 60],
        [40, 60, 220],
        [235, 210, 40],
    ];
    let mut tsv = String::new();
    for i in 0..n {
        let c = i % 4;
        let shade = (i / 4 % 5) as u8 * 6;
        let rgb = colours[c].map(|v| v.saturating_sub(shade));
        image::RgbImage::from_pixel(32, 32, image::Rgb(rgb))
            .save(dir.join(format!("{i}.png")))
            .unwrap();
        tsv.push_str(&format!("{i}.png\ta square of colour {}\n", WORDS[c]));
    }
    std::fs::write(dir.join("captions.tsv"), tsv).unwrap();
}

fn text_tensors(m: &ClipModel) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<_> = m
        .tensors()
        .iter()
        .filter(|(n, _)| n.starts_with("text_"))
        .map(|(n, t)| {
            (
                n.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A BERT text tower and `images` captioned images in `d`, and options for a tiny image
/// tower trained against them.
fn tiny_teacher_options(d: &Path, images: usize) -> LockedTextOptions {
    write_bert(&d.join("bert"));
    write_images(&d.join("data"), images);
    let mut opts = LockedTextOptions::new(&d.join("bert"), &d.join("data"));
    opts.vision = ClipConfig::preset("tiny").unwrap().vision_config;
    opts
}

#[test]
fn locked_text_teacher_trains_only_the_image_tower_and_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut opts = tiny_teacher_options(d, 64);
    opts.epochs = 6;
    opts.batch_size = 16;
    opts.lr = 3e-3;
    opts.warmup_steps = 4;
    opts.context_length = 12;
    let out = d.join("teacher");
    let built = build_locked_text_teacher(&opts, &out, &Device::Cpu).unwrap();
    assert!(!built.reused);
    let run = built.run.unwrap();
    assert_eq!(run.steps, 6 * 64 / 16);

    let teacher = ClipModel::load(&out, &Device::Cpu).unwrap();
    assert_eq!(teacher.config().text_config.kind, TextTowerKind::Bert);
    let init = ClipModel::load(&out.join("run/init"), &Device::Cpu).unwrap();
    // The text tower and its identity projection are bit-identical to the pretrained ones.
    assert_eq!(text_tensors(&teacher), text_tensors(&init));
    let eye = Tensor::eye(32, DType::F32, &Device::Cpu).unwrap();
    let proj = &teacher.tensors()["text_projection.weight"];
    assert_eq!(
        proj.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        eye.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // The image tower moved.
    let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
    let diff =
        clipcid_models::nn::max_abs_diff(&teacher.tensors()[name], &init.tensors()[name]).unwrap();
    assert!(diff > 1e-4, "image tower unchanged ({diff})");
    // It learned something: the contrastive loss fell.
    let metrics = clipcid_train::read_metrics(&out.join("run/metrics.jsonl")).unwrap();
    let (first, last) = (metrics[0].loss, metrics[metrics.len() - 1].loss);
    assert!(last < first - 0.2, "loss {first:.3} -> {last:.3}");
    let md = std::fs::read_to_string(out.join("TEACHER.md")).unwrap();
    assert!(md.contains("not OpenAI CLIP"), "{md}");
    assert!(out.join("tokenizer.json").is_file() && out.join("run/lit.toml").is_file());

    // Same options: reused, nothing trained. Other options: built again.
    let again = build_locked_text_teacher(&opts, &out, &Device::Cpu).unwrap();
    assert!(again.reused && again.run.is_none());
    opts.epochs = 1;
    let rebuilt = build_locked_text_teacher(&opts, &out, &Device::Cpu).unwrap();
    assert!(!rebuilt.reused);
    // A fresh run in the used folder keeps only its own metrics.
    let metrics = clipcid_train::read_metrics(&out.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.len(), 64 / 16);
    assert!(
        build_locked_text_teacher(&opts, &out, &Device::Cpu)
            .unwrap()
            .reused
    );
    // Same options, same paths, other inputs: built again (the stale teacher was reused).
    let captions = d.join("data/captions.tsv");
    let tsv = std::fs::read_to_string(&captions).unwrap();
    std::fs::write(&captions, tsv.replace("square", "patch")).unwrap();
    assert!(
        !build_locked_text_teacher(&opts, &out, &Device::Cpu)
            .unwrap()
            .reused
    );
    assert!(
        build_locked_text_teacher(&opts, &out, &Device::Cpu)
            .unwrap()
            .reused
    );
    clipcid_models::weights::write_random_bert(&d.join("bert"), BERT, &WORDS, 12).unwrap();
    assert!(
        !build_locked_text_teacher(&opts, &out, &Device::Cpu)
            .unwrap()
            .reused
    );
}

#[test]
fn a_text_tower_folder_without_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_bert(&d.join("bert"));
    std::fs::remove_file(d.join("bert/tokenizer.json")).unwrap();
    write_images(&d.join("data"), 8);
    let opts = LockedTextOptions::new(&d.join("bert"), &d.join("data"));
    let err = build_locked_text_teacher(&opts, &d.join("t"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tokenizer.json"), "{err}");
}

/// The text tower's own folder as the output: the teacher's weights replaced the tower's.
#[test]
fn the_text_towers_folder_is_refused_as_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_bert(&d.join("bert"));
    write_images(&d.join("data"), 8);
    let before = std::fs::read(d.join("bert/model.safetensors")).unwrap();
    let opts = LockedTextOptions::new(&d.join("bert"), &d.join("data"));
    let err = build_locked_text_teacher(&opts, &d.join("bert/."), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the text tower is read from this folder"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(d.join("bert/model.safetensors")).unwrap(),
        before
    );
}

/// A rebuild that fails part way leaves no record: the earlier build's `teacher.json`
/// stayed beside the failed build's weights, and asking for the earlier options again
/// "reused" weights trained with other options.
#[test]
fn a_failed_rebuild_is_not_reused_as_the_earlier_build() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut opts = tiny_teacher_options(d, 16);
    opts.epochs = 1;
    opts.batch_size = 8;
    opts.warmup_steps = 1;
    opts.context_length = 12;
    let out = d.join("teacher");
    let first = build_locked_text_teacher(&opts, &out, &Device::Cpu).unwrap();
    assert!(!first.reused);
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();

    // Options that cannot be trained are refused before anything is written.
    let mut bad = opts.clone();
    bad.batch_size = 0;
    let e = build_locked_text_teacher(&bad, &out, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch size (0)"), "{e}");
    assert!(out.join("teacher.json").is_file());

    // Another seed, failing after its weights are written (TEACHER.md cannot be replaced:
    // a folder stands in its place).
    let mut other = opts.clone();
    other.seed = 5;
    std::fs::remove_file(out.join("TEACHER.md")).unwrap();
    std::fs::create_dir_all(out.join("TEACHER.md/in-the-way")).unwrap();
    assert!(build_locked_text_teacher(&other, &out, &Device::Cpu).is_err());
    assert_ne!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!out.join("teacher.json").exists());
    std::fs::remove_dir_all(out.join("TEACHER.md")).unwrap();
    // The first options are built again, not reused with the other seed's weights.
    let again = build_locked_text_teacher(&opts, &out, &Device::Cpu).unwrap();
    assert!(!again.reused);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
}
