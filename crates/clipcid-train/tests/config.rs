#![allow(clippy::unwrap_used)]
//! The distillation config: the shipped examples parse as intended; bad files are clear errors.

use std::path::{Path, PathBuf};

use clipcid_train::{DistillConfig, Mode};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/configs")
}

fn parse(name: &str) -> DistillConfig {
    let text = std::fs::read_to_string(examples().join(name)).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The GPU reproduction configs point at data that is not here, so they are parsed, not loaded.
fn parse_reproduction(name: &str) -> DistillConfig {
    let text = std::fs::read_to_string(examples().join("../reproduction").join(name)).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn ablation_configs_switch_the_terms() {
    let terms = |c: &DistillConfig| {
        (
            c.loss.clip.enabled,
            c.loss.cluster.enabled,
            c.loss.instance.enabled,
        )
    };
    assert_eq!(terms(&parse("clip-only.toml")), (true, false, false));
    assert_eq!(terms(&parse("clip-cluster.toml")), (true, true, false));
    let full = parse("clip-cluster-instance.toml");
    assert_eq!(terms(&full), (true, true, true));
    assert_eq!(full.loss.cluster.sample_rate, 0.5);
    assert_eq!(full.optim.adamw.beta2, 0.98);
    let pc = parse("piccollage.toml");
    assert_eq!(pc.mode, Mode::Piccollage);
    assert_eq!(
        pc.student.model,
        "../../demo-out/piccollage-init/seed0/config.json"
    );
    assert_eq!(
        [
            pc.loss.piccollage.schedule.at(9),
            pc.loss.piccollage.schedule.at(10)
        ],
        [4.0, 2.0]
    );
}

#[test]
fn reproduction_configs_follow_the_papers() {
    let cid = parse_reproduction("clip-cid-vit-b-32.toml");
    assert_eq!(cid.mode, Mode::ClipCid);
    assert_eq!(cid.student.model, "vit-b-32");
    assert_eq!(cid.loss.cluster.sample_rate, 0.1);
    assert!(cid.loss.clip.enabled && cid.loss.cluster.enabled && cid.loss.instance.enabled);
    assert_eq!(cid.optim.adamw.beta2, 0.98);
    let pc = parse_reproduction("piccollage-vit-b-32.toml");
    assert_eq!(pc.mode, Mode::Piccollage);
    assert_eq!(pc.student.model, "piccollage-s12");
}

fn write(dir: &Path, body: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("emb")).unwrap();
    std::fs::write(dir.join("data.tsv"), "a.png\tcaption\n").unwrap();
    let p = dir.join("run.toml");
    std::fs::write(&p, body).unwrap();
    p
}

const DATA: &str = "[data]\ndataset = \"data.tsv\"\nembeddings = \"emb\"\n";

#[test]
fn bad_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A valid minimal file: relative paths resolve against its folder.
    let ok = write(d, &format!("{DATA}[loss.cluster]\nenabled = false\n"));
    let cfg = DistillConfig::from_file(&ok).unwrap();
    assert_eq!(cfg.data.embeddings, Some(d.join("emb")));
    assert_eq!((cfg.batch_size, cfg.epochs), (32, 1));

    let err = |body: String| {
        DistillConfig::from_file(&write(d, &body))
            .unwrap_err()
            .to_string()
    };
    let e = err(format!(
        "{DATA}[loss.cluster]\nenabled = false\nsample_rat = 0.2\n"
    ));
    assert!(
        e.contains("run.toml") && e.contains("unknown field `sample_rat`"),
        "{e}"
    );
    let e = err(format!("{DATA}bach_size = 4\n"));
    assert!(e.contains("unknown field `bach_size`"), "{e}");
    let e = err(format!("{DATA}[loss.cluster]\nenabled = true\n"));
    assert!(e.contains("data.clusters is not set"), "{e}");
    let e = err(format!("{DATA}clusters = \"nope.safetensors\"\n"));
    assert!(
        e.contains("data.clusters")
            && e.contains("nope.safetensors")
            && e.contains("does not exist"),
        "{e}"
    );
    let e = err("[student]\nmodel = \"tiny\"\n".into());
    assert!(e.contains("missing field `data`"), "{e}");
    let e = err(format!(
        "{DATA}[loss.cluster]\nenabled = false\n[optim]\nlr = -1.0\n"
    ));
    assert!(e.contains("optim.lr"), "{e}");
    // Numbers out of range, each named.
    for (body, field) in [
        ("[optim]\nlr = 0.001\nmin_lr = 0.01\n", "optim.min_lr"),
        ("[optim.adamw]\nbeta2 = 1.5\n", "optim.adamw.beta2"),
        ("[optim.adamw]\nbeta1 = -0.1\n", "optim.adamw.beta1"),
        (
            "[optim.adamw]\nweight_decay = -0.1\n",
            "optim.adamw.weight_decay",
        ),
        ("[optim.adamw]\neps = 0.0\n", "optim.adamw.eps"),
        ("[optim.loss_scale]\ninit = 0.0\n", "optim.loss_scale.init"),
        (
            "[optim.loss_scale]\nbackoff_factor = 1.0\n",
            "optim.loss_scale.backoff_factor",
        ),
        (
            "[optim.loss_scale]\ngrowth_factor = 0.5\n",
            "optim.loss_scale.growth_factor",
        ),
        (
            "[optim.loss_scale]\ngrowth_interval = 0\n",
            "optim.loss_scale.growth_interval",
        ),
        ("[loss.clip]\nweight = -1.0\n", "loss.clip.weight"),
        (
            "[loss.instance]\nimage_text_weight = -2.0\n",
            "loss.instance.image_text_weight",
        ),
    ] {
        let e = err(format!("{DATA}[loss.cluster]\nenabled = false\n{body}"));
        assert!(e.contains(field), "{body}: {e}");
    }
    let e = err(format!(
        "epochs = 6148914691236517206\n{DATA}[loss.cluster]\nenabled = false\n"
    ));
    assert!(e.contains("epochs") && e.contains("beyond any run"), "{e}");
    // batch_size x optim.accumulate overflowed (to 0, then divided by) in Trainer::new.
    for top in [
        "batch_size = 4611686018427387904\n",
        "[optim]\naccumulate = 4611686018427387904\n",
    ] {
        let body = if top.starts_with('[') {
            format!("{DATA}[loss.cluster]\nenabled = false\n{top}")
        } else {
            format!("{top}{DATA}[loss.cluster]\nenabled = false\n")
        };
        let e = err(body);
        assert!(
            e.contains("batch_size = ") && e.contains("beyond any run"),
            "{top}: {e}"
        );
    }
    let e = DistillConfig::from_file(&d.join("absent.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("absent.toml") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn default_config_in_code_matches_an_empty_toml_file() {
    let from_toml: clipcid_train::DistillConfig =
        toml::from_str("[data]\ndataset = \"\"\n").unwrap();
    assert_eq!(from_toml, clipcid_train::DistillConfig::default());
}

#[test]
fn student_model_names_a_preset_a_config_a_folder_or_a_checkpoint() {
    use clipcid_models::{ClipConfig, ClipModel};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ClipConfig::preset("tiny").unwrap();
    cfg.vision_config.num_hidden_layers = 1;
    let model = ClipModel::random(&cfg, 0, &candle_core::Device::Cpu).unwrap();
    // What `clipcid init-model --out student.safetensors` writes: the config in the metadata.
    let file = dir.path().join("student.safetensors");
    model.save(&file, candle_core::DType::F32).unwrap();
    model
        .save_pretrained(&dir.path().join("folder"), candle_core::DType::F32)
        .unwrap();
    for p in [
        file.clone(),
        dir.path().join("folder"),
        dir.path().join("folder/config.json"),
    ] {
        let got = clipcid_train::student_config(&p.display().to_string()).unwrap();
        assert_eq!(got, cfg, "{}", p.display());
    }
    assert_eq!(
        clipcid_train::student_config("tiny").unwrap(),
        ClipConfig::preset("tiny").unwrap()
    );
    let e = clipcid_train::student_config("no-such-preset")
        .unwrap_err()
        .to_string();
    assert!(e.contains("neither a preset"), "{e}");
}

/// A valid config in `dir` (CLIP-CID, the cluster term off), with `change` applied.
fn edited(dir: &Path, change: impl FnOnce(&mut DistillConfig)) -> DistillConfig {
    std::fs::create_dir_all(dir.join("emb")).unwrap();
    std::fs::write(dir.join("data.tsv"), "a.png\tcaption\n").unwrap();
    let mut cfg = DistillConfig {
        data: clipcid_train::DataConfig {
            dataset: dir.join("data.tsv"),
            embeddings: Some(dir.join("emb")),
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.loss.cluster.enabled = false;
    change(&mut cfg);
    cfg
}

#[test]
fn each_bound_of_a_config_number_is_where_the_docs_put_it() {
    use clipcid_loss::Margin;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    type Change = fn(&mut DistillConfig);
    // Values at a bound that the docs allow, each accepted.
    let accepted: &[(&str, Change)] = &[
        ("min_lr = lr", |c| c.optim.min_lr = c.optim.lr),
        ("beta1 = 0", |c| c.optim.adamw.beta1 = 0.0),
        ("beta2 = 0", |c| c.optim.adamw.beta2 = 0.0),
        ("beta2 just below 1", |c| c.optim.adamw.beta2 = 1.0 - 1e-12),
        ("eps tiny", |c| c.optim.adamw.eps = 1e-300),
        ("weight_decay = 0", |c| c.optim.adamw.weight_decay = 0.0),
        ("clip_grad_norm = 0 (off)", |c| c.optim.clip_grad_norm = 0.0),
        ("growth_factor = 1", |c| {
            c.optim.loss_scale.growth_factor = 1.0
        }),
        ("backoff just below 1", |c| {
            c.optim.loss_scale.backoff_factor = 0.999
        }),
        ("every weight 0 but the clip term's", |c| {
            c.loss.cluster.weight = 0.0;
            c.loss.cluster.kl_weight = 0.0;
            c.loss.instance.weight = 0.0;
            c.loss.instance.image_text_weight = 0.0;
            c.loss.instance.text_image_weight = 0.0;
            c.loss.piccollage.kl_weight = 0.0;
            c.loss.piccollage.l1_weight = 0.0;
        }),
        ("arcface 0", |c| {
            c.loss.cluster.margin = Margin::ArcFace(0.0)
        }),
        ("arcface just below pi", |c| {
            c.loss.cluster.margin = Margin::ArcFace(std::f64::consts::PI - 1e-9)
        }),
        ("cosface 0", |c| {
            c.loss.cluster.margin = Margin::CosFace(0.0)
        }),
        ("cosface 2", |c| {
            c.loss.cluster.margin = Margin::CosFace(2.0)
        }),
        ("one temperature step", |c| {
            c.loss.piccollage.schedule.steps = vec![(3, 0.5)]
        }),
        ("epochs at the bound", |c| c.epochs = 1_000_000),
        ("batch_size at the bound", |c| c.batch_size = 1 << 24),
        ("accumulate at the bound", |c| c.optim.accumulate = 1 << 16),
        ("subset of 1", |c| c.data.subset = Some(1)),
        ("context_length 2", |c| c.student.context_length = Some(2)),
        ("sample_rate 1", |c| {
            c.loss.cluster.sample_rate = 1.0;
        }),
        ("PicCollage ignores the CLIP-CID terms", |c| {
            c.mode = Mode::Piccollage;
            c.loss.clip.enabled = false;
            c.loss.instance.enabled = false;
            c.loss.cluster.enabled = true;
            c.loss.cluster.sample_rate = 0.0;
        }),
        ("the cluster term alone", |c| {
            c.loss.clip.enabled = false;
            c.loss.instance.enabled = false;
            c.loss.cluster.enabled = true;
            c.data.clusters = Some(c.data.dataset.clone());
        }),
        ("CLIP alone needs no embeddings", |c| {
            c.data.embeddings = None;
            c.loss.instance.enabled = false;
        }),
    ];
    for (what, change) in accepted {
        let cfg = edited(d, change);
        assert_eq!(cfg.validate(), Ok(()), "{what}");
    }
    // Just past each bound, or not a number: refused, naming the key.
    let refused: &[(&str, Change)] = &[
        ("optim.lr", |c| c.optim.lr = 0.0),
        ("optim.lr", |c| c.optim.lr = f64::INFINITY),
        ("optim.min_lr", |c| c.optim.min_lr = -1e-9),
        ("optim.min_lr", |c| c.optim.min_lr = f64::NAN),
        ("optim.adamw.beta1", |c| c.optim.adamw.beta1 = 1.0),
        ("optim.adamw.beta2", |c| c.optim.adamw.beta2 = -1e-9),
        ("optim.adamw.beta2", |c| c.optim.adamw.beta2 = f64::NAN),
        ("optim.adamw.eps", |c| c.optim.adamw.eps = f64::INFINITY),
        ("optim.adamw.weight_decay", |c| {
            c.optim.adamw.weight_decay = f64::NAN
        }),
        ("optim.clip_grad_norm", |c| c.optim.clip_grad_norm = -1e-9),
        ("optim.clip_grad_norm", |c| {
            c.optim.clip_grad_norm = f64::INFINITY
        }),
        ("optim.loss_scale.init", |c| {
            c.optim.loss_scale.init = f64::INFINITY
        }),
        ("optim.loss_scale.growth_factor", |c| {
            c.optim.loss_scale.growth_factor = 0.999
        }),
        ("optim.loss_scale.backoff_factor", |c| {
            c.optim.loss_scale.backoff_factor = 0.0
        }),
        ("loss.cluster.weight", |c| c.loss.cluster.weight = -1e-9),
        ("loss.cluster.kl_weight", |c| {
            c.loss.cluster.kl_weight = f64::NAN
        }),
        ("loss.instance.weight", |c| c.loss.instance.weight = -1.0),
        ("loss.instance.text_image_weight", |c| {
            c.loss.instance.text_image_weight = -1.0
        }),
        ("loss.piccollage.kl_weight", |c| {
            c.loss.piccollage.kl_weight = -1.0
        }),
        ("loss.piccollage.l1_weight", |c| {
            c.loss.piccollage.l1_weight = f64::INFINITY
        }),
        ("loss.cluster.scale", |c| c.loss.cluster.scale = 0.0),
        ("loss.cluster.kl_temperature", |c| {
            c.loss.cluster.kl_temperature = 0.0
        }),
        ("loss.cluster.margin (arcface)", |c| {
            c.loss.cluster.margin = Margin::ArcFace(std::f64::consts::PI)
        }),
        ("loss.cluster.margin (arcface)", |c| {
            c.loss.cluster.margin = Margin::ArcFace(-1e-9)
        }),
        ("loss.cluster.margin (cosface)", |c| {
            c.loss.cluster.margin = Margin::CosFace(2.000001)
        }),
        ("loss.cluster.margin (cosface)", |c| {
            c.loss.cluster.margin = Margin::CosFace(-1e-9)
        }),
        ("needs at least one", |c| {
            c.loss.piccollage.schedule.steps.clear()
        }),
        ("temperature must be positive", |c| {
            c.loss.piccollage.schedule.steps = vec![(0, 4.0), (2, 0.0)]
        }),
        ("epoch 2 follows 2", |c| {
            c.loss.piccollage.schedule.steps = vec![(0, 4.0), (2, 2.0), (2, 1.0)]
        }),
        ("epoch 1 follows 2", |c| {
            c.loss.piccollage.schedule.steps = vec![(2, 4.0), (1, 2.0)]
        }),
        ("epochs = 1000001", |c| c.epochs = 1_000_001),
        ("batch_size = 16777217", |c| c.batch_size = (1 << 24) + 1),
        ("optim.accumulate = 65537", |c| {
            c.optim.accumulate = (1 << 16) + 1
        }),
        ("at least 1", |c| c.batch_size = 0),
        ("at least 1", |c| c.epochs = 0),
        ("at least 1", |c| c.optim.accumulate = 0),
        ("data.subset must be at least 1", |c| {
            c.data.subset = Some(0)
        }),
        ("student.context_length must be at least 2", |c| {
            c.student.context_length = Some(1)
        }),
        ("student.freeze_text needs student.init", |c| {
            c.student.freeze_text = true
        }),
        ("loss.cluster.sample_rate", |c| {
            c.loss.cluster.sample_rate = 0.0
        }),
        ("loss.cluster.sample_rate", |c| {
            c.loss.cluster.sample_rate = 1.000001
        }),
        ("loss.cluster.sample_rate", |c| {
            c.loss.cluster.sample_rate = f64::NAN
        }),
        ("every loss term is disabled", |c| {
            c.loss.clip.enabled = false;
            c.loss.instance.enabled = false;
        }),
        ("data.embeddings is required", |c| c.data.embeddings = None),
        ("data.embeddings is required", |c| {
            c.loss.instance.enabled = false;
            c.loss.cluster.enabled = true;
            c.data.clusters = Some(c.data.dataset.clone());
            c.data.embeddings = None;
        }),
        ("data.embeddings is required", |c| {
            c.mode = Mode::Piccollage;
            c.data.embeddings = None;
        }),
        ("data.keep needs data.embeddings", |c| {
            c.loss.instance.enabled = false;
            c.data.embeddings = None;
            c.data.keep = Some(c.data.dataset.clone());
        }),
        ("data.keep `", |c| {
            c.data.keep = Some("/no/such/keep.safetensors".into())
        }),
        ("student.init `", |c| {
            c.student.init = Some("/no/such/init.safetensors".into())
        }),
        ("data.tokenizer `", |c| {
            c.data.tokenizer = Some("/no/such/tokenizer.json".into())
        }),
        ("data.embeddings `", |c| {
            c.data.embeddings = Some("/no/such/emb".into())
        }),
        ("data.dataset `", |c| {
            c.data.dataset = "/no/such/data.tsv".into()
        }),
    ];
    for (field, change) in refused {
        let e = edited(d, change).validate().unwrap_err();
        assert!(e.contains(field), "{field}: {e}");
    }
    // A dataset pattern is checked when it is opened, not here.
    let cfg = edited(d, |c| c.data.dataset = "/no/such/{00000..00001}.tar".into());
    assert_eq!(cfg.validate(), Ok(()));
}

#[test]
fn relative_paths_resolve_against_the_config_file_and_presets_stay_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sub = d.join("runs");
    std::fs::create_dir_all(sub.join("emb")).unwrap();
    std::fs::create_dir_all(d.join("more")).unwrap();
    std::fs::write(sub.join("a.tsv"), "a.png\tcaption\n").unwrap();
    std::fs::write(sub.join("init.safetensors"), "").unwrap();
    std::fs::write(sub.join("student.json"), "{}").unwrap();
    let load = |body: &str| {
        let p = sub.join("run.toml");
        std::fs::write(&p, body).unwrap();
        DistillConfig::from_file(&p).unwrap()
    };
    let body = "[data]\ndataset = \"a.tsv::../more/b-{0..1}.tar\"\nembeddings = \"emb\"\n\
                [student]\nmodel = \"student.json\"\ninit = \"init.safetensors\"\n\
                [loss.cluster]\nenabled = false\n";
    let cfg = load(body);
    // Each `::`-joined source is relative on its own.
    let want = format!(
        "{}::{}",
        sub.join("a.tsv").display(),
        sub.join("../more/b-{0..1}.tar").display()
    );
    assert_eq!(cfg.data.dataset, PathBuf::from(want));
    assert_eq!(
        cfg.student.model,
        sub.join("student.json").display().to_string()
    );
    assert_eq!(cfg.student.init, Some(sub.join("init.safetensors")));
    // A preset name, and an absolute path, are left as they are.
    let body = format!(
        "[data]\ndataset = \"{}\"\nembeddings = \"emb\"\n[student]\nmodel = \"tiny\"\n\
         [loss.cluster]\nenabled = false\n",
        sub.join("a.tsv").display()
    );
    let cfg = load(&body);
    assert_eq!(cfg.data.dataset, sub.join("a.tsv"));
    assert_eq!(cfg.student.model, "tiny");
    let abs = sub.join("student.json").display().to_string();
    let cfg = load(&body.replace("\"tiny\"", &format!("\"{abs}\"")));
    assert_eq!(cfg.student.model, abs);
}

#[test]
fn defaults_in_code_are_the_documented_ones() {
    let c = DistillConfig::default();
    assert_eq!(
        (
            c.batch_size,
            c.epochs,
            c.seed,
            c.checkpoint_every,
            c.prefetch
        ),
        (32, 1, 0, 500, 2)
    );
    assert_eq!(
        (c.optim.lr, c.optim.warmup_steps, c.optim.clip_grad_norm),
        (5e-4, 100, 1.0)
    );
    assert_eq!(c.student.model, "tiny");
}
