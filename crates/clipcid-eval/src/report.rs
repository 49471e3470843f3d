//! The evaluation report: every measure the plan asks for, for every model side by side,
//! written as `report.md` + `results.json` + PNG plots.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use clipcid_data::{Dataset, Preprocess};
use clipcid_models::{ClipModel, ClipTokenizer};
use serde::Serialize;

use crate::features::{encode_dataset, encode_texts, EncodedImages, Features};
use crate::{
    linear_probe, plot_confusion, plot_per_class_recall, Agreement, Classification, EvalError,
    LabelledFeatures, ProbeOptions, Retrieval, Templates, ZeroShotClassifier,
};

/// A model under evaluation.
#[derive(Debug, Clone)]
pub struct EvalModel {
    /// Its name in the tables (e.g. `teacher`, `student`).
    pub name: String,
    /// The model.
    pub model: ClipModel,
    /// Its tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Its image preprocessing (its checkpoint family's; see `Preprocess::for_model`).
    pub preprocess: Preprocess,
}

/// What to evaluate. Every part is optional; datasets are anything
/// [`Dataset::open`] reads (labelled folders for classification, captioned sets for
/// retrieval).
#[derive(Debug, Clone, Default)]
pub struct EvalPlan {
    /// Zero-shot classification on a labelled set.
    pub zero_shot: Option<ZeroShotPlan>,
    /// Linear probe: a labelled train set and a labelled test set (same classes; the same
    /// path for both is an error).
    pub linear_probe: Option<(PathBuf, PathBuf, ProbeOptions)>,
    /// Retrieval on a captioned set: each image with all its captions (the lines of its
    /// caption; in a captions file, every line that names it).
    pub retrieval: Option<PathBuf>,
    /// Teacher agreement: text queries ranked over an image set; needs a teacher model.
    pub agreement: Option<AgreementPlan>,
    /// Images per forward pass (at least 1).
    pub batch_size: usize,
}

/// Zero-shot part of an [`EvalPlan`].
#[derive(Debug, Clone)]
pub struct ZeroShotPlan {
    /// The labelled set.
    pub data: PathBuf,
    /// Prompt templates.
    pub templates: Templates,
    /// Class names in label order; default: the folder names with `_` as spaces.
    pub class_names: Option<Vec<String>>,
}

/// Agreement part of an [`EvalPlan`].
#[derive(Debug, Clone)]
pub struct AgreementPlan {
    /// The image collection searched.
    pub images: PathBuf,
    /// Text queries.
    pub queries: Vec<String>,
    /// Which model is the teacher (its name).
    pub teacher: String,
    /// The N values (PicCollage: 10..=20).
    pub ns: Vec<usize>,
}

/// All results, per model in the order given.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EvalResults {
    /// Model names.
    pub models: Vec<String>,
    /// Each model's image preprocessing, described (`Preprocess`'s `Display`: resize, crop,
    /// and when the image becomes RGB, e.g. behind a loader that converts first).
    pub preprocessing: Vec<String>,
    /// Zero-shot scores per model.
    pub zero_shot: Vec<Classification>,
    /// Class names of the classification sets.
    pub class_names: Vec<String>,
    /// Linear-probe test scores and chosen L2 per model.
    pub linear_probe: Vec<(f64, Classification)>,
    /// Retrieval per model.
    pub retrieval: Vec<Retrieval>,
    /// Agreement of each non-teacher model with the teacher, and the mean cosine between
    /// their embeddings of the same images (`None` when the widths differ).
    pub agreement: Vec<(String, Agreement, Option<f64>)>,
}

/// One result in CLIP_benchmark's output shape (`clip_benchmark eval` writes one such JSON
/// file per dataset, model and task, and its `build_csv` reads a folder of them), so that
/// clipcid's numbers sit beside its leaderboards. `model` and `pretrained` both hold the
/// model's name in the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClipBenchmarkRecord {
    /// The evaluation set's name (its folder or file name; a CLIP_benchmark split folder's
    /// parent).
    pub dataset: String,
    /// The model's name.
    pub model: String,
    /// The model's name (CLIP_benchmark's weights tag).
    pub pretrained: String,
    /// `zeroshot_classification`, `linear_probe` or `zeroshot_retrieval`.
    pub task: String,
    /// `acc1`, `acc5`, `mean_per_class_recall` for classification;
    /// `image_retrieval_recall@K` and `text_retrieval_recall@K` for retrieval.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Always `en`.
    pub language: String,
}

