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
fn odd_crop_offsets_follow_each_familys_rule() {
    // 301 wide: (301 - 224) / 2 = 38.5 -> torchvision's round() gives 38, transformers' floor
    // 38; 303 wide: 39.5 -> round 40 (ties to even), floor 39.
    for (w, round, floor) in [
        (301u32, 38u32, 38u32),
        (303, 40, 39),
        (225, 0, 0),
        (226, 1, 1),
    ] {
        let img = DynamicImage::ImageRgb8(pattern(w, 224));
        let oc = Preprocess::open_clip(224).resize_and_crop(&img);
        let hf = Preprocess::transformers(224).resize_and_crop(&img);
        assert_eq!(oc.get_pixel(0, 0)[0] as u32, round, "open_clip, width {w}");
        assert_eq!(
            hf.get_pixel(0, 0)[0] as u32,
            floor,
            "transformers, width {w}"
        );
    }
    // clipcid's default is transformers' rule (what its folders' preprocessor_config says).
    assert_eq!(Preprocess::clip(224), Preprocess::transformers(224));
}

#[test]
fn images_smaller_than_the_crop_are_padded_with_black_by_each_rule() {
    // Exact resize to 5 x 5 then a 8 x 8 crop: 3 pixels of padding, split 1 + 2 by torchvision
    // (image at floor(3 / 2) = 1) and 2 + 1 by transformers (image at ceil(3 / 2) = 2).
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(5, 5, Rgb([255, 255, 255])));
    for (p, at) in [
        (Preprocess::open_clip(8), 1u32),
        (Preprocess::transformers(8), 2),
    ] {
        let p = Preprocess {
            resize: clipcid_data::Resize::Exact {
                height: 5,
                width: 5,
            },
            ..p
        };
        let rgb = p.resize_and_crop(&img);
        assert_eq!(rgb.dimensions(), (8, 8));
        for x in 0..8 {
            let inside = (at..at + 5).contains(&x);
            assert_eq!(rgb.get_pixel(x, at)[0] == 255, inside, "{:?} x {x}", p.crop);
        }
    }
}

