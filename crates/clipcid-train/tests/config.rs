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
