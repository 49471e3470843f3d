//! The `clipcid` binary end to end: init-model, tokenizer, embed (with resume), errors.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::path::Path;
use std::process::Command;

mod common;

use common::{clipcid, s};

#[test]
fn embed_from_the_command_line_with_resume_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    std::fs::create_dir(&data).unwrap();
    let mut tsv = String::new();
    for i in 0..5u8 {
        image::RgbImage::from_pixel(40, 30, image::Rgb([i * 50, 10, 10]))
            .save(data.join(format!("{i}.png")))
            .unwrap();
        tsv.push_str(&format!("{i}.png\ta picture {i}\n"));
    }
    std::fs::write(data.join("broken.png"), b"\x89PNG garbage").unwrap();
    tsv.push_str("broken.png\tbroken\n");
    std::fs::write(data.join("captions.tsv"), tsv).unwrap();

    let model = d.join("teacher.safetensors");
    let (ok, out) = clipcid(&[
        "init-model",
        "--preset",
        "tiny",
        "--seed",
        "4",
        "--out",
        s(&model),
    ]);
    assert!(ok, "{out}");
    let emb = d.join("emb");
    let base = [
        "embed",
        "--teacher",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&emb),
        "--quiet",
    ];

    let (ok, out) = clipcid(&base);
    assert!(!ok);
    assert!(out.contains("has captions but no tokenizer"), "{out}");

    let tok = d.join("tokenizer.json");
    let (ok, out) = clipcid(&["tokenizer", "--out", s(&tok)]);
    assert!(ok && out.contains("514 tokens"), "{out}");
    let mut args = base.to_vec();
    args.extend([
        "--tokenizer",
        s(&tok),
        "--shard-size",
        "3",
        "--batch-size",
        "2",
    ]);
    let (ok, out) = clipcid(&args);
    assert!(ok, "{out}");
    assert!(
        out.contains("embedded 5 images") && out.contains("into 2 shard(s)"),
        "{out}"
    );
    assert!(
        out.contains("skipped 1 unreadable sample(s): broken.png"),
        "{out}"
    );
    let (ok, out) = clipcid(&args);
    assert!(
        ok && out.contains("embedded 0 images") && out.contains("(2 resumed"),
        "{out}"
    );

    let (ok, out) = clipcid(&[
        "embed",
        "--teacher",
        s(&d.join("missing.safetensors")),
        "--data",
        s(&data),
        "--out",
        s(&emb),
    ]);
    assert!(
        !ok && out.contains("missing.safetensors") && out.contains("no such"),
        "{out}"
    );
    let (ok, out) = clipcid(&["--device", "tpu", "init-model", "--out", s(&model)]);
    assert!(!ok && out.contains("unknown device `tpu`"), "{out}");
}

#[test]
fn balance_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Rows 0 and 2 are near-duplicates (distance 0.02), row 1 is far away.
    let rows = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9998, 0.02, 0.0]];
    let t = candle_core::Tensor::new(&rows, &candle_core::Device::Cpu).unwrap();
    let emb = d.join("emb.safetensors");
    clipcid_store::io::write_safetensors(&emb, [("image".to_string(), t)], &Default::default())
        .unwrap();
    let out = d.join("keep.safetensors");
    let (ok, text) = clipcid(&[
        "balance",
        "--embeddings",
        s(&emb),
        "--out",
        s(&out),
        "--sweep",
        "0.01,0.5",
        "--quiet",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("2 sets, kept 2, removed 1 (33.33%), largest set 2"),
        "{text}"
    );
    assert!(text.contains("| 0.01 | 3 | 0.00 |"), "{text}");
    let keep = clipcid_store::io::load_tensors(&out).unwrap();
    assert_eq!(keep["keep"].to_vec1::<u8>().unwrap(), vec![1, 1, 0]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("keep.json")).unwrap()).unwrap();
    assert_eq!(summary["removed"], 1);

    let (ok, text) = clipcid(&[
        "balance",
        "--embeddings",
        s(&d.join("nothing")),
        "--out",
        s(&out),
    ]);
    assert!(!ok && text.contains("nothing"), "{text}");
}

