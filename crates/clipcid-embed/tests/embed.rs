#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use clipcid_data::{Dataset, Preprocess};
use clipcid_embed::{
    embed_dataset, list_shards, EmbedDtype, EmbedOptions, EmbeddingShard, ShardLayout,
};
use clipcid_models::{l2_normalize, ClipConfig, ClipModel, ClipTokenizer};
use image::{Rgb, RgbImage};

fn add(b: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, bytes).unwrap();
}

fn jpeg(i: usize) -> Vec<u8> {
    let img = RgbImage::from_fn(48, 40, |x, y| {
        Rgb([(i * 30) as u8, (x * 5) as u8, (y * 6) as u8])
    });
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

/// `n` samples in one shard; sample `corrupt` has a truncated JPEG.
fn shard(dir: &Path, n: usize, corrupt: Option<usize>) -> Dataset {
    tars(dir, &[n], corrupt);
    Dataset::open(&dir.join("data-00000.tar")).unwrap()
}

/// Rewrites the shard at `path` with `edit` applied to its tensors and metadata.
fn rewrite_shard(
    path: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut HashMap<String, String>),
) {
    let mut tensors = clipcid_store::io::load_tensors(path).unwrap();
    let mut meta = clipcid_store::io::read_header(path).unwrap().metadata;
    edit(&mut tensors, &mut meta);
    clipcid_store::io::write_safetensors(path, tensors, &meta).unwrap();
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    clipcid_models::nn::max_abs_diff(a, b).unwrap()
}

fn setup() -> (ClipModel, ClipTokenizer) {
    let cfg = ClipConfig::preset("tiny").unwrap();
    (
        ClipModel::random(&cfg, 1, &Device::Cpu).unwrap(),
        ClipTokenizer::byte_level(16).unwrap(),
    )
}

fn opts(batch: usize, shard: usize) -> EmbedOptions {
    EmbedOptions {
        batch_size: batch,
        shard_size: shard,
        ..EmbedOptions::default()
    }
}

#[test]
fn corrupt_jpeg_in_a_tar_shard_is_skipped_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let ds = shard(dir.path(), 6, Some(4));
    let (model, tok) = setup();
    let out = dir.path().join("emb");
    let s = embed_dataset(&model, Some(&tok), &ds, &out, &opts(4, 100)).unwrap();
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.skipped[0].key, "s0004");
    assert_eq!(s.samples_embedded, 5);
    let shard = EmbeddingShard::read(&s.shards[0]).unwrap();
    assert_eq!(shard.skipped, vec!["s0004"]);
    assert_eq!(shard.ids, vec![0, 1, 2, 3, 5]);
    assert!(!shard.keys.contains(&"s0004".to_string()));
    // Each row records the digest of the JPEG bytes it was embedded from.
    let tensors = clipcid_store::io::load_tensors(&s.shards[0]).unwrap();
    let digests = tensors["image_digest"].to_vec2::<u8>().unwrap();
    let expected: Vec<Vec<u8>> = [0, 1, 2, 3, 5]
        .iter()
        .map(|&i| clipcid_store::image_digest(&jpeg(i)).to_vec())
        .collect();
    assert_eq!(digests, expected);
}

#[test]
fn stored_embeddings_equal_direct_model_outputs_and_are_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let ds = shard(dir.path(), 5, None);
    let (model, tok) = setup();
    let s = embed_dataset(
        &model,
        Some(&tok),
        &ds,
        &dir.path().join("e"),
        &opts(2, 100),
    )
    .unwrap();
    let shard = EmbeddingShard::read(&s.shards[0]).unwrap();
    let p = Preprocess::clip(32);
    let px: Vec<f32> = (0..5).flat_map(|i| p.decode(&jpeg(i)).unwrap()).collect();
    let px = Tensor::from_vec(px, (5, 3, 32, 32), &Device::Cpu).unwrap();
    let direct = l2_normalize(&model.encode_image(&px).unwrap()).unwrap();
    let diff = max_abs_diff(&direct, &shard.image);
    assert!(
        diff < 1e-5,
        "batched vs direct image embeddings differ by {diff}"
    );
    let texts: Vec<String> = (0..5).map(|i| format!("picture number {i}")).collect();
    let ids = tok.encode_batch(&texts, &Device::Cpu).unwrap();
    let direct = l2_normalize(&model.encode_text(&ids).unwrap()).unwrap();
    let text = shard.text.clone().unwrap();
    let diff = max_abs_diff(&direct, &text);
    assert!(diff < 1e-5, "text embeddings differ by {diff}");
    let norms: Vec<f32> = shard
        .image
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
}

