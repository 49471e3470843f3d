//! Encoded image bytes to pixels, as Pillow decodes them.
//!
//! Every CLIP checkpoint was trained, and is evaluated by its owners, on images Pillow opened,
//! and Pillow decodes JPEG with libjpeg-turbo (its accurate integer IDCT and "fancy"
//! triangle-filter chroma upsampling). The `image` crate's JPEG decoder rounds differently: on
//! the photos that `benches/decode.rs` writes as 4:2:0 JPEGs, 13-15% of the values differ, by
//! up to 4 levels inside the image and up to 23 on a last row that is not a whole MCU, with a
//! per-channel bias of 0.1-0.4 levels. So JPEG goes through libjpeg-turbo itself (the
//! `turbojpeg` crate builds it from source and links it statically), which gives Pillow's
//! pixels bit for bit and decodes about 1.35x faster; CMYK and YCCK JPEGs become RGB by
//! Pillow's arithmetic, and arithmetic-coded and 8-bit lossless JPEGs (which the `image`
//! crate cannot read) decode as Pillow decodes them. Damage libjpeg decodes through
//! (extraneous bytes before a marker, a bad Huffman code: its warnings) keeps libjpeg's
//! pixels, as Pillow keeps them. A JPEG of other than 8-bit samples (12-bit, 16-bit lossless)
//! is an error saying so: Pillow refuses them ("cannot handle 12-bit layers"). What
//! libjpeg-turbo cannot decode (fatal errors) and every other format (PNG, WebP, BMP, GIF)
//! go to the `image` crate, whose pixels are Pillow's for 8-bit samples
//! (lossy WebP included); 16-bit samples become their high byte, as Pillow reads them. Netpbm
//! files (PBM, PGM, PPM) are read by clipcid's own reader of Pillow's rules, whose scaling of
//! samples differs from the `image` crate's (`pnm.rs`); TIFF by the `tiff` crate, the kinds
//! whose pixels are Pillow's (8-bit gray, gray and alpha, RGB, RGBA, CMYK; 1-bit and 16-bit
//! gray; lossless compression), the others refused saying what they hold (`tif.rs`). Pillow
//! also resizes the images it opens as palette or bilevel images by nearest neighbour, which
//! matters to open_clip's transform, as do a palette's entries and a CMYK JPEG's CMYK values
//! (open_clip resizes and pads before it converts to RGB): [`DecodedImage::mode`] keeps them.

use std::cell::RefCell;

use image::{DynamicImage, GrayImage, RgbImage};

/// The most bytes a decoded image may take (the `image` crate's default allocation limit).
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// Which decoders make the pixels, for outputs that depend on them to record: `clipcid
/// embed` keeps it in each shard's provenance, so shards decoded another way (by the `image`
/// crate's JPEG decoder, before this one, or with YCCK JPEGs and JPEGs libjpeg warns about
/// left to it, or 16-bit PNGs rounded, or palette images resized as photos, or CMYK JPEGs
/// resized as RGB, or Netpbm and TIFF files not read at all) are not resumed into the same
/// run.
pub const IMAGE_DECODER: &str =
    "JPEG (YCCK and warnings included) by libjpeg-turbo, as Pillow decodes it; \
     Netpbm (PBM, PGM, PPM) by Pillow's rules; TIFF by the tiff crate, Pillow's modes; \
     other formats by the image crate, 16-bit samples to their high byte; palette and bilevel \
     images (Pillow's modes, a gray-ramp GIF as L) and CMYK JPEGs resized as Pillow resizes them";

