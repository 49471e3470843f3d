//! Netpbm images (PBM, PGM, PPM: `P1` to `P6`) as Pillow's `PpmImagePlugin` reads them.
//!
//! Written here rather than taken from the `image` crate's `pnm` codec because the two read
//! different pixels: where the maximum value is not 255 (or 65535), the `image` crate scales
//! each sample in f32 and rounds halves away from zero, and keeps 16-bit RGB as 16 bits,
//! while Pillow scales in f64 and rounds halves to even (`round(v / maxval * 255)`: a sample
//! of 1 under a maximum of 6 is 42 in Pillow, 43 there), scales 16-bit RGB to 8 bits the same
//! way, and refuses a plain sample over the maximum. The header is read by Pillow's rules
//! too: a token ends at whitespace, `#` starts a comment to the end of the line (even inside a
//! token), a token of more than 10 characters is refused, and exactly one whitespace byte
//! ends the header of a raw image.

use image::{DynamicImage, GrayImage, RgbImage};

use crate::decode::{over_decoded_limit, unpack_bits, DecodedImage, PillowMode, MAX_DECODED_BYTES};

/// Pillow's whitespace in these files (`b_whitespace`): space, tab, LF, VT, FF, CR.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Whether Pillow would read these bytes as a Netpbm file (its `_accept`: `P` and one of
/// `0123456fy`).
pub(crate) fn is_pnm(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == b'P' && b"0123456fy".contains(&bytes[1])
}

/// What Pillow makes of the file's kind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `1`: `P1` (plain) and `P4` (raw), a bit a pixel, 1 black.
    Bilevel,
    /// `L`: `P2`, `P5` (`I` above a maximum of 255).
    Gray,
    /// `RGB`: `P3`, `P6`.
    Rgb,
}

impl Kind {
    fn channels(self) -> usize {
        if self == Kind::Rgb {
            3
        } else {
            1
        }
    }
}

/// A cursor over the file, reading its header as Pillow's `PpmImageFile` does.
struct Header<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Header<'_> {
    fn next(&mut self) -> Option<u8> {
        let b = self.bytes.get(self.at).copied();
        self.at += usize::from(b.is_some());
        b
    }

    /// Pillow's `_read_magic`: up to 6 bytes, ended (and consumed) by whitespace.
    fn magic(&mut self) -> Vec<u8> {
        let mut magic = Vec::new();
        for _ in 0..6 {
            match self.next() {
                Some(c) if !is_space(c) => magic.push(c),
                _ => break,
            }
        }
        magic
    }

    /// Pillow's `_read_token`: whitespace before it skipped, a comment (from `#` to CR, LF or
    /// the end) skipped wherever it starts, ended and consumed by one whitespace byte.
    fn token(&mut self, what: &str) -> Result<Vec<u8>, String> {
        let mut token = Vec::new();
        while token.len() <= 10 {
            let Some(c) = self.next() else { break };
            if is_space(c) {
                if token.is_empty() {
                    continue;
                }
                break;
            }
            if c == b'#' {
                while self.next().is_some_and(|c| c != b'\r' && c != b'\n') {}
                continue;
            }
            token.push(c);
        }
        if token.is_empty() {
            return Err(format!(
                "cannot decode image: Netpbm header ends before its {what}"
            ));
        }
        if token.len() > 10 {
            return Err(format!(
                "cannot decode image: Netpbm header's {what} is more than 10 characters"
            ));
        }
        Ok(token)
    }

    fn number(&mut self, what: &str) -> Result<u64, String> {
        let token = self.token(what)?;
        parse_decimal(&token).ok_or_else(|| {
            format!(
                "cannot decode image: Netpbm header's {what} `{}` is not a number",
                String::from_utf8_lossy(&token)
            )
        })
    }
}

