//! A full disk through the `clipcid` command line: every writing stage (embed, balance,
//! cluster, export, eval, distill) writes its outputs on a small tmpfs, at sizes from a few KiB (nothing fits) up to enough. Each run must either succeed or
//! fail naming "No space left on device", never panic, leave no temporary file or staging
//! folder behind, and never leave part of a unit of output: a stage file without its
//! summary, a model folder with weights but no preprocessing, a checkpoint missing a file. A
//! run stopped by the full disk then completes with `--resume` once there is room.
//!
//! Mounting needs root (CAP_SYS_ADMIN); elsewhere the test says so and passes without
//! running.
#![allow(clippy::unwrap_used)] // test setup: a failed setup step should panic

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{run_clipcid, s};

/// A tmpfs mounted on a fresh folder, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (with the reason) where this process cannot mount.
    fn mount(kib: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Gives the disk room (64 MiB), keeping what is on it.
    fn grow(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,size=65536k"])
            .arg(self.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.path().display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Every path under `dir`, relative to it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            if p.is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

/// What a run left on the disk, checked: returns the failures found.
fn leftovers(disk: &Path) -> Vec<String> {
    walk(disk)
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            // Every hidden name but the output lock, the records of what a folder write put
            // there and an embedding run's end record is a temporary file or staging folder.
            let record = (name.starts_with(".clipcid-") && name.ends_with("-outputs.json"))
                || name == clipcid_store::EMBED_END_RECORD;
            let temporary = name.starts_with('.') && name != ".clipcid.lock" && !record;
            temporary.then(|| format!("left behind: {}", p.display()))
        })
        .collect()
}

/// The files of `names` under `dir`: all there or none.
fn all_or_none(dir: &Path, names: &[&str]) -> Option<String> {
    let there: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| dir.join(n).exists())
        .collect();
    (!there.is_empty() && there.len() != names.len())
        .then(|| format!("{}: only {there:?} of {names:?}", dir.display()))
}

/// The flags that complete a stopped run, given the disk it stopped on.
type ResumeFlags = dyn Fn(&Path) -> Vec<String>;

/// One stage run at each disk size: the outcomes must hold the module's rules, and the sweep
/// must see both a failure and a success (or the sizes prove nothing). After a failure with
/// `resume`, the disk grows and the same command with `resume`'s flags must complete.
fn sweep(
    stage: &str,
    sizes_kib: &[u64],
    work: &Path,
    args: impl Fn(&Path) -> Vec<String>,
    units: impl Fn(&Path) -> Vec<String>,
    resume: Option<&ResumeFlags>,
) -> Result<Vec<String>, String> {
    let mut failures = vec![];
    let (mut failed, mut succeeded) = (0, 0);
    for &kib in sizes_kib {
        let disk = SmallDisk::mount(kib)?;
        let argv = args(disk.path());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let (ok, text, signalled) = run_clipcid(Some(work), &argv);
        let what = format!("{stage} at {kib} KiB");
        if text.contains("panicked") || signalled {
            failures.push(format!("{what}: panicked or aborted:\n{text}"));
        }
        if ok {
            succeeded += 1;
        } else {
            failed += 1;
            if !text.contains("No space left on device") {
                failures.push(format!(
                    "{what}: failed without naming the full disk:\n{text}"
                ));
            }
            // In words, not an error's Debug structure (plotters printed `Custom { kind: ..`).
            if text.contains("Custom {") || text.contains("IoError(") {
                failures.push(format!("{what}: the error shows its structure:\n{text}"));
            }
            // The message names the file it could not write, on the small disk.
            if !text.contains(s(disk.path())) {
                failures.push(format!("{what}: names no file on the disk:\n{text}"));
            }
            // ... by the name it was going to have: the staging folder is gone by now.
            if text.contains(clipcid_store::io::STAGING_PREFIX) {
                failures.push(format!("{what}: names a staged path:\n{text}"));
            }
        }
        failures.extend(
            leftovers(disk.path())
                .into_iter()
                .map(|f| format!("{what}: {f}")),
        );
        failures.extend(
            units(disk.path())
                .into_iter()
                .map(|f| format!("{what}: {f}")),
        );
        if let (false, Some(flags)) = (ok, resume) {
            disk.grow();
            let flags = flags(disk.path());
            let mut again = argv.clone();
            again.extend(flags.iter().map(String::as_str));
            let (ok, text, _) = run_clipcid(Some(work), &again);
            if !ok {
                failures.push(format!("{what}: did not complete with {flags:?}:\n{text}"));
            }
        }
    }
    if failed == 0 || succeeded == 0 {
        failures.push(format!(
            "{stage}: {failed} failures and {succeeded} successes over {sizes_kib:?} KiB: the sizes miss a case"
        ));
    }
    Ok(failures)
}

fn png(r: u8) -> image::RgbImage {
    image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([r, (x * 6) as u8, (y * 8) as u8 ^ r])
    })
}

