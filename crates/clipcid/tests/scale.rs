//! Stages split over independent processes give exactly what one process gives: `embed
//! --part`, `balance pairs` + `balance merge`, through the binary.
#![allow(clippy::unwrap_used)] // test setup: a failed step should panic

mod common;

use std::io::Cursor;
use std::path::Path;

use common::run_clipcid;

fn png(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([
            ((x * seed) % 256) as u8,
            ((y * 7 + seed * 31) % 256) as u8,
            ((x + y + seed * 13) % 256) as u8,
        ])
    });
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

/// Three tars of 9 samples; every third image repeats an earlier one (a near-duplicate at
/// distance 0).
fn tars(dir: &Path) {
    let mut i = 0u32;
    for k in 0..3 {
        let path = dir.join(format!("data-{k:05}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        for _ in 0..9 {
            let bytes = png(if i % 3 == 2 { i - 2 } else { i } + 1);
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_cksum();
            b.append_data(&mut h, format!("s{i:03}.png"), bytes.as_slice())
                .unwrap();
            i += 1;
        }
        b.finish().unwrap();
    }
}

/// A folder with the three tars and a random tiny teacher.
fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    tars(tmp.path());
    ok(
        tmp.path(),
        &[
            "init-model",
            "--preset",
            "tiny",
            "--out",
            "teacher.safetensors",
        ],
    );
    tmp
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, text, _) = run_clipcid(Some(dir), args);
    assert!(success, "clipcid {args:?} failed:\n{text}");
    text
}

fn shard_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn split_embed_and_balance_equal_one_process() {
    let tmp = setup();
    let d = tmp.path();
    // `clipcid embed` into `out`, with `extra` arguments and launcher variables `vars`.
    let embed_with = |out: &str, extra: &[&str], vars: &[(&str, &str)]| {
        let mut args = vec![
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "data-{00000..00001}.tar",
            "--data",
            "data-0000[2].tar",
            "--images-only",
            "--shard-size",
            "5",
            "--out",
            out,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_clipcid"))
            .current_dir(d)
            .args(&args)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "clipcid {args:?} with {vars:?} failed:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
    };
    let embed = |out: &str, extra: &[&str]| embed_with(out, extra, &[]);
    embed("one", &[]);
    for part in ["0/2", "1/2"] {
        embed("split", &["--part", part]);
    }
    let one = shard_files(&d.join("one"));
    assert_eq!(one.len(), 6, "27 samples in shards of 5");
    assert!(one == shard_files(&d.join("split")), "split embed differs");
    // The same two parts from the launchers' variables: torchrun's, and a Slurm array's
    // `--array=1-3:2`, whose task ids are 1 and 3.
    let slurm = |id| {
        [
            ("SLURM_ARRAY_TASK_ID", id),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]
    };
    for (out, tasks) in [
        (
            "torchrun",
            [
                vec![("RANK", "0"), ("WORLD_SIZE", "2")],
                vec![("RANK", "1"), ("WORLD_SIZE", "2")],
            ],
        ),
        ("slurm", [slurm("1").to_vec(), slurm("3").to_vec()]),
    ] {
        for (task, vars) in tasks.iter().enumerate() {
            embed_with(out, &[], vars);
            // Each task writes its own 3 shards, not all 6.
            assert_eq!(
                shard_files(&d.join(out)).len(),
                3 * (task + 1),
                "{out} {vars:?}"
            );
        }
        assert!(one == shard_files(&d.join(out)), "{out} embed differs");
    }

    let t = "0.05";
    ok(
        d,
        &[
            "balance",
            "--embeddings",
            "one",
            "--out",
            "keep.safetensors",
            "--threshold",
            t,
            "--block-size",
            "4",
            "--quiet",
        ],
    );
    for i in 0..3 {
        let part = format!("{i}/3");
        let out = format!("pairs-{i}.safetensors");
        ok(
            d,
            &[
                "balance",
                "pairs",
                "--embeddings",
                "one",
                "--part",
                &part,
                "--out",
                &out,
                "--threshold",
                t,
                "--block-size",
                "4",
                "--quiet",
            ],
        );
    }
    let text = ok(
        d,
        &[
            "balance",
            "merge",
            "--embeddings",
            "one",
            "--pairs",
            "pairs-2.safetensors",
            "pairs-0.safetensors",
            "pairs-1.safetensors",
            "--out",
            "merged.safetensors",
            "--threshold",
            t,
        ],
    );
    assert!(text.contains("removed 9"), "{text}");
    let a = clipcid_store::KeepList::read(&d.join("keep.safetensors")).unwrap();
    let b = clipcid_store::KeepList::read(&d.join("merged.safetensors")).unwrap();
    assert_eq!((a.keep.clone(), a.ids.clone()), (b.keep, b.ids));
    assert_eq!(a.keep.iter().filter(|k| !**k).count(), 9);
    // A missing part is an error naming it.
    let (success, text, _) = run_clipcid(
        Some(d),
        &[
            "balance",
            "merge",
            "--embeddings",
            "one",
            "--pairs",
            "pairs-0.safetensors",
            "--out",
            "x.safetensors",
            "--threshold",
            t,
        ],
    );
    assert!(!success && text.contains("1/3, 2/3 are missing"), "{text}");
}

/// The student's tensors of a finished run.
fn student(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = clipcid_store::io::load_tensors(&dir.join("student/model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn distill_by_two_processes_under_torchrun_variables_equals_one_at_twice_the_batch() {
    let tmp = setup();
    let d = tmp.path();
    ok(
        d,
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "data-{00000..00002}.tar",
            "--images-only",
            "--out",
            "emb",
            "--quiet",
        ],
    );
    let config = |name: &str, batch: usize| {
        std::fs::write(
            d.join(name),
            format!(
                "mode = \"piccollage\"\nbatch_size = {batch}\nepochs = 2\nseed = 5\n[student]\nmodel = \"tiny\"\n[optim]\nlr = 1e-3\nwarmup_steps = 1\n[data]\ndataset = \"data-{{00000..00002}}.tar\"\nembeddings = \"emb\"\n"
            ),
        )
        .unwrap();
    };
    config("one.toml", 8);
    config("dp.toml", 4);
    ok(
        d,
        &["distill", "--config", "one.toml", "--out", "one", "--quiet"],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Both ranks at once, as torchrun starts them.
    let children: Vec<_> = (0..2)
        .map(|r| {
            std::process::Command::new(env!("CARGO_BIN_EXE_clipcid"))
                .current_dir(d)
                .args(["distill", "--config", "dp.toml", "--out", "dp", "--quiet"])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (a, b) = (student(&d.join("one")), student(&d.join("dp")));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .flat_map(|((_, x), (_, y))| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .collect::<Vec<_>>()
        })
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "2 processes x 4 vs 1 x 8: largest weight difference {worst}"
    );
    // A rank 0 whose peer never starts: CLIPCID_DIST_TIMEOUT ends the wait with an error
    // naming what is missing, and no run folder is begun.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipcid"))
        .current_dir(d)
        .args(["distill", "--config", "dp.toml", "--out", "lone", "--quiet"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("CLIPCID_DIST_TIMEOUT", "0.5")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("rank 0 of 2: 0 of the 1 other ranks") && text.contains("within 0.5 s"),
        "{text}"
    );
    assert!(!d.join("lone").exists());
}
