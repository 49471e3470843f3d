#![allow(clippy::unwrap_used)] // test setup
//! Embedding shards of two runs mixed in one folder, or with repeated sample ids, are errors
//! naming the files, never silently merged rows.

use std::collections::HashMap;
use std::path::Path;

mod common;
use common::write_tensors;

use candle_core::{DType, Device, Tensor};
use clipcid_store::{
    io::write_safetensors, shard_path, EmbedEnd, EmbeddingShard, RowIds, RowIndex, ShardLayout,
    EMBED_END_RECORD,
};

/// A shard over samples `first..end` holding rows for `ids`.
fn shard(dir: &Path, index: usize, first: u64, end: u64, ids: &[i64]) {
    shard_of(dir, index, first, end, ids, None)
}

/// [`shard`], recording `provenance` when given.
fn shard_of(dir: &Path, index: usize, first: u64, end: u64, ids: &[i64], provenance: Option<&str>) {
    shard_with(dir, index, first, end, ids, provenance, false)
}

/// [`shard_of`], marked as written by a run that records its end ([`EmbedEnd`]) when
/// `end_recorded`.
fn shard_with(
    dir: &Path,
    index: usize,
    first: u64,
    end: u64,
    ids: &[i64],
    provenance: Option<&str>,
    end_recorded: bool,
) {
    let n = ids.len();
    let image = Tensor::ones((n, 4), DType::F32, &Device::Cpu).unwrap();
    let ids_t = Tensor::new(ids, &Device::Cpu).unwrap();
    let keys: Vec<String> = ids.iter().map(|i| format!("k{i}")).collect();
    let meta: HashMap<String, String> = [
        ("first_index".to_string(), first.to_string()),
        ("end_index".to_string(), end.to_string()),
        ("keys".to_string(), serde_json::to_string(&keys).unwrap()),
    ]
    .into();
    let mut meta = meta;
    if let Some(p) = provenance {
        meta.insert("provenance".to_string(), p.to_string());
    }
    if end_recorded {
        meta.insert(
            EmbedEnd::SHARD_KEY.to_string(),
            EMBED_END_RECORD.to_string(),
        );
    }
    write_safetensors(
        &shard_path(dir, index),
        [("image".to_string(), image), ("ids".to_string(), ids_t)],
        &meta,
    )
    .unwrap();
}

#[test]
fn overlapping_shards_of_two_runs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A run with --shard-size 4 (0..4, 4..8) and a later one with 3 that left 0..3, 3..6.
    shard(dir.path(), 0, 0, 3, &[0, 1, 2]);
    shard(dir.path(), 1, 3, 6, &[3, 4, 5]);
    shard(dir.path(), 2, 4, 8, &[4, 5, 6, 7]);
    let e = ShardLayout::open(&[dir.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlapping") && e.contains("two runs"), "{e}");
}

/// The three readers of a shard's ids: the whole shard, the row index (with keys) and the
/// ids alone.
fn ids_read_three_ways(path: &Path) -> [Result<Vec<i64>, String>; 3] {
    [
        EmbeddingShard::read(path).map(|s| s.ids),
        RowIndex::read(path).map(|s| s.ids),
        RowIds::read(path).map(|s| s.ids),
    ]
    .map(|r| r.map_err(|e| e.to_string()))
}

#[test]
fn repeated_or_out_of_range_ids_in_a_shard_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = shard_path(dir.path(), 0);
    for (ids, says) in [
        (&[0, 1, 1, 3][..], "sample id 1 appears twice"),
        (&[0, 1, 9], "outside the shard's range 0..4"),
    ] {
        shard(dir.path(), 0, 0, 4, ids);
        for e in ids_read_three_ways(&path) {
            let e = e.unwrap_err();
            assert!(e.contains("embeddings-00000") && e.contains(says), "{e}");
        }
    }
    shard(dir.path(), 0, 0, 4, &[0, 1, 3]);
    for ids in ids_read_three_ways(&path) {
        assert_eq!(ids.unwrap(), vec![0, 1, 3]);
    }
}

