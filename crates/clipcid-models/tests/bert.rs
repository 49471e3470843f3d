//! The BERT text tower of locked-text (LiT) teachers: padding invariance, save/load round
//! trip, BERT special tokens in the tokenizer, and (when `scripts/fetch-data.sh` has fetched
//! it) the real all-MiniLM-L6-v2 against a plain-PyTorch reference.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clipcid_models::weights::write_random_bert;
use clipcid_models::{
    l2_normalize, locked_text_tensors, ClipConfig, ClipModel, ClipTokenizer, TextTowerKind,
};

const TINY_BERT: &str = r#"{"vocab_size": 12, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu",
    "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "model_type": "bert"}"#;

fn tiny_locked() -> ClipModel {
    let vision = ClipConfig::preset("tiny").expect("preset").vision_config;
    let cfg = ClipConfig::locked_text(vision, TINY_BERT).expect("config");
    ClipModel::random(&cfg, 7, &Device::Cpu).expect("model")
}

fn ids(rows: &[&[u32]], len: usize) -> Tensor {
    let flat: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(len))
        .collect();
    Tensor::from_vec(flat, (rows.len(), len), &Device::Cpu).expect("ids")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    clipcid_models::nn::max_abs_diff(a, b).expect("diff")
}

#[test]
fn padding_changes_neither_attention_nor_pooling() {
    let model = tiny_locked();
    assert_eq!(model.config().text_config.kind, TextTowerKind::Bert);
    let rows: [&[u32]; 2] = [&[2, 4, 6, 7, 3], &[2, 5, 3]];
    let short = model.encode_text(&ids(&rows, 5)).expect("encode");
    let long = model.encode_text(&ids(&rows, 12)).expect("encode");
    assert_eq!(short.dims(), &[2, 32]);
    assert!(
        max_diff(&short, &long) < 1e-5,
        "{}",
        max_diff(&short, &long)
    );
    // A row alone gives the same features as inside a batch with a longer one.
    let alone = model.encode_text(&ids(&rows[1..], 3)).expect("encode");
    let batched = short.narrow(0, 1, 1).expect("row");
    assert!(max_diff(&alone, &batched) < 1e-5);
    // And different texts differ.
    assert!(max_diff(&short.narrow(0, 0, 1).expect("row"), &batched) > 1e-3);
}

#[test]
fn locked_text_model_round_trips_through_a_folder() {
    let model = tiny_locked();
    let dir = tempfile::tempdir().expect("tmp");
    model.save_pretrained(dir.path(), DType::F32).expect("save");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).expect("read"))
            .expect("json");
    assert_eq!(config["model_type"], "vision-text-dual-encoder");
    assert_eq!(config["text_config"]["model_type"], "bert");
    let back = ClipModel::load(dir.path(), &Device::Cpu).expect("load");
    assert_eq!(back.config(), model.config());
    let x = ids(&[&[2, 4, 3]], 6);
    let a = model.encode_text(&x).expect("a");
    let b = back.encode_text(&x).expect("b");
    assert_eq!(max_diff(&a, &b), 0.0);
    let pixels = Tensor::ones((1, 3, 32, 32), DType::F32, &Device::Cpu).expect("px");
    let (a, b) = (
        model.encode_image(&pixels).expect("a"),
        back.encode_image(&pixels).expect("b"),
    );
    assert_eq!(max_diff(&a, &b), 0.0);
}

#[test]
fn a_half_precision_model_gives_finite_text_features_close_to_f32() {
    let model = tiny_locked();
    let tensors = model.tensors().clone();
    let half = ClipModel::from_tensors(model.config(), tensors, &Device::Cpu, DType::F16)
        .expect("f16 model");
    let x = ids(&[&[2, 4, 6, 7, 3], &[2, 5, 3]], 8);
    let full = model.encode_text(&x).expect("f32");
    let half = half
        .encode_text(&x)
        .and_then(|t| Ok(t.to_dtype(DType::F32)?))
        .expect("f16");
    let diff = max_diff(&full, &half);
    assert!(diff.is_finite() && diff < 2e-2, "f16 vs f32: {diff}");
}

