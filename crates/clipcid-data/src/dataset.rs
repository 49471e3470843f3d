//! Dataset sources and the raw-sample stream they produce.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{ClipBenchmarkSet, DataError};

/// Image file extensions read from tar shards, img2dataset's `files` output and plain
/// folders of images (a captions file names its images, whatever their extensions): every
/// format [`crate::decode_image`] reads, Netpbm's as `ppm`, `pgm`, `pbm` and `pnm`, TIFF's as
/// `tif` and `tiff` (a kind of TIFF it does not read is skipped with a warning naming the
/// file and what it holds).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "pgm", "pbm", "pnm", "tif", "tiff",
];

/// The files a labelled folder ([`Source::Labelled`]) takes: exactly torchvision's
/// `ImageFolder` (`IMG_EXTENSIONS`), so that a set has the same images in clipcid as in
/// CLIP_benchmark or a torchvision loader. A `.gif` in a class folder is left out, as there.
pub const IMAGE_FOLDER_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// One undecoded sample: encoded image bytes (or why they could not be read) plus text/label.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Position of the sample in the dataset's fixed order, from 0.
    pub index: u64,
    /// Stable name: the WebDataset key, the path in the captions file, or `class/file`.
    pub key: String,
    /// Encoded image bytes, or the reason they are unavailable (missing file, no image member).
    pub image: Result<Vec<u8>, String>,
    /// Caption, when the source has one.
    pub caption: Option<String>,
    /// Class index, for labelled sources.
    pub label: Option<usize>,
}

/// Where samples come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Images listed in a captions file (`path<TAB>caption` TSV, or CSV with a header naming
    /// `path`/`filepath`/`image` and `caption`/`text`/`title`); paths relative to the file.
    Captioned {
        /// The captions file.
        captions: PathBuf,
    },
    /// WebDataset tar shards as img2dataset writes them: `key.jpg`/`key.png` + `key.txt`
    /// (caption), optional `key.json`, optional `key.cls` (integer label).
    WebDataset {
        /// Shards, read in this order.
        shards: Vec<PathBuf>,
    },
    /// img2dataset's `files` output format: `root/NNNNN/KEY.jpg` with the caption in
    /// `KEY.txt` beside it (and `KEY.json`, ignored).
    Files {
        /// The root folder.
        root: PathBuf,
    },
    /// `root/class_name/**/*.png`, read as torchvision's `ImageFolder` reads it: class
    /// indices follow the sorted class folder names, and a class takes every file with one of
    /// [`IMAGE_FOLDER_EXTENSIONS`] (any case) in its folder and the folders below it (links
    /// followed), folder by folder in the order of their paths as strings, each folder's
    /// files by name. Hidden folders (a name starting with `.`) are left out at every level,
    /// where torchvision would take them; a class folder with no image is an error, as
    /// there.
    Labelled {
        /// The root folder.
        root: PathBuf,
    },
}

/// A dataset: a [`Source`] with a fixed sample order.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// image::RgbImage::new(4, 4).save(dir.path().join("a.png"))?;
/// std::fs::write(dir.path().join("captions.tsv"), "a.png\ta black square\n")?;
/// let ds = clipcid_data::Dataset::open(&dir.path().join("captions.tsv"))?;
/// let samples: Vec<_> = ds.samples()?.collect::<Result<_, _>>()?;
/// assert_eq!(samples[0].caption.as_deref(), Some("a black square"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Dataset {
    source: Source,
    classes: Vec<String>,
    entries: Vec<FileEntry>,
}

/// One sample of a folder source.
#[derive(Debug, Clone)]
pub(crate) struct FileEntry {
    pub(crate) key: String,
    pub(crate) path: PathBuf,
    pub(crate) caption: Option<String>,
    pub(crate) label: Option<usize>,
    /// Why the sample cannot be used (its captions line is not UTF-8, ...): it is yielded
    /// with this as its image error, to be skipped and counted like an unreadable image.
    pub(crate) problem: Option<String>,
}

impl FileEntry {
    /// The sample, reading its image file.
    pub(crate) fn sample(&self, index: u64) -> Sample {
        let image = match &self.problem {
            Some(p) => Err(p.clone()),
            None => std::fs::read(&self.path)
                .map_err(|e| format!("cannot read {}: {e}", self.path.display())),
        };
        Sample {
            index,
            key: self.key.clone(),
            image,
            caption: self.caption.clone(),
            label: self.label,
        }
    }
}

fn ext_of(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The image files ([`IMAGE_EXTENSIONS`], any case) directly in the folder `dir`, sorted by
/// name: a plain folder of images, which is no [`Dataset`] (it has neither captions nor
/// classes) but is what `textness --images` and `export --sample` read.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// for name in ["b.PNG", "a.jpg", "notes.txt"] {
///     std::fs::write(dir.path().join(name), b"")?;
/// }
/// let files = clipcid_data::image_files_in(dir.path())?;
/// assert_eq!(files, [dir.path().join("a.jpg"), dir.path().join("b.PNG")]);
/// # Ok(()) }
/// ```
pub fn image_files_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(sorted_dir(dir)?
        .into_iter()
        .filter(|p| p.is_file() && IMAGE_EXTENSIONS.contains(&ext_of(p).as_str()))
        .collect())
}

