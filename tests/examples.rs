//! Runs every example in `examples/` with its small defaults (generated inputs), the way
//! `cargo run --example NAME` does, and checks what each one promises.
#![allow(clippy::unwrap_used)] // a failed example should fail the test with its error

use clap::Parser;

#[path = "../examples/clip_cid.rs"]
mod clip_cid;
#[path = "../examples/dedup.rs"]
mod dedup;
#[path = "../examples/piccollage.rs"]
mod piccollage;
#[path = "../examples/zero_shot.rs"]
mod zero_shot;

fn out_arg(dir: &std::path::Path) -> String {
    dir.to_string_lossy().into_owned()
}

#[test]
fn dedup_example_removes_exactly_the_planted_copies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keep.safetensors");
    let args = dedup::Args::parse_from(["dedup", "--out", &out_arg(&out)]);
    let o = dedup::run(&args).unwrap();
    let s = &o.result.summary;
    assert_eq!((s.n, s.kept, s.removed), (2000, 1400, 600));
    // The keep file says the same, and every threshold of the sweep finds the same sets.
    assert_eq!(clipcid_store::KeepList::read(&out).unwrap().kept(), 1400);
    assert!(s.sweep.iter().all(|r| r.kept == 1400), "{:?}", s.sweep);
}

#[test]
fn zero_shot_example_classifies_every_image_into_the_folder_classes() {
    let dir = tempfile::tempdir().unwrap();
    let args = zero_shot::Args::parse_from(["zero_shot", "--out", &out_arg(dir.path())]);
    let md = zero_shot::run(&args).unwrap();
    assert!(md.contains("(24 images, 4 classes"), "{md}");
    let results = std::fs::read_to_string(dir.path().join("report/results.json")).unwrap();
    for (class, _) in clipcid_suite::toy::COLOURS {
        assert!(results.contains(class), "{class} missing from:\n{results}");
    }
}

#[test]
fn piccollage_example_ships_a_half_size_fp16_image_tower() {
    let dir = tempfile::tempdir().unwrap();
    let args = piccollage::Args::parse_from(["piccollage", "--out", &out_arg(dir.path())]);
    let export = piccollage::run(&args).unwrap();
    let teacher = clipcid_models::ClipConfig::preset("tiny").unwrap();
    let student = clipcid_models::ClipModel::load(
        &dir.path().join("student-fp16"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (t, s) = (&teacher.vision_config, &student.config().vision_config);
    assert_eq!(s.hidden_size * 2, t.hidden_size);
    assert_eq!(s.num_hidden_layers, (t.num_hidden_layers / 2).max(1));
    assert_eq!(student.config().projection_dim, teacher.projection_dim);
    assert!(export.report.min_cosine > 0.99, "{:?}", export.report);
}

#[test]
fn clip_cid_example_runs_the_whole_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let args = clip_cid::Args::parse_from(["clip_cid", "--out", &out_arg(dir.path())]);
    let md = clip_cid::run(&args).unwrap();
    for file in [
        "keep.safetensors",
        "clusters.safetensors",
        "distill.toml",
        "run/student/model.safetensors",
        "report/report.md",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    assert!(md.contains("teacher") && md.contains("student"), "{md}");
    // The probe is fitted on its own split and scored on the evaluation set.
    let probe = dir.path().join("probe-train").display().to_string();
    assert!(
        md.contains("## Linear probe") && md.contains(&format!("frozen image features of {probe}")),
        "{md}"
    );
}