#[test]
fn cluster_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Three tight groups of four on the axes of R^3, plus an exact duplicate of row 0.
    let mut rows: Vec<[f32; 3]> = Vec::new();
    for i in 0..12 {
        let mut r = [0.02 * (i % 4) as f32; 3];
        r[i % 3] = 1.0;
        rows.push(r);
    }
    rows.push(rows[0]);
    let flat: Vec<f32> = rows.concat();
    let t = candle_core::Tensor::from_vec(flat, (13, 3), &candle_core::Device::Cpu).unwrap();
    let emb = d.join("emb.safetensors");
    clipcid_store::io::write_safetensors(&emb, [("image".to_string(), t)], &Default::default())
        .unwrap();
    let keep = d.join("keep.safetensors");
    let (ok, text) = clipcid(&[
        "balance",
        "--embeddings",
        s(&emb),
        "--out",
        s(&keep),
        "--threshold",
        "0.001",
        "--quiet",
    ]);
    assert!(ok && text.contains("kept 12, removed 1"), "{text}");
    let out = d.join("clusters.safetensors");
    let (ok, text) = clipcid(&[
        "cluster",
        "--embeddings",
        s(&emb),
        "--keep",
        s(&keep),
        "--out",
        s(&out),
        "--k",
        "3",
        "--init",
        "kmeans++",
        "--iterations",
        "5",
        "--quiet",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("clustered 12 of 13 rows into K = 3"),
        "{text}"
    );
    assert!(text.contains("min 4, median 4, max 4, empty 0"), "{text}");
    let file = clipcid_store::read_clusters(&out).unwrap();
    // Kept rows are 0..12 (row 12 duplicates row 0 and is dropped); groups are i % 3.
    assert_eq!(file.ids, (0..12).collect::<Vec<i64>>());
    for i in 0..12 {
        assert_eq!(file.labels[i], file.labels[i % 3], "row {i}");
    }
    assert!(d.join("clusters.json").exists() && d.join("clusters.png").exists());

    // Unbalanced run compared in the same picture; then clear errors.
    let before = d.join("before.safetensors");
    let (ok, text) = clipcid(&[
        "cluster",
        "--embeddings",
        s(&emb),
        "--out",
        s(&before),
        "--k",
        "3",
        "--compare",
        s(&out),
        "--quiet",
    ]);
    assert!(ok && text.contains("clustered 13 of 13 rows"), "{text}");
    let (ok, text) = clipcid(&[
        "cluster",
        "--embeddings",
        s(&emb),
        "--out",
        s(&before),
        "--k",
        "14",
        "--quiet",
    ]);
    assert!(
        !ok && text.contains("K = 14") && text.contains("(13)"),
        "{text}"
    );
    let (ok, text) = clipcid(&[
        "cluster",
        "--embeddings",
        s(&emb),
        "--out",
        s(&before),
        "--k",
        "2",
        "--init",
        "best",
    ]);
    assert!(
        !ok && text.contains("unknown k-means init `best`"),
        "{text}"
    );
}

