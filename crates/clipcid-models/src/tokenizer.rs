//! The CLIP byte-level BPE tokenizer, running on the `tokenizers` crate.

use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::ModelError;

/// Start-of-text token of CLIP's vocabulary.
pub const START_OF_TEXT: &str = "<|startoftext|>";
/// End-of-text token of CLIP's vocabulary (also the pooling token).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// CLIP's pre-tokenizer pattern (OpenAI `simple_tokenizer.py`, lower-cased input).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP text tokenizer: cleans the text as open_clip does ([`crate::clip_text_clean`]),
/// splits words, byte-level BPE with `</w>` word ends, then
/// `[<|startoftext|>, tokens.., <|endoftext|>]` truncated (keeping the end token) and padded
/// to the context length, as open_clip's `tokenize` does. Loaded from a BERT `tokenizer.json`
/// it does the same with `[CLS]`, `[SEP]` and `[PAD]` (for locked-text teachers).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_models::ClipTokenizer;
/// // No merges: every byte is a token ("a</w>" is id 320, as in CLIP's real vocabulary).
/// let tok = ClipTokenizer::byte_level(8)?;
/// assert_eq!(tok.encode("a")?, vec![512, 320, 513, 0, 0, 0, 0, 0]);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    context_length: usize,
    start_id: u32,
    end_id: u32,
    pad_id: u32,
    /// CLIP vocabulary: captions go through open_clip's cleaning first.
    clean: bool,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("context_length", &self.context_length)
            .finish()
    }
}

/// GPT-2 / CLIP byte -> printable character table, in vocabulary order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap_or('?')))
        .collect()
}