#[test]
fn preprocessing_configs_of_both_families_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("preprocessor_config.json");
    // openai/clip-vit-base-patch32's preprocessor_config.json.
    std::fs::write(
        &hf,
        r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
    )
    .unwrap();
    let p = Preprocess::from_hf_preprocessor_config(&hf, 224).unwrap();
    assert_eq!(p, Preprocess::transformers(224));
    // What clipcid writes reads back as itself.
    let lanczos = Preprocess {
        resample: clipcid_data::Resample::Lanczos,
        mean: [0.5; 3],
        ..Preprocess::transformers(32)
    };
    std::fs::write(&hf, lanczos.to_hf_preprocessor_config().to_string()).unwrap();
    assert_eq!(
        Preprocess::from_hf_preprocessor_config(&hf, 32).unwrap(),
        lanczos
    );
    // A crop that is not the model's input size is refused, naming the file.
    let e = Preprocess::from_hf_preprocessor_config(&hf, 64)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("preprocessor_config.json") && e.contains("crop size"),
        "{e}"
    );
    std::fs::write(&hf, r#"{"image_std": [0.5, 0, 0.5]}"#).unwrap();
    let e = Preprocess::from_hf_preprocessor_config(&hf, 224)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_std"), "{e}");
    std::fs::write(&hf, "{}").unwrap(); // all defaults

    // open_clip: the Hub wrapper, defaults filled, and its own rule.
    let oc = dir.path().join("open_clip_config.json");
    std::fs::write(
        &oc,
        r#"{"model_cfg": {"embed_dim": 512}, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}"#,
    )
    .unwrap();
    let p = Preprocess::from_open_clip_config(&oc, 224).unwrap();
    assert_eq!(p.crop, clipcid_data::CropRule::Round);
    assert_eq!((p.mean, p.std), ([0.5; 3], [0.5; 3]));
    let squash = Preprocess {
        resize: clipcid_data::Resize::Exact {
            height: 32,
            width: 32,
        },
        ..Preprocess::open_clip(32)
    };
    let cfg = squash.to_open_clip_preprocess_cfg();
    assert_eq!(
        Preprocess::from_open_clip_preprocess_cfg(&cfg, 32).unwrap(),
        squash
    );
    // `resize_mode: "longest"` with its `fill_color` reads back from both files clipcid
    // writes (transformers has no such resize: `{"longest_edge": n}`, which it refuses).
    let longest = Preprocess::from_open_clip_preprocess_cfg(
        &serde_json::json!({"resize_mode": "longest", "fill_color": 128}),
        32,
    )
    .unwrap();
    assert_eq!(
        (longest.resize, longest.pad_fill),
        (clipcid_data::Resize::LongestEdge(32), 128)
    );
    let cfg = longest.to_open_clip_preprocess_cfg();
    assert_eq!(
        Preprocess::from_open_clip_preprocess_cfg(&cfg, 32).unwrap(),
        longest
    );
    let as_hf = Preprocess {
        resize: longest.resize,
        pad_fill: longest.pad_fill,
        ..Preprocess::transformers(32)
    };
    let hf_cfg = as_hf.to_hf_preprocessor_config();
    assert_eq!(hf_cfg["size"], serde_json::json!({"longest_edge": 32}));
    std::fs::write(&hf, hf_cfg.to_string()).unwrap();
    assert_eq!(
        Preprocess::from_hf_preprocessor_config(&hf, 32).unwrap(),
        as_hf
    );
    std::fs::write(&hf, "{}").unwrap();
    for (cfg, field) in [
        (serde_json::json!({"resize_mode": "crop"}), "resize_mode"),
        (serde_json::json!({"fill_color": 256}), "fill_color"),
        (serde_json::json!({"fill_color": [0, 0, 0]}), "fill_color"),
        // A value that is not a number is an error, not left out of its list.
        (serde_json::json!({"mean": [0.5, null, 0.5, 0.5]}), "mean"),
        (serde_json::json!({"std": [0.5, "0.5", 0.5]}), "std"),
        (serde_json::json!({"size": [32, "x"]}), "size"),
        (serde_json::json!({"resize_mode": 2}), "resize_mode"),
        (serde_json::json!({"mode": 1}), "mode"),
    ] {
        let e = Preprocess::from_open_clip_preprocess_cfg(&cfg, 32).unwrap_err();
        assert!(e.contains(field), "{e}");
    }
    // One number is every channel's, as open_clip and transformers broadcast it.
    let scalar = Preprocess::from_open_clip_preprocess_cfg(
        &serde_json::json!({"mean": 0.5, "std": 0.25}),
        32,
    )
    .unwrap();
    assert_eq!((scalar.mean, scalar.std), ([0.5; 3], [0.25; 3]));
    for (json, field) in [
        (r#"{"image_mean": [0.5, "x", 0.5, 0.5]}"#, "image_mean"),
        (r#"{"image_std": [0.5, 0.5, 0.5, null]}"#, "image_std"),
        (r#"{"size": {"shortest_edge": 0}, "crop_size": 32}"#, "size"),
        (r#"{"size": 0, "crop_size": 32}"#, "size"),
        (
            r#"{"size": 32, "crop_size": {"height": 0, "width": 32}}"#,
            "crop_size",
        ),
    ] {
        std::fs::write(&hf, json).unwrap();
        let e = Preprocess::from_hf_preprocessor_config(&hf, 32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains(field),
            "{json}: {e}"
        );
    }
    std::fs::write(&hf, r#"{"image_mean": 0.5, "size": 32, "crop_size": 32}"#).unwrap();
    let p = Preprocess::from_hf_preprocessor_config(&hf, 32).unwrap();
    assert_eq!(p.mean, [0.5; 3]);
    std::fs::write(&hf, "{}").unwrap();

    // for_model: the folder's files decide; a forced family reads its own file.
    use clipcid_data::{CropRule, PreprocessFamily};
    let (p, from) = Preprocess::for_model(dir.path(), 224, PreprocessFamily::Auto, true).unwrap();
    assert_eq!(p.crop, CropRule::Floor, "{from}");
    let (p, _) = Preprocess::for_model(dir.path(), 224, PreprocessFamily::OpenClip, false).unwrap();
    assert_eq!((p.crop, p.mean), (CropRule::Round, [0.5; 3]));
    std::fs::remove_file(&hf).unwrap();
    let (p, _) = Preprocess::for_model(dir.path(), 224, PreprocessFamily::Auto, false).unwrap();
    assert_eq!((p.crop, p.mean), (CropRule::Round, [0.5; 3]));
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
    // Transparency: open_clip drops alpha (the colour under it stays); transformers
    // composites over white. Expected values from Pillow 13's alpha_composite.
    let rgba = |a: u8| {
        DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            4,
            4,
            image::Rgba([10, 20, 30, a]),
        ))
    };
    let open_clip = Preprocess::open_clip(4);
    assert!((open_clip.apply(&rgba(0))[16] as f64 - expected(20, 1)).abs() < 1e-6);
    assert!((p.apply(&rgba(0))[16] as f64 - expected(255, 1)).abs() < 1e-6);
    let half = p.apply(&rgba(128));
    for (ch, v) in [132u8, 137, 142].into_iter().enumerate() {
        assert!(
            (half[ch * 16] as f64 - expected(v, ch)).abs() < 1e-6,
            "{ch}"
        );
    }
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
fn a_shard_cut_inside_a_skipped_member_fails_every_reader_alike() {
    // A sample, then a member that is not a sample's (a directory, or a name without a
    // key), cut inside its data. The reading stream fails skipping it; the stream that seeks
    // past other parts' members and the index seek past its end instead, and used to end
    // there as if the shard were whole.
    for (name, kind) in [
        ("notes", tar::EntryType::Regular),
        ("dir/", tar::EntryType::Directory),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.tar");
        let mut b = tar::Builder::new(Vec::new());
        for (member, size) in [("000.txt", 7usize), (name, 600)] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(if member == name {
                kind
            } else {
                tar::EntryType::Regular
            });
            h.set_size(size as u64);
            h.set_cksum();
            b.append_data(&mut h, member, vec![b'x'; size].as_slice())
                .unwrap();
        }
        let bytes = b.into_inner().unwrap();
        // The second header starts at 1024; cut 100 bytes into its data.
        std::fs::write(&path, &bytes[..1024 + 512 + 100]).unwrap();
        let ds = Dataset::open(&path).unwrap();
        let last = |stream: clipcid_data::SampleStream<'_>| stream.last().expect("an item");
        for (reader, outcome) in [
            ("samples", last(ds.samples().unwrap()).map(|_| ())),
            (
                "samples_where",
                last(ds.samples_where(|_| false).unwrap()).map(|_| ()),
            ),
            ("index", ds.index().map(|_| ())),
        ] {
            let e = outcome.expect_err(&format!("{name}: {reader} read a cut shard"));
            assert!(e.to_string().contains("cut.tar"), "{name}: {reader}: {e}");
        }
    }
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
    // Hidden folders are no classes, even with images in them (a notebook's checkpoints, a
    // writer's staging folder); they took label 0 and shifted the rest.
    for hidden in [".ipynb_checkpoints", ".clipcid-staging-42"] {
        std::fs::create_dir(dir.path().join(hidden)).unwrap();
        RgbImage::new(8, 8)
            .save(dir.path().join(hidden).join("0.png"))
            .unwrap();
    }
    assert_eq!(
        Dataset::open(dir.path()).unwrap().classes(),
        &["ant", "zebra"]
    );
    // A class folder with no image (a report written into the set) is an error naming it, as
    // torchvision's ImageFolder's; it was a class no image had, offered to zero-shot.
    std::fs::create_dir_all(dir.path().join("clip_benchmark")).unwrap();
    std::fs::write(dir.path().join("clip_benchmark/r.json"), "{}").unwrap();
    let err = Dataset::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("class folders with no image in them: clip_benchmark"),
        "{err}"
    );
    // A class of GIFs is one too, as in ImageFolder, whose extensions the error lists.
    std::fs::remove_dir_all(dir.path().join("clip_benchmark")).unwrap();
    std::fs::create_dir(dir.path().join("gifs")).unwrap();
    RgbImage::new(8, 8)
        .save(dir.path().join("gifs/0.gif"))
        .unwrap();
    let err = Dataset::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("no image in them: gifs;") && err.contains("*.jpg, *.jpeg, *.png, *.ppm"),
        "{err}"
    );
}

/// A labelled folder lists what torchvision's `ImageFolder` lists, in its order: the class
/// folder and every folder below it (links followed) in the order of their paths as strings,
/// each folder's files by name, with torchvision's extensions in any case (a `.gif` left out,
/// a `.TIFF` and a file named just `.jpg` taken). The expected list is what torchvision 0.29's
/// `make_dataset` gave for this layout, less `cat/.hidden/5.png`: clipcid leaves hidden
/// folders out at every level. A link back to a folder above is an error naming it.
#[cfg(unix)]
#[test]
fn labelled_folders_are_walked_as_torchvisions_image_folder_walks_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in ["cat/a b", "cat/a/x", "cat/a0", "cat/.hidden", "dog"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let files = [
        "cat/z.png",
        "cat/B.PNG",
        "cat/a b/1.png",
        "cat/a/2.png",
        "cat/a/x/3.pgm",
        "cat/a0/4.png",
        "cat/.hidden/5.png",
        "cat/6.gif",
        "cat/7.TIFF",
        "cat/.jpg",
        "cat/notes.txt",
        "dog/1.ppm",
    ];
    for f in files {
        std::fs::write(root.join(f), f).unwrap();
    }
    std::os::unix::fs::symlink("../a0", root.join("cat/a/l")).unwrap();
    let ds = Dataset::open(root).unwrap();
    assert_eq!(ds.classes(), &["cat", "dog"]);
    let samples: Vec<_> = ds.samples().unwrap().collect::<Result<_, _>>().unwrap();
    let got: Vec<_> = samples
        .iter()
        .map(|s| (s.key.as_str(), s.label.unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("cat/.jpg", 0),
            ("cat/7.TIFF", 0),
            ("cat/B.PNG", 0),
            ("cat/z.png", 0),
            ("cat/a/2.png", 0),
            ("cat/a b/1.png", 0),
            ("cat/a/l/4.png", 0),
            ("cat/a/x/3.pgm", 0),
            ("cat/a0/4.png", 0),
            ("dog/1.ppm", 1),
        ]
    );
    // Each sample's bytes are its own file's.
    for s in &samples {
        let want = s.key.replace("cat/a/l/", "cat/a0/");
        assert_eq!(s.image.as_deref().unwrap(), want.as_bytes(), "{}", s.key);
    }
    assert_eq!(ds.len_hint(), Some(10));
    // A link to a folder above it would be walked without end.
    std::os::unix::fs::symlink("..", root.join("cat/a/x/up")).unwrap();
    let err = Dataset::open(root).unwrap_err().to_string();
    assert!(
        err.contains("cat/a/x/up") && err.contains("links back to"),
        "{err}"
    );
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

/// A sample's key and `Ok(())` or its skip reason.
type Outcome = (String, Result<(), String>);

/// Every sample of `ds` from the streaming reader and from the index (they must agree).
fn both_readers(ds: &Dataset) -> Result<Vec<Outcome>, String> {
    let stream: Vec<_> = ds
        .samples()
        .map_err(|e| e.to_string())?
        .map(|s| s.map(|s| (s.key, s.image.map(|_| ()))))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let index = ds.index().map_err(|e| e.to_string())?;
    let indexed: Vec<_> = (0..index.len() as u64)
        .map(|i| index.get(i).map(|s| (s.key, s.image.map(|_| ()))))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    assert_eq!(
        stream, indexed,
        "the streaming reader and the index disagree"
    );
    Ok(stream)
}

#[test]
fn a_tar_header_claiming_more_bytes_than_the_shard_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.tar");
    // A member whose header claims 2^40 bytes, followed by 1 KiB of data and the end blocks.
    let mut header = tar::Header::new_gnu();
    header.set_path("000.jpg").unwrap();
    header.set_size(1 << 40);
    header.set_mode(0o644);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend(vec![0u8; 1024 + 1024]);
    std::fs::write(&path, &bytes).unwrap();
    let ds = Dataset::open(&path).unwrap();
    let e = both_readers(&ds).unwrap_err();
    assert!(
        e.contains("huge.tar") && e.contains("000.jpg") && e.contains("claims 1099511627776 bytes"),
        "{e}"
    );
}

#[test]
fn empty_shards_and_shards_without_members_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.tar");
    std::fs::write(&empty, b"").unwrap();
    let none = dir.path().join("none.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&none).unwrap());
    add(&mut b, "README", b"no extension, so not a sample member");
    b.finish().unwrap();
    drop(b);
    for path in [&empty, &none] {
        let e = both_readers(&Dataset::open(path).unwrap()).unwrap_err();
        assert!(e.contains("holds no sample members"), "{e}");
    }
}

#[test]
fn repeated_members_and_keys_are_named_skips_not_mixed_samples() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.tar");
    let png = encode(&RgbImage::new(4, 4), image::ImageFormat::Png);
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    add(&mut b, "a.png", &png);
    add(&mut b, "a.txt", b"first caption");
    add(&mut b, "a.png", &png); // same member twice in one group
    add(&mut b, "a.txt", b"second caption");
    add(&mut b, "b.png", &png);
    add(&mut b, "b.txt", b"b");
    add(&mut b, "c.png", &png);
    add(&mut b, "b.txt", b"b again, after another sample");
    // Two images of one key: the first in the archive was taken, though readers disagree
    // on which is the sample's (open_clip takes jpg, CLIP_benchmark webp).
    let jpg = encode(&RgbImage::new(4, 4), image::ImageFormat::Jpeg);
    add(&mut b, "d.png", &png);
    add(&mut b, "d.jpg", &jpg);
    add(&mut b, "d.txt", b"d");
    b.finish().unwrap();
    drop(b);
    let got = both_readers(&Dataset::open(&path).unwrap()).unwrap();
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c", "b", "d"]);
    let e = got[4].1.as_ref().unwrap_err();
    assert!(e.contains("sample has 2 images (`d.jpg`, `d.png`)"), "{e}");
    assert!(got[0]
        .1
        .as_ref()
        .unwrap_err()
        .contains("`a.png` appears twice"));
    assert!(got[1].1.is_ok() && got[2].1.is_ok());
    assert!(got[3].1.as_ref().unwrap_err().contains("appears again"));
}

