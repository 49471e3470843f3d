//! Hand-written PyTorch checkpoints: a pickle (protocol 2, as `torch.save` writes it) in a
//! stored zip, for the tests of candle's pickle reader (`tests/pickle.rs`) and of the
//! command line on crafted checkpoints (`crates/clipcid/tests/hostile.rs`).

use std::io::Write;

/// Protocol 2's header.
pub const PROTO_2: [u8; 2] = [0x80, 2];
/// Ends the pickle.
pub const STOP: u8 = b'.';
/// Starts a group (`TUPLE`, `SETITEMS`, ...).
pub const MARK: u8 = b'(';
/// The objects since the last `MARK`, as a tuple.
pub const TUPLE: u8 = b't';
/// The top object in a 1-tuple.
pub const TUPLE1: u8 = 0x85;
/// The top two objects as a 2-tuple.
pub const TUPLE2: u8 = 0x86;
/// `()`.
pub const EMPTY_TUPLE: u8 = b')';
/// `callable(*args)`: pops the arguments and the callable.
pub const REDUCE: u8 = b'R';
/// Adds the key-value pairs since the last `MARK` to the dict below them.
pub const SETITEMS: u8 = b'u';
/// A persistent id (a tensor's storage record), from the top object.
pub const BINPERSID: u8 = b'Q';
/// `False`.
pub const NEWFALSE: u8 = 0x89;
/// Pushes a copy of memo entry `n` (one byte).
pub const BINGET: u8 = b'h';
/// Stores a copy of the top object as memo entry `n` (one byte).
pub const BINPUT: u8 = b'q';

/// Python's `pickle.encode_long` (what `LONG1` carries): the fewest little-endian two's
/// complement bytes that hold `v`, none for zero.
pub fn encode_long(v: i64) -> Vec<u8> {
    if v == 0 {
        return vec![];
    }
    let bytes = v.to_le_bytes();
    let mut n = 8;
    // Drop a top byte while the byte below it still carries the sign.
    while n > 1 {
        let (top, below) = (bytes[n - 1], bytes[n - 2]);
        if (top == 0 && below & 0x80 == 0) || (top == 0xff && below & 0x80 != 0) {
            n -= 1;
        } else {
            break;
        }
    }
    bytes[..n].to_vec()
}

/// `LONG1` of `v`.
pub fn long1(v: i64) -> Vec<u8> {
    let b = encode_long(v);
    let mut out = vec![0x8a, b.len() as u8];
    out.extend(b);
    out
}

/// An integer as Python's pickler (protocol 2) writes it: `BININT1`, `BININT2` or `BININT`
/// when it fits, else `LONG1`.
pub fn py_int(v: i64) -> Vec<u8> {
    match v {
        0..=0xff => vec![b'K', v as u8],
        0x100..=0xffff => {
            let mut out = vec![b'M'];
            out.extend((v as u16).to_le_bytes());
            out
        }
        _ if i32::try_from(v).is_ok() => {
            let mut out = vec![b'J'];
            out.extend((v as i32).to_le_bytes());
            out
        }
        _ => long1(v),
    }
}

/// `BINUNICODE` of `s`.
pub fn unicode(s: &str) -> Vec<u8> {
    let mut out = vec![b'X'];
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
    out
}

/// `GLOBAL`: the class or function `module.name`.
pub fn global(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}

/// A tuple of integers (a tensor's size or stride).
pub fn int_tuple(values: &[i64]) -> Vec<u8> {
    let mut out = vec![MARK];
    for &v in values {
        out.extend(py_int(v));
    }
    out.push(TUPLE);
    out
}