#[test]
fn rerun_resumes_complete_shards_and_redoes_damaged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ds = shard(dir.path(), 7, None);
    let (model, tok) = setup();
    let out = dir.path().join("e");
    let first = embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3)).unwrap();
    assert_eq!(first.shards.len(), 3);
    assert_eq!(first.shards_resumed, 0);
    let bytes: Vec<Vec<u8>> = first
        .shards
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();

    let again = embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3)).unwrap();
    assert_eq!(
        again.shards_resumed, 3,
        "the two full shards and the short last one (the data still ends there) are kept"
    );
    assert_eq!(again.samples_embedded, 0);
    assert_eq!(again.shards, first.shards);
    // A shard claiming another range than the data has (its fingerprint unchanged): an error
    // naming the shard, never rows kept or dropped unseen.
    let claim = |i: usize, end: u64| {
        rewrite_shard(&first.shards[i], |_, meta| {
            meta.insert("end_index".to_string(), end.to_string());
        });
    };
    for (i, end, want) in [
        (2, 8, "covers samples 6..8 but the dataset now ends at 7"),
        (
            1,
            5,
            "covers samples 3..5 but the dataset now goes on past it",
        ),
    ] {
        claim(i, end);
        let e = embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(want) && e.contains(&first.shards[i].display().to_string()),
            "{e}"
        );
        std::fs::write(&first.shards[i], &bytes[i]).unwrap();
    }
    // A shard from before JPEG went through libjpeg-turbo (no decoder in its provenance):
    // another run's, named, not resumed into this one.
    let p = &first.shards[0];
    rewrite_shard(p, |_, meta| {
        let mut provenance: serde_json::Value = serde_json::from_str(&meta["provenance"]).unwrap();
        assert_eq!(
            provenance["decoder"].as_str(),
            Some(clipcid_data::IMAGE_DECODER)
        );
        provenance.as_object_mut().unwrap().remove("decoder");
        meta.insert("provenance".to_string(), provenance.to_string());
    });
    let e = embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("different image decoder") && e.contains(&p.display().to_string()),
        "{e}"
    );
    std::fs::write(p, &bytes[0]).unwrap();

    // Damage shard 1 and the short last one: they are recomputed, byte for byte the same as
    // before.
    for i in [1, 2] {
        let b = &bytes[i];
        std::fs::write(&first.shards[i], &b[..b.len() - 7]).unwrap();
    }
    let third = embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3)).unwrap();
    assert_eq!((third.shards_resumed, third.samples_embedded), (1, 4));
    for (p, b) in third.shards.iter().zip(&bytes) {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{}", p.display());
    }
    // A shard of an older run, without image digests, is kept as it is; one whose digests
    // are malformed is recomputed, byte for byte.
    let rewrite = |i: usize, digests: Option<Tensor>| {
        rewrite_shard(&first.shards[i], |tensors, _| {
            tensors.remove("image_digest").unwrap();
            if let Some(d) = digests {
                tensors.insert("image_digest".into(), d);
            }
        });
        std::fs::read(&first.shards[i]).unwrap()
    };
    let older = rewrite(0, None);
    rewrite(
        1,
        Some(Tensor::zeros((3, 4), DType::U8, &Device::Cpu).unwrap()),
    );
    let fifth = embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3)).unwrap();
    assert_eq!((fifth.shards_resumed, fifth.samples_embedded), (2, 3));
    assert_eq!(std::fs::read(&first.shards[0]).unwrap(), older);
    assert_eq!(std::fs::read(&first.shards[1]).unwrap(), bytes[1]);
    std::fs::write(&first.shards[0], &bytes[0]).unwrap();
    // A run with different options does not trust the old shards: it refuses the folder,
    // naming what differs, unless told to replace them.
    let mut f16 = EmbedOptions {
        dtype: EmbedDtype::F16,
        ..opts(2, 3)
    };
    let e = embed_dataset(&model, Some(&tok), &ds, &out, &f16)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("written by another run (different --dtype)") && e.contains("--overwrite"),
        "{e}"
    );
    // Another teacher, another dataset: named too.
    let other = ClipModel::random(model.config(), 99, &Device::Cpu).unwrap();
    let e = embed_dataset(&other, Some(&tok), &ds, &out, &opts(2, 3))
        .unwrap_err()
        .to_string();
    assert!(e.contains("different teacher"), "{e}");
    // The same teacher in bf16 (`--precision bf16` on a re-run) is another teacher, and the
    // message says why.
    let bf16 = model.cast(candle_core::DType::BF16).unwrap();
    let e = embed_dataset(&bf16, Some(&tok), &ds, &out, &opts(2, 3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("different teacher") && e.contains("another --precision"),
        "{e}"
    );
    let other_dir = dir.path().join("other-data");
    std::fs::create_dir_all(&other_dir).unwrap();
    let ds2 = shard(&other_dir, 6, None);
    let e = embed_dataset(&model, Some(&tok), &ds2, &out, &opts(2, 3))
        .unwrap_err()
        .to_string();
    assert!(e.contains("different dataset"), "{e}");
    f16.overwrite = true;
    let fourth = embed_dataset(&model, Some(&tok), &ds, &out, &f16).unwrap();
    assert_eq!(fourth.shards_resumed, 0);
    assert_eq!(list_shards(&out).unwrap(), fourth.shards);
    // No temporary files left: the three shards, the run's end record and the lock file
    // (unlocked).
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            clipcid_store::EMBED_END_RECORD,
            clipcid_store::io::LOCK_FILE,
            "embeddings-00000.safetensors",
            "embeddings-00001.safetensors",
            "embeddings-00002.safetensors",
        ]
    );
    // Another --shard-size: the earlier run's extra shard does not linger to be read as ours.
    let wide = EmbedOptions {
        overwrite: true,
        ..opts(2, 4)
    };
    let wide = embed_dataset(&model, Some(&tok), &ds, &out, &wide).unwrap();
    assert_eq!(wide.shards.len(), 2);
    assert_eq!(list_shards(&out).unwrap(), wide.shards);
    let layout = clipcid_store::ShardLayout::open(std::slice::from_ref(&out)).unwrap();
    assert_eq!(layout.total(), 7);
}

