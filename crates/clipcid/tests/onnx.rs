//! `clipcid export --format onnx` end to end: the written graphs, run in tract on the
//! inputs of `onnx/check.safetensors`, give the outputs clipcid wrote beside them.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::path::Path;

use clipcid_store::io::load_tensors;
use tract_onnx::prelude::*;

mod common;

use common::{clipcid, s};

/// Runs `graph` on `input` (a candle tensor) in tract; the first output as f32 rows.
fn run(graph: &Path, input: &candle_core::Tensor) -> Vec<Vec<f32>> {
    let shape = input.dims().to_vec();
    let tensor = match input.dtype() {
        candle_core::DType::I64 => {
            let v = input.flatten_all().unwrap().to_vec1::<i64>().unwrap();
            tract_ndarray::ArrayD::from_shape_vec(shape.clone(), v)
                .unwrap()
                .into_tensor()
        }
        _ => {
            let v = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            tract_ndarray::ArrayD::from_shape_vec(shape.clone(), v)
                .unwrap()
                .into_tensor()
        }
    };
    let plan = tract_onnx::onnx()
        .model_for_path(graph)
        .unwrap()
        .with_input_fact(0, InferenceFact::dt_shape(tensor.datum_type(), &shape))
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let out = plan.run(tvec!(tensor.into())).unwrap();
    let view = out[0].to_plain_array_view::<f32>().unwrap();
    view.outer_iter()
        .map(|r| r.iter().copied().collect())
        .collect()
}

fn compare(got: &[Vec<f32>], want: &candle_core::Tensor) -> (f32, f32) {
    let want = want.to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    let mut max_diff = 0f32;
    let mut min_cos = 1f32;
    for (g, w) in got.iter().zip(&want) {
        let dot: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        min_cos = min_cos.min(dot / (norm(g) * norm(w)));
        for (a, b) in g.iter().zip(w) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    (max_diff, min_cos)
}

#[test]
fn onnx_export_reproduces_clipcid_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model/student.safetensors");
    std::fs::create_dir_all(d.join("model")).unwrap();
    let (ok, text) = clipcid(&["init-model", "--preset", "tiny", "--out", s(&model)]);
    assert!(ok, "{text}");
    clipcid_models::ClipTokenizer::byte_level(24)
        .unwrap()
        .save_pretrained(&d.join("model"))
        .unwrap();

    for (fp16, suffix) in [(false, ""), (true, "_fp16")] {
        let out = d.join(format!("export{suffix}"));
        let mut args = vec![
            "export",
            "--model",
            s(&model),
            "--out",
            s(&out),
            "--format",
            "onnx",
            "--samples",
            "3",
        ];
        if fp16 {
            args.push("--fp16");
        }
        let (ok, text) = clipcid(&args);
        assert!(ok, "{text}");
        assert!(
            text.contains("ONNX (opset 17") && text.contains("onnx-check.py"),
            "{text}"
        );
        // The Hugging Face folder is still there beside the graphs.
        assert!(out.join("model.safetensors").exists() && out.join("tokenizer.json").exists());
        let check = load_tensors(&out.join("onnx/check.safetensors")).unwrap();
        assert_eq!(check["pixel_values"].dims()[0], 3);
        assert_eq!(check["input_ids"].dims()[0], 4);
        for (graph, input, output) in [
            ("vision_model", "pixel_values", "image_embeds"),
            ("text_model", "input_ids", "text_embeds"),
        ] {
            let path = out.join(format!("onnx/{graph}{suffix}.onnx"));
            let got = run(&path, &check[input]);
            let (diff, cos) = compare(&got, &check[output]);
            if fp16 {
                assert!(cos >= 0.999, "{graph}{suffix}: cosine {cos}");
            } else {
                assert!(diff <= 1e-4, "{graph}: max |tract - clipcid| = {diff}");
            }
        }
    }

    // --fp16 belongs to --format onnx.
    let (ok, text) = clipcid(&[
        "export",
        "--model",
        s(&model),
        "--out",
        s(&d.join("x")),
        "--fp16",
    ]);
    assert!(
        !ok && text.contains("--fp16 applies to --format onnx"),
        "{text}"
    );
}
