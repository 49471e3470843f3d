#![allow(clippy::unwrap_used)] // a failed fixture read should panic with its message
//! `decode_image` against Pillow itself: 11 small JPEGs that Pillow encoded (4:2:0, 4:2:2 and
//! 4:4:4 chroma, progressive, restart markers, optimised Huffman tables, grayscale, CMYK, an
//! EXIF orientation tag, sizes that are not whole MCUs, one pixel, one column) and Pillow's
//! `Image.open(f).convert("RGB")` of each, written by `scripts/reference/jpeg_reference.py`
//! (Pillow 13, libjpeg-turbo 3.2). The pixels must agree bit for bit.

use std::path::{Path, PathBuf};

use clipcid_data::{decode_image, Preprocess};

#[derive(serde::Deserialize)]
struct Case {
    jpeg: String,
    rgb: String,
    mode: String,
    width: u32,
    height: u32,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn fixtures() -> (PathBuf, Vec<Case>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pillow-jpeg");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.cases.len(), 11);
    (dir, cases.cases)
}

/// Pillow's RGB pixels of a case (a PNG, read back exactly).
fn pillow_rgb(dir: &Path, c: &Case) -> image::RgbImage {
    image::open(dir.join(&c.rgb)).unwrap().to_rgb8()
}

#[test]
fn every_jpeg_decodes_to_pillows_pixels_bit_for_bit() {
    let (dir, cases) = fixtures();
    let mut wrong = vec![];
    for c in &cases {
        let bytes = std::fs::read(dir.join(&c.jpeg)).unwrap();
        let got = decode_image(&bytes).unwrap();
        assert_eq!(
            (got.width(), got.height()),
            (c.width, c.height),
            "{}",
            c.jpeg
        );
        // Pillow opens a grayscale JPEG as `L`; so does decode_image.
        assert_eq!(
            c.mode == "L",
            got.color() == image::ColorType::L8,
            "{}",
            c.jpeg
        );
        let want = pillow_rgb(&dir, c);
        let got = got.to_rgb8();
        let differ = got
            .pixels()
            .zip(want.pixels())
            .filter(|(a, b)| a != b)
            .count();
        if differ > 0 {
            wrong.push(format!("{}: {differ} pixels differ", c.jpeg));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The fixtures tell decoders apart: the `image` crate's own JPEG decoder (what clipcid used
/// before) gives other pixels than Pillow for the chroma-subsampled cases, so the test above
/// fails for a decoder that only comes close.
#[test]
fn the_image_crates_decoder_misses_pillows_pixels_on_these_fixtures() {
    let (dir, cases) = fixtures();
    let mut missed = vec![];
    for c in cases.iter().filter(|c| c.jpeg.starts_with("42")) {
        let bytes = std::fs::read(dir.join(&c.jpeg)).unwrap();
        let other = image::load_from_memory(&bytes).unwrap().to_rgb8();
        if other != pillow_rgb(&dir, c) {
            missed.push(c.jpeg.as_str());
        }
    }
    assert!(missed.len() >= 4, "only {missed:?}");
}

#[test]
fn preprocessing_a_jpeg_equals_preprocessing_pillows_pixels() {
    let (dir, cases) = fixtures();
    let p = Preprocess::open_clip(16);
    for c in &cases {
        let bytes = std::fs::read(dir.join(&c.jpeg)).unwrap();
        let want = p.apply(&image::DynamicImage::ImageRgb8(pillow_rgb(&dir, c)));
        assert_eq!(p.decode(&bytes).unwrap(), want, "{}", c.jpeg);
    }
}

#[test]
fn a_jpeg_too_large_to_decode_is_refused_from_its_header() {
    let (dir, cases) = fixtures();
    // The 4:2:0 fixture with its frame header's size rewritten to 65,000 x 65,000: 11.8 GiB
    // of RGB, refused before any allocation.
    let mut bytes = std::fs::read(dir.join(&cases[0].jpeg)).unwrap();
    let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    bytes[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    let e = decode_image(&bytes).unwrap_err();
    assert!(e.contains("65000 x 65000") && e.contains("512 MiB"), "{e}");
}

#[test]
fn broken_jpegs_are_errors_that_say_why() {
    let (dir, cases) = fixtures();
    let bytes = std::fs::read(dir.join(&cases[0].jpeg)).unwrap();
    let e = decode_image(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(e.contains("truncated JPEG"), "{e}");
    let e = decode_image(&bytes[..20]).unwrap_err();
    assert!(e.contains("no start-of-scan"), "{e}");
    // A scan of garbage between valid markers: no decoder returns pixels without an error.
    let sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
    let mut junk = bytes[..sos].to_vec();
    junk.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02, 0xFF, 0xD9]);
    assert!(decode_image(&junk).is_err());
    // The thread's decoder, reused after those failures, still gives Pillow's pixels.
    let again = decode_image(&bytes).unwrap().to_rgb8();
    assert!(again == pillow_rgb(&dir, &cases[0]));
}