#[test]
fn a_second_writer_into_the_same_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = shard(dir.path(), 3, None);
    let (model, tok) = setup();
    let out = dir.path().join("e");
    let held = clipcid_store::io::lock_output_dir(&out).unwrap();
    let e = embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3))
        .unwrap_err()
        .to_string();
    assert!(e.contains("another clipcid run is writing"), "{e}");
    drop(held);
    assert!(embed_dataset(&model, Some(&tok), &ds, &out, &opts(2, 3)).is_ok());
}

#[test]
fn f16_shards_store_half_precision_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let ds = shard(dir.path(), 3, None);
    let (model, _) = setup();
    let a = embed_dataset(&model, None, &ds, &dir.path().join("a"), &opts(3, 10)).unwrap();
    let f16 = EmbedOptions {
        dtype: EmbedDtype::F16,
        ..opts(3, 10)
    };
    let b = embed_dataset(&model, None, &ds, &dir.path().join("b"), &f16).unwrap();
    let h = clipcid_store::io::read_header(&b.shards[0]).unwrap();
    assert_eq!(h.tensors["image"].dtype, "F16");
    assert!(!h.tensors.contains_key("text"), "no tokenizer, no text");
    let (x, y) = (
        EmbeddingShard::read(&a.shards[0]).unwrap(),
        EmbeddingShard::read(&b.shards[0]).unwrap(),
    );
    let diff = max_abs_diff(&x.image, &y.image);
    assert!(diff > 0.0 && diff < 1e-3, "{diff}");
}