/// Decodes an encoded image (JPEG, PNG, WebP, BMP, GIF, Netpbm's PBM, PGM and PPM, and TIFF)
/// into the pixels Pillow gives (module doc; 16-bit grayscale PNGs, PGMs and TIFFs are the one
/// exception, their high byte where Pillow clips). A
/// truncated JPEG (no end-of-image marker after its last scan: a decoder would fill the
/// missing rows with grey and report success), a JPEG of other than 8-bit samples (which
/// Pillow refuses), an image of no pixels, one over [`MAX_DECODED_BYTES`] decoded, and
/// anything no decoder accepts (a TIFF of a kind not read here: module doc) are errors saying
/// so. A
/// grayscale JPEG stays grayscale, as Pillow opens it (mode `L`).
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
    decode_image_with_mode(bytes).map(|d| d.image)
}

/// An image as [`decode_image`] gives it, with what else of Pillow's reading of it changes
/// pixels downstream ([`DecodedImage::mode`]).
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// The pixels: a palette expanded to RGB (RGBA where an entry is transparent), 16-bit
    /// samples to their high byte, CMYK converted to RGB, as Pillow's `convert` gives them.
    pub image: DynamicImage,
    /// How Pillow holds the image before it converts it to RGB, where that is not `image`
    /// itself: a transform that resizes or pads before it converts (open_clip's) works on
    /// those values ([`crate::Preprocess::resize_and_crop_decoded`]).
    pub mode: PillowMode,
}

/// How Pillow opens an image, as far as it changes pixels that are resized or padded before
/// the conversion to RGB (open_clip's transform does both before `convert("RGB")`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PillowMode {
    /// `RGB`, `RGBA`, `L`, `LA` (16-bit samples read as 8): what [`DecodedImage::image`]
    /// holds.
    #[default]
    Direct,
    /// `P`, a palette image (a palette PNG, a GIF whose palette is not the gray ramp, a BMP
    /// of 8 bits or fewer whose palette is not gray levels in order): its palette's RGB
    /// entries. `Image.resize` resizes it by nearest neighbour whatever filter is asked, and
    /// padding fills palette indices (an index past the palette is black).
    Palette(Vec<[u8; 3]>),
    /// `1`, a bilevel image (a 1-bit grayscale PNG, a BMP with the palette black, white, a PBM):
    /// resized by nearest neighbour; padding with any value but 0 is white.
    Bilevel,
    /// `CMYK` (a CMYK or YCCK JPEG): its C, M, Y, K values as Pillow holds them, four a
    /// pixel, row by row. Resized in CMYK, the conversion to RGB after it gives other pixels
    /// than the RGB image resized (up to 14 levels on a 21 x 17 photo at 16 px).
    Cmyk(Vec<u8>),
}

impl DecodedImage {
    /// Whether Pillow opens it as a palette (`P`) or bilevel (`1`) image, which
    /// `Image.resize` resizes by nearest neighbour whatever filter is asked.
    pub fn indexed(&self) -> bool {
        matches!(self.mode, PillowMode::Palette(_) | PillowMode::Bilevel)
    }
}

impl From<DynamicImage> for DecodedImage {
    /// An image made in memory (rendered, drawn on): held as it is ([`PillowMode::Direct`]).
    fn from(image: DynamicImage) -> Self {
        Self {
            image,
            mode: PillowMode::Direct,
        }
    }
}

/// [`decode_image`], with how Pillow holds the image before converting it to RGB
/// ([`DecodedImage::mode`]: its palette, bilevel or CMYK values).
///
/// ```
/// let mut bytes = Vec::new();
/// image::GrayImage::from_pixel(4, 2, image::Luma([90]))
///     .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
/// let decoded = clipcid_data::decode_image_with_mode(&bytes)?;
/// assert_eq!(decoded.mode, clipcid_data::PillowMode::Direct);
/// assert_eq!(decoded.image.to_rgb8().get_pixel(3, 1).0, [90, 90, 90]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_image_with_mode(bytes: &[u8]) -> Result<DecodedImage, String> {
    check_jpeg_complete(bytes)?;
    if is_jpeg(bytes) {
        if let Some(decoded) = decode_jpeg(bytes)? {
            return Ok(decoded);
        }
    }
    if crate::pnm::is_pnm(bytes) {
        return crate::pnm::decode_pnm(bytes);
    }
    if crate::tif::is_tiff(bytes) {
        return crate::tif::decode_tiff(bytes);
    }
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has no pixels".into());
    }
    Ok(DecodedImage {
        image: high_bytes(img)?,
        mode: pillow_mode(bytes),
    })
}

