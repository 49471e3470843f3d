//! The demo as library code: `clipcid_pipeline::demo::run` on a miniature of the default data
//! (no network, no binary), checking its progress lines, the ablation it returns and the
//! files it writes.
#![allow(clippy::unwrap_used)] // a failed step should fail the test with its error

use candle_core::Device;
use clipcid_models::ClipModel;
use clipcid_pipeline::demo::{run, Arm, DemoOptions};
use clipcid_train::{DistillConfig, Mode, Needs, TrainingSet};

#[test]
fn the_demo_runs_the_ablation_as_a_library_and_reports_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let opts = DemoOptions {
        // Two teacher epochs tell the toy images apart well enough that balancing keeps
        // more than the subset (one epoch keeps 18 of 256).
        teacher_epochs: 2,
        student_epochs: 1,
        piccollage_epochs: 2,
        student_rows: 32,
        seeds: 2,
        ..DemoOptions::new(&data, dir.path().join("out"))
    };
    // Without the data: an error that says how to fetch it, before anything is written.
    let err = run(&opts, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("scripts/fetch-data.sh"), "{err}");
    assert!(!opts.out.exists());

    clipcid_suite::toy::default_data(&data).unwrap();
    let mut lines = vec![];
    let report = run(&opts, &Device::Cpu, &mut |l| lines.push(l.to_string())).unwrap();
    let steps: Vec<&String> = lines.iter().filter(|l| l.starts_with('[')).collect();
    assert_eq!(steps.len(), 8, "{lines:#?}");
    for (i, line) in steps.iter().enumerate() {
        assert!(line.starts_with(&format!("[{}/8]", i + 1)), "{line}");
    }
    // The teacher and the four arms, under the table's header.
    assert_eq!(report.table.lines().count(), 7, "{}", report.table);
    assert!(
        report.table.contains("32-row subset, 2 seeds"),
        "{}",
        report.table
    );
    assert!(report.teacher_note.contains("not OpenAI CLIP"));
    assert_eq!(report.ordering.len(), 2);
    assert!(report.ordering[0].starts_with("zero-shot top-1: CLIP only "));
    let arms: Vec<Arm> = report.ablation.iter().map(|a| a.arm).collect();
    assert_eq!(arms, Arm::ALL);
    for a in &report.ablation {
        let seeds: Vec<u64> = a.seeds.iter().map(|s| s.seed).collect();
        assert_eq!(seeds, [0, 1], "{:?}", a.arm);
        for s in &a.seeds {
            assert!((0.0..=1.0).contains(&s.zero_shot) && (0.0..=1.0).contains(&s.linear_probe));
            // One epoch of 32 rows at batch 16; PicCollage two.
            let epochs = if a.arm == Arm::PicCollage { 2 } else { 1 };
            assert_eq!(s.steps, 2 * epochs, "{:?}", a.arm);
        }
    }
    let readme = std::fs::read_to_string(&report.report).unwrap();
    for want in [
        report.table.trim(),
        "### Every run",
        &report.ordering[1],
        "Total time",
    ] {
        assert!(readme.contains(want), "missing `{want}` in:\n{readme}");
    }

    // Every run config parses back as `clipcid distill` reads it, and every student learned
    // from the same 32 rows.
    let mut rows = None;
    for arm in Arm::ALL {
        for seed in 0..2 {
            let path = opts
                .out
                .join(format!("configs/{}-seed{seed}.toml", arm.name()));
            let cfg = DistillConfig::from_file(&path).unwrap();
            assert_eq!((cfg.seed, cfg.data.subset), (seed, Some(32)));
            assert_eq!(cfg.mode == Mode::Piccollage, arm == Arm::PicCollage);
            let ids = TrainingSet::load(&cfg.data, Needs::default())
                .unwrap()
                .ids()
                .to_vec();
            assert_eq!(ids.len(), 32);
            assert_eq!(
                rows.get_or_insert_with(|| ids.clone()),
                &ids,
                "{arm:?} {seed}"
            );
        }
    }

    // The PicCollage students kept the teacher's text side exactly; their image towers
    // started from different seeds.
    let teacher = ClipModel::load(&data.join("teacher-lit"), &Device::Cpu).unwrap();
    let student = |seed: u32| {
        let dir = opts.out.join(format!("runs/piccollage-seed{seed}/student"));
        ClipModel::load(&dir, &Device::Cpu).unwrap()
    };
    let flat = |m: &ClipModel, name: &str| {
        m.tensors()[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (s0, s1) = (student(0), student(1));
    // Its folder carries the teacher's tokenizer (the run itself reads no captions).
    let tok = opts
        .out
        .join("runs/piccollage-seed0/student/tokenizer.json");
    assert_eq!(
        std::fs::read(tok).unwrap(),
        std::fs::read(opts.out.join("piccollage-init/seed0/tokenizer.json")).unwrap()
    );
    for name in [
        "text_projection.weight",
        "text_model.embeddings.word_embeddings.weight",
        "logit_scale",
    ] {
        assert_eq!(flat(&s0, name), flat(&teacher, name), "{name}");
    }
    let patch = "vision_model.embeddings.patch_embedding.weight";
    assert_ne!(flat(&s0, patch), flat(&s1, patch));
}

#[test]
fn with_a_clip_teacher_the_piccollage_arm_keeps_its_clip_text_tower() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    clipcid_suite::toy::default_data(&data).unwrap();
    // A (random) CLIP given with --teacher: a CLIP text tower and its byte-level tokenizer.
    let teacher_dir = dir.path().join("clip-teacher");
    let cfg = clipcid_models::ClipConfig::preset("tiny").unwrap();
    ClipModel::random(&cfg, 11, &Device::Cpu)
        .unwrap()
        .save_pretrained(&teacher_dir, candle_core::DType::F32)
        .unwrap();
    clipcid_models::ClipTokenizer::byte_level(16)
        .unwrap()
        .save(&teacher_dir.join("tokenizer.json"))
        .unwrap();
    let opts = DemoOptions {
        teacher: Some(teacher_dir.clone()),
        student_epochs: 1,
        piccollage_epochs: 1,
        student_rows: 16,
        seeds: 1,
        ..DemoOptions::new(&data, dir.path().join("out"))
    };
    let report = run(&opts, &Device::Cpu, &mut |_| {}).unwrap();
    assert!(
        report.table.contains("| teacher (pretrained CLIP) |"),
        "{}",
        report.table
    );
    assert!(
        report.table.contains("| its own training data |"),
        "{}",
        report.table
    );
    let student = ClipModel::load(
        &opts.out.join("runs/piccollage-seed0/student"),
        &Device::Cpu,
    )
    .unwrap();
    let teacher = ClipModel::load(&teacher_dir, &Device::Cpu).unwrap();
    assert_eq!(student.config().text_config, teacher.config().text_config);
    let name = "text_model.embeddings.token_embedding.weight";
    let values = |m: &ClipModel| {
        m.tensors()[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(values(&student), values(&teacher));
}