#[test]
fn truncated_images_are_errors_not_grey_rows() {
    let img = RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
    let p = Preprocess::clip(32);
    for fmt in [image::ImageFormat::Jpeg, image::ImageFormat::Png] {
        let whole = encode(&img, fmt);
        assert!(p.decode(&whole).is_ok(), "{fmt:?} whole");
        // Cut at several points past the headers: every cut must be refused.
        for frac in [0.5, 0.8, 0.95] {
            let cut = &whole[..(whole.len() as f64 * frac) as usize];
            let e = p.decode(cut).unwrap_err();
            assert!(!e.is_empty(), "{fmt:?} cut at {frac}");
        }
    }
    // Bytes after the end-of-image marker (some cameras append data) are fine.
    let mut trailer = encode(&img, image::ImageFormat::Jpeg);
    trailer.extend_from_slice(b"trailing bytes");
    assert!(p.decode(&trailer).is_ok());
}

#[test]
fn a_captions_line_that_is_not_utf8_skips_only_its_sample() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a", "b", "c"] {
        RgbImage::new(8, 8)
            .save(dir.path().join(format!("{n}.png")))
            .unwrap();
    }
    let tsv = dir.path().join("captions.tsv");
    let mut bytes = b"a.png\tfirst\nb.png\tbad \xff\xfe caption\n".to_vec();
    bytes.extend_from_slice(b"c.png\tthird\n");
    std::fs::write(&tsv, bytes).unwrap();
    let ds = Dataset::open(&tsv).unwrap();
    let got = both_readers(&ds).unwrap();
    assert_eq!(got.len(), 3);
    assert!(got[0].1.is_ok() && got[2].1.is_ok());
    let e = got[1].1.as_ref().unwrap_err();
    assert!(e.contains("line 2") && e.contains("not UTF-8"), "{e}");
    // Counted by the batcher like any unreadable sample.
    let mut it = BatchIter::new(ds.samples().unwrap(), Preprocess::clip(8), 8, Device::Cpu);
    let batch = it.next().unwrap().unwrap();
    assert_eq!(batch.keys, vec!["a.png", "c.png"]);
    assert_eq!(it.skipped().len(), 1);
}

