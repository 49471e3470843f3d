//! Random access to a dataset's samples by position, for shuffled training.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;

use crate::dataset::{
    check_member_size, group_to_sample, member_cut_short, member_key, ShardKeys, TarEntry,
    REPEATED_KEY,
};
use crate::{DataError, Dataset, Sample, Source};

/// Where one tar member's bytes lie.
#[derive(Debug, Clone)]
struct Member {
    shard: usize,
    ext: String,
    offset: u64,
    size: u64,
}

#[derive(Debug, Clone)]
enum Locations {
    /// Folder sources: the dataset's own entry list.
    Files,
    /// WebDataset: per sample, its key and members.
    Tar {
        shards: Vec<PathBuf>,
        samples: Vec<(String, Vec<Member>)>,
    },
}

/// Random access to the samples of a [`Dataset`] by position (the same positions
/// [`Dataset::samples`] yields, so ids in embedding shards address them).
///
/// Folder sources need nothing beyond the dataset. For WebDataset shards the index is built
/// by walking the tar headers once (seeking past the data, so a shard's bytes are not read)
/// and records each member's offset and size; [`SampleIndex::get`] then reads just that
/// sample's members.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_data::Dataset;
/// let dir = tempfile::tempdir()?;
/// for i in 0..3 {
///     image::RgbImage::new(4, 4).save(dir.path().join(format!("{i}.png")))?;
/// }
/// std::fs::write(dir.path().join("captions.tsv"), "0.png\tzero\n1.png\tone\n2.png\ttwo\n")?;
/// let ds = Dataset::open(dir.path())?;
/// let index = ds.index()?;
/// assert_eq!(index.len(), 3);
/// assert_eq!(index.get(2)?.caption.as_deref(), Some("two"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SampleIndex {
    dataset: Dataset,
    locations: Locations,
}

impl Dataset {
    /// Builds a [`SampleIndex`] over this dataset. For tar shards this reads every header;
    /// a corrupt shard is an error naming it.
    pub fn index(&self) -> Result<SampleIndex, DataError> {
        let locations = match self.source() {
            Source::WebDataset { shards } => Locations::Tar {
                shards: shards.clone(),
                samples: index_shards(shards)?,
            },
            _ => Locations::Files,
        };
        Ok(SampleIndex {
            dataset: self.clone(),
            locations,
        })
    }
}

fn index_shards(shards: &[PathBuf]) -> Result<Vec<(String, Vec<Member>)>, DataError> {
    let mut samples: Vec<(String, Vec<Member>)> = Vec::new();
    for (shard, path) in shards.iter().enumerate() {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut keys = ShardKeys::default();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| DataError::format(path, format!("not a tar file: {e}")))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| DataError::format(path, format!("corrupt tar shard: {e}")))?;
            // A shard cut short is refused here as the streaming reader refuses it.
            if let Some(e) = member_cut_short(path, &entry, file_len) {
                return Err(e);
            }
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| DataError::format(path, format!("bad entry name: {e}")))?
                .to_string_lossy()
                .into_owned();
            let Some((key, ext)) = member_key(&name) else {
                continue;
            };
            check_member_size(path, &name, entry.size(), file_len)?;
            if keys.see(&key).is_some() {
                // The streaming reader's marker: this group is skipped as a repeated key.
                samples.push((
                    key.clone(),
                    vec![Member {
                        shard,
                        ext: REPEATED_KEY.to_string(),
                        offset: 0,
                        size: 0,
                    }],
                ));
            }
            let member = Member {
                shard,
                ext,
                offset: entry.raw_file_position(),
                size: entry.size(),
            };
            // Consecutive members with one key form a sample, as in the streaming reader.
            match samples.last_mut() {
                Some((k, members)) if *k == key => members.push(member),
                _ => samples.push((key, vec![member])),
            }
        }
        keys.finish(path)?;
    }
    Ok(samples)
}

impl SampleIndex {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match &self.locations {
            Locations::Files => self.dataset.entries().len(),
            Locations::Tar { samples, .. } => samples.len(),
        }
    }

    /// True when the dataset has no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dataset indexed.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The sample at position `index`, as [`Dataset::samples`] would yield it: an unreadable
    /// image is reported in `image`, an index past the end or an unreadable shard is an
    /// error.
    pub fn get(&self, index: u64) -> Result<Sample, DataError> {
        let out_of_range = || {
            DataError::format(
                ".",
                format!("sample {index} is out of range ({} samples)", self.len()),
            )
        };
        let i = usize::try_from(index).map_err(|_| out_of_range())?;
        match &self.locations {
            Locations::Files => {
                let entry = self.dataset.entries().get(i).ok_or_else(out_of_range)?;
                Ok(entry.sample(index))
            }
            Locations::Tar { shards, samples } => {
                let (key, members) = samples.get(i).ok_or_else(out_of_range)?;
                let mut group: Vec<TarEntry> = Vec::with_capacity(members.len());
                for m in members {
                    let path = &shards[m.shard];
                    let read = || -> std::io::Result<Vec<u8>> {
                        if m.size == 0 {
                            return Ok(Vec::new());
                        }
                        let mut f = File::open(path)?;
                        f.seek(SeekFrom::Start(m.offset))?;
                        let mut bytes = vec![0u8; m.size as usize];
                        f.read_exact(&mut bytes)?;
                        Ok(bytes)
                    };
                    let bytes = read().map_err(|e| {
                        DataError::format(path, format!("cannot read sample `{key}`: {e}"))
                    })?;
                    group.push((key.clone(), m.ext.clone(), bytes));
                }
                let mut sample = group_to_sample(group);
                sample.index = index;
                Ok(sample)
            }
        }
    }
}
