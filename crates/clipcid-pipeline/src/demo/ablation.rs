//! The demo's ablation: the paper's loss terms added one at a time (CLIP only, then the
//! cluster term, then the instance term: CLIP-CID) and PicCollage's image-tower distillation,
//! each trained over several seeds on the same data-limited subset, scored, and summarised as
//! mean and spread.

use std::fmt;

/// One arm of the ablation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arm {
    /// The student's own image-text InfoNCE only: no teacher.
    ClipOnly,
    /// CLIP loss + cluster-level distillation (PartialFC over the teacher's k-means
    /// centres + KL to the teacher's cluster distribution).
    ClipCluster,
    /// CLIP loss + cluster + instance-level distillation: the full CLIP-CID.
    ClipCid,
    /// PicCollage: only the image tower is trained (KL at temperature 4 then 2, + L1 to the
    /// teacher's image embeddings); the text tower is the teacher's, unchanged.
    PicCollage,
}

impl Arm {
    /// Every arm, in the order of the tables.
    pub const ALL: [Arm; 4] = [
        Arm::ClipOnly,
        Arm::ClipCluster,
        Arm::ClipCid,
        Arm::PicCollage,
    ];

    /// Short name: file and run folder names (`runs/<name>-seed<s>`).
    ///
    /// ```
    /// use clipcid_pipeline::demo::Arm;
    /// let names: Vec<_> = Arm::ALL.iter().map(|a| a.name()).collect();
    /// assert_eq!(names, ["clip-only", "clip-cluster", "clip-cid", "piccollage"]);
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Arm::ClipOnly => "clip-only",
            Arm::ClipCluster => "clip-cluster",
            Arm::ClipCid => "clip-cid",
            Arm::PicCollage => "piccollage",
        }
    }

    /// What the arm trains, for the tables.
    pub fn label(self) -> &'static str {
        match self {
            Arm::ClipOnly => "CLIP loss only (no teacher)",
            Arm::ClipCluster => "CLIP + cluster",
            Arm::ClipCid => "CLIP + cluster + instance (CLIP-CID)",
            Arm::PicCollage => "PicCollage: image tower only, KL + L1, teacher's text tower",
        }
    }
}

/// One student's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedScores {
    /// The run's seed (init, data order, PartialFC sampling).
    pub seed: u64,
    /// Zero-shot top-1 on the held-out set, in [0, 1].
    pub zero_shot: f64,
    /// Linear-probe top-1 on the held-out set, in [0, 1].
    pub linear_probe: f64,
    /// Mean mAP@10..20 of the student's text-to-image search against the teacher's.
    pub agreement_map: f64,
    /// Mean cosine between the student's and the teacher's embedding of each held-out image
    /// (`None` when their widths differ).
    pub image_cosine: Option<f64>,
    /// Training throughput.
    pub samples_per_second: f64,
    /// Optimiser steps of the run.
    pub steps: u64,
}

/// Every seed of one arm.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmScores {
    /// The arm.
    pub arm: Arm,
    /// Parameters of its student (PicCollage's includes the teacher's text tower).
    pub parameters: usize,
    /// One entry per seed.
    pub seeds: Vec<SeedScores>,
}

/// The mean of a few runs and their spread: the sample standard deviation (n - 1 in the
/// denominator; 0 for a single run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanSpread {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub spread: f64,
    /// Number of runs.
    pub n: usize,
}

impl MeanSpread {
    /// Mean and sample standard deviation of `values` (`None` when empty).
    ///
    /// ```
    /// let m = clipcid_pipeline::demo::MeanSpread::of(&[1.0, 2.0, 3.0]).unwrap();
    /// assert_eq!((m.mean, m.spread, m.n), (2.0, 1.0, 3));
    /// assert_eq!(format!("{:.1}", m.scaled(100.0)), "200.0 ± 100.0");
    /// ```
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let spread = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self { mean, spread, n })
    }

    /// Both numbers times `k` (fractions as percentages).
    pub fn scaled(self, k: f64) -> Self {
        Self {
            mean: self.mean * k,
            spread: self.spread * k,
            n: self.n,
        }
    }
}

