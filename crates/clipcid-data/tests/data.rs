#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic
use std::io::Cursor;
use std::path::Path;

use candle_core::Device;
use clipcid_data::{BatchIter, Dataset, Preprocess, CLIP_MEAN, CLIP_STD};
use image::{DynamicImage, Rgb, RgbImage};

fn expected(v: u8, c: usize) -> f64 {
    (v as f64 / 255.0 - CLIP_MEAN[c] as f64) / CLIP_STD[c] as f64
}

/// Pixel (x, y) of the pattern image: R = x, G = y, B = x + y (mod 256).
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    })
}

#[test]
fn centre_crop_without_resize_matches_hand_computed_pixels() {
    // 224 x 300 (w x h): shorter side already 224, so no resampling; crop top = 76 / 2 = 38.
    let p = Preprocess::clip(224);
    let out = p.apply(&DynamicImage::ImageRgb8(pattern(224, 300)));
    assert_eq!(out.len(), 3 * 224 * 224);
    let plane = 224 * 224;
    for &(r, c) in &[(0usize, 0usize), (0, 223), (100, 17), (223, 223)] {
        let (x, y) = (c as u32, r as u32 + 38);
        let src = [(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8];
        for ch in 0..3 {
            let got = out[ch * plane + r * 224 + c] as f64;
            assert!(
                (got - expected(src[ch], ch)).abs() < 1e-6,
                "({r},{c}) ch {ch}: {got}"
            );
        }
    }
}

#[test]
fn odd_crop_offsets_round_half_to_even_like_torchvision() {
    // 301 wide: (301 - 224) / 2 = 38.5 -> Python round() gives 38; 303 wide: 39.5 -> 40.
    let p = Preprocess::clip(224);
    for (w, left) in [(301u32, 38u32), (303, 40)] {
        let rgb = p.resize_and_crop(&DynamicImage::ImageRgb8(pattern(w, 224)));
        assert_eq!(rgb.get_pixel(0, 0)[0] as u32, left, "width {w}");
    }
}

#[test]
fn resize_keeps_aspect_ratio_and_constant_colour() {
    // A constant image stays constant through bicubic resampling (weights sum to one).
    let p = Preprocess::clip(20);
    let img = RgbImage::from_pixel(100, 50, Rgb([200, 30, 90]));
    let out = p.apply(&DynamicImage::ImageRgb8(img));
    for (i, v) in out.iter().enumerate() {
        let ch = i / 400;
        assert!((*v as f64 - expected([200, 30, 90][ch], ch)).abs() < 1e-6);
    }
    // Shorter side 50 -> 20, long side int(20 * 100 / 50) = 40, centre crop from x = 10:
    // a vertical stripe at source columns 40..60 lands at output columns 6..14.
    let striped = RgbImage::from_fn(100, 50, |x, _| {
        if (40..60).contains(&x) {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 0, 0])
        }
    });
    let rgb = p.resize_and_crop(&DynamicImage::ImageRgb8(striped));
    assert_eq!(rgb.dimensions(), (20, 20));
    assert_eq!(rgb.get_pixel(10, 10)[0], 255);
    assert_eq!(rgb.get_pixel(1, 10)[0], 0);
    assert_eq!(rgb.get_pixel(18, 10)[0], 0);
}

#[test]
fn grayscale_and_alpha_images_become_rgb() {
    let p = Preprocess::clip(4);
    let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 4, image::Luma([128])));
    let out = p.apply(&gray);
    for ch in 0..3 {
        assert!((out[ch * 16] as f64 - expected(128, ch)).abs() < 1e-6);
    }
    let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
        4,
        4,
        image::Rgba([10, 20, 30, 0]),
    ));
    assert!((p.apply(&rgba)[16] as f64 - expected(20, 1)).abs() < 1e-6);
}

fn encode(img: &RgbImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, fmt).expect("encode");
    buf.into_inner()
}

fn add(builder: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, name, bytes)
        .expect("append");
}

fn write_shard(path: &Path, corrupt_key: Option<&str>) {
    let mut b = tar::Builder::new(std::fs::File::create(path).expect("create"));
    for i in 0..5 {
        let key = format!("{:09}", i);
        let img = RgbImage::from_pixel(40, 30, Rgb([(i * 40) as u8, 0, 0]));
        let bytes = if corrupt_key == Some(key.as_str()) {
            let mut j = encode(&img, image::ImageFormat::Jpeg);
            j.truncate(20); // JPEG header only: undecodable
            j
        } else if i % 2 == 0 {
            encode(&img, image::ImageFormat::Jpeg)
        } else {
            encode(&img, image::ImageFormat::Png)
        };
        let ext = if i % 2 == 0 { "jpg" } else { "png" };
        add(&mut b, &format!("{key}.{ext}"), &bytes);
        add(
            &mut b,
            &format!("{key}.txt"),
            format!("a red square number {i}").as_bytes(),
        );
        add(&mut b, &format!("{key}.json"), br#"{"url": "x"}"#);
        add(
            &mut b,
            &format!("{key}.cls"),
            format!("{}", i % 3).as_bytes(),
        );
    }
    // A sample with a caption but no image.
    add(&mut b, "000000099.txt", b"orphan caption");
    b.finish().expect("finish");
}

#[test]
fn webdataset_shards_group_by_key_and_skip_corrupt_jpegs() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(&dir.path().join("00000.tar"), Some("000000002"));
    write_shard(&dir.path().join("00001.tar"), None);
    let ds = Dataset::open(dir.path()).unwrap();
    let samples: Vec<_> = ds.samples().unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(samples.len(), 12);
    assert_eq!(samples[3].key, "000000003");
    assert_eq!(samples[3].caption.as_deref(), Some("a red square number 3"));
    assert_eq!(samples[4].label, Some(1));
    assert_eq!(samples[11].index, 11);

    let mut it = BatchIter::new(ds.samples().unwrap(), Preprocess::clip(16), 4, Device::Cpu);
    let total: usize = it.by_ref().map(|b| b.unwrap().len()).sum();
    assert_eq!(
        total, 9,
        "12 samples, minus one corrupt JPEG and two orphan captions"
    );
    let skipped = it.skipped();
    assert_eq!(skipped.len(), 3);
    assert_eq!(skipped[0].key, "000000002");
    assert!(
        skipped[0].reason.contains("decode"),
        "{}",
        skipped[0].reason
    );
    assert!(
        skipped[1].reason.contains("no image member (found: txt)"),
        "{}",
        skipped[1].reason
    );
}

