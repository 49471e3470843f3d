#![allow(clippy::unwrap_used)] // test setup
//! A write that fails part way (a full disk, a clash) leaves every output as it was: no file
//! of a pair without the other, no new file beside an earlier run's, no temporary file.

use std::path::Path;

use candle_core::{Device, Tensor};
use clipcid_store::io::{self, STAGING_PREFIX, STALE_STAGING};
use clipcid_store::StoreError;

/// The names in `dir`, sorted (hidden ones included).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn tensor() -> Vec<(String, Tensor)> {
    vec![(
        "x".into(),
        Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap(),
    )]
}

#[test]
fn a_stage_output_whose_summary_cannot_be_written_is_not_written_either() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.safetensors");
    // The summary's name is taken by a folder: its rename fails after both temporaries are
    // whole. The tensors were written and left alone before (a keep file with no summary).
    std::fs::create_dir(dir.path().join("keep.json")).unwrap();
    let e = io::write_with_summary(&path, tensor(), "keep", &"summary", None).unwrap_err();
    assert!(e.to_string().contains("keep.json"), "{e}");
    assert_eq!(names(dir.path()), ["keep.json"]);

    // An earlier pair stays byte for byte when the new one fails.
    std::fs::remove_dir(dir.path().join("keep.json")).unwrap();
    io::write_with_summary(&path, tensor(), "keep", &"first", None).unwrap();
    let before = (
        std::fs::read(&path).unwrap(),
        std::fs::read(dir.path().join("keep.json")),
    );
    let blocked = dir.path().join("other.safetensors");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::create_dir(dir.path().join("other.json")).unwrap();
    assert!(io::write_with_summary(&blocked, tensor(), "keep", &"second", None).is_err());
    let after = (
        std::fs::read(&path).unwrap(),
        std::fs::read(dir.path().join("keep.json")),
    );
    assert_eq!(before.0, after.0);
    assert_eq!(before.1.unwrap(), after.1.unwrap());
    assert_eq!(
        names(dir.path()),
        [
            "keep.json",
            "keep.safetensors",
            "other.json",
            "other.safetensors"
        ]
    );
}

#[test]
fn atomic_files_are_all_written_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.json");
    let b = dir.path().join("missing/b.txt");
    std::fs::write(&a, b"old").unwrap();
    let e = io::write_atomic_files(&[(&a, b"new"), (&b, b"b")]).unwrap_err();
    assert!(e.to_string().contains("b.txt"), "{e}");
    assert_eq!(std::fs::read(&a).unwrap(), b"old");
    assert_eq!(names(dir.path()), ["a.json"]);
}

#[test]
fn a_folder_where_the_last_file_goes_leaves_the_first_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (data, graph) = (dir.path().join("m.onnx.data"), dir.path().join("m.onnx"));
    std::fs::write(&data, b"old data").unwrap();
    std::fs::create_dir(&graph).unwrap();
    let e = io::write_atomic_files(&[(&data, b"new data"), (&graph, b"graph")]).unwrap_err();
    assert!(e.to_string().contains("m.onnx: is a folder"), "{e}");
    // The rename of the first file never happened: it is still the old one.
    assert_eq!(std::fs::read(&data).unwrap(), b"old data");
    assert_eq!(names(dir.path()), ["m.onnx", "m.onnx.data"]);
}