/// The `.tar` files directly in `dir`, sorted by name.
pub(crate) fn tars_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(sorted_dir(dir)?
        .into_iter()
        .filter(|p| p.is_file() && ext_of(p) == "tar")
        .collect())
}

/// Whether `root` looks like img2dataset's `files` output: in the first sub-folder that
/// holds images, some image has a `.txt` of the same stem beside it (class folders of a
/// labelled set do not). Only that folder is listed, so a large labelled set costs no scan.
fn is_img2dataset_files(root: &Path) -> Result<bool, DataError> {
    for dir in sub_folders(root)? {
        let images: Vec<PathBuf> = sorted_dir(&dir)?
            .into_iter()
            .filter(|f| IMAGE_EXTENSIONS.contains(&ext_of(f).as_str()))
            .collect();
        if !images.is_empty() {
            return Ok(images.iter().any(|f| f.with_extension("txt").is_file()));
        }
    }
    Ok(false)
}

/// The sub-folders of `root` in name order, hidden ones (a name starting with `.`) left out:
/// `.ipynb_checkpoints`, `.git`, or a writer's staging folder are never classes or shard
/// folders (torchvision's `ImageFolder` takes them as classes, and then fails as they hold no
/// images).
fn sub_folders(root: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(sorted_dir(root)?
        .into_iter()
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect())
}

/// A class folder's images as torchvision's `ImageFolder` lists them (`make_dataset`:
/// `sorted(os.walk(class_dir, followlinks=True))`, then each folder's file names sorted): the
/// folder and every folder below it (hidden ones left out), in the order of their paths as
/// strings (so `a b/` before `a/x/`: a space sorts before `/`), each one's entries that are
/// not folders and whose lowercased name ends with `.` and one of
/// [`IMAGE_FOLDER_EXTENSIONS`], by name. A link back to a folder above it is an error naming
/// both: `os.walk` would follow it until paths grow too long, taking the same images again
/// and again. Each folder is listed once, and only links are looked up (a directory entry's
/// own type says the rest), so a class of a million files costs no call per file.
fn class_images(class_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let canonical = |dir: &Path| std::fs::canonicalize(dir).map_err(|e| DataError::io(dir, e));
    // Each folder listed, with its images.
    let mut folders: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    // Folders to list, each with the real paths of the folders above it and itself.
    let mut pending = vec![(class_dir.to_path_buf(), vec![canonical(class_dir)?])];
    while let Some((dir, above)) = pending.pop() {
        let mut images = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))? {
            let entry = entry.map_err(|e| DataError::io(&dir, e))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| DataError::io(&path, e))?;
            let is_dir = if kind.is_symlink() {
                path.is_dir()
            } else {
                kind.is_dir()
            };
            let name = entry.file_name().to_string_lossy().to_lowercase();
            if !is_dir {
                let image = IMAGE_FOLDER_EXTENSIONS
                    .iter()
                    .any(|e| name.strip_suffix(e).is_some_and(|s| s.ends_with('.')));
                if image {
                    images.push(path);
                }
                continue;
            }
            if name.starts_with('.') {
                continue;
            }
            let real = canonical(&path)?;
            if above.contains(&real) {
                return Err(DataError::format(
                    &path,
                    format!(
                        "links back to {} above it: a labelled set's folders must not loop",
                        real.display()
                    ),
                ));
            }
            let mut chain = above.clone();
            chain.push(real);
            pending.push((path, chain));
        }
        images.sort();
        folders.push((dir, images));
    }
    folders.sort_by(|(a, _), (b, _)| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Ok(folders.into_iter().flat_map(|(_, images)| images).collect())
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| DataError::io(dir, e)))
        .collect::<Result<_, _>>()?;
    v.sort();
    Ok(v)
}

impl Dataset {
    /// Opens a dataset, recognising its kind: a `.tsv`/`.csv` file is a captions file; a
    /// `.tar` file, or a folder of `.tar` files, is WebDataset; a CLIP_benchmark set (its
    /// root, or a split folder with `nshards.txt`) is its shards with its class names
    /// ([`ClipBenchmarkSet`]); a folder holding a
    /// `captions.tsv`/`captions.csv` is a captioned folder; a folder of sub-folders whose
    /// images have `.txt` captions beside them is img2dataset's `files` output; any other
    /// folder of class sub-folders is a labelled folder. A path that does not exist but is
    /// a pattern (`shards/{00000..00099}.tar`, `shards/*.tar`, `a.tar::b.tar`) opens the
    /// shards it names ([`Dataset::open_sources`]).
    pub fn open(path: &Path) -> Result<Self, DataError> {
        if !path.exists() && path.to_str().is_some_and(crate::spec::is_pattern) {
            return Self::open_sources(&[path]);
        }
        Self::open_path(path)
    }

