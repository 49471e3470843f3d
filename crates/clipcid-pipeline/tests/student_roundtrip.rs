#![allow(clippy::unwrap_used)] // a failed setup step should panic with its message
//! A student exported by `clipcid export --format open-clip` loads in transformers
//! (`CLIPModel` + `CLIPProcessor.from_pretrained`) and in open_clip
//! (`create_model_and_transforms("local-dir:...")`) and gives there the embeddings clipcid
//! gives. Needs Python with torch, transformers and open_clip_torch
//! (`scripts/reference/cross_reference.py`'s environment): set `CLIPCID_REFERENCE_PYTHON` to
//! its interpreter; without one the test prints why and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use clipcid_data::PreprocessFamily;
use clipcid_embed::EmbeddingShard;
use clipcid_models::{Activation, ClipConfig, ClipModel, ClipTokenizer};
use clipcid_pipeline::{embed, export, EmbedArgs, ExportArgs, ExportFormat};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

/// The reference Python, or why there is none.
fn python() -> Result<String, String> {
    let py = std::env::var("CLIPCID_REFERENCE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import torch, transformers, open_clip"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Ok(py)
    } else {
        Err(format!(
            "`{py}` cannot import torch, transformers and open_clip (set CLIPCID_REFERENCE_PYTHON to an interpreter that can)"
        ))
    }
}

/// clipcid's normalised embeddings of the reference images and plain captions, by image name.
fn clipcid_rows(model: &Path, family: PreprocessFamily) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let out = tempfile::tempdir().unwrap();
    let mut args = EmbedArgs::new(model, fixtures().join("images/captions.tsv"), out.path());
    args.model.preprocess = family;
    let summary = embed(&args, &Device::Cpu).unwrap();
    let mut rows: Vec<(String, Vec<f32>, Vec<f32>)> = vec![];
    for path in &summary.shards {
        let s = EmbeddingShard::read(path).unwrap();
        let (img, txt) = (
            s.image.to_vec2::<f32>().unwrap(),
            s.text.unwrap().to_vec2::<f32>().unwrap(),
        );
        for (k, key) in s.keys.into_iter().enumerate() {
            rows.push((key, img[k].clone(), txt[k].clone()));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.into_iter().map(|(_, i, t)| (i, t)).unzip()
}

fn max_diff_and_min_cos(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let (mut max, mut cos) = (0f32, 1f32);
    for (x, y) in a.iter().zip(b) {
        cos = cos.min(x.iter().zip(y).map(|(p, q)| p * q).sum());
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - q).abs());
        }
    }
    (max, cos)
}

#[test]
fn exported_student_loads_in_transformers_and_open_clip() {
    let py = match python() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    // A small student on the reference tokenizer's vocabulary (514 bytes + 200 merges + 2).
    let mut cfg = ClipConfig::preset("tiny").unwrap();
    cfg.text_config.vocab_size = 714;
    cfg.text_config.eos_token_id = Some(713);
    cfg.text_config.max_position_embeddings = 16;
    cfg.vision_config.hidden_act = Activation::Gelu;
    cfg.text_config.hidden_act = Activation::Gelu;
    let run = tempfile::tempdir().unwrap();
    let student = run.path().join("student");
    ClipModel::random(&cfg, 11, &Device::Cpu)
        .unwrap()
        .save_pretrained(&student, DType::F32)
        .unwrap();
    let bpe = fixtures().join("open_clip/bpe_simple_vocab_16e6.txt.gz");
    ClipTokenizer::load(&bpe, 16)
        .unwrap()
        .save_pretrained(&student)
        .unwrap();
    let exported = run.path().join("export");
    let mut args = ExportArgs::new(&student, &exported);
    args.format = ExportFormat::OpenClip;
    export(&args, &Device::Cpu).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "bpe_simple_vocab_16e6.txt.gz",
    ] {
        assert!(exported.join(f).is_file(), "{f} missing");
    }

    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/reference/cross_reference.py");
    let captions = run.path().join("captions.txt");
    let tsv = std::fs::read_to_string(fixtures().join("images/captions.tsv")).unwrap();
    let mut lines: Vec<(String, String)> = tsv
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, c)| (k.to_string(), c.to_string()))
        .collect();
    lines.sort();
    let text: Vec<String> = lines.into_iter().map(|(_, c)| c).collect();
    std::fs::write(&captions, text.join("\n")).unwrap();
    let out = Command::new(&py)
        .arg(&script)
        .arg("student")
        .arg(&exported)
        .arg(fixtures().join("images"))
        .arg(&captions)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = |family: &str, tower: &str| -> Vec<Vec<f32>> {
        serde_json::from_value(theirs[family][tower].clone()).unwrap()
    };

    println!("| loaded by | tower | max abs diff | min cosine |\n|---|---|---|---|");
    for (family, pre) in [
        ("transformers", PreprocessFamily::Auto),
        ("open_clip", PreprocessFamily::OpenClip),
    ] {
        let (img, txt) = clipcid_rows(&exported, pre);
        for (tower, ours) in [("image", &img), ("text", &txt)] {
            let (max, cos) = max_diff_and_min_cos(ours, &rows(family, tower));
            println!("| {family} | {tower} | {max:.2e} | {cos:.7} |");
            assert!(max <= 1e-4, "{family} {tower}: {max}");
        }
        if family == "transformers" {
            // transformers 5's default image backend resizes with torchvision, which differs
            // from Pillow by a level or two on some pixels: reported, loosely bounded.
            let (max, cos) = max_diff_and_min_cos(&img, &rows(family, "image_default_backend"));
            println!("| transformers (torchvision backend) | image | {max:.2e} | {cos:.7} |");
            assert!(cos > 0.999, "{cos}");
        }
    }
}
