//! Dataset arguments as WebDataset and open_clip users write them: brace-expanded shard
//! lists (`shards/{00000..41455}.tar`), globs (`shards/*.tar`), several sources joined by
//! open_clip's `::`, and repeated arguments.

use std::path::{Path, PathBuf};

use crate::{DataError, Dataset};

/// Joins several sources in one argument, as open_clip's `--train-data a.tar::b.tar`.
pub const SOURCE_SEPARATOR: &str = "::";

/// The most paths one brace pattern may name (LAION-400M is 41,456 shards; a typo such as
/// `{0..99999999999}` must be an error, not an allocation of billions of strings).
pub const MAX_EXPANSION: u64 = 10_000_000;

/// Whether `s` is a pattern rather than a plain path: it holds `::`, braces or glob
/// characters.
pub fn is_pattern(s: &str) -> bool {
    s.contains(SOURCE_SEPARATOR) || s.contains(['{', '*', '?', '['])
}

/// Expands one dataset argument into the paths it names, in order: split at `::`, then each
/// part brace-expanded as bash and Python's `braceexpand` (WebDataset's) do, zero padding
/// kept, then each result that holds `*`, `?` or `[` globbed (matches sorted; no match is an
/// error). An argument that names an existing file or folder as written is taken literally,
/// so a folder called `photos [2019]` still opens.
///
/// ```
/// use std::path::PathBuf;
/// let paths = clipcid_data::expand_sources("a/{00000..00002}.tar::b/x.tar")?;
/// assert_eq!(
///     paths,
///     ["a/00000.tar", "a/00001.tar", "a/00002.tar", "b/x.tar"].map(PathBuf::from)
/// );
/// # Ok::<(), clipcid_data::DataError>(())
/// ```
pub fn expand_sources(spec: &str) -> Result<Vec<PathBuf>, DataError> {
    if Path::new(spec).exists() || !is_pattern(spec) {
        return Ok(vec![PathBuf::from(spec)]);
    }
    let mut out = vec![];
    for part in spec.split(SOURCE_SEPARATOR) {
        if part.trim().is_empty() {
            return Err(DataError::format(
                spec,
                format!("empty source between `{SOURCE_SEPARATOR}` separators"),
            ));
        }
        check_range_sizes(part)?;
        let braced = match bracoxide::explode(part) {
            _ if !part.contains('{') => vec![part.to_string()],
            Ok(v) => v,
            Err(e) => {
                return Err(DataError::format(
                    part,
                    format!("not a brace pattern bash would expand ({e:?})"),
                ))
            }
        };
        if braced.is_empty() {
            return Err(DataError::format(
                part,
                "the brace pattern names no path (ranges run upwards: {00000..00009})",
            ));
        }
        for p in braced {
            if Path::new(&p).exists() || !p.contains(['*', '?', '[']) {
                out.push(PathBuf::from(p));
                continue;
            }
            let matches = glob::glob(&p)
                .map_err(|e| DataError::format(&p, format!("bad glob pattern: {e}")))?;
            let mut hits = vec![];
            for m in matches {
                hits.push(m.map_err(|e| DataError::io(e.path().to_path_buf(), e.into()))?);
            }
            if hits.is_empty() {
                return Err(DataError::format(&p, "the glob pattern matches no file"));
            }
            hits.sort();
            out.extend(hits);
        }
    }
    Ok(out)
}

/// Refuses numeric ranges `{a..b}` whose product of sizes exceeds [`MAX_EXPANSION`] before
/// anything is expanded.
fn check_range_sizes(part: &str) -> Result<(), DataError> {
    let mut total: u64 = 1;
    let mut rest = part;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let inner = &rest[open + 1..open + close];
        if let Some((a, b)) = inner.split_once("..") {
            let b = b.split("..").next().unwrap_or(b);
            if let (Ok(a), Ok(b)) = (a.parse::<i128>(), b.parse::<i128>()) {
                let n = u64::try_from((a - b).unsigned_abs().saturating_add(1)).unwrap_or(u64::MAX);
                total = total.saturating_mul(n);
            }
        }
        rest = &rest[open + close + 1..];
    }
    if total > MAX_EXPANSION {
        return Err(DataError::format(
            part,
            format!("the brace pattern names {total} paths (at most {MAX_EXPANSION})"),
        ));
    }
    Ok(())
}

impl Dataset {
    /// Opens the dataset several arguments name together (repeated `--data`, or one
    /// argument with `::`, braces or globs; see [`expand_sources`]). One path opens as
    /// [`Dataset::open`] does; several must all be WebDataset `.tar` shards or folders of
    /// them, read in the order given (a folder's shards sorted by name).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// for shard in 0..3 {
    ///     let mut tar = tar::Builder::new(std::fs::File::create(dir.path().join(format!("{shard:05}.tar")))?);
    ///     let mut png = vec![];
    ///     image::RgbImage::new(2, 2).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    ///     for (name, bytes) in [(format!("k{shard}.png"), png), (format!("k{shard}.txt"), b"a square".to_vec())] {
    ///         let mut h = tar::Header::new_gnu();
    ///         h.set_size(bytes.len() as u64);
    ///         h.set_cksum();
    ///         tar.append_data(&mut h, name, bytes.as_slice())?;
    ///     }
    ///     tar.finish()?;
    /// }
    /// let d = dir.path().display();
    /// let ds = clipcid_data::Dataset::open_sources(&[format!("{d}/{{00000..00001}}.tar"), format!("{d}/0000[2].tar")])?;
    /// let keys: Vec<String> = ds.samples()?.map(|s| s.map(|s| s.key)).collect::<Result<_, _>>()?;
    /// assert_eq!(keys, ["k0", "k1", "k2"]);
    /// # Ok(()) }
    /// ```
    pub fn open_sources<S: AsRef<Path>>(sources: &[S]) -> Result<Self, DataError> {
        let mut paths = vec![];
        for s in sources {
            let s = s.as_ref();
            match s.to_str() {
                Some(text) => paths.extend(expand_sources(text)?),
                None => paths.push(s.to_path_buf()),
            }
        }
        match paths.as_slice() {
            [] => Err(DataError::format(".", "no dataset given")),
            [one] => Self::open_path(one),
            many => {
                let mut shards = vec![];
                for p in many {
                    if p.is_dir() {
                        let tars = crate::dataset::tars_in(p)?;
                        if tars.is_empty() {
                            return Err(not_combinable(p));
                        }
                        shards.extend(tars);
                    } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("tar")) {
                        shards.push(p.clone());
                    } else if p.exists() {
                        return Err(not_combinable(p));
                    } else {
                        return Err(DataError::format(p, "tar shard not found"));
                    }
                }
                Self::webdataset(shards)
            }
        }
    }
}

fn not_combinable(p: &Path) -> DataError {
    DataError::format(
        p,
        "only WebDataset .tar shards (or folders of them) can be combined with `::`, braces, globs or a repeated --data; give a captions file or image folder alone",
    )
}