    /// [`Dataset::open`] of one existing path, no patterns.
    pub(crate) fn open_path(path: &Path) -> Result<Self, DataError> {
        if path.is_file() {
            return match ext_of(path).as_str() {
                "tsv" | "csv" | "txt" => Self::captioned(path),
                "tar" => Self::webdataset(vec![path.to_path_buf()]),
                other => Err(DataError::format(
                    path,
                    format!("unknown dataset file type `.{other}`; expected .tsv, .csv or .tar"),
                )),
            };
        }
        if !path.is_dir() {
            return Err(DataError::format(path, "no such dataset file or folder"));
        }
        if let Some(set) = ClipBenchmarkSet::find(path) {
            return Self::clip_benchmark(&set);
        }
        for name in ["captions.tsv", "captions.csv"] {
            if path.join(name).is_file() {
                return Self::captioned(&path.join(name));
            }
        }
        let tars = tars_in(path)?;
        if !tars.is_empty() {
            return Self::webdataset(tars);
        }
        if is_img2dataset_files(path)? {
            return Self::files(path);
        }
        Self::labelled(path)
    }

    /// img2dataset's `files` output (see [`Source::Files`]): `root/00000/000000001.jpg` with
    /// its caption in `000000001.txt` beside it. Captions are read here; an image without a
    /// `.txt` gets no caption.
    pub fn files(root: &Path) -> Result<Self, DataError> {
        let mut entries = Vec::new();
        for dir in sub_folders(root)? {
            let folder = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for file in sorted_dir(&dir)? {
                if !(file.is_file() && IMAGE_EXTENSIONS.contains(&ext_of(&file).as_str())) {
                    continue;
                }
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let txt = file.with_extension("txt");
                let (caption, problem) = match std::fs::read(&txt) {
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(t) => (Some(t.trim().to_string()), None),
                        Err(e) => (
                            None,
                            Some(format!(
                                "{} is not UTF-8 ({})",
                                txt.display(),
                                e.utf8_error()
                            )),
                        ),
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
                    Err(e) => return Err(DataError::io(&txt, e)),
                };
                entries.push(FileEntry {
                    key: format!("{folder}/{name}"),
                    path: file,
                    caption,
                    label: None,
                    problem,
                });
            }
        }
        if entries.is_empty() {
            return Err(DataError::format(root, "no images found"));
        }
        Ok(Self {
            source: Source::Files {
                root: root.to_path_buf(),
            },
            classes: vec![],
            entries,
        })
    }

    /// A captions file source (see [`Source::Captioned`]).
    pub fn captioned(captions: &Path) -> Result<Self, DataError> {
        let base = captions.parent().unwrap_or(Path::new(".")).to_path_buf();
        let rows = read_captions(captions)?;
        if rows.is_empty() {
            return Err(DataError::format(captions, "captions file lists no images"));
        }
        let entries = rows
            .into_iter()
            .map(|row| {
                let full = if Path::new(&row.path).is_absolute() {
                    PathBuf::from(&row.path)
                } else {
                    base.join(&row.path)
                };
                FileEntry {
                    key: row.path,
                    path: full,
                    caption: Some(row.caption),
                    label: None,
                    problem: row.problem,
                }
            })
            .collect();
        Ok(Self {
            source: Source::Captioned {
                captions: captions.to_path_buf(),
            },
            classes: vec![],
            entries,
        })
    }

    /// WebDataset tar shards, read in the given order.
    pub fn webdataset(shards: Vec<PathBuf>) -> Result<Self, DataError> {
        if shards.is_empty() {
            return Err(DataError::format(".", "no tar shards given"));
        }
        for s in &shards {
            if !s.is_file() {
                return Err(DataError::format(s, "tar shard not found"));
            }
        }
        Ok(Self {
            source: Source::WebDataset { shards },
            classes: vec![],
            entries: vec![],
        })
    }

    /// A CLIP_benchmark set's split (see [`ClipBenchmarkSet`]): its shards as WebDataset,
    /// labelled by their `.cls` members, with the class names of `classnames.txt`.
    pub fn clip_benchmark(set: &ClipBenchmarkSet) -> Result<Self, DataError> {
        let mut data = Self::webdataset(set.shards()?)?;
        data.classes = set.class_names()?.unwrap_or_default();
        Ok(data)
    }

