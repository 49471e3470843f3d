//! TIFF images, the kinds whose pixels here are Pillow's bit for bit, and a clear refusal of
//! the others.
//!
//! Pillow opens a TIFF by a table of its tags (`TiffImagePlugin.OPEN_INFO`: photometric
//! interpretation, sample format, fill order, bits per sample, extra samples) and decodes it
//! with libtiff. The `tiff` crate decodes the strips and tiles (no compression, LZW, Deflate,
//! PackBits, with or without a horizontal predictor); this module reads the same tags and
//! takes the kinds the fixtures check against Pillow (`tests/pillow_formats.rs`):
//!
//! - gray, 8 bits (`L`; white-is-zero inverted, as Pillow's `L;I`), 1 bit (`1`), 16 bits
//!   (`I;16`: its high byte, as 16-bit grayscale PNGs here; Pillow's conversion clips it to
//!   white);
//! - gray with unassociated alpha, 8 bits (`LA`);
//! - RGB, 8 bits, and RGB with unassociated alpha (`RGBA`; a fourth sample the file does not
//!   describe is alpha too, as in Pillow's table);
//! - CMYK, 8 bits (`CMYK`, converted to RGB by Pillow's arithmetic).
//!
//! Everything else is an error that names what the file holds: palettes (which the `tiff`
//! crate does not read), YCbCr and Lab, premultiplied alpha, floats and signed samples, 2 and 4
//! bits a sample, separate planes, the reversed fill order, and JPEG or fax compression
//! (their pixels would be another decoder's, not libtiff's and libjpeg's).

use std::io::Cursor;

use image::{DynamicImage, GrayAlphaImage, GrayImage, RgbImage, RgbaImage};
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::Tag;

use crate::decode::{
    over_decoded_limit, pillow_cmyk_to_rgb, unpack_bits, DecodedImage, PillowMode,
    MAX_DECODED_BYTES,
};

/// Whether the bytes start as a TIFF does (`II*\0` or `MM\0*`; BigTIFF's 43 as well).
pub(crate) fn is_tiff(bytes: &[u8]) -> bool {
    matches!(
        bytes.get(..4),
        Some(b"II*\0" | b"MM\0*" | b"II+\0" | b"MM\0+")
    )
}

/// What Pillow opens, among the kinds read here.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Bilevel,
    Gray,
    Gray16,
    GrayAlpha,
    Rgb,
    Rgba,
    Cmyk,
}

fn refuse(what: impl std::fmt::Display) -> String {
    format!("cannot decode image: TIFF {what} is not read here (clipcid reads 8-bit gray, gray with alpha, RGB, RGBA and CMYK, and 1-bit and 16-bit gray, uncompressed or LZW, Deflate or PackBits)")
}

fn tiff_error(e: tiff::TiffError) -> String {
    format!("cannot decode image: TIFF: {e}")
}