#[test]
fn a_folder_write_that_fails_leaves_the_folder_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    io::write_folder(&out, |d| -> Result<(), StoreError> {
        io::write_atomic(&d.join("config.json"), b"old config")?;
        io::write_atomic(&d.join("model.safetensors"), b"old weights")
    })
    .unwrap();
    std::fs::write(out.join("NOTES.md"), b"the user's").unwrap();

    // Fails after the weights: the earlier weights and config stay, nothing new appears.
    let e = io::write_folder(&out, |d| -> Result<(), StoreError> {
        io::write_atomic(&d.join("model.safetensors"), b"new weights")?;
        std::fs::create_dir(d.join("onnx")).unwrap();
        io::write_atomic(&d.join("onnx/vision.onnx"), b"graph")?;
        Err(StoreError::file(
            d.join("config.json"),
            "No space left on device",
        ))
    })
    .unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    assert_eq!(
        names(&out),
        ["NOTES.md", "config.json", "model.safetensors"]
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"old weights"
    );

    // A success replaces the files it writes, merges sub-folders, keeps the user's file.
    std::fs::create_dir(out.join("onnx")).unwrap();
    std::fs::write(out.join("onnx/check.safetensors"), b"kept").unwrap();
    let n = io::write_folder(&out, |d| -> Result<usize, StoreError> {
        io::write_atomic(&d.join("model.safetensors"), b"new weights")?;
        std::fs::create_dir(d.join("onnx")).unwrap();
        io::write_atomic(&d.join("onnx/vision.onnx"), b"graph")?;
        Ok(2)
    })
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        names(&out),
        ["NOTES.md", "config.json", "model.safetensors", "onnx"]
    );
    assert_eq!(
        names(&out.join("onnx")),
        ["check.safetensors", "vision.onnx"]
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"new weights"
    );

    // A clash found only at the move (a folder where a file goes) moves nothing.
    std::fs::create_dir(out.join("tokenizer.json")).unwrap();
    let e = io::write_folder(&out, |d| -> Result<(), StoreError> {
        io::write_atomic(&d.join("model.safetensors"), b"newer weights")?;
        io::write_atomic(&d.join("tokenizer.json"), b"{}")
    })
    .unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"new weights"
    );
    assert!(names(&out).iter().all(|n| !n.starts_with(STAGING_PREFIX)));

    // A folder the failed call created is gone again.
    let fresh = dir.path().join("fresh");
    let failed = io::write_folder(&fresh, |d| -> Result<(), StoreError> {
        io::write_atomic(&d.join("config.json"), b"{}")?;
        Err(StoreError::Invalid("stop".into()))
    });
    assert!(failed.is_err() && !fresh.exists());
}

#[test]
fn a_copy_that_fails_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("loss.png");
    assert!(io::copy_atomic(&dir.path().join("absent.png"), &to).is_err());
    assert!(names(dir.path()).is_empty());
    std::fs::write(dir.path().join("a.png"), b"png").unwrap();
    assert_eq!(io::copy_atomic(&dir.path().join("a.png"), &to).unwrap(), 3);
    assert_eq!(std::fs::read(&to).unwrap(), b"png");
}

#[test]
fn staging_folders_of_ended_processes_are_removed_and_live_or_recent_ones_kept() {
    if !Path::new("/proc/self").exists() {
        println!("skipped: no /proc to tell which processes run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No process has an id past the kernel's 2^22 limit; process 1 always runs.
    let (ended, live) = (
        dir.path().join(format!("{STAGING_PREFIX}4000000000")),
        dir.path().join(format!("{STAGING_PREFIX}1")),
    );
    let recent = dir.path().join(format!("{STAGING_PREFIX}4000000001"));
    for d in [&ended, &live, &recent] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("model.safetensors"), b"weights").unwrap();
    }
    // Untouched for longer than STALE_STAGING; `recent` could be another machine's, at work.
    let old = std::time::SystemTime::now() - 2 * STALE_STAGING;
    for d in [&ended, &live] {
        std::fs::File::open(d).unwrap().set_modified(old).unwrap();
    }
    io::write_folder(dir.path(), |d| -> Result<(), StoreError> {
        io::write_atomic(&d.join("config.json"), b"{}")
    })
    .unwrap();
    assert!(!ended.exists());
    assert!(live.join("model.safetensors").exists());
    assert!(recent.join("model.safetensors").exists());
}

