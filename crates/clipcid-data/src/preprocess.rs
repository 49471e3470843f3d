//! CLIP image preprocessing as each checkpoint family computes it: resize (Pillow-exact,
//! see [`pil_resize`]), centre crop, scale to [0, 1], normalise per channel.
//!
//! The two families differ in one rule that matters: where the centre crop starts when the
//! margin is odd. open_clip (torchvision's `CenterCrop`) rounds half the margin, ties to even;
//! `transformers`' `CLIPImageProcessor` floors it. At 224 px one photo in four is shifted by a
//! pixel between the two, and far more at small sizes, so a checkpoint must be preprocessed
//! by its own family's rule ([`Preprocess::for_model`]).

use std::borrow::Cow;
use std::path::Path;

use image::{DynamicImage, RgbImage};

use crate::resample::{pil_resize_rgba_window, pil_resize_window, resize_window, Resample, Window};
use crate::{DataError, PillowMode};

/// OpenAI CLIP's per-channel mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Where a centre crop starts when the image is larger than the crop by an odd margin
/// (and where a smaller image sits in the zero padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropRule {
    /// `transformers`: offset `floor(margin / 2)`; padding puts the image at
    /// `ceil(pad / 2)`.
    Floor,
    /// torchvision's `CenterCrop` (open_clip): offset `round(margin / 2)`, ties to even;
    /// padding puts the image at `floor(pad / 2)`.
    Round,
}

/// How an image with transparency becomes RGB, and whether that happens before the resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlphaRule {
    /// `transformers`' `convert_to_rgb`: composited over white (Pillow's `alpha_composite`,
    /// bit for bit).
    OverWhite,
    /// open_clip's `_convert_to_rgb` (`image.convert("RGB")`): the alpha channel dropped, the
    /// colour under transparent pixels kept. open_clip converts after the resize and the
    /// crop, so under this rule what is resized and padded is the image as Pillow holds it
    /// ([`Preprocess::resize_and_crop_decoded`]: RGBA premultiplied, palettes by nearest
    /// neighbour, CMYK values).
    Drop,
    /// A loader's `image.convert("RGB")` before the transform (torchvision's `ImageFolder`
    /// `pil_loader`, which CLIP_benchmark's ImageNet and other folder datasets use;
    /// webdataset's `"pilrgb"`, as open_clip's WebDataset loader decodes): the alpha channel
    /// dropped, palettes expanded, CMYK converted, and then everything resized and padded as
    /// RGB, whichever transform follows (for both open_clip's and `transformers`' the
    /// conversion is then a no-op). [`Preprocess::with_rgb_first_loader`] sets it.
    DropFirst,
}

/// How the image is resized before the crop.
///
/// ```
/// use clipcid_data::{Preprocess, Resize};
/// // open_clip's `resize_mode: "longest"`: an 8 x 4 white image becomes 4 x 2, letterboxed
/// // in rows of `fill_color`.
/// let cfg = serde_json::json!({"resize_mode": "longest", "fill_color": 128});
/// let p = Preprocess::from_open_clip_preprocess_cfg(&cfg, 4)?;
/// assert_eq!(p.resize, Resize::LongestEdge(4));
/// let white = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(8, 4, image::Rgb([255; 3])));
/// let rgb = p.resize_and_crop(&white);
/// let column: Vec<u8> = (0..4).map(|y| rgb.get_pixel(0, y).0[0]).collect();
/// assert_eq!(column, [128, 255, 255, 128]);
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Shorter side to this length, the longer one to `int(len * long / short)`, as
    /// torchvision's `Resize(int)` and `transformers`' `{"shortest_edge": n}`.
    ShortestEdge(usize),
    /// Exactly this size, aspect ratio not kept (open_clip's `resize_mode: "squash"`,
    /// `transformers`' `{"height": h, "width": w}`).
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
    /// Longer side to this length, the shorter one to `round(len * short / long)` (ties to
    /// even, at least 1), then centred in padding of [`Preprocess::pad_fill`]: open_clip's
    /// `resize_mode: "longest"` (timm's `ResizeKeepRatio(longest=1)`, then
    /// `CenterCropOrPad`). The whole image is kept, letterboxed.
    LongestEdge(usize),
}

/// Which family's preprocessing a model gets ([`Preprocess::for_model`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreprocessFamily {
    /// Decided by the model's files: `preprocessor_config.json` means `transformers`, an
    /// `open_clip_config.json` or open_clip tensor names mean open_clip, otherwise
    /// `transformers` (clipcid's own folders are in its layout).
    #[default]
    Auto,
    /// `transformers`' `CLIPImageProcessor` (floor crop).
    Transformers,
    /// open_clip's `image_transform` (round crop).
    OpenClip,
}

impl std::str::FromStr for PreprocessFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "transformers" | "hf" => Ok(Self::Transformers),
            "open-clip" | "open_clip" | "openclip" => Ok(Self::OpenClip),
            _ => Err(format!(
                "unknown preprocessing `{s}` (auto, transformers, open-clip)"
            )),
        }
    }
}

