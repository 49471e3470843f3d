//! Model-level properties: round trips, OpenCLIP equivalence, error messages, gradients.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use clipcid_models::weights::{hf_to_open_clip, init_tensors};
use clipcid_models::{
    Activation, ClipConfig, ClipModel, ClipTokenizer, Layout, LoadOptions, ModelError,
};
use clipcid_store::io;

fn tiny() -> ClipConfig {
    ClipConfig::preset("tiny").expect("tiny preset")
}

/// Deterministic pseudo-random pixels in roughly the normalised range.
fn pixels(b: usize, seed: u64) -> Tensor {
    let n = b * 3 * 32 * 32;
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (b, 3, 32, 32), &Device::Cpu).expect("pixels")
}

fn ids(cfg: &ClipConfig) -> Tensor {
    let tok = ClipTokenizer::byte_level(cfg.text_config.max_position_embeddings).expect("tok");
    tok.encode_batch(&["a red square", "two blue circles", "x"], &Device::Cpu)
        .expect("ids")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    clipcid_models::nn::max_abs_diff(a, b).expect("diff")
}

#[test]
fn save_then_load_gives_identical_outputs() {
    let cfg = tiny();
    let dev = Device::Cpu;
    let model = ClipModel::random(&cfg, 7, &dev).expect("model");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("m.safetensors");
    model.save(&path, DType::F32).expect("save");
    let back = ClipModel::load(&path, &dev).expect("load");
    assert_eq!(back.config(), &cfg, "config travels in the metadata");
    let (img, txt) = (pixels(2, 1), ids(&cfg));
    assert_eq!(
        max_abs_diff(
            &model.encode_image(&img).unwrap(),
            &back.encode_image(&img).unwrap()
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &model.encode_text(&txt).unwrap(),
            &back.encode_text(&txt).unwrap()
        ),
        0.0
    );
    // No temp file left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn a_config_path_that_holds_none_is_refused_naming_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let model = ClipModel::random(&tiny(), 0, &Device::Cpu).unwrap();
    // Weights with no config in their metadata (another tool's checkpoint).
    let bare = dir.path().join("bare.safetensors");
    let tensors: Vec<(String, Tensor)> = model
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    io::write_safetensors(&bare, tensors, &HashMap::new()).unwrap();
    let e = ClipConfig::from_path(&bare).unwrap_err().to_string();
    assert!(
        e.contains("bare.safetensors") && e.contains("no `clipcid.config` metadata"),
        "{e}"
    );
    // A checkpoint named as a JSON config: said so, not "invalid UTF-8".
    let named = dir.path().join("config.json");
    std::fs::copy(&bare, &named).unwrap();
    let e = ClipConfig::from_path(&named).unwrap_err().to_string();
    assert!(e.contains("config.json: not a JSON config (binary"), "{e}");
    // ... also as the config of its folder.
    let e = ClipConfig::from_path(dir.path()).unwrap_err().to_string();
    assert!(e.contains("config.json: not a JSON config"), "{e}");
    // A folder with neither config file.
    std::fs::remove_file(&named).unwrap();
    let e = ClipConfig::from_path(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("a folder with no config.json or open_clip_config.json"),
        "{e}"
    );
}

#[test]
fn save_pretrained_folder_loads_through_config_json() {
    let cfg = tiny();
    let model = ClipModel::random(&cfg, 3, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path(), DType::F16).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["model_type"], "clip");
    assert_eq!(json["vision_config"]["hidden_size"], 32);
    let back = ClipModel::load(dir.path(), &Device::Cpu).unwrap();
    // f16 storage: outputs agree to f16 precision.
    let img = pixels(2, 5);
    let d = max_abs_diff(
        &model.encode_image(&img).unwrap(),
        &back.encode_image(&img).unwrap(),
    );
    assert!(d < 1e-2 && d > 0.0, "f16 round trip diff {d}");
    let header = io::read_header(&dir.path().join("model.safetensors")).unwrap();
    assert!(header.tensors.values().all(|t| t.dtype == "F16"));
}