/// 16-bit samples as Pillow reads them: the high byte (its `RGB;16B`, `RGBA;16B` and
/// `LA;16B` unpackers), where the `image` crate's conversion rounds (`v / 257`) and differs
/// on about half the values. A 16-bit grayscale PNG takes the high byte too, though Pillow
/// opens it as `I;16` and its conversion to RGB clips every value over 255 to white (nearly
/// every such image becomes a white square): the one place clipcid's pixels are not Pillow's.
fn high_bytes(img: DynamicImage) -> Result<DynamicImage, String> {
    fn high<P, Q>(
        img: &image::ImageBuffer<P, Vec<u16>>,
    ) -> Result<image::ImageBuffer<Q, Vec<u8>>, String>
    where
        P: image::Pixel<Subpixel = u16>,
        Q: image::Pixel<Subpixel = u8>,
    {
        let bytes = img.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
        image::ImageBuffer::from_raw(img.width(), img.height(), bytes)
            .ok_or_else(|| "cannot decode image: a 16-bit image's samples do not fill it".into())
    }
    Ok(match img {
        DynamicImage::ImageLuma16(i) => DynamicImage::ImageLuma8(high(&i)?),
        DynamicImage::ImageLumaA16(i) => DynamicImage::ImageLumaA8(high(&i)?),
        DynamicImage::ImageRgb16(i) => DynamicImage::ImageRgb8(high(&i)?),
        DynamicImage::ImageRgba16(i) => DynamicImage::ImageRgba8(high(&i)?),
        other => other,
    })
}

/// Pillow's mode for these bytes (already decoded) where it is `P` or `1`: read from the
/// PNG, GIF or BMP header by Pillow's own rules (`PngImagePlugin`, `GifImagePlugin`,
/// `BmpImagePlugin`), with the palette Pillow keeps; no other format has either mode.
fn pillow_mode(bytes: &[u8]) -> PillowMode {
    let u16_le = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_le = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        // IHDR comes first: bit depth at 24, colour type at 25. Palette (3) is `P`, with the
        // PLTE chunk's entries; 1-bit grayscale (0) is `1`.
        return match (bytes.get(24), bytes.get(25)) {
            (_, Some(3)) => PillowMode::Palette(png_palette(bytes)),
            (Some(1), Some(0)) => PillowMode::Bilevel,
            _ => PillowMode::Direct,
        };
    }
    if bytes.starts_with(b"GIF8") {
        return gif_first_frame_palette(bytes).map_or(PillowMode::Direct, PillowMode::Palette);
    }
    if bytes.starts_with(b"BM") {
        let Some(header) = u32_le(14) else {
            return PillowMode::Direct;
        };
        let (bits, colors, entry) = if header == 12 {
            (u16_le(24), None, 3)
        } else {
            (u16_le(28), u32_le(46), 4)
        };
        let Some(bits) = bits.filter(|&b| b <= 8) else {
            return PillowMode::Direct;
        };
        let colors = match colors {
            Some(c) if c > 0 => c as usize,
            _ => 1 << bits,
        };
        // Entries are blue, green, red (and a padding byte in the newer headers).
        let start = 14 + header as usize;
        let palette: Vec<[u8; 3]> = (0..colors.min(256))
            .map_while(|i| {
                let at = start + i * entry;
                bytes.get(at..at + 3).map(|e| [e[2], e[1], e[0]])
            })
            .collect();
        // Pillow drops a palette of gray levels in order (0 and 255 for two entries): `1`
        // for up to two entries, `L` above; any other palette is `P`.
        let gray = colors <= 256
            && palette.len() == colors
            && palette.iter().enumerate().all(|(i, e)| {
                let level = if colors == 2 { [0u8, 255][i] } else { i as u8 };
                *e == [level; 3]
            });
        return match (gray, colors <= 2) {
            (true, true) => PillowMode::Bilevel,
            (true, false) => PillowMode::Direct,
            (false, _) => PillowMode::Palette(palette),
        };
    }
    PillowMode::Direct
}

