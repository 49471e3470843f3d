#![allow(clippy::unwrap_used)] // a failed fixture read should panic with its message
//! `decode_image` against Pillow on every format other than JPEG (`pillow_jpeg.rs` has those):
//! PNG in 8 and 16 bits a sample (RGB, RGBA, grayscale with alpha, palettes with and without a
//! transparent entry, 1-bit, 16-bit grayscale), WebP (lossy, lossy with alpha, lossless), GIF
//! and BMP (with and without palettes; a GIF with a transparent entry), an interlaced PNG,
//! animated GIF, PNG and WebP (their first frames), one CMYK JPEG for its preprocessing, Netpbm
//! (raw and plain PPM, PGM and PBM; maximum values of 6, 9, 100, 1000 and 65535, where Pillow's
//! scaling rounds halves to even), and TIFF (RGB with each lossless compression and the
//! predictor, RGBA, LA, gray, white-is-zero gray and bilevel, bilevel, 16-bit gray, CMYK); with
//! Pillow's `Image.open(f).convert("RGBA")` of each, the 16 x 16 crops open_clip's and
//! transformers' preprocessing make of it in Pillow, and the 19 x 19 image of open_clip's
//! `resize_mode: "longest"` with `fill_color` 3, and the same three of Pillow's
//! `convert("RGB")` (a loader that converts first), written by
//! `scripts/reference/formats_reference.py` (Pillow 13, libwebp 1.6). Pixels must agree bit for
//! bit; the 16-bit grayscale cases' references (PNG, PGM, TIFF) are the high byte of each
//! sample, not Pillow's (which clips every value over 255 to white). The TIFFs that clipcid
//! does not read (a palette, JPEG or fax compression, YCbCr, floats) are refused, each with an
//! error saying what it holds.

mod common;

use std::path::Path;

use clipcid_data::{decode_image, decode_image_with_mode, PillowMode, Preprocess, Resize};

#[derive(serde::Deserialize)]
struct Case {
    file: String,
    rgba: String,
    mode: String,
    pillow: bool,
    open_clip: String,
    transformers: String,
    open_clip_longest: String,
    /// The same three of `Image.open(f).convert("RGB")`: behind a loader that converts first.
    rgb_first: RgbFirst,
}

#[derive(serde::Deserialize)]
struct RgbFirst {
    open_clip: String,
    transformers: String,
    open_clip_longest: String,
}

#[derive(serde::Deserialize)]
struct Longest {
    size: usize,
    fill_color: u8,
}

#[derive(serde::Deserialize)]
struct Cases {
    longest: Longest,
    cases: Vec<Case>,
    refused: Vec<Refused>,
}

/// A file Pillow opens (in `mode`) and clipcid refuses, with a part of the error it gives.
#[derive(serde::Deserialize)]
struct Refused {
    file: String,
    mode: String,
    error: String,
}

fn fixtures() -> (std::path::PathBuf, Vec<Case>) {
    let (dir, cases) = fixture_set();
    (dir, cases.cases)
}

fn fixture_set() -> (std::path::PathBuf, Cases) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pillow-formats");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.cases.len(), 48);
    (dir, cases)
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

/// The TIFFs Pillow opens and clipcid does not read are errors saying what the file holds,
/// never some other pixels.
#[test]
fn tiffs_not_read_here_are_refused_saying_what_they_hold() {
    let (dir, set) = fixture_set();
    assert_eq!(set.refused.len(), 5);
    for r in &set.refused {
        let err = decode_image(&std::fs::read(dir.join(&r.file)).unwrap()).unwrap_err();
        assert!(
            err.contains("TIFF") && err.contains(&r.error),
            "{} (Pillow: {}): {err}",
            r.file,
            r.mode
        );
    }
}