#[test]
fn open_clip_named_file_equals_hf_named_file() {
    let cfg = tiny();
    let dev = Device::Cpu;
    let hf = init_tensors(&cfg, 11).unwrap();
    let oc = hf_to_open_clip(&hf).unwrap();
    assert!(oc.contains_key("visual.transformer.resblocks.0.attn.in_proj_weight"));
    assert!(oc.contains_key("text_projection"));
    assert!(!oc.keys().any(|k| k.contains("q_proj")));
    let dir = tempfile::tempdir().unwrap();
    let hf_path = dir.path().join("hf.safetensors");
    let oc_path = dir.path().join("oc.safetensors");
    io::write_safetensors(&hf_path, hf.clone(), &HashMap::new()).unwrap();
    io::write_safetensors(&oc_path, oc, &HashMap::new()).unwrap();
    // No metadata and no config file: both configs are inferred from shapes; give the tiny
    // config explicitly since its heads (2) are not width/64.
    let a = ClipModel::load_with(&hf_path, Some(cfg.clone()), &dev, DType::F32).unwrap();
    let b = ClipModel::load_with(&oc_path, Some(cfg.clone()), &dev, DType::F32).unwrap();
    for (name, t) in a.tensors() {
        assert_eq!(max_abs_diff(t, &b.tensors()[name]), 0.0, "{name}");
    }
    let (img, txt) = (pixels(3, 2), ids(&cfg));
    assert_eq!(
        max_abs_diff(
            &a.encode_image(&img).unwrap(),
            &b.encode_image(&img).unwrap()
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(&a.encode_text(&txt).unwrap(), &b.encode_text(&txt).unwrap()),
        0.0
    );
    let ck = clipcid_models::Checkpoint::read(&oc_path, Some(cfg)).unwrap();
    assert_eq!(ck.layout, Layout::OpenClip);
}

#[test]
fn config_is_inferred_from_shapes_for_openai_style_widths() {
    let mut cfg = tiny();
    cfg.vision_config.hidden_size = 64;
    cfg.vision_config.num_attention_heads = 1;
    cfg.text_config.hidden_size = 128;
    cfg.text_config.num_attention_heads = 2;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.safetensors");
    io::write_safetensors(&path, init_tensors(&cfg, 1).unwrap(), &HashMap::new()).unwrap();
    // The shapes cannot say which activation: no guess, an error naming the choice.
    let msg = clipcid_models::Checkpoint::read(&path, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bare.safetensors") && msg.contains("--activation quick_gelu"),
        "{msg}"
    );
    for act in [Activation::QuickGelu, Activation::Gelu] {
        let opts = LoadOptions {
            activation: Some(act),
            ..LoadOptions::default()
        };
        let ck = clipcid_models::Checkpoint::read_with(&path, &opts).unwrap();
        assert!(ck.config_source.starts_with("inferred from tensor shapes"));
        let mut want = cfg.clone();
        want.vision_config.hidden_act = act;
        want.text_config.hidden_act = act;
        assert_eq!(ck.config, want);
    }
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let all = init_tensors(&cfg, 5).unwrap();
    let one = dir.path().join("one");
    std::fs::create_dir(&one).unwrap();
    io::write_safetensors(&one.join("model.safetensors"), all.clone(), &HashMap::new()).unwrap();
    cfg.save_json(&one.join("config.json")).unwrap();
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    cfg.save_json(&sharded.join("config.json")).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in all.iter().enumerate() {
        let shard = if i % 2 == 0 { &mut a } else { &mut b };
        shard.insert(name.clone(), t.clone());
        let file = format!("model-0000{}-of-00002.safetensors", 1 + i % 2);
        weight_map.insert(name.clone(), file.into());
    }
    io::write_safetensors(
        &sharded.join("model-00001-of-00002.safetensors"),
        a,
        &HashMap::new(),
    )
    .unwrap();
    io::write_safetensors(
        &sharded.join("model-00002-of-00002.safetensors"),
        b.clone(),
        &HashMap::new(),
    )
    .unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let x = ClipModel::load(&one, &Device::Cpu).unwrap();
    let y = ClipModel::load(&sharded, &Device::Cpu).unwrap();
    for (name, t) in x.tensors() {
        assert_eq!(max_abs_diff(t, &y.tensors()[name]), 0.0, "{name}");
    }
    // A shard that lost a tensor the index promises is named.
    let (gone, _) = b.iter().next().unwrap();
    let gone = gone.clone();
    b.remove(&gone);
    io::write_safetensors(
        &sharded.join("model-00002-of-00002.safetensors"),
        b,
        &HashMap::new(),
    )
    .unwrap();
    let msg = ClipModel::load(&sharded, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains(&gone),
        "{msg}"
    );
}

#[test]
fn hub_configs_give_each_models_published_shape() {
    // (file, projection, text width/heads/layers, vision width/heads/layers/patch/size, act)
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub-configs");
    let q = Activation::QuickGelu;
    let g = Activation::Gelu;
    let cases = [
        (
            "openai-clip-vit-base-patch32.json",
            512,
            (512, 8, 12),
            (768, 12, 12, 32, 224),
            q,
        ),
        (
            "openai-clip-vit-base-patch16.json",
            512,
            (512, 8, 12),
            (768, 12, 12, 16, 224),
            q,
        ),
        (
            "openai-clip-vit-large-patch14.json",
            768,
            (768, 12, 12),
            (1024, 16, 24, 14, 224),
            q,
        ),
        (
            "openai-clip-vit-large-patch14-336.json",
            768,
            (768, 12, 12),
            (1024, 16, 24, 14, 336),
            q,
        ),
        (
            "laion-CLIP-ViT-H-14-laion2B-s32B-b79K.json",
            1024,
            (1024, 16, 24),
            (1280, 16, 32, 14, 224),
            g,
        ),
        (
            "laion-CLIP-ViT-bigG-14-laion2B-39B-b160k.json",
            1280,
            (1280, 20, 32),
            (1664, 16, 48, 14, 224),
            g,
        ),
    ];
    for (file, proj, (tw, th, tl), (vw, vh, vl, p, size), act) in cases {
        let cfg = ClipConfig::from_json_file(&dir.join(file)).unwrap();
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        assert_eq!(cfg.projection_dim, proj, "{file}");
        assert_eq!(
            (t.hidden_size, t.num_attention_heads, t.num_hidden_layers),
            (tw, th, tl),
            "{file}"
        );
        assert_eq!(
            (
                v.hidden_size,
                v.num_attention_heads,
                v.num_hidden_layers,
                v.patch_size,
                v.image_size
            ),
            (vw, vh, vl, p, size),
            "{file}"
        );
        assert_eq!((t.hidden_act, v.hidden_act), (act, act), "{file}");
        assert_eq!(t.intermediate_size, 4 * tw, "{file}");
        // The legacy eos_token_id 2 means "pool at the highest id".
        assert_eq!(cfg.eos_token_id(), None, "{file}");
    }
}

#[test]
fn open_clip_configs_fill_open_clips_defaults() {
    // Text heads default to 8 (not width / 64), vision heads to width / head_width 64.
    let cfg = ClipConfig::from_open_clip_json(
        r#"{"model_cfg": {"embed_dim": 640, "vision_cfg": {"width": 896, "layers": 2, "patch_size": 14},
            "text_cfg": {"width": 640, "layers": 2}}, "preprocess_cfg": {}}"#,
    )
    .unwrap();
    assert_eq!(cfg.text_config.num_attention_heads, 8);
    assert_eq!(cfg.vision_config.num_attention_heads, 14);
    assert_eq!(cfg.text_config.max_position_embeddings, 77);
    assert_eq!(cfg.vision_config.image_size, 224);
    assert_eq!(cfg.text_config.hidden_act, Activation::Gelu);
    // The bare form (open_clip's model_configs/*.json) reads the same.
    let bare = ClipConfig::from_open_clip_json(
        r#"{"embed_dim": 640, "quick_gelu": true, "vision_cfg": {"width": 896, "layers": 2, "patch_size": 14},
            "text_cfg": {"width": 640, "layers": 2}}"#,
    )
    .unwrap();
    assert_eq!(bare.text_config.hidden_act, Activation::QuickGelu);
    assert_eq!(bare.text_config.num_attention_heads, 8);
    // Architecture options clipcid does not build are refused by name.
    for (json, field) in [
        (
            r#"{"embed_dim": 8, "vision_cfg": {"ls_init_value": 1e-5}, "text_cfg": {}}"#,
            "vision_cfg.ls_init_value",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit"}, "text_cfg": {}}"#,
            "vision_cfg.timm_model_name",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": "roberta"}}"#,
            "text_cfg.hf_model_name",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {"layers": [3, 4, 6, 3]}, "text_cfg": {}}"#,
            "vision_cfg.layers",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"pool_type": "last"}}"#,
            "text_cfg.pool_type",
        ),
    ] {
        let msg = ClipConfig::from_open_clip_json(json)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(field), "{field}: {msg}");
    }
    // Written out again, every shape field round-trips.
    for name in clipcid_models::PRESETS {
        let c = ClipConfig::preset(name).unwrap();
        let back =
            ClipConfig::from_open_clip_json(&c.to_open_clip_json().unwrap().to_string()).unwrap();
        assert_eq!(back, c, "{name}");
    }
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let mut t = init_tensors(&cfg, 0).unwrap();
    t.remove("text_model.encoder.layers.1.mlp.fc2.bias");
    let path = dir.path().join("missing.safetensors");
    io::write_safetensors(&path, t, &HashMap::new()).unwrap();
    let err = ClipModel::load_with(&path, Some(cfg.clone()), &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("missing.safetensors")
            && msg.contains("text_model.encoder.layers.1.mlp.fc2.bias")
            && msg.contains("[32]"),
        "{msg}"
    );

    let mut t = init_tensors(&cfg, 0).unwrap();
    t.insert(
        "visual_projection.weight".into(),
        Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("shape.safetensors");
    io::write_safetensors(&path, t, &HashMap::new()).unwrap();
    let msg = ClipModel::load_with(&path, Some(cfg), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("visual_projection.weight")
            && msg.contains("[8, 32]")
            && msg.contains("[16, 32]"),
        "{msg}"
    );
}