/// A PNG's palette: the entries of its PLTE chunk (empty where it has none).
fn png_palette(bytes: &[u8]) -> Vec<[u8; 3]> {
    // Chunks after the 8-byte signature: length (big-endian), type, data, CRC.
    let mut at = 8;
    while let Some(head) = bytes.get(at..).and_then(|rest| rest.get(..8)) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let data = at + 8;
        match &head[4..8] {
            b"PLTE" => {
                let end = data.saturating_add(len).min(bytes.len());
                return palette_entries(bytes.get(data..end).unwrap_or_default());
            }
            b"IDAT" | b"IEND" => break,
            _ => at = data.saturating_add(len).saturating_add(4),
        }
    }
    Vec::new()
}

/// RGB triples (at most 256; a trailing part of one dropped).
fn palette_entries(table: &[u8]) -> Vec<[u8; 3]> {
    table
        .chunks_exact(3)
        .take(256)
        .map(|e| [e[0], e[1], e[2]])
        .collect()
}

/// The palette Pillow gives a GIF's first frame: its own colour table (flag in its image
/// descriptor, after any extension blocks) or else the global one (flag in the screen
/// descriptor). `None` (Pillow's mode `L`) where there is neither, or where that table is the
/// gray ramp (entry `i` is `(i, i, i)`: Pillow's `_is_palette_needed`).
fn gif_first_frame_palette(bytes: &[u8]) -> Option<Vec<[u8; 3]>> {
    // A table's flag and size (3 << (bits + 1) bytes) are in one packed byte.
    let table_len = |packed: u8| (packed & 0x80 != 0).then(|| 3usize << ((packed & 7) + 1));
    // A table of `len` bytes at `start` (what of it the file holds), kept where needed.
    let needed = |start: usize, len: usize| -> Option<Vec<[u8; 3]>> {
        let table = bytes.get(start..(start + len).min(bytes.len()))?;
        let entries = palette_entries(table);
        let ramp = entries.iter().enumerate().all(|(i, e)| *e == [i as u8; 3]);
        (!ramp).then_some(entries)
    };
    let screen = *bytes.get(10)?;
    let mut at = 13;
    let global = match table_len(screen) {
        Some(len) => {
            let table = needed(at, len);
            at += len;
            table
        }
        None => None,
    };
    loop {
        match bytes.get(at) {
            Some(0x21) => {
                // Extension: label, then data sub-blocks up to a zero-length one.
                at += 2;
                while let Some(&len) = bytes.get(at) {
                    at += 1 + len as usize;
                    if len == 0 {
                        break;
                    }
                }
            }
            Some(0x2C) => {
                let packed = *bytes.get(at + 9)?;
                return match table_len(packed) {
                    Some(len) => needed(at + 10, len),
                    None => global,
                };
            }
            _ => return global,
        }
    }
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8])
}

thread_local! {
    /// One TurboJPEG handle per thread (decoding runs on rayon's threads), made on first use.
    static DECOMPRESSOR: RefCell<Option<turbo::Handle>> = const { RefCell::new(None) };
}