/// One state-dict entry as `torch.save` pickles it: `name` ->
/// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, the storage a
/// persistent id `("storage", FloatStorage, key, "cpu", storage_size)`; `n_args` may drop
/// trailing arguments.
#[derive(Debug, Clone, Copy)]
pub struct TensorEntry<'a> {
    /// The state dict's key.
    pub name: &'a str,
    /// The storage's key: its data is the zip member `archive/data/<key>`.
    pub key: &'a str,
    /// Elements in the storage.
    pub storage_size: i64,
    /// The tensor's first element in the storage.
    pub offset: i64,
    /// The tensor's shape.
    pub size: &'a [i64],
    /// The tensor's strides, in elements.
    pub stride: &'a [i64],
    /// How many of the six arguments to write (6 for a real file).
    pub n_args: usize,
}

impl TensorEntry<'_> {
    /// The entry's name and value, as they go into the state dict.
    pub fn pickle(&self) -> Vec<u8> {
        let mut out = unicode(self.name);
        out.extend(self.value());
        out
    }

    /// The `_rebuild_tensor_v2(...)` call alone.
    pub fn value(&self) -> Vec<u8> {
        let mut out = global("torch._utils", "_rebuild_tensor_v2");
        let mut storage = vec![MARK];
        storage.extend(unicode("storage"));
        storage.extend(global("torch", "FloatStorage"));
        storage.extend(unicode(self.key));
        storage.extend(unicode("cpu"));
        storage.extend(py_int(self.storage_size));
        storage.push(TUPLE);
        storage.push(BINPERSID);
        let mut hooks = global("collections", "OrderedDict");
        hooks.extend([EMPTY_TUPLE, REDUCE]);
        let args = [
            storage,
            py_int(self.offset),
            int_tuple(self.size),
            int_tuple(self.stride),
            vec![NEWFALSE],
            hooks,
        ];
        out.push(MARK);
        for a in &args[..self.n_args.min(args.len())] {
            out.extend(a);
        }
        out.extend([TUPLE, REDUCE]);
        out
    }
}

/// A whole state-dict pickle: `OrderedDict()` then `SETITEMS` of `entries`.
pub fn state_dict(entries: &[TensorEntry]) -> Vec<u8> {
    let mut out = PROTO_2.to_vec();
    out.extend(global("collections", "OrderedDict"));
    out.extend([EMPTY_TUPLE, REDUCE, MARK]);
    for e in entries {
        out.extend(e.pickle());
    }
    out.extend([SETITEMS, STOP]);
    out
}

/// A pickle whose memo doubles one value `rounds` times: `x = (x, x)` from two copies of
/// memo entry 0, stored back (2^rounds nodes if nothing stops it).
pub fn memo_doubling(rounds: usize) -> Vec<u8> {
    let mut out = PROTO_2.to_vec();
    out.extend([EMPTY_TUPLE, BINPUT, 0]);
    for _ in 0..rounds {
        out.extend([BINGET, 0, BINGET, 0, TUPLE2, BINPUT, 0]);
    }
    out.push(STOP);
    out
}

/// A pickle of `levels` nested tuples: `()`, then `TUPLE1` `levels - 1` times.
pub fn nested_tuples(levels: usize) -> Vec<u8> {
    let mut out = PROTO_2.to_vec();
    out.push(EMPTY_TUPLE);
    out.extend(vec![TUPLE1; levels.saturating_sub(1)]);
    out.push(STOP);
    out
}

/// A `torch.save` zip (members stored, as PyTorch writes them): `archive/data.pkl` and each
/// storage as `archive/data/<key>`.
pub fn torch_save_zip(pickle: &[u8], storages: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    zip_of_pickles(&[pickle], storages)
}

/// [`torch_save_zip`] with several pickles: `archive/data.pkl`, then `archive1/data.pkl`, ...
/// (what a zip of several saved objects would hold).
pub fn zip_of_pickles(pickles: &[&[u8]], storages: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (i, pickle) in pickles.iter().enumerate() {
        let archive = if i == 0 {
            "archive".to_string()
        } else {
            format!("archive{i}")
        };
        zip.start_file(format!("{archive}/data.pkl"), stored)?;
        zip.write_all(pickle)?;
    }
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), stored)?;
        zip.write_all(bytes)?;
    }
    Ok(zip.finish()?.into_inner())
}
