#![allow(clippy::unwrap_used)] // a failed fixture read should panic with its message
//! `decode_image` against Pillow on every format other than JPEG (`pillow_jpeg.rs` has
//! those): PNG in 8 and 16 bits a sample (RGB, RGBA, grayscale with alpha, palettes with and
//! without a transparent entry, 1-bit, 16-bit grayscale), WebP (lossy, lossy with alpha,
//! lossless), GIF and BMP (with and without palettes), with Pillow's
//! `Image.open(f).convert("RGBA")` of each and the 16 x 16 crops open_clip's and
//! transformers' preprocessing make of it in Pillow, written by
//! `scripts/reference/formats_reference.py` (Pillow 13, libwebp 1.6). Pixels must agree bit
//! for bit; the 16-bit grayscale case's reference is the high byte of each sample, not
//! Pillow's (which clips every value over 255 to white).

use std::path::Path;

use clipcid_data::{decode_image, decode_image_with_mode, Preprocess};

#[derive(serde::Deserialize)]
struct Case {
    file: String,
    rgba: String,
    mode: String,
    pillow: bool,
    open_clip: String,
    transformers: String,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn fixtures() -> (std::path::PathBuf, Vec<Case>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pillow-formats");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.cases.len(), 19);
    (dir, cases.cases)
}

fn reference(dir: &Path, c: &Case) -> image::RgbaImage {
    image::open(dir.join(&c.rgba)).unwrap().to_rgba8()
}

/// How many pixels of two images of one size differ.
fn differing<P: image::Pixel + PartialEq>(
    a: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    b: &image::ImageBuffer<P, Vec<P::Subpixel>>,
) -> usize {
    a.pixels().zip(b.pixels()).filter(|(a, b)| a != b).count()
}

#[test]
fn every_format_decodes_to_pillows_colour_and_alpha_bit_for_bit() {
    let (dir, cases) = fixtures();
    let mut wrong = vec![];
    for c in &cases {
        let got = decode_image(&std::fs::read(dir.join(&c.file)).unwrap()).unwrap();
        let want = reference(&dir, c);
        assert_eq!((got.width(), got.height()), want.dimensions(), "{}", c.file);
        let got = got.to_rgba8();
        let differ = differing(&got, &want);
        if differ > 0 {
            wrong.push(format!("{} ({}): {differ} pixels differ", c.file, c.mode));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The 16-bit cases tell decoders apart: the `image` crate's own conversion to 8 bits
/// rounds (`v / 257`), Pillow takes the high byte, and the fixtures hold values where the
/// two differ; so the test above fails for a decoder that converts the crate's way.
#[test]
fn sixteen_bit_samples_become_their_high_byte_not_the_rounded_value() {
    let (dir, cases) = fixtures();
    let sixteen: Vec<&Case> = cases.iter().filter(|c| c.file.contains("16")).collect();
    assert_eq!(sixteen.len(), 4);
    for c in sixteen {
        let rounded = image::open(dir.join(&c.file)).unwrap().to_rgba8();
        assert!(rounded != reference(&dir, c), "{}", c.file);
    }
    // The one case that is not Pillow's: its conversion clips 16-bit grayscale to white.
    let gray = cases.iter().find(|c| c.mode == "I;16").unwrap();
    assert!(!gray.pillow);
    let img = reference(&dir, gray);
    assert!(img.pixels().any(|p| p.0[0] < 200), "a white reference");
}

/// Pillow opens palette PNGs, GIFs, 1-bit PNGs and BMPs with a colour palette in mode `P` or
/// `1`, and a BMP with a palette of gray levels in `L`: `indexed` says which.
#[test]
fn indexed_is_pillows_p_and_1_modes() {
    let (dir, cases) = fixtures();
    for c in &cases {
        let got = decode_image_with_mode(&std::fs::read(dir.join(&c.file)).unwrap()).unwrap();
        assert_eq!(
            got.indexed,
            c.mode == "P" || c.mode == "1",
            "{} ({})",
            c.file,
            c.mode
        );
    }
    assert_eq!(
        cases
            .iter()
            .filter(|c| c.mode == "P" || c.mode == "1")
            .count(),
        7
    );
}

/// open_clip's and transformers' preprocessing of each file, decoded and cropped, equals the
/// crop their transforms make in Pillow. open_clip resizes before converting to RGB, so a
/// palette or bilevel image is resized by nearest neighbour (Pillow's `resize` of mode `P`
/// and `1`); transformers converts first.
#[test]
fn preprocessing_each_format_equals_pillows_transforms() {
    let (dir, cases) = fixtures();
    let mut wrong = vec![];
    for (p, name) in [
        (Preprocess::open_clip(16), "open_clip"),
        (Preprocess::transformers(16), "transformers"),
    ] {
        for c in &cases {
            let want_file = if name == "open_clip" {
                &c.open_clip
            } else {
                &c.transformers
            };
            let want = image::open(dir.join(want_file)).unwrap().to_rgb8();
            let bytes = std::fs::read(dir.join(&c.file)).unwrap();
            let got = p.resize_and_crop_decoded(&decode_image_with_mode(&bytes).unwrap());
            let differ = differing(&got, &want);
            if differ > 0 {
                wrong.push(format!(
                    "{name} {} ({}): {differ} pixels differ",
                    c.file, c.mode
                ));
            }
            let whole = p.apply(&image::DynamicImage::ImageRgb8(want));
            assert_eq!(p.decode(&bytes).unwrap(), whole, "{name} {}", c.file);
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