#[test]
fn demo_then_distill_with_stop_and_resume_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("demo");
    let data = d.join("data");
    // Without the fetched data: a clear error saying how to get it.
    let (ok, text) = clipcid(&["demo", "--data", s(&data), "--out", s(&out)]);
    assert!(!ok && text.contains("scripts/fetch-data.sh"), "{text}");
    // An epoch count of 0 is refused before anything runs (--piccollage-epochs 0 failed
    // after two thirds of the ablation, naming a run config the demo had written).
    for flag in [
        "--teacher-epochs",
        "--student-epochs",
        "--piccollage-epochs",
    ] {
        let (ok, text) = clipcid(&["demo", "--data", s(&data), "--out", s(&out), flag, "0"]);
        assert!(
            !ok && text.contains(&format!("{flag} 0")) && text.contains("at least 1"),
            "{text}"
        );
        assert!(!out.exists());
    }
    clipcid_suite::toy::default_data(&data).unwrap();
    // The whole pipeline at a toy size; no ../shared/teacher beside the temp folder, so the
    // locked-text teacher is built (and reused by a second run).
    let demo = |teacher_epochs: &str| {
        Command::new(env!("CARGO_BIN_EXE_clipcid"))
            .current_dir(d)
            .args([
                "demo",
                "--data",
                "data",
                "--out",
                "demo",
                "--teacher-epochs",
                teacher_epochs,
                "--student-epochs",
                "1",
                "--piccollage-epochs",
                "1",
                "--student-rows",
                "64",
                "--seeds",
                "1",
            ])
            .output()
            .expect("run clipcid")
    };
    let run = demo("2");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{text}");
    for want in [
        "[8/8]",
        "| teacher (locked-text, not OpenAI CLIP)",
        "| CLIP loss only (no teacher) |",
        "| CLIP + cluster + instance (CLIP-CID) |",
        "| PicCollage: image tower only",
        "64-row subset, 1 seed |",
        "zero-shot top-1: CLIP only",
        "not OpenAI CLIP",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    let report = std::fs::read_to_string(out.join("report/README.md")).unwrap();
    for want in [
        "zero-shot top-1",
        "## Data: sizes, sources, licences",
        "| generated | 256 |",
        "Teacher provenance",
    ] {
        assert!(report.contains(want), "missing `{want}` in:\n{report}");
    }
    for png in [
        "cluster-sizes.png",
        "loss-clip-only.png",
        "loss-clip-cluster.png",
        "loss-clip-cid.png",
        "loss-piccollage.png",
    ] {
        assert!(
            out.join("report").join(png).metadata().unwrap().len() > 1000,
            "{png}"
        );
    }
    assert!(data.join("teacher-lit/teacher.json").is_file());
    let again = demo("2");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("reusing it"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    // `clipcid distill` on the config the demo wrote: stop after 1 step, then resume.
    let cfg = out.join("configs/clip-cid-seed0.toml");
    let run = d.join("run");
    let (ok, text) = clipcid(&[
        "distill",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--max-steps",
        "1",
        "--quiet",
    ]);
    assert!(
        ok && text.contains("stopped at step 1") && text.contains("--resume"),
        "{text}"
    );
    let (ok, text) = clipcid(&[
        "distill",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--resume",
        "--quiet",
    ]);
    assert!(
        ok && text.contains("resuming at step 1")
            && text.contains("student (Hugging Face CLIP folder)"),
        "{text}"
    );
    assert!(
        run.join("student/model.safetensors").exists() && run.join("student/config.json").exists()
    );
    // Clear errors: an unknown key, and resume with nothing to resume.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "batch_sise = 4\n[data]\ndataset = \"x\"\n").unwrap();
    let (ok, text) = clipcid(&["distill", "--config", s(&bad), "--out", s(&run)]);
    assert!(
        !ok && text.contains("bad.toml") && text.contains("batch_sise"),
        "{text}"
    );
    let (ok, text) = clipcid(&[
        "distill",
        "--config",
        s(&cfg),
        "--out",
        s(&d.join("empty")),
        "--resume",
    ]);
    assert!(
        !ok && text.contains("no checkpoint to resume from"),
        "{text}"
    );
}

/// Writes `n` images per colour class into `root/<class>/`.
fn labelled_set(root: &Path, n: u8, offset: u8) {
    for (class, rgb) in [
        ("red", [200, 30, 30]),
        ("green", [30, 180, 40]),
        ("deep_blue", [20, 40, 200]),
    ] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let v = ((x + y) as u8).wrapping_mul(i + offset) / 8;
                image::Rgb(rgb.map(|c: u8| c.saturating_add(v)))
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}

/// A random `tiny` model (`student.safetensors`, of `seed`) and the byte-level
/// `tokenizer.json` in `d`, written by the command line.
fn tiny_student_and_tokenizer(d: &Path, seed: &str) {
    let (ok, out) = clipcid(&[
        "init-model",
        "--preset",
        "tiny",
        "--seed",
        seed,
        "--out",
        s(&d.join("student.safetensors")),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = clipcid(&["tokenizer", "--out", s(&d.join("tokenizer.json"))]);
    assert!(ok, "{out}");
}

#[test]
fn eval_reads_a_clip_benchmark_set_with_its_class_names_and_templates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_student_and_tokenizer(d, "0");
    let set = d.join("wds_colours");
    let n = clipcid_suite::write_clip_benchmark_set(&set, 4).unwrap();
    let student = d.join("student.safetensors");
    let zero_shot = |data: &Path, report: &Path| {
        clipcid(&[
            "eval",
            "--model",
            s(&student),
            "--zero-shot",
            s(data),
            "--out",
            s(report),
        ])
    };
    // The set's root (its `test` split) and the split folder itself, without --templates:
    // the set's own `{c}` templates and class names are used.
    for data in [set.clone(), set.join("test")] {
        let report = d.join("report");
        let (ok, text) = zero_shot(&data, &report);
        assert!(ok, "{text}");
        let want = format!("{n} images, 3 classes, prompt templates: 2");
        assert!(text.contains(&want), "missing `{want}` in:\n{text}");
        let results: serde_json::Value =
            serde_json::from_slice(&std::fs::read(report.join("results.json")).unwrap()).unwrap();
        let acc = results["zero_shot"][0]["top1"].as_f64();
        assert!(acc.is_some_and(|a| (0.0..=1.0).contains(&a)), "{results}");
        // The same figure in CLIP_benchmark's shape, named by the set, not its split folder.
        let record = report
            .join("clip_benchmark/wds_colours_student_student_en_zeroshot_classification.json");
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        assert_eq!(record["task"], "zeroshot_classification");
        assert_eq!(record["metrics"]["acc1"].as_f64(), acc, "{record}");
        assert!(
            record["metrics"]["mean_per_class_recall"].is_f64(),
            "{record}"
        );
        // 3 classes: no top-5 (CLIP_benchmark's NaN), written as JSON's null and `-`.
        assert!(record["metrics"]["acc5"].is_null(), "{record}");
        assert!(
            text.contains("| student | ") && text.contains("% | - | "),
            "{text}"
        );
    }
    // The same shards as a plain WebDataset (no classnames.txt): its `.cls` labels have no
    // names. Zero-shot asks for --class-names (given them, it was refused: "3 class names
    // given for 0 class folders"); the linear probe counts the labels (it refused every
    // sample as "past the set's 0 classes").
    let plain = d.join("plain");
    // The probe's test split: the same shards, in a folder of their own.
    let plain_test = d.join("plain-test");
    for dir in [&plain, &plain_test] {
        std::fs::create_dir_all(dir).unwrap();
        for shard in ["0.tar", "1.tar"] {
            std::fs::copy(set.join("test").join(shard), dir.join(shard)).unwrap();
        }
    }
    let (ok, text) = zero_shot(&plain, &d.join("report-plain"));
    assert!(
        !ok && text.contains("plain") && text.contains("--class-names"),
        "{text}"
    );
    std::fs::write(d.join("names.txt"), "red\ngreen\ndeep blue\n").unwrap();
    let eval_student = |more: &[&str]| {
        let mut args = vec!["eval", "--model", s(&student)];
        args.extend(more);
        clipcid(&args)
    };
    let (ok, text) = eval_student(&[
        "--zero-shot",
        s(&plain),
        "--class-names",
        s(&d.join("names.txt")),
        "--probe-train",
        s(&plain),
        "--probe-test",
        s(&plain_test),
        "--out",
        s(&d.join("report-plain")),
    ]);
    assert!(
        ok && text.contains(&format!("{n} images, 3 classes")) && text.contains("(3 classes)"),
        "{text}"
    );
    // One set as both splits (here by another spelling of its path) would score the probe
    // on the images it was fitted on.
    let (ok, text) = eval_student(&[
        "--probe-train",
        s(&plain),
        "--probe-test",
        &format!("{}/.", s(&plain)),
        "--out",
        s(&d.join("report-same")),
    ]);
    assert!(
        !ok && text.contains("the linear probe's test set is its training set"),
        "{text}"
    );
    // A class name given twice: said, as zero-shot can never predict the later class.
    std::fs::write(d.join("names-twice.txt"), "red\nred\ndeep blue\n").unwrap();
    let (ok, text) = eval_student(&[
        "--zero-shot",
        s(&plain),
        "--class-names",
        s(&d.join("names-twice.txt")),
        "--out",
        s(&d.join("report-twice-named")),
    ]);
    assert!(
        ok && text.contains("classes 0 and 1 are both named `red`")
            && text.contains("never predicts class 1"),
        "{text}"
    );
    // A wrong shard count names the file: one that is not a number, and one past the shards
    // there (a damaged count of 10^15 listed that many paths before opening any, and filled
    // memory).
    for (count, says) in [
        ("three", "`three`"),
        ("1000000000000000", "names 1000000000000000 shards"),
    ] {
        std::fs::write(set.join("test/nshards.txt"), count).unwrap();
        let (ok, text) = zero_shot(&set, &d.join("report2"));
        assert!(
            !ok && text.contains("nshards.txt") && text.contains(says),
            "{text}"
        );
    }
    // A `.cls` member that is not a class number, and one past the class list, name the
    // sample (the first read as "no class label" with no word of the member; the second
    // failed with no sample or file named).
    std::fs::write(set.join("test/nshards.txt"), "2").unwrap();
    let shard = set.join("test/1.tar");
    let original = std::fs::read(&shard).unwrap();
    for (cls, says) in [
        ("cat", "has no class label (its `.cls` member"),
        ("7", "has class 7, past the set's 3 classes"),
    ] {
        let mut edited = tar::Builder::new(Vec::new());
        let mut entries = tar::Archive::new(original.as_slice());
        for entry in entries.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            if name == format!("s{n:06}.cls", n = n - 1) {
                bytes = cls.as_bytes().to_vec();
            }
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            edited
                .append_data(&mut header, &name, bytes.as_slice())
                .unwrap();
        }
        std::fs::write(&shard, edited.into_inner().unwrap()).unwrap();
        let (ok, text) = zero_shot(&set, &d.join("report3"));
        let key = format!("sample `s{:06}`", n - 1);
        assert!(
            !ok && text.contains(&key) && text.contains(says) && text.contains("wds_colours"),
            "{text}"
        );
    }
}

#[test]
fn eval_textness_and_export_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (seed, name) in [("1", "student.safetensors"), ("2", "teacher.safetensors")] {
        let (ok, out) = clipcid(&[
            "init-model",
            "--preset",
            "tiny",
            "--seed",
            seed,
            "--out",
            s(&d.join(name)),
        ]);
        assert!(ok, "{out}");
    }
    let (ok, out) = clipcid(&["tokenizer", "--out", s(&d.join("tokenizer.json"))]);
    assert!(ok, "{out}");
    labelled_set(&d.join("train"), 6, 1);
    labelled_set(&d.join("test"), 3, 9);
    let captioned = d.join("captioned");
    std::fs::create_dir_all(&captioned).unwrap();
    let mut tsv = String::new();
    for i in 0..6u8 {
        image::RgbImage::from_pixel(32, 32, image::Rgb([i * 40, 100, 255 - i * 40]))
            .save(captioned.join(format!("{i}.png")))
            .unwrap();
        tsv.push_str(&format!("{i}.png\tcolour number {i}\n"));
    }
    std::fs::write(captioned.join("captions.tsv"), tsv).unwrap();
    std::fs::write(d.join("queries.txt"), "red\nsomething blue\n").unwrap();
    let student = d.join("student.safetensors");
    let eval_student = |more: &[&str]| {
        let mut args = vec!["eval", "--model", s(&student)];
        args.extend(more);
        clipcid(&args)
    };
    let report = d.join("report");
    let (ok, text) = eval_student(&[
        "--teacher",
        s(&d.join("teacher.safetensors")),
        "--compare",
        &format!("again={}", s(&d.join("student.safetensors"))),
        "--zero-shot",
        s(&d.join("test")),
        "--templates",
        "cifar",
        "--probe-train",
        s(&d.join("train")),
        "--probe-test",
        s(&d.join("test")),
        "--retrieval",
        s(&captioned),
        "--queries",
        s(&d.join("queries.txt")),
        "--out",
        s(&report),
    ]);
    assert!(ok, "{text}");
    for want in [
        "## Zero-shot classification",
        "9 images, 3 classes, prompt templates: 18",
        "## Linear probe",
        "## Retrieval",
        "## Agreement with the teacher",
        "| again |",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    // The same weights under two names agree with the teacher exactly alike.
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("results.json")).unwrap()).unwrap();
    let (student, again) = (&results["agreement"][0], &results["agreement"][1]);
    assert_eq!(
        (&student[0], &again[0]),
        (&"student".into(), &"again".into())
    );
    assert_eq!(student[1], again[1]);
    assert_eq!(
        results["models"],
        serde_json::json!(["teacher", "student", "again"])
    );
    for png in [
        "zero-shot-per-class.png",
        "zero-shot-confusion-student.png",
        "linear-probe-per-class.png",
    ] {
        assert!(report.join(png).metadata().unwrap().len() > 1000, "{png}");
    }
    // Class names come from the folder names, `_` as a space, in sorted order.
    assert_eq!(results["class_names"][0], "deep blue");
    // Each model's preprocessing is recorded (clipcid's own files: transformers').
    let transformers = "shortest edge to 32 (bicubic), floor centre crop to 32, \
                        converted to RGB first (transparency over white)";
    assert_eq!(
        results["preprocessing"],
        serde_json::json!([transformers, transformers, transformers])
    );
    assert!(text.contains(&format!("images: {transformers}")), "{text}");
    // A name holding a path separator names its plot without it; two models of one name
    // (which would overwrite each other's plots and records) are refused.
    let named = |compare: &str, out: &str| {
        eval_student(&[
            "--compare",
            &format!("{compare}={}", s(&d.join("teacher.safetensors"))),
            "--zero-shot",
            s(&d.join("test")),
            "--out",
            s(&d.join(out)),
        ])
    };
    let (ok, text) = named("runs/b", "report-slash");
    assert!(ok, "{text}");
    assert!(d
        .join("report-slash/zero-shot-confusion-runs-b.png")
        .is_file());
    let records = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.join(dir).join("clip_benchmark"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(records("report-slash").len(), 2);
    // The same report folder for the student alone: `runs/b`'s plot and CLIP_benchmark
    // record are gone (they stayed beside the new report, for tools that read every record).
    let (ok, text) = eval_student(&[
        "--zero-shot",
        s(&d.join("test")),
        "--out",
        s(&d.join("report-slash")),
    ]);
    assert!(ok, "{text}");
    assert!(!d
        .join("report-slash/zero-shot-confusion-runs-b.png")
        .exists());
    assert_eq!(
        records("report-slash"),
        ["test_student_student_en_zeroshot_classification.json"]
    );
    let (ok, text) = named("student", "report-twice");
    assert!(
        !ok && text.contains("two models to evaluate are named `student`"),
        "{text}"
    );
    // Names that differ only in a path separator share their file names.
    let (test, out) = (d.join("test"), d.join("report-clash"));
    let (a, b) = (
        format!("runs/b={}", s(&d.join("teacher.safetensors"))),
        format!("runs-b={}", s(&d.join("teacher.safetensors"))),
    );
    let (ok, text) = eval_student(&[
        "--zero-shot",
        s(&test),
        "--out",
        s(&out),
        "--compare",
        &a,
        "--compare",
        &b,
    ]);
    assert!(
        !ok && text.contains("named `runs/b` and `runs-b`, one file name"),
        "{text}"
    );
    // A teacher with no tokenizer beside it: the error names the teacher's own flag (it
    // said `--tokenizer`, which gives the student's).
    let lone = d.join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::copy(
        d.join("teacher.safetensors"),
        lone.join("teacher.safetensors"),
    )
    .unwrap();
    let (ok, text) = eval_student(&[
        "--teacher",
        s(&lone.join("teacher.safetensors")),
        "--tokenizer",
        s(&d.join("tokenizer.json")),
        "--zero-shot",
        s(&d.join("test")),
        "--out",
        s(&d.join("report-lone")),
    ]);
    assert!(
        !ok && text.contains("no tokenizer for teacher")
            && text.contains("pass --teacher-tokenizer"),
        "{text}"
    );
    // In bf16 (features compared in f32) recalls move by at most one of the 6 captions: this
    // random student's near-ties may flip; the bf16 features themselves are checked to
    // cosine >= 0.999 by the device parity tests. This run passes --rgb-first, which leaves
    // these RGB images' pixels as they are; the results record it.
    let report16 = d.join("report-bf16");
    let (ok, text) = clipcid(&[
        "eval",
        "--model",
        s(&d.join("student.safetensors")),
        "--retrieval",
        s(&captioned),
        "--precision",
        "bf16",
        "--rgb-first",
        "--out",
        s(&report16),
    ]);
    assert!(ok && text.contains("## Retrieval"), "{text}");
    let r16: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report16.join("results.json")).unwrap()).unwrap();
    let rgb_first = r16["preprocessing"][0].as_str().unwrap();
    assert!(
        rgb_first.ends_with("converted to RGB first by the loader (alpha dropped)"),
        "{rgb_first}"
    );
    for dir in ["image_to_text", "text_to_image"] {
        for k in 0..3 {
            let (a, b) = (
                r16["retrieval"][0][dir][k].as_f64().unwrap(),
                results["retrieval"][1][dir][k].as_f64().unwrap(),
            );
            assert!((a - b).abs() <= 1.0 / 6.0 + 1e-9, "{dir}[{k}]: {a} vs {b}");
        }
    }
    let (ok, text) = eval_student(&[]);
    assert!(!ok && text.contains("nothing to evaluate"), "{text}");
    // No images per forward pass is refused (it was read as 1).
    let (ok, text) = eval_student(&[
        "--zero-shot",
        s(&d.join("test")),
        "--batch-size",
        "0",
        "--out",
        s(&d.join("report-batch0")),
    ]);
    assert!(
        !ok && text.contains("batch size must be at least 1"),
        "{text}"
    );
    assert!(!d.join("report-batch0").exists());
    // One class: every image is "right" whatever the model.
    std::fs::create_dir_all(d.join("one-class/red")).unwrap();
    std::fs::copy(d.join("test/red/0.png"), d.join("one-class/red/0.png")).unwrap();
    let (ok, text) = eval_student(&[
        "--zero-shot",
        s(&d.join("one-class")),
        "--out",
        s(&d.join("report-one")),
    ]);
    assert!(
        !ok && text.contains("one-class") && text.contains("at least 2 classes, this set has 1"),
        "{text}"
    );
    let (ok, text) = clipcid(&[
        "eval",
        "--model",
        s(&d.join("student.safetensors")),
        "--compare",
        "nopath",
        "--retrieval",
        s(&captioned),
    ]);
    assert!(!ok && text.contains("NAME=PATH"), "{text}");

    // Textness on the labelled images (as a plain folder of files).
    let photos = d.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for (i, e) in std::fs::read_dir(d.join("train/red")).unwrap().enumerate() {
        std::fs::copy(e.unwrap().path(), photos.join(format!("{i}.png"))).unwrap();
    }
    let tx = d.join("textness");
    let (ok, text) = clipcid(&[
        "textness",
        "--model",
        s(&d.join("student.safetensors")),
        "--images",
        s(&photos),
        "--query",
        "a red square",
        "--scales=-1,0,1",
        "--top",
        "4",
        "--out",
        s(&tx),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("| -1 |") && text.contains("| +1 |"), "{text}");
    assert!(tx.join("textness.safetensors").exists());
    assert!(tx.join("grid-0.png").metadata().unwrap().len() > 1000);
    // A file of --images again under --text-images (a copy) is refused, naming both.
    let signs = d.join("signs");
    std::fs::create_dir_all(&signs).unwrap();
    std::fs::copy(photos.join("1.png"), signs.join("copy.png")).unwrap();
    let (ok, text) = clipcid(&[
        "textness",
        "--model",
        s(&d.join("student.safetensors")),
        "--images",
        s(&photos),
        "--text-images",
        s(&signs),
        "--out",
        s(&d.join("textness-both")),
    ]);
    assert!(
        !ok && text.contains("copy.png: the same picture as")
            && text.contains("1.png (--images, without text)"),
        "{text}"
    );
    // The study's pictures are not written among the images it reads.
    let (ok, text) = clipcid(&[
        "textness",
        "--model",
        s(&d.join("student.safetensors")),
        "--images",
        s(&photos),
        "--out",
        s(&photos),
    ]);
    assert!(!ok && text.contains("the --images folder"), "{text}");
    assert!(!photos.join("grid-0.png").exists());

    // FP16 export.
    let fp16 = d.join("fp16");
    let student_file = d.join("student.safetensors");
    let export_student = |more: &[&str]| {
        let mut args = vec!["export", "--model", s(&student_file), "--out", s(&fp16)];
        args.extend(more);
        clipcid(&args)
    };
    let (ok, text) = export_student(&["--sample", s(&d.join("test"))]);
    assert!(ok, "{text}");
    assert!(
        text.contains("9 images of") && text.contains("min cosine"),
        "{text}"
    );
    assert!(fp16.join("model.safetensors").exists() && fp16.join("tokenizer.json").exists());
    // A plain folder of images (as `textness --images` takes) samples its first files by
    // name; it was refused as "no images found".
    let flat = d.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for i in 0..3u8 {
        image::RgbImage::from_pixel(40, 30, image::Rgb([i * 80, 20, 200]))
            .save(flat.join(format!("{i}.png")))
            .unwrap();
    }
    let (ok, text) = export_student(&["--sample", s(&flat), "--samples", "2"]);
    assert!(ok && text.contains("2 images of"), "{text}");
    // An export replaces the earlier export's files that it does not write: open_clip's
    // weights stayed beside a later Hugging Face export's (of any model), for open_clip to load.
    let (ok, text) = export_student(&["--format", "open-clip"]);
    assert!(ok, "{text}");
    assert!(fp16.join("open_clip_model.safetensors").is_file());
    let (ok, text) = export_student(&[]);
    assert!(ok, "{text}");
    assert!(!fp16.join("open_clip_model.safetensors").exists());
    assert!(!fp16.join("open_clip_config.json").exists());
    assert!(fp16.join("model.safetensors").exists() && fp16.join("tokenizer.json").exists());
    let (ok, text) = clipcid(&[
        "export",
        "--model",
        s(&d.join("missing.safetensors")),
        "--out",
        s(&fp16),
    ]);
    assert!(!ok && text.contains("missing.safetensors"), "{text}");
    // The samples are one batch: a count past it is refused (10^10 random-pixel inputs
    // asked for 120 TB and aborted).
    // ... and so is none (it was read as 1).
    for (samples, says) in [
        (
            "10000000000",
            "--samples 10000000000 is more than one batch of 1024",
        ),
        (
            "0",
            "--samples 0: the FP16 error needs at least 1 sample image",
        ),
    ] {
        let (ok, text) = export_student(&["--samples", samples]);
        assert!(!ok && text.contains(says), "{text}");
    }
}