    /// A labelled image folder (see [`Source::Labelled`]).
    pub fn labelled(root: &Path) -> Result<Self, DataError> {
        let mut classes = Vec::new();
        let mut entries: Vec<FileEntry> = Vec::new();
        let mut empty = Vec::new();
        for dir in sub_folders(root)? {
            let class = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let label = classes.len();
            for file in class_images(&dir)? {
                let key = file
                    .strip_prefix(root)
                    .unwrap_or(&file)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                entries.push(FileEntry {
                    key,
                    path: file,
                    caption: None,
                    label: Some(label),
                    problem: None,
                });
            }
            if entries.last().is_none_or(|e| e.label != Some(label)) {
                empty.push(class.clone());
            }
            classes.push(class);
        }
        if entries.is_empty() {
            return Err(DataError::format(
                root,
                "no images found: expected class sub-folders of images, .tar shards, or a captions.tsv",
            ));
        }
        if !empty.is_empty() {
            // As torchvision's ImageFolder: such a folder (another run's output folder inside
            // the set, a class whose images are missing) would be a class no image has, which
            // zero-shot still offers as an answer and every label count includes.
            return Err(DataError::format(
                root,
                format!(
                    "class folders with no image in them: {}; each sub-folder of a labelled set is a class (move other folders out), and its images are the files named *.{} in it or below it (torchvision's ImageFolder's)",
                    empty.join(", "),
                    IMAGE_FOLDER_EXTENSIONS.join(", *.")
                ),
            ));
        }
        Ok(Self {
            source: Source::Labelled {
                root: root.to_path_buf(),
            },
            classes,
            entries,
        })
    }

    /// The source this dataset reads.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Class names (labelled sources), indexed by label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Whether samples carry captions (always true for captioned and WebDataset sources; a
    /// WebDataset sample without a `.txt` member has `caption: None`).
    pub fn has_captions(&self) -> bool {
        !matches!(self.source, Source::Labelled { .. })
    }

    /// Number of samples when known without reading the data (not for tar shards).
    pub fn len_hint(&self) -> Option<usize> {
        match self.source {
            Source::WebDataset { .. } => None,
            _ => Some(self.entries.len()),
        }
    }

    /// SHA-256 (hex) identifying the data: a captions file's bytes and the sizes of the
    /// images it names; a labelled folder's sample keys and image file sizes; WebDataset
    /// shard names and sizes (their bytes are not read: shards are large). Recorded in outputs
    /// so that a resume can tell whether the same data made them, and so that embeddings are
    /// never joined with images replaced since (a missing image counts as a size of its own).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// image::RgbImage::new(8, 8).save(dir.path().join("a.png"))?;
    /// std::fs::write(dir.path().join("captions.tsv"), "a.png\ta black square\n")?;
    /// let before = clipcid_data::Dataset::open(dir.path())?.fingerprint()?;
    /// image::RgbImage::new(16, 16).save(dir.path().join("a.png"))?; // replaced
    /// let after = clipcid_data::Dataset::open(dir.path())?.fingerprint()?;
    /// assert_ne!(before, after);
    /// # Ok(()) }
    /// ```
    pub fn fingerprint(&self) -> Result<String, DataError> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let size = |p: &Path| -> Result<u64, DataError> {
            Ok(std::fs::metadata(p).map_err(|e| DataError::io(p, e))?.len())
        };
        match &self.source {
            Source::Captioned { captions } => {
                h.update(b"captioned with image sizes");
                h.update(std::fs::read(captions).map_err(|e| DataError::io(captions, e))?);
                for e in &self.entries {
                    h.update(size(&e.path).unwrap_or(u64::MAX).to_le_bytes());
                }
            }
            Source::Labelled { .. } => {
                h.update(b"labelled");
                for e in &self.entries {
                    h.update(e.key.as_bytes());
                    h.update(size(&e.path).unwrap_or(u64::MAX).to_le_bytes());
                }
            }
            Source::Files { .. } => {
                h.update(b"files");
                for e in &self.entries {
                    h.update(e.key.as_bytes());
                    h.update(size(&e.path).unwrap_or(u64::MAX).to_le_bytes());
                    h.update(e.caption.as_deref().unwrap_or("\u{0}").as_bytes());
                    h.update([0]);
                }
            }
            Source::WebDataset { shards } => {
                h.update(b"webdataset");
                for s in shards {
                    let name = s.file_name().map(|n| n.to_string_lossy().into_owned());
                    h.update(name.unwrap_or_default().as_bytes());
                    h.update(size(s)?.to_le_bytes());
                }
            }
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// The fingerprint a captions file had before [`Dataset::fingerprint`] covered its
    /// images' sizes (the file's bytes only); `None` for the other sources, whose
    /// fingerprint has not changed. Outputs that recorded it stay this data's
    /// ([`Dataset::is_fingerprint`]), without the images' check.
    pub fn fingerprint_before_image_sizes(&self) -> Result<Option<String>, DataError> {
        use sha2::{Digest, Sha256};
        let Source::Captioned { captions } = &self.source else {
            return Ok(None);
        };
        let mut h = Sha256::new();
        h.update(b"captioned");
        h.update(std::fs::read(captions).map_err(|e| DataError::io(captions, e))?);
        Ok(Some(format!("{:x}", h.finalize())))
    }

    /// Whether `recorded`, a fingerprint an output recorded, is this data's: its
    /// [`Dataset::fingerprint`], or for a captions file the form from before image sizes
    /// counted ([`Dataset::fingerprint_before_image_sizes`]).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// image::RgbImage::new(8, 8).save(dir.path().join("a.png"))?;
    /// std::fs::write(dir.path().join("captions.tsv"), "a.png\ta black square\n")?;
    /// let data = clipcid_data::Dataset::open(dir.path())?;
    /// assert!(data.is_fingerprint(&data.fingerprint()?)?);
    /// let old = data.fingerprint_before_image_sizes()?.expect("a captions file");
    /// assert!(data.is_fingerprint(&old)?);
    /// assert!(!data.is_fingerprint("0123")?);
    /// # Ok(()) }
    /// ```
    pub fn is_fingerprint(&self, recorded: &str) -> Result<bool, DataError> {
        Ok(recorded == self.fingerprint()?
            || self.fingerprint_before_image_sizes()?.as_deref() == Some(recorded))
    }

    /// Folder sources' samples, in order.
    pub(crate) fn entries(&self) -> &[FileEntry] {
        &self.entries
    }

    /// The samples in order. Reading is lazy: image bytes are read as the stream advances.
    /// A corrupt or cut-short tar shard is an error naming it, and the stream ends with that
    /// error (a sample whose members it interrupted is not given out).
    pub fn samples(&self) -> Result<SampleStream<'_>, DataError> {
        self.stream(None)
    }