/// A JPEG through libjpeg-turbo: `Ok(None)` where TurboJPEG cannot give Pillow's pixels (its
/// header reader or decoder fails on the stream), for the `image` crate to try; an error for
/// an image too large to decode or of other than 8-bit samples. A CMYK or YCCK JPEG keeps its
/// CMYK values ([`PillowMode::Cmyk`]).
fn decode_jpeg(bytes: &[u8]) -> Result<Option<DecodedImage>, String> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = turbo::Handle::new();
        }
        let Some(handle) = slot.as_mut() else {
            return Ok(None);
        };
        // A TurboJPEG handle can stay broken after a failure (a bad marker in a header makes
        // every later header read on it fail the same way), so a failed one is dropped and
        // the thread's next image gets a fresh handle. Warnings are not failures (below).
        let Some(header) = handle.read_header(bytes) else {
            *slot = None;
            return Ok(None);
        };
        if header.precision != 8 {
            // Pillow's JPEG reader raises "cannot handle 12-bit layers" for any precision but
            // 8 (so `Image.open` says "cannot identify image file"): no PIL-based pipeline has
            // pixels for such a file to match, and the `image` crate's decoder, the fallback,
            // refuses them too, with messages that do not say why (a 16-bit lossless JPEG is
            // "Bad Huffman Table").
            let process = if header.lossless { "lossless " } else { "" };
            return Err(format!(
                "cannot decode image: a {}-bit {process}JPEG; Pillow opens only 8-bit JPEGs \
                 (\"cannot handle {}-bit layers\"), so no Pillow-based pipeline has its pixels: \
                 re-encode it with 8-bit samples",
                header.precision, header.precision
            ));
        }
        let channels = header.colorspace.channels();
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
        if !handle.decompress(bytes, &mut pixels, header.colorspace) {
            *slot = None;
            return Ok(None);
        }
        let (w, h) = (width as u32, height as u32);
        let direct = |image: Option<DynamicImage>| image.map(DecodedImage::from);
        Ok(match channels {
            1 => direct(GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)),
            3 => direct(RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)),
            _ => {
                // Pillow reads CMYK JPEG values as inverted ("CMYK;I", Adobe's convention,
                // which Pillow also writes).
                let mut cmyk = pixels;
                cmyk.iter_mut().for_each(|v| *v = 255 - *v);
                RgbImage::from_raw(w, h, pillow_cmyk_to_rgb(&cmyk)).map(|rgb| DecodedImage {
                    image: DynamicImage::ImageRgb8(rgb),
                    mode: PillowMode::Cmyk(cmyk),
                })
            }
        })
    })
}

/// TurboJPEG's decompressor through its C API, for the one thing the `turbojpeg` crate's
/// `Decompressor` hides: whether a call that returned -1 failed or only warned. libjpeg
/// reports damage it can decode through (extraneous bytes before a marker, a bad Huffman
/// code, an unknown Adobe transform code) as warnings and still writes every row; Pillow
/// ignores warnings and keeps those pixels, so they are Pillow's pixels here too, where the
/// crate's `Err` would send the image to another decoder and give other pixels.
#[allow(unsafe_code)] // FFI to the statically linked libjpeg-turbo; each call's contract below
mod turbo {
    use std::ffi::{c_int, CStr};

    use turbojpeg::raw;

    /// A JPEG's colour space, as far as decoding needs it: what it is decoded into.
    #[derive(Clone, Copy)]
    pub(super) enum Colorspace {
        /// One channel.
        Gray,
        /// YCbCr or RGB: decoded to RGB.
        Rgb,
        /// CMYK, or YCCK (which libjpeg turns into CMYK, as for Pillow).
        Cmyk,
    }

    /// What a JPEG's header says.
    pub(super) struct Header {
        pub width: usize,
        pub height: usize,
        pub colorspace: Colorspace,
        /// Bits a sample (8 for nearly every JPEG; 12 in some medical and camera files; 2 to
        /// 16 in lossless ones).
        pub precision: c_int,
        /// Whether the frame is lossless (SOF3), not DCT-based.
        pub lossless: bool,
    }

    /// An owned `tjhandle` for decompression (never null), destroyed on drop.
    pub(super) struct Handle(raw::tjhandle);

