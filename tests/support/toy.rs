//! Small generated inputs for the examples' default runs and for tests: coloured, textured
//! images with captions or class folders, and a seeded random teacher with its tokenizer.
//! Real runs pass real data and a real teacher instead.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clipcid_models::{ClipConfig, ClipModel, ClipTokenizer};

/// Class colours of the generated images.
pub const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 60]),
    ("blue", [40, 60, 220]),
    ("yellow", [235, 210, 40]),
];

/// A 28 x 28 image of class `c`: its colour, shifted per image, with a stripe pattern and a
/// texture of its own (`i`), so that even a random teacher's embeddings of two images are
/// rarely near-duplicates.
pub fn image(c: usize, i: usize) -> image::RgbImage {
    let hash = |v: u32| (v.wrapping_mul(2_654_435_761) >> 24) as u8;
    let colour = COLOURS[c % COLOURS.len()].1;
    let shift = [
        hash(i as u32 * 3 + 1),
        hash(i as u32 * 5 + 2),
        hash(i as u32 * 7 + 3),
    ];
    let period = 2 + (i as u32 % 7);
    image::RgbImage::from_fn(28, 28, |x, y| {
        let stripe = if ((x + y * (i as u32 % 3)) / period).is_multiple_of(2) {
            0
        } else {
            90
        };
        let n = hash(x * 7 + y * 13 + i as u32 * 31) / 3;
        image::Rgb([0, 1, 2].map(|k| {
            let v = colour[k] / 2 + shift[k] / 2;
            v.saturating_sub(n).saturating_sub(stripe)
        }))
    })
}

/// `n` captioned images (`dir/<i>.png` and `dir/captions.tsv`, "a red square"...); returns
/// `dir`.
pub fn captioned_images(dir: &Path, n: usize) -> Result<PathBuf, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut tsv = String::new();
    for i in 0..n {
        let c = i % COLOURS.len();
        image(c, i).save(dir.join(format!("{i}.png")))?;
        tsv.push_str(&format!("{i}.png\ta {} square\n", COLOURS[c].0));
    }
    std::fs::write(dir.join("captions.tsv"), tsv)?;
    Ok(dir.to_path_buf())
}

/// A labelled folder: `dir/<colour>/<i>.png`, `per_class` images per colour; returns `dir`.
pub fn labelled_images(
    dir: &Path,
    per_class: usize,
    offset: usize,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    for (c, (name, _)) in COLOURS.iter().enumerate() {
        let class_dir = dir.join(name);
        std::fs::create_dir_all(&class_dir)?;
        for i in 0..per_class {
            image(c, offset + i).save(class_dir.join(format!("{i}.png")))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// A Hugging Face CLIP folder (`model.safetensors`, `config.json`, byte-level
/// `tokenizer.json`) with seeded random weights of the `preset` shape; returns `dir`.
pub fn random_teacher(
    dir: &Path,
    preset: &str,
    seed: u64,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cfg = ClipConfig::preset(preset)?;
    ClipModel::random(&cfg, seed, &Device::Cpu)?.save_pretrained(dir, DType::F32)?;
    ClipTokenizer::byte_level(cfg.text_config.max_position_embeddings)?
        .save(&dir.join("tokenizer.json"))?;
    Ok(dir.to_path_buf())
}

/// A miniature of what `scripts/fetch-data.sh` writes into `data` (generated images in the
/// same folders, a random BERT as the locked-text teacher's text tower, a byte-level CLIP
/// tokenizer), so the demo's default path runs offline in seconds: tests never need the
/// real data.
pub fn default_data(data: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let shards = data.join("shards");
    std::fs::create_dir_all(&shards)?;
    let mut tsv = String::new();
    for i in 0..256 {
        let c = i % COLOURS.len();
        image(c, i).save(shards.join(format!("{i}.png")))?;
        tsv.push_str(&format!("{i}.png\ta {} digit {c}\n", COLOURS[c].0));
    }
    std::fs::write(shards.join("captions.tsv"), tsv)?;
    for (split, per_class, offset) in [("train", 10, 1000), ("test", 5, 2000)] {
        for c in 0..COLOURS.len() {
            let dir = data.join("digits").join(split).join(c.to_string());
            std::fs::create_dir_all(&dir)?;
            for i in 0..per_class {
                image(c, offset + 10 * i + c).save(dir.join(format!("{i}.png")))?;
            }
        }
    }
    // Other pictures in each folder: a photo among the text images is refused.
    for (folder, n, offset) in [("photos", 8, 3000), ("text-images", 2, 4000)] {
        std::fs::create_dir_all(data.join(folder))?;
        for i in 0..n {
            image(i % COLOURS.len(), offset + i)
                .save(data.join(folder).join(format!("{i}.png")))?;
        }
    }
    std::fs::write(
        data.join("SOURCES.md"),
        "# Default data\n\n| set | images |\n|---|---|\n| generated | 256 |\n",
    )?;
    let bert = r#"{"vocab_size": 16, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu",
        "max_position_embeddings": 32, "model_type": "bert"}"#;
    let vocab = [
        "a", "digit", "red", "green", "blue", "yellow", "0", "1", "2", "3",
    ];
    clipcid_models::weights::write_random_bert(&data.join("raw/minilm"), bert, &vocab, 3)?;
    ClipTokenizer::byte_level(77)?.save(&data.join("clip-tokenizer.json"))?;
    Ok(())
}
