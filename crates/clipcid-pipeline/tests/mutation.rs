#![allow(clippy::unwrap_used)] // test setup
//! Fuzzing of every reader of user files, by byte mutation of valid files and by generating
//! well-formed files with hostile values. Any outcome is fine except a panic, an abort or an
//! accepted value that is out of range; errors must name the file.
//!
//! | target | reader(s) |
//! |---|---|
//! | WebDataset tar shard (+ images) | `Dataset` streaming and index, `Preprocess::decode` |
//! | captions TSV (+ images) | the same |
//! | embedding shard (safetensors header and data) | `read_header`, `load_tensors`, `EmbeddingShard`, `ShardLayout`, `load_embeddings`, `KeepList`, `read_clusters` |
//! | safetensors header with hostile dtypes, shapes and offsets | the same |
//! | pair file of `balance pairs` (bytes, and hostile part, row count, threshold, block) | `read_pair_file`, then `merge_pair_files` over a shard |
//! | model folder (`model.safetensors`, `config.json`) | `ClipModel::load`, then a forward pass |
//! | PyTorch checkpoint (zip + pickle), open_clip folder | `ClipModel::load` |
//! | tokenizer input (any text) | `ClipTokenizer::encode` with CLIP's cleaning (ftfy, HTML entities) |
//! | `tokenizer.json` | `ClipTokenizer::from_file` |
//! | distill TOML config (bytes, and hostile numbers) | `DistillConfig::from_file`, then `Trainer::new` for an accepted one |
//!
//! CI runs a small budget (32 cases per target). A longer run, the one reported in issue 18:
//! `PROPTEST_CASES=5000 cargo test --release -p clipcid-pipeline --test mutation`.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use clipcid_data::{Dataset, Preprocess};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};
use clipcid_store::{io, shard_path, EmbeddingShard, KeepList, ShardLayout};
use image::{Rgb, RgbImage};
use proptest::prelude::*;