    impl Colorspace {
        /// Bytes a decoded pixel takes.
        pub fn channels(self) -> usize {
            match self {
                Colorspace::Gray => 1,
                Colorspace::Rgb => 3,
                Colorspace::Cmyk => 4,
            }
        }
    }

    impl Handle {
        /// A new decompressor, or `None` where TurboJPEG cannot make one.
        pub fn new() -> Option<Self> {
            // SAFETY: tj3Init takes an init type and returns a new handle or null.
            let ptr = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as c_int) };
            (!ptr.is_null()).then_some(Self(ptr))
        }

        /// The header, or `None` where reading it failed (a warning is not a failure).
        pub fn read_header(&mut self, bytes: &[u8]) -> Option<Header> {
            let len = bytes.len().try_into().ok()?;
            // SAFETY: the handle is live; the pointer and length describe `bytes`, which
            // TurboJPEG only reads during the call.
            let rc = unsafe { raw::tj3DecompressHeader(self.0, bytes.as_ptr(), len) };
            if !self.succeeded(rc) {
                return None;
            }
            // SAFETY: the handle is live; tj3Get reads a parameter of the header just read.
            let get = |param: raw::TJPARAM| unsafe { raw::tj3Get(self.0, param as c_int) };
            let colorspace = match u32::try_from(get(raw::TJPARAM_TJPARAM_COLORSPACE)).ok()? {
                raw::TJCS_TJCS_GRAY => Colorspace::Gray,
                raw::TJCS_TJCS_YCbCr | raw::TJCS_TJCS_RGB => Colorspace::Rgb,
                raw::TJCS_TJCS_CMYK | raw::TJCS_TJCS_YCCK => Colorspace::Cmyk,
                _ => return None,
            };
            Some(Header {
                width: usize::try_from(get(raw::TJPARAM_TJPARAM_JPEGWIDTH)).ok()?,
                height: usize::try_from(get(raw::TJPARAM_TJPARAM_JPEGHEIGHT)).ok()?,
                colorspace,
                precision: get(raw::TJPARAM_TJPARAM_PRECISION),
                lossless: get(raw::TJPARAM_TJPARAM_LOSSLESS) == 1,
            })
        }

        /// Decodes the stream whose header was read last into `pixels`, rows of the header's
        /// width in `colorspace`'s channels, packed; false where decoding failed (a warning
        /// is not a failure) or `pixels` is not the image's size.
        pub fn decompress(
            &mut self,
            bytes: &[u8],
            pixels: &mut [u8],
            colorspace: Colorspace,
        ) -> bool {
            // SAFETY: the handle is live; tj3Get reads a parameter of the header read last.
            let get = |param: raw::TJPARAM| unsafe { raw::tj3Get(self.0, param as c_int) };
            let (width, height) = (
                usize::try_from(get(raw::TJPARAM_TJPARAM_JPEGWIDTH)).unwrap_or(0),
                usize::try_from(get(raw::TJPARAM_TJPARAM_JPEGHEIGHT)).unwrap_or(0),
            );
            let pitch = width * colorspace.channels();
            if pitch == 0 || pixels.len() != pitch * height {
                return false;
            }
            let format = match colorspace {
                Colorspace::Gray => raw::TJPF_TJPF_GRAY,
                Colorspace::Rgb => raw::TJPF_TJPF_RGB,
                Colorspace::Cmyk => raw::TJPF_TJPF_CMYK,
            };
            let (Ok(pitch), Ok(len)) = (c_int::try_from(pitch), bytes.len().try_into()) else {
                return false;
            };
            // SAFETY: the handle is live; TurboJPEG writes `height` rows of `pitch` bytes, the
            // image's size in this pixel format, which `pixels` holds (checked above), and
            // only reads `bytes`.
            let rc = unsafe {
                raw::tj3Decompress8(
                    self.0,
                    bytes.as_ptr(),
                    len,
                    pixels.as_mut_ptr(),
                    pitch,
                    format as c_int,
                )
            };
            self.succeeded(rc)
        }

        /// Whether a call that returned `rc` gave its full result: it returned 0, or it only
        /// warned. TurboJPEG's error code says "warning" whenever a warning was raised during
        /// the call, even where a fatal error came after it (a bad later scan header of a
        /// progressive JPEG, with rows left unwritten); a fatal error always writes the
        /// message last (libjpeg prints only the first warning), so the message must also be
        /// one of libjpeg's warnings (`jerror.h`, `JWRN_*`).
        fn succeeded(&mut self, rc: c_int) -> bool {
            if rc == 0 {
                return true;
            }
            // SAFETY: the handle is live; both calls read its error state.
            let (code, message) = unsafe {
                (
                    raw::tj3GetErrorCode(self.0),
                    CStr::from_ptr(raw::tj3GetErrorStr(self.0)).to_string_lossy(),
                )
            };
            code == raw::TJERR_TJERR_WARNING as c_int && is_libjpeg_warning(&message)
        }
    }

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: the handle came from tj3Init and is destroyed once, here.
            unsafe { raw::tj3Destroy(self.0) }
        }
    }

    /// libjpeg-turbo's warning messages (every `JWRN_*` in `jerror.h`), each up to its first
    /// formatted value; the first covers the six about corrupt data (extraneous bytes before
    /// a marker, a bad Huffman or arithmetic code, a missing restart marker, a data segment
    /// ending early, a bad ICC marker). No fatal error's message starts like any of them.
    const LIBJPEG_WARNINGS: [&str; 7] = [
        "Corrupt JPEG data: ",
        "Unknown Adobe color transform code ",
        "Inconsistent progression sequence for component ",
        "Warning: unknown JFIF revision number ",
        "Premature end of JPEG file",
        "Invalid SOS parameters for sequential JPEG",
        "Application transferred too many scanlines",
    ];

    /// Whether `message` is one of libjpeg's warnings.
    pub(super) fn is_libjpeg_warning(message: &str) -> bool {
        LIBJPEG_WARNINGS.iter().any(|w| message.starts_with(w))
    }
}