/// [`RowIds`] reads what [`RowIndex`] reads less the keys, which it leaves undecoded: keys
/// that do not fit their rows are refused by the row index and the whole-shard reader, and
/// do not change the ids [`RowIds`] (and so [`ShardLayout::row_ids`]) reads.
#[test]
fn row_ids_are_the_row_index_less_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = shard_path(dir.path(), 0);
    let cpu = Device::Cpu;
    let write = |keys: Option<&str>| {
        let tensors = [
            (
                "image".to_string(),
                Tensor::ones((3, 4), DType::F16, &cpu).unwrap(),
            ),
            (
                "text".to_string(),
                Tensor::ones((3, 4), DType::F16, &cpu).unwrap(),
            ),
            ("ids".to_string(), Tensor::new(&[7i64, 3, 9], &cpu).unwrap()),
            (
                "has_text".to_string(),
                Tensor::new(&[1u8, 0, 1], &cpu).unwrap(),
            ),
        ];
        let mut meta = HashMap::from([("skipped".to_string(), r#"["gone.jpg"]"#.to_string())]);
        if let Some(k) = keys {
            meta.insert("keys".to_string(), k.to_string());
        }
        write_safetensors(&path, tensors, &meta).unwrap();
    };
    let want = (vec![7i64, 3, 9], vec![true, false, true]);
    for keys in [None, Some(r#"["a\"b", "c\\d", "e"]"#)] {
        write(keys);
        let (rows, index) = (RowIds::read(&path).unwrap(), RowIndex::read(&path).unwrap());
        assert_eq!((rows.ids.clone(), rows.has_text.clone()), want);
        assert_eq!((index.ids, index.has_text), want);
        assert_eq!(
            (rows.path, rows.has_text_tensor),
            (index.path, index.has_text_tensor)
        );
        assert!(rows.has_text_tensor);
        assert_eq!(index.skipped, vec!["gone.jpg".to_string()]);
        let keys_read = index.keys;
        match keys {
            None => assert_eq!(keys_read, ["7", "3", "9"]),
            Some(_) => assert_eq!(keys_read, ["a\"b", "c\\d", "e"]),
        }
    }
    for (keys, says) in [
        (r#"["a", "b"]"#, "3 image rows but 2 keys"),
        (r#"["a", "b", 3]"#, "bad `keys` metadata"),
        (r#"["a", "b", "c""#, "bad `keys` metadata"),
    ] {
        write(Some(keys));
        for e in [
            RowIndex::read(&path).unwrap_err().to_string(),
            EmbeddingShard::read(&path).unwrap_err().to_string(),
        ] {
            assert!(
                e.contains("embeddings-00000") && e.contains(says),
                "{keys}: {e}"
            );
        }
        assert_eq!(RowIds::read(&path).unwrap().ids, want.0, "{keys}");
        let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(layout.row_ids().unwrap(), want.0, "{keys}");
    }
}

#[test]
fn shards_recording_two_provenances_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = r#"{"teacher":"aa","data":"dd"}"#;
    let b = r#"{"teacher":"bb","data":"dd"}"#;
    shard_of(dir.path(), 0, 0, 2, &[0, 1], Some(a));
    shard_of(dir.path(), 1, 2, 4, &[2, 3], Some(a));
    let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(layout.provenance.as_deref(), Some(a));
    // A third shard from another teacher's run, and one recording nothing.
    shard_of(dir.path(), 2, 4, 6, &[4, 5], Some(b));
    let e = ShardLayout::open(&[dir.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embeddings-00002") && e.contains("different teacher"),
        "{e}"
    );
    shard_of(dir.path(), 2, 4, 6, &[4, 5], None);
    let e = ShardLayout::open(&[dir.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("another embedding run"), "{e}");
}

#[test]
fn embeddings_stored_as_integers_or_f64_are_refused_by_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    for (name, dtype) in [
        ("int.safetensors", DType::I64),
        ("wide.safetensors", DType::F64),
    ] {
        let path = dir.path().join(name);
        let image = Tensor::ones((2, 4), dtype, &Device::Cpu).unwrap();
        write_safetensors(&path, [("image".to_string(), image)], &HashMap::new()).unwrap();
        let want = format!(
            "{}: `image` is {}",
            path.display(),
            dtype.as_str().to_uppercase()
        );
        let layout = ShardLayout::open(std::slice::from_ref(&path)).unwrap_err();
        let read = EmbeddingShard::read(&path).unwrap_err();
        for e in [layout.to_string(), read.to_string()] {
            assert!(
                e.starts_with(&want) && e.ends_with("embeddings are F32, F16 or BF16"),
                "{e}"
            );
        }
    }
    // A `text` tensor of another kind beside good image rows: refused too.
    let path = dir.path().join("text.safetensors");
    let image = Tensor::ones((2, 4), DType::F16, &Device::Cpu).unwrap();
    let text = Tensor::ones((2, 4), DType::U8, &Device::Cpu).unwrap();
    write_safetensors(
        &path,
        [("image".to_string(), image), ("text".to_string(), text)],
        &HashMap::new(),
    )
    .unwrap();
    let e = EmbeddingShard::read(&path).unwrap_err().to_string();
    assert!(e.contains("`text` is U8"), "{e}");
    assert!(ShardLayout::open(std::slice::from_ref(&path)).is_ok());
}

#[test]
fn ids_labels_and_flags_stored_as_floats_are_refused_not_cast() {
    // ids 0, 1.5, 2 in f32 were read as 0, 1, 2; keep flags 0.4 and 1 as false and true.
    let dir = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    let path = shard_path(dir.path(), 0);
    let image = Tensor::ones((3, 4), DType::F32, &cpu).unwrap();
    let ids = Tensor::new(&[0f32, 1.5, 2.0], &cpu).unwrap();
    write_safetensors(
        &path,
        [("image".to_string(), image), ("ids".to_string(), ids)],
        &HashMap::new(),
    )
    .unwrap();
    let e = EmbeddingShard::read(&path).unwrap_err().to_string();
    assert!(
        e.contains("embeddings-00000") && e.contains("`ids` holds F32"),
        "{e}"
    );

    let keep_path = dir.path().join("keep.safetensors");
    let keep_file = |keep: Tensor| {
        let ids = Tensor::new(&[10i64, 11, 12], &cpu).unwrap();
        write_safetensors(
            &keep_path,
            [("keep".to_string(), keep), ("ids".to_string(), ids)],
            &HashMap::new(),
        )
        .unwrap();
        clipcid_store::KeepList::read(&keep_path)
    };
    let e = keep_file(Tensor::new(&[0.4f32, 1.0, 1.0], &cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("keep.safetensors") && e.contains("`keep` holds F32"),
        "{e}"
    );
    let e = keep_file(Tensor::new(&[0u8, 1, 7], &cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`keep` flag 2 is 7, not 0 or 1"), "{e}");
    let list = keep_file(Tensor::new(&[0u8, 1, 1], &cpu).unwrap()).unwrap();
    assert_eq!(list.kept_ids().collect::<Vec<_>>(), vec![11, 12]);
    // DESIGN.md's other form: an index list of kept rows (any integer type but U8), checked.
    for rows in [
        Tensor::new(&[2i64, 1], &cpu).unwrap(),
        Tensor::new(&[1u32, 2], &cpu).unwrap(),
    ] {
        let list = keep_file(rows).unwrap();
        assert_eq!(list.keep, vec![false, true, true]);
    }
    for (rows, says) in [
        (vec![1i64, 1], "names row 1 twice"),
        (vec![3i64], "entry 0 is row 3, outside the 3 ids"),
        (vec![-1i64], "entry 0 is row -1"),
    ] {
        let e = keep_file(Tensor::new(rows.as_slice(), &cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep.safetensors") && e.contains(says), "{e}");
    }
    // A numpy bool mask (BOOL, which candle has no type for).
    let ids: Vec<u8> = [10i64, 11, 12]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    raw_safetensors(
        &keep_path,
        &[
            ("keep", "BOOL", vec![3], vec![1, 0, 1]),
            ("ids", "I64", vec![3], ids),
        ],
    );
    let list = clipcid_store::KeepList::read(&keep_path).unwrap();
    assert_eq!(list.kept_ids().collect::<Vec<_>>(), vec![10, 12]);
}

/// A safetensors file of `(name, dtype, shape, bytes)` tensors, built by hand: candle has
/// no U64 or BOOL type to write them with.
fn raw_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = vec![];
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text.as_bytes());
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

/// An `image` `[n, 2]` shard with, when given, `ids` as `U64` (as numpy writes them).
fn shard_with_u64_ids(path: &Path, n: usize, ids: Option<&[u64]>) {
    let image: Vec<u8> = (0..n * 2)
        .flat_map(|i| (1.0f32 + i as f32).to_le_bytes())
        .collect();
    let mut tensors = vec![("image", "F32", vec![n, 2], image)];
    if let Some(ids) = ids {
        let bytes = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push(("ids", "U64", vec![ids.len()], bytes));
    }
    raw_safetensors(path, &tensors);
}

/// DESIGN.md's shard format: `ids` "as a u64 tensor or a sidecar text file". A U64 `ids`
/// tensor failed the whole file ("unsupported safetensor dtype U64"); both are now read, by
/// the whole-shard reader and the row index alike.
#[test]
fn ids_as_a_u64_tensor_or_a_sidecar_text_file_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = shard_path(dir.path(), 0);
    shard_with_u64_ids(&path, 3, Some(&[7, 9, 1 << 40]));
    let want = vec![7i64, 9, 1 << 40];
    assert_eq!(EmbeddingShard::read(&path).unwrap().ids, want);
    assert_eq!(RowIndex::read(&path).unwrap().ids, want);
    assert_eq!(RowIds::read(&path).unwrap().ids, want);
    let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(layout.row_ids().unwrap(), want);
    // A value no i64 holds is an error naming the file and the tensor.
    shard_with_u64_ids(&path, 2, Some(&[1, u64::MAX]));
    for e in ids_read_three_ways(&path) {
        let e = e.unwrap_err();
        assert!(
            e.contains("embeddings-00000") && e.contains("`ids` holds 18446744073709551615"),
            "{e}"
        );
    }
    // No `ids` tensor: the sidecar gives them; without one they are the positions.
    shard_with_u64_ids(&path, 3, None);
    assert_eq!(EmbeddingShard::read(&path).unwrap().ids, vec![0, 1, 2]);
    let sidecar = clipcid_store::sidecar_ids_path(&path);
    std::fs::write(&sidecar, "40\n\n41\n 42 \n").unwrap();
    for ids in ids_read_three_ways(&path) {
        assert_eq!(ids.unwrap(), vec![40, 41, 42]);
    }
    for (text, says) in [
        ("40\n41\n", "2 ids for the 3 rows"),
        (
            "40\nforty-one\n42\n",
            "line 2: `forty-one` is not a whole number",
        ),
    ] {
        std::fs::write(&sidecar, text).unwrap();
        let e = EmbeddingShard::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("embeddings-00000.ids.txt") && e.contains(says),
            "{e}"
        );
    }
}

#[test]
fn a_shard_reached_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    shard(dir.path(), 0, 0, 2, &[0, 1]);
    shard(dir.path(), 1, 2, 4, &[2, 3]);
    let folder = dir.path().to_path_buf();
    let first = shard_path(dir.path(), 0);
    // A file another tool wrote: no recorded range, so nothing else would notice it twice.
    let plain = dir.path().join("plain.safetensors");
    let image = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
    write_safetensors(&plain, [("image".to_string(), image)], &HashMap::new()).unwrap();
    let dotted = dir.path().join(".").join("plain.safetensors");
    for inputs in [
        vec![plain.clone(), plain.clone()],
        vec![plain.clone(), dotted],
        vec![folder.clone(), first],
        vec![folder.clone(), folder.clone()],
    ] {
        let e = ShardLayout::open(&inputs).unwrap_err().to_string();
        assert!(e.contains("given twice (also as"), "{inputs:?}: {e}");
    }
    let layout = ShardLayout::open(&[folder, plain]).unwrap();
    assert_eq!(layout.counts, vec![2, 2, 3]);
}

#[test]
fn a_folder_missing_a_shard_of_its_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Shards 0 and 2 of a run split in two parts; part 1 (shard 1) has not run.
    shard(dir.path(), 0, 0, 4, &[0, 1, 2, 3]);
    shard(dir.path(), 2, 8, 12, &[8, 9, 10, 11]);
    let folder = dir.path().to_path_buf();
    let e = ShardLayout::open(std::slice::from_ref(&folder))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no shard covers samples 4..8") && e.contains("missing"),
        "{e}"
    );
    // Listed one by one, they are a chosen subset.
    let files = [shard_path(dir.path(), 0), shard_path(dir.path(), 2)];
    assert_eq!(ShardLayout::open(&files).unwrap().total(), 8);
    // A run that starts past sample 0 is missing its first shard.
    std::fs::remove_file(shard_path(dir.path(), 0)).unwrap();
    let e = ShardLayout::open(std::slice::from_ref(&folder))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no shard covers samples 0..8"), "{e}");
    // Complete (shard 1 written, one of its samples skipped as unreadable): read.
    shard(dir.path(), 0, 0, 4, &[0, 1, 2, 3]);
    shard(dir.path(), 1, 4, 8, &[4, 6, 7]);
    assert_eq!(ShardLayout::open(&[folder]).unwrap().total(), 11);
}

#[test]
fn a_folder_whose_run_recorded_more_samples_than_its_shards_cover_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().to_path_buf();
    let prov = r#"{"data":"run-a"}"#;
    let end = |samples: u64, provenance: &str| {
        EmbedEnd {
            samples,
            provenance: provenance.into(),
        }
        .write(&folder)
        .unwrap()
    };
    let open = || ShardLayout::open(std::slice::from_ref(&folder));
    // Shards 0 and 1 of a run over 12 samples split in 3 parts: part 2 (shard 2, the last)
    // has not run, but part 0 ended and recorded the data's 12 samples.
    shard_with(dir.path(), 0, 0, 4, &[0, 1, 2, 3], Some(prov), true);
    shard_with(dir.path(), 1, 4, 8, &[4, 5, 6, 7], Some(prov), true);
    end(12, prov);
    let e = open().unwrap_err().to_string();
    assert!(
        e.contains("no shard covers samples 8..12") && e.contains("missing"),
        "{e}"
    );
    // Listed one by one, they are a chosen subset.
    let files = [shard_path(dir.path(), 0), shard_path(dir.path(), 1)];
    assert_eq!(ShardLayout::open(&files).unwrap().total(), 8);
    // The data ends at 8: complete.
    end(8, prov);
    assert_eq!(open().unwrap().total(), 8);
    // No record: the run has not ended (killed, or still running).
    std::fs::remove_file(folder.join(EMBED_END_RECORD)).unwrap();
    let e = open().unwrap_err().to_string();
    assert!(
        e.contains(EMBED_END_RECORD) && e.contains("has not finished"),
        "{e}"
    );
    // An earlier run's record beside a new run's shards: the new run has not ended.
    end(8, r#"{"data":"run-b"}"#);
    let e = open().unwrap_err().to_string();
    assert!(e.contains("another embedding run's"), "{e}");
    // A damaged record is named.
    std::fs::write(folder.join(EMBED_END_RECORD), b"{\"samples\": ").unwrap();
    let e = open().unwrap_err().to_string();
    assert!(
        e.contains(EMBED_END_RECORD) && e.contains("not an embed end record"),
        "{e}"
    );
    // Shards of a run that records no end (another tool, an older clipcid) are read as
    // before without a record, or beside another run's.
    shard_of(dir.path(), 0, 0, 4, &[0, 1, 2, 3], Some(prov));
    shard_of(dir.path(), 1, 4, 8, &[4, 5, 6, 7], Some(prov));
    std::fs::remove_file(folder.join(EMBED_END_RECORD)).unwrap();
    assert_eq!(open().unwrap().total(), 8);
    end(12, r#"{"data":"run-b"}"#);
    assert_eq!(open().unwrap().total(), 8);
    // Once a newer clipcid has resumed them and recorded the end, they are held to it.
    end(12, prov);
    let e = open().unwrap_err().to_string();
    assert!(e.contains("no shard covers samples 8..12"), "{e}");
    end(8, prov);
    assert_eq!(open().unwrap().total(), 8);
}

/// Digests read by position across shards, one of them without digests, equal the rows as
/// written; a digest tensor of another type or row count is refused naming its shard.
#[test]
fn image_digests_are_read_by_position_and_malformed_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let write = |index: usize, n: usize, digests: Option<Tensor>| {
        let image = Tensor::ones((n, 4), DType::F32, &Device::Cpu).unwrap();
        let mut tensors = vec![("image".to_string(), image)];
        if let Some(d) = digests {
            tensors.push(("image_digest".to_string(), d));
        }
        write_safetensors(&shard_path(dir.path(), index), tensors, &HashMap::new()).unwrap();
    };
    // Row r of the whole layout (shard order) has digest [r; 8], if its shard has digests.
    let rows = |range: std::ops::Range<u8>| {
        let v: Vec<u8> = range.clone().flat_map(|r| [r; 8]).collect();
        Tensor::from_vec(v, (range.len(), 8), &Device::Cpu).unwrap()
    };
    write(0, 3, Some(rows(0..3)));
    write(1, 2, None);
    write(2, 4, Some(rows(5..9)));
    let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    let digests = clipcid_store::ImageDigests::open(&layout).unwrap();
    assert!(digests.any());
    let positions = [8u32, 0, 4, 5, 2, 3, 7, 0];
    let expected: Vec<Option<[u8; 8]>> = positions
        .iter()
        .map(|&p| (!(3..5).contains(&p)).then_some([p as u8; 8]))
        .collect();
    assert_eq!(digests.gather(&positions).unwrap(), expected);
    assert_eq!(
        digests.shard_of(4).unwrap(),
        shard_path(dir.path(), 1).as_path()
    );
    assert!(digests.gather(&[9]).is_err());
    // Malformed: f32 digests, or fewer rows than the shard has.
    for bad in [
        Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
        rows(0..3),
    ] {
        write(2, 4, Some(bad));
        // The layout holds the headers as they were when it was opened: opened again.
        let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
        let e = clipcid_store::ImageDigests::open(&layout)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("embeddings-00002.safetensors") && e.contains("image_digest"),
            "{e}"
        );
    }
}

/// The layout keeps the teacher's name its first shard records (distill reports it), read
/// with the header it reads anyway; `None` where the first shard records none.
#[test]
fn the_layout_keeps_the_teacher_name_its_first_shard_records() {
    let dir = tempfile::tempdir().unwrap();
    for (i, teacher) in [(0, Some("ViT-L-14/laion2b")), (1, None)] {
        let image = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[2 * i as i64, 2 * i as i64 + 1], &Device::Cpu).unwrap();
        let meta: HashMap<String, String> = teacher
            .map(|t| ("teacher".to_string(), t.to_string()))
            .into_iter()
            .collect();
        let tensors = [("image".to_string(), image), ("ids".to_string(), ids)];
        write_safetensors(&shard_path(dir.path(), i), tensors, &meta).unwrap();
    }
    let both = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(both.teacher.as_deref(), Some("ViT-L-14/laion2b"));
    let second = ShardLayout::open(&[shard_path(dir.path(), 1)]).unwrap();
    assert_eq!(second.teacher, None);
}

/// A shard rewritten after the layout read its header (another embed run into the same
/// folder) is refused by name when a reader first opens it, instead of read at the places the
/// old header gave; a shard the readers already hold open is read as it was.
#[test]
fn a_shard_rewritten_after_the_layout_was_opened_is_refused_when_first_read() {
    let dir = tempfile::tempdir().unwrap();
    shard(dir.path(), 0, 0, 4, &[0, 1, 2, 3]);
    shard(dir.path(), 1, 4, 8, &[4, 5, 6, 7]);
    let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    let reader = clipcid_store::RowReader::open(layout.clone()).unwrap();
    let first = reader.rows(0..4).unwrap();
    // Both rewritten with a row fewer (a header and data of other lengths).
    shard(dir.path(), 0, 0, 4, &[0, 1, 2]);
    shard(dir.path(), 1, 4, 8, &[4, 5, 6]);
    for e in [
        layout.row_ids_of(1).unwrap_err(),
        reader.rows(4..5).unwrap_err(),
        reader.gather(&[7]).unwrap_err(),
    ] {
        let e = e.to_string();
        assert!(
            e.contains("embeddings-00001")
                && e.contains("changed since this stage read its header"),
            "{e}"
        );
    }
    // Shard 0 was open before it was replaced: its rows and ids are still the ones read.
    assert_eq!(reader.rows(0..4).unwrap(), first);
    assert_eq!(layout.row_ids_of(0).unwrap().ids, vec![0, 1, 2, 3]);
    // A layout opened again reads the shards as they are now.
    let again = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(again.row_ids().unwrap(), vec![0, 1, 2, 4, 5, 6]);
}

/// Rows gathered by position (any order, repeats, runs across shard boundaries, f32 and f16
/// shards) equal the same rows of the shards read whole.
#[test]
fn gathered_rows_equal_the_shards_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut whole: Vec<Vec<f32>> = vec![];
    // An empty shard between two others: a row is found past it.
    let shards = [
        (5usize, DType::F32),
        (0, DType::F32),
        (1, DType::F16),
        (7, DType::F32),
    ];
    for (i, (n, dtype)) in shards.into_iter().enumerate() {
        let values: Vec<f32> = (0..n * 3)
            .map(|v| ((v * 7 + i * 13) % 11) as f32 - 4.5)
            .collect();
        let image = Tensor::from_vec(values, (n, 3), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let path = shard_path(dir.path(), i);
        write_safetensors(&path, [("image".to_string(), image)], &HashMap::new()).unwrap();
        let shard = EmbeddingShard::read(&path).unwrap();
        let rows = shard.unit_image_rows(|_| true).unwrap();
        whole.extend(rows.chunks(3).map(<[f32]>::to_vec));
    }
    let reader =
        clipcid_store::RowReader::open(ShardLayout::open(&[dir.path().to_path_buf()]).unwrap())
            .unwrap();
    let positions = [12u32, 4, 5, 6, 0, 4, 11, 3, 5, 12, 7];
    let expected: Vec<f32> = positions
        .iter()
        .flat_map(|&p| whole[p as usize].clone())
        .collect();
    assert_eq!(reader.gather(&positions).unwrap(), expected);
    assert_eq!(
        reader.rows(3..8).unwrap(),
        whole[3..8].concat(),
        "a range across both boundaries"
    );
    assert!(reader.gather(&[13]).is_err());
    // The layout's shard list is public: one reordered or cut after it was opened no longer
    // matches the tensor entries it read, and the readers refuse it instead of reading one
    // shard's rows at another's offsets.
    let opened = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    // The layout's ids of each shard, the empty one included, are the shard's own.
    for (i, path) in opened.shards.iter().enumerate() {
        assert_eq!(opened.row_ids_of(i).unwrap(), RowIds::read(path).unwrap());
    }
    assert_eq!(
        opened.row_ids().unwrap(),
        [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6]
    );
    let mut swapped = opened.clone();
    swapped.shards.swap(0, 1);
    let mut cut = opened.clone();
    cut.shards.pop();
    let mut recounted = opened.clone();
    recounted.counts.swap(0, 2);
    for changed in [swapped, cut, recounted] {
        let e = clipcid_store::RowReader::open(changed.clone()).unwrap_err();
        assert!(e.to_string().contains("open the layout again"), "{e}");
        assert!(clipcid_store::ImageDigests::open(&changed).is_err());
        let e = changed.row_ids_of(0).unwrap_err();
        assert!(e.to_string().contains("open the layout again"), "{e}");
    }
}

/// A shard of `n` rows `width` wide with ids `first..first + n`, and nothing else.
fn plain_shard(path: &Path, n: usize, width: usize, first: i64) {
    let image = Tensor::ones((n, width), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::arange(first, first + n as i64, &Device::Cpu).unwrap();
    write_tensors(path, [("image", image), ("ids", ids)]);
}

/// Shards of one layout share one width, but an empty shard may record any; a shard that
/// changes its row count or width after the layout was opened is refused when read.
#[test]
fn shards_of_other_widths_are_refused_and_empty_ones_take_any() {
    let dir = tempfile::tempdir().unwrap();
    plain_shard(&shard_path(dir.path(), 0), 2, 4, 0);
    plain_shard(&shard_path(dir.path(), 1), 3, 3, 2);
    let e = ShardLayout::open(&[dir.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embeddings-00001.safetensors: embeddings are 3 wide but")
            && e.contains("embeddings-00000.safetensors has 4"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    plain_shard(&shard_path(dir.path(), 0), 0, 3, 0);
    plain_shard(&shard_path(dir.path(), 1), 2, 4, 0);
    plain_shard(&shard_path(dir.path(), 2), 0, 7, 2);
    let layout = ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!((layout.counts.clone(), layout.dim), (vec![0, 2, 0], 4));
    assert!(
        (32..=4096).contains(&layout.open_files()),
        "{}",
        layout.open_files()
    );
    assert!(layout.read(0).unwrap().is_empty());
    assert_eq!(layout.read(1).unwrap().len(), 2);
    for (n, width, want) in [
        (3, 4, "(3 x 4, expected 2 x 4)"),
        (2, 5, "(2 x 5, expected 2 x 4)"),
    ] {
        plain_shard(&shard_path(dir.path(), 1), n, width, 0);
        let e = layout.read(1).unwrap_err().to_string();
        assert!(
            e.contains("changed while being read") && e.contains(want),
            "{e}"
        );
    }
}

/// A shard's own checks: a `text` tensor of another shape than `image`, caption flags of
/// another count than rows, a sidecar or end record that exists but cannot be read; and
/// the counts its readers give.
#[test]
fn a_shard_whose_parts_disagree_or_cannot_be_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = shard_path(dir.path(), 0);
    let cpu = Device::Cpu;
    let write = |tensors: Vec<(&str, Tensor)>| write_tensors(&path, tensors);
    let image = Tensor::ones((2, 4), DType::F32, &cpu).unwrap();
    let text = Tensor::ones((2, 3), DType::F32, &cpu).unwrap();
    write(vec![("image", image.clone()), ("text", text)]);
    let e = EmbeddingShard::read(&path).unwrap_err().to_string();
    assert!(e.contains("`text` is [2, 3] but `image` is [2, 4]"), "{e}");

    let flags = Tensor::new(&[1u8, 0, 1], &cpu).unwrap();
    let ids = Tensor::new(&[4i64, 9], &cpu).unwrap();
    write(vec![
        ("image", image.clone()),
        ("has_text", flags),
        ("ids", ids),
    ]);
    let e = EmbeddingShard::read(&path).unwrap_err().to_string();
    assert!(
        e.contains("2 image rows but 2 ids, 3 has_text flags"),
        "{e}"
    );
    let e = RowIds::read(&path).unwrap_err().to_string();
    assert!(
        e.contains("2 image rows but 2 ids, 3 has_text flags"),
        "{e}"
    );

    // Without an `ids` tensor the sidecar is read; one that is not a file is an error.
    write(vec![("image", image)]);
    let (shard, rows, index) = (
        EmbeddingShard::read(&path).unwrap(),
        RowIds::read(&path).unwrap(),
        RowIndex::read(&path).unwrap(),
    );
    assert_eq!((shard.len(), rows.len(), index.len()), (2, 2, 2));
    assert!(!shard.is_empty() && !rows.is_empty() && !index.is_empty());
    std::fs::create_dir(clipcid_store::sidecar_ids_path(&path)).unwrap();
    let e = RowIds::read(&path).unwrap_err().to_string();
    assert!(e.contains("embeddings-00000.ids.txt: cannot read"), "{e}");
    std::fs::remove_dir(clipcid_store::sidecar_ids_path(&path)).unwrap();

    plain_shard(&path, 0, 4, 0);
    let (shard, rows, index) = (
        EmbeddingShard::read(&path).unwrap(),
        RowIds::read(&path).unwrap(),
        RowIndex::read(&path).unwrap(),
    );
    assert_eq!((shard.len(), rows.len(), index.len()), (0, 0, 0));
    assert!(shard.is_empty() && rows.is_empty() && index.is_empty());

    assert_eq!(EmbedEnd::read(dir.path()).unwrap(), None);
    std::fs::create_dir(dir.path().join(EMBED_END_RECORD)).unwrap();
    let e = EmbedEnd::read(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains(EMBED_END_RECORD) && e.contains("cannot read"),
        "{e}"
    );
}

/// The digests are SHA-256 itself (FIPS 180-2's "abc" vector), whatever the chunking.
#[test]
fn digests_are_sha256() {
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(clipcid_store::sha256_hex(["abc"]), abc);
    assert_eq!(clipcid_store::sha256_hex(["a", "", "bc"]), abc);
    let want = clipcid_store::sha256_hex([[1u8, 0, 0, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0]]);
    assert_eq!(clipcid_store::row_ids_digest(&[1, 2]), want);
}

/// Row readers give rows scaled to unit L2 norm as an f64 reference scales them (a zero row
/// stays zero); read nothing for an empty range and refuse a reversed one; read only the
/// rows asked for (a NaN row between two gathered ones is no error, and asking for it is);
/// read another tensor only where every shard with rows has it at the image's shape (an
/// empty shard may record any); and leave their layout equal to a fresh one, whatever files
/// it holds open.
#[test]
fn row_readers_normalise_and_read_only_the_rows_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    let image = [3f32, 4.0, f32::NAN, 1.0, 0.0, 0.0];
    let text = [1f32, 2.0, -2.0, 0.5, 7.0, -1.0];
    let write = |i: usize, n: usize, image: &[f32], text: &[f32], text_width: usize| {
        let tensors = [
            ("image", Tensor::from_slice(image, (n, 2), &cpu).unwrap()),
            (
                "text",
                Tensor::from_slice(text, (n, text_width), &cpu).unwrap(),
            ),
            (
                "ids",
                Tensor::arange(10 * i as i64, (10 * i + n) as i64, &cpu).unwrap(),
            ),
        ];
        write_tensors(&shard_path(dir.path(), i), tensors);
    };
    write(0, 3, &image, &text, 2);
    write(1, 0, &[], &[], 5);
    let open = || ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    let reader = clipcid_store::RowReader::open(open()).unwrap();
    assert_eq!((reader.len(), reader.is_empty()), (3, false));
    assert_eq!(reader.row_ids().unwrap(), [0, 1, 2]);
    assert_eq!(reader.rows(0..1).unwrap(), [0.6, 0.8]);
    assert_eq!(reader.gather(&[2, 0]).unwrap(), [0.0, 0.0, 0.6, 0.8]);
    assert!(reader.rows(1..1).unwrap().is_empty());
    #[allow(clippy::reversed_empty_ranges)] // what a caller's arithmetic can give
    let e = reader.rows(2..1).unwrap_err().to_string();
    assert!(e.contains("rows 2..1 asked of 3 rows"), "{e}");
    let e = reader.gather(&[0, 1]).unwrap_err().to_string();
    assert!(e.contains("non-finite value NaN in row 1"), "{e}");
    assert_eq!(reader.layout(), &open());

    let texts = clipcid_store::RowReader::open_tensor(open(), "text").unwrap();
    let got = texts.rows(0..3).unwrap();
    for (row, want) in got.chunks(2).zip(text.chunks(2)) {
        let norm = want
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        for (g, w) in row.iter().zip(want) {
            let w = f64::from(*w) / norm;
            assert!((f64::from(*g) - w).abs() < 1e-7, "{g} vs {w}");
        }
    }

    write(0, 3, &image, &[0.0; 9], 3);
    let e = clipcid_store::RowReader::open_tensor(open(), "text")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`text` is [3, 3] but `image` is [3, 2]"), "{e}");
}