fn png(i: u8) -> Vec<u8> {
    let img = RgbImage::from_fn(9, 7, |x, y| {
        Rgb([i.wrapping_mul(40), x as u8 * 20, y as u8 * 30])
    });
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn jpeg(i: u8) -> Vec<u8> {
    let img = RgbImage::from_fn(16, 12, |x, y| {
        Rgb([i.wrapping_mul(60), x as u8 * 10, y as u8 * 15])
    });
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

/// A valid shard: 4 samples with an image, a caption, a label.
fn valid_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..4u8 {
        for (ext, bytes) in [
            ("png", if i % 2 == 0 { png(i) } else { jpeg(i) }),
            ("txt", format!("caption {i}").into_bytes()),
            ("cls", format!("{i}").into_bytes()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{i:03}.{ext}"), bytes.as_slice())
                .unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// An embedding shard as `clipcid embed` writes it: 3 rows of width 4, image and text,
/// ids, keys, sample range and provenance.
fn valid_shard() -> Vec<u8> {
    let cpu = Device::Cpu;
    let image = Tensor::arange(1f32, 13., &cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let text = image.affine(-1.0, 0.5).unwrap();
    let ids = Tensor::new(&[0i64, 1, 2], &cpu).unwrap();
    let meta: HashMap<String, String> = [
        ("clipcid.kind", "embeddings"),
        ("first_index", "0"),
        ("end_index", "3"),
        ("keys", r#"["a","b","c"]"#),
        ("has_text", "[1,1,0]"),
        ("provenance", r#"{"teacher":"aa","data":"dd"}"#),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    io::serialize(
        [
            ("image".to_string(), image),
            ("text".to_string(), text),
            ("ids".to_string(), ids),
        ],
        &meta,
    )
    .unwrap()
}

/// The edits of one mutation: (kind, position, byte).
type Edits = Vec<(u8, usize, u8)>;

/// `data` with `edits` applied: a byte overwritten, inserted or deleted, the file cut, or
/// (kind 4) the first 8 bytes, a safetensors header length, replaced by `position`.
fn mutate(data: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    mutate_within(data, edits, 0, usize::MAX)
}

/// [`mutate`] with the edited positions inside `from..to` (clamped to the data), to aim at
/// one part of a large file (a zip's pickle or its central directory).
fn mutate_within(mut data: Vec<u8>, edits: &[(u8, usize, u8)], from: usize, to: usize) -> Vec<u8> {
    for &(kind, pos, byte) in edits {
        if data.is_empty() {
            break;
        }
        let lo = from.min(data.len() - 1);
        let at = lo + pos % (to.min(data.len()) - lo).max(1);
        match kind % 5 {
            0 => data[at] = byte,
            1 => data.insert(at, byte),
            2 => {
                data.remove(at);
            }
            3 => data.truncate(at),
            _ => {
                let n = data.len().min(8);
                data[..n].copy_from_slice(&(pos as u64).to_le_bytes()[..n]);
            }
        }
    }
    data
}

/// Reads a dataset both ways and decodes every sample; panics only on a bug.
fn read_dataset(path: &Path) {
    let Ok(ds) = Dataset::open(path) else { return };
    let pre = Preprocess::clip(8);
    if let Ok(stream) = ds.samples() {
        for s in stream {
            match s {
                Ok(s) => {
                    if let Ok(bytes) = &s.image {
                        let _ = pre.decode(bytes);
                    }
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
    }
    // A part's stream (every other sample wanted) sees the same samples at the same
    // positions, the wanted ones byte for byte, and ends the same way.
    let summary = |stream: Result<clipcid_data::SampleStream<'_>, _>, all: bool| {
        let mut out = vec![];
        if let Ok(stream) = stream {
            for s in stream {
                match s {
                    Ok(s) => {
                        let image = (all || s.index % 2 == 0).then(|| s.image.clone());
                        out.push(Ok((s.index, s.key, image)));
                    }
                    Err(e) => {
                        assert!(e.to_string().contains("shard"), "{e}");
                        out.push(Err(()));
                        break;
                    }
                }
            }
        }
        out
    };
    let mut whole = summary(ds.samples(), true);
    for s in whole.iter_mut().flatten() {
        if s.0 % 2 == 1 {
            s.2 = None;
        }
    }
    assert_eq!(whole, summary(ds.samples_where(|i| i % 2 == 0), false));
    // The random-access index refuses the data exactly when reading it through ends in an
    // error, and otherwise holds the stream's samples, in order.
    let stream_failed = whole.last().is_some_and(|s| s.is_err());
    match ds.index() {
        Ok(index) => {
            assert!(
                !stream_failed,
                "the stream failed, the index did not: {whole:?}"
            );
            assert_eq!(index.len(), whole.len());
            for (i, w) in whole.iter().flatten().enumerate() {
                if let Ok(s) = index.get(i as u64) {
                    assert_eq!(s.key, w.1);
                    if let Ok(bytes) = &s.image {
                        let _ = pre.decode(bytes);
                    }
                }
            }
        }
        Err(e) => assert!(stream_failed, "the index failed, the stream did not: {e}"),
    }
}

/// An error of a file reader must name the file.
fn names_file<E: std::fmt::Display>(r: Result<impl Sized, E>, path: &Path) {
    if let Err(e) = r {
        let name = path.file_name().unwrap().to_string_lossy();
        let e = e.to_string();
        assert!(e.contains(name.as_ref()), "error does not name {name}: {e}");
    }
}

/// Every reader of embedding shards, keep and cluster files over `dir/embeddings-00000`.
fn read_shard(dir: &Path) {
    let path = shard_path(dir, 0);
    names_file(io::read_header(&path), &path);
    names_file(io::load_tensors(&path), &path);
    match EmbeddingShard::read(&path) {
        Ok(s) => {
            let rows = s.unit_image_rows(|_| true);
            if let Ok(rows) = rows {
                assert!(rows.iter().all(|v| v.is_finite()));
                assert_eq!(rows.len(), s.len() * s.dim());
            }
        }
        Err(e) => names_file(Err::<(), _>(e), &path),
    }
    if let Ok(layout) = ShardLayout::open(&[dir.to_path_buf()]) {
        let _ = layout.read(0);
    }
    if let Ok(e) = clipcid_dedup::load_embeddings(&[dir.to_path_buf()], &Device::Cpu) {
        assert_eq!(e.image.dims(), [e.ids.len(), e.image.dim(1).unwrap()]);
    }
    names_file(KeepList::read(&path), &path);
    names_file(clipcid_store::read_clusters(&path), &path);
}

/// A pair file of `clipcid balance pairs` over [`valid_shard`]'s 3 rows: part 0/1, one pair.
fn valid_pair_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.safetensors");
    std::fs::write(shard_path(dir.path(), 0), valid_shard()).unwrap();
    let ids = ShardLayout::open(&[dir.path().to_path_buf()])
        .unwrap()
        .row_ids()
        .unwrap();
    let file = clipcid_dedup::PairFile {
        pairs: clipcid_dedup::NearPairs {
            i: vec![0],
            j: vec![1],
            dist2: vec![0.001],
        },
        rows: 3,
        threshold: 0.07,
        block_size: 4096,
        f16: false,
        part: clipcid_store::Part::new(0, 1).unwrap(),
        embeddings: Some(r#"{"teacher":"aa","data":"dd"}"#.to_string()),
        row_ids: Some(clipcid_store::row_ids_digest(&ids)),
    };
    clipcid_dedup::write_pair_file(&path, &file).unwrap();
    std::fs::read(&path).unwrap()
}

/// Reads a (mutated) pair file and, when it reads, merges it over [`valid_shard`]: an error
/// naming the file, or a keep list of the shard's 3 rows.
fn read_pair_file(dir: &Path) {
    let path = dir.join("pairs.safetensors");
    let file = match clipcid_dedup::read_pair_file(&path) {
        Ok(f) => f,
        Err(e) => return names_file(Err::<(), _>(e), &path),
    };
    std::fs::write(shard_path(dir, 0), valid_shard()).unwrap();
    let layout = ShardLayout::open(&[dir.to_path_buf()]).unwrap();
    let rows = clipcid_store::RowReader::open(layout).unwrap();
    let opts = clipcid_dedup::BalanceOptions::default();
    if let Ok(r) = clipcid_dedup::merge_pair_files(&rows, &[(path, file)], &opts) {
        assert_eq!(r.keep.len(), 3);
    }
}

/// A safetensors file from a header given as JSON text, with `data` bytes after it.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One hostile tensor entry: any dtype name, and a shape of small and huge numbers.
fn tensor_entry() -> impl Strategy<Value = (&'static str, Vec<usize>)> {
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "F64", "I64", "I32", "U32", "U8", "BOOL", "F8_E4M3", "X",
    ]);
    let dim = prop_oneof![
        4 => 0usize..6,
        1 => Just(usize::MAX),
        1 => Just(1usize << 40),
        1 => Just(1usize << 62),
        1 => any::<usize>(),
    ];
    (dtype, proptest::collection::vec(dim, 0..4))
}

/// A well-formed safetensors header naming the tensors and metadata the readers look for,
/// each with hostile values, and the length of the data after it. The data offsets tile the
/// data exactly (so the header passes the length check and the shapes reach the readers) or,
/// one time in four, are arbitrary.
fn hostile_header() -> impl Strategy<Value = (String, usize)> {
    let meta_value = prop::sample::select(vec![
        "0",
        "18446744073709551615",
        "-1",
        "[]",
        r#"["a","a","a"]"#,
        "[1,1,1,1,1,1]",
        "not json",
        r#"{"teacher":1}"#,
    ]);
    (
        proptest::collection::vec(tensor_entry(), 3),
        proptest::collection::vec(meta_value, 5),
        (0usize..200, 0usize..200, 0usize..200),
        prop_oneof![3 => Just(None), 1 => proptest::collection::vec(any::<usize>(), 6).prop_map(Some)],
    )
        .prop_map(|(t, m, (a, b, c), arbitrary)| {
            let mut cuts = [a, b, c];
            cuts.sort();
            let offsets = match arbitrary {
                Some(o) => [[o[0], o[1]], [o[2], o[3]], [o[4], o[5]]],
                None => [[0, cuts[0]], [cuts[0], cuts[1]], [cuts[1], cuts[2]]],
            };
            let entry = |i: usize| {
                format!(
                    r#"{{"dtype":"{}","shape":{:?},"data_offsets":[{},{}]}}"#,
                    t[i].0, t[i].1, offsets[i][0], offsets[i][1]
                )
            };
            let header = format!(
                r#"{{"image":{},"ids":{},"text":{},"__metadata__":{{"first_index":"{}","end_index":"{}","keys":{:?},"has_text":{:?},"provenance":{:?}}}}}"#,
                entry(0), entry(1), entry(2), m[0], m[1], m[2], m[3], m[4]
            );
            (header, cuts[2])
        })
}

/// A tiny model folder, made once: (config.json, model.safetensors) bytes.
fn tiny_model() -> &'static (Vec<u8>, Vec<u8>) {
    static MODEL: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ClipConfig::preset("tiny").unwrap();
        ClipModel::random(&cfg, 0, &Device::Cpu)
            .unwrap()
            .save_pretrained(dir.path(), DType::F32)
            .unwrap();
        (
            std::fs::read(dir.path().join("config.json")).unwrap(),
            std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        )
    })
}

/// Loads a model folder; a model that loads must run an image through without a panic.
fn load_model(dir: &Path) {
    match ClipModel::load(dir, &Device::Cpu) {
        Ok(m) => {
            let s = m.config().vision_config.image_size;
            assert!(s > 0 && s <= 4096, "image_size {s} accepted");
            if s <= 64 {
                let px = Tensor::zeros((1, 3, s, s), DType::F32, &Device::Cpu).unwrap();
                let _ = m.encode_image(&px);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// open_clip's tokenizer over the small BPE vocabulary of the reference fixtures, which
/// cleans text as open_clip does (the hand-written part: ftfy fixes, HTML entities).
fn clip_tokenizer() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let vocab = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/open_clip/bpe_simple_vocab_16e6.txt.gz");
        ClipTokenizer::from_bpe_vocab(&vocab, 16).unwrap()
    })
}

/// Text built from the pieces the cleaner treats specially, and any other characters.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "&amp;",
            "&#",
            "&#x",
            "&#0;",
            "&#x110000;",
            "&#9999999999;",
            "&nbsp",
            "&lt;&gt;",
            "&AMP",
            "<|endoftext|>",
            "<|startoftext|>",
            "\u{301}",
            "\u{202e}",
            "\u{feff}",
            "â€™",
            "Ã©",
            "ﬁ",
            "Ｆｕｌｌ",
            "\r\n",
            "\t",
            "\0",
            " ",
            "a photo of",
        ])
        .prop_map(str::to_string),
        any::<char>().prop_map(|c| c.to_string()),
        "\\PC{0,8}",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

/// A valid distill config over `dir` (dataset, embeddings and clusters present).
fn distill_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::create_dir_all(d.join("emb")).unwrap();
    std::fs::write(d.join("clusters.safetensors"), b"").unwrap();
    dir
}

const DISTILL_TOML: &str = r#"mode = "clip-cid"
batch_size = 16
epochs = 2
seed = 11
checkpoint_every = 3
[data]
dataset = "data"
embeddings = "emb"
clusters = "clusters.safetensors"
[student]
model = "tiny"
context_length = 24
[loss.cluster]
sample_rate = 0.5
margin = { kind = "arcface", m = 0.2 }
[loss.piccollage.schedule]
steps = [[0, 4.0], [10, 2.0]]
[optim]
lr = 1e-3
warmup_steps = 2
accumulate = 2
"#;

/// The numbers a config may hold, as TOML spells them: in range, at the edges, and out.
fn toml_number() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "-0.0",
            "1",
            "-1",
            "0.5",
            "1.0",
            "1.5",
            "nan",
            "inf",
            "-inf",
            "1e308",
            "4.0",
            "18446744073709551615",
            "9223372036854775807",
            "6148914691236517206",
            "-3",
        ])
        .prop_map(str::to_string),
        any::<f64>().prop_map(|v| format!("{v:?}")),
    ]
}