    /// [`Dataset::samples`] for a process that uses only the samples whose position
    /// `wanted` accepts (one part of a split run): the others still come in order, with
    /// their keys and positions, but for tar shards their members' bytes are seeked past,
    /// never read, and their `image` is an error saying so. Folder sources read a file only
    /// when its sample is consumed, so they are the same as [`Dataset::samples`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("a.tar");
    /// let mut tar = tar::Builder::new(std::fs::File::create(&path)?);
    /// for i in 0..4 {
    ///     let mut h = tar::Header::new_gnu();
    ///     h.set_size(3);
    ///     h.set_cksum();
    ///     tar.append_data(&mut h, format!("k{i}.png"), &b"png"[..])?;
    /// }
    /// tar.finish()?;
    /// let ds = clipcid_data::Dataset::open(&path)?;
    /// let got: Vec<(u64, String, bool)> = ds
    ///     .samples_where(|i| i % 2 == 1)?
    ///     .map(|s| s.map(|s| (s.index, s.key, s.image.is_ok())))
    ///     .collect::<Result<_, _>>()?;
    /// assert_eq!(got, [(0, "k0".into(), false), (1, "k1".into(), true), (2, "k2".into(), false), (3, "k3".into(), true)]);
    /// # Ok(()) }
    /// ```
    pub fn samples_where(
        &self,
        wanted: impl Fn(u64) -> bool + Send + Sync + 'static,
    ) -> Result<SampleStream<'_>, DataError> {
        self.stream(Some(std::sync::Arc::new(wanted)))
    }

    fn stream(&self, wanted: Option<Wanted>) -> Result<SampleStream<'_>, DataError> {
        let inner = match &self.source {
            Source::WebDataset { shards } => Inner::Tar(TarSamples::new(shards.clone(), wanted)),
            _ => Inner::Files { pos: 0 },
        };
        Ok(SampleStream {
            ds: self,
            inner,
            next_index: 0,
        })
    }
}

/// A row of a captions file.
struct CaptionRow {
    path: String,
    caption: String,
    /// Set when the row cannot be used as it is (not UTF-8).
    problem: Option<String>,
}

fn read_captions(path: &Path) -> Result<Vec<CaptionRow>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let csv = ext_of(path) == "csv";
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(if csv { b',' } else { b'\t' })
        .has_headers(false)
        .flexible(true)
        .quoting(csv)
        .from_reader(BufReader::new(file));
    let mut rows = Vec::new();
    let (mut path_col, mut cap_col) = (0usize, 1usize);
    // Byte records: a line that is not UTF-8 spoils only its own sample.
    for (i, rec) in rdr.byte_records().enumerate() {
        let rec = rec.map_err(|e| DataError::format(path, format!("line {}: {e}", i + 1)))?;
        if rec.iter().all(|f| f.trim_ascii().is_empty()) {
            continue;
        }
        let text = |f: &[u8]| String::from_utf8_lossy(f).trim().to_string();
        if i == 0 {
            let lower: Vec<String> = rec.iter().map(|f| text(f).to_ascii_lowercase()).collect();
            let p = lower.iter().position(|f| {
                ["path", "filepath", "image", "file", "filename"].contains(&f.as_str())
            });
            let c = lower
                .iter()
                .position(|f| ["caption", "text", "title"].contains(&f.as_str()));
            if let (Some(p), Some(c)) = (p, c) {
                (path_col, cap_col) = (p, c);
                continue;
            }
        }
        let (Some(p), Some(c)) = (rec.get(path_col), rec.get(cap_col)) else {
            return Err(DataError::format(
                path,
                format!(
                    "line {}: expected `path{}caption`",
                    i + 1,
                    if csv { "," } else { "<TAB>" }
                ),
            ));
        };
        let problem = match (std::str::from_utf8(p), std::str::from_utf8(c)) {
            (Ok(_), Ok(_)) => None,
            (Err(e), _) | (_, Err(e)) => Some(format!(
                "line {} of {} is not UTF-8 ({e})",
                i + 1,
                path.display()
            )),
        };
        rows.push(CaptionRow {
            path: text(p),
            caption: text(c),
            problem,
        });
    }
    Ok(rows)
}

