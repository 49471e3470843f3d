//! CLIP image preprocessing: resize the shorter side (bicubic), centre crop, scale to [0, 1],
//! normalise per channel. Matches torchvision's `Resize(s, BICUBIC)`, `CenterCrop(s)`,
//! `ToTensor()`, `Normalize(mean, std)` as used by CLIP and open_clip.

use image::{imageops::FilterType, DynamicImage, RgbImage};

/// OpenAI CLIP's per-channel mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Image -> normalised `[3, size, size]` pixels.
///
/// ```
/// use clipcid_data::Preprocess;
/// let p = Preprocess::clip(4);
/// let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(8, 6, image::Rgb([255, 0, 0])));
/// let px = p.apply(&img);
/// assert_eq!(px.len(), 3 * 4 * 4);
/// assert!((px[0] - (1.0 - 0.48145466) / 0.26862954).abs() < 1e-5); // red channel, top-left
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Output side length (the model's image size).
    pub image_size: usize,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Preprocess {
    /// CLIP's preprocessing at `image_size`.
    pub fn clip(image_size: usize) -> Self {
        Self {
            image_size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// Resizes so the shorter side is `image_size` (bicubic, Catmull-Rom, as PIL's BICUBIC)
    /// and centre-crops to a square, returning an RGB image `image_size` on each side.
    pub fn resize_and_crop(&self, img: &DynamicImage) -> RgbImage {
        let s = self.image_size as u32;
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        let short = w.min(h);
        let resized = if short == s {
            rgb
        } else {
            // torchvision: the long side is int(size * long / short).
            let (nw, nh) = if w <= h {
                (s, ((s as u64 * h as u64) / w as u64) as u32)
            } else {
                (((s as u64 * w as u64) / h as u64) as u32, s)
            };
            image::imageops::resize(&rgb, nw.max(1), nh.max(1), FilterType::CatmullRom)
        };
        let (w, h) = resized.dimensions();
        // torchvision CenterCrop: offset = round((in - out) / 2), ties to even like Python.
        let left = ((w.saturating_sub(s)) as f64 / 2.0).round_ties_even() as u32;
        let top = ((h.saturating_sub(s)) as f64 / 2.0).round_ties_even() as u32;
        image::imageops::crop_imm(&resized, left, top, s.min(w), s.min(h)).to_image()
    }

    /// Channel-major (`[3, H, W]`) normalised pixels of an image.
    pub fn apply(&self, img: &DynamicImage) -> Vec<f32> {
        let rgb = self.resize_and_crop(img);
        let (w, h) = rgb.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// Decodes encoded image bytes (JPEG, PNG, WebP, BMP, GIF) and preprocesses them.
    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        let img =
            image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
        if img.width() == 0 || img.height() == 0 {
            return Err("image has no pixels".into());
        }
        Ok(self.apply(&img))
    }
}