/// Cases per target: `PROPTEST_CASES`, else 32 (CI's budget).
fn budget() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

fn edits() -> impl Strategy<Value = Edits> {
    proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: budget(), ..ProptestConfig::default() })]

    #[test]
    fn mutated_tar_shards_never_panic(e in edits()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.tar");
        std::fs::write(&path, mutate(valid_tar(), &e)).unwrap();
        read_dataset(&path);
    }

    #[test]
    fn mutated_captions_and_images_never_panic(e in edits(), f in edits()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), mutate(png(1), &f)).unwrap();
        std::fs::write(dir.path().join("b.jpg"), mutate(jpeg(2), &f)).unwrap();
        let tsv = b"path\tcaption\na.png\tfirst \"caption\"\nb.jpg\tsecond\n".to_vec();
        let path = dir.path().join("captions.tsv");
        std::fs::write(&path, mutate(tsv, &e)).unwrap();
        read_dataset(&path);
    }

    #[test]
    fn mutated_embedding_shards_never_panic(e in edits()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(shard_path(dir.path(), 0), mutate(valid_shard(), &e)).unwrap();
        read_shard(dir.path());
    }

    #[test]
    fn mutated_pair_files_never_panic(e in edits()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pairs.safetensors"), mutate(valid_pair_file(), &e)).unwrap();
        read_pair_file(dir.path());
    }

    #[test]
    fn pair_files_with_hostile_metadata_never_panic(
        index in prop_oneof![Just(0u64), Just(1), any::<u64>()],
        count in prop_oneof![Just(1u64), Just(2), Just(1 << 60), Just(u64::MAX), any::<u64>()],
        rows in prop_oneof![Just("3".to_string()), Just("0".into()), any::<u64>().prop_map(|v| v.to_string())],
        threshold in toml_number(),
        block in prop_oneof![Just("4096".to_string()), Just("0".into()), any::<u64>().prop_map(|v| v.to_string())],
    ) {
        // Well-formed tensors, and metadata as a hand-edited or foreign file may hold it:
        // a part of any count, any row count, threshold and block size.
        let dir = tempfile::tempdir().unwrap();
        let cpu = Device::Cpu;
        let meta: HashMap<String, String> = [
            ("kind", clipcid_dedup::PAIRS_KIND.to_string()),
            ("rows", rows),
            ("threshold", threshold),
            ("block_size", block),
            ("f16", "false".to_string()),
            ("part", format!("{index}/{count}")),
            ("embeddings", r#"{"teacher":"aa","data":"dd"}"#.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        io::write_safetensors(
            &dir.path().join("pairs.safetensors"),
            [
                ("i".to_string(), Tensor::new(&[0u32], &cpu).unwrap()),
                ("j".to_string(), Tensor::new(&[1u32], &cpu).unwrap()),
                ("dist2".to_string(), Tensor::new(&[0.001f32], &cpu).unwrap()),
            ],
            &meta,
        )
        .unwrap();
        read_pair_file(dir.path());
    }

    #[test]
    fn hostile_safetensors_headers_never_panic((header, data) in hostile_header()) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = safetensors_bytes(&header, &vec![0x3f; data]);
        std::fs::write(shard_path(dir.path(), 0), bytes).unwrap();
        read_shard(dir.path());
    }

    #[test]
    fn mutated_model_folders_never_panic(e in edits(), in_config in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let (config, weights) = tiny_model();
        let (config, weights) = if in_config {
            (mutate(config.clone(), &e), weights.clone())
        } else {
            (config.clone(), mutate(weights.clone(), &e))
        };
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), weights).unwrap();
        load_model(dir.path());
    }

    #[test]
    fn mutated_pytorch_checkpoints_never_panic(e in edits(), region in 0usize..3) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/open_clip-bin");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture.join("open_clip_config.json"),
            dir.path().join("open_clip_config.json"),
        )
        .unwrap();
        let bin = std::fs::read(fixture.join("open_clip_pytorch_model.bin")).unwrap();
        let len = bin.len();
        // The pickle (first member), the zip's central directory, or anywhere.
        let (from, to) = [(0, 7000), (len.saturating_sub(8000), len), (0, len)][region];
        let path = dir.path().join("open_clip_pytorch_model.bin");
        std::fs::write(&path, mutate_within(bin, &e, from, to)).unwrap();
        load_model(dir.path());
    }

    #[test]
    fn any_text_tokenizes_to_one_full_row(text in hostile_text()) {
        let tok = clip_tokenizer();
        let ids = tok.encode(&text).unwrap();
        prop_assert_eq!(ids.len(), tok.context_length());
        prop_assert_eq!(ids[0], tok.start_id());
        prop_assert!(ids.contains(&tok.end_id()));
        prop_assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    }

    #[test]
    fn mutated_tokenizer_files_never_panic(e in edits()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        ClipTokenizer::byte_level(16).unwrap().save(&path).unwrap();
        let bytes = mutate(std::fs::read(&path).unwrap(), &e);
        std::fs::write(&path, bytes).unwrap();
        match ClipTokenizer::from_file(&path, 16) {
            Ok(tok) => {
                if let Ok(ids) = tok.encode("a photo of a cat") {
                    prop_assert_eq!(ids.len(), 16);
                }
            }
            Err(err) => names_file(Err::<(), _>(err), &path),
        }
    }

    #[test]
    fn mutated_distill_configs_never_panic(e in edits()) {
        let dir = distill_dir();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, mutate(DISTILL_TOML.as_bytes().to_vec(), &e)).unwrap();
        names_file(clipcid_train::DistillConfig::from_file(&path), &path);
    }

    #[test]
    fn configs_with_numbers_out_of_range_are_refused(
        field in 0usize..21,
        value in toml_number(),
    ) {
        // Each numeric key of DISTILL_TOML (or one added to it), set to `value`.
        let keys = [
            "batch_size", "epochs", "seed", "checkpoint_every", "lr", "min_lr", "warmup_steps",
            "accumulate", "clip_grad_norm", "beta1", "beta2", "eps", "weight_decay",
            "sample_rate", "scale", "m", "kl_temperature", "cluster_weight", "instance_weight",
            "temperature", "context_length",
        ];
        let key = keys[field];
        let text = match key {
            "m" => DISTILL_TOML.replace("m = 0.2", &format!("m = {value}")),
            "temperature" => DISTILL_TOML.replace("[10, 2.0]", &format!("[10, {value}]")),
            "context_length" => DISTILL_TOML.replace("context_length = 24", &format!("context_length = {value}")),
            "beta1" | "beta2" | "eps" | "weight_decay" => {
                format!("{DISTILL_TOML}[optim.adamw]\n{key} = {value}\n")
            }
            "clip_grad_norm" | "lr" | "min_lr" | "warmup_steps" | "accumulate" => {
                let old = format!("\n{key} = ");
                if DISTILL_TOML.contains(&old) {
                    let start = DISTILL_TOML.find(&old).unwrap() + 1;
                    let end = start + DISTILL_TOML[start..].find('\n').unwrap();
                    format!("{}{key} = {value}{}", &DISTILL_TOML[..start], &DISTILL_TOML[end..])
                } else {
                    DISTILL_TOML.replace("[optim]\n", &format!("[optim]\n{key} = {value}\n"))
                }
            }
            "sample_rate" => DISTILL_TOML.replace("sample_rate = 0.5", &format!("sample_rate = {value}")),
            "scale" | "kl_temperature" => DISTILL_TOML.replace("[loss.cluster]\n", &format!("[loss.cluster]\n{key} = {value}\n")),
            "cluster_weight" => DISTILL_TOML.replace("[loss.cluster]\n", &format!("[loss.cluster]\nweight = {value}\n")),
            "instance_weight" => format!("{DISTILL_TOML}[loss.instance]\nweight = {value}\n"),
            _ => {
                let start = DISTILL_TOML.find(&format!("{key} = ")).unwrap();
                let end = start + DISTILL_TOML[start..].find('\n').unwrap();
                format!("{}{key} = {value}{}", &DISTILL_TOML[..start], &DISTILL_TOML[end..])
            }
        };
        let dir = distill_dir();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, &text).unwrap();
        let Ok(c) = clipcid_train::DistillConfig::from_file(&path) else { return Ok(()) };
        // Accepted: every number is one a run can use.
        let (o, l) = (&c.optim, &c.loss);
        prop_assert!(o.lr.is_finite() && o.lr > 0.0 && (0.0..=o.lr).contains(&o.min_lr), "{text}");
        prop_assert!((0.0..1.0).contains(&o.adamw.beta1) && (0.0..1.0).contains(&o.adamw.beta2), "{text}");
        prop_assert!(o.adamw.eps > 0.0 && o.adamw.eps.is_finite(), "{text}");
        prop_assert!(o.adamw.weight_decay >= 0.0 && o.adamw.weight_decay.is_finite(), "{text}");
        prop_assert!(o.clip_grad_norm >= 0.0 && o.clip_grad_norm.is_finite(), "{text}");
        prop_assert!(c.batch_size >= 1 && c.epochs >= 1 && c.epochs <= 1_000_000 && o.accumulate >= 1, "{text}");
        prop_assert!(l.cluster.sample_rate > 0.0 && l.cluster.sample_rate <= 1.0, "{text}");
        prop_assert!(l.cluster.scale > 0.0 && l.cluster.scale.is_finite(), "{text}");
        prop_assert!(l.cluster.kl_temperature > 0.0 && l.cluster.kl_temperature.is_finite(), "{text}");
        prop_assert!(l.cluster.weight >= 0.0 && l.cluster.weight.is_finite(), "{text}");
        prop_assert!(l.instance.weight >= 0.0 && l.instance.weight.is_finite(), "{text}");
        let m = match l.cluster.margin {
            clipcid_loss::Margin::None => 0.0,
            clipcid_loss::Margin::ArcFace(m) | clipcid_loss::Margin::CosFace(m) => m,
        };
        prop_assert!(m.is_finite() && (0.0..std::f64::consts::PI).contains(&m), "{text}");
        prop_assert!(l.piccollage.schedule.steps.iter().all(|&(_, t)| t.is_finite() && t > 0.0), "{text}");
        prop_assert!(c.student.context_length.is_none_or(|n| n >= 2), "{text}");
        prop_assert!(c.batch_size <= 1 << 24 && o.accumulate <= 1 << 16, "{text}");
        // And a trainer is built from it, or refuses it, without a panic (batch_size x
        // accumulate once overflowed there).
        let _ = clipcid_train::Trainer::new(c, &dir.path().join("run"), &Device::Cpu);
    }
}

