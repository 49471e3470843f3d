//! One process's share of a stage run by many independent processes (Slurm arrays,
//! torchrun): `--part I/N`, or the launcher's environment.

use std::str::FromStr;

use crate::StoreError;

/// Process `index` of `count` (from 0). Work items (embedding shards, tile rows) go to parts
/// round-robin, item `j` to part `j % count`, so every part's share is deterministic, the
/// shares are disjoint, and together they cover every item.
///
/// ```
/// use clipcid_store::Part;
/// let p: Part = "1/3".parse()?;
/// assert_eq!((p.index(), p.count()), (1, 3));
/// assert_eq!((0..7).filter(|&j| p.owns(j)).collect::<Vec<_>>(), [1, 4]);
/// assert!(Part::WHOLE.owns(5));
/// assert!("3/3".parse::<Part>().is_err());
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Part {
    index: u64,
    count: u64,
}

impl Part {
    /// The whole job in one process (`0/1`).
    pub const WHOLE: Part = Part { index: 0, count: 1 };

    /// Part `index` of `count`; `index < count` is required.
    pub fn new(index: u64, count: u64) -> Result<Self, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "part {index}/{count}: the index must be below the count (parts are 0/N .. N-1/N)"
            ));
        }
        Ok(Self { index, count })
    }

    /// This part's index, from 0.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// How many parts there are.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether this is the whole job (`0/1`).
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// Whether work item `item` is this part's.
    pub fn owns(&self, item: u64) -> bool {
        item % self.count == self.index
    }

    /// The part a launcher gave this process in its environment: torchrun's `RANK` and
    /// `WORLD_SIZE`, else a Slurm array's `SLURM_ARRAY_TASK_ID` (less `SLURM_ARRAY_TASK_MIN`,
    /// over `SLURM_ARRAY_TASK_STEP`) of `SLURM_ARRAY_TASK_COUNT`; `None` when neither is set.
    /// A half-set or malformed pair, or a Slurm id off its array's range and step, is an
    /// error naming the variables.
    pub fn from_env() -> Result<Option<Self>, StoreError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Part::from_env`] over any variable lookup (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, StoreError> {
        let num = |k: &str| -> Result<Option<u64>, StoreError> {
            var(k)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        StoreError::Invalid(format!(
                            "environment variable {k}=`{v}` is not a count"
                        ))
                    })
                })
                .transpose()
        };
        let pair = |i: &str, n: &str| -> Result<Option<(u64, u64)>, StoreError> {
            match (num(i)?, num(n)?) {
                (Some(i), Some(n)) => Ok(Some((i, n))),
                (None, None) => Ok(None),
                _ => Err(StoreError::Invalid(format!(
                    "only one of {i} and {n} is set; set both (or pass --part I/N)"
                ))),
            }
        };
        let found = match pair("RANK", "WORLD_SIZE")? {
            Some(p) => Some(p),
            None => match pair("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")? {
                Some((id, n)) => Some((slurm_index(id, num)?, n)),
                None => None,
            },
        };
        found
            .map(|(i, n)| Part::new(i, n).map_err(StoreError::Invalid))
            .transpose()
    }
}

/// A Slurm array task's index from 0: `(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
/// SLURM_ARRAY_TASK_STEP` (`--array=1-7:2` runs ids 1, 3, 5, 7 as parts 0..4 of 4), with
/// the minimum 0 and the step 1 when unset. An id below the minimum, or off the step, is
/// an error naming the variables: it would otherwise run another task's part.
fn slurm_index(
    id: u64,
    num: impl Fn(&str) -> Result<Option<u64>, StoreError>,
) -> Result<u64, StoreError> {
    let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1);
    match id.checked_sub(min) {
        Some(offset) if step > 0 && offset % step == 0 => Ok(offset / step),
        _ => Err(StoreError::Invalid(format!(
            "SLURM_ARRAY_TASK_ID={id} is not SLURM_ARRAY_TASK_MIN={min} plus a multiple of \
             SLURM_ARRAY_TASK_STEP={step}; for an array of irregular ids, pass --part I/N"
        ))),
    }
}

impl Default for Part {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl FromStr for Part {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a part: write I/N, e.g. 0/4"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("`{s}` is not a part: write I/N, e.g. 0/4"))
        };
        Part::new(parse(i)?, parse(n)?)
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}