#[test]
fn hub_repo_ids_resolve_offline_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let snap = cache.join("models--someone--tiny-clip/snapshots/0123abcd");
    std::fs::create_dir_all(cache.join("models--someone--tiny-clip/refs")).unwrap();
    std::fs::write(
        cache.join("models--someone--tiny-clip/refs/main"),
        "0123abcd",
    )
    .unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    let (ok, out) = clipcid(&[
        "init-model",
        "--preset",
        "tiny",
        "--out",
        s(&snap.join("model.safetensors")),
    ]);
    assert!(ok, "{out}");
    let cfg = serde_json::to_vec(
        &clipcid_models::ClipConfig::preset("tiny")
            .unwrap()
            .to_hf_json(),
    )
    .unwrap();
    std::fs::write(snap.join("config.json"), cfg).unwrap();
    let run = |repo: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_clipcid"))
            .args([
                "export",
                "--model",
                repo,
                "--out",
                s(&dir.path().join("fp16")),
                "--samples",
                "2",
            ])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run("someone/tiny-clip");
    assert!(ok && text.contains("exported someone/tiny-clip"), "{text}");
    assert!(dir.path().join("fp16/model.safetensors").exists());
    let (ok, text) = run("someone/other");
    assert!(
        !ok && text.contains("HF_HUB_OFFLINE") && text.contains("`someone/other` is not cached"),
        "{text}"
    );
}