#[test]
fn truncated_tar_is_an_error_naming_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.tar");
    write_shard(&path, None);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..700]).unwrap();
    let ds = Dataset::open(&path).unwrap();
    let err = ds
        .samples()
        .unwrap()
        .find_map(|s| s.err())
        .expect("an error");
    assert!(err.to_string().contains("bad.tar"), "{err}");
}

#[test]
fn captions_tsv_and_csv_with_headers_quotes_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    for n in ["a", "b"] {
        RgbImage::new(8, 8)
            .save(dir.path().join("img").join(format!("{n}.png")))
            .unwrap();
    }
    std::fs::write(
        dir.path().join("c.tsv"),
        "path\tcaption\nimg/a.png\ta  dog\nimg/missing.png\tghost\n\nimg/b.png\tb cat\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.csv"),
        "caption,filepath\n\"a dog, running\",img/a.png\n",
    )
    .unwrap();
    let tsv = Dataset::open(&dir.path().join("c.tsv")).unwrap();
    assert_eq!(tsv.len_hint(), Some(3));
    let mut it = BatchIter::new(tsv.samples().unwrap(), Preprocess::clip(8), 8, Device::Cpu);
    let b = it.next().unwrap().unwrap();
    assert_eq!(b.keys, vec!["img/a.png", "img/b.png"]);
    assert_eq!(b.indices, vec![0, 2]);
    assert_eq!(b.captions[1].as_deref(), Some("b cat"));
    assert_eq!(it.skipped()[0].key, "img/missing.png");
    let csv = Dataset::open(&dir.path().join("c.csv")).unwrap();
    let s: Vec<_> = csv.samples().unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(s[0].caption.as_deref(), Some("a dog, running"));
    assert!(s[0].image.is_ok());

    std::fs::write(dir.path().join("bad.tsv"), "just-one-column\n").unwrap();
    let err = Dataset::open(&dir.path().join("bad.tsv"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.tsv") && err.contains("line 1"), "{err}");
}

#[test]
fn labelled_folder_and_detection_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no images found"), "{err}");
    let err = Dataset::open(&dir.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
    for (class, n) in [("zebra", 2), ("ant", 1)] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..n {
            RgbImage::new(8, 8)
                .save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
        std::fs::write(dir.path().join(class).join("notes.txt"), "ignored").unwrap();
    }
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.classes(), &["ant", "zebra"]);
    let s: Vec<_> = ds.samples().unwrap().collect::<Result<_, _>>().unwrap();
    let got: Vec<_> = s.iter().map(|s| (s.key.as_str(), s.label)).collect();
    assert_eq!(
        got,
        vec![
            ("ant/0.png", Some(0)),
            ("zebra/0.png", Some(1)),
            ("zebra/1.png", Some(1))
        ]
    );
    let mut stream = ds.samples().unwrap();
    assert_eq!(stream.skip_samples(2).unwrap(), 2);
    assert_eq!(stream.next().unwrap().unwrap().key, "zebra/1.png");
}

/// Every field of a sample (index, key, image bytes or error, caption, label).
fn fingerprint(s: &clipcid_data::Sample) -> String {
    format!("{s:?}")
}

#[test]
fn sample_index_reads_exactly_what_the_stream_yields_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(&dir.path().join("00000.tar"), Some("000000002"));
    write_shard(&dir.path().join("00001.tar"), None);
    let labelled = tempfile::tempdir().unwrap();
    for class in ["a", "b"] {
        std::fs::create_dir(labelled.path().join(class)).unwrap();
        for i in 0..2 {
            RgbImage::from_pixel(6, 6, Rgb([i * 50, 0, 0]))
                .save(labelled.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    for root in [dir.path(), labelled.path()] {
        let ds = Dataset::open(root).unwrap();
        let streamed: Vec<_> = ds.samples().unwrap().collect::<Result<_, _>>().unwrap();
        let index = ds.index().unwrap();
        assert_eq!(index.len(), streamed.len());
        for i in (0..streamed.len()).rev() {
            let got = index.get(i as u64).unwrap();
            assert_eq!(fingerprint(&got), fingerprint(&streamed[i]), "sample {i}");
        }
        let err = index.get(streamed.len() as u64).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
    }
}