impl ClipBenchmarkRecord {
    /// CLIP_benchmark's file name: `{dataset}_{pretrained}_{model}_{language}_{task}.json`,
    /// with path separators replaced.
    pub fn file_name(&self) -> String {
        file_safe(&format!(
            "{}_{}_{}_{}_{}.json",
            self.dataset, self.pretrained, self.model, self.language, self.task
        ))
    }
}

/// `name` with path separators replaced by `-`, as CLIP_benchmark names its files.
fn file_safe(name: &str) -> String {
    name.replace(['/', '\\'], "-")
}

/// An evaluation set's name for [`ClipBenchmarkRecord`]: its file or folder name, or the set's
/// name for a CLIP_benchmark split folder (`wds_cifar10/test` is `wds_cifar10`).
fn dataset_name(path: &Path) -> String {
    let path = match clipcid_data::ClipBenchmarkSet::find(path) {
        Some(set) => set
            .split
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        None => path.to_path_buf(),
    };
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into())
}

impl EvalResults {
    /// The results as CLIP_benchmark records: zero-shot classification, linear probe and
    /// retrieval, one per model (agreement has no CLIP_benchmark task).
    pub fn clip_benchmark_records(&self, plan: &EvalPlan) -> Vec<ClipBenchmarkRecord> {
        let record = |dataset: &Path, model: &str, task: &str, metrics: Vec<(String, f64)>| {
            ClipBenchmarkRecord {
                dataset: dataset_name(dataset),
                model: model.to_string(),
                pretrained: model.to_string(),
                task: task.to_string(),
                metrics: metrics.into_iter().collect(),
                language: "en".into(),
            }
        };
        let classification = |c: &Classification| {
            vec![
                ("acc1".to_string(), c.top1),
                ("acc5".to_string(), c.top5),
                ("mean_per_class_recall".to_string(), c.mean_per_class_recall),
            ]
        };
        let mut out = Vec::new();
        for (i, name) in self.models.iter().enumerate() {
            if let (Some(zs), Some(c)) = (&plan.zero_shot, self.zero_shot.get(i)) {
                out.push(record(
                    &zs.data,
                    name,
                    "zeroshot_classification",
                    classification(c),
                ));
            }
            if let (Some((_, test, _)), Some((_, c))) =
                (&plan.linear_probe, self.linear_probe.get(i))
            {
                out.push(record(test, name, "linear_probe", classification(c)));
            }
            if let (Some(data), Some(r)) = (&plan.retrieval, self.retrieval.get(i)) {
                let mut metrics = Vec::new();
                for (j, k) in r.ks.iter().enumerate() {
                    metrics.push((format!("image_retrieval_recall@{k}"), r.text_to_image[j]));
                    metrics.push((format!("text_retrieval_recall@{k}"), r.image_to_text[j]));
                }
                out.push(record(data, name, "zeroshot_retrieval", metrics));
            }
        }
        out
    }
}

