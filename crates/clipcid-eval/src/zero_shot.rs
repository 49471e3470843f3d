//! Zero-shot classification, CLIP's protocol: every class name is put into every prompt
//! template, the text embeddings are normalised, averaged per class and normalised again;
//! an image's class scores are its cosine similarities to those class embeddings.

use clipcid_models::{ClipModel, ClipTokenizer};

use crate::features::{encode_texts, Features};
use crate::{Classification, EvalError, Templates};

/// Class embeddings for zero-shot classification.
///
/// ```
/// use clipcid_eval::{Features, ZeroShotClassifier};
/// // Two classes, two templates each, in a 2-d embedding space.
/// let text = Features::normalized(vec![1.0, 0.1, 1.0, -0.1, 0.1, 1.0, -0.1, 1.0], 2).unwrap();
/// let zs = ZeroShotClassifier::from_text_features(&text, 2).unwrap();
/// let images = Features::normalized(vec![0.9, 0.2, 0.1, 0.8], 2).unwrap();
/// let c = zs.classify(&images, &[0, 1]).unwrap();
/// assert_eq!(c.top1, 1.0);
/// ```
#[derive(Debug, Clone)]
pub struct ZeroShotClassifier {
    /// Unit class embeddings `[classes, dim]`.
    pub weights: Features,
}

impl ZeroShotClassifier {
    /// Encodes `classes x templates` prompts with `model`'s text tower.
    pub fn new(
        model: &ClipModel,
        tokenizer: &ClipTokenizer,
        class_names: &[String],
        templates: &Templates,
    ) -> Result<Self, EvalError> {
        if class_names.is_empty() {
            return Err(EvalError::Input("no class names".into()));
        }
        let prompts: Vec<String> = class_names
            .iter()
            .flat_map(|c| templates.prompts(c))
            .collect();
        let text = encode_texts(model, tokenizer, &prompts, 256)?;
        Self::from_text_features(&text, templates.len())
    }

    /// From unit text embeddings grouped per class: rows `c * templates .. (c + 1) *
    /// templates` belong to class `c`.
    pub fn from_text_features(text: &Features, templates: usize) -> Result<Self, EvalError> {
        if templates == 0 || text.rows() == 0 || !text.rows().is_multiple_of(templates) {
            return Err(EvalError::Input(format!(
                "{} prompt embeddings are not a whole number of classes x {templates} templates",
                text.rows()
            )));
        }
        let mut w = Vec::with_capacity(text.rows() / templates * text.dim);
        for class in text.data.chunks_exact(templates * text.dim) {
            let mut mean = vec![0f32; text.dim];
            for row in class.chunks_exact(text.dim) {
                mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
            }
            w.extend(mean);
        }
        Ok(Self {
            weights: Features::normalized(w, text.dim)?,
        })
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.weights.rows()
    }

    /// Class scores `[images, classes]` (cosines), row-major.
    pub fn scores(&self, images: &Features) -> Result<Vec<f32>, EvalError> {
        images.similarity(&self.weights)
    }

    /// Scores `images` against their true classes.
    pub fn classify(
        &self,
        images: &Features,
        truth: &[usize],
    ) -> Result<Classification, EvalError> {
        Classification::from_scores(&self.scores(images)?, self.classes(), truth)
    }
}
