//! candle's PyTorch-pickle reader as clipcid builds it: candle-core 0.11.1 with the patch in
//! `vendor/candle-core` (vendor/README.md, "the pickle reader") that turns what a crafted
//! `.bin`/`.pt` checkpoint could do to the process (a panic, a stack overflow, an allocation
//! the size of a claimed shape, a memo that doubles a value per opcode) into errors, and reads
//! Python's `LONG1` integers as Python writes them. Each case here is a hand-written pickle
//! (protocol 2, as `torch.save` writes it) in a stored zip, read through candle's API and
//! through clipcid's checkpoint loader, whose error must name the file.

use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::DType;
use clipcid_models::Checkpoint;
use clipcid_suite::torch_zip::{
    encode_long, long1, memo_doubling, nested_tuples, state_dict, torch_save_zip, zip_of_pickles,
    TensorEntry, MARK, PROTO_2, STOP, TUPLE,
};
use proptest::prelude::*;

/// A tensor record as torch writes it: `w`, f32 of shape `[4]` over all of storage `0`.
const W: TensorEntry<'static> = TensorEntry {
    name: "w",
    key: "0",
    storage_size: 4,
    offset: 0,
    size: &[4],
    stride: &[1],
    n_args: 6,
};

/// What candle makes of a tensor record alone: `into_tensor_info`'s answer.
fn tensor_info(entry: &TensorEntry) -> candle_core::Result<Option<TensorInfo>> {
    let mut pickle = PROTO_2.to_vec();
    pickle.extend(entry.value());
    pickle.push(STOP);
    parse(&pickle)?.into_tensor_info(
        Object::Unicode(entry.name.into()),
        Path::new("archive/data"),
    )
}

/// Writes a checkpoint of `pickle` and `storages` as `dir/pytorch_model.bin`.
fn write_checkpoint(dir: &Path, pickle: &[u8], storages: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join("pytorch_model.bin");
    std::fs::write(&path, torch_save_zip(pickle, storages).unwrap()).unwrap();
    path
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs the pickle VM over `bytes` to its `STOP`.
fn parse(bytes: &[u8]) -> candle_core::Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(&mut &bytes[..])?;
    stack.finalize()
}

fn parse_error(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(obj) => panic!("parsed: {obj:?}"),
        Err(e) => e.to_string(),
    }
}

/// clipcid's loader on a crafted checkpoint: an error, and it names the file.
fn refused_by_clipcid(path: &Path) -> String {
    match Checkpoint::read(path, None) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "the error does not name the file: {msg}"
            );
            msg
        }
    }
}

#[test]
fn long1_reads_what_python_writes() {
    // Python 3's `pickle.encode_long(v)` for each value (checked with CPython 3.11), and one
    // longer encoding than Python writes, which is still a valid LONG1.
    let cases = [
        (vec![], 0, true),
        (vec![0xff], -1, true),
        (vec![0x7f], 127, true),
        (vec![0x80, 0x00], 128, true),
        (vec![0x80], -128, true),
        (vec![0x00, 0x00, 0x00, 0x80, 0x00], 1 << 31, true),
        (vec![0x00, 0x00, 0x00, 0x80], -(1 << 31), true),
        (
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f].to_vec(),
            i64::MAX,
            true,
        ),
        ([0, 0, 0, 0, 0, 0, 0, 0x80].to_vec(), i64::MIN, true),
        (vec![0xff; 8], -1, false),
    ];
    for (bytes, want, python_writes) in cases {
        if python_writes {
            assert_eq!(encode_long(want), bytes, "the test's encoder, {want}");
        }
        let mut pickle = PROTO_2.to_vec();
        pickle.extend([0x8a, bytes.len() as u8]);
        pickle.extend(&bytes);
        pickle.push(STOP);
        assert_eq!(
            parse(&pickle).unwrap(),
            Object::Long(want),
            "bytes {bytes:02x?}"
        );
    }
}