/// The captions of a retrieval set: every caption, the image each belongs to, and the sample
/// row of each image. A sample's caption holds one caption per line (COCO and Flickr30k have
/// five per image; CLIP_benchmark's retrieval sets and a WebDataset `.txt` member can hold
/// several), blank lines skipped. With `by_key` (a captions file, whose key is the image's
/// path), samples of one key are one image with all their captions: such a file lists an
/// image once per caption, as Flickr30k's and COCO's own caption files do, and each line
/// was counted as an image of its own, the copies' identical features tying in every
/// ranking.
fn captions_per_image(
    captions: &[Option<String>],
    keys: &[String],
    by_key: bool,
    what: &Path,
) -> Result<RetrievalCaptions, EvalError> {
    let (mut texts, mut owner, mut image_rows) = (Vec::new(), Vec::new(), Vec::new());
    let mut image_of_key: HashMap<&str, usize> = HashMap::new();
    for (row, (caption, key)) in captions.iter().zip(keys).enumerate() {
        let caption = caption
            .as_deref()
            .ok_or_else(|| EvalError::file(what, format!("sample `{key}` has no caption")))?;
        let new_image = |rows: &mut Vec<usize>| {
            rows.push(row);
            rows.len() - 1
        };
        let image = if by_key {
            *image_of_key
                .entry(key.as_str())
                .or_insert_with(|| new_image(&mut image_rows))
        } else {
            new_image(&mut image_rows)
        };
        let before = texts.len();
        for line in caption.lines().map(str::trim).filter(|l| !l.is_empty()) {
            texts.push(line.to_string());
            owner.push(image);
        }
        if texts.len() == before {
            return Err(EvalError::file(
                what,
                format!("sample `{key}` has an empty caption"),
            ));
        }
    }
    Ok(RetrievalCaptions {
        texts,
        owner,
        image_rows,
    })
}

/// What [`captions_per_image`] found.
#[derive(Debug)]
struct RetrievalCaptions {
    /// Every caption.
    texts: Vec<String>,
    /// The image of each caption (an index into `image_rows`).
    owner: Vec<usize>,
    /// The sample row of each image.
    image_rows: Vec<usize>,
}

/// The class of every sample of `what`, each checked against the `classes` it has: a missing
/// or unparsable `.cls` member and a class past the class list are errors naming the sample.
fn labelled(enc: &EncodedImages, what: &Path, classes: usize) -> Result<Vec<usize>, EvalError> {
    enc.labels
        .iter()
        .zip(&enc.keys)
        .map(|(l, k)| match *l {
            None => Err(EvalError::file(
                what,
                format!(
                    "sample `{k}` has no class label (its `.cls` member is missing or not a whole number)"
                ),
            )),
            Some(c) if c >= classes => Err(EvalError::file(
                what,
                format!("sample `{k}` has class {c}, past the set's {classes} classes"),
            )),
            Some(c) => Ok(c),
        })
        .collect()
}

/// Image features per (model, dataset), so a set that several parts of the plan use (the
/// demo's held-out images serve zero-shot, the probe's test split and agreement) is encoded
/// once per model.
struct EncodingCache<'a> {
    models: &'a [EvalModel],
    batch: usize,
    done: HashMap<(usize, PathBuf), Rc<EncodedImages>>,
}

impl EncodingCache<'_> {
    fn get(&mut self, model: usize, path: &Path) -> Result<Rc<EncodedImages>, EvalError> {
        let key = (model, path.to_path_buf());
        if let Some(e) = self.done.get(&key) {
            return Ok(Rc::clone(e));
        }
        let m = &self.models[model];
        let enc = Rc::new(encode_dataset(
            &m.model,
            &m.preprocess,
            &open(path)?,
            self.batch,
        )?);
        self.done.insert(key, Rc::clone(&enc));
        Ok(enc)
    }
}

fn class_names_of(data: &Dataset) -> Vec<String> {
    data.classes().iter().map(|c| c.replace('_', " ")).collect()
}

fn open(path: &Path) -> Result<Dataset, EvalError> {
    Ok(Dataset::open(path)?)
}

/// A percentage, or `-` for a figure that does not apply (`NaN`: top-5 of fewer than 5
/// classes).
fn pct(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * v)
    }
}

