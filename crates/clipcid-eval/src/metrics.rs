//! Scores from similarity matrices: classification accuracy (top-k, mean per-class recall,
//! confusion), retrieval recall@K, and the ranking overlap PicCollage reports (mAP@N).

use serde::Serialize;

use crate::EvalError;

/// Classification results, as CLIP_benchmark reports them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    /// Fraction of samples whose top-scoring class is the true one.
    pub top1: f64,
    /// Fraction of samples whose true class is among the 5 best; `NaN` when there are
    /// fewer than 5 classes, as CLIP_benchmark's zero-shot task reports it (every sample
    /// would count: 100% on 2 classes). Its linear probe tests the largest test label
    /// (`>= 5`) instead of the class count; `results.json` writes `NaN` as `null`.
    pub top5: f64,
    /// Recall per class averaged over the classes that occur in the truth.
    pub mean_per_class_recall: f64,
    /// Top-1 recall of each class (`NaN` for a class with no samples).
    pub per_class_recall: Vec<f64>,
    /// `confusion[truth][predicted]` counts.
    pub confusion: Vec<Vec<u32>>,
    /// Top-1 prediction per sample.
    pub predictions: Vec<usize>,
}

impl Classification {
    /// Scores `[n, classes]` rows (higher is better) against the true class of each row.
    ///
    /// ```
    /// use clipcid_eval::Classification;
    /// let scores = [0.9, 0.1, 0.0, /**/ 0.2, 0.3, 0.5, /**/ 0.1, 0.6, 0.3];
    /// let c = Classification::from_scores(&scores, 3, &[0, 1, 1]).unwrap();
    /// assert_eq!(c.predictions, vec![0, 2, 1]);
    /// assert!((c.top1 - 2.0 / 3.0).abs() < 1e-12);
    /// assert_eq!(c.mean_per_class_recall, 0.75); // class 0: 1/1, class 1: 1/2
    /// ```
    pub fn from_scores(scores: &[f32], classes: usize, truth: &[usize]) -> Result<Self, EvalError> {
        if classes == 0 || scores.len() != truth.len() * classes {
            return Err(EvalError::Input(format!(
                "{} scores do not make {} rows of {classes} classes",
                scores.len(),
                truth.len()
            )));
        }
        if let Some(&t) = truth.iter().find(|&&t| t >= classes) {
            return Err(EvalError::Input(format!(
                "true class {t} is out of range for {classes} classes"
            )));
        }
        let mut confusion = vec![vec![0u32; classes]; classes];
        let (mut hit1, mut hit5) = (0usize, 0usize);
        let mut predictions = Vec::with_capacity(truth.len());
        for (row, &t) in scores.chunks_exact(classes).zip(truth) {
            // Rank of the truth in the order of `argmax` and `top_n` (a tie to the lower
            // index). Letting ties favour the truth gave a collapsed model (all scores
            // equal) 100% top-5.
            let above = rank_in(row.iter().copied(), t);
            let pred = argmax(row);
            hit1 += usize::from(pred == t);
            hit5 += usize::from(above < 5);
            confusion[t][pred] += 1;
            predictions.push(pred);
        }
        let per_class_recall: Vec<f64> = confusion
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let total: u32 = row.iter().sum();
                if total == 0 {
                    f64::NAN
                } else {
                    row[c] as f64 / total as f64
                }
            })
            .collect();
        let present: Vec<f64> = per_class_recall
            .iter()
            .copied()
            .filter(|r| !r.is_nan())
            .collect();
        let n = truth.len().max(1) as f64;
        Ok(Self {
            top1: hit1 as f64 / n,
            top5: if classes >= 5 {
                hit5 as f64 / n
            } else {
                f64::NAN
            },
            mean_per_class_recall: present.iter().sum::<f64>() / present.len().max(1) as f64,
            per_class_recall,
            confusion,
            predictions,
        })
    }
}