#[test]
fn a_full_disk_leaves_whole_outputs_or_none_and_resumes() {
    if let Err(why) = SmallDisk::mount(64) {
        println!("skipped: cannot mount a tmpfs here ({why})");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::create_dir(w.join("data")).unwrap();
    let mut tsv = String::new();
    for i in 0..64u8 {
        png(i * 4).save(w.join(format!("data/{i}.png"))).unwrap();
        tsv.push_str(&format!("{i}.png\ta picture number {i}\n"));
    }
    std::fs::write(w.join("data/captions.tsv"), tsv).unwrap();
    for (class, r) in [("red", 200), ("green", 40)] {
        std::fs::create_dir_all(w.join("classes").join(class)).unwrap();
        for i in 0..4u8 {
            png(r + i)
                .save(w.join(format!("classes/{class}/{i}.png")))
                .unwrap();
        }
    }
    for args in [
        &[
            "init-model",
            "--preset",
            "tiny",
            "--seed",
            "4",
            "--out",
            "teacher.safetensors",
        ][..],
        &["tokenizer", "--out", "tok.json"],
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "data",
            "--out",
            "emb",
            "--tokenizer",
            "tok.json",
            "--shard-size",
            "16",
            "--quiet",
        ],
    ] {
        let (ok, text, _) = run_clipcid(Some(w), args);
        assert!(ok, "{args:?}: {text}");
    }
    std::fs::write(
        w.join("run.toml"),
        "batch_size = 4\nepochs = 1\nseed = 1\ncheckpoint_every = 4\n[student]\nmodel = \"tiny\"\n\
         [optim]\nwarmup_steps = 1\n[data]\ndataset = \"data\"\nembeddings = \"emb\"\n\
         tokenizer = \"tok.json\"\n[loss.cluster]\nenabled = false\n",
    )
    .unwrap();
    let on = |disk: &Path, name: &str| disk.join(name).to_string_lossy().into_owned();
    let strings = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let mut failures = vec![];

    // Embedding shards: each whole or absent; a stopped run resumes.
    failures.extend(
        sweep(
            "embed",
            &[4, 8, 12, 16, 64],
            w,
            |d| {
                let mut a = strings(&["embed", "--teacher", "teacher.safetensors", "--data"]);
                a.extend(strings(&[
                    "data",
                    "--tokenizer",
                    "tok.json",
                    "--shard-size",
                    "16",
                ]));
                a.extend(["--quiet".into(), "--out".into(), on(d, "emb")]);
                a
            },
            // The run's end is recorded only once every shard is whole: a folder holding the
            // record reads complete.
            |d| {
                let emb = d.join("emb");
                match emb.join(clipcid_store::EMBED_END_RECORD).exists() {
                    true => clipcid_store::ShardLayout::open(&[emb])
                        .err()
                        .map(|e| format!("end recorded, but: {e}"))
                        .into_iter()
                        .collect(),
                    false => vec![],
                }
            },
            // The same command again picks up the shards already written.
            Some(&|_: &Path| vec![]),
        )
        .unwrap(),
    );
    // Stage files and their summaries, in pairs.
    for (stage, file, extra) in [
        ("balance", "keep", &["--threshold", "0.3"][..]),
        ("cluster", "clusters", &["--k", "4"][..]),
    ] {
        let failed = sweep(
            stage,
            &[2, 4, 8, 12, 16, 24, 64],
            w,
            |d| {
                let mut a = strings(&[stage, "--embeddings", "emb"]);
                a.extend(strings(extra));
                a.extend(["--out".into(), on(d, &format!("{file}.safetensors"))]);
                a
            },
            |d| {
                let names = [format!("{file}.safetensors"), format!("{file}.json")];
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                all_or_none(d, &names).into_iter().collect()
            },
            None,
        )
        .unwrap();
        failures.extend(failed);
    }
    // Model folders: all of the folder or none of it.
    let model_files = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ];
    for format in ["hf", "onnx"] {
        failures.extend(
            sweep(
                &format!("export --format {format}"),
                &[64, 120, 128, 132, 136, 140, 200, 2048],
                w,
                |d| {
                    let mut a = strings(&["export", "--model", "teacher.safetensors"]);
                    a.extend(["--format".into(), format.into(), "--out".into(), on(d, "x")]);
                    a
                },
                |d| {
                    let x = d.join("x");
                    let export = [&model_files[..], &[".clipcid-export-outputs.json"]].concat();
                    let mut bad: Vec<String> = all_or_none(&x, &export).into_iter().collect();
                    if x.join("onnx").exists() && !x.join("model.safetensors").exists() {
                        bad.push("an onnx folder without the model".into());
                    }
                    bad
                },
                None,
            )
            .unwrap(),
        );
    }
    // An evaluation report: the report, its records and plots together.
    failures.extend(
        sweep(
            "eval",
            &[4, 16, 32, 44, 64],
            w,
            |d| {
                let mut a = strings(&["eval", "--model", "teacher.safetensors", "--tokenizer"]);
                a.extend(strings(&["tok.json", "--zero-shot", "classes"]));
                a.extend(["--out".into(), on(d, "report")]);
                a
            },
            |d| {
                let files = [
                    "report.md",
                    "results.json",
                    "zero-shot-per-class.png",
                    ".clipcid-eval-outputs.json",
                ];
                all_or_none(&d.join("report"), &files).into_iter().collect()
            },
            None,
        )
        .unwrap(),
    );
    // A training run: checkpoints whole, the student folder whole, and --resume completes.
    failures.extend(
        sweep(
            "distill",
            &[100, 400, 1024, 2048, 8192],
            w,
            |d| {
                strings(&[
                    "distill",
                    "--config",
                    "run.toml",
                    "--quiet",
                    "--out",
                    &on(d, "run"),
                ])
            },
            |d| {
                let mut bad = vec![];
                let student = d.join("run/student");
                let files = [&model_files[..], &["tokenizer.json"]].concat();
                bad.extend(all_or_none(&student, &files));
                if let Ok(steps) = std::fs::read_dir(d.join("run/checkpoints")) {
                    for step in steps.map(|e| e.unwrap().path()).filter(|p| p.is_dir()) {
                        let files = ["config.json", "model.safetensors", "trainer.safetensors"];
                        bad.extend(all_or_none(&step, &files));
                    }
                }
                bad
            },
            // From the newest checkpoint; a run stopped before its first starts over.
            Some(&|d: &Path| {
                let from = match d.join("run/checkpoints/latest").exists() {
                    true => "--resume",
                    false => "--overwrite",
                };
                vec![from.to_string()]
            }),
        )
        .unwrap(),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