proptest! {
    #[test]
    fn long1_round_trips_every_i64(v in any::<i64>()) {
        let mut pickle = PROTO_2.to_vec();
        pickle.extend(long1(v));
        pickle.push(STOP);
        prop_assert_eq!(parse(&pickle).unwrap(), Object::Long(v));
    }
}

#[test]
fn a_long1_wider_than_64_bits_is_an_error_not_a_panic() {
    for n in [9u8, 32, 255] {
        let mut pickle = PROTO_2.to_vec();
        pickle.extend([0x8a, n]);
        pickle.extend(vec![0x01; n as usize]);
        pickle.push(STOP);
        let msg = parse_error(&pickle);
        assert!(
            msg.contains(&format!("{n} bytes does not fit 64 bits")),
            "{msg}"
        );
    }
}

#[test]
fn nesting_stops_at_64_levels_before_the_stack_overflows() {
    let mut obj = parse(&nested_tuples(64)).unwrap();
    let mut depth = 1;
    while let Object::Tuple(mut inner) = obj {
        match inner.pop() {
            Some(o) => {
                depth += 1;
                obj = o
            }
            None => break,
        }
    }
    assert_eq!(depth, 64);
    assert!(parse_error(&nested_tuples(65)).contains("deeper than 64 levels"));
    // Before the limit this dropped a 200,000-deep tuple recursively: a stack overflow,
    // which aborts the process rather than panicking.
    assert!(parse_error(&nested_tuples(200_000)).contains("deeper than 64 levels"));
}

#[test]
fn a_memo_that_doubles_a_value_is_refused_within_the_working_set() {
    // x = (); then x = (x, x) from the memo, again and again: 2^k nodes after k rounds
    // (2^40 would be some 60 TB of objects).
    let msg = parse_error(&memo_doubling(40));
    assert!(msg.contains("more than 512 MiB of objects"), "{msg}");
}

#[test]
fn the_working_set_is_one_for_the_whole_file_not_one_per_pickle() {
    // 19 doublings build and copy about 220 MiB: one pickle fits in 512 MiB, three do not.
    let dir = tempfile::tempdir().unwrap();
    let pickle = memo_doubling(19);
    let path = dir.path().join("pytorch_model.bin");
    std::fs::write(&path, zip_of_pickles(&[&pickle], &[]).unwrap()).unwrap();
    assert!(
        candle_core::pickle::read_pth_tensor_info(&path, false, None)
            .unwrap()
            .is_empty()
    );
    std::fs::write(&path, zip_of_pickles(&[pickle.as_slice(); 3], &[]).unwrap()).unwrap();
    let msg = candle_core::pickle::read_pth_tensor_info(&path, false, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("more than 512 MiB of objects"), "{msg}");
}

#[test]
fn a_string_longer_than_the_file_is_an_error_without_allocating_it() {
    let mut pickle = PROTO_2.to_vec();
    pickle.push(b'X');
    pickle.extend(u32::MAX.to_le_bytes());
    pickle.extend(b"short");
    let msg = parse_error(&pickle);
    assert!(
        msg.contains("ends inside a 4294967295-byte string"),
        "{msg}"
    );
}

#[test]
fn tensors_are_read_at_their_storage_offsets() {
    // Two views of one storage of 6 floats, as a tied or sliced weight is saved.
    let dir = tempfile::tempdir().unwrap();
    let storage = f32_bytes(&[1., 2., 3., 4., 5., 6.]);
    let entries = [
        TensorEntry {
            name: "a",
            storage_size: 6,
            size: &[2, 2],
            stride: &[2, 1],
            ..W
        },
        TensorEntry {
            name: "b",
            storage_size: 6,
            offset: 4,
            size: &[2],
            ..W
        },
        // Column-major (a transposed tensor saved as it was): [[1, 3], [2, 4]].
        TensorEntry {
            name: "t",
            storage_size: 6,
            size: &[2, 2],
            stride: &[1, 2],
            ..W
        },
    ];
    let path = write_checkpoint(dir.path(), &state_dict(&entries), &[("0", &storage)]);
    let mut tensors = candle_core::pickle::read_all(&path).unwrap();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "t"]);
    for (_, t) in &tensors {
        assert_eq!(t.dtype(), DType::F32);
    }
    let a: Vec<Vec<f32>> = tensors[0].1.to_vec2().unwrap();
    assert_eq!(a, [[1., 2.], [3., 4.]]);
    let b: Vec<f32> = tensors[1].1.to_vec1().unwrap();
    assert_eq!(b, [5., 6.]);
    let t: Vec<Vec<f32>> = tensors[2].1.to_vec2().unwrap();
    assert_eq!(t, [[1., 3.], [2., 4.]]);
}

