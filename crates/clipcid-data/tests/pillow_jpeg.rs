#![allow(clippy::unwrap_used)] // a failed fixture read should panic with its message
//! `decode_image` against Pillow itself: 11 small JPEGs that Pillow encoded (4:2:0, 4:2:2 and
//! 4:4:4 chroma, progressive, restart markers, optimised Huffman tables, grayscale, CMYK, an
//! EXIF orientation tag, sizes that are not whole MCUs, one pixel, one column), one YCCK JPEG
//! that TurboJPEG encoded (Pillow cannot write YCCK), two damaged ones that libjpeg decodes
//! with a warning (extraneous bytes before a marker, entropy-coded bytes overwritten), and
//! Pillow's `Image.open(f).convert("RGB")` of each, with the 16 x 16 crop open_clip's
//! transform makes of it (CMYK resized before the conversion); and one that Pillow refuses (a fatal error
//! after a warning). All written by `scripts/reference/jpeg_reference.py` (Pillow 13,
//! libjpeg-turbo 3.2). The pixels must agree bit for bit.

use std::path::{Path, PathBuf};

use clipcid_data::{decode_image, Preprocess};

#[derive(serde::Deserialize)]
struct Case {
    jpeg: String,
    rgb: String,
    mode: String,
    width: u32,
    height: u32,
    open_clip: String,
}

#[derive(serde::Deserialize)]
struct Refused {
    jpeg: String,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
    refused_by_pillow: Vec<Refused>,
}

fn read_cases() -> (PathBuf, Cases) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pillow-jpeg");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    (dir, cases)
}

fn fixtures() -> (PathBuf, Vec<Case>) {
    let (dir, cases) = read_cases();
    assert_eq!(cases.cases.len(), 14);
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

/// transformers' preprocessing of a JPEG equals its preprocessing of Pillow's RGB pixels, and
/// open_clip's equals the crop its transform makes in Pillow, bit for bit. For a CMYK or YCCK
/// JPEG the two differ: open_clip resizes Pillow's CMYK image before it converts to RGB, and
/// the conversion is not linear.
#[test]
fn preprocessing_a_jpeg_equals_pillows() {
    let (dir, cases) = fixtures();
    let (open_clip, transformers) = (Preprocess::open_clip(16), Preprocess::transformers(16));
    let mut cmyk = 0;
    for c in &cases {
        let bytes = std::fs::read(dir.join(&c.jpeg)).unwrap();
        let rgb = image::DynamicImage::ImageRgb8(pillow_rgb(&dir, c));
        assert_eq!(
            transformers.decode(&bytes).unwrap(),
            transformers.apply(&rgb),
            "{}",
            c.jpeg
        );
        let crop = image::open(dir.join(&c.open_clip)).unwrap().to_rgb8();
        let got = open_clip.decode(&bytes).unwrap();
        assert_eq!(got, open_clip.apply(&crop.into()), "{}", c.jpeg);
        if c.mode == "CMYK" {
            assert_ne!(got, open_clip.apply(&rgb), "{}", c.jpeg);
            cmyk += 1;
        }
    }
    assert_eq!(cmyk, 2);
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

/// libjpeg's warnings are kept apart from its fatal errors. The two damaged fixtures above
/// decode with a warning (so TurboJPEG's call returns an error, and Pillow's pixels stand);
/// here, a warning (junk before the second scan of a progressive JPEG) is followed by a fatal
/// error (an unknown component in the fourth scan's header): TurboJPEG's error code still
/// says "warning", its rows are half written, and Pillow refuses the file. decode_image must
/// not return those rows: it leaves the stream to the `image` crate, as for any stream
/// libjpeg cannot decode.
#[test]
fn a_fatal_error_after_a_warning_is_not_taken_as_a_warning() {
    let (dir, cases) = read_cases();
    assert_eq!(cases.refused_by_pillow.len(), 1);
    for warned in ["420-extraneous-bytes.jpg", "420-corrupt-scan.jpg"] {
        let bytes = std::fs::read(dir.join(warned)).unwrap();
        assert!(turbojpeg::decompress(&bytes, turbojpeg::PixelFormat::RGB).is_err());
    }
    for r in &cases.refused_by_pillow {
        let bytes = std::fs::read(dir.join(&r.jpeg)).unwrap();
        assert!(turbojpeg::decompress(&bytes, turbojpeg::PixelFormat::RGB).is_err());
        let ours = decode_image(&bytes).map(|i| i.to_rgb8());
        let image_crate = image::load_from_memory(&bytes).map(|i| i.to_rgb8());
        match (&ours, &image_crate) {
            (Ok(a), Ok(b)) => assert!(a == b, "{}: pixels other than the image crate's", r.jpeg),
            (Err(_), Err(_)) => {}
            _ => panic!(
                "{}: ours {:?}, image crate's {:?}",
                r.jpeg,
                ours.as_ref().map(|_| ()),
                image_crate.as_ref().map(|_| ())
            ),
        }
    }
}