/// Index of the largest value (the first of equal ones; NaN never wins).
pub(crate) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Indices of the `n` largest values, best first: ties (`-0.0` and `0.0` among them) broken
/// by the lower index, NaN after every number. The order the recall's rank and `argmax`
/// count in (an f32's total order put a positive NaN above every number: a broken score
/// came first in a search).
///
/// ```
/// use clipcid_eval::top_n;
/// assert_eq!(top_n(&[0.5, f32::NAN, 0.9, 0.5], 4), [2, 0, 3, 1]);
/// assert_eq!(top_n(&[-0.0, 0.0], 2), [0, 1]);
/// ```
pub fn top_n(row: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (row[a], row[b]);
        x.is_nan()
            .cmp(&y.is_nan())
            .then_with(|| y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal))
            .then(a.cmp(&b))
    });
    idx.truncate(n);
    idx
}

/// Image-text retrieval recall@K in both directions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retrieval {
    /// The K values, e.g. `[1, 5, 10]`.
    pub ks: Vec<usize>,
    /// Image -> text: fraction of images with at least one of their captions in the top K.
    pub image_to_text: Vec<f64>,
    /// Text -> image: fraction of captions whose image is in the top K.
    pub text_to_image: Vec<f64>,
}

impl Retrieval {
    /// Recall@K from a similarity matrix `[images, texts]` (row-major) and the image each
    /// text describes (`text_image[j]` = row of caption `j`; an image may have several).
    ///
    /// ```
    /// use clipcid_eval::Retrieval;
    /// // 2 images, 3 captions: captions 0 and 1 describe image 0, caption 2 image 1.
    /// let sim = [0.9, 0.1, 0.2, /**/ 0.8, 0.3, 0.7];
    /// let r = Retrieval::from_similarity(&sim, 2, &[0, 0, 1], &[1, 2]).unwrap();
    /// assert_eq!(r.image_to_text, vec![0.5, 1.0]); // image 1's best caption is caption 0
    /// assert_eq!(r.text_to_image[0], 2.0 / 3.0); // caption 1 ranks image 1 first
    /// // Tied scores rank the lower index first (as `top_n`), never every tied answer first:
    /// // with all scores equal, only the first image's caption and caption 0's image count.
    /// let r = Retrieval::from_similarity(&[0.5; 9], 3, &[0, 1, 2], &[1]).unwrap();
    /// assert_eq!((r.image_to_text[0], r.text_to_image[0]), (1.0 / 3.0, 1.0 / 3.0));
    /// ```
    pub fn from_similarity(
        sim: &[f32],
        images: usize,
        text_image: &[usize],
        ks: &[usize],
    ) -> Result<Self, EvalError> {
        let texts = text_image.len();
        if sim.len() != images * texts || images == 0 || texts == 0 {
            return Err(EvalError::Input(format!(
                "a {images} x {texts} similarity matrix needs {} values, got {}",
                images * texts,
                sim.len()
            )));
        }
        if let Some(&i) = text_image.iter().find(|&&i| i >= images) {
            return Err(EvalError::Input(format!(
                "caption refers to image {i} of {images}"
            )));
        }
        // Rank (0-based) of the best-ranked right answer for each query, in the order of
        // [`top_n`]: higher score first, a tie to the lower index. Counting only strictly
        // higher scores put every tied answer first: a collapsed model (every caption's
        // embedding the same) scored 100% image -> text R@1.
        let i2t: Vec<usize> = (0..images)
            .map(|i| {
                let row = &sim[i * texts..(i + 1) * texts];
                // The best right caption: the highest score, of those the lowest index.
                let best = (0..texts).filter(|&j| text_image[j] == i).reduce(|b, j| {
                    if row[j] > row[b] {
                        j
                    } else {
                        b
                    }
                });
                match best {
                    Some(b) => rank_in(row.iter().copied(), b),
                    // An image without captions is never retrieved.
                    None => usize::MAX,
                }
            })
            .collect();
        let t2i: Vec<usize> = (0..texts)
            .map(|j| rank_in(sim.iter().skip(j).step_by(texts).copied(), text_image[j]))
            .collect();
        let recall = |ranks: &[usize], k: usize| {
            ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
        };
        Ok(Self {
            ks: ks.to_vec(),
            image_to_text: ks.iter().map(|&k| recall(&i2t, k)).collect(),
            text_to_image: ks.iter().map(|&k| recall(&t2i, k)).collect(),
        })
    }
}