/// `n` samples `s{first..}` with captions in tar `path`.
fn caption_tar(path: &Path, first: usize, n: usize) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for i in first..first + n {
        add(
            &mut b,
            &format!("s{i:03}.png"),
            &encode(&pattern(4, 4), image::ImageFormat::Png),
        );
        add(
            &mut b,
            &format!("s{i:03}.txt"),
            format!("caption {i}").as_bytes(),
        );
    }
    b.finish().unwrap();
}

fn keys(ds: &Dataset) -> Vec<String> {
    ds.samples().unwrap().map(|s| s.unwrap().key).collect()
}

#[test]
fn shard_lists_open_as_webdataset_and_open_clip_users_write_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("a")).unwrap();
    std::fs::create_dir(d.join("b")).unwrap();
    for k in 0..3 {
        caption_tar(&d.join(format!("a/{k:05}.tar")), k * 2, 2);
    }
    caption_tar(&d.join("b/extra.tar"), 100, 1);
    let all_a = ["s000", "s001", "s002", "s003", "s004", "s005"];
    let p = |s: &str| format!("{}/{s}", d.display());
    // Braces with zero padding, globs, `::`, a folder, repeated arguments: the same order.
    for spec in [
        vec![p("a/{00000..00002}.tar")],
        vec![p("a/*.tar")],
        vec![p("a/0000[0-2].tar")],
        vec![p("a/{00000,00001}.tar::") + &p("a/00002.tar")],
        vec![p("a/00000.tar"), p("a/0000{1..2}.tar")],
        vec![p("a")],
    ] {
        let ds = Dataset::open_sources(&spec).unwrap();
        assert_eq!(keys(&ds), all_a, "{spec:?}");
        assert!(ds.has_captions());
    }
    // Dataset::open takes a pattern too (what the TOML config's `dataset` goes through).
    let ds = Dataset::open(Path::new(&(p("a/*.tar::") + &p("b")))).unwrap();
    assert_eq!(keys(&ds).len(), 7);
    assert_eq!(keys(&ds)[6], "s100");
    // Errors name the pattern and the problem.
    for (spec, says) in [
        (vec![p("a/{00000..00003}.tar")], "tar shard not found"),
        (vec![p("c/*.tar")], "matches no file"),
        (vec![p("a/{00000..00002.tar")], "brace pattern"),
        (vec![p("a/{0..99999999999}.tar")], "at most"),
        // Alternatives multiply too: 2^40 paths (expanded, they aborted the process).
        (
            vec![p(&format!("a/{}.tar", "{0,1}".repeat(40)))],
            "name 1099511627776 paths",
        ),
        // And the parts of one argument add up.
        (
            vec![p("a/{0..5999999}.tar::") + &p("b/{0..5999999}.tar")],
            "name 12000000 paths",
        ),
        (vec![p("a/00000.tar::")], "empty source"),
        // A shard reached twice, by any spelling, is refused (its samples would count twice).
        (vec![p("a/00000.tar"), p("a/00000.tar")], "given twice"),
        (vec![p("a/*.tar::") + &p("a/./00001.tar")], "given twice"),
        (vec![p("a"), p("a/00002.tar")], "given twice"),
        (
            vec![p("a/00000.tar"), p("captions.tsv")],
            "tar shard not found",
        ),
    ] {
        let e = Dataset::open_sources(&spec).unwrap_err().to_string();
        assert!(e.contains(says), "{spec:?}: {e}");
    }
    std::fs::write(d.join("captions.tsv"), "x.png\tx\n").unwrap();
    let e = Dataset::open_sources(&[p("a/00000.tar"), p("captions.tsv")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("captions.tsv") && e.contains("only WebDataset"),
        "{e}"
    );
}