/// Decodes the first image of a TIFF file as Pillow opens it (module doc).
pub(crate) fn decode_tiff(bytes: &[u8]) -> Result<DecodedImage, String> {
    let mut limits = Limits::default();
    limits.decoding_buffer_size = MAX_DECODED_BYTES as usize;
    let mut decoder = Decoder::new(Cursor::new(bytes))
        .map_err(tiff_error)?
        .with_limits(limits);
    let mut tag = |t: Tag| decoder.find_tag_unsigned_vec::<u32>(t).map_err(tiff_error);
    let photometric = tag(Tag::PhotometricInterpretation)?.and_then(|v| v.first().copied());
    let bits = tag(Tag::BitsPerSample)?.unwrap_or_else(|| vec![1]);
    let samples = tag(Tag::SamplesPerPixel)?
        .and_then(|v| v.first().copied())
        .unwrap_or(1);
    let extra = tag(Tag::ExtraSamples)?.unwrap_or_default();
    let format = tag(Tag::SampleFormat)?.unwrap_or_default();
    let fill_order = tag(Tag::FillOrder)?.and_then(|v| v.first().copied());
    let compression = tag(Tag::Compression)?
        .and_then(|v| v.first().copied())
        .unwrap_or(1);
    let planar = tag(Tag::PlanarConfiguration)?.and_then(|v| v.first().copied());

    // LZW, Deflate (both codes), PackBits, none: lossless, so any decoder gives libtiff's.
    if !matches!(compression, 1 | 5 | 8 | 32946 | 32773) {
        let name = match compression {
            6 | 7 => "JPEG",
            2..=4 => "CCITT fax",
            _ => "another",
        };
        return Err(refuse(format!("with {name} compression ({compression})")));
    }
    if fill_order.is_some_and(|f| f != 1) {
        return Err(refuse("with the reversed fill order"));
    }
    if samples > 1 && planar == Some(2) {
        return Err(refuse("with separate planes"));
    }
    if format.iter().any(|&f| f != 1) {
        return Err(refuse(format!(
            "with sample format {format:?} (not unsigned integers)"
        )));
    }
    let depth = bits.first().copied().unwrap_or(1);
    if bits.iter().any(|&b| b != depth) {
        return Err(refuse(format!("with {bits:?} bits a sample")));
    }
    let kind = match (photometric, samples, depth, extra.as_slice()) {
        (Some(0 | 1), 1, 1, []) => Kind::Bilevel,
        (Some(0 | 1), 1, 8, []) => Kind::Gray,
        (Some(1), 1, 16, []) => Kind::Gray16,
        (Some(1), 2, 8, [2]) => Kind::GrayAlpha,
        (Some(2), 3, 8, []) => Kind::Rgb,
        (Some(2), 4, 8, [] | [2]) => Kind::Rgba,
        (Some(5), 4, 8, []) => Kind::Cmyk,
        (Some(3), ..) => return Err(refuse("with a palette")),
        (Some(6), ..) => return Err(refuse("in YCbCr")),
        (_, _, _, [1, ..]) => return Err(refuse("with premultiplied alpha")),
        (p, ..) => {
            return Err(refuse(format!(
                "with photometric interpretation {}, {samples} samples of {depth} bits and extra samples {extra:?}",
                p.map_or("none".to_string(), |p| p.to_string())
            )))
        }
    };
    let (width, height) = decoder.dimensions().map_err(tiff_error)?;
    if width == 0 || height == 0 {
        return Err("image has no pixels".into());
    }
    let decoded_bytes =
        u64::from(width) * u64::from(height) * u64::from(samples) * u64::from(depth.div_ceil(8));
    if decoded_bytes > MAX_DECODED_BYTES {
        return Err(over_decoded_limit(width, height));
    }
    let data = decoder.read_image().map_err(tiff_error)?;
    let (w, h) = (width as usize, height as usize);
    let short = || "cannot decode image: TIFF data does not fill the image".to_string();
    let u8s = |data: DecodingResult| match data {
        DecodingResult::U8(v) => Ok(v),
        _ => Err(short()),
    };
    let (image, mode) = match kind {
        Kind::Bilevel => {
            // Rows of packed bits, each padded to a byte; the `tiff` crate has inverted a
            // white-is-zero image, so a 1 is white either way.
            let pixels = unpack_bits(&u8s(data)?, w, h, 255).ok_or_else(short)?;
            let image = GrayImage::from_raw(width, height, pixels).ok_or_else(short)?;
            (DynamicImage::ImageLuma8(image), PillowMode::Bilevel)
        }
        Kind::Gray16 => {
            let DecodingResult::U16(v) = data else {
                return Err(short());
            };
            let high = v.iter().map(|s| (s >> 8) as u8).collect();
            let image = GrayImage::from_raw(width, height, high).ok_or_else(short)?;
            (DynamicImage::ImageLuma8(image), PillowMode::Direct)
        }
        Kind::Gray => (
            DynamicImage::ImageLuma8(
                GrayImage::from_raw(width, height, u8s(data)?).ok_or_else(short)?,
            ),
            PillowMode::Direct,
        ),
        Kind::GrayAlpha => (
            DynamicImage::ImageLumaA8(
                GrayAlphaImage::from_raw(width, height, u8s(data)?).ok_or_else(short)?,
            ),
            PillowMode::Direct,
        ),
        Kind::Rgb => (
            DynamicImage::ImageRgb8(
                RgbImage::from_raw(width, height, u8s(data)?).ok_or_else(short)?,
            ),
            PillowMode::Direct,
        ),
        Kind::Rgba => (
            DynamicImage::ImageRgba8(
                RgbaImage::from_raw(width, height, u8s(data)?).ok_or_else(short)?,
            ),
            PillowMode::Direct,
        ),
        Kind::Cmyk => {
            let cmyk = u8s(data)?;
            if cmyk.len() != w * h * 4 {
                return Err(short());
            }
            let rgb =
                RgbImage::from_raw(width, height, pillow_cmyk_to_rgb(&cmyk)).ok_or_else(short)?;
            (DynamicImage::ImageRgb8(rgb), PillowMode::Cmyk(cmyk))
        }
    };
    Ok(DecodedImage { image, mode })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian TIFF of one 8-bit gray strip: its directory (the tags given, sorted,
    /// each a SHORT or LONG value held in the entry), then `data`.
    fn gray_tiff(width: u32, height: u32, extra_tags: &[(u16, u32)], data: &[u8]) -> Vec<u8> {
        let mut tags = vec![
            (256, width),
            (257, height),
            (258, 8),
            (259, 1),
            (262, 1),
            (277, 1),
            (278, height),
            (279, data.len() as u32),
        ];
        tags.extend_from_slice(extra_tags);
        let data_at = 8 + 2 + (tags.len() as u32 + 1) * 12 + 4;
        tags.push((273, data_at));
        tags.sort_unstable();
        let mut out = b"II*\0\x08\0\0\0".to_vec();
        out.extend((tags.len() as u16).to_le_bytes());
        for (tag, value) in tags {
            out.extend(tag.to_le_bytes());
            out.extend(4u16.to_le_bytes()); // LONG
            out.extend(1u32.to_le_bytes());
            out.extend(value.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_hand_made_gray_strip_decodes_and_its_variants_are_refused() {
        let img = decode_tiff(&gray_tiff(3, 2, &[], &[0, 1, 2, 3, 4, 255])).unwrap();
        assert_eq!(img.image.into_bytes(), [0, 1, 2, 3, 4, 255]);
        assert_eq!(img.mode, PillowMode::Direct);
        let refused = |tags: &[(u16, u32)], want: &str| {
            let e = decode_tiff(&gray_tiff(3, 2, tags, &[0; 6])).unwrap_err();
            assert!(e.contains(want), "{tags:?}: {e}");
        };
        refused(&[(266, 2)], "reversed fill order");
        refused(&[(339, 2)], "sample format [2]");
        refused(&[(317, 3)], "floating point predictor");
        // Sizes past the decoded-image limit are refused before any pixel is read.
        let e = decode_tiff(&gray_tiff(100_000, 100_000, &[], &[0; 6])).unwrap_err();
        assert!(e.contains("over the 536870912-byte limit"), "{e}");
        let e = decode_tiff(&gray_tiff(3, 4, &[], &[0; 6])).unwrap_err();
        assert!(e.contains("TIFF"), "{e}");
    }
}