/// Runs `plan` for every model and writes `out/report.md`, `out/results.json`, the plots
/// and one CLIP_benchmark-shaped JSON file per model and task in `out/clip_benchmark/`
/// ([`ClipBenchmarkRecord`]). Returns the results and the markdown.
pub fn evaluate(
    models: &[EvalModel],
    plan: &EvalPlan,
    out: &Path,
) -> Result<(EvalResults, String), EvalError> {
    if models.is_empty() {
        return Err(EvalError::Input("no models to evaluate".into()));
    }
    if plan.batch_size == 0 {
        // It was read as 1, one image per forward pass; embed refuses 0 too.
        return Err(EvalError::Input("batch size must be at least 1".into()));
    }
    // A name heads a table row and names its plots and records: two models of one name, or
    // of names that differ only in a path separator (which file names replace with `-`),
    // would share (overwrite) them.
    let mut seen: HashMap<String, &str> = HashMap::new();
    for m in models {
        if m.name.trim().is_empty() {
            return Err(EvalError::Input(
                "a model to evaluate has an empty name".into(),
            ));
        }
        if let Some(first) = seen.insert(file_safe(&m.name), &m.name) {
            let names = if first == m.name {
                format!("named `{first}`")
            } else {
                format!("named `{first}` and `{}`, one file name", m.name)
            };
            return Err(EvalError::Input(format!(
                "two models to evaluate are {names}; give each its own name"
            )));
        }
    }
    // The report, its plots and records are staged and moved into `out` together: a failure
    // part way (a bad label in the second set, a full disk) left new plots beside an earlier
    // run's report.
    clipcid_store::io::write_folder_replacing(out, "eval", |dir| report_into(models, plan, dir))
}