#[test]
fn img2dataset_files_output_keeps_its_captions() {
    // img2dataset --output_format files: 00000/000000001.jpg + .txt + .json, stats at the root.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (folder, stems) in [
        ("00000", ["000000000", "000000001"]),
        ("00001", ["000010000", "000010001"]),
    ] {
        std::fs::create_dir(root.join(folder)).unwrap();
        for stem in stems {
            let base = root.join(folder).join(stem);
            std::fs::write(
                base.with_extension("jpg"),
                encode(&pattern(8, 8), image::ImageFormat::Jpeg),
            )
            .unwrap();
            std::fs::write(base.with_extension("json"), "{}").unwrap();
            if stem != "000010001" {
                std::fs::write(base.with_extension("txt"), format!("a photo {stem}\n")).unwrap();
            }
        }
        std::fs::write(root.join(format!("{folder}_stats.json")), "{}").unwrap();
    }
    let ds = Dataset::open(root).unwrap();
    assert!(matches!(ds.source(), clipcid_data::Source::Files { .. }));
    assert!(ds.has_captions() && ds.classes().is_empty());
    let samples: Vec<_> = ds.samples().unwrap().map(|s| s.unwrap()).collect();
    let got: Vec<_> = samples
        .iter()
        .map(|s| (s.key.as_str(), s.caption.as_deref(), s.label))
        .collect();
    assert_eq!(
        got,
        [
            ("00000/000000000.jpg", Some("a photo 000000000"), None),
            ("00000/000000001.jpg", Some("a photo 000000001"), None),
            ("00001/000010000.jpg", Some("a photo 000010000"), None),
            ("00001/000010001.jpg", None, None),
        ]
    );
    assert!(samples.iter().all(|s| s.image.is_ok()));
    // A class folder layout without captions stays labelled.
    let lab = tempfile::tempdir().unwrap();
    std::fs::create_dir(lab.path().join("cat")).unwrap();
    std::fs::write(
        lab.path().join("cat/1.png"),
        encode(&pattern(4, 4), image::ImageFormat::Png),
    )
    .unwrap();
    let ds = Dataset::open(lab.path()).unwrap();
    assert_eq!(ds.classes(), ["cat"]);
}