#[test]
fn corrupt_or_truncated_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"definitely not safetensors").unwrap();
    let msg = ClipModel::load(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("junk.safetensors") && msg.contains("not a safetensors file"),
        "{msg}"
    );

    let good = dir.path().join("good.safetensors");
    ClipModel::random(&tiny(), 0, &Device::Cpu)
        .unwrap()
        .save(&good, DType::F32)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let msg = ClipModel::load(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("truncated"), "{msg}");
    let msg = ClipModel::load(&dir.path().join("nope"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope") && msg.contains("no such"), "{msg}");
}

#[test]
fn random_models_are_deterministic_under_a_seed() {
    let cfg = tiny();
    let a = ClipModel::random(&cfg, 5, &Device::Cpu).unwrap();
    let b = ClipModel::random(&cfg, 5, &Device::Cpu).unwrap();
    let c = ClipModel::random(&cfg, 6, &Device::Cpu).unwrap();
    let img = pixels(1, 0);
    let (ea, eb, ec) = (
        a.encode_image(&img).unwrap(),
        b.encode_image(&img).unwrap(),
        c.encode_image(&img).unwrap(),
    );
    assert_eq!(max_abs_diff(&ea, &eb), 0.0);
    assert!(max_abs_diff(&ea, &ec) > 1e-3);
}

#[test]
fn trainable_model_matches_frozen_model_and_every_parameter_gets_a_gradient() {
    // On every device this build has; on a GPU also against the CPU's logits.
    let cfg = tiny();
    let mut cpu_logits: Option<Tensor> = None;
    for dev in clipcid_kernels::available_devices() {
        let frozen = ClipModel::random(&cfg, 9, &dev).unwrap();
        let (train, varmap) = ClipModel::trainable(&cfg, 9, &dev).unwrap();
        let img = pixels(2, 3).to_device(&dev).unwrap();
        let txt = ids(&cfg).to_device(&dev).unwrap();
        // Fused inference kernels vs differentiable primitive ops: same numbers.
        let logits = train.logits(&img, &txt).unwrap();
        let d = max_abs_diff(&frozen.logits(&img, &txt).unwrap(), &logits);
        assert!(
            d < 1e-4,
            "{dev:?}: fused vs differentiable path differ by {d}"
        );
        // ... and the primitive-op path in f64 (what other devices and dtypes run): the fused
        // attention, activation and residual kernels give the same numbers.
        let f64_logits = frozen
            .cast(candle_core::DType::F64)
            .unwrap()
            .logits(&img.to_dtype(candle_core::DType::F64).unwrap(), &txt)
            .unwrap();
        let d = max_abs_diff(&f64_logits, &logits);
        assert!(
            d < 1e-4,
            "{dev:?}: fused f32 vs primitive f64 differ by {d}"
        );
        let on_cpu = logits.to_device(&Device::Cpu).unwrap();
        let reference = cpu_logits.get_or_insert_with(|| on_cpu.clone());
        let d = max_abs_diff(reference, &on_cpu);
        assert!(d < 1e-4, "{dev:?}: logits differ from the CPU's by {d}");
        let loss = logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        assert_eq!(vars.len(), frozen.tensors().len());
        for (name, var) in vars.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{dev:?}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm.is_finite(), "{dev:?}: {name}");
        }
    }
}