/// The stream of [`Sample`]s of a [`Dataset`], in order. Yields `Err` only for problems that
/// stop the whole read (an unreadable or malformed tar shard); a bad sample is yielded with
/// its `image` set to the reason, for the batcher to skip and count.
pub struct SampleStream<'a> {
    ds: &'a Dataset,
    inner: Inner,
    next_index: u64,
}

enum Inner {
    Files { pos: usize },
    Tar(TarSamples),
}

impl SampleStream<'_> {
    /// Advances past `n` samples without decoding them (folder sources do not even read the
    /// files). Returns how many were skipped (fewer at the end of the data).
    pub fn skip_samples(&mut self, n: u64) -> Result<u64, DataError> {
        let mut done = 0;
        while done < n {
            match &mut self.inner {
                Inner::Files { pos } => {
                    let left = (self.ds.entries.len() - *pos) as u64;
                    let k = left.min(n - done);
                    *pos += k as usize;
                    self.next_index += k;
                    return Ok(done + k);
                }
                Inner::Tar(t) => match t.next_sample()? {
                    Some(_) => {
                        done += 1;
                        self.next_index += 1;
                    }
                    None => break,
                },
            }
        }
        Ok(done)
    }
}

impl Iterator for SampleStream<'_> {
    type Item = Result<Sample, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let index = self.next_index;
        let item = match &mut self.inner {
            Inner::Files { pos } => {
                let entry = self.ds.entries.get(*pos)?;
                *pos += 1;
                Ok(entry.sample(index))
            }
            Inner::Tar(t) => match t.next_sample() {
                Ok(Some(mut s)) => {
                    s.index = index;
                    Ok(s)
                }
                Ok(None) => return None,
                Err(e) => Err(e),
            },
        };
        self.next_index += 1;
        Some(item)
    }
}

/// Streams grouped WebDataset samples out of tar shards. A reader thread walks the shards in
/// order and sends entries through a bounded channel, so memory stays at a few hundred
/// entries whatever the shard size, and reading overlaps decoding.
struct TarSamples {
    rx: std::sync::mpsc::Receiver<Result<TarEntry, DataError>>,
    pending: Vec<TarEntry>,
    /// Set by an error: the stream ends with it (the members received before it may be
    /// part of a sample the error cut short, so they are not given out).
    failed: bool,
}

/// (key, lower-case extension after the key's first dot, bytes)
pub(crate) type TarEntry = (String, String, Vec<u8>);

/// Which sample positions a stream reads ([`Dataset::samples_where`]).
type Wanted = std::sync::Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Extension of the synthetic member sent for a member of an unwanted sample: its bytes were
/// not read.
const UNREAD: &str = "\u{1}unread";

/// Sample positions as the consumer will count them: a new sample starts wherever the key
/// changes (across shards too), as [`TarSamples::next_sample`] groups entries.
#[derive(Default)]
struct SampleCounter {
    next: u64,
    key: Option<String>,
}

impl SampleCounter {
    fn position_of(&mut self, key: &str) -> u64 {
        if self.key.as_deref() != Some(key) {
            self.key = Some(key.to_string());
            self.next += 1;
        }
        self.next - 1
    }
}

