#![allow(clippy::unwrap_used)]
//! CLIP's BPE tokenizer against a reference written from the BPE rules of OpenAI's
//! `simple_tokenizer.py`: split into words, append `</w>` to a word's last symbol, merge the
//! lowest-ranked adjacent pair until none is in the merge list; ids are the 256 byte symbols,
//! the same with `</w>`, then one id per merge, then the two special tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clipcid_models::ClipTokenizer;

/// OpenAI's byte order: printable bytes first (33..=126, 161..=172, 174..=255), then the rest.
fn byte_order() -> Vec<u8> {
    let mut bs: Vec<u8> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let rest: Vec<u8> = (0..=255u8).filter(|b| !bs.contains(b)).collect();
    bs.extend(rest);
    bs
}

/// ASCII-only pre-tokenisation of CLIP's pattern (lower-cased first): the contractions
/// `'s 't 're 've 'm 'll 'd`, letter runs, single digits, runs of other non-space characters.
fn words(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.to_lowercase().chars().collect();
    let kind = |c: char| {
        if c.is_ascii_alphabetic() {
            1
        } else if c.is_ascii_digit() {
            2
        } else {
            3
        }
    };
    let mut out: Vec<String> = vec![];
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        if !cur.is_empty() {
            out.push(std::mem::take(cur));
        }
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            let rest: String = chars[i + 1..].iter().collect();
            let suffix = ["re", "ve", "ll", "s", "t", "m", "d"]
                .into_iter()
                .find(|s| rest.starts_with(s));
            if let Some(suffix) = suffix {
                flush(&mut cur, &mut out);
                out.push(format!("'{suffix}"));
                i += 1 + suffix.len();
                continue;
            }
        }
        i += 1;
        if c.is_whitespace() {
            flush(&mut cur, &mut out);
            continue;
        }
        let same = cur
            .chars()
            .last()
            .is_some_and(|p| kind(p) == kind(c) && kind(c) != 2);
        if !same {
            flush(&mut cur, &mut out);
        }
        cur.push(c);
    }
    flush(&mut cur, &mut out);
    out
}

/// The reference BPE: token ids of `text`, without start/end tokens.
fn reference_ids(text: &str, merges: &[(String, String)]) -> Vec<u32> {
    let order = byte_order();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, b) in order.iter().enumerate() {
        let c = (*b as char).to_string(); // ASCII maps to itself in bytes_to_unicode
        vocab.insert(c.clone(), i as u32);
        vocab.insert(format!("{c}</w>"), 256 + i as u32);
    }
    let mut ranks: HashMap<(String, String), usize> = HashMap::new();
    for (r, (a, b)) in merges.iter().enumerate() {
        ranks.entry((a.clone(), b.clone())).or_insert(r);
        vocab.entry(format!("{a}{b}")).or_insert(512 + r as u32);
    }
    let mut ids = vec![];
    for w in words(text) {
        let chars: Vec<String> = w.chars().map(|c| c.to_string()).collect();
        let mut word: Vec<String> = chars.clone();
        let last = word.len() - 1;
        word[last] = format!("{}</w>", word[last]);
        while word.len() > 1 {
            let best = (0..word.len() - 1)
                .filter_map(|i| {
                    ranks
                        .get(&(word[i].clone(), word[i + 1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((r, _)) = best else { break };
            let (a, b) = &merges[r];
            let mut next = vec![];
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && &word[i] == a && &word[i + 1] == b {
                    next.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    next.push(word[i].clone());
                    i += 1;
                }
            }
            word = next;
        }
        ids.extend(word.iter().map(|s| vocab[s]));
    }
    ids
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

const TEXTS: [&str; 6] = [
    "a photo of a cat",
    "The cat sat on the mat.",
    "hello world!!",
    "distillation of CLIP in 2025",
    "that's 7 cats",
    "   many   spaces\tand\nlines ",
];

#[test]
fn tokenizer_matches_the_reference_bpe_on_a_small_merge_list() {
    let merges = pairs(&[
        ("t", "h"),
        ("th", "e</w>"),
        ("c", "a"),
        ("ca", "t</w>"),
        ("a", "t</w>"),
        ("o", "f</w>"),
        ("h", "e"),
        ("he", "l"),
        ("hel", "l"),
        ("hell", "o</w>"),
        ("a", "t"),
        ("m", "at</w>"),
        ("ca", "ts</w>"),
        ("t", "s</w>"),
    ]);
    let tok = ClipTokenizer::from_merges(&merges, 77).unwrap();
    assert_eq!(tok.vocab_size(), 512 + merges.len() + 2);
    for text in TEXTS {
        assert_eq!(
            tok.tokens(text).unwrap(),
            reference_ids(text, &merges),
            "{text:?}"
        );
    }
    // Merges were applied: "the" is one token, merge rank 1 -> id 513.
    assert_eq!(tok.tokens("the").unwrap(), vec![513]);
}

/// The real vocabulary, when `scripts/fetch-data.sh` has fetched it (or
/// `CLIPCID_BPE_VOCAB` points at `bpe_simple_vocab_16e6.txt.gz`).
fn real_vocab() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CLIPCID_BPE_VOCAB").map(PathBuf::from),
        Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../data/raw/clip/bpe_simple_vocab_16e6.txt.gz"),
        ),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

#[test]
fn real_clip_vocabulary_gives_known_ids() {
    let Some(path) = real_vocab() else {
        eprintln!("skipped: no bpe_simple_vocab_16e6.txt.gz (run scripts/fetch-data.sh or set CLIPCID_BPE_VOCAB)");
        return;
    };
    let tok = ClipTokenizer::from_bpe_vocab(&path, 77).unwrap();
    assert_eq!(tok.vocab_size(), 49_408);
    assert_eq!((tok.start_id(), tok.end_id()), (49_406, 49_407));
    // Ids every CLIP user has seen: `a photo of a cat`.
    let ids = tok.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49_406, 320, 1125, 539, 320, 2368, 49_407]);
    // And the reference BPE over the real merges agrees on the rest.
    let text = flate2_lines(&path);
    let merges: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .take(48_894)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    for text in TEXTS {
        assert_eq!(
            tok.tokens(text).unwrap(),
            reference_ids(text, &merges),
            "{text:?}"
        );
    }
}

#[test]
fn a_vocabulary_gzip_that_inflates_past_64_mib_is_refused() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bpe_simple_vocab_16e6.txt.gz");
    // 65 MiB of well-formed merge lines in a gzip of some 200 kB.
    let block = "a b\n".repeat(1 << 18);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for _ in 0..65 {
        gz.write_all(block.as_bytes()).unwrap();
    }
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    let e = ClipTokenizer::from_bpe_vocab(&path, 77)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bpe_simple_vocab_16e6.txt.gz") && e.contains("more than 64 MiB"),
        "{e}"
    );
}

/// A file of one line (a version header, or any text gunzipped) held no merges and gave the
/// byte-level tokenizer of 514 tokens, silently: no pretrained CLIP's vocabulary.
#[test]
fn a_vocabulary_without_merges_is_refused() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.txt.gz");
    for text in ["garbage", "#version: 0.2\n", ""] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let e = ClipTokenizer::from_bpe_vocab(&path, 77)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vocab.txt.gz") && e.contains("no merges"),
            "{text:?}: {e}"
        );
    }
}

fn flate2_lines(path: &Path) -> String {
    use std::io::Read;
    let raw = std::fs::read(path).unwrap();
    let mut s = String::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_string(&mut s)
        .unwrap();
    s
}