#[test]
fn image_gradient_matches_finite_differences() {
    // d/dx of a scalar function of the image embedding, checked on a few pixels.
    let cfg = tiny();
    let dev = Device::Cpu;
    let (model, _vm) = ClipModel::trainable(&cfg, 2, &dev).unwrap();
    let base: Vec<f32> = pixels(1, 4).flatten_all().unwrap().to_vec1().unwrap();
    let f = |v: &[f32]| -> f64 {
        let x = Tensor::from_vec(v.to_vec(), (1, 3, 32, 32), &dev).unwrap();
        let e = model.encode_image(&x).unwrap();
        e.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let x = candle_core::Var::from_tensor(
        &Tensor::from_vec(base.clone(), (1, 3, 32, 32), &dev).unwrap(),
    )
    .unwrap();
    let y = model
        .encode_image(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap();
    let g: Vec<f32> = y
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h = 1e-2f32;
    for &i in &[0usize, 100, 1500, 3071] {
        let (mut p, mut m) = (base.clone(), base.clone());
        p[i] += h;
        m[i] -= h;
        let fd = (f(&p) - f(&m)) / (2.0 * h as f64);
        let rel = (fd - g[i] as f64).abs() / (fd.abs().max(g[i].abs() as f64).max(1e-3));
        assert!(
            rel < 2e-2,
            "pixel {i}: analytic {} vs finite difference {fd}",
            g[i]
        );
    }
}

#[test]
fn tokens_after_the_end_token_do_not_change_the_text_embedding() {
    let cfg = tiny();
    let model = ClipModel::random(&cfg, 1, &Device::Cpu).unwrap();
    let tok = ClipTokenizer::byte_level(16).unwrap();
    let mut row = tok.encode("hi").unwrap();
    let a = Tensor::new(vec![row.clone()], &Device::Cpu).unwrap();
    // Overwrite the padding after <|endoftext|> with other tokens.
    for (i, slot) in row.iter_mut().enumerate().skip(4) {
        *slot = 10 + i as u32;
    }
    let b = Tensor::new(vec![row.clone()], &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(
            &model.encode_text(&a).unwrap(),
            &model.encode_text(&b).unwrap()
        ),
        0.0
    );
    // ... while tokens before it do.
    row[1] = 70;
    let c = Tensor::new(vec![row], &Device::Cpu).unwrap();
    assert!(
        max_abs_diff(
            &model.encode_text(&a).unwrap(),
            &model.encode_text(&c).unwrap()
        ) > 1e-4
    );
}

#[test]
fn wrong_input_shapes_are_errors_not_panics() {
    let model = ClipModel::random(&tiny(), 0, &Device::Cpu).unwrap();
    let wrong = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let msg = model.encode_image(&wrong).unwrap_err().to_string();
    assert!(msg.contains("[B, 3, 32, 32]"), "{msg}");
    let bad_ids = Tensor::new(&[[512u32, 9999, 513]], &Device::Cpu).unwrap();
    let msg = model.encode_text(&bad_ids).unwrap_err().to_string();
    assert!(msg.contains("9999"), "{msg}");
}

#[test]
fn non_finite_or_integer_weights_and_zero_sizes_are_refused() {
    let cfg = ClipConfig::preset("tiny").expect("preset");
    let model = ClipModel::random(&cfg, 3, &Device::Cpu).expect("model");
    let dir = tempfile::tempdir().expect("tmp");
    let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
    for (what, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let mut tensors = model.tensors().clone();
        let t = &tensors[name];
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[17] = bad;
        tensors.insert(
            name.to_string(),
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap(),
        );
        let path = dir.path().join(format!("{what}.safetensors"));
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let e = ClipModel::load_with(&path, Some(cfg.clone()), &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains(name) && e.contains("NaN or infinite"), "{e}");
    }
    let mut tensors = model.tensors().clone();
    let t = &tensors[name];
    tensors.insert(name.to_string(), t.to_dtype(DType::I64).unwrap());
    let path = dir.path().join("int.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = ClipModel::load_with(&path, Some(cfg.clone()), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains(name) && e.contains("floating point"), "{e}");

    let mut zero = cfg.clone();
    zero.vision_config.image_size = 0;
    assert!(zero
        .validate()
        .unwrap_err()
        .to_string()
        .contains("image_size"));
    let mut eps = cfg;
    eps.text_config.layer_norm_eps = f64::NAN;
    assert!(eps
        .validate()
        .unwrap_err()
        .to_string()
        .contains("layer_norm_eps"));
}

/// On each GPU: a trainable model whose encoder layers run as one autograd node each
/// (`clipcid_kernels::cuda::set_block_node`) gives the logits and every parameter's gradient
/// of the layer-by-op path. (Other tests of this binary may run meanwhile with the switch
/// on; they see the same numbers.)
#[cfg(feature = "cuda")]
#[test]
fn one_node_per_layer_matches_the_layer_by_op_path_on_each_gpu() {
    let cfg = tiny();
    let gpus: Vec<Device> = clipcid_kernels::available_devices()
        .into_iter()
        .filter(Device::is_cuda)
        .collect();
    if gpus.is_empty() {
        println!("no GPU: the one-node path is the CPU's own and is tested in clipcid-kernels");
    }
    for dev in gpus {
        let (train, varmap) = ClipModel::trainable(&cfg, 11, &dev).unwrap();
        let img = pixels(2, 5).to_device(&dev).unwrap();
        let txt = ids(&cfg).to_device(&dev).unwrap();
        let run = |one_node: bool| {
            clipcid_kernels::cuda::set_block_node(one_node);
            let logits = train.logits(&img, &txt).unwrap();
            let grads = logits
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .backward()
                .unwrap();
            clipcid_kernels::cuda::set_block_node(false);
            let vars = varmap.data().lock().unwrap();
            let g: Vec<(String, Tensor)> = vars
                .iter()
                .map(|(name, v)| (name.clone(), grads.get(v.as_tensor()).unwrap().clone()))
                .collect();
            (logits, g)
        };
        let (logits, grads) = run(false);
        let (logits_node, grads_node) = run(true);
        let d = max_abs_diff(&logits, &logits_node);
        assert!(d < 1e-4, "{dev:?}: logits differ by {d}");
        for ((name, a), (_, b)) in grads.iter().zip(&grads_node) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "{dev:?}: gradient of {name} differs by {d}");
        }
    }
}
