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
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tars(d);
    ok(
        d,
        &[
            "init-model",
            "--preset",
            "tiny",
            "--out",
            "teacher.safetensors",
        ],
    );
    let embed = |out: &str, extra: &[&str]| {
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
        ok(d, &args)
    };
    embed("one", &[]);
    for part in ["0/2", "1/2"] {
        embed("split", &["--part", part]);
    }
    let one = shard_files(&d.join("one"));
    assert_eq!(one.len(), 6, "27 samples in shards of 5");
    assert!(one == shard_files(&d.join("split")), "split embed differs");

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
