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

#[test]
fn a_window_of_the_resize_is_the_full_resize_cropped() {
    use clipcid_data::{pil_resize_rgba_window, pil_resize_window, Window};
    // Seeded pseudo-random sizes, contents and windows; both pass orders (a height that
    // shrinks far more than the width runs the vertical pass first).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % u64::from(n)) as u32
    };
    let filters = [
        Resample::Nearest,
        Resample::Bicubic,
        Resample::Bilinear,
        Resample::Lanczos,
        Resample::Box,
        Resample::Hamming,
    ];
    for case in 0..120 {
        let (w, h) = (1 + next(30), 1 + next(60));
        let (nw, nh) = (1 + next(40), 1 + next(40));
        let img = image::RgbaImage::from_fn(w, h, |_, _| {
            image::Rgba([
                next(256) as u8,
                next(256) as u8,
                next(256) as u8,
                next(256) as u8,
            ])
        });
        let (x, y) = (next(nw), next(nh));
        let win = Window {
            x: x as usize,
            y: y as usize,
            width: (1 + next(nw - x)) as usize,
            height: (1 + next(nh - y)) as usize,
        };
        let filter = filters[case % filters.len()];
        let crop = |full: &image::RgbImage| {
            image::imageops::crop_imm(full, x, y, win.width as u32, win.height as u32).to_image()
        };
        let rgb = image::DynamicImage::ImageRgba8(img.clone()).to_rgb8();
        let full = pil_resize(&rgb, nw, nh, filter);
        assert_eq!(
            pil_resize_window(&rgb, (nw, nh), filter, win),
            crop(&full),
            "case {case}: {w}x{h} -> {nw}x{nh} {filter} {win:?}"
        );
        let full = pil_resize_rgba(&img, nw, nh, filter);
        let want = image::imageops::crop_imm(&full, x, y, win.width as u32, win.height as u32);
        assert_eq!(
            pil_resize_rgba_window(&img, (nw, nh), filter, win),
            want.to_image(),
            "rgba case {case}"
        );
    }
}

#[test]
fn a_one_pixel_wide_strip_is_cropped_before_it_is_resized() {
    // 1 x 1,500,000: resized whole it would be 224 x 336,000,000 pixels (about 225 GB in RGB);
    // only the 224 x 224 crop is computed.
    let strip = image::RgbImage::from_fn(1, 1_500_000, |_, y| image::Rgb([(y % 251) as u8, 7, 9]));
    let img = image::DynamicImage::ImageRgb8(strip);
    for p in [
        clipcid_data::Preprocess::transformers(224),
        clipcid_data::Preprocess::open_clip(224),
    ] {
        let out = p.resize_and_crop(&img);
        assert_eq!(out.dimensions(), (224, 224));
        assert!(out.pixels().all(|px| px[1] == 7 && px[2] == 9));
    }
}
