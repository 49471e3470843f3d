//! Seeded initial weights: open_clip's init scheme for CLIP towers, and a random BERT
//! folder (the shape of a sentence-transformers model) for tests and examples.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::hf_tensor_shapes;
use crate::config::{ClipConfig, TextTowerKind, VisionConfig};
use crate::ModelError;
use clipcid_store::io;

/// Seeded initial tensors (CPU, f32) for every parameter, following open_clip's init scheme:
/// normal with std `width^-0.5` for attention inputs and projections, `(2 width)^-0.5` for
/// the MLP input, `width^-0.5 (2 layers)^-0.5` for residual outputs, 0.02 / 0.01 for text
/// token / position embeddings, unit layer norms, zero biases; a BERT text tower gets BERT's
/// normal(0.02) for every weight matrix. Same seed, same tensors.
pub fn init_tensors(cfg: &ClipConfig, seed: u64) -> Result<HashMap<String, Tensor>, ModelError> {
    cfg.validate()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in hf_tensor_shapes(cfg) {
        let (w, layers) = if name.starts_with("vision_model") || name.starts_with("visual") {
            (
                cfg.vision_config.hidden_size,
                cfg.vision_config.num_hidden_layers,
            )
        } else {
            (
                cfg.text_config.hidden_size,
                cfg.text_config.num_hidden_layers,
            )
        };
        let wf = w as f64;
        let proj_std = wf.powf(-0.5) * (2.0 * layers as f64).powf(-0.5);
        let n: usize = shape.iter().product();
        let fill = |v: f32| vec![v; n];
        let bert = cfg.text_config.kind == TextTowerKind::Bert && name.starts_with("text_model.");
        let data: Vec<f32> = if name == "logit_scale" {
            fill(cfg.logit_scale_init_value as f32)
        } else if name.ends_with(".bias") {
            fill(0.0)
        } else if name.to_ascii_lowercase().contains("norm") && name.ends_with(".weight") {
            fill(1.0)
        } else {
            let std = if bert || name.contains("token_embedding") {
                0.02
            } else if name.starts_with("text_model.embeddings.position_embedding") {
                0.01
            } else if name.contains("patch_embedding") {
                let v = &cfg.vision_config;
                ((v.num_channels * v.patch_size * v.patch_size) as f64).powf(-0.5)
            } else if name.contains("out_proj") || name.contains("fc2") {
                proj_std
            } else if name.contains("fc1") {
                (2.0 * wf).powf(-0.5)
            } else {
                wf.powf(-0.5)
            };
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    (z * std) as f32
                })
                .collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// Writes a seeded random BERT in `transformers`' folder layout — `config.json` (from
/// `bert_config_json`), `model.safetensors` and a WordPiece `tokenizer.json` whose
/// vocabulary is `[PAD] [UNK] [CLS] [SEP]` then `words` — for tests and smoke runs of
/// locked-text teachers, as [`crate::ClipModel::random`] is for CLIP. Same seed, same files.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use clipcid_models::weights::{locked_text_tensors, write_random_bert};
/// use clipcid_models::ClipConfig;
/// let dir = tempfile::tempdir()?;
/// let bert = r#"{"vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
///     "num_attention_heads": 2, "intermediate_size": 32, "hidden_act": "gelu",
///     "max_position_embeddings": 16, "model_type": "bert"}"#;
/// write_random_bert(dir.path(), bert, &["red", "square"], 0)?;
/// let vision = ClipConfig::preset("tiny")?.vision_config;
/// let (cfg, _) = locked_text_tensors(dir.path(), vision, 0)?;
/// assert_eq!(cfg.projection_dim, 16);
/// # Ok(()) }
/// ```
pub fn write_random_bert(
    dir: &Path,
    bert_config_json: &str,
    words: &[&str],
    seed: u64,
) -> Result<(), ModelError> {
    use tokenizers::models::wordpiece::WordPiece;
    let vision = VisionConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        image_size: 8,
        patch_size: 8,
        ..VisionConfig::default()
    };
    let cfg = ClipConfig::locked_text(vision, bert_config_json)?;
    let mut vocab = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    vocab.extend(words);
    if vocab.len() > cfg.text_config.vocab_size {
        return Err(ModelError::Config(format!(
            "{} tokens do not fit the config's vocabulary of {}",
            vocab.len(),
            cfg.text_config.vocab_size
        )));
    }
    clipcid_store::io::create_output_folder(dir)?;
    io::write_atomic(&dir.join("config.json"), bert_config_json.as_bytes())?;
    let tensors: Vec<(String, Tensor)> = init_tensors(&cfg, seed)?
        .into_iter()
        .filter_map(|(n, t)| Some((n.strip_prefix("text_model.")?.to_string(), t)))
        .collect();
    io::write_safetensors(&dir.join("model.safetensors"), tensors, &HashMap::new())?;
    let vocab_txt = dir.join("vocab.txt");
    io::write_atomic(&vocab_txt, vocab.join("\n").as_bytes())?;
    let model = WordPiece::from_file(&vocab_txt.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| ModelError::file(&vocab_txt, e))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(
        tokenizers::normalizers::bert::BertNormalizer::default(),
    ));
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::bert::BertPreTokenizer));
    let json = tok
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(io::write_atomic(
        &dir.join("tokenizer.json"),
        json.as_bytes(),
    )?)
}