#[test]
fn out_of_vocabulary_ids_are_an_error_not_a_panic() {
    let model = tiny_locked();
    let err = model.encode_text(&ids(&[&[2, 99, 3]], 4)).unwrap_err();
    assert!(err.to_string().contains("token id 99"), "{err}");
}

#[test]
fn bert_tokenizer_uses_cls_sep_and_pad() {
    let dir = tempfile::tempdir().expect("tmp");
    let words = ["a", "cat", "photo", "of", "hand", "##written"];
    write_random_bert(dir.path(), TINY_BERT, &words, 0).expect("bert");
    let path = dir.path().join("tokenizer.json");
    let tok = ClipTokenizer::from_file(&path, 10).expect("tokenizer");
    assert_eq!((tok.start_id(), tok.end_id(), tok.pad_id()), (2, 3, 0));
    assert_eq!(
        tok.encode("A handwritten cat").expect("encode"),
        vec![2, 4, 8, 9, 5, 3, 0, 0, 0, 0]
    );
    // Truncation keeps the end token.
    let tok = ClipTokenizer::from_file(&path, 4).expect("tokenizer");
    assert_eq!(
        tok.encode("a photo of a cat").expect("encode"),
        vec![2, 4, 6, 3]
    );
}

/// The real MiniLM, when `scripts/fetch-data.sh` has extracted it (or `CLIPCID_MINILM` names
/// the folder).
fn real_minilm() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CLIPCID_MINILM").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/raw/minilm")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("model.safetensors").is_file())
}

#[test]
fn real_minilm_matches_the_pytorch_reference() {
    let Some(dir) = real_minilm() else {
        eprintln!(
            "skipped: no all-MiniLM-L6-v2 folder (run scripts/fetch-data.sh or set CLIPCID_MINILM)"
        );
        return;
    };
    let vision = ClipConfig::preset("tiny").expect("preset").vision_config;
    let (cfg, tensors) = locked_text_tensors(&dir, vision, 0).expect("tensors");
    let model = ClipModel::from_tensors(&cfg, tensors, &Device::Cpu, DType::F32).expect("model");
    let tok = ClipTokenizer::from_file(&dir.join("tokenizer.json"), 9).expect("tokenizer");
    let texts = ["a photo of a cat", "The stock market fell"];
    let x = tok.encode_batch(&texts, &Device::Cpu).expect("ids");
    // BERT uncased WordPiece ids (the file's own padding to 128 is not applied).
    assert_eq!(
        x.to_vec2::<u32>().expect("rows"),
        vec![
            vec![101, 1037, 6302, 1997, 1037, 4937, 102, 0, 0],
            vec![101, 1996, 4518, 3006, 3062, 102, 0, 0, 0],
        ]
    );
    let e = l2_normalize(&model.encode_text(&x).expect("encode")).expect("norm");
    let e = e.to_vec2::<f32>().expect("rows");
    // From `python scripts/reference/minilm_reference.py data/raw/minilm` (plain PyTorch).
    let reference: [[f32; 8]; 2] = [
        [
            0.032963, 0.091185, 0.027717, 0.023629, -0.054558, -0.001317, 0.048048, 0.006095,
        ],
        [
            0.042241, -0.006159, 0.057211, 0.086065, 0.011441, 0.055524, -0.023929, 0.056586,
        ],
    ];
    for (row, want) in e.iter().zip(reference) {
        for (got, want) in row.iter().zip(want) {
            assert!((got - want).abs() < 2e-5, "{got} vs {want}");
        }
    }
    // Meaning: a cat photo is closer to a cat picture than to the stock market.
    let y = tok
        .encode_batch(&["a picture of a cat"], &Device::Cpu)
        .expect("ids");
    let cat = l2_normalize(&model.encode_text(&y).expect("encode")).expect("norm");
    let cat = cat.to_vec2::<f32>().expect("rows");
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(dot(&cat[0], &e[0]) > dot(&cat[0], &e[1]) + 0.3);
}
