//! CLIP_benchmark's WebDataset layout for evaluation sets, as its `build_wds_dataset` reads it
//! (the sets published as `clip-benchmark/wds_*` on the Hugging Face hub):
//!
//! ```text
//! root/classnames.txt                          one class name per line, in label order
//! root/zeroshot_classification_templates.txt   one prompt per line, `{c}` for the class
//! root/test/nshards.txt                        the number of shards N
//! root/test/0.tar .. root/test/{N-1}.tar       `KEY.webp` (or png/jpg) + `KEY.cls` members
//! root/train/...                               the same, for a linear probe's training split
//! ```

use std::path::{Path, PathBuf};

use crate::DataError;

/// Where a CLIP_benchmark set's files lie ([`ClipBenchmarkSet::find`]).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_data::ClipBenchmarkSet;
/// let root = tempfile::tempdir()?;
/// std::fs::create_dir(root.path().join("test"))?;
/// std::fs::write(root.path().join("test/nshards.txt"), "2\n")?;
/// std::fs::write(root.path().join("classnames.txt"), "cat\ndog\n")?;
/// std::fs::write(root.path().join("test/0.tar"), b"")?;
/// let set = ClipBenchmarkSet::find(root.path()).expect("a CLIP_benchmark set");
/// assert_eq!(set.split, root.path().join("test"));
/// // `nshards.txt` names two shards: the second must be there too.
/// assert!(set.shards().unwrap_err().to_string().contains("`1.tar` is not in the folder"));
/// std::fs::write(root.path().join("test/1.tar"), b"")?;
/// assert_eq!(set.shards()?, [root.path().join("test/0.tar"), root.path().join("test/1.tar")]);
/// assert_eq!(set.class_names()?, Some(vec!["cat".to_string(), "dog".to_string()]));
/// assert!(set.templates.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipBenchmarkSet {
    /// The split folder, holding `nshards.txt` and the shards.
    pub split: PathBuf,
    /// `classnames.txt` beside the split folder, where the set has one.
    pub classnames: Option<PathBuf>,
    /// `zeroshot_classification_templates.txt` beside the split folder, where present.
    pub templates: Option<PathBuf>,
}

impl ClipBenchmarkSet {
    /// Recognises `path` as a CLIP_benchmark set: a split folder (holding `nshards.txt`) or a
    /// set's root, whose `test` split is then read. `None` for anything else.
    pub fn find(path: &Path) -> Option<Self> {
        let split = if path.join("nshards.txt").is_file() {
            path.to_path_buf()
        } else if path.join("test").join("nshards.txt").is_file() {
            path.join("test")
        } else {
            return None;
        };
        let root = split.parent().map(Path::to_path_buf).unwrap_or_default();
        let file = |name: &str| Some(root.join(name)).filter(|p| p.is_file());
        Some(Self {
            classnames: file("classnames.txt"),
            templates: file("zeroshot_classification_templates.txt"),
            split,
        })
    }

    /// The shards `nshards.txt` names, `0.tar` to `{N-1}.tar`, in order.
    pub fn shards(&self) -> Result<Vec<PathBuf>, DataError> {
        let file = self.split.join("nshards.txt");
        let text = std::fs::read_to_string(&file).map_err(|e| DataError::io(&file, e))?;
        let n: usize = text.trim().parse().map_err(|_| {
            DataError::format(
                &file,
                format!("expected a number of shards, found `{}`", text.trim()),
            )
        })?;
        if n == 0 {
            return Err(DataError::format(&file, "the split has 0 shards"));
        }
        // Each shard is looked for before the next is listed, so a count that is not the
        // folder's (a damaged file saying 10^15) is an error naming the first missing shard,
        // not a list of paths that fills memory.
        (0..n)
            .map(|i| {
                let shard = self.split.join(format!("{i}.tar"));
                if shard.is_file() {
                    Ok(shard)
                } else {
                    Err(DataError::format(
                        &file,
                        format!("names {n} shards, but `{i}.tar` is not in the folder"),
                    ))
                }
            })
            .collect()
    }

    /// The class names of `classnames.txt` in label order (blank lines skipped), or `None`
    /// when the set has no such file.
    pub fn class_names(&self) -> Result<Option<Vec<String>>, DataError> {
        let Some(file) = &self.classnames else {
            return Ok(None);
        };
        let names = crate::read_lines(file)?;
        Ok(Some(names))
    }
}