#[test]
fn crafted_tensor_records_are_errors_naming_the_file() {
    let storage = f32_bytes(&[0.5; 4]);
    let cases: [(&str, TensorEntry, &str); 6] = [
        (
            // `_rebuild_tensor_v2` with two arguments: `Vec::remove` out of range before.
            "too few arguments",
            TensorEntry { n_args: 2, ..W },
            "takes at least 4 arguments",
        ),
        (
            // 2^40 floats claimed over a 4-float storage: a 4 TiB allocation before.
            "a shape larger than its storage",
            TensorEntry {
                size: &[1 << 40],
                ..W
            },
            "does not fit its storage",
        ),
        (
            // A product of dimensions past 64 bits: an overflow panic before.
            "a shape whose size overflows",
            TensorEntry {
                size: &[1 << 40, 1 << 40],
                stride: &[1 << 40, 1],
                ..W
            },
            "does not fit its storage",
        ),
        (
            "a negative offset",
            TensorEntry {
                offset: -1,
                size: &[1],
                ..W
            },
            "negative storage offset",
        ),
        (
            // An empty tensor far past the end: offset * 4 overflowed before.
            "an offset past any file",
            TensorEntry {
                offset: i64::MAX,
                size: &[0],
                ..W
            },
            "past any file",
        ),
        (
            // The storage claims 2^40 floats, its zip member holds 4: compared before
            // anything is allocated (0.11.1 allocated the shape's 1 TiB first).
            "a storage larger than its data",
            TensorEntry {
                storage_size: 1 << 40,
                size: &[1 << 38],
                ..W
            },
            "holds 16 bytes",
        ),
    ];
    for (what, entry, want) in cases {
        // candle refuses the record (and a state dict skips it, printing why), or the
        // record is well formed and reading its data fails.
        let msg = match tensor_info(&entry) {
            Err(e) => e.to_string(),
            Ok(Some(_)) => {
                let dir = tempfile::tempdir().unwrap();
                let path = write_checkpoint(dir.path(), &state_dict(&[entry]), &[("0", &storage)]);
                candle_core::pickle::read_all(&path)
                    .unwrap_err()
                    .to_string()
            }
            Ok(None) => panic!("{what}: not read as a tensor record"),
        };
        assert!(msg.contains(want), "{what}: {msg}");
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), &state_dict(&[entry]), &[("0", &storage)]);
        refused_by_clipcid(&path);
    }
}

#[test]
fn a_pickle_bomb_in_a_checkpoint_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_checkpoint(dir.path(), &memo_doubling(40), &[]);
    let msg = refused_by_clipcid(&path);
    assert!(msg.contains("more than 512 MiB of objects"), "{msg}");
}

#[test]
fn an_error_shows_a_large_object_cut_short() {
    // APPEND onto a tuple of 100,000 items (not a list): the message quotes the tuple.
    let mut pickle = PROTO_2.to_vec();
    pickle.push(MARK);
    pickle.extend(vec![b'N'; 100_000]);
    pickle.extend([TUPLE, b'N', b'a', STOP]);
    let msg = parse_error(&pickle);
    // The first line (a backtrace may follow it, with RUST_BACKTRACE set).
    let line = msg.lines().next().unwrap_or_default();
    assert!(
        line.starts_with("expected a list, got Tuple([None, None"),
        "{line}"
    );
    assert!(line.ends_with("..."), "{line}");
    assert!(line.len() < 300, "{} bytes", line.len());
}