impl std::fmt::Display for PreprocessFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Transformers => "transformers",
            Self::OpenClip => "open-clip",
        })
    }
}

/// A one-line description for reports: the resize, the crop, and when and how the image
/// becomes RGB.
///
/// ```
/// use clipcid_data::Preprocess;
/// assert_eq!(
///     Preprocess::open_clip(224).to_string(),
///     "shortest edge to 224 (bicubic), round centre crop to 224, resized as opened and \
///      converted to RGB after (alpha dropped)"
/// );
/// let rgb_first = Preprocess::open_clip(224).with_rgb_first_loader().to_string();
/// assert!(rgb_first.ends_with("converted to RGB first by the loader (alpha dropped)"));
/// ```
impl std::fmt::Display for Preprocess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.resize {
            Resize::ShortestEdge(n) => write!(f, "shortest edge to {n}")?,
            Resize::Exact { height, width } => write!(f, "squashed to {width} x {height}")?,
            Resize::LongestEdge(n) => {
                write!(f, "longest edge to {n}, padded with {}", self.pad_fill)?
            }
        }
        let crop = match self.crop {
            CropRule::Floor => "floor",
            CropRule::Round => "round",
        };
        let rgb = match self.alpha {
            AlphaRule::OverWhite => "converted to RGB first (transparency over white)",
            AlphaRule::Drop => "resized as opened and converted to RGB after (alpha dropped)",
            AlphaRule::DropFirst => "converted to RGB first by the loader (alpha dropped)",
        };
        write!(
            f,
            " ({}), {crop} centre crop to {}, {rgb}",
            self.resample.name(),
            self.image_size
        )
    }
}

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
    /// Output side length (the model's image size): the centre crop.
    pub image_size: usize,
    /// Resize before the crop.
    pub resize: Resize,
    /// Resampling filter of the resize (Pillow's, bit for bit).
    pub resample: Resample,
    /// Crop offset rule.
    pub crop: CropRule,
    /// What happens to transparency.
    pub alpha: AlphaRule,
    /// The value padding takes where the resized image is smaller than the crop (open_clip's
    /// `fill_color`; 0 unless a config sets it). Under [`AlphaRule::Drop`] (open_clip's
    /// transform, which pads before it converts to RGB) it is a value of the image's own
    /// mode ([`crate::PillowMode`]): gray level `pad_fill` for RGB and gray images, palette
    /// entry `pad_fill` of a palette image (black past the palette's end), white for a
    /// bilevel image unless 0, CMYK `(pad_fill; 4)` for a CMYK JPEG (white for 0).
    /// Otherwise it is the gray `(pad_fill, pad_fill, pad_fill)`.
    pub pad_fill: u8,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Preprocess {
    /// clipcid's default at `image_size`: `transformers`' CLIP preprocessing
    /// ([`Preprocess::transformers`]), the rule its own model folders declare in the
    /// `preprocessor_config.json` they carry.
    pub fn clip(image_size: usize) -> Self {
        Self::transformers(image_size)
    }

    /// `transformers`' `CLIPImageProcessor` defaults at `image_size`: transparency over white,
    /// shortest edge to `image_size` (Pillow bicubic), centre crop with the floor rule,
    /// OpenAI's mean and std.
    pub fn transformers(image_size: usize) -> Self {
        Self {
            image_size,
            resize: Resize::ShortestEdge(image_size),
            resample: Resample::Bicubic,
            crop: CropRule::Floor,
            alpha: AlphaRule::OverWhite,
            pad_fill: 0,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// open_clip's `image_transform` defaults (eval): alpha dropped, `Resize(image_size,
    /// BICUBIC)` on the PIL image, torchvision's `CenterCrop` (round rule), OpenAI's mean and
    /// std.
    pub fn open_clip(image_size: usize) -> Self {
        Self {
            crop: CropRule::Round,
            alpha: AlphaRule::Drop,
            ..Self::transformers(image_size)
        }
    }

    /// This preprocessing behind a loader that converts every image to RGB before it
    /// ([`AlphaRule::DropFirst`]): torchvision's `ImageFolder` and webdataset's `"pilrgb"`
    /// hand the transform RGB, so transparency is dropped (not composited over white) and
    /// palette, bilevel and CMYK images are resized as RGB. Only those images change; an RGB
    /// or gray photo gives the same pixels. The loader is not the model's: model folders do
    /// not record it.
    ///
    /// ```
    /// use clipcid_data::{AlphaRule, DecodedImage, PillowMode, Preprocess};
    /// // Stripes one pixel wide, halved: nearest neighbour (a palette image, as opened) keeps
    /// // one colour; resized as RGB they blend.
    /// let stripes = image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([255 * (x % 2) as u8; 3]));
    /// let palette = DecodedImage { image: stripes.into(), mode: PillowMode::Bilevel };
    /// let as_opened = Preprocess::open_clip(4).resize_and_crop_decoded(&palette);
    /// let rgb_first = Preprocess::open_clip(4).with_rgb_first_loader();
    /// assert_eq!(rgb_first.alpha, AlphaRule::DropFirst);
    /// let blended = rgb_first.resize_and_crop_decoded(&palette);
    /// assert!(as_opened.pixels().all(|p| p.0 == [0; 3] || p.0 == [255; 3]));
    /// assert!(blended.pixels().all(|p| p.0[0] > 0 && p.0[0] < 255));
    /// ```
    pub fn with_rgb_first_loader(self) -> Self {
        Self {
            alpha: AlphaRule::DropFirst,
            ..self
        }
    }

    /// Reads a `transformers` `preprocessor_config.json` (a `CLIPImageProcessor`'s): `size`
    /// (`{"shortest_edge": n}`, `{"height", "width"}` or a bare number), `crop_size`,
    /// `resample` (Pillow code), `image_mean`, `image_std`, and the `do_*` switches. The
    /// crop must be `image_size` square (the model's input); what cannot be honoured
    /// (no rescale to [0, 1], a crop of another size) is an error naming the field.
    pub fn from_hf_preprocessor_config(path: &Path, image_size: usize) -> Result<Self, DataError> {
        let bad = |msg: String| DataError::format(path, msg);
        let v = read_json(path)?;
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(true);
        let mut p = Self::transformers(image_size);
        if let Some(code) = v.get("resample").filter(|x| !x.is_null()) {
            let code = code.as_i64().ok_or_else(|| {
                bad(format!(
                    "`resample` must be a Pillow filter code, not {code}"
                ))
            })?;
            p.resample = Resample::from_pil_code(code).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(m) = v.get("image_mean").filter(|x| !x.is_null()) {
            p.mean = three(m).map_err(|e| bad(format!("`image_mean`: {e}")))?;
        }
        if let Some(s) = v.get("image_std").filter(|x| !x.is_null()) {
            p.std = three_positive(s).map_err(|e| bad(format!("`image_std`: {e}")))?;
        }
        if !flag("do_normalize") {
            p.mean = [0.0; 3];
            p.std = [1.0; 3];
        }
        if !flag("do_rescale") {
            return Err(bad(
                "`do_rescale: false` (pixels not scaled to [0, 1]) is not supported".into(),
            ));
        }
        if let Some(f) = v.get("rescale_factor").and_then(|x| x.as_f64()) {
            if (f - 1.0 / 255.0).abs() > 1e-9 {
                return Err(bad(format!("`rescale_factor` {f} is not 1/255")));
            }
        }
        let size = |key: &str| -> Result<Option<(Option<usize>, usize, usize)>, DataError> {
            let Some(s) = v.get(key).filter(|x| !x.is_null()) else {
                return Ok(None);
            };
            // A size of 0 would resize every image to nothing (and crop padding only).
            let positive = |x: &serde_json::Value| x.as_u64().filter(|&n| n > 0);
            let get = |k: &str| s.get(k).and_then(positive).map(|x| x as usize);
            if let Some(n) = positive(s) {
                return Ok(Some((Some(n as usize), n as usize, n as usize)));
            }
            match (get("shortest_edge"), get("height"), get("width")) {
                (Some(n), _, _) => Ok(Some((Some(n), n, n))),
                (None, Some(h), Some(w)) => Ok(Some((None, h, w))),
                _ => Err(bad(format!(
                    "`{key}` must be a positive number, {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}, not {s}"
                ))),
            }
        };
        // `{"longest_edge": n}`: what clipcid writes for open_clip's `resize_mode:
        // "longest"` (transformers' CLIPImageProcessor refuses it rather than resizing
        // another way), with its `fill_color`.
        let longest = v
            .get("size")
            .filter(|s| s.get("shortest_edge").is_none())
            .and_then(|s| s.get("longest_edge"));
        if let Some(n) = longest {
            let n = n.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                bad(format!(
                    "`size.longest_edge` must be a positive number, not {n}"
                ))
            })?;
            p.resize = Resize::LongestEdge(n as usize);
            if let Some(f) = v.get("fill_color").filter(|x| !x.is_null()) {
                p.pad_fill = fill_color(f).map_err(|e| bad(format!("`fill_color`: {e}")))?;
            }
        } else if flag("do_resize") {
            p.resize = match size("size")? {
                Some((Some(n), _, _)) => Resize::ShortestEdge(n),
                Some((None, height, width)) => Resize::Exact { height, width },
                None => Resize::ShortestEdge(image_size),
            };
        } else {
            return Err(bad("`do_resize: false` is not supported (images of any size must become the model's input size)".into()));
        }
        let crop = if flag("do_center_crop") {
            size("crop_size")?
                .map(|(_, h, w)| (h, w))
                .unwrap_or((image_size, image_size))
        } else {
            match p.resize {
                Resize::Exact { height, width } => (height, width),
                Resize::LongestEdge(n) => (n, n),
                Resize::ShortestEdge(_) => {
                    return Err(bad("`do_center_crop: false` with a `shortest_edge` size gives non-square inputs; not supported".into()))
                }
            }
        };
        if crop != (image_size, image_size) {
            return Err(bad(format!(
                "crop size {}x{} is not the model's input size {image_size}x{image_size}",
                crop.0, crop.1
            )));
        }
        Ok(p)
    }

    /// Reads open_clip's preprocessing from an `open_clip_config.json` (its
    /// `preprocess_cfg`) or from a bare `preprocess_cfg` object: `size`, `mean`, `std`,
    /// `interpolation` (`bicubic`, `bilinear`, `nearest`, `lanczos`), `resize_mode`
    /// (`shortest`, `squash`, `longest`), `fill_color` (0-255); omitted fields take
    /// open_clip's defaults. A config without `preprocess_cfg` gives
    /// [`Preprocess::open_clip`].
    pub fn from_open_clip_config(path: &Path, image_size: usize) -> Result<Self, DataError> {
        let bad = |msg: String| DataError::format(path, msg);
        let v = read_json(path)?;
        let cfg = if v.get("model_cfg").is_some() {
            v.get("preprocess_cfg")
                .cloned()
                .unwrap_or(serde_json::Value::Null)
        } else if v.get("embed_dim").is_some() || v.get("vision_cfg").is_some() {
            serde_json::Value::Null
        } else {
            v
        };
        Self::from_open_clip_preprocess_cfg(&cfg, image_size).map_err(bad)
    }

    /// open_clip's `preprocess_cfg` object (see [`Preprocess::from_open_clip_config`]).
    ///
    /// ```
    /// use clipcid_data::{CropRule, Preprocess, Resample};
    /// let cfg = serde_json::json!({"interpolation": "bilinear", "mean": [0.5, 0.5, 0.5]});
    /// let p = Preprocess::from_open_clip_preprocess_cfg(&cfg, 224).unwrap();
    /// assert_eq!((p.crop, p.resample, p.mean), (CropRule::Round, Resample::Bilinear, [0.5; 3]));
    /// ```
    pub fn from_open_clip_preprocess_cfg(
        cfg: &serde_json::Value,
        image_size: usize,
    ) -> Result<Self, String> {
        let mut p = Self::open_clip(image_size);
        if cfg.is_null() {
            return Ok(p);
        }
        let field = |k: &str| cfg.get(k).filter(|x| !x.is_null());
        if let Some(s) = field("size") {
            let sizes: Option<Vec<u64>> = match s {
                serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64()).collect(),
                other => other.as_u64().map(|x| vec![x]),
            };
            let sizes = sizes.unwrap_or_default();
            if sizes.is_empty() || sizes.iter().any(|&x| x as usize != image_size) {
                return Err(format!(
                    "preprocess_cfg size {s} is not the model's image size {image_size}"
                ));
            }
        }
        if let Some(m) = field("mean") {
            p.mean = three(m).map_err(|e| format!("preprocess_cfg mean: {e}"))?;
        }
        if let Some(s) = field("std") {
            p.std = three_positive(s).map_err(|e| format!("preprocess_cfg std: {e}"))?;
        }
        if let Some(i) = field("interpolation") {
            let name = i.as_str().unwrap_or("");
            p.resample = match name {
                "bicubic" => Resample::Bicubic,
                "bilinear" => Resample::Bilinear,
                "nearest" => Resample::Nearest,
                "lanczos" => Resample::Lanczos,
                _ => return Err(format!("preprocess_cfg interpolation {i} is not supported")),
            };
        }
        let text = |k: &str| -> Result<Option<&str>, String> {
            field(k)
                .map(|m| {
                    m.as_str()
                        .ok_or_else(|| format!("preprocess_cfg {k} {m} is not a string"))
                })
                .transpose()
        };
        match text("resize_mode")? {
            None | Some("shortest") => {}
            Some("squash") => {
                p.resize = Resize::Exact {
                    height: image_size,
                    width: image_size,
                }
            }
            Some("longest") => p.resize = Resize::LongestEdge(image_size),
            Some(other) => {
                return Err(format!(
                "preprocess_cfg resize_mode `{other}` is not supported (shortest, squash, longest)"
            ))
            }
        }
        if let Some(f) = field("fill_color") {
            p.pad_fill = fill_color(f).map_err(|e| format!("preprocess_cfg fill_color: {e}"))?;
        }
        if let Some(mode) = text("mode")? {
            if mode != "RGB" {
                return Err(format!(
                    "preprocess_cfg mode `{mode}` is not supported (RGB)"
                ));
            }
        }
        Ok(p)
    }

    /// The preprocessing a model folder (or checkpoint file) asks for. With
    /// [`PreprocessFamily::Auto`]: its `preprocessor_config.json` when present, else the
    /// `preprocess_cfg` of its `open_clip_config.json`, else open_clip's defaults when
    /// `open_clip_layout` (the checkpoint's tensor names are open_clip's), else
    /// `transformers`' defaults. A forced family reads its own file when present and its
    /// defaults otherwise. Returns the preprocessing and where it came from, for reports.
    ///
    /// ```
    /// use clipcid_data::{CropRule, Preprocess, PreprocessFamily};
    /// let dir = tempfile::tempdir().unwrap();
    /// let (p, _) = Preprocess::for_model(dir.path(), 224, PreprocessFamily::Auto, true).unwrap();
    /// assert_eq!(p.crop, CropRule::Round); // open_clip tensor names, no config files
    /// let (p, _) = Preprocess::for_model(dir.path(), 224, PreprocessFamily::Transformers, true).unwrap();
    /// assert_eq!(p.crop, CropRule::Floor);
    /// ```
    pub fn for_model(
        model: &Path,
        image_size: usize,
        family: PreprocessFamily,
        open_clip_layout: bool,
    ) -> Result<(Self, String), DataError> {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent().unwrap_or(Path::new("."))
        };
        let hf = dir.join("preprocessor_config.json");
        let oc = dir.join("open_clip_config.json");
        let use_hf = match family {
            PreprocessFamily::Transformers => true,
            PreprocessFamily::OpenClip => false,
            PreprocessFamily::Auto => hf.is_file() || !(oc.is_file() || open_clip_layout),
        };
        if use_hf {
            if hf.is_file() {
                let p = Self::from_hf_preprocessor_config(&hf, image_size)?;
                return Ok((p, format!("transformers, from {}", hf.display())));
            }
            return Ok((
                Self::transformers(image_size),
                "transformers defaults".into(),
            ));
        }
        if oc.is_file() {
            let p = Self::from_open_clip_config(&oc, image_size)?;
            return Ok((p, format!("open_clip, from {}", oc.display())));
        }
        Ok((Self::open_clip(image_size), "open_clip defaults".into()))
    }

    /// This preprocessing as a `transformers` `preprocessor_config.json` (a
    /// `CLIPImageProcessor`), for model folders clipcid writes. Only the floor crop rule can
    /// be expressed there; a [`CropRule::Round`] preprocessing is written with the floor rule
    /// and differs by at most a one-pixel shift on odd margins. [`Resize::LongestEdge`] is
    /// written as `{"longest_edge": n}` with its `fill_color`: clipcid reads it back, and
    /// `transformers`' `CLIPImageProcessor` refuses it (it has no such resize) rather than
    /// preprocessing another way.
    pub fn to_hf_preprocessor_config(&self) -> serde_json::Value {
        let size = match self.resize {
            Resize::ShortestEdge(n) => serde_json::json!({"shortest_edge": n}),
            Resize::Exact { height, width } => {
                serde_json::json!({"height": height, "width": width})
            }
            Resize::LongestEdge(n) => serde_json::json!({"longest_edge": n}),
        };
        let mut cfg = serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "CLIPProcessor",
            "do_resize": true,
            "size": size,
            "resample": self.resample.pil_code(),
            "do_center_crop": true,
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": self.mean,
            "image_std": self.std,
            "do_convert_rgb": true,
        });
        if let Resize::LongestEdge(_) = self.resize {
            cfg["fill_color"] = self.pad_fill.into();
        }
        cfg
    }

    /// Writes [`Preprocess::to_hf_preprocessor_config`] to `dir/preprocessor_config.json`
    /// (atomically: a temporary file renamed into place).
    pub fn save_hf_preprocessor_config(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join("preprocessor_config.json");
        let text = serde_json::to_string_pretty(&self.to_hf_preprocessor_config())
            .map_err(|e| DataError::format(&path, e))?;
        clipcid_store::io::write_atomic(&path, text.as_bytes()).map_err(|e| match e {
            clipcid_store::StoreError::File { msg, .. } => DataError::format(&path, msg),
            other => DataError::format(&path, other),
        })
    }

    /// This preprocessing as open_clip's `preprocess_cfg` (for `open_clip_config.json`).
    pub fn to_open_clip_preprocess_cfg(&self) -> serde_json::Value {
        let resize_mode = match self.resize {
            Resize::ShortestEdge(_) => "shortest",
            Resize::Exact { .. } => "squash",
            Resize::LongestEdge(_) => "longest",
        };
        serde_json::json!({
            "size": self.image_size,
            "mode": "RGB",
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.resample.name(),
            "resize_mode": resize_mode,
            "fill_color": self.pad_fill,
        })
    }

    /// The image as RGB by [`Preprocess::alpha`], at its own size: transparency over white
    /// (transformers) or alpha dropped (open_clip, or a loader converting first). What a
    /// pipeline that converts to RGB before anything else (drawing on the image, showing it)
    /// works on.
    ///
    /// ```
    /// use clipcid_data::Preprocess;
    /// let clear = image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0]));
    /// let clear = image::DynamicImage::ImageRgba8(clear);
    /// let over_white = Preprocess::transformers(2).convert_to_rgb(&clear);
    /// assert_eq!(over_white.get_pixel(0, 0).0, [255; 3]);
    /// let dropped = Preprocess::open_clip(2).convert_to_rgb(&clear);
    /// assert_eq!(dropped.get_pixel(0, 0).0, [0; 3]);
    /// ```
    pub fn convert_to_rgb(&self, img: &DynamicImage) -> RgbImage {
        self.to_rgb(img).into_owned()
    }

    /// The image as RGB by [`Preprocess::alpha`] (an RGB image as it is, not copied).
    fn to_rgb<'i>(&self, img: &'i DynamicImage) -> Cow<'i, RgbImage> {
        if let DynamicImage::ImageRgb8(rgb) = img {
            return Cow::Borrowed(rgb);
        }
        if self.alpha != AlphaRule::OverWhite || !img.color().has_alpha() {
            return Cow::Owned(img.to_rgb8());
        }
        // Pillow's ImagingAlphaComposite of the image over opaque white (7 precision bits).
        const BITS: u32 = 7;
        let div255 = |a: u32| ((a >> 8) + a) >> 8;
        let rgba = img.to_rgba8();
        let (w, h) = rgba.dimensions();
        let mut out = RgbImage::new(w, h);
        for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
            let [r, g, b, a] = p.0.map(u32::from);
            if a == 0 {
                o.0 = [255, 255, 255];
                continue;
            }
            let outa255 = a * 255 + 255 * (255 - a);
            let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
            let coef2 = 255 * (1 << BITS) - coef1;
            let mix = |c: u32| (div255(c * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS) as u8;
            o.0 = [mix(r), mix(g), mix(b)];
        }
        Cow::Owned(out)
    }

    /// The resized size of a `w` x `h` image.
    fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        match self.resize {
            Resize::Exact { height, width } => (width as u32, height as u32),
            Resize::ShortestEdge(s) => {
                // torchvision and transformers: int(size * long / short), in floating point.
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * f64::from(long) / f64::from(short)) as u32;
                if w <= h {
                    (s as u32, new_long)
                } else {
                    (new_long, s as u32)
                }
            }
            Resize::LongestEdge(s) => {
                // timm's ResizeKeepRatio (longest=1): ratio = max(h / s, w / s), each side
                // round(side / ratio) in Python's float arithmetic (ties to even). A side of 0
                // (an image over `s` times longer than wide), which Pillow refuses, is 1.
                let s = s as f64;
                let ratio = (f64::from(h) / s).max(f64::from(w) / s);
                let side = |x: u32| ((f64::from(x) / ratio).round_ties_even() as u32).max(1);
                (side(w), side(h))
            }
        }
    }

    /// Resizes and centre-crops (zero-padding an image smaller than the crop), returning an
    /// RGB image `image_size` on each side. Only the crop of the resized image is computed
    /// ([`crate::pil_resize_window`]: the same pixels as resizing everything, with the time
    /// and memory of the crop).
    pub fn resize_and_crop(&self, img: &DynamicImage) -> RgbImage {
        self.crop_of(img, &PillowMode::Direct)
    }

    /// [`Preprocess::resize_and_crop`] of a decoded image, which knows how Pillow holds it
    /// ([`crate::DecodedImage::mode`]). Where the transform resizes and pads before it
    /// converts to RGB (open_clip's, [`AlphaRule::Drop`]), that is what it resizes: Pillow
    /// resizes palette and bilevel images by nearest neighbour whatever filter is asked (a
    /// GIF or palette PNG is resized by nearest neighbour, and converted, alpha dropped,
    /// after), resizes a CMYK JPEG's CMYK values (converted after), and pads with a value of
    /// that mode ([`Preprocess::pad_fill`]). `transformers` converts to RGB first, so its
    /// preprocessing resizes them all as RGB with its filter.
    ///
    /// ```
    /// use clipcid_data::{DecodedImage, PillowMode, Preprocess};
    /// // Two colours in stripes one pixel wide, halved: nearest neighbour keeps one colour.
    /// let stripes = image::RgbImage::from_fn(8, 8, |x, _| {
    ///     image::Rgb([255 * (x % 2) as u8; 3])
    /// });
    /// let image = image::DynamicImage::ImageRgb8(stripes);
    /// let palette = DecodedImage { image: image.clone(), mode: PillowMode::Bilevel };
    /// let open_clip = Preprocess::open_clip(4).resize_and_crop_decoded(&palette);
    /// assert!(open_clip.pixels().all(|p| p.0 == open_clip.get_pixel(0, 0).0));
    /// let photo = Preprocess::open_clip(4).resize_and_crop(&image);
    /// assert!(photo.pixels().all(|p| p.0[0] > 0 && p.0[0] < 255));
    /// ```
    pub fn resize_and_crop_decoded(&self, img: &crate::DecodedImage) -> RgbImage {
        self.crop_of(&img.image, &img.mode)
    }

    /// The resized, cropped image; `mode`: how Pillow holds it before converting to RGB.
    fn crop_of(&self, img: &DynamicImage, mode: &PillowMode) -> RgbImage {
        let s = self.image_size as u32;
        let (nw, nh) = self.resized_size(img.width(), img.height());
        let (nw, nh) = (nw.max(1), nh.max(1));
        // Offset of the crop in the resized image (negative: the image sits inside padding).
        let offset = |len: u32| -> i64 {
            let (len, s) = (i64::from(len), i64::from(s));
            if len >= s {
                match self.crop {
                    CropRule::Floor => (len - s) / 2,
                    CropRule::Round => ((len - s) as f64 / 2.0).round_ties_even() as i64,
                }
            } else {
                match self.crop {
                    CropRule::Floor => -((s - len + 1) / 2),
                    CropRule::Round => -((s - len) / 2),
                }
            }
        };
        let (left, top) = (offset(nw), offset(nh));
        let window = Window {
            x: left.max(0) as usize,
            y: top.max(0) as usize,
            width: nw.min(s) as usize,
            height: nh.min(s) as usize,
        };
        let (w, h) = (img.width(), img.height());
        let before_rgb = self.resizes_as_opened();
        let cmyk = match mode {
            // A CMYK buffer that is not this image's (made by hand) is not used.
            PillowMode::Cmyk(c) if before_rgb && c.len() == w as usize * h as usize * 4 => Some(c),
            _ => None,
        };
        let part = if let Some(cmyk) = cmyk {
            // open_clip resizes Pillow's CMYK image (four channels, nothing premultiplied)
            // and converts to RGB only after the crop; the conversion is not linear.
            let window = crate::resample::clamp(window, nw, nh);
            let part = resize_window(cmyk, 4, (w, h), (nw, nh), self.resample, window);
            let rgb = crate::decode::pillow_cmyk_to_rgb(&part);
            RgbImage::from_raw(window.width as u32, window.height as u32, rgb).unwrap_or_default()
        } else if before_rgb && matches!(mode, PillowMode::Palette(_) | PillowMode::Bilevel) {
            // Pillow's `resize` of a `P` or `1` image is nearest neighbour, and open_clip
            // converts to RGB (dropping a transparent entry's alpha) only after the crop.
            pil_resize_window(&img.to_rgb8(), (nw, nh), Resample::Nearest, window)
        } else if before_rgb && img.color().has_alpha() {
            // open_clip resizes the RGBA image (Pillow premultiplies alpha) and drops alpha
            // after the crop.
            let rgba = pil_resize_rgba_window(&img.to_rgba8(), (nw, nh), self.resample, window);
            DynamicImage::ImageRgba8(rgba).to_rgb8()
        } else {
            pil_resize_window(&self.to_rgb(img), (nw, nh), self.resample, window)
        };
        if left >= 0 && top >= 0 {
            return part;
        }
        // Paste the (smaller) resized image into the padding.
        let (px, py) = ((-left).max(0) as u32, (-top).max(0) as u32);
        let mut out = RgbImage::from_pixel(s, s, image::Rgb(self.pad_colour(mode)));
        image::imageops::replace(&mut out, &part, i64::from(px), i64::from(py));
        out
    }

    /// Whether the image is resized and padded as Pillow holds it, converted to RGB after
    /// (open_clip's transform on the opened image, [`AlphaRule::Drop`]), not as RGB.
    fn resizes_as_opened(&self) -> bool {
        self.alpha == AlphaRule::Drop
    }

    /// The padding's colour in RGB: [`Preprocess::pad_fill`] in the image's mode where the
    /// transform pads before it converts (open_clip's), else a gray.
    fn pad_colour(&self, mode: &PillowMode) -> [u8; 3] {
        let f = self.pad_fill;
        if !self.resizes_as_opened() {
            return [f; 3];
        }
        match mode {
            PillowMode::Direct => [f; 3],
            PillowMode::Palette(entries) => entries.get(usize::from(f)).copied().unwrap_or([0; 3]),
            PillowMode::Bilevel => [if f == 0 { 0 } else { 255 }; 3],
            PillowMode::Cmyk(_) => {
                let rgb = crate::decode::pillow_cmyk_to_rgb(&[f; 4]);
                [rgb[0], rgb[1], rgb[2]]
            }
        }
    }

    /// How many values an image becomes: `3 * image_size * image_size`.
    pub fn values_per_image(&self) -> usize {
        3 * self.image_size * self.image_size
    }

    /// Channel-major (`[3, H, W]`) normalised pixels of an image.
    pub fn apply(&self, img: &DynamicImage) -> Vec<f32> {
        let mut out = vec![0f32; self.values_per_image()];
        self.write_normalized(&self.resize_and_crop(img), &mut out);
        out
    }

    /// [`Preprocess::apply`] into `out`, which must hold [`Preprocess::values_per_image`]
    /// values (a batch's slot, so a batch is written in place and in parallel); an error
    /// otherwise.
    ///
    /// ```
    /// use clipcid_data::Preprocess;
    /// let p = Preprocess::clip(4);
    /// let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 6));
    /// let mut batch = vec![0f32; 2 * p.values_per_image()];
    /// p.apply_into(&img, &mut batch[p.values_per_image()..])?;
    /// assert_eq!(&batch[p.values_per_image()..], p.apply(&img).as_slice());
    /// assert!(p.apply_into(&img, &mut batch).is_err());
    /// # Ok::<(), String>(())
    /// ```
    pub fn apply_into(&self, img: &DynamicImage, out: &mut [f32]) -> Result<(), String> {
        self.check_slot(out)?;
        self.write_normalized(&self.resize_and_crop(img), out);
        Ok(())
    }

    /// An error unless `out` holds one image's values.
    fn check_slot(&self, out: &[f32]) -> Result<(), String> {
        if out.len() != self.values_per_image() {
            return Err(format!(
                "a {0} x {0} image is {1} values, not {2}",
                self.image_size,
                self.values_per_image(),
                out.len()
            ));
        }
        Ok(())
    }

    /// An `image_size`-square RGB image, normalised, into channel-major `out`.
    fn write_normalized(&self, rgb: &RgbImage, out: &mut [f32]) {
        // torchvision's ToTensor + Normalize, in f32 and in this order, for each of the 256
        // values a channel can take: a table lookup gives the same bits as the arithmetic.
        let table: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / 255.0 - self.mean[c]) / self.std[c])
        });
        let plane = out.len() / 3;
        let (r, gb) = out.split_at_mut(plane);
        let (g, b) = gb.split_at_mut(plane);
        for (((px, r), g), b) in rgb.pixels().zip(r).zip(g).zip(b) {
            *r = table[0][usize::from(px[0])];
            *g = table[1][usize::from(px[1])];
            *b = table[2][usize::from(px[2])];
        }
    }

    /// Decodes encoded image bytes (JPEG, PNG, WebP, BMP, GIF, Netpbm, TIFF) with
    /// [`crate::decode_image_with_mode`] (as Pillow decodes them) and preprocesses them
    /// ([`Preprocess::resize_and_crop_decoded`]: palette images as Pillow resizes them). A
    /// truncated JPEG, an image over the decoder's limit (512 MiB decoded) and anything no
    /// decoder accepts are errors.
    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        let mut out = vec![0f32; self.values_per_image()];
        self.decode_into(bytes, &mut out)?;
        Ok(out)
    }

    /// [`Preprocess::decode`] into `out` (see [`Preprocess::apply_into`]).
    pub fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
        self.apply_decoded_into(&crate::decode_image_with_mode(bytes)?, out)
    }

    /// [`Preprocess::apply_into`] of a decoded image, resized as
    /// [`Preprocess::resize_and_crop_decoded`] resizes it (palette images as Pillow does).
    pub fn apply_decoded_into(
        &self,
        img: &crate::DecodedImage,
        out: &mut [f32],
    ) -> Result<(), String> {
        self.check_slot(out)?;
        self.write_normalized(&self.resize_and_crop_decoded(img), out);
        Ok(())
    }
}