#[test]
fn init_model_writes_piccollages_student_with_the_teachers_text_tower() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let teacher = d.join("teacher");
    std::fs::create_dir(&teacher).unwrap();
    let (ok, text) = clipcid(&[
        "init-model",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--out",
        s(&teacher.join("model.safetensors")),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = clipcid(&["tokenizer", "--out", s(&teacher.join("tokenizer.json"))]);
    assert!(ok, "{text}");
    let out = d.join("student");
    let (ok, text) = clipcid(&[
        "init-model",
        "--image-tower-of",
        s(&teacher.join("model.safetensors")),
        "--seed",
        "5",
        "--out",
        s(&out),
    ]);
    assert!(
        ok && text.contains("image tower width 16, depth 1"),
        "{text}"
    );
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let cpu = candle_core::Device::Cpu;
    let t = clipcid_models::ClipModel::load(&teacher.join("model.safetensors"), &cpu).unwrap();
    let st = clipcid_models::ClipModel::load(&out, &cpu).unwrap();
    let values = |m: &clipcid_models::ClipModel, name: &str| {
        m.tensors()[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    // Every text-side tensor is the teacher's; the image tower is new and half as wide.
    let mut text_side = 0;
    for name in t.tensors().keys() {
        if name.starts_with("text_model.") || name.starts_with("text_projection.") {
            assert_eq!(values(&st, name), values(&t, name), "{name}");
            text_side += 1;
        }
    }
    assert!(text_side > 10);
    assert_eq!(values(&st, "logit_scale"), values(&t, "logit_scale"));
    let (v, tv) = (&st.config().vision_config, &t.config().vision_config);
    assert_eq!(
        (v.hidden_size * 2, v.num_hidden_layers * 2),
        (tv.hidden_size, tv.num_hidden_layers)
    );
    assert_eq!(st.config().projection_dim, t.config().projection_dim);
    // A teacher that is not there is an error naming it.
    let (ok, text) = clipcid(&[
        "init-model",
        "--image-tower-of",
        s(&d.join("nope.safetensors")),
        "--out",
        s(&d.join("x")),
    ]);
    assert!(!ok && text.contains("nope.safetensors"), "{text}");
}

/// Retrieval over images with several captions each, in the two ways a set holds them: a
/// WebDataset sample whose `.txt` has one caption per line, and a captions file that lists
/// an image once per caption (as Flickr30k's and COCO's files do). Both are 3 images with 6
/// captions and give the same recalls. The first was an error ("a 6 x 6 similarity matrix
/// needs 36 values, got 18"), the second counted 6 images, whose copies tied in every
/// ranking.
#[test]
fn retrieval_counts_each_image_once_with_all_its_captions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_student_and_tokenizer(d, "4");
    let captions = |i: usize| {
        [
            format!("a square of colour {i}"),
            format!("tint number {i}"),
        ]
    };
    let png = |i: usize| {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(i * 90) as u8, (x * 8) as u8, (y * 8) as u8])
        });
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    };
    let wds = d.join("wds");
    std::fs::create_dir_all(&wds).unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(wds.join("shard-000000.tar")).unwrap());
    let files = d.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut tsv = String::new();
    for i in 0..3 {
        let [a, b] = captions(i);
        for (ext, bytes) in [("png", png(i)), ("txt", format!("{a}\n{b}\n").into_bytes())] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("s{i:04}.{ext}"), bytes.as_slice())
                .unwrap();
        }
        std::fs::write(files.join(format!("{i}.png")), png(i)).unwrap();
        tsv.push_str(&format!("{i}.png\t{a}\n{i}.png\t{b}\n"));
    }
    tar.finish().unwrap();
    std::fs::write(files.join("captions.tsv"), tsv).unwrap();
    let recalls = |set: &Path, report: &str| {
        let (ok, text) = clipcid(&[
            "eval",
            "--model",
            s(&d.join("student.safetensors")),
            "--tokenizer",
            s(&d.join("tokenizer.json")),
            "--retrieval",
            s(set),
            "--out",
            s(&d.join(report)),
            // One image a batch: the captions file lists each image twice, so at the default
            // size its images go through the tower 6 to a batch against the WebDataset's 3,
            // and the BLAS may sum a product in another order for another row count (it does
            // on an AVX2-only AMD EPYC, where this random model's near-tied rankings then
            // flipped). Alone, each image's embedding is the same bits in both sets.
            "--batch-size",
            "1",
        ]);
        assert!(ok && text.contains("(3 images, 6 captions)"), "{text}");
        let results: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join(report).join("results.json")).unwrap())
                .unwrap();
        results["retrieval"][0].clone()
    };
    let from_wds = recalls(&wds, "report-wds");
    let from_file = recalls(&files.join("captions.tsv"), "report-file");
    assert_eq!(from_wds, from_file);
}
