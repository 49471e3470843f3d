//! Pillow's `Image.resize` for 8-bit RGB images, bit for bit.
//!
//! Both families of CLIP checkpoints resize with Pillow: open_clip through torchvision's
//! `Resize` on PIL images, `transformers` through its PIL image processors. Pillow resamples
//! in two separable passes (horizontal, then vertical) with fixed-point coefficients and
//! rounds to 8 bits between the passes, so a float resampler such as the `image` crate's
//! `CatmullRom` differs from it by a level or more on most pixels, and a level is 0.015 in a
//! normalised CLIP input. This is a port of `libImaging/Resample.c` (Pillow 13: the
//! filters, `precompute_coeffs`, `normalize_coeffs_8bpc` with 22 precision bits, the 8-bit
//! horizontal and vertical passes, and Pillow 13's choice of which pass runs first) rather than a crate because no crate reproduces
//! Pillow's rounding.

use image::{RgbImage, RgbaImage};

/// Pillow's resampling filters (`PIL.Image.Resampling`), with Pillow's numeric codes as
/// `transformers`' `preprocessor_config.json` stores them (`"resample": 3` is bicubic).
///
/// ```
/// use clipcid_data::Resample;
/// assert_eq!(Resample::from_pil_code(3).unwrap(), Resample::Bicubic);
/// assert_eq!(Resample::Bicubic.pil_code(), 3);
/// assert_eq!("bilinear".parse::<Resample>().unwrap(), Resample::Bilinear);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// `Image.NEAREST` (0): the source pixel under each output pixel's centre.
    Nearest,
    /// `Image.LANCZOS` (1): windowed sinc, support 3.
    Lanczos,
    /// `Image.BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// `Image.BICUBIC` (3): cubic convolution with a = -0.5, support 2 (CLIP's choice).
    Bicubic,
    /// `Image.BOX` (4): box filter, support 0.5.
    Box,
    /// `Image.HAMMING` (5): Hamming-windowed sinc, support 1.
    Hamming,
}

impl Resample {
    /// The filter with Pillow's code `code` (0 to 5).
    pub fn from_pil_code(code: i64) -> Result<Self, String> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => {
                return Err(format!(
                    "resample code {code} is not one of Pillow's (0 to 5)"
                ))
            }
        })
    }

    /// Pillow's code for this filter.
    pub fn pil_code(self) -> i64 {
        match self {
            Self::Nearest => 0,
            Self::Lanczos => 1,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
            Self::Box => 4,
            Self::Hamming => 5,
        }
    }

    /// The lower-case name open_clip and torchvision use (`"bicubic"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Nearest => "nearest",
            Self::Lanczos => "lanczos",
            Self::Bilinear => "bilinear",
            Self::Bicubic => "bicubic",
            Self::Box => "box",
            Self::Hamming => "hamming",
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

impl std::str::FromStr for Resample {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "nearest" => Self::Nearest,
            "lanczos" => Self::Lanczos,
            "bilinear" => Self::Bilinear,
            "bicubic" => Self::Bicubic,
            "box" => Self::Box,
            "hamming" => Self::Hamming,
            other => {
                return Err(format!(
                "unknown resampling filter `{other}` (nearest, lanczos, bilinear, bicubic, box, hamming)"
            ))
            }
        })
    }
}