/// A token of ASCII digits (at most 10, so it fits), with an optional `+` as Python's `int`
/// takes it; `None` for anything else (a sign `-` included: no size or sample is negative).
fn parse_decimal(token: &[u8]) -> Option<u64> {
    let digits = token.strip_prefix(b"+").unwrap_or(token);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// Pillow's scaling of a sample to the mode's range: `round(v / maxval * out_max)`, in f64
/// with halves to even, as Python's `round`.
fn scale(value: u64, maxval: u64, out_max: u64) -> u64 {
    ((value as f64) / (maxval as f64) * (out_max as f64)).round_ties_even() as u64
}

/// Decodes a Netpbm file as Pillow does (module doc). A gray image with a maximum over 255
/// (Pillow's mode `I`) becomes the high byte of its samples scaled to 16 bits, as 16-bit
/// PNGs do here (Pillow's own conversion to RGB clips every value over 255 to white).
pub(crate) fn decode_pnm(bytes: &[u8]) -> Result<DecodedImage, String> {
    let mut header = Header { bytes, at: 0 };
    let magic = header.magic();
    let (kind, plain) = match magic.as_slice() {
        b"P1" => (Kind::Bilevel, true),
        b"P2" => (Kind::Gray, true),
        b"P3" => (Kind::Rgb, true),
        b"P4" => (Kind::Bilevel, false),
        b"P5" => (Kind::Gray, false),
        b"P6" => (Kind::Rgb, false),
        other => {
            return Err(format!(
                "cannot decode image: Netpbm kind `{}` is not supported (P1 to P6 are)",
                String::from_utf8_lossy(other)
            ))
        }
    };
    let width = header.number("width")?;
    let height = header.number("height")?;
    if width == 0 || height == 0 {
        return Err("image has no pixels".into());
    }
    let maxval = if kind == Kind::Bilevel {
        1
    } else {
        let maxval = header.number("maximum value")?;
        if !(1..65536).contains(&maxval) {
            return Err(format!(
                "cannot decode image: Netpbm maximum value {maxval} is not between 1 and 65535"
            ));
        }
        maxval
    };
    let samples = width
        .checked_mul(height)
        .and_then(|n| n.checked_mul(kind.channels() as u64))
        .filter(|&n| n <= MAX_DECODED_BYTES)
        .ok_or_else(|| over_decoded_limit(width, height))? as usize;
    let data = &bytes[header.at.min(bytes.len())..];
    let short = || {
        format!(
            "cannot decode image: Netpbm image data ends early ({} bytes for {width} x {height})",
            data.len()
        )
    };
    // Gray above a maximum of 255 is Pillow's `I`, scaled to 16 bits; then its high byte.
    let out_max: u64 = if kind == Kind::Gray && maxval > 255 {
        65535
    } else {
        255
    };
    let to_byte = |v: u64| {
        if out_max == 255 {
            v as u8
        } else {
            (v >> 8) as u8
        }
    };
    let pixels: Vec<u8> = match (kind, plain) {
        // Rows of packed bits, each padded to a byte; a 1 is black.
        (Kind::Bilevel, false) => {
            unpack_bits(data, width as usize, height as usize, 0).ok_or_else(short)?
        }
        (Kind::Bilevel, true) => {
            // Every byte but whitespace and comments is one pixel, `0` or `1`. (Each sample of
            // plain data takes a byte at least, so the data's length bounds what is reserved,
            // whatever size the header claims.)
            let mut pixels = Vec::with_capacity(samples.min(data.len()));
            for c in without_comments(data).into_iter().filter(|&c| !is_space(c)) {
                if pixels.len() == samples {
                    break;
                }
                pixels.push(match c {
                    b'0' => 255,
                    b'1' => 0,
                    _ => {
                        return Err(format!(
                            "cannot decode image: plain PBM data holds `{}`, not 0 or 1",
                            char::from(c).escape_default()
                        ))
                    }
                });
            }
            if pixels.len() < samples {
                return Err(short());
            }
            pixels
        }
        (_, true) => {
            let text = without_comments(data);
            let mut pixels = Vec::with_capacity(samples.min(data.len()));
            for token in text.split(|&c| is_space(c)).filter(|t| !t.is_empty()) {
                if pixels.len() == samples {
                    break;
                }
                if token.len() > 10 {
                    return Err(format!(
                        "cannot decode image: plain Netpbm sample `{}...` is more than 10 characters",
                        String::from_utf8_lossy(&token[..11])
                    ));
                }
                let value = parse_decimal(token).ok_or_else(|| {
                    format!(
                        "cannot decode image: plain Netpbm sample `{}` is not a number",
                        String::from_utf8_lossy(token)
                    )
                })?;
                if value > maxval {
                    return Err(format!(
                        "cannot decode image: plain Netpbm sample {value} is over the maximum value {maxval}"
                    ));
                }
                pixels.push(to_byte(scale(value, maxval, out_max)));
            }
            if pixels.len() < samples {
                return Err(short());
            }
            pixels
        }
        (_, false) => {
            let wide = maxval > 255;
            let size = if wide { 2 } else { 1 };
            let raw = data.get(..samples * size).ok_or_else(short)?;
            if maxval == 255 {
                raw.to_vec()
            } else {
                raw.chunks_exact(size)
                    .map(|s| {
                        let v = if wide {
                            u64::from(u16::from_be_bytes([s[0], s[1]]))
                        } else {
                            u64::from(s[0])
                        };
                        // Pillow's raw decoder clamps a sample over the maximum.
                        to_byte(scale(v, maxval, out_max).min(out_max))
                    })
                    .collect()
            }
        }
    };
    let (w, h) = (width as u32, height as u32);
    let image = if kind == Kind::Rgb {
        RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
    } else {
        GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
    }
    .ok_or_else(short)?;
    Ok(DecodedImage {
        image,
        mode: if kind == Kind::Bilevel {
            PillowMode::Bilevel
        } else {
            PillowMode::Direct
        },
    })
}

/// Plain data with its comments taken out: from `#` to the next CR or LF, that byte included
/// (Pillow's `_ignore_comments`).
fn without_comments(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut in_comment = false;
    for &c in data {
        if in_comment {
            in_comment = c != b'\r' && c != b'\n';
        } else if c == b'#' {
            in_comment = true;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(bytes: &[u8]) -> Vec<u8> {
        match decode_pnm(bytes) {
            Ok(d) => d.image.into_bytes(),
            Err(e) => panic!("{e}"),
        }
    }

    fn error(bytes: &[u8]) -> String {
        match decode_pnm(bytes) {
            Ok(_) => panic!("decoded {:?}", String::from_utf8_lossy(bytes)),
            Err(e) => e,
        }
    }

    /// Python's `round(v / maxval * 255)`, halves to even, where f32 with halves away from
    /// zero (the `image` crate's) gives 43, 128 and 213. Every expected value here is what
    /// Pillow 13 gives for the same bytes, and every refused file is one Pillow refuses.
    #[test]
    fn samples_scale_as_pythons_round() {
        assert_eq!(pixels(b"P5 3 1 6\n\x01\x03\x05"), [42, 128, 212]);
        assert_eq!(pixels(b"P2 3 1 6\n1 3 5\n"), [42, 128, 212]);
        // A raw sample over the maximum is clamped; a plain one is refused.
        assert_eq!(pixels(b"P5 2 1 6\n\x06\x09"), [255, 255]);
        assert!(error(b"P2 2 1 6\n6 9\n").contains("sample 9 is over the maximum value 6"));
        // 16-bit RGB scales to 8 bits (round(v / 257) at 65535), not the high byte.
        assert_eq!(
            pixels(b"P6 1 1 65535\n\x00\x80\x80\x80\xff\xff"),
            [0, 128, 255]
        );
        // 16-bit gray (Pillow's `I`) scales to 16 bits (500 of 1000 is 32768, half to
        // even), then its high byte.
        assert_eq!(pixels(b"P5 2 1 1000\n\x01\xf4\x03\xe8"), [128, 255]);
        assert_eq!(pixels(b"P5 2 1 65535\n\x12\x34\xff\x00"), [0x12, 0xff]);
    }

    #[test]
    fn headers_are_read_by_pillows_token_rules() {
        // Comments between tokens, and one that splits a token: `2#...\n55` is 255.
        assert_eq!(
            pixels(b"P5\n# a comment\n2 1\n2#split\n55\n\x07\xff"),
            [7, 255]
        );
        // One whitespace byte ends a raw header: the next byte is a sample, even a space.
        assert_eq!(pixels(b"P5 2 1 255\n  "), [b' ', b' ']);
        assert_eq!(pixels(b"P5 2 1 255\r\n\x01"), [b'\n', 1]);
        // Bits, a 1 black, rows padded to a byte; plain bits with or without spaces.
        assert_eq!(pixels(b"P4 3 2\n\xa0\x40"), [0, 255, 0, 255, 0, 255]);
        assert_eq!(
            pixels(b"P1 3 2 101\n0 # x\n1 0\n"),
            [0, 255, 0, 255, 0, 255]
        );
        let bilevel = decode_pnm(b"P4 1 1\n\x00").map(|d| d.mode);
        assert_eq!(bilevel, Ok(PillowMode::Bilevel));
        assert!(is_pnm(b"P6") && is_pnm(b"Pf") && !is_pnm(b"PK\x03\x04") && !is_pnm(b"P"));
    }

    #[test]
    fn damaged_or_unsupported_files_are_refused_saying_why() {
        let cases: [(&[u8], &str); 10] = [
            (
                b"P6 2 2 255\n\x00\x00\x00",
                "data ends early (3 bytes for 2 x 2)",
            ),
            (b"P3 1 1 255\n1 2\n", "data ends early"),
            (b"P1 2 1 0\n", "data ends early"),
            (b"P4 9 1\n\x00", "data ends early"),
            (b"P6 2 2", "header ends before its maximum value"),
            (
                b"P5 2 1 0\n\x00\x00",
                "maximum value 0 is not between 1 and 65535",
            ),
            (b"P5 x 1 255\n\x00", "width `x` is not a number"),
            (
                b"P5 12345678901 1 255\n",
                "width is more than 10 characters",
            ),
            (b"P7\nWIDTH 1\n", "Netpbm kind `P7` is not supported"),
            (b"P5 100000 100000 255\n", "over the 536870912-byte limit"),
        ];
        for (bytes, want) in cases {
            let e = error(bytes);
            assert!(
                e.contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(error(b"P5 0 1 255\n"), "image has no pixels");
        assert!(error(b"P1 2 1\n0 2\n").contains("holds `2`, not 0 or 1"));
        assert!(error(b"P2 1 1 255\n-1\n").contains("sample `-1` is not a number"));
    }
}