impl TarSamples {
    fn new(shards: Vec<PathBuf>, wanted: Option<Wanted>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(256);
        std::thread::spawn(move || {
            let mut counter = SampleCounter::default();
            for path in shards {
                if let Err(e) = read_shard(&path, &tx, wanted.as_ref(), &mut counter) {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        });
        Self {
            rx,
            pending: vec![],
            failed: false,
        }
    }

    fn next_entry(&mut self) -> Result<Option<TarEntry>, DataError> {
        match self.rx.recv() {
            Ok(Ok(e)) => Ok(Some(e)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None), // reader finished
        }
    }

    fn next_sample(&mut self) -> Result<Option<Sample>, DataError> {
        if self.failed {
            return Ok(None);
        }
        loop {
            let entry = self.next_entry().inspect_err(|_| {
                self.failed = true;
                self.pending.clear();
            })?;
            let same_key = match (&entry, self.pending.first()) {
                (Some((k, _, _)), Some((pk, _, _))) => k == pk,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if same_key {
                if let Some(e) = entry {
                    self.pending.push(e);
                }
                continue;
            }
            let group = std::mem::take(&mut self.pending);
            if let Some(e) = entry {
                self.pending.push(e);
            }
            if group.is_empty() {
                return Ok(None);
            }
            return Ok(Some(group_to_sample(group)));
        }
    }
}

/// Sends the file entries of one shard; stops quietly when the receiver is gone. With
/// `wanted`, members of other samples are sent without their bytes, which are seeked past
/// (the file is read unbuffered then: a buffered reader would refill its buffer after every
/// seek).
fn read_shard(
    path: &Path,
    tx: &std::sync::mpsc::SyncSender<Result<TarEntry, DataError>>,
    wanted: Option<&Wanted>,
    counter: &mut SampleCounter,
) -> Result<(), DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let not_tar = |e: std::io::Error| DataError::format(path, format!("not a tar file: {e}"));
    match wanted {
        None => {
            let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
            let entries = archive.entries().map_err(not_tar)?;
            send_entries(path, file_len, entries, tx, None, counter)
        }
        Some(w) => {
            let mut archive = tar::Archive::new(file);
            let entries = archive.entries_with_seek().map_err(not_tar)?;
            send_entries(path, file_len, entries, tx, Some(w), counter)
        }
    }
}

fn send_entries<R: Read>(
    path: &Path,
    file_len: u64,
    entries: tar::Entries<'_, R>,
    tx: &std::sync::mpsc::SyncSender<Result<TarEntry, DataError>>,
    wanted: Option<&Wanted>,
    counter: &mut SampleCounter,
) -> Result<(), DataError> {
    let mut keys = ShardKeys::default();
    for entry in entries {
        let mut entry =
            entry.map_err(|e| DataError::format(path, format!("corrupt tar shard: {e}")))?;
        // Seeking past the end succeeds where reading fails: a member (or its padding) cut
        // short ends a seeking stream where the reading one ends, after the member. That
        // holds for the members skipped below too (the reading stream fails skipping them).
        let cut_short = wanted.and_then(|_| member_cut_short(path, &entry, file_len));
        // A sample's member: a file named `KEY.EXT`.
        let member = if entry.header().entry_type().is_file() {
            let name = entry
                .path()
                .map_err(|e| DataError::format(path, format!("bad entry name: {e}")))?
                .to_string_lossy()
                .into_owned();
            member_key(&name).map(|(key, ext)| (name, key, ext))
        } else {
            None
        };
        let Some((name, key, ext)) = member else {
            match cut_short {
                Some(e) => return Err(e),
                None => continue,
            }
        };
        // The header's size is untrusted: never allocate more than the shard can hold.
        let size = check_member_size(path, &name, entry.size(), file_len)?;
        if let Some(marker) = keys.see(&key) {
            if tx.send(Ok(marker)).is_err() {
                return Ok(());
            }
        }
        let position = counter.position_of(&key);
        let sent = if wanted.is_some_and(|w| !w(position)) {
            tx.send(Ok((key, UNREAD.to_string(), vec![])))
        } else {
            let mut bytes = Vec::with_capacity(size);
            entry.read_to_end(&mut bytes).map_err(|e| {
                DataError::format(path, format!("corrupt tar shard at `{name}`: {e}"))
            })?;
            tx.send(Ok((key, ext, bytes)))
        };
        if sent.is_err() {
            return Ok(());
        }
        if let Some(e) = cut_short {
            return Err(e);
        }
    }
    keys.finish(path)
}

/// The error for a member whose data or padding runs past the end of its shard (a shard cut
/// short), which a reader that seeks past members would not otherwise see.
pub(crate) fn member_cut_short<R: Read>(
    path: &Path,
    entry: &tar::Entry<'_, R>,
    file_len: u64,
) -> Option<DataError> {
    let end = entry
        .raw_file_position()
        .saturating_add(entry.size().div_ceil(512).saturating_mul(512));
    (end > file_len).then(|| {
        DataError::format(
            path,
            format!(
                "corrupt tar shard at `{}`: unexpected end of file",
                String::from_utf8_lossy(&entry.path_bytes())
            ),
        )
    })
}

/// A member's claimed size, refused when it exceeds the shard file itself (a corrupt or
/// hostile header), so no allocation is sized by a header alone.
pub(crate) fn check_member_size(
    shard: &Path,
    name: &str,
    size: u64,
    file_len: u64,
) -> Result<usize, DataError> {
    if size > file_len {
        return Err(DataError::format(
            shard,
            format!(
                "member `{name}` claims {size} bytes but the shard is only {file_len} bytes (corrupt tar header)"
            ),
        ));
    }
    usize::try_from(size)
        .map_err(|_| DataError::format(shard, format!("member `{name}` is too large")))
}

/// Extension of the synthetic member that marks a key seen earlier in the same shard after
/// other samples (WebDataset keys are unique and their members consecutive): the sample is
/// skipped, named, instead of being paired with another sample's members downstream. The
/// control character keeps it from clashing with any real extension.
pub(crate) const REPEATED_KEY: &str = "\u{1}repeated-key";

/// Keys of one shard: which sample groups closed, and how many members there were.
#[derive(Default)]
pub(crate) struct ShardKeys {
    current: Option<String>,
    closed: std::collections::HashSet<String>,
    members: u64,
}

impl ShardKeys {
    /// Records a member of `key`; returns the marker entry to send first when `key` starts a
    /// new group although an earlier group of this shard had it.
    pub(crate) fn see(&mut self, key: &str) -> Option<TarEntry> {
        self.members += 1;
        if self.current.as_deref() == Some(key) {
            return None;
        }
        if let Some(prev) = self.current.replace(key.to_string()) {
            self.closed.insert(prev);
        }
        self.closed
            .contains(key)
            .then(|| (key.to_string(), REPEATED_KEY.to_string(), Vec::new()))
    }

    /// A shard with no sample member is an error, not zero rows.
    pub(crate) fn finish(&self, shard: &Path) -> Result<(), DataError> {
        if self.members == 0 {
            return Err(DataError::format(
                shard,
                "tar shard holds no sample members (empty, or not a WebDataset shard: members are named KEY.EXT)",
            ));
        }
        Ok(())
    }
}

/// WebDataset naming: a member `dir/key.ext1.ext2` belongs to sample `dir/key` (everything
/// before the first dot of the file name) with extension `ext1.ext2`, lower-cased. Names
/// with no key (a leading dot) or no extension are not sample members.
pub(crate) fn member_key(name: &str) -> Option<(String, String)> {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", name),
    };
    let dot = base.find('.').filter(|&d| d > 0)?;
    Some((
        format!("{dir}{}", &base[..dot]),
        base[dot + 1..].to_ascii_lowercase(),
    ))
}

pub(crate) fn group_to_sample(group: Vec<TarEntry>) -> Sample {
    let key = group[0].0.clone();
    let mut image = Err("sample has no image member (.jpg/.png/...)".to_string());
    let mut caption = None;
    let mut json_caption = None;
    let mut label = None;
    let exts: BTreeSet<&str> = group.iter().map(|(_, e, _)| e.as_str()).collect();
    let problem = if exts.contains(UNREAD) {
        Some("not read: a sample this process does not use (another part's)".to_string())
    } else if exts.contains(REPEATED_KEY) {
        Some(format!(
            "key `{key}` appears again after other samples in its shard (keys must be unique, their members consecutive)"
        ))
    } else if exts.len() < group.len() {
        let mut seen = BTreeSet::new();
        let twice = group
            .iter()
            .find(|(_, e, _)| !seen.insert(e.as_str()))
            .map(|(_, e, _)| e.clone())
            .unwrap_or_default();
        Some(format!(
            "member `{key}.{twice}` appears twice (which one belongs to the sample is unknown)"
        ))
    } else if exts.iter().filter(|e| IMAGE_EXTENSIONS.contains(e)).count() > 1 {
        // `key.jpg` and `key.png`: the first in the archive was taken. Readers disagree on
        // which is the sample's (open_clip's `jpg;png;...` takes jpg, CLIP_benchmark's
        // `webp, png, jpg` takes webp), so neither is guessed.
        let images: Vec<String> = exts
            .iter()
            .filter(|e| IMAGE_EXTENSIONS.contains(e))
            .map(|e| format!("`{key}.{e}`"))
            .collect();
        Some(format!(
            "sample has {} images ({}): which one is the sample's is unknown",
            images.len(),
            images.join(", ")
        ))
    } else {
        None
    };
    if let Some(reason) = problem {
        return Sample {
            index: 0,
            key,
            image: Err(reason),
            caption: None,
            label: None,
        };
    }
    for (_, ext, bytes) in &group {
        match ext.as_str() {
            e if IMAGE_EXTENSIONS.contains(&e) && image.is_err() => image = Ok(bytes.clone()),
            "txt" => caption = Some(String::from_utf8_lossy(bytes).trim().to_string()),
            "cls" => label = String::from_utf8_lossy(bytes).trim().parse().ok(),
            "json" => {
                json_caption = serde_json::from_slice::<serde_json::Value>(bytes)
                    .ok()
                    .and_then(|v| {
                        v.get("caption")
                            .and_then(|c| c.as_str())
                            .map(str::to_string)
                    });
            }
            _ => {}
        }
    }
    if image.is_err() {
        image = Err(format!(
            "sample has no image member (found: {})",
            exts.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Sample {
        index: 0,
        key,
        image,
        caption: caption.or(json_caption),
        label,
    }
}