impl std::fmt::Display for Resample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Fixed-point precision of Pillow's 8-bit coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One pass's coefficients: for each output index, the first source index, the number of
/// source samples, and `ksize` fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for output indices `start..start + count`
/// of a resize from `in_size` to `out_size` (Pillow computes all of them; each output's
/// coefficients depend on its own index only, so a window gives the same numbers).
fn coeffs(in_size: usize, out_size: usize, filter: Resample, start: usize, count: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(count);
    let mut weights = vec![0i32; count * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in (start..start + count).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negative values are clamped to 0 next.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let xmax = xmax.min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[i * ksize..(i + 1) * ksize];
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes `img` to `width` x `height` exactly as Pillow's `Image.resize((width, height),
/// filter)` does for an RGB image (no `box`, no `reducing_gap`: what torchvision and
/// `transformers` call). A size equal to the image's returns a copy.
///
/// ```
/// use clipcid_data::{pil_resize, Resample};
/// let img = image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([(40 * x) as u8, (60 * y) as u8, 7]));
/// let out = pil_resize(&img, 3, 2, Resample::Bicubic);
/// assert_eq!(out.dimensions(), (3, 2));
/// // Pillow 13: Image.fromarray(a).resize((3, 2), Image.BICUBIC) gives 22, 100, 178 in red.
/// let red: Vec<u8> = (0..3).map(|x| out.get_pixel(x, 0)[0]).collect();
/// assert_eq!(red, [22, 100, 178]);
/// ```
pub fn pil_resize(img: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    pil_resize_window(img, (width, height), filter, Window::full(width, height))
}

/// The `window` of [`pil_resize`]'s output, computed without the rest: bit for bit the full
/// resize cropped, with time and memory of the window. The window must lie inside the
/// resized image (it is clamped to it).
///
/// ```
/// use clipcid_data::{pil_resize, pil_resize_window, Resample, Window};
/// let img = image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([(25 * x) as u8, (30 * y) as u8, 9]));
/// let win = Window { x: 3, y: 2, width: 4, height: 5 };
/// let part = pil_resize_window(&img, (13, 11), Resample::Bicubic, win);
/// let full = pil_resize(&img, 13, 11, Resample::Bicubic);
/// let crop = image::imageops::crop_imm(&full, 3, 2, 4, 5).to_image();
/// assert_eq!(part, crop);
/// ```
pub fn pil_resize_window(
    img: &RgbImage,
    (width, height): (u32, u32),
    filter: Resample,
    window: Window,
) -> RgbImage {
    let win = clamp(window, width, height);
    let out = resize_window(
        img.as_raw(),
        3,
        img.dimensions(),
        (width, height),
        filter,
        win,
    );
    RgbImage::from_raw(win.width as u32, win.height as u32, out)
        .unwrap_or_else(|| RgbImage::new(win.width as u32, win.height as u32))
}

/// [`pil_resize`] for an RGBA image, as Pillow does it: colours premultiplied by alpha
/// (`RGBa`), resized, then divided back (what open_clip's `Resize` does to a transparent PNG
/// before it drops the alpha channel).
pub fn pil_resize_rgba(img: &RgbaImage, width: u32, height: u32, filter: Resample) -> RgbaImage {
    pil_resize_rgba_window(img, (width, height), filter, Window::full(width, height))
}

/// The `window` of [`pil_resize_rgba`]'s output (see [`pil_resize_window`]).
pub fn pil_resize_rgba_window(
    img: &RgbaImage,
    (width, height): (u32, u32),
    filter: Resample,
    window: Window,
) -> RgbaImage {
    let win = clamp(window, width, height);
    let dims = img.dimensions();
    let out = if dims == (width, height) || filter == Resample::Nearest {
        resize_window(img.as_raw(), 4, dims, (width, height), filter, win)
    } else {
        // Pillow's rgbA2rgba: MULDIV255 with rounding.
        let mut pre = img.as_raw().clone();
        for px in pre.chunks_exact_mut(4) {
            let a = u32::from(px[3]);
            for c in &mut px[..3] {
                let t = u32::from(*c) * a + 128;
                *c = (((t >> 8) + t) >> 8) as u8;
            }
        }
        let mut out = resize_window(&pre, 4, dims, (width, height), filter, win);
        // Pillow's rgba2rgbA: integer division, clipped.
        for px in out.chunks_exact_mut(4) {
            let a = u32::from(px[3]);
            if a != 0 && a != 255 {
                for c in &mut px[..3] {
                    *c = (255 * u32::from(*c) / a).min(255) as u8;
                }
            }
        }
        out
    };
    RgbaImage::from_raw(win.width as u32, win.height as u32, out)
        .unwrap_or_else(|| RgbaImage::new(win.width as u32, win.height as u32))
}

/// `window` clipped to a `width` x `height` image.
pub(crate) fn clamp(window: Window, width: u32, height: u32) -> Window {
    let (width, height) = (width as usize, height as usize);
    let x = window.x.min(width);
    let y = window.y.min(height);
    Window {
        x,
        y,
        width: window.width.min(width - x),
        height: window.height.min(height - y),
    }
}

/// A rectangle of a resized image: its top-left corner and size, in output pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Left column.
    pub x: usize,
    /// Top row.
    pub y: usize,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

impl Window {
    /// The whole of a `width` x `height` image.
    fn full(width: u32, height: u32) -> Self {
        Self {
            x: 0,
            y: 0,
            width: width as usize,
            height: height as usize,
        }
    }
}

/// The `window` of Pillow's resize of `src` to `width` x `height`, computed without the rest
/// of the resized image: each output pixel depends only on its own coefficients and on the
/// source pixels under them, so the window equals the full resize cropped, bit for bit, while
/// memory and time scale with the window (a 1 x 1,500,000 PNG is not resized to 224 x
/// 336,000,000 to keep 224 x 224 of it).
pub(crate) fn resize_window(
    src: &[u8],
    ch: usize,
    (w, h): (u32, u32),
    (width, height): (u32, u32),
    filter: Resample,
    win: Window,
) -> Vec<u8> {
    let (w, h, width, height) = (w as usize, h as usize, width as usize, height as usize);
    if win.width == 0 || win.height == 0 {
        return Vec::new();
    }
    if w == 0 || h == 0 {
        return vec![0; win.width * win.height * ch];
    }
    if filter == Resample::Nearest && (w, h) != (width, height) {
        return nearest(src, ch, (w, h), (width, height), win);
    }
    let hcoef = (width != w).then(|| coeffs(w, width, filter, win.x, win.width));
    let vcoef = (height != h).then(|| coeffs(h, height, filter, win.y, win.height));
    // The source rectangle the window reads (bounds grow monotonically with the index).
    let span = |c: &Option<Coeffs>, start: usize, len: usize| match c {
        Some(c) => {
            let last = c.bounds[c.bounds.len() - 1];
            (c.bounds[0].0, last.0 + last.1)
        }
        None => (start, start + len),
    };
    let (cx0, cx1) = span(&hcoef, win.x, win.width);
    let (cy0, cy1) = span(&vcoef, win.y, win.height);
    let sub_w = cx1 - cx0;
    let mut sub = Vec::with_capacity((cy1 - cy0) * sub_w * ch);
    for row in src.chunks_exact(w * ch).skip(cy0).take(cy1 - cy0) {
        sub.extend_from_slice(&row[cx0 * ch..cx1 * ch]);
    }
    // Pillow 13: when the height shrinks by more than twice what the width does, the
    // vertical pass runs first (Pillow 12 and older always start with the horizontal one).
    let (dh, dw) = (h as i64 - height as i64, w as i64 - width as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let horizontal = |img: Vec<u8>| match &hcoef {
        Some(c) => horizontal_pass(&img, ch, sub_w, c, cx0),
        None => img,
    };
    let vertical = |img: Vec<u8>, row_w: usize| match &vcoef {
        Some(c) => vertical_pass(&img, ch, row_w, c, cy0),
        None => img,
    };
    if horizontal_first {
        vertical(horizontal(sub), win.width)
    } else {
        horizontal(vertical(sub, sub_w))
    }
}

/// Pillow's 8-bit horizontal pass over rows of `w` pixels (`ch` channels) whose first column
/// is source column `first_col`, one output column per coefficient row.
fn horizontal_pass(src: &[u8], ch: usize, w: usize, horiz: &Coeffs, first_col: usize) -> Vec<u8> {
    let width = horiz.bounds.len();
    let rows = src.len() / (w * ch);
    let mut out = vec![0u8; rows * width * ch];
    for (orow, irow) in out
        .chunks_exact_mut(width * ch)
        .zip(src.chunks_exact(w * ch))
    {
        for (xx, opx) in orow.chunks_exact_mut(ch).enumerate() {
            let (xmin, xmax) = horiz.bounds[xx];
            let xmin = xmin - first_col;
            let k = &horiz.weights[xx * horiz.ksize..];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 4];
            for (x, &kx) in k.iter().enumerate().take(xmax) {
                let p = &irow[(x + xmin) * ch..(x + xmin + 1) * ch];
                for c in 0..ch {
                    ss[c] += i32::from(p[c]) * kx;
                }
            }
            for c in 0..ch {
                opx[c] = clip8(ss[c]);
            }
        }
    }
    out
}

/// Pillow's 8-bit vertical pass over rows of `w` pixels (`ch` channels) whose first row is
/// source row `first_row`.
fn vertical_pass(src: &[u8], ch: usize, w: usize, vert: &Coeffs, first_row: usize) -> Vec<u8> {
    let height = vert.bounds.len();
    let mut out = vec![0u8; height * w * ch];
    for (yy, orow) in out.chunks_exact_mut(w * ch).enumerate() {
        let (ymin, ymax) = vert.bounds[yy];
        let ymin = ymin - first_row;
        let k = &vert.weights[yy * vert.ksize..];
        for (xx, opx) in orow.chunks_exact_mut(ch).enumerate() {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 4];
            for (y, &ky) in k.iter().enumerate().take(ymax) {
                let i = ((y + ymin) * w + xx) * ch;
                for c in 0..ch {
                    ss[c] += i32::from(src[i + c]) * ky;
                }
            }
            for c in 0..ch {
                opx[c] = clip8(ss[c]);
            }
        }
    }
    out
}

/// Pillow's nearest-neighbour resize (`ImagingScaleAffine`), for `win` of the output: the
/// source index is the truncated running sum `scale / 2 + i * scale`, accumulated in `f64`
/// as Pillow does.
fn nearest(
    src: &[u8],
    ch: usize,
    (w, h): (usize, usize),
    (width, height): (usize, usize),
    win: Window,
) -> Vec<u8> {
    let positions = |n_in: usize, n_out: usize, start: usize, len: usize| -> Vec<usize> {
        let scale = n_in as f64 / n_out as f64;
        let mut pos = scale * 0.5;
        let mut out = Vec::with_capacity(len);
        for i in 0..start + len {
            if i >= start {
                out.push((pos as usize).min(n_in - 1));
            }
            pos += scale;
        }
        out
    };
    let xs = positions(w, width, win.x, win.width);
    let ys = positions(h, height, win.y, win.height);
    let mut out = Vec::with_capacity(win.width * win.height * ch);
    for &y in &ys {
        for &x in &xs {
            let i = (y * w + x) * ch;
            out.extend_from_slice(&src[i..i + ch]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for filter in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
        ] {
            for (a, b) in [(100, 37), (37, 100), (224, 224), (5, 1)] {
                let c = coeffs(a, b, filter, 0, b);
                for (i, &(_, n)) in c.bounds.iter().enumerate() {
                    let s: i64 = c.weights[i * c.ksize..i * c.ksize + n]
                        .iter()
                        .map(|&w| i64::from(w))
                        .sum();
                    assert!(
                        (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                        "{filter} {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 77]));
        for f in [Resample::Bicubic, Resample::Lanczos, Resample::Bilinear] {
            let out = pil_resize(&img, 11, 50, f);
            assert!(out.pixels().all(|p| p.0 == [200, 13, 77]), "{f}");
        }
    }
}