#[test]
fn mismatched_tokenizer_and_malformed_shards_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ds = shard(dir.path(), 2, None);
    let (model, _) = setup();
    let long = ClipTokenizer::byte_level(77).unwrap();
    let err =
        embed_dataset(&model, Some(&long), &ds, &dir.path().join("x"), &opts(2, 2)).unwrap_err();
    assert!(
        err.to_string()
            .contains("context length 77 exceeds the model's 16"),
        "{err}"
    );

    let path = dir.path().join("bad.safetensors");
    let t: HashMap<String, Tensor> = [
        (
            "image".to_string(),
            Tensor::zeros((3, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "text".to_string(),
            Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    clipcid_store::io::write_safetensors(&path, t, &HashMap::new()).unwrap();
    let err = EmbeddingShard::read(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("[3, 4]") && err.contains("[3, 8]"),
        "{err}"
    );
}

#[test]
fn nothing_embedded_is_an_error_saying_why() {
    let (model, tok) = setup();
    let dir = tempfile::tempdir().unwrap();
    // Every listed image is missing.
    let tsv = dir.path().join("captions.tsv");
    std::fs::write(&tsv, "gone-1.png\ta\ngone-2.png\tb\n").unwrap();
    let ds = Dataset::open(&tsv).unwrap();
    let out = dir.path().join("emb");
    let e = embed_dataset(&model, Some(&tok), &ds, &out, &opts(4, 10))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nothing to embed")
            && e.contains("all 2 samples were skipped")
            && e.contains("gone-1.png"),
        "{e}"
    );
    // The run left its (whole, empty) shard; a re-run resumes it and still has nothing (it
    // reported "embedded 0 images" as a success).
    let e = embed_dataset(&model, Some(&tok), &ds, &out, &opts(4, 10))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nothing to embed")
            && e.contains("all 2 samples were skipped when an earlier run wrote these shards")
            && e.contains("gone-1.png"),
        "{e}"
    );
}

/// `counts[k]` samples in tar `k` (`data-0000k.tar`), keys running on across tars; sample
/// `corrupt` has a truncated JPEG.
fn tars(dir: &Path, counts: &[usize], corrupt: Option<usize>) {
    let mut i = 0;
    for (k, &n) in counts.iter().enumerate() {
        let path = dir.join(format!("data-{k:05}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for _ in 0..n {
            let mut bytes = jpeg(i);
            if corrupt == Some(i) {
                bytes.truncate(bytes.len() / 3);
            }
            add(&mut b, &format!("s{i:04}.jpg"), &bytes);
            add(
                &mut b,
                &format!("s{i:04}.txt"),
                format!("picture number {i}").as_bytes(),
            );
            i += 1;
        }
        b.finish().unwrap();
    }
}

/// 23 samples in three tars (8, 7, 8) in `dir`, sample 9 corrupt, opened by a brace pattern.
fn three_tars(dir: &Path) -> Dataset {
    tars(dir, &[8, 7, 8], Some(9));
    let pattern = format!("{}/data-{{00000..00002}}.tar", dir.display());
    Dataset::open(Path::new(&pattern)).unwrap()
}

/// Image rows by id over every shard of `dir`.
fn rows_by_id(dir: &Path) -> std::collections::BTreeMap<i64, Vec<f32>> {
    let mut out = std::collections::BTreeMap::new();
    for p in list_shards(dir).unwrap() {
        let s = EmbeddingShard::read(&p).unwrap();
        let rows = s.image.to_vec2::<f32>().unwrap();
        for (id, row) in s.ids.iter().zip(rows) {
            assert!(out.insert(*id, row).is_none(), "id {id} twice");
        }
    }
    out
}

#[test]
fn three_parts_write_exactly_the_one_process_shards() {
    // 23 samples in three tars named by a brace pattern, one of them corrupt; shards of 4
    // samples (6 shards, the last short). Parts 0..3 run at once into one folder, each with
    // its own lock; the folder then holds the one-process folder's files byte for byte.
    let (model, tok) = setup();
    let dir = tempfile::tempdir().unwrap();
    let dataset = three_tars(dir.path());
    let one = dir.path().join("one");
    let whole = embed_dataset(&model, Some(&tok), &dataset, &one, &opts(3, 4)).unwrap();
    assert_eq!((whole.shards.len(), whole.samples_embedded), (6, 22));
    let split = dir.path().join("split");
    let summaries: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let (model, tok, dataset, split) = (&model, &tok, &dataset, &split);
                s.spawn(move || {
                    let o = EmbedOptions {
                        part: clipcid_embed::Part::new(i, 3).unwrap(),
                        ..opts(3, 4)
                    };
                    embed_dataset(model, Some(tok), dataset, split, &o).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Round-robin: part i has shards i and i + 3.
    for (i, s) in summaries.iter().enumerate() {
        let idx: Vec<_> = s
            .shards
            .iter()
            .map(|p| clipcid_store::shard_index(p).unwrap())
            .collect();
        assert_eq!(idx, [i, i + 3]);
    }
    assert_eq!(
        summaries.iter().map(|s| s.samples_embedded).sum::<usize>(),
        22
    );
    let files = |d: &Path| {
        list_shards(d)
            .unwrap()
            .into_iter()
            .map(|p| {
                (
                    p.file_name().unwrap().to_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(
        files(&one) == files(&split),
        "the parts' shards differ from one process's"
    );
    let (a, b) = (rows_by_id(&one), rows_by_id(&split));
    assert_eq!(a.len(), 22);
    assert!(a == b, "embeddings by id differ");
    // A part run again resumes its own shards and leaves the others' alone.
    let o = EmbedOptions {
        part: clipcid_embed::Part::new(1, 3).unwrap(),
        ..opts(3, 4)
    };
    let again = embed_dataset(&model, Some(&tok), &dataset, &split, &o).unwrap();
    assert_eq!((again.shards_resumed, again.samples_embedded), (2, 0));
    assert!(files(&one) == files(&split));
    // Every part recorded the data's end as the one process did.
    let end = clipcid_store::EmbedEnd::read(&one).unwrap().unwrap();
    assert_eq!(end.samples, 23);
    assert_eq!(clipcid_store::EmbedEnd::read(&split).unwrap(), Some(end));
}

#[test]
fn readers_refuse_a_run_whose_last_shard_is_missing_until_it_is_written() {
    // 23 samples in shards of 12: part 0 of 2 writes shard 0 (0..12), part 1 shard 1
    // (12..23). With part 1 not run, the folder looks like a whole run of 12 samples to the
    // ranges alone; part 0's end record says the data holds 23.
    let (model, tok) = setup();
    let dir = tempfile::tempdir().unwrap();
    let dataset = three_tars(dir.path());
    let out = dir.path().join("emb");
    let part = |i| EmbedOptions {
        part: clipcid_embed::Part::new(i, 2).unwrap(),
        ..opts(5, 12)
    };
    let open = || ShardLayout::open(std::slice::from_ref(&out));
    embed_dataset(&model, Some(&tok), &dataset, &out, &part(0)).unwrap();
    let e = open().unwrap_err().to_string();
    assert!(e.contains("no shard covers samples 12..23"), "{e}");
    embed_dataset(&model, Some(&tok), &dataset, &out, &part(1)).unwrap();
    assert_eq!(open().unwrap().total(), 22);
    // The last shard lost: refused again, and a whole run writes it back.
    std::fs::remove_file(clipcid_store::shard_path(&out, 1)).unwrap();
    let e = open().unwrap_err().to_string();
    assert!(e.contains("no shard covers samples 12..23"), "{e}");
    let again = embed_dataset(&model, Some(&tok), &dataset, &out, &opts(5, 12)).unwrap();
    assert_eq!((again.shards_resumed, again.samples_embedded), (1, 11));
    assert_eq!(open().unwrap().total(), 22);
    // A run that stopped before its end (here: its record lost) is not read.
    std::fs::remove_file(out.join(clipcid_store::EMBED_END_RECORD)).unwrap();
    let e = open().unwrap_err().to_string();
    assert!(e.contains("has not finished"), "{e}");
}

#[test]
fn parts_come_from_the_launchers_environment() {
    use clipcid_embed::Part;
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(Part::from_vars(env(&[])).unwrap(), None);
    assert_eq!(
        Part::from_vars(env(&[("RANK", "2"), ("WORLD_SIZE", "4")])).unwrap(),
        Some(Part::new(2, 4).unwrap())
    );
    // A Slurm array --array=1-8 has ids 1..8 and count 8.
    assert_eq!(
        Part::from_vars(env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]))
        .unwrap(),
        Some(Part::new(2, 8).unwrap())
    );
    for (bad, says) in [
        (&[("RANK", "1")][..], "WORLD_SIZE"),
        (&[("RANK", "4"), ("WORLD_SIZE", "4")][..], "below the count"),
        (&[("RANK", "x"), ("WORLD_SIZE", "4")][..], "RANK=`x`"),
    ] {
        let e = Part::from_vars(env(bad)).unwrap_err().to_string();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
    for bad in ["3", "1/0", "a/b", "2/2"] {
        assert!(bad.parse::<Part>().is_err(), "{bad}");
    }
}

#[test]
fn features_that_overflow_are_an_error_naming_the_batch_and_no_shard_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let ds = shard(dir.path(), 5, None);
    let (model, tok) = setup();
    // The final layer norm's shift of ones and a projection of 1e38s: finite weights whose
    // products overflow f32.
    for (norm, projection, tower) in [
        (
            "vision_model.post_layernorm.bias",
            "visual_projection.weight",
            "image",
        ),
        (
            "text_model.final_layer_norm.bias",
            "text_projection.weight",
            "text",
        ),
    ] {
        let mut tensors = model.tensors().clone();
        let ones = tensors[norm].ones_like().unwrap();
        let huge = (tensors[projection].ones_like().unwrap() * 1e38).unwrap();
        tensors.insert(norm.to_string(), ones);
        tensors.insert(projection.to_string(), huge);
        let broken =
            ClipModel::from_tensors(model.config(), tensors, &Device::Cpu, DType::F32).unwrap();
        // Batches of two: the first, from `s0000`, is checked when it lands, after the
        // second was read and decoded; the run stops there, before any shard is written.
        let out = dir.path().join(format!("e-{tower}"));
        let e = embed_dataset(&broken, Some(&tok), &ds, &out, &opts(2, 100))
            .unwrap_err()
            .to_string();
        let want = format!(
            "the teacher's {tower} features are NaN or infinite for the batch starting at `s0000`"
        );
        assert!(e.contains(&want), "{e}");
        assert!(list_shards(&out).unwrap_or_default().is_empty(), "{tower}");
    }
}

#[test]
fn a_captions_file_over_replaced_images_is_another_dataset_and_older_folders_resume() {
    let (model, tok) = setup();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for i in 0..3u8 {
        RgbImage::from_pixel(24, 24, Rgb([80 * i, 40, 200]))
            .save(data.join(format!("{i}.png")))
            .unwrap();
    }
    std::fs::write(data.join("captions.tsv"), "0.png\ta\n1.png\tb\n2.png\tc\n").unwrap();
    let out = dir.path().join("emb");
    let dataset = || Dataset::open(&data).unwrap();
    embed_dataset(&model, Some(&tok), &dataset(), &out, &opts(2, 2)).unwrap();
    let recorded = |i: usize| {
        let header = clipcid_store::io::read_header(&clipcid_store::shard_path(&out, i)).unwrap();
        let p: serde_json::Value = serde_json::from_str(&header.metadata["provenance"]).unwrap();
        p["data"].as_str().unwrap().to_string()
    };
    assert_eq!(recorded(0), dataset().fingerprint().unwrap());
    // A folder from before the fingerprint covered image sizes (its shard 1 lost): the re-run
    // keeps that form, resumes shard 0 and writes shard 1 with it.
    let old = dataset().fingerprint_before_image_sizes().unwrap().unwrap();
    let new = recorded(0);
    rewrite_shard(&clipcid_store::shard_path(&out, 0), |_, meta| {
        let provenance = meta["provenance"].replace(&new, &old);
        meta.insert("provenance".into(), provenance);
    });
    std::fs::remove_file(clipcid_store::shard_path(&out, 1)).unwrap();
    let again = embed_dataset(&model, Some(&tok), &dataset(), &out, &opts(2, 2)).unwrap();
    assert_eq!((again.shards_resumed, again.samples_embedded), (1, 1));
    assert_eq!((recorded(0), recorded(1)), (old.clone(), old));
    assert_eq!(
        ShardLayout::open(std::slice::from_ref(&out))
            .unwrap()
            .total(),
        3
    );
    // In a new folder, an image replaced since (another size) is another dataset.
    let fresh = dir.path().join("emb2");
    embed_dataset(&model, Some(&tok), &dataset(), &fresh, &opts(2, 2)).unwrap();
    RgbImage::from_pixel(30, 30, Rgb([1, 2, 3]))
        .save(data.join("2.png"))
        .unwrap();
    let e = embed_dataset(&model, Some(&tok), &dataset(), &fresh, &opts(2, 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("different dataset"), "{e}");
}