/// The unmutated inputs are valid, so the mutations above start from files every reader
/// accepts and reach past the first check.
#[test]
fn unmutated_inputs_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("shard.tar");
    std::fs::write(&tar, valid_tar()).unwrap();
    assert_eq!(Dataset::open(&tar).unwrap().index().unwrap().len(), 4);

    std::fs::write(shard_path(dir.path(), 0), valid_shard()).unwrap();
    let shard = EmbeddingShard::read(&shard_path(dir.path(), 0)).unwrap();
    assert_eq!((shard.len(), shard.dim()), (3, 4));
    let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    assert!(layout.provenance.is_some());

    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), &tiny_model().0).unwrap();
    std::fs::write(model.join("model.safetensors"), &tiny_model().1).unwrap();
    ClipModel::load(&model, &Device::Cpu).unwrap();
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/open_clip-bin");
    ClipModel::load(&bin, &Device::Cpu).unwrap();

    let dir = distill_dir();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, DISTILL_TOML).unwrap();
    clipcid_train::DistillConfig::from_file(&path).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.safetensors");
    std::fs::write(&pairs, valid_pair_file()).unwrap();
    let file = clipcid_dedup::read_pair_file(&pairs).unwrap();
    std::fs::write(shard_path(dir.path(), 0), valid_shard()).unwrap();
    let rows =
        clipcid_store::RowReader::open(ShardLayout::open(&[dir.path().to_path_buf()]).unwrap())
            .unwrap();
    let opts = clipcid_dedup::BalanceOptions::default();
    let merged = clipcid_dedup::merge_pair_files(&rows, &[(pairs, file)], &opts).unwrap();
    assert_eq!(merged.keep.iter().filter(|&&k| k).count(), 2);
}