/// [`evaluate`] with every file written into `out`.
fn report_into(
    models: &[EvalModel],
    plan: &EvalPlan,
    out: &Path,
) -> Result<(EvalResults, String), EvalError> {
    let mut cache = EncodingCache {
        models,
        batch: plan.batch_size,
        done: HashMap::new(),
    };
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let mut res = EvalResults {
        models: names.clone(),
        preprocessing: models.iter().map(|m| m.preprocess.to_string()).collect(),
        ..Default::default()
    };
    let mut md = String::from("# Evaluation report\n\n");
    for m in models {
        let params = m.model.parameter_count();
        let _ = writeln!(
            md,
            "- **{}**: {:.2} M parameters, image {}px, embedding width {}; images: {}",
            m.name,
            params as f64 / 1e6,
            m.model.config().vision_config.image_size,
            m.model.config().projection_dim,
            m.preprocess
        );
    }
    md.push('\n');

    if let Some(zs) = &plan.zero_shot {
        let data = open(&zs.data)?;
        // Names from --class-names, else the set's own (class folders, a CLIP_benchmark
        // set's classnames.txt). A WebDataset's `.cls` labels come without names: they need
        // --class-names (given them, the count was checked against the set's 0 folders and
        // refused).
        let folders = data.classes().len();
        let classes = match &zs.class_names {
            Some(names) if folders > 0 && names.len() != folders => {
                return Err(EvalError::file(
                    &zs.data,
                    format!(
                        "{} class names given for {folders} class folders",
                        names.len()
                    ),
                ));
            }
            Some(names) => names.clone(),
            None if folders == 0 => {
                return Err(EvalError::file(
                    &zs.data,
                    "the set names no classes (only class folders and a CLIP_benchmark set's \
                     classnames.txt do; WebDataset `.cls` labels are numbers): give \
                     --class-names, a file of one class name per line in label order",
                ));
            }
            None => class_names_of(&data),
        };
        if classes.len() < 2 {
            // Every image is "right" among one class: 100% whatever the model (the linear
            // probe refuses one class too).
            return Err(EvalError::file(
                &zs.data,
                format!(
                    "zero-shot classification needs at least 2 classes, this set has {}",
                    classes.len()
                ),
            ));
        }
        // Two classes of one name get the same prompts, so the later is never predicted (ties
        // go to the lower index): a mistake in a class-names file, said, not refused, as some
        // datasets' own lists repeat a name.
        let mut first_of: HashMap<&str, usize> = HashMap::new();
        for (c, name) in classes.iter().enumerate() {
            let first = *first_of.entry(name.as_str()).or_insert(c);
            if first != c {
                log::warn!(
                    "{}: classes {first} and {c} are both named `{name}`: their prompts are the same, so zero-shot never predicts class {c}",
                    zs.data.display()
                );
            }
        }
        for (i, m) in models.iter().enumerate() {
            let enc = cache.get(i, &zs.data)?;
            let truth = labelled(&enc, &zs.data, classes.len())?;
            let zsc = ZeroShotClassifier::new(&m.model, &m.tokenizer, &classes, &zs.templates)?;
            res.zero_shot.push(zsc.classify(&enc.features, &truth)?);
        }
        let _ = writeln!(
            md,
            "## Zero-shot classification\n\n{} ({} images, {} classes, prompt templates: {})\n\n| model | top-1 | top-5 | mean per-class recall |\n|---|---:|---:|---:|",
            zs.data.display(),
            res.zero_shot[0].predictions.len(),
            classes.len(),
            zs.templates.len()
        );
        for (n, c) in names.iter().zip(&res.zero_shot) {
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} |",
                pct(c.top1),
                pct(c.top5),
                pct(c.mean_per_class_recall)
            );
        }
        let series: Vec<(&str, &[f64])> = names
            .iter()
            .zip(&res.zero_shot)
            .map(|(n, c)| (n.as_str(), c.per_class_recall.as_slice()))
            .collect();
        plot_per_class_recall(
            &out.join("zero-shot-per-class.png"),
            "zero-shot recall per class",
            &classes,
            &series,
        )?;
        md.push_str("\n![zero-shot recall per class](zero-shot-per-class.png)\n\n");
        if classes.len() <= 50 {
            for (n, c) in names.iter().zip(&res.zero_shot) {
                // Path separators in a name stay out of the file name, as in CLIP_benchmark's.
                let file = file_safe(&format!("zero-shot-confusion-{n}.png"));
                plot_confusion(
                    &out.join(&file),
                    &format!("zero-shot confusion: {n}"),
                    &classes,
                    &c.confusion,
                )?;
                let _ = writeln!(md, "![confusion {n}]({file})");
            }
            md.push('\n');
        }
        res.class_names = classes;
    }

    if let Some((train, test, opts)) = &plan.linear_probe {
        let resolved = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if resolved(train) == resolved(test) {
            // The probe would be scored on the very images it was fitted on.
            return Err(EvalError::file(
                test,
                format!(
                    "the linear probe's test set is its training set ({}): give a held-out split",
                    train.display()
                ),
            ));
        }
        let (train_data, test_data) = (open(train)?, open(test)?);
        if train_data.classes() != test_data.classes() {
            return Err(EvalError::file(
                test,
                format!("its classes differ from those of {}", train.display()),
            ));
        }
        let mut classes = class_names_of(&train_data);
        if classes.is_empty() {
            // A WebDataset's `.cls` labels come without names: the probe needs only their
            // count, the largest label of either split plus one (it was 0, and every sample
            // was refused as "past the set's 0 classes").
            let (tr, te) = (cache.get(0, train)?, cache.get(0, test)?);
            let top = tr.labels.iter().chain(&te.labels).flatten().max();
            classes = (0..top.map_or(0, |t| t + 1))
                .map(|c| c.to_string())
                .collect();
        }
        for i in 0..models.len() {
            let tr = cache.get(i, train)?;
            let te = cache.get(i, test)?;
            let k = classes.len();
            let trf = LabelledFeatures::new(
                &tr.features.data,
                tr.features.dim,
                &labelled(&tr, train, k)?,
                k,
            )?;
            let tef = LabelledFeatures::new(
                &te.features.data,
                te.features.dim,
                &labelled(&te, test, k)?,
                k,
            )?;
            let r = linear_probe(&trf, &tef, k, opts)?;
            res.linear_probe.push((r.l2, r.test));
        }
        let (how, chosen) = match opts.method {
            crate::ProbeMethod::Lbfgs => (
                format!(
                    "Logistic regression (L-BFGS, CLIP's protocol) on frozen image features of {} ({} classes); L2 strength swept on a {:.0}% validation split",
                    train.display(),
                    classes.len(),
                    100.0 * opts.validation_fraction
                ),
                "chosen L2",
            ),
            crate::ProbeMethod::ClipBenchmark(r) => (
                format!(
                    "Linear layer trained CLIP_benchmark's way (AdamW, lr {}, {} epochs, batch {}, cosine schedule) on frozen image features of {} ({} classes); {}",
                    r.lr,
                    r.epochs,
                    r.batch_size,
                    train.display(),
                    classes.len(),
                    if opts.validation_fraction > 0.0 {
                        format!(
                            "weight decay searched over logspace(-6, 2, 97) on a {:.0}% validation split",
                            100.0 * opts.validation_fraction
                        )
                    } else {
                        "no validation split: weight decay 0".to_string()
                    }
                ),
                "chosen weight decay",
            ),
        };
        let _ = writeln!(
            md,
            "## Linear probe\n\n{how}, accuracy on {}.\n\n| model | top-1 | top-5 | mean per-class recall | {chosen} |\n|---|---:|---:|---:|---:|",
            test.display()
        );
        for (n, (l2, c)) in names.iter().zip(&res.linear_probe) {
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} | {l2:.2e} |",
                pct(c.top1),
                pct(c.top5),
                pct(c.mean_per_class_recall)
            );
        }
        let series: Vec<(&str, &[f64])> = names
            .iter()
            .zip(&res.linear_probe)
            .map(|(n, (_, c))| (n.as_str(), c.per_class_recall.as_slice()))
            .collect();
        plot_per_class_recall(
            &out.join("linear-probe-per-class.png"),
            "linear-probe recall per class",
            &classes,
            &series,
        )?;
        md.push_str("\n![linear-probe recall per class](linear-probe-per-class.png)\n\n");
        if res.class_names.is_empty() {
            res.class_names = classes;
        }
    }

    if let Some(path) = &plan.retrieval {
        let ks = [1, 5, 10];
        let (mut images, mut texts) = (0, 0);
        let by_key = matches!(open(path)?.source(), clipcid_data::Source::Captioned { .. });
        for (i, m) in models.iter().enumerate() {
            let enc = cache.get(i, path)?;
            let RetrievalCaptions {
                texts: captions,
                owner,
                image_rows,
            } = captions_per_image(&enc.captions, &enc.keys, by_key, path)?;
            let text = encode_texts(&m.model, &m.tokenizer, &captions, 256)?;
            let sim = if image_rows.len() == enc.features.rows() {
                enc.features.similarity(&text)?
            } else {
                let dim = enc.features.dim;
                let data = image_rows
                    .iter()
                    .flat_map(|&r| enc.features.row(r).iter().copied())
                    .collect();
                Features { data, dim }.similarity(&text)?
            };
            (images, texts) = (image_rows.len(), captions.len());
            // The image count (the caption count here made every set with more captions
            // than images an error: "a 8 x 8 similarity matrix needs 64 values, got 32").
            res.retrieval.push(Retrieval::from_similarity(
                &sim,
                image_rows.len(),
                &owner,
                &ks,
            )?);
        }
        let _ = writeln!(
            md,
            "## Retrieval\n\n{} ({images} images, {texts} captions)\n\n| model | image->text R@1 | R@5 | R@10 | text->image R@1 | R@5 | R@10 |\n|---|---:|---:|---:|---:|---:|---:|",
            path.display(),
        );
        for (n, r) in names.iter().zip(&res.retrieval) {
            let cells: Vec<String> = r
                .image_to_text
                .iter()
                .chain(&r.text_to_image)
                .map(|&v| pct(v))
                .collect();
            let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
        }
        md.push('\n');
    }

    if let Some(ag) = &plan.agreement {
        let t = models
            .iter()
            .position(|m| m.name == ag.teacher)
            .ok_or_else(|| {
                EvalError::Input(format!(
                    "teacher agreement needs a model named `{}`",
                    ag.teacher
                ))
            })?;
        if ag.queries.is_empty() {
            return Err(EvalError::Input(
                "teacher agreement needs text queries".into(),
            ));
        }
        let encoded: Vec<Rc<EncodedImages>> = (0..models.len())
            .map(|i| cache.get(i, &ag.images))
            .collect::<Result<_, _>>()?;
        let sims: Vec<Vec<f32>> = models
            .iter()
            .zip(&encoded)
            .map(|(m, e)| {
                encode_texts(&m.model, &m.tokenizer, &ag.queries, 256)?.similarity(&e.features)
            })
            .collect::<Result<_, _>>()?;
        let images = encoded[t].features.rows();
        let _ = writeln!(
            md,
            "## Agreement with the teacher\n\n{} text queries over {} images of {}: mean average precision of each model's top-N against {}'s top-N (PicCollage's measure), and the mean cosine between the two models' embeddings of the same image.{}\n",
            ag.queries.len(),
            images,
            ag.images.display(),
            ag.teacher,
            if ag.ns.iter().any(|&n| n > images) {
                format!(" An N above the {images} images ranks all of them.")
            } else {
                String::new()
            }
        );
        let header: Vec<String> = ag.ns.iter().map(|n| format!("mAP@{n}")).collect();
        let _ = writeln!(
            md,
            "| model | {} | mean | image cosine |\n|---|{}---:|---:|",
            header.join(" | "),
            "---:|".repeat(ag.ns.len())
        );
        for (i, m) in models.iter().enumerate() {
            if i == t {
                continue;
            }
            let a = Agreement::from_similarity(&sims[t], &sims[i], images, ag.ns.iter().copied())?;
            let cos = encoded[t]
                .features
                .mean_row_cosine(&encoded[i].features)
                .ok();
            let cells: Vec<String> = a.map_at_n.iter().map(|(_, v)| format!("{v:.3}")).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {:.3} | {} |",
                m.name,
                cells.join(" | "),
                a.mean_map,
                cos.map(|c| format!("{c:.3}"))
                    .unwrap_or_else(|| "- (widths differ)".into())
            );
            res.agreement.push((m.name.clone(), a, cos));
        }
        md.push('\n');
    }

    let json = serde_json::to_vec_pretty(&res).map_err(|e| EvalError::Input(e.to_string()))?;
    clipcid_store::io::write_atomic(&out.join("results.json"), &json)?;
    let records = out.join("clip_benchmark");
    std::fs::create_dir_all(&records).map_err(|e| EvalError::file(&records, e))?;
    for record in res.clip_benchmark_records(plan) {
        let file = records.join(record.file_name());
        let json =
            serde_json::to_vec_pretty(&record).map_err(|e| EvalError::Input(e.to_string()))?;
        clipcid_store::io::write_atomic(&file, &json)?;
    }
    clipcid_store::io::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok((res, md))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed setup step should panic
