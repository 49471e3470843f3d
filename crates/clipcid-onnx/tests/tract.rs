//! Every export run through tract (a Rust ONNX runtime) and compared with clipcid's own
//! forward pass: f32 within 1e-4, f16 within a cosine of 0.999, external data identical.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use clipcid_models::{Activation, ClipConfig, ClipModel, ClipTokenizer};
use clipcid_onnx::{export_towers, OnnxError, OnnxModel, OnnxPrecision};
use tract_onnx::prelude::*;

type Res = Result<(), Box<dyn std::error::Error>>;

/// Rows of embeddings.
type Rows = Vec<Vec<f32>>;

/// Runs the ONNX file at `path` on one input of the given shape and values.
fn run_tract<T: Datum + Copy>(path: &Path, shape: &[usize], values: Vec<T>) -> TractResult<Rows> {
    let plan = tract_onnx::onnx()
        .model_for_path(path)?
        .with_input_fact(0, InferenceFact::dt_shape(T::datum_type(), shape))?
        .into_optimized()?
        .into_runnable()?;
    let input = tract_ndarray::ArrayD::from_shape_vec(shape, values)?.into_tensor();
    let out = plan.run(tvec!(input.into()))?;
    let view = out[0].to_plain_array_view::<f32>()?;
    let (rows, cols) = (view.shape()[0], view.shape()[1]);
    let flat: Vec<f32> = view.iter().copied().collect();
    Ok((0..rows)
        .map(|r| flat[r * cols..(r + 1) * cols].to_vec())
        .collect())
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let n = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
            dot / (n(x) * n(y))
        })
        .fold(1.0, f32::min)
}

/// The tiny preset with `act` in both towers and 4 heads (so head splitting is exercised).
fn model(act: Activation, seed: u64) -> Result<ClipModel, Box<dyn std::error::Error>> {
    let mut cfg = ClipConfig::preset("tiny")?;
    cfg.vision_config.hidden_act = act;
    cfg.text_config.hidden_act = act;
    cfg.vision_config.num_attention_heads = 4;
    cfg.text_config.num_attention_heads = 4;
    Ok(ClipModel::random(&cfg, seed, &Device::Cpu)?)
}

fn pixels(model: &ClipModel, n: usize) -> candle_core::Result<Tensor> {
    let s = model.config().vision_config.image_size;
    Tensor::randn(0f32, 1.0, (n, 3, s, s), &Device::Cpu)
}

fn image_check(
    model: &ClipModel,
    precision: OnnxPrecision,
    dir: &Path,
) -> Result<(Rows, Rows), Box<dyn std::error::Error>> {
    let px = pixels(model, 3)?;
    let want = model.encode_image(&px)?.to_vec2::<f32>()?;
    let path = dir.join("vision.onnx");
    OnnxModel::image_tower(model, precision)?.save(&path)?;
    let got = run_tract(&path, px.dims(), px.flatten_all()?.to_vec1::<f32>()?)?;
    Ok((got, want))
}

#[test]
fn image_tower_matches_clipcid_in_f32_for_both_activations() -> Res {
    let dir = tempfile::tempdir()?;
    for (act, seed) in [(Activation::QuickGelu, 1), (Activation::Gelu, 2)] {
        let (got, want) = image_check(&model(act, seed)?, OnnxPrecision::F32, dir.path())?;
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-4, "{act:?}: max |onnx - clipcid| = {d}");
    }
    Ok(())
}

#[test]
fn image_tower_in_f16_stays_close() -> Res {
    let dir = tempfile::tempdir()?;
    let (got, want) = image_check(
        &model(Activation::QuickGelu, 3)?,
        OnnxPrecision::F16,
        dir.path(),
    )?;
    let c = min_cosine(&got, &want);
    assert!(c >= 0.999, "f16 export's cosine to clipcid's f32: {c}");
    // And it is really half precision: not equal to the f32 result.
    assert!(max_abs_diff(&got, &want) > 0.0);
    Ok(())
}

/// Token ids `[B, T]` of `texts` as i64, cut to `len` columns.
fn ids(model: &ClipModel, texts: &[&str], len: usize) -> candle_core::Result<Tensor> {
    let ctx = model.config().text_config.max_position_embeddings;
    let tok = ClipTokenizer::byte_level(ctx).map_err(candle_core::Error::wrap)?;
    let ids = tok
        .encode_batch(texts, &Device::Cpu)
        .map_err(candle_core::Error::wrap)?;
    ids.narrow(1, 0, len)?.to_dtype(DType::I64)
}

#[test]
fn text_tower_matches_clipcid_at_full_and_short_lengths() -> Res {
    let dir = tempfile::tempdir()?;
    for (act, seed) in [(Activation::QuickGelu, 4), (Activation::Gelu, 5)] {
        let m = model(act, seed)?;
        let path = dir.path().join("text.onnx");
        OnnxModel::text_tower(&m, OnnxPrecision::F32)?.save(&path)?;
        let ctx = m.config().text_config.max_position_embeddings;
        // Full context, then 16 columns (every caption's end token still inside), then 5
        // (no end token: pooled at the highest id, as clipcid does).
        for len in [ctx, 16, 5] {
            let ids = ids(&m, &["a red square", "two blue circles on grass", "x"], len)?;
            let want = m.encode_text(&ids)?.to_vec2::<f32>()?;
            let got = run_tract(&path, ids.dims(), ids.flatten_all()?.to_vec1::<i64>()?)?;
            let d = max_abs_diff(&got, &want);
            assert!(
                d <= 1e-4,
                "{act:?}, {len} tokens: max |onnx - clipcid| = {d}"
            );
        }
    }
    Ok(())
}