/// The 0-based rank of entry `right` among `scores` in [`top_n`]'s order: the entries
/// scoring higher, and the tied ones of a lower index (NaN scores never outrank; a NaN
/// `right` ranks last).
fn rank_in(scores: impl Iterator<Item = f32> + Clone, right: usize) -> usize {
    let s = match scores.clone().nth(right) {
        Some(s) if !s.is_nan() => s,
        _ => return usize::MAX,
    };
    scores
        .enumerate()
        .filter(|&(k, t)| t > s || (t == s && k < right))
        .count()
}

/// Average precision of `ranking`'s first `n` results against the relevant set `relevant`
/// (PicCollage's teacher-agreement measure with `relevant` = the teacher's top `n`):
/// `AP@n = (1/m) * sum_{k <= n, ranking[k] relevant} precision@k` with
/// `m = min(n, |relevant|)`, the relevant items that fit in the first `n` (the usual
/// `apk`). Identical top-`n` lists give 1, disjoint ones 0, also when fewer than `n` items
/// exist: with `m = n`, a search pool of 8 images capped a perfect student at 0.8 at
/// N = 10 and 0.4 at N = 20.
///
/// ```
/// use clipcid_eval::average_precision_at_n;
/// assert_eq!(average_precision_at_n(&[1, 2, 3], &[1, 2, 3], 3), 1.0);
/// assert_eq!(average_precision_at_n(&[4, 5, 6], &[1, 2, 3], 3), 0.0);
/// // Hits at ranks 1 and 3: (1/1 + 2/3) / 3.
/// let ap = average_precision_at_n(&[1, 9, 2], &[1, 2, 3], 3);
/// assert!((ap - (1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
/// // Only 2 items to rank at n = 5: the same 2 in any order are full agreement.
/// assert_eq!(average_precision_at_n(&[7, 3], &[3, 7], 5), 1.0);
/// ```
pub fn average_precision_at_n(ranking: &[usize], relevant: &[usize], n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let relevant = &relevant[..relevant.len().min(n)];
    if relevant.is_empty() {
        return 0.0;
    }
    let mut hits = 0usize;
    let mut sum = 0.0;
    for (k, item) in ranking.iter().take(n).enumerate() {
        if relevant.contains(item) {
            hits += 1;
            sum += hits as f64 / (k + 1) as f64;
        }
    }
    sum / relevant.len() as f64
}

/// Teacher-student agreement over text queries (PicCollage): for each N, the mean over
/// queries of [`average_precision_at_n`] of the student's top-N images against the
/// teacher's top-N.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    /// `(N, mAP@N)` pairs.
    pub map_at_n: Vec<(usize, f64)>,
    /// The mean of `map_at_n` over N.
    pub mean_map: f64,
}

impl Agreement {
    /// From query-by-image similarity matrices `[queries, images]` of the teacher and the
    /// student (row-major, the same images in the same order).
    ///
    /// ```
    /// use clipcid_eval::Agreement;
    /// let teacher = [0.9, 0.5, 0.1, 0.3];
    /// let a = Agreement::from_similarity(&teacher, &teacher, 4, 1..=2).unwrap();
    /// assert_eq!(a.mean_map, 1.0);
    /// ```
    pub fn from_similarity(
        teacher: &[f32],
        student: &[f32],
        images: usize,
        ns: impl IntoIterator<Item = usize>,
    ) -> Result<Self, EvalError> {
        if images == 0 || teacher.len() != student.len() || !teacher.len().is_multiple_of(images) {
            return Err(EvalError::Input(format!(
                "teacher ({}) and student ({}) similarities are not both [queries, {images}]",
                teacher.len(),
                student.len()
            )));
        }
        let ns: Vec<usize> = ns.into_iter().collect();
        let max_n = ns.iter().copied().max().unwrap_or(0);
        let ranked: Vec<(Vec<usize>, Vec<usize>)> = teacher
            .chunks_exact(images)
            .zip(student.chunks_exact(images))
            .map(|(t, s)| (top_n(t, max_n), top_n(s, max_n)))
            .collect();
        let map_at_n: Vec<(usize, f64)> = ns
            .iter()
            .map(|&n| {
                let sum: f64 = ranked
                    .iter()
                    .map(|(t, s)| average_precision_at_n(s, t, n))
                    .sum();
                (n, sum / ranked.len().max(1) as f64)
            })
            .collect();
        let mean_map = map_at_n.iter().map(|(_, m)| m).sum::<f64>() / map_at_n.len().max(1) as f64;
        Ok(Self { map_at_n, mean_map })
    }
}
