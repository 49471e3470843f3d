#![allow(clippy::unwrap_used)] // a failed fixture read should panic with its message
//! `decode_image` against Pillow itself: 11 small JPEGs that Pillow encoded (4:2:0, 4:2:2 and
//! 4:4:4 chroma, progressive, restart markers, optimised Huffman tables, grayscale, CMYK, an
//! EXIF orientation tag, sizes that are not whole MCUs, one pixel, one column), one YCCK JPEG
//! that TurboJPEG encoded (Pillow cannot write YCCK), two damaged ones that libjpeg decodes
//! with a warning (extraneous bytes before a marker, entropy-coded bytes overwritten), two
//! arithmetic-coded JPEGs (sequential, progressive) and an 8-bit lossless one, and Pillow's
//! `Image.open(f).convert("RGB")` of each, with the 16 x 16 crop open_clip's transform makes
//! of it (CMYK resized before the conversion); and three that Pillow refuses (a fatal error
//! after a warning, a 12-bit JPEG, a 16-bit lossless one). All written by
//! `scripts/reference/jpeg_reference.py` (Pillow 13, libjpeg-turbo 3.2). The pixels must
//! agree bit for bit.

mod common;

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
    /// Bits a sample, for the files refused for their precision.
    precision: Option<u32>,
    /// The reason Pillow's JPEG reader gives (its `Image.open` only says "cannot identify").
    pillow_reason: Option<String>,
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
    assert_eq!(cases.cases.len(), 17);
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
/// the conversion is not linear (a loader that converts to RGB first makes them equal again).
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
        // Behind a loader that converts to RGB first, open_clip's transform gets Pillow's RGB.
        let rgb_first = open_clip.clone().with_rgb_first_loader().decode(&bytes);
        assert_eq!(rgb_first.unwrap(), open_clip.apply(&rgb), "{}", c.jpeg);
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
    let broken: Vec<_> = cases
        .refused_by_pillow
        .iter()
        .filter(|r| r.precision.is_none())
        .collect();
    assert_eq!(broken.len(), 1);
    for warned in ["420-extraneous-bytes.jpg", "420-corrupt-scan.jpg"] {
        let bytes = std::fs::read(dir.join(warned)).unwrap();
        assert!(turbojpeg::decompress(&bytes, turbojpeg::PixelFormat::RGB).is_err());
    }
    for r in broken {
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

/// Pillow opens only 8-bit JPEGs: a 12-bit one and a 16-bit lossless one are refused
/// ("cannot handle 12-bit layers"), so no PIL-based pipeline has pixels for them. decode_image
/// refuses them with an error naming the precision (the `image` crate's decoder, the fallback,
/// refuses them too, one of them as "Bad Huffman Table"), never with pixels.
#[test]
fn jpegs_of_other_than_8_bit_samples_are_refused_as_pillow_refuses_them() {
    let (dir, cases) = read_cases();
    let mut precisions = vec![];
    for (r, bits) in cases
        .refused_by_pillow
        .iter()
        .filter_map(|r| Some((r, r.precision?)))
    {
        let reason = r.pillow_reason.as_deref().unwrap();
        assert_eq!(
            reason,
            format!("cannot handle {bits}-bit layers"),
            "{}",
            r.jpeg
        );
        let bytes = std::fs::read(dir.join(&r.jpeg)).unwrap();
        let e = decode_image(&bytes).unwrap_err();
        assert!(
            e.contains(&format!("a {bits}-bit "))
                && e.contains("Pillow opens only 8-bit JPEGs")
                && e.contains(reason),
            "{}: {e}",
            r.jpeg
        );
        assert_eq!(e.contains("lossless"), r.jpeg.contains("lossless"), "{e}");
        assert!(image::load_from_memory(&bytes).is_err(), "{}", r.jpeg);
        precisions.push(bits);
    }
    assert_eq!(precisions, [12, 16]);
}

/// Arithmetic coding and the lossless process, which Pillow decodes
/// (`every_jpeg_decodes_to_pillows_pixels_bit_for_bit` checks the pixels), are out of the
/// `image` crate's reach: libjpeg-turbo is the only decoder here that reads them.
#[test]
fn arithmetic_and_lossless_jpegs_need_libjpeg_turbo() {
    let (dir, cases) = fixtures();
    let names: Vec<_> = cases
        .iter()
        .filter(|c| c.jpeg.starts_with("arithmetic") || c.jpeg.starts_with("lossless"))
        .map(|c| c.jpeg.as_str())
        .collect();
    assert_eq!(names.len(), 3);
    for name in names {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert!(image::load_from_memory(&bytes).is_err(), "{name}");
        assert!(decode_image(&bytes).is_ok(), "{name}");
    }
}

/// Hostile input through libjpeg-turbo's every decoder here (Huffman, progressive, arithmetic,
/// lossless, CMYK, YCCK, 12- and 16-bit headers): every 7th truncation of each fixture and
/// each of its first 160 bytes (its markers and tables) overwritten with 0x00 and 0xFF decode
/// to an image or an error, never a panic; and what decodes preprocesses to 8 x 8.
#[test]
fn truncated_and_corrupted_jpegs_are_errors_or_images_never_panics() {
    let (dir, cases) = read_cases();
    let files = cases
        .cases
        .iter()
        .map(|c| &c.jpeg)
        .chain(cases.refused_by_pillow.iter().map(|r| &r.jpeg));
    let (mut decoded, mut refused) = (0, 0);
    for file in files {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let (d, r) =
            common::decoded_and_refused(&common::truncated_and_overwritten(&bytes, 7, 160));
        (decoded, refused) = (decoded + d, refused + r);
    }
    assert!(
        decoded > 500 && refused > 500,
        "{decoded} decoded, {refused} refused"
    );
}
