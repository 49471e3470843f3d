#![allow(clippy::unwrap_used)] // a failed fixture read should panic with its message
//! clipcid against the owners' code: tiny random checkpoints of both families, written with
//! their embeddings by `scripts/reference/cross_reference.py` (transformers 5.24, open_clip
//! 3.3, Pillow 13; see `tests/fixtures/reference/reference.json` `note`), embedded here end to
//! end from image files and caption strings by `clipcid_pipeline::embed` (checkpoint
//! discovery, config reading, each family's preprocessing and tokenizer, both towers).
//!
//! The assertions that a wrong rule breaks the match (the other family's crop, the other
//! activation) keep this test from passing by accident.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clipcid_data::PreprocessFamily;
use clipcid_embed::EmbeddingShard;
use clipcid_models::{Activation, ClipTokenizer};
use clipcid_pipeline::{embed, EmbedArgs, Precision};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

#[derive(serde::Deserialize)]
struct Rows {
    image: Vec<Vec<f32>>,
    text: Vec<Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct Tokenizer {
    context_length: usize,
    strings: Vec<String>,
    ids: Vec<Vec<u32>>,
}

#[derive(serde::Deserialize)]
struct Reference {
    images: Vec<String>,
    hf: Rows,
    open_clip: Rows,
    tokenizer: Tokenizer,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// clipcid's normalised (image, text) embeddings of `captions` (a TSV beside the images),
/// rows in the reference's image order.
fn clipcid_rows(
    model: &str,
    captions: &str,
    tokenizer: Option<&str>,
    tweak: impl FnOnce(&mut EmbedArgs),
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let out = tempfile::tempdir().unwrap();
    let data = fixtures().join("images").join(captions);
    let mut args = EmbedArgs::new(fixtures().join(model), data, out.path());
    args.tokenizer = tokenizer.map(|t| fixtures().join(t));
    tweak(&mut args);
    let summary = embed(&args, &Device::Cpu).unwrap();
    let order = reference().images;
    let (mut image, mut text) = (vec![vec![]; order.len()], vec![vec![]; order.len()]);
    for path in &summary.shards {
        let shard = EmbeddingShard::read(path).unwrap();
        let img = shard.image.to_vec2::<f32>().unwrap();
        let txt = shard.text.as_ref().unwrap().to_vec2::<f32>().unwrap();
        for (k, key) in shard.keys.iter().enumerate() {
            let i = order.iter().position(|n| n == key).unwrap();
            image[i] = img[k].clone();
            text[i] = txt[k].clone();
        }
    }
    assert!(image.iter().all(|r| !r.is_empty()), "every image embedded");
    (image, text)
}

/// (max abs diff, min cosine) between row sets.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    let mut min_cos = 1f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let norm = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
        min_cos = min_cos.min(dot / (norm(x) * norm(y)));
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - q).abs());
        }
    }
    (max, min_cos)
}

fn check(row: &str, ours: &[Vec<f32>], theirs: &[Vec<f32>]) {
    let (max, cos) = compare(ours, theirs);
    println!("| {row} | {max:.2e} | {cos:.7} |");
    assert!(
        max <= 1e-4,
        "{row}: max abs diff {max:.3e} > 1e-4 (min cosine {cos})"
    );
}

#[test]
fn both_families_match_their_owners_end_to_end() {
    let r = reference();
    println!("| row | max abs diff | min cosine |\n|---|---|---|");
    let (img, txt) = clipcid_rows("hf", "captions.tsv", None, |_| {});
    check("transformers image", &img, &r.hf.image);
    check("transformers text", &txt, &r.hf.text);
    let (img, txt) = clipcid_rows(
        "hf-sharded",
        "captions.tsv",
        Some("hf/tokenizer.json"),
        |_| {},
    );
    check("transformers sharded image", &img, &r.hf.image);
    check("transformers sharded text", &txt, &r.hf.text);
    let (img, txt) = clipcid_rows("open_clip", "captions-open_clip.tsv", None, |_| {});
    check("open_clip image", &img, &r.open_clip.image);
    check("open_clip text", &txt, &r.open_clip.text);
    let (img, txt) = clipcid_rows("open_clip-bin", "captions-open_clip.tsv", None, |_| {});
    check("open_clip .bin image", &img, &r.open_clip.image);
    check("open_clip .bin text", &txt, &r.open_clip.text);
}