#[test]
fn text_tower_in_f16_stays_close() -> Res {
    let dir = tempfile::tempdir()?;
    let m = model(Activation::Gelu, 6)?;
    let path = dir.path().join("text_fp16.onnx");
    OnnxModel::text_tower(&m, OnnxPrecision::F16)?.save(&path)?;
    let ctx = m.config().text_config.max_position_embeddings;
    let ids = ids(&m, &["a photo of a dog", "a cat"], ctx)?;
    let want = m.encode_text(&ids)?.to_vec2::<f32>()?;
    let got = run_tract(&path, ids.dims(), ids.flatten_all()?.to_vec1::<i64>()?)?;
    let c = min_cosine(&got, &want);
    assert!(c >= 0.999, "f16 text export's cosine to clipcid's f32: {c}");
    Ok(())
}

#[test]
fn external_data_gives_the_same_results_as_weights_inside() -> Res {
    let dir = tempfile::tempdir()?;
    let m = model(Activation::QuickGelu, 7)?;
    let inside = dir.path().join("inside.onnx");
    let outside = dir.path().join("outside.onnx");
    let tower = OnnxModel::image_tower(&m, OnnxPrecision::F32)?;
    let a = tower.save(&inside)?;
    let b = tower.save_with_external_data(&outside)?;
    assert!(a.external_data.is_none());
    let data = b.external_data.clone().ok_or("no external data file")?;
    assert_eq!(data, dir.path().join("outside.onnx.data"));
    assert!(
        b.bytes < a.bytes / 4,
        "weights left in the graph: {} vs {}",
        b.bytes,
        a.bytes
    );
    assert!(b.external_bytes >= tower.weight_bytes() / 2);
    let px = pixels(&m, 2)?;
    let v = px.flatten_all()?.to_vec1::<f32>()?;
    let x = run_tract(&inside, px.dims(), v.clone())?;
    let y = run_tract(&outside, px.dims(), v)?;
    assert_eq!(x, y);
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    // A graph that cannot land (a folder holds its name) leaves no data file without it,
    // and no earlier data file is replaced.
    std::fs::write(dir.path().join("blocked.onnx.data"), b"earlier")?;
    let blocked = dir.path().join("blocked.onnx");
    std::fs::create_dir(&blocked)?;
    let err = tower
        .save_with_external_data(&blocked)
        .err()
        .ok_or("saved over a folder")?;
    assert!(err.to_string().contains("blocked.onnx"), "{err}");
    let mut left: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .filter(|n: &std::io::Result<String>| !n.as_ref().is_ok_and(|n| names.contains(n)))
        .collect::<std::io::Result<_>>()?;
    left.sort();
    assert_eq!(left, ["blocked.onnx", "blocked.onnx.data"]);
    assert_eq!(
        std::fs::read(dir.path().join("blocked.onnx.data"))?,
        b"earlier"
    );
    Ok(())
}

#[test]
fn export_writes_both_towers_with_metadata() -> Res {
    let dir = tempfile::tempdir()?;
    let m = model(Activation::QuickGelu, 8)?;
    let meta = vec![("image_size".to_string(), "32".to_string())];
    let out = export_towers(&m, dir.path(), OnnxPrecision::F16, &meta)?;
    assert_eq!(out.image.path, dir.path().join("vision_model_fp16.onnx"));
    let text = out.text.ok_or("text tower missing")?;
    assert_eq!(text.path, dir.path().join("text_model_fp16.onnx"));
    assert!(out.text_skipped.is_none());
    // The metadata is in the file: tract reads the properties back.
    let proto = tract_onnx::onnx().proto_model_for_path(&out.image.path)?;
    let props: Vec<(String, String)> = proto
        .metadata_props
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect();
    assert_eq!(props, meta);
    assert_eq!(proto.opset_import[0].version, 17);
    // f16 halves the weights: the file is about half the f32 one.
    let f32_bytes = OnnxModel::image_tower(&m, OnnxPrecision::F32)?.weight_bytes();
    let f16_bytes = OnnxModel::image_tower(&m, OnnxPrecision::F16)?.weight_bytes();
    assert!(
        f16_bytes * 2 <= f32_bytes + 4096,
        "{f16_bytes} vs {f32_bytes}"
    );
    Ok(())
}

#[test]
fn weights_beyond_half_precision_are_an_error_naming_the_tensor() -> Res {
    let m = model(Activation::QuickGelu, 9)?;
    let mut tensors = m.tensors().clone();
    let name = "vision_model.encoder.layers.1.mlp.fc2.weight";
    let t = tensors.get(name).ok_or("no such tensor")?;
    let big = (t.ones_like()? * 1e6)?;
    tensors.insert(name.to_string(), big);
    let m = ClipModel::from_tensors(m.config(), tensors, &Device::Cpu, DType::F32)?;
    match OnnxModel::image_tower(&m, OnnxPrecision::F16) {
        Err(OnnxError::Model(msg)) => assert!(msg.contains(name), "{msg}"),
        other => panic!("expected an error naming {name}, got {other:?}"),
    }
    // f32 takes it.
    assert!(OnnxModel::image_tower(&m, OnnxPrecision::F32).is_ok());
    Ok(())
}