impl ClipTokenizer {
    /// Loads a Hugging Face `tokenizer.json` (e.g. from `openai/clip-vit-base-patch32`).
    pub fn from_file(path: &Path, context_length: usize) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::file(path, format!("cannot read: {e}")))?;
        // Checked as JSON first: tokenizers 0.22 panics ("Helper") instead of returning an
        // error when the text is not valid JSON inside its `decoder` entry.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| ModelError::file(path, format!("not a tokenizer.json: {e}")))?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| ModelError::file(path, format!("not a tokenizer.json: {e}")))?;
        Self::from_tokenizer(inner, context_length).map_err(|e| ModelError::file(path, e))
    }

    /// Loads a tokenizer file of either family: a Hugging Face `tokenizer.json`
    /// ([`ClipTokenizer::from_file`]) or open_clip's BPE merges file such as
    /// `bpe_simple_vocab_16e6.txt.gz` ([`ClipTokenizer::from_bpe_vocab`]), told apart by the
    /// `.json` extension.
    pub fn load(path: &Path, context_length: usize) -> Result<Self, ModelError> {
        if path.extension().is_some_and(|e| e == "json") {
            Self::from_file(path, context_length)
        } else {
            Self::from_bpe_vocab(path, context_length)
        }
    }

    /// The tokenizer file of a model folder (or of the folder holding a checkpoint file):
    /// `tokenizer.json`, else open_clip's `bpe_simple_vocab_16e6.txt.gz` (or `.txt`); `None`
    /// when there is neither.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// assert_eq!(clipcid_models::ClipTokenizer::find_beside(dir.path()), None);
    /// std::fs::write(dir.path().join("bpe_simple_vocab_16e6.txt.gz"), b"").unwrap();
    /// assert!(clipcid_models::ClipTokenizer::find_beside(dir.path()).is_some());
    /// ```
    pub fn find_beside(model: &Path) -> Option<std::path::PathBuf> {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent().unwrap_or(Path::new("."))
        };
        [
            "tokenizer.json",
            "bpe_simple_vocab_16e6.txt.gz",
            "bpe_simple_vocab_16e6.txt",
        ]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
    }

    /// Wraps an already built `tokenizers::Tokenizer` that has CLIP's special tokens
    /// (`<|startoftext|>`, `<|endoftext|>`, padding with 0), or else BERT's (`[CLS]`, `[SEP]`,
    /// padding with `[PAD]`): a BERT WordPiece `tokenizer.json` such as all-MiniLM-L6-v2's
    /// serves the text tower of a locked-text teacher. The file's own padding and truncation
    /// settings are dropped; rows are always `context_length` long.
    pub fn from_tokenizer(
        mut inner: tokenizers::Tokenizer,
        context_length: usize,
    ) -> Result<Self, ModelError> {
        if context_length < 2 {
            return Err(ModelError::Tokenizer(format!(
                "context length {context_length} leaves no room for start and end tokens"
            )));
        }
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let id = |t: &str| inner.token_to_id(t);
        let (start_id, end_id, pad_id, clean) = match (id(START_OF_TEXT), id(END_OF_TEXT)) {
            (Some(s), Some(e)) => (s, e, 0, true),
            _ => match (id("[CLS]"), id("[SEP]"), id("[PAD]")) {
                (Some(s), Some(e), Some(p)) => (s, e, p, false),
                _ => {
                    return Err(ModelError::Tokenizer(format!(
                        "vocabulary has neither CLIP's `{START_OF_TEXT}`/`{END_OF_TEXT}` nor BERT's `[CLS]`/`[SEP]`/`[PAD]` tokens"
                    )))
                }
            },
        };
        Ok(Self {
            start_id,
            end_id,
            pad_id,
            clean,
            inner,
            context_length,
        })
    }

    /// Id used to pad rows to the context length (0 for CLIP, `[PAD]` for BERT).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Builds CLIP's tokenizer from a BPE merge list, with CLIP's vocabulary order: the 256
    /// byte symbols, the same with `</w>`, one entry per merge, then the two special tokens.
    /// With OpenAI's 48,894 merges this is the real 49,408-entry CLIP vocabulary.
    pub fn from_merges(
        merges: &[(String, String)],
        context_length: usize,
    ) -> Result<Self, ModelError> {
        let bytes: Vec<String> = bytes_to_unicode()
            .into_iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let tokens: Vec<String> = bytes
            .iter()
            .cloned()
            .chain(bytes.iter().map(|b| format!("{b}</w>")))
            .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
            .chain([START_OF_TEXT.to_string(), END_OF_TEXT.to_string()])
            .collect();
        let start = tokens.len() - 2;
        let mut vocab = serde_json::Map::new();
        for (id, tok) in tokens.into_iter().enumerate() {
            vocab.entry(tok).or_insert(json!(id));
        }
        if vocab.len() != start + 2 {
            return Err(ModelError::Tokenizer(
                "merge list produces duplicate vocabulary entries".into(),
            ));
        }
        let special = |id: usize, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": true, "special": true})
        };
        let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(start, START_OF_TEXT), special(start + 1, END_OF_TEXT)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
            "post_processor": {"type": "RobertaProcessing", "sep": [END_OF_TEXT, start + 1],
                "cls": [START_OF_TEXT, start], "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": END_OF_TEXT,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
                "byte_fallback": false, "vocab": vocab, "merges": merges}
        });
        let inner = tokenizers::Tokenizer::from_str(&doc.to_string())
            .map_err(|e| ModelError::Tokenizer(format!("cannot build CLIP tokenizer: {e}")))?;
        Self::from_tokenizer(inner, context_length)
    }

    /// CLIP's tokenizer with no merges: 514 tokens, one per byte (with and without `</w>`).
    /// Matches the `tiny` preset's vocabulary; useful for tests and smoke runs.
    pub fn byte_level(context_length: usize) -> Result<Self, ModelError> {
        Self::from_merges(&[], context_length)
    }

    /// Reads OpenAI's `bpe_simple_vocab_16e6.txt.gz` (or the uncompressed text) and builds the
    /// real CLIP tokenizer: lines 1..=48894 are the merges, as in `simple_tokenizer.py`. A
    /// gzip that inflates past 64 MiB is refused rather than read into memory.
    pub fn from_bpe_vocab(path: &Path, context_length: usize) -> Result<Self, ModelError> {
        let raw =
            std::fs::read(path).map_err(|e| ModelError::file(path, format!("cannot read: {e}")))?;
        let text = if raw.starts_with(&[0x1f, 0x8b]) {
            // OpenAI's vocabulary is 3.2 MB of text.
            clipcid_store::io::gunzip_text(&raw, 64 << 20).map_err(|e| ModelError::file(path, e))?
        } else {
            String::from_utf8(raw).map_err(|e| ModelError::file(path, format!("not UTF-8: {e}")))?
        };
        let merges = text
            .lines()
            .skip(1)
            .take(49152 - 256 - 2)
            .map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::file(path, format!("merge line `{l}` is not `a b`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if merges.is_empty() {
            // A one-line file (any text, once gunzipped) gave the byte-level tokenizer, which
            // no pretrained CLIP's vocabulary matches.
            return Err(ModelError::file(
                path,
                "no merges after the first (version) line: not a CLIP BPE vocabulary such as \
                 bpe_simple_vocab_16e6.txt.gz",
            ));
        }
        Self::from_merges(&merges, context_length).map_err(|e| ModelError::file(path, e))
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let s = self
            .inner
            .to_string(true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(clipcid_store::io::write_atomic(path, s.as_bytes())?)
    }

    /// Writes the tokenizer files `transformers` reads into the model folder `dir`:
    /// `tokenizer.json`, `tokenizer_config.json` (a `CLIPTokenizer`, or a `BertTokenizer` for
    /// a BERT vocabulary, with `model_max_length` = the context length, so
    /// `CLIPProcessor(..., padding="max_length")` makes rows the model takes) and
    /// `special_tokens_map.json`.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_models::ModelError> {
    /// let dir = tempfile::tempdir().unwrap();
    /// clipcid_models::ClipTokenizer::byte_level(24)?.save_pretrained(dir.path())?;
    /// let cfg: serde_json::Value =
    ///     serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap()).unwrap();
    /// assert_eq!(cfg["model_max_length"], 24);
    /// # Ok(()) }
    /// ```
    pub fn save_pretrained(&self, dir: &Path) -> Result<(), ModelError> {
        clipcid_store::io::create_output_folder(dir)?;
        self.save(&dir.join("tokenizer.json"))?;
        let (special, class) = if self.clean {
            let special = json!({
                "bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT,
                "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT,
            });
            (special, "CLIPTokenizer")
        } else {
            let special = json!({
                "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "unk_token": "[UNK]", "mask_token": "[MASK]",
            });
            (special, "BertTokenizer")
        };
        let mut config = special.clone();
        config["tokenizer_class"] = json!(class);
        config["do_lower_case"] = json!(true);
        config["model_max_length"] = json!(self.context_length);
        for (name, value) in [
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", special),
        ] {
            let text = serde_json::to_string_pretty(&value)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            clipcid_store::io::write_atomic(&dir.join(name), text.as_bytes())?;
        }
        Ok(())
    }

    /// Writes the BPE merges in open_clip's format (`bpe_simple_vocab_16e6.txt.gz`: a header
    /// line, then one `a b` merge per line, gzip), the file open_clip's `SimpleTokenizer`
    /// takes as `bpe_path`. Only for CLIP's byte-level BPE; a BERT vocabulary is an error.
    ///
    /// ```
    /// # fn main() -> Result<(), clipcid_models::ModelError> {
    /// use clipcid_models::ClipTokenizer;
    /// let merges = vec![("c".to_string(), "a".to_string()), ("ca".to_string(), "t</w>".to_string())];
    /// let tok = ClipTokenizer::from_merges(&merges, 8)?;
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("bpe_simple_vocab_16e6.txt.gz");
    /// tok.save_bpe_merges(&path)?;
    /// let back = ClipTokenizer::from_bpe_vocab(&path, 8)?;
    /// assert_eq!(back.encode("cat")?, tok.encode("cat")?);
    /// # Ok(()) }
    /// ```
    pub fn save_bpe_merges(&self, path: &Path) -> Result<(), ModelError> {
        if !self.clean {
            return Err(ModelError::Tokenizer(
                "a BERT vocabulary has no BPE merges to write".into(),
            ));
        }
        let doc: serde_json::Value = serde_json::from_str(
            &self
                .inner
                .to_string(false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?,
        )
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let merges = doc["model"]["merges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut text = String::from("#version: 0.2");
        for m in &merges {
            let line = match m {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(pair) => pair
                    .iter()
                    .filter_map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => continue,
            };
            text.push('\n');
            text.push_str(&line);
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, text.as_bytes())
            .and_then(|_| gz.try_finish())
            .map_err(|e| ModelError::file(path, format!("cannot compress: {e}")))?;
        let bytes = gz
            .finish()
            .map_err(|e| ModelError::file(path, format!("cannot compress: {e}")))?;
        Ok(clipcid_store::io::write_atomic(path, &bytes)?)
    }

    /// SHA-256 (hex) of the tokenizer (its `tokenizer.json` and context length), recorded in
    /// outputs so that a resume can tell whether the same tokenizer made them.
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        use sha2::{Digest, Sha256};
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut h = Sha256::new();
        h.update(json.as_bytes());
        h.update(self.context_length.to_le_bytes());
        Ok(format!("{:x}", h.finalize()))
    }

    /// Vocabulary size including the special tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Sequence length of every encoded row.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Id of `<|endoftext|>`.
    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    /// Id of `<|startoftext|>`.
    pub fn start_id(&self) -> u32 {
        self.start_id
    }

    /// Ids of `text` without special tokens, truncation or padding. With CLIP's vocabulary
    /// the text is first cleaned as open_clip does ([`crate::clip_text_clean`]: ftfy fixes,
    /// HTML entities, whitespace, lower case); a BERT vocabulary applies its own normaliser.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let cleaned;
        let text = if self.clean {
            cleaned = crate::clip_text_clean(text);
            cleaned.as_str()
        } else {
            text
        };
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One row of exactly `context_length` ids: start, tokens, end, padding. Text too
    /// long is cut and its last kept position replaced by the end token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::with_capacity(self.context_length);
        ids.push(self.start_id);
        ids.extend(self.tokens(text)?);
        ids.push(self.end_id);
        if ids.len() > self.context_length {
            ids.truncate(self.context_length);
            ids[self.context_length - 1] = self.end_id;
        }
        ids.resize(self.context_length, self.pad_id);
        Ok(ids)
    }

    /// A `[B, context_length]` u32 tensor of encoded texts.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let mut flat = Vec::with_capacity(texts.len() * self.context_length);
        for t in texts {
            flat.extend(self.encode(t.as_ref())?);
        }
        Ok(Tensor::from_vec(
            flat,
            (texts.len(), self.context_length),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_clip() {
        let t = bytes_to_unicode();
        assert_eq!(t.len(), 256);
        assert_eq!(t[0], (b'!', '!'));
        assert_eq!(t[64], (b'a', 'a'));
        // The first non-printable byte (0x00) comes after the 188 printable ones, as U+0100.
        assert_eq!(t[188], (0, '\u{100}'));
        // Space (0x20) is byte 32, the 33rd non-printable: U+0120 'Ġ'.
        assert_eq!(
            t.iter().find(|(b, _)| *b == b' ').map(|x| x.1),
            Some('\u{120}')
        );
    }

    #[test]
    fn merges_apply_in_rank_order_with_word_ends() {
        // Ids by CLIP's construction: 512 + merge rank, then <|startoftext|>, <|endoftext|>.
        let merges = vec![
            ("c".to_string(), "a".to_string()),
            ("ca".to_string(), "t</w>".to_string()),
        ];
        let tok = ClipTokenizer::from_merges(&merges, 8).expect("tokenizer");
        assert_eq!(tok.vocab_size(), 516);
        assert_eq!((tok.start_id(), tok.end_id()), (514, 515));
        // "Cat" lower-cases to "cat" -> c a t</w> -> ca t</w> -> cat</w> (id 513).
        // "cab": c a b</w> -> ca b</w>; "ca" = 512, "b</w>" = 256 + 65.
        // "!" -> "!</w>" = 256 + 0.
        assert_eq!(
            tok.encode("Cat  cab!").expect("encode"),
            vec![514, 513, 512, 321, 256, 515, 0, 0]
        );
    }

    #[test]
    fn long_text_is_truncated_keeping_the_end_token() {
        let tok = ClipTokenizer::byte_level(4).expect("tokenizer");
        // "abcdef" -> a b c d e f</w>: 6 tokens; 4 slots: start a b end.
        assert_eq!(
            tok.encode("abcdef").expect("encode"),
            vec![512, 64, 65, 513]
        );
        // Non-ASCII is byte-level: "é" is bytes C3 A9. Printable ranges are '!'..'~' (ids
        // 0..=93), '¡'..'¬' (94..=105), '®'..'ÿ' (106..=187); so 0xC3 -> 106 + (0xC3 - 0xAE)
        // = 127 and 0xA9 ('©') -> 94 + (0xA9 - 0xA1) = 102, as "©</w>" = 256 + 102.
        assert_eq!(tok.tokens("é").expect("tokens"), vec![127, 256 + 102]);
    }

    #[test]
    fn saved_tokenizer_json_reloads_identically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.json");
        let merges = vec![("h".to_string(), "i</w>".to_string())];
        let tok = ClipTokenizer::from_merges(&merges, 10).expect("tokenizer");
        tok.save(&path).expect("save");
        let back = ClipTokenizer::from_file(&path, 10).expect("load");
        for s in ["hi there", "HI, hi!", "élan 42"] {
            assert_eq!(tok.encode(s).expect("a"), back.encode(s).expect("b"), "{s}");
        }
    }
}