/// The 16-bit cases tell decoders apart: the `image` crate's own conversion to 8 bits
/// rounds (`v / 257`), Pillow takes the high byte, and the fixtures hold values where the
/// two differ; so the test above fails for a decoder that converts the crate's way.
#[test]
fn sixteen_bit_samples_become_their_high_byte_not_the_rounded_value() {
    let (dir, cases) = fixtures();
    let sixteen: Vec<&Case> = cases
        .iter()
        .filter(|c| c.file.contains("16") && c.file.ends_with(".png"))
        .collect();
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

/// Pillow opens palette PNGs, GIFs (unless their palette is the gray ramp), 1-bit PNGs and
/// BMPs with a colour palette in mode `P` or `1`, a BMP with a palette of gray levels and a
/// GIF with the gray ramp in `L`, a CMYK JPEG in `CMYK`: `mode` says which, with the CMYK
/// values whose conversion is the decoded image.
#[test]
fn mode_is_pillows() {
    let (dir, cases) = fixtures();
    for c in &cases {
        let got = decode_image_with_mode(&std::fs::read(dir.join(&c.file)).unwrap()).unwrap();
        let what = format!("{} ({})", c.file, c.mode);
        match (c.mode.as_str(), &got.mode) {
            ("P", PillowMode::Palette(entries)) => assert!(!entries.is_empty(), "{what}"),
            ("1", PillowMode::Bilevel) => {}
            ("CMYK", PillowMode::Cmyk(values)) => {
                let (w, h) = (got.image.width() as usize, got.image.height() as usize);
                assert_eq!(values.len(), w * h * 4, "{what}");
            }
            ("RGB" | "RGBA" | "L" | "LA" | "I;16" | "I", PillowMode::Direct) => {}
            (_, other) => panic!("{what}: {other:?}"),
        }
        assert_eq!(got.indexed(), c.mode == "P" || c.mode == "1", "{what}");
    }
    let count = |m: &str| cases.iter().filter(|c| c.mode == m).count();
    assert_eq!(
        (count("P"), count("1"), count("CMYK"), count("L")),
        (8, 6, 2, 7)
    );
    assert!(cases
        .iter()
        .any(|c| c.file == "gray-ramp.gif" && c.mode == "L"));
}

/// open_clip's and transformers' preprocessing of each file, decoded and cropped, equals the
/// crop their transforms make in Pillow. open_clip resizes (and pads) before converting to
/// RGB, so a palette or bilevel image is resized by nearest neighbour (Pillow's `resize` of
/// mode `P` and `1`), a CMYK JPEG is resized in CMYK, and `resize_mode: "longest"` pads
/// with `fill_color` in the image's own mode; transformers converts first. Behind a loader
/// that converts to RGB first (`with_rgb_first_loader`), each equals the transform of
/// Pillow's `convert("RGB")`.
#[test]
fn preprocessing_each_format_equals_pillows_transforms() {
    let (dir, set) = fixture_set();
    let cases = set.cases;
    let longest = Preprocess::from_open_clip_preprocess_cfg(
        &serde_json::json!({"resize_mode": "longest", "fill_color": set.longest.fill_color}),
        set.longest.size,
    )
    .unwrap();
    assert_eq!(longest.resize, Resize::LongestEdge(set.longest.size));
    assert_eq!(longest.pad_fill, set.longest.fill_color);
    let mut wrong = vec![];
    type Reference = fn(&Case) -> &String;
    let transforms: [(Preprocess, &str, Reference); 6] = [
        (Preprocess::open_clip(16), "open_clip", |c| &c.open_clip),
        (Preprocess::transformers(16), "transformers", |c| {
            &c.transformers
        }),
        (longest.clone(), "open_clip longest", |c| {
            &c.open_clip_longest
        }),
        (
            Preprocess::open_clip(16).with_rgb_first_loader(),
            "RGB first, open_clip",
            |c| &c.rgb_first.open_clip,
        ),
        (
            Preprocess::transformers(16).with_rgb_first_loader(),
            "RGB first, transformers",
            |c| &c.rgb_first.transformers,
        ),
        (
            longest.with_rgb_first_loader(),
            "RGB first, open_clip longest",
            |c| &c.rgb_first.open_clip_longest,
        ),
    ];
    for (p, name, reference) in transforms {
        for c in &cases {
            let want_file = reference(c);
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

/// Hostile bytes: every truncation of every fixture, and each header byte of it overwritten
/// (palette sizes, chunk lengths, colour counts that point past the end), decode to an image
/// or an error, never a panic, and the preprocessing of what decodes never panics either.
#[test]
fn truncated_and_corrupted_headers_are_errors_or_images_never_panics() {
    let (dir, cases) = fixtures();
    let p = Preprocess::open_clip(8);
    let longest = Preprocess {
        resize: Resize::LongestEdge(8),
        pad_fill: 200,
        ..Preprocess::open_clip(8)
    };
    let mut decoded = 0;
    for c in &cases {
        let bytes = std::fs::read(dir.join(&c.file)).unwrap();
        for b in &common::truncated_and_overwritten(&bytes, 5, 80) {
            if let Ok(img) = decode_image_with_mode(b) {
                decoded += 1;
                for p in [&p, &longest] {
                    assert_eq!(p.resize_and_crop_decoded(&img).dimensions(), (8, 8));
                }
            }
        }
    }
    assert!(decoded > 100, "{decoded}");
}

/// The loader's order matters for the images Pillow does not open as RGB or gray: behind a
/// loader that converts first, open_clip's crop of a palette, bilevel, transparent or CMYK
/// image differs from its crop of the image as opened (so the test above tells the two
/// apart), and for transformers only transparency differs (dropped, not over white).
#[test]
fn converting_to_rgb_first_changes_exactly_the_images_not_opened_as_rgb_or_gray() {
    let (dir, cases) = fixtures();
    let crop = |file: &String| image::open(dir.join(file)).unwrap().to_rgb8();
    let mut open_clip_changed = vec![];
    let mut transformers_changed = vec![];
    for c in &cases {
        let open_clip_same = crop(&c.open_clip) == crop(&c.rgb_first.open_clip);
        if !open_clip_same {
            open_clip_changed.push(c.file.as_str());
        }
        if crop(&c.transformers) != crop(&c.rgb_first.transformers) {
            transformers_changed.push(c.file.as_str());
        }
        let as_rgb_or_gray = ["RGB", "L"].contains(&c.mode.as_str()) || !c.pillow;
        assert!(open_clip_same || !as_rgb_or_gray, "{}", c.file);
    }
    let with_alpha = |f: &&str| {
        ["rgba", "la", "alpha", "transparent"]
            .iter()
            .any(|a| f.contains(a))
    };
    assert!(
        transformers_changed.iter().all(with_alpha),
        "{transformers_changed:?}"
    );
    assert!(transformers_changed.len() >= 4, "{transformers_changed:?}");
    for expected in [
        "palette.png",
        "palette.gif",
        "bilevel.png",
        "rgba8.png",
        "cmyk.jpg",
    ] {
        assert!(
            open_clip_changed.contains(&expected),
            "{expected}: {open_clip_changed:?}"
        );
    }
}

/// Damaged Netpbm and TIFF files (every fixture cut short at every 7th length, and each of
/// its bytes overwritten with 0x00 and 0xFF: headers, a TIFF's tags wherever its writer put
/// them, pixel data) give an image that preprocesses or an error, never a panic; a file cut
/// in half (half its pixels gone) is an error.
#[test]
fn damaged_netpbm_and_tiff_files_are_errors_or_images_never_panics() {
    let (dir, set) = fixture_set();
    let files: Vec<&String> = set
        .cases
        .iter()
        .map(|c| &c.file)
        .chain(set.refused.iter().map(|r| &r.file))
        .filter(|f| {
            [".ppm", ".pgm", ".pbm", ".tif"]
                .iter()
                .any(|e| f.ends_with(e))
        })
        .collect();
    assert_eq!(files.len(), 26);
    let (mut decoded, mut refused) = (0, 0);
    for file in files {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        assert!(
            decode_image(&bytes[..bytes.len() / 2]).is_err(),
            "{file} cut in half decoded"
        );
        let variants = common::truncated_and_overwritten(&bytes, 7, bytes.len());
        let (d, r) = common::decoded_and_refused(&variants);
        (decoded, refused) = (decoded + d, refused + r);
    }
    assert!(
        decoded > 10_000 && refused > 10_000,
        "{decoded} decoded, {refused} refused"
    );
}