/// A JSON file, errors naming it.
fn read_json(path: &Path) -> Result<serde_json::Value, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::format(path, format!("not JSON: {e}")))
}

/// Three numbers from a JSON array of three, or one number for all three channels (as
/// open_clip and transformers broadcast a scalar mean or std). Anything else in the array
/// (a string, a null) is an error, not left out.
fn three(v: &serde_json::Value) -> Result<[f32; 3], String> {
    let a: Option<Vec<f32>> = match v {
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect(),
        other => other.as_f64().map(|x| vec![x as f32; 3]),
    };
    let a = a
        .and_then(|a| <[f32; 3]>::try_from(a.as_slice()).ok())
        .ok_or_else(|| format!("expected three numbers, not {v}"))?;
    if a.iter().any(|x| !x.is_finite()) {
        return Err(format!("expected finite numbers, not {v}"));
    }
    Ok(a)
}

/// open_clip's `fill_color`: an integer 0-255 (a gray level, or a palette index).
fn fill_color(v: &serde_json::Value) -> Result<u8, String> {
    v.as_u64()
        .and_then(|f| u8::try_from(f).ok())
        .ok_or_else(|| format!("expected an integer from 0 to 255, not {v}"))
}

/// Three positive numbers (a standard deviation) from a JSON array.
fn three_positive(v: &serde_json::Value) -> Result<[f32; 3], String> {
    let a = three(v)?;
    if a.iter().any(|&x| x <= 0.0) {
        return Err(format!("a standard deviation must be positive, not {v}"));
    }
    Ok(a)
}
