#![allow(clippy::unwrap_used)] // a failed fixture read should panic with its message
//! `pil_resize` / `pil_resize_rgba` against Pillow itself: 84 resizes of small random RGB and
//! RGBA images with all six filters, written by
//! `scripts/reference/cross_reference.py resize` (Pillow 13), must agree bit for bit.

use std::path::Path;

use clipcid_data::{pil_resize, pil_resize_rgba, Resample};

#[derive(serde::Deserialize)]
struct Case {
    input: String,
    filter: String,
    width: u32,
    height: u32,
    output: String,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[test]
fn every_filter_matches_pillow_bit_for_bit() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pillow-resize");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.cases.len(), 84);
    let mut wrong = vec![];
    for c in &cases.cases {
        let src = image::open(dir.join(&c.input)).unwrap();
        let want = image::open(dir.join(&c.output)).unwrap();
        let filter: Resample = c.filter.parse().unwrap();
        let (got, want) = if src.color().has_alpha() {
            let got = pil_resize_rgba(&src.to_rgba8(), c.width, c.height, filter);
            (got.into_raw(), want.to_rgba8().into_raw())
        } else {
            let got = pil_resize(&src.to_rgb8(), c.width, c.height, filter);
            (got.into_raw(), want.to_rgb8().into_raw())
        };
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        if differ > 0 || got.len() != want.len() {
            wrong.push(format!(
                "{} {} -> {}x{}: {differ} bytes differ",
                c.input, c.filter, c.width, c.height
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