#[test]
fn a_replacing_write_removes_its_own_earlier_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let write = |kind: &str, files: &[&str]| {
        io::write_folder_replacing(&out, kind, |d| -> Result<(), StoreError> {
            for f in files {
                let path = d.join(f);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                io::write_atomic(&path, f.as_bytes())?;
            }
            Ok(())
        })
        .unwrap()
    };
    write(
        "eval",
        &[
            "report.md",
            "confusion-old.png",
            "records/old.json",
            "records/new.json",
        ],
    );
    write("textness", &["grid-0.png"]);
    std::fs::write(out.join("NOTES.md"), b"the user's").unwrap();
    // The second eval evaluates `new` alone: `old`'s plot and record go, and so does nothing
    // else (the user's notes, the textness study's grid).
    write("eval", &["report.md", "records/new.json"]);
    let mut all = names(&out);
    all.retain(|n| !n.starts_with(".clipcid-"));
    assert_eq!(all, ["NOTES.md", "grid-0.png", "records", "report.md"]);
    assert_eq!(names(&out.join("records")), ["new.json"]);
    // A folder the removal empties goes too.
    write("eval", &["report.md"]);
    assert!(!out.join("records").exists());
    // A damaged or crafted record names nothing outside the folder.
    std::fs::write(dir.path().join("outside.txt"), b"keep").unwrap();
    std::fs::write(
        out.join(".clipcid-eval-outputs.json"),
        br#"["../outside.txt", "/etc/hostname", "NOTES.md/../grid-0.png", "report.md"]"#,
    )
    .unwrap();
    write("eval", &["summary.md"]);
    assert!(dir.path().join("outside.txt").exists() && out.join("grid-0.png").exists());
    assert!(!out.join("report.md").exists() && out.join("summary.md").exists());
}

#[test]
fn a_second_writer_into_a_folder_being_written_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let inner = io::write_folder(&out, |d| -> Result<String, StoreError> {
        io::write_atomic(&d.join("report.md"), b"first")?;
        // Another writer while this one is under way: refused, nothing of it lands.
        let second = io::write_folder(&out, |d| -> Result<(), StoreError> {
            io::write_atomic(&d.join("plot.png"), b"second")
        });
        Ok(second.unwrap_err().to_string())
    })
    .unwrap();
    assert!(
        inner.contains("another clipcid run is writing to this folder"),
        "{inner}"
    );
    assert_eq!(names(&out), ["report.md"]);
    // Once the first is done, the folder takes writes again.
    io::write_folder(&out, |d| io::write_atomic(&d.join("plot.png"), b"later")).unwrap();
    assert_eq!(names(&out), ["plot.png", "report.md"]);
}

/// Clashes anywhere under the output, not only at its top, are found before the first move:
/// a file where a staged folder goes, and a folder where a staged file goes inside a
/// sub-folder both hold. A write that succeeds keeps the folder it made, even with nothing in it.
#[test]
fn clashes_inside_sub_folders_are_found_before_anything_moves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let write = |out: &Path| {
        io::write_folder(out, |d| -> Result<(), StoreError> {
            io::write_atomic(&d.join("model.safetensors"), b"new weights")?;
            std::fs::create_dir(d.join("onnx")).unwrap();
            io::write_atomic(&d.join("onnx/vision.onnx"), b"graph")
        })
    };
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"old weights").unwrap();
    std::fs::write(out.join("onnx"), b"a file").unwrap();
    let e = write(&out).unwrap_err().to_string();
    assert!(
        e.contains("onnx: is a file where a folder is written"),
        "{e}"
    );
    let weights = || std::fs::read(out.join("model.safetensors")).unwrap();
    assert_eq!(weights(), b"old weights");

    std::fs::remove_file(out.join("onnx")).unwrap();
    std::fs::create_dir_all(out.join("onnx/vision.onnx")).unwrap();
    let e = write(&out).unwrap_err().to_string();
    assert!(
        e.contains("vision.onnx: is a folder where a file is written"),
        "{e}"
    );
    assert_eq!(weights(), b"old weights");
    assert_eq!(names(&out), ["model.safetensors", "onnx"]);

    let empty = dir.path().join("empty");
    io::write_folder(&empty, |_| -> Result<(), StoreError> { Ok(()) }).unwrap();
    assert!(empty.is_dir());
}