impl fmt::Display for MeanSpread {
    /// `mean ± spread` at the formatter's precision; the mean alone for one run.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = f.precision().unwrap_or(3);
        if self.n > 1 {
            write!(f, "{:.p$} ± {:.p$}", self.mean, self.spread)
        } else {
            write!(f, "{:.p$}", self.mean)
        }
    }
}

impl ArmScores {
    /// Mean and spread of one score over the seeds (`None` when no seed has it).
    pub fn summary(&self, score: impl Fn(&SeedScores) -> Option<f64>) -> Option<MeanSpread> {
        MeanSpread::of(&self.seeds.iter().filter_map(score).collect::<Vec<_>>())
    }
}

/// `mean unit ± spread unit` (the mean alone for one run), or `-` without a value.
fn cell(m: Option<MeanSpread>, scale: f64, precision: usize, unit: &str) -> String {
    match m.map(|m| m.scaled(scale)) {
        Some(m) if m.n > 1 => format!(
            "{:.precision$}{unit} ± {:.precision$}{unit}",
            m.mean, m.spread
        ),
        Some(m) => format!("{:.precision$}{unit}", m.mean),
        None => "-".into(),
    }
}

/// The teacher's row of the ablation table.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherRow {
    /// What it is (`locked-text, not OpenAI CLIP`, `pretrained CLIP`).
    pub label: String,
    /// What it learned from (`all 13442 training rows`, `its publisher's data`).
    pub trained_on: String,
    /// Its parameters.
    pub parameters: usize,
    /// Zero-shot top-1, in [0, 1].
    pub zero_shot: f64,
    /// Linear-probe top-1, in [0, 1].
    pub linear_probe: f64,
}

/// The ablation table (markdown): one row per arm, mean ± spread over its seeds (each
/// trained on `subset`), under a row for the teacher.
pub fn ablation_table(teacher: &TeacherRow, arms: &[ArmScores], subset: &str) -> String {
    let seeds = arms.first().map_or(0, |a| a.seeds.len());
    let mut t = format!(
        "| model | parameters | trained on | zero-shot top-1 | linear probe top-1 | mAP@10-20 vs teacher | image cosine to teacher | train samples/s |\n\
         |---|---:|---|---:|---:|---:|---:|---:|\n\
         | teacher ({}) | {} | {} | {:.1}% | {:.1}% | - | - | - |\n",
        teacher.label,
        teacher.parameters,
        teacher.trained_on,
        100.0 * teacher.zero_shot,
        100.0 * teacher.linear_probe
    );
    for a in arms {
        t.push_str(&format!(
            "| {} | {} | {subset}, {seeds} seed{} | {} | {} | {} | {} | {} |\n",
            a.arm.label(),
            a.parameters,
            if seeds == 1 { "" } else { "s" },
            cell(a.summary(|s| Some(s.zero_shot)), 100.0, 1, "%"),
            cell(a.summary(|s| Some(s.linear_probe)), 100.0, 1, "%"),
            cell(a.summary(|s| Some(s.agreement_map)), 1.0, 3, ""),
            cell(a.summary(|s| s.image_cosine), 1.0, 3, ""),
            cell(a.summary(|s| Some(s.samples_per_second)), 1.0, 0, ""),
        ));
    }
    t
}

/// Every run's scores (markdown), for the report.
pub fn seed_table(arms: &[ArmScores]) -> String {
    let mut t = String::from(
        "| arm | seed | steps | zero-shot top-1 | linear probe top-1 | mAP@10-20 | image cosine | samples/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for a in arms {
        for s in &a.seeds {
            t.push_str(&format!(
                "| {} | {} | {} | {:.1}% | {:.1}% | {:.3} | {} | {:.0} |\n",
                a.arm.name(),
                s.seed,
                s.steps,
                100.0 * s.zero_shot,
                100.0 * s.linear_probe,
                s.agreement_map,
                s.image_cosine
                    .map(|c| format!("{c:.3}"))
                    .unwrap_or_else(|| "-".into()),
                s.samples_per_second
            ));
        }
    }
    t
}