#[test]
fn the_wrong_crop_rule_or_activation_breaks_the_match() {
    let r = reference();
    // transformers' checkpoint preprocessed with open_clip's (round) crop: the images whose
    // crop margin is odd move by a pixel.
    let (img, _) = clipcid_rows("hf", "captions.tsv", None, |a| {
        a.model.preprocess = PreprocessFamily::OpenClip
    });
    let (max, _) = compare(&img, &r.hf.image);
    assert!(max > 1e-3, "crop rule: {max}");
    // And the open_clip one with transformers' (floor) crop.
    let (img, _) = clipcid_rows("open_clip", "captions-open_clip.tsv", None, |a| {
        a.model.preprocess = PreprocessFamily::Transformers
    });
    let (max, _) = compare(&img, &r.open_clip.image);
    assert!(max > 1e-3, "crop rule: {max}");
    // The activation open_clip defaults to (GELU) replaced by QuickGELU.
    let (img, txt) = clipcid_rows("open_clip", "captions-open_clip.tsv", None, |a| {
        a.model.activation = Some(Activation::QuickGelu)
    });
    assert!(compare(&img, &r.open_clip.image).0 > 1e-3);
    assert!(compare(&txt, &r.open_clip.text).0 > 1e-3);
    // The config omits the text tower's heads; any count but open_clip's default (8) breaks.
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("open_clip_config.json");
    let text = std::fs::read_to_string(fixtures().join("open_clip/open_clip_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["model_cfg"]["text_cfg"]["heads"] = 4.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (img, txt) = clipcid_rows("open_clip", "captions-open_clip.tsv", None, |a| {
        a.model.config = Some(cfg_path.clone())
    });
    assert!(compare(&img, &r.open_clip.image).0 < 1e-4);
    assert!(compare(&txt, &r.open_clip.text).0 > 1e-3);
}

/// `--rgb-first` (a loader that converts to RGB before the transform, as torchvision's
/// `ImageFolder`): the RGB and gray images embed exactly as before, and only the transparent
/// one (6.png, RGBA: alpha dropped before the resize instead of after, or instead of
/// composited over white) moves, in both families.
#[test]
fn converting_to_rgb_first_moves_only_the_transparent_image() {
    let r = reference();
    for (model, captions, theirs) in [
        ("open_clip", "captions-open_clip.tsv", &r.open_clip.image),
        ("hf", "captions.tsv", &r.hf.image),
    ] {
        let (img, _) = clipcid_rows(model, captions, None, |a| a.model.rgb_first = true);
        for (i, name) in r.images.iter().enumerate() {
            let (max, _) = compare(&img[i..=i], &theirs[i..=i]);
            if name == "6.png" {
                assert!(max > 1e-3, "{model} {name}: {max}");
            } else {
                assert!(max <= 1e-4, "{model} {name}: {max}");
            }
        }
    }
}

#[test]
fn tokenizer_ids_equal_open_clips() {
    let r = reference().tokenizer;
    assert!(r.strings.len() >= 30);
    let path = fixtures().join("open_clip/bpe_simple_vocab_16e6.txt.gz");
    let tok = ClipTokenizer::load(&path, r.context_length).unwrap();
    let mut wrong = vec![];
    for (s, want) in r.strings.iter().zip(&r.ids) {
        let got = tok.encode(s).unwrap();
        if &got != want {
            wrong.push(format!("{s:?}\n  clipcid   {got:?}\n  open_clip {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn half_precision_compute_stays_close_to_f32() {
    // The figures docs/guide.md quotes: f16 and bf16 compute against the owners' f32.
    let r = reference();
    println!("| family | precision | tower | max abs diff | min cosine |\n|---|---|---|---|---|");
    for (model, captions, theirs) in [
        ("hf", "captions.tsv", &r.hf),
        ("open_clip", "captions-open_clip.tsv", &r.open_clip),
    ] {
        for (precision, min_cos) in [(Precision::F16, 0.9999), (Precision::Bf16, 0.999)] {
            let (img, txt) = clipcid_rows(model, captions, None, |a| a.precision = precision);
            for (tower, ours, reference) in
                [("image", &img, &theirs.image), ("text", &txt, &theirs.text)]
            {
                let (max, cos) = compare(ours, reference);
                println!("| {model} | {precision:?} | {tower} | {max:.2e} | {cos:.6} |");
                assert!(
                    cos >= min_cos,
                    "{model} {precision:?} {tower}: cosine {cos}"
                );
            }
        }
    }
}
