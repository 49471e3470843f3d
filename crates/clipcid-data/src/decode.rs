//! Encoded image bytes to pixels, as Pillow decodes them.
//!
//! Every CLIP checkpoint was trained, and is evaluated by its owners, on images Pillow opened,
//! and Pillow decodes JPEG with libjpeg-turbo (its accurate integer IDCT and "fancy"
//! triangle-filter chroma upsampling). The `image` crate's JPEG decoder rounds differently: on
//! the photos that `benches/decode.rs` writes as 4:2:0 JPEGs, 13-15% of the values differ, by
//! up to 4 levels inside the image and up to 23 on a last row that is not a whole MCU, with a
//! per-channel bias of 0.1-0.4 levels. So JPEG goes through libjpeg-turbo itself (the
//! `turbojpeg` crate builds it from source and links it statically), which gives Pillow's
//! pixels bit for bit and decodes about 1.35x faster; CMYK JPEGs become RGB by Pillow's
//! arithmetic. What TurboJPEG refuses (YCCK JPEGs, and streams it reports a warning for,
//! which its API treats as errors) and every other format (PNG, WebP, BMP, GIF) go to the
//! `image` crate, as before.

use std::cell::RefCell;

use image::{DynamicImage, GrayImage, RgbImage};

/// The most bytes a decoded image may take (the `image` crate's default allocation limit).
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// Which decoders make the pixels, for outputs that depend on them to record: `clipcid
/// embed` keeps it in each shard's provenance, so shards decoded another way (by the `image`
/// crate's JPEG decoder, before this one) are not resumed into the same run.
pub const IMAGE_DECODER: &str =
    "JPEG by libjpeg-turbo, as Pillow decodes it; other formats by the image crate";

/// Decodes an encoded image (JPEG, PNG, WebP, BMP, GIF) into pixels, JPEG exactly as Pillow
/// decodes it (module doc). A truncated JPEG (no end-of-image marker after its last scan: a
/// decoder would fill the missing rows with grey and report success), an image of no pixels,
/// one over [`MAX_DECODED_BYTES`] decoded, and anything no decoder accepts are errors saying
/// so. A grayscale JPEG stays grayscale, as Pillow opens it (mode `L`).
///
/// ```
/// let mut bytes = Vec::new();
/// image::RgbImage::from_pixel(5, 3, image::Rgb([200, 30, 90]))
///     .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg)?;
/// let img = clipcid_data::decode_image(&bytes)?;
/// assert_eq!((img.width(), img.height()), (5, 3));
/// assert!(clipcid_data::decode_image(&bytes[..bytes.len() - 2])
///     .unwrap_err()
///     .contains("truncated JPEG"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, String> {
    check_jpeg_complete(bytes)?;
    if is_jpeg(bytes) {
        if let Some(img) = decode_jpeg(bytes)? {
            return Ok(img);
        }
    }
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has no pixels".into());
    }
    Ok(img)
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8])
}

thread_local! {
    /// One TurboJPEG handle per thread (decoding runs on rayon's threads), made on first use.
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
}

/// A JPEG through libjpeg-turbo: `Ok(None)` where TurboJPEG cannot give its pixels (its
/// header reader or decoder refuses the stream, or the colour space is YCCK), for the `image`
/// crate to try; an error for an image too large to decode.
fn decode_jpeg(bytes: &[u8]) -> Result<Option<DynamicImage>, String> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = turbojpeg::Decompressor::new().ok();
        }
        let Some(decompressor) = slot.as_mut() else {
            return Ok(None);
        };
        // A TurboJPEG handle can stay broken after a failure (a bad marker in a header makes
        // every later header read on it fail the same way), so a failed one is dropped and
        // the thread's next image gets a fresh handle.
        let Ok(header) = decompressor.read_header(bytes) else {
            *slot = None;
            return Ok(None);
        };
        let (format, channels) = match header.colorspace {
            turbojpeg::Colorspace::Gray => (turbojpeg::PixelFormat::GRAY, 1),
            turbojpeg::Colorspace::YCbCr | turbojpeg::Colorspace::RGB => {
                (turbojpeg::PixelFormat::RGB, 3)
            }
            turbojpeg::Colorspace::CMYK => (turbojpeg::PixelFormat::CMYK, 4),
            _ => return Ok(None),
        };
        let (width, height) = (header.width, header.height);
        if width == 0 || height == 0 {
            return Err("image has no pixels".into());
        }
        let size = width as u64 * height as u64 * channels as u64;
        if size > MAX_DECODED_BYTES {
            return Err(format!(
                "cannot decode image: a {width} x {height} JPEG takes {} MiB decoded, over the limit of {} MiB",
                size >> 20,
                MAX_DECODED_BYTES >> 20
            ));
        }
        let mut pixels = vec![0u8; size as usize];
        let image = turbojpeg::Image {
            pixels: pixels.as_mut_slice(),
            width,
            pitch: width * channels,
            height,
            format,
        };
        if decompressor.decompress(bytes, image).is_err() {
            *slot = None;
            return Ok(None);
        }
        let (w, h) = (width as u32, height as u32);
        Ok(match channels {
            1 => GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
            3 => RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
            _ => RgbImage::from_raw(w, h, pillow_cmyk_to_rgb(&pixels)).map(DynamicImage::ImageRgb8),
        })
    })
}

/// A CMYK JPEG's stored values as RGB, as Pillow computes them: it reads CMYK JPEG values as
/// inverted ("CMYK;I", Adobe's convention, which Pillow also writes), and `convert("RGB")`
/// takes each channel to `(255 - k) - (255 - k) c / 255`, rounded as its `MULDIV255`.
fn pillow_cmyk_to_rgb(stored: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    stored
        .chunks_exact(4)
        .flat_map(|px| {
            let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| u32::from(255 - v));
            let nk = 255 - k;
            [c, m, y].map(|v| (nk - muldiv255(v, nk)) as u8)
        })
        .collect()
}

/// A JPEG must end its last scan (`FF DA` marker) with an end-of-image marker (`FF D9`);
/// inside entropy-coded data an `FF` byte is always followed by `00` or a restart marker, so
/// neither pair can appear there. Thumbnails in APP segments come before the main scan.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), String> {
    if !is_jpeg(bytes) {
        return Ok(());
    }
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let Some(scan) = last_scan else {
        return Err("cannot decode image: JPEG has no image data (no start-of-scan marker)".into());
    };
    if !bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(format!(
            "cannot decode image: truncated JPEG, no end-of-image marker after the last scan ({} bytes)",
            bytes.len()
        ));
    }
    Ok(())
}