#[test]
fn a_batch_written_in_place_equals_each_sample_decoded_alone_with_failures_closed_up() {
    let p = Preprocess::open_clip(24);
    let good = |i: u32| {
        let img = RgbImage::from_fn(30 + i, 26 + 2 * i, |x, y| {
            Rgb([(x * 7 + i) as u8, (y * 5) as u8, (x * y + 3 * i) as u8])
        });
        encode(&img, image::ImageFormat::Png)
    };
    // Failures first, in the middle (two in a row) and last; a missing file too.
    let images: Vec<Result<Vec<u8>, String>> = vec![
        Ok(b"not an image".to_vec()),
        Ok(good(0)),
        Ok(good(1)),
        Ok(good(2)[..40].to_vec()),
        Err("missing file".into()),
        Ok(good(3)),
        Ok(vec![0xFF, 0xD8, 0xFF]),
    ];
    let samples: Vec<clipcid_data::Sample> = images
        .iter()
        .enumerate()
        .map(|(i, image)| clipcid_data::Sample {
            index: i as u64,
            key: format!("k{i}"),
            image: image.clone(),
            caption: Some(format!("c{i}")),
            label: Some(i),
        })
        .collect();
    let (batch, skipped) = clipcid_data::decode_batch(samples, &p, &Device::Cpu).unwrap();
    let batch = batch.unwrap();
    assert_eq!(batch.indices, vec![1, 2, 5]);
    assert_eq!(batch.keys, vec!["k1", "k2", "k5"]);
    assert_eq!(batch.labels, vec![Some(1), Some(2), Some(5)]);
    assert_eq!(batch.caption_texts(), vec!["c1", "c2", "c5"]);
    // Each kept sample's digest: the first 8 bytes of SHA-256 of its own encoded bytes.
    let sha = |i: usize| {
        use sha2::Digest;
        sha2::Sha256::digest(images[i].as_ref().unwrap())[..8].to_vec()
    };
    let digests: Vec<Vec<u8>> = batch.image_digests.iter().map(|d| d.to_vec()).collect();
    assert_eq!(digests, vec![sha(1), sha(2), sha(5)]);
    let skipped: Vec<u64> = skipped.iter().map(|s| s.index).collect();
    assert_eq!(skipped, vec![0, 3, 4, 6]);
    assert_eq!(batch.pixels.dims(), &[3, 3, 24, 24]);
    let rows = batch
        .pixels
        .flatten_from(1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (row, i) in rows.iter().zip([1usize, 2, 5]) {
        let alone = p.decode(images[i].as_ref().unwrap()).unwrap();
        assert!(*row == alone, "sample {i}");
    }
    // Nothing decodes: no batch, every sample named.
    let bad = vec![clipcid_data::Sample {
        index: 0,
        key: "only".into(),
        image: Ok(b"junk".to_vec()),
        caption: None,
        label: None,
    }];
    let (batch, skipped) = clipcid_data::decode_batch(bad, &p, &Device::Cpu).unwrap();
    assert!(batch.is_none() && skipped.len() == 1);
}
