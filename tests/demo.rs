//! The demo as library code: `clipcid_pipeline::demo::run` on a miniature of the default data
//! (no network, no binary), checking its progress lines, the report it returns and the files
//! it writes.
#![allow(clippy::unwrap_used)] // a failed step should fail the test with its error

use clipcid_pipeline::demo::{run, DemoOptions};

#[test]
fn the_demo_runs_as_a_library_and_reports_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let opts = DemoOptions {
        data: data.clone(),
        out: dir.path().join("out"),
        teacher: None,
        teacher_epochs: 1,
        student_epochs: 1,
    };
    // Without the data: an error that says how to fetch it, before anything is written.
    let err = run(&opts, &candle_core::Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("scripts/fetch-data.sh"), "{err}");
    assert!(!opts.out.exists());

    clipcid_suite::toy::default_data(&data).unwrap();
    let mut lines = vec![];
    let report = run(&opts, &candle_core::Device::Cpu, &mut |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    let steps: Vec<&String> = lines.iter().filter(|l| l.starts_with('[')).collect();
    assert_eq!(steps.len(), 9, "{lines:#?}");
    for (i, line) in steps.iter().enumerate() {
        assert!(line.starts_with(&format!("[{}/9]", i + 1)), "{line}");
    }
    // Teacher, distilled student and baseline, one row each under the table's header.
    assert_eq!(report.table.lines().count(), 5, "{}", report.table);
    assert!(report.teacher_note.contains("not OpenAI CLIP"));
    let readme = std::fs::read_to_string(&report.report).unwrap();
    assert!(readme.contains(report.table.trim()), "{readme}");
    // The run configs the demo wrote parse back as `clipcid distill` reads them.
    for name in ["distill.toml", "baseline.toml"] {
        let cfg = clipcid_train::DistillConfig::from_file(&opts.out.join(name)).unwrap();
        assert_eq!(cfg.epochs, 1);
    }
}
