//! Prompt templates for zero-shot classification: CLIP's 80 ImageNet templates and the short
//! per-dataset lists CLIP used, or one template per line from a file. `{}` marks where the
//! class name goes.

use std::collections::BTreeMap;
use std::path::Path;

use crate::EvalError;

/// CLIP_benchmark's English prompt templates per dataset (MIT; see `data/clip_benchmark/`).
const CLIP_BENCHMARK_TEMPLATES: &str =
    include_str!("../data/clip_benchmark/en_zeroshot_classification_templates.json");
/// CLIP_benchmark's English class names for the datasets whose loaders lack good ones.
const CLIP_BENCHMARK_CLASSNAMES: &str = include_str!("../data/clip_benchmark/en_classnames.json");

/// A `{dataset: [strings]}` table of CLIP_benchmark's.
fn clip_benchmark_table(json: &str) -> Result<BTreeMap<String, Vec<String>>, EvalError> {
    serde_json::from_str(json)
        .map_err(|e| EvalError::Input(format!("CLIP_benchmark's bundled table: {e}")))
}

/// The datasets CLIP_benchmark has prompt templates for, by its names.
///
/// ```
/// let names = clipcid_eval::clip_benchmark_datasets();
/// assert!(names.iter().any(|n| n == "imagenet1k") && names.len() >= 30);
/// ```
pub fn clip_benchmark_datasets() -> Vec<String> {
    clip_benchmark_table(CLIP_BENCHMARK_TEMPLATES)
        .map(|t| t.into_keys().filter(|k| k != "dummy").collect())
        .unwrap_or_default()
}

/// CLIP_benchmark's class names for `dataset` in label order (ImageNet-1k's 1,000 cleaned
/// names as `imagenet1k`, and 16 more sets), or `None` for a dataset it has none for.
///
/// ```
/// let names = clipcid_eval::clip_benchmark_class_names("imagenet1k").unwrap();
/// assert_eq!((names.len(), names[0].as_str()), (1000, "tench"));
/// assert!(clipcid_eval::clip_benchmark_class_names("no such set").is_none());
/// ```
pub fn clip_benchmark_class_names(dataset: &str) -> Option<Vec<String>> {
    clip_benchmark_table(CLIP_BENCHMARK_CLASSNAMES)
        .ok()?
        .remove(dataset)
}

/// CLIP's 80 ImageNet prompt templates (the ensemble of CLIP's paper, section 3.1.4).
pub const IMAGENET_TEMPLATES: [&str; 80] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
];

/// CLIP's 18 CIFAR-10/100 templates.
pub const CIFAR_TEMPLATES: [&str; 18] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
];

/// CLIP's MNIST template.
pub const MNIST_TEMPLATES: [&str; 1] = ["a photo of the number: \"{}\"."];

/// A list of prompt templates, each with one `{}` (or `{c}`) for the class name.
///
/// ```
/// use clipcid_eval::Templates;
/// let t = Templates::named("cifar").unwrap();
/// assert_eq!(t.len(), 18);
/// assert_eq!(t.prompts("cat")[0], "a photo of a cat.");
/// assert_eq!(Templates::named("imagenet").unwrap().len(), 80);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Templates(Vec<String>);

impl Templates {
    /// A built-in set: `imagenet` (80), `cifar` (18), `mnist` (1), `simple`
    /// (`a photo of a {}.`) or `name` (the class name alone); or the templates
    /// CLIP_benchmark uses for one of its 33 datasets, by its name (`cifar100`, `food101`,
    /// `imagenet1k`, ...; see [`clip_benchmark_datasets`]).
    ///
    /// ```
    /// use clipcid_eval::Templates;
    /// let t = Templates::named("food101").unwrap();
    /// assert_eq!(t.prompts("pizza")[0], "a photo of pizza, a type of food.");
    /// assert_eq!(Templates::named("imagenet1k").unwrap().len(), 80);
    /// ```
    pub fn named(name: &str) -> Result<Self, EvalError> {
        let list: &[&str] = match name {
            "imagenet" => &IMAGENET_TEMPLATES,
            "cifar" => &CIFAR_TEMPLATES,
            "mnist" => &MNIST_TEMPLATES,
            "simple" => &["a photo of a {}."],
            "name" => &["{}"],
            other => {
                return match clip_benchmark_table(CLIP_BENCHMARK_TEMPLATES)?.remove(other) {
                    Some(list) => Self::new(list),
                    None => Err(EvalError::Input(format!(
                        "unknown template set `{other}` (imagenet, cifar, mnist, simple, name, \
                         a CLIP_benchmark dataset name such as cifar100, or a file)"
                    ))),
                }
            }
        };
        Ok(Self(list.iter().map(|s| s.to_string()).collect()))
    }

    /// Templates given in code; each must hold the class name's place exactly once, as `{}`
    /// (CLIP's notebooks) or `{c}` (CLIP_benchmark's `zeroshot_classification_templates.txt`),
    /// not both.
    ///
    /// ```
    /// use clipcid_eval::Templates;
    /// let t = Templates::new(vec!["a photo of a {c}.".into(), "a {} drawing.".into()]).unwrap();
    /// assert_eq!(t.prompts("dog"), ["a photo of a dog.", "a dog drawing."]);
    /// assert!(Templates::new(vec!["{c} and {}".into()]).is_err());
    /// ```
    pub fn new(list: Vec<String>) -> Result<Self, EvalError> {
        if list.is_empty() {
            return Err(EvalError::Input("no prompt templates".into()));
        }
        if let Some(bad) = list.iter().find(|t| Self::placeholder(t).is_none()) {
            return Err(EvalError::Input(format!(
                "template `{bad}` must contain the class name's place `{{}}` or `{{c}}` exactly once"
            )));
        }
        Ok(Self(list))
    }

    /// The placeholder a template uses, when it holds exactly one of them.
    fn placeholder(t: &str) -> Option<&'static str> {
        match (t.matches("{}").count(), t.matches("{c}").count()) {
            (1, 0) => Some("{}"),
            (0, 1) => Some("{c}"),
            _ => None,
        }
    }

    /// One template per non-empty line of a text file (lines starting with `#` skipped).
    pub fn from_file(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::file(path, e))?;
        let list = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        Self::new(list).map_err(|e| EvalError::file(path, e))
    }

    /// A built-in name, or else a file path.
    pub fn parse(spec: &str) -> Result<Self, EvalError> {
        let path = Path::new(spec);
        if path.is_file() {
            Self::from_file(path)
        } else {
            Self::named(spec)
        }
    }

    /// How many templates.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (a template list is never empty).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every template filled with `class`.
    pub fn prompts(&self, class: &str) -> Vec<String> {
        self.0
            .iter()
            .map(|t| t.replacen(Self::placeholder(t).unwrap_or("{}"), class, 1))
            .collect()
    }
}