mod tests {
    use super::*;

    #[test]
    fn several_captions_per_image_each_keep_their_image() {
        let captions = vec![
            Some("a dog\n\n  a brown dog \n".to_string()),
            Some("a cat".to_string()),
            Some("a dog asleep".to_string()),
        ];
        let keys = vec!["a".to_string(), "b".to_string(), "a".to_string()];
        // Samples are images (WebDataset keys are distinct samples)...
        let r = captions_per_image(&captions, &keys, false, Path::new("set")).unwrap();
        assert_eq!(r.texts, ["a dog", "a brown dog", "a cat", "a dog asleep"]);
        assert_eq!((r.owner, r.image_rows), (vec![0, 0, 1, 2], vec![0, 1, 2]));
        // ... or, in a captions file, one key is one image.
        let r = captions_per_image(&captions, &keys, true, Path::new("set")).unwrap();
        assert_eq!((r.owner, r.image_rows), (vec![0, 0, 1, 0], vec![0, 1]));
        let empty = vec![Some(" \n".to_string())];
        let e = captions_per_image(&empty, &keys[..1], false, Path::new("set"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a` has an empty caption"), "{e}");
        let e = captions_per_image(&[None], &keys[..1], false, Path::new("set"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a` has no caption"), "{e}");
    }
}
