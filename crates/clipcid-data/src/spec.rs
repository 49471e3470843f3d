//! Dataset arguments as WebDataset and open_clip users write them: brace-expanded shard
//! lists (`shards/{00000..41455}.tar`), globs (`shards/*.tar`), several sources joined by
//! open_clip's `::`, and repeated arguments.

use std::path::{Path, PathBuf};

use crate::{DataError, Dataset};

/// Joins several sources in one argument, as open_clip's `--train-data a.tar::b.tar`.
pub const SOURCE_SEPARATOR: &str = "::";

/// The most paths the brace patterns of one dataset argument (all its `::` parts) may name
/// (LAION-400M is 41,456 shards; a typo such as `{0..99999999999}`, or `{0,1}` forty times
/// over, must be an error, not an allocation of billions of strings).
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
    // Each part parsed, and the paths the brace patterns of all the parts name counted,
    // before any is expanded.
    let mut parts = vec![];
    let mut named: u128 = 0;
    for part in spec.split(SOURCE_SEPARATOR) {
        if part.trim().is_empty() {
            return Err(DataError::format(
                spec,
                format!("empty source between `{SOURCE_SEPARATOR}` separators"),
            ));
        }
        let tree = if part.contains('{') {
            let tree = bracoxide::tokenizer::tokenize(part)
                .map_err(|e| not_brace(part, format!("{e:?}")))
                .and_then(|tokens| {
                    bracoxide::parser::parse(&tokens).map_err(|e| not_brace(part, format!("{e:?}")))
                })?;
            named = named.saturating_add(paths_named(&tree));
            Some(tree)
        } else {
            None
        };
        parts.push((part, tree));
    }
    if named > MAX_EXPANSION as u128 {
        return Err(DataError::format(
            spec,
            format!("the brace patterns name {named} paths (at most {MAX_EXPANSION})"),
        ));
    }
    let mut out = vec![];
    for (part, tree) in parts {
        let braced = match tree {
            Some(tree) => {
                bracoxide::expand(&tree).map_err(|e| not_brace(part, format!("{e:?}")))?
            }
            None => vec![part.to_string()],
        };
        if braced.is_empty() {
            return Err(DataError::format(
                part,
                "the brace pattern names no path (ranges run upwards: {00000..00009})",
            ));
        }
        for p in braced {
            if !p.contains(['*', '?', '[']) || Path::new(&p).exists() {
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

fn not_brace(part: &str, e: String) -> DataError {
    DataError::format(part, format!("not a brace pattern bash would expand ({e})"))
}

/// How many strings `bracoxide::expand` makes of `node`, without making them: alternatives
/// add, a prefix, inside and suffix multiply, a range counts its numbers (none when it runs
/// downwards, as bracoxide expands it). So `{a,b}` forty times over, or `{0..99999999999}`,
/// is refused before an allocation of 2^40 or 10^11 strings aborts the process.
fn paths_named(node: &bracoxide::parser::Node) -> u128 {
    use bracoxide::parser::Node;
    let part = |n: &Option<Box<Node>>| n.as_deref().map_or(1, paths_named);
    match node {
        Node::Text { .. } => 1,
        Node::BraceExpansion {
            prefix,
            inside,
            postfix,
            ..
        } => part(prefix)
            .saturating_mul(part(inside))
            .saturating_mul(part(postfix)),
        Node::Collection { items, .. } => items
            .iter()
            .fold(0u128, |sum, item| sum.saturating_add(paths_named(item))),
        Node::Range { from, to, .. } => match (from.parse::<u128>(), to.parse::<u128>()) {
            (Ok(a), Ok(b)) if a <= b => (b - a).saturating_add(1),
            (Ok(_), Ok(_)) => 0,
            // Not numbers: the expansion itself reports it.
            _ => 1,
        },
    }
}

impl Dataset {
    /// Opens the dataset several arguments name together (repeated `--data`, or one
    /// argument with `::`, braces or globs; see [`expand_sources`]). One path opens as
    /// [`Dataset::open`] does; several must all be WebDataset `.tar` shards or folders of
    /// them, read in the order given (a folder's shards sorted by name), each shard once: one
    /// reached twice is an error naming it.
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
                // A shard reached twice (listed twice, by two spellings, or beside its
                // folder) would have its samples read, embedded and trained on twice.
                if let Some((again, msg)) = clipcid_store::repeated_shard(&shards) {
                    return Err(DataError::format(again, msg));
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