/// Whether the paper's ordering (CLIP only < + cluster < + instance) holds for one score's
/// means, whether each step up is larger than the spread of the two arms it joins, and on
/// how many seeds each step up won (the arms of one seed start from the same init and see
/// the same batches, so the seeds pair them): one sentence for the report.
///
/// ```
/// use clipcid_pipeline::demo::{ordering, Arm, ArmScores, SeedScores};
/// let arm = |arm, zs: &[f64]| ArmScores {
///     arm,
///     parameters: 1,
///     seeds: zs.iter().enumerate().map(|(i, &z)| SeedScores {
///         seed: i as u64, zero_shot: z, linear_probe: z, agreement_map: 0.0,
///         image_cosine: None, samples_per_second: 1.0, steps: 1,
///     }).collect(),
/// };
/// let arms = [
///     arm(Arm::ClipOnly, &[0.60, 0.62]),
///     arm(Arm::ClipCluster, &[0.70, 0.72]),
///     arm(Arm::ClipCid, &[0.71, 0.75]),
/// ];
/// let s = ordering("zero-shot", &arms, |s| Some(s.zero_shot));
/// assert!(s.starts_with("zero-shot: CLIP only 61.0% < + cluster 71.0% < + instance 73.0%: holds"), "{s}");
/// assert!(s.contains("+ instance step (2.0 points) is within the spread"), "{s}");
/// assert!(s.ends_with("+ cluster ahead on 2 of 2, + instance on 2 of 2"), "{s}");
/// ```
pub fn ordering(
    what: &str,
    arms: &[ArmScores],
    score: impl Fn(&SeedScores) -> Option<f64>,
) -> String {
    let arm_of = |arm| arms.iter().find(|a| a.arm == arm);
    let find = |arm| arm_of(arm).and_then(|a| a.summary(&score));
    // Seeds where `hi` beat `lo`, of the seeds both ran (paired: same init and order).
    let paired = |lo, hi| {
        let (Some(lo), Some(hi)) = (arm_of(lo), arm_of(hi)) else {
            return (0, 0);
        };
        let pairs: Vec<(f64, f64)> = hi
            .seeds
            .iter()
            .filter_map(|h| {
                let l = lo.seeds.iter().find(|l| l.seed == h.seed)?;
                Some((score(l)?, score(h)?))
            })
            .collect();
        (pairs.iter().filter(|(l, h)| h > l).count(), pairs.len())
    };
    let (Some(base), Some(cluster), Some(full)) = (
        find(Arm::ClipOnly),
        find(Arm::ClipCluster),
        find(Arm::ClipCid),
    ) else {
        return format!("{what}: not every arm of the ablation ran");
    };
    let pct = |m: MeanSpread| format!("{:.1}%", 100.0 * m.mean);
    let sign = |a: MeanSpread, b: MeanSpread| if a.mean < b.mean { "<" } else { "≥" };
    let holds = base.mean < cluster.mean && cluster.mean < full.mean;
    let mut s = format!(
        "{what}: CLIP only {} {} + cluster {} {} + instance {}: {}",
        pct(base),
        sign(base, cluster),
        pct(cluster),
        sign(cluster, full),
        pct(full),
        if holds { "holds" } else { "does not hold" }
    );
    let mut within = vec![];
    for (name, lo, hi) in [("+ cluster", base, cluster), ("+ instance", cluster, full)] {
        let gap = hi.mean - lo.mean;
        if gap > 0.0 && gap <= lo.spread.max(hi.spread) {
            within.push(format!(
                "the {name} step ({:.1} points) is within the spread (± {:.1})",
                100.0 * gap,
                100.0 * lo.spread.max(hi.spread)
            ));
        }
    }
    if !within.is_empty() {
        s.push_str(&format!("; {}", within.join(", ")));
    }
    let (c, n) = paired(Arm::ClipOnly, Arm::ClipCluster);
    let (i, m) = paired(Arm::ClipCluster, Arm::ClipCid);
    if n > 1 || m > 1 {
        s.push_str(&format!(
            "; seed by seed (the arms of a seed share init, data order and subset): + cluster ahead on {c} of {n}, + instance on {i} of {m}"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(arm: Arm, zs: &[f64]) -> ArmScores {
        ArmScores {
            arm,
            parameters: 10,
            seeds: zs
                .iter()
                .enumerate()
                .map(|(i, &z)| SeedScores {
                    seed: i as u64,
                    zero_shot: z,
                    linear_probe: 1.0 - z,
                    agreement_map: z / 10.0,
                    image_cosine: (arm != Arm::ClipOnly).then_some(z),
                    samples_per_second: 100.0,
                    steps: 5,
                })
                .collect(),
        }
    }

    #[test]
    fn mean_spread_is_the_sample_standard_deviation() {
        let xs = [0.61, 0.7, 0.64, 0.9];
        let m = MeanSpread::of(&xs).unwrap();
        let mean = (0.61 + 0.7 + 0.64 + 0.9) / 4.0;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 3.0;
        assert!((m.mean - mean).abs() < 1e-15 && (m.spread - var.sqrt()).abs() < 1e-15);
        assert_eq!(MeanSpread::of(&[]), None);
        let one = MeanSpread::of(&[0.5]).unwrap();
        assert_eq!((one.spread, format!("{one:.2}")), (0.0, "0.50".to_string()));
    }

    #[test]
    fn the_ordering_sentence_says_when_the_paper_order_fails() {
        let arms = [
            arm(Arm::ClipOnly, &[0.8, 0.8]),
            arm(Arm::ClipCluster, &[0.7, 0.7]),
            arm(Arm::ClipCid, &[0.9, 0.9]),
        ];
        let s = ordering("zero-shot", &arms, |s| Some(s.zero_shot));
        assert_eq!(
            s,
            "zero-shot: CLIP only 80.0% ≥ + cluster 70.0% < + instance 90.0%: does not hold; seed by seed (the arms of a seed share init, data order and subset): + cluster ahead on 0 of 2, + instance on 2 of 2"
        );
        // One seed: no seed-by-seed count.
        let one: Vec<ArmScores> = arms
            .iter()
            .map(|a| ArmScores {
                seeds: a.seeds[..1].to_vec(),
                ..a.clone()
            })
            .collect();
        let s = ordering("zero-shot", &one, |s| Some(s.zero_shot));
        assert!(s.ends_with("does not hold"), "{s}");
        // Linear probe is 1 - z here: the reverse order.
        let s = ordering("probe", &arms[..2], |s| Some(s.linear_probe));
        assert_eq!(s, "probe: not every arm of the ablation ran");
    }

    #[test]
    fn the_tables_hold_every_arm_and_every_seed() {
        let arms: Vec<ArmScores> = Arm::ALL.iter().map(|&a| arm(a, &[0.5, 0.7, 0.6])).collect();
        let teacher = TeacherRow {
            label: "locked-text".into(),
            trained_on: "all 500 rows".into(),
            parameters: 99,
            zero_shot: 0.95,
            linear_probe: 0.96,
        };
        let t = ablation_table(&teacher, &arms, "1000 rows");
        assert_eq!(t.lines().count(), 2 + 1 + 4, "{t}");
        assert!(
            t.contains("| teacher (locked-text) | 99 | all 500 rows | 95.0% | 96.0% |"),
            "{t}"
        );
        // Mean 60.0, sample std 10.0 (percent).
        assert!(
            t.contains("| 60.0% ± 10.0% | 40.0% ± 10.0% | 0.060 ± 0.010 |"),
            "{t}"
        );
        assert!(
            t.lines().nth(3).unwrap().contains("| - | 100 ± 0 |"),
            "no cosine for CLIP only: {t}"
        );
        let s = seed_table(&arms);
        assert_eq!(s.lines().count(), 2 + 12, "{s}");
    }
}
