#![allow(clippy::unwrap_used)] // test setup
//! Byte-mutation fuzzing of the readers: a valid WebDataset shard and a valid captions TSV
//! (with images) are corrupted at random (bytes overwritten, inserted, deleted, the file cut)
//! and read with both the streaming reader and the index, and every sample decoded. Any
//! outcome is fine except a panic or an abort; errors must name a file.
//!
//! CI runs a small budget (64 cases per reader). A longer run:
//! `PROPTEST_CASES=20000 cargo test --release -p clipcid-data --test mutation`.

use std::io::Cursor;
use std::path::Path;

use clipcid_data::{Dataset, Preprocess};
use image::{Rgb, RgbImage};
use proptest::prelude::*;

fn png(i: u8) -> Vec<u8> {
    let img = RgbImage::from_fn(9, 7, |x, y| {
        Rgb([i.wrapping_mul(40), x as u8 * 20, y as u8 * 30])
    });
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn jpeg(i: u8) -> Vec<u8> {
    let img = RgbImage::from_fn(16, 12, |x, y| {
        Rgb([i.wrapping_mul(60), x as u8 * 10, y as u8 * 15])
    });
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

/// A valid shard: 4 samples with an image, a caption, a label.
fn valid_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..4u8 {
        for (ext, bytes) in [
            ("png", if i % 2 == 0 { png(i) } else { jpeg(i) }),
            ("txt", format!("caption {i}").into_bytes()),
            ("cls", format!("{i}").into_bytes()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{i:03}.{ext}"), bytes.as_slice())
                .unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// A mutation of `data`: (kind, position, byte).
fn mutate(mut data: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, pos, byte) in edits {
        if data.is_empty() {
            break;
        }
        let at = pos % data.len();
        match kind % 4 {
            0 => data[at] = byte,
            1 => data.insert(at, byte),
            2 => {
                data.remove(at);
            }
            _ => data.truncate(at),
        }
    }
    data
}

/// Reads everything both ways and decodes every sample; returns nothing, panics only on a bug.
fn read_all(path: &Path) {
    let Ok(ds) = Dataset::open(path) else { return };
    let pre = Preprocess::clip(8);
    if let Ok(stream) = ds.samples() {
        for s in stream {
            match s {
                Ok(s) => {
                    if let Ok(bytes) = &s.image {
                        let _ = pre.decode(bytes);
                    }
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
    }
    if let Ok(index) = ds.index() {
        for i in 0..index.len() as u64 {
            if let Ok(s) = index.get(i) {
                if let Ok(bytes) = &s.image {
                    let _ = pre.decode(bytes);
                }
            }
        }
    }
}

/// Cases per reader: `PROPTEST_CASES`, else 64 (CI's budget).
fn budget() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: budget(), ..ProptestConfig::default() })]

    #[test]
    fn mutated_tar_shards_never_panic(e in edits()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.tar");
        std::fs::write(&path, mutate(valid_tar(), &e)).unwrap();
        read_all(&path);
    }

    #[test]
    fn mutated_captions_and_images_never_panic(e in edits(), f in edits()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), mutate(png(1), &f)).unwrap();
        std::fs::write(dir.path().join("b.jpg"), mutate(jpeg(2), &f)).unwrap();
        let tsv = b"path\tcaption\na.png\tfirst \"caption\"\nb.jpg\tsecond\n".to_vec();
        let path = dir.path().join("captions.tsv");
        std::fs::write(&path, mutate(tsv, &e)).unwrap();
        read_all(&path);
    }
}