/// Rows of packed bits (the first pixel in the top bit, each row padded to a whole byte), as
/// PBM and bilevel TIFF store them, one byte a pixel: `one` where a bit is set, `!one` where
/// it is clear (a PBM's 1 is black, a TIFF's white once the `tiff` crate has inverted
/// white-is-zero). `None` where `packed` holds fewer than `height` rows.
pub(crate) fn unpack_bits(packed: &[u8], width: usize, height: usize, one: u8) -> Option<Vec<u8>> {
    let row_bytes = width.div_ceil(8);
    let rows = packed.get(..row_bytes * height)?;
    Some(
        rows.chunks_exact(row_bytes)
            .flat_map(|row| {
                (0..width).map(move |x| {
                    if row[x / 8] & (0x80 >> (x % 8)) != 0 {
                        one
                    } else {
                        !one
                    }
                })
            })
            .collect(),
    )
}

/// The error for a `width` x `height` image whose pixels would take more than
/// [`MAX_DECODED_BYTES`] (Netpbm and TIFF, checked from their headers before any pixel).
pub(crate) fn over_decoded_limit(
    width: impl std::fmt::Display,
    height: impl std::fmt::Display,
) -> String {
    format!(
        "cannot decode image: {width} x {height} is over the {MAX_DECODED_BYTES}-byte limit on a decoded image"
    )
}

/// CMYK values (as Pillow holds them) as RGB, as Pillow's `convert("RGB")` computes them:
/// each channel to `(255 - k) - (255 - k) c / 255`, rounded as its `MULDIV255`.
pub(crate) fn pillow_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    cmyk.chunks_exact(4)
        .flat_map(|px| {
            let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(u32::from);
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
