"""Pillow's decoding of the formats other than JPEG (and of a CMYK JPEG's preprocessing), as
fixtures for `clipcid_data::decode_image` and `Preprocess`.

    python -m venv ~/jpeg-venv && ~/jpeg-venv/bin/pip install pillow numpy pypng
    ~/jpeg-venv/bin/python scripts/reference/formats_reference.py crates/clipcid-data/tests/fixtures/pillow-formats

Writes small images in every other format clipcid reads: PNG (RGB, RGBA, grayscale with alpha,
a palette with and without a transparent entry, 1-bit; and 16 bits a sample in RGB, RGBA,
grayscale with alpha and grayscale, which pypng writes since Pillow cannot), WebP (lossy, lossy
with alpha, lossless), GIF (colour, gray, and gray with every level, whose palette is the gray
ramp that Pillow opens as `L`; a transparent entry), BMP (24-bit, palette, gray palette,
1-bit), a palette PNG taller than wide, an interlaced PNG, animated GIF, PNG and WebP (the
first frame), a CMYK JPEG (Pillow's `convert("RGB")` of CMYK is not linear, and open_clip
resizes before it converts), and Netpbm (PPM, PGM and PBM from Pillow's writer; raw files with
maximum values of 6, 1000 and 65535; plain PPM, PGM and PBM with comments), and TIFF (RGB
uncompressed, LZW with the horizontal predictor, Deflate and PackBits; RGBA, LA, gray,
white-is-zero gray and bilevel, bilevel, 16-bit gray, CMYK); and beside each,
`Image.open(f).convert("RGBA")` as an
8-bit PNG: the colour and alpha every PIL-based pipeline starts from (its `convert("RGB")` is
the same colour with alpha dropped); and the 16 x 16 crop that open_clip's and transformers'
preprocessing make of it, in Pillow alone (open_clip resizes before converting to RGB, and
Pillow resizes a palette or bilevel image by nearest neighbour), and the 19 x 19 image of
open_clip's `resize_mode: "longest"` with `fill_color` 3 (timm's `ResizeKeepRatio` and
open_clip's `CenterCropOrPad`, whose torchvision `pad` fills a value of the image's own mode:
palette index 3, white in a bilevel image, CMYK (3, 3, 3, 3)); and the same three of
`Image.open(f).convert("RGB")`, what a loader that converts to RGB first (torchvision's
`ImageFolder`, webdataset's "pilrgb") hands either transform. `cases.json` lists them with
Pillow's mode and the Pillow and libwebp versions. The test
`crates/clipcid-data/tests/pillow_formats.rs` must give the same pixels, bit for bit.

Five TIFFs that Pillow opens and clipcid refuses (a palette, JPEG and CCITT compression,
YCbCr, float samples) are listed under `refused` with the error each must give.

Three cases are not Pillow's: a 16-bit grayscale PNG or TIFF opens as mode `I;16` (a PGM with
a maximum over 255 as `I`), and Pillow's conversion to RGB clips every value over 255 to white,
so nearly every such image becomes a white square. clipcid takes the high byte of each
sample, as Pillow itself does for 16-bit RGB, RGBA and LA PNGs; the reference written for
those cases is the high byte (`"pillow": false` in `cases.json`).
"""
import json
import os
import shutil
import sys

import numpy as np
import png
from PIL import Image, ImageOps, features

SEED = 5
W, H = 37, 23


def content(rng):
    """Smooth gradients, a hard-edged block and noise in four channels, 8 and 16 bits."""
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([np.sin(x / 4.0 + y / 7.0 + c) * 100 + 128 for c in range(4)], axis=-1)
    a[3:11, 5:17] = rng.integers(0, 256, 4)
    a += rng.normal(0, 6, a.shape)
    a = np.clip(a, 0, 255)
    a8 = a.astype(np.uint8)
    # 16-bit: each 8-bit value times 257 plus a low byte of noise, so rounding and taking the
    # high byte differ on about half the values.
    a16 = np.clip(a * 257 + rng.integers(0, 257, a.shape), 0, 65535).astype(np.uint16)
    return a8, a16


def write_png16(path, a16, mode):
    """pypng writes 16-bit PNGs in every colour type (Pillow writes 16-bit grayscale only)."""
    channels = {"L;16": 1, "LA;16": 2, "RGB;16": 3, "RGBA;16": 4}[mode]
    rows = a16[..., :channels].reshape(H, W * channels)
    png.from_array(rows, mode).save(path)


def write_pnm(path, magic, a, maxval, comment=False):
    """A Netpbm file of `a`'s samples (H x W, or H x W x 3) under `maxval`: raw (`P4`-`P6`,
    big-endian 16-bit samples above 255) or plain (`P1`-`P3`, a line of text per row, the
    bits of `P1` run together). With `comment`, a comment in the header (inside a token's
    whitespace) and, for plain files, one in the data."""
    h, w = a.shape[:2]
    head = f"{magic}\n# written by formats_reference.py\n{w} {h}\n" if comment else f"{magic}\n{w} {h}\n"
    if magic != "P1":
        head += f"{maxval}\n"
    flat = a.reshape(h, -1)
    if magic in ("P1", "P2", "P3"):
        sep = "" if magic == "P1" else " "
        rows = [sep.join(str(int(v)) for v in row) for row in flat]
        if comment:
            rows.insert(h // 2, "# a comment among the samples")
        body = ("\n".join(rows) + "\n").encode()
    elif maxval > 255:
        body = flat.astype(">u2").tobytes()
    else:
        body = flat.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(head.encode() + body)


SIZE = 16  # the preprocessing references' image size
LONGEST = 19  # "longest" size: 37 x 23 becomes 19 x 12 (11.8 rounded), padded by 3 and 4
FILL = 3  # its `fill_color`: a palette index with a colour, not white, not black


def shortest_edge(img):
    """torchvision's `Resize(int)` and transformers' `shortest_edge` size: int(size * long / short)."""
    w, h = img.size
    if w <= h:
        return SIZE, int(SIZE * h / w)
    return int(SIZE * w / h), SIZE


def open_clip_transform(img):
    """open_clip's eval transform up to ToTensor: `Resize(SIZE, BICUBIC)` on the PIL image
    (Pillow resizes a `P` or `1` image by nearest neighbour), torchvision's `CenterCrop`
    (rounded offsets), then `convert("RGB")`."""
    img = img.resize(shortest_edge(img), Image.BICUBIC)
    w, h = img.size
    left, top = int(round((w - SIZE) / 2.0)), int(round((h - SIZE) / 2.0))
    return img.crop((left, top, left + SIZE, top + SIZE)).convert("RGB")


def open_clip_longest_transform(img):
    """open_clip's eval transform with `resize_mode="longest"`, `fill_color=FILL`, up to
    ToTensor: timm's `ResizeKeepRatio(LONGEST, longest=1)` (each side `round(side / ratio)`,
    ratio the larger of height and width over LONGEST), `CenterCropOrPad(LONGEST, fill=FILL)`
    (torchvision's `F.pad` of a PIL image: `ImageOps.expand` with the fill repeated per band,
    the palette put back on a `P` image; then a rounded crop), then `convert("RGB")`."""
    w, h = img.size
    ratio = max(h / LONGEST, w / LONGEST) * 1.0 + min(h / LONGEST, w / LONGEST) * (1.0 - 1.0)
    nh, nw = [round(x * 1.0 / ratio) for x in (h, w)]
    img = img.resize((nw, nh), Image.BICUBIC)
    if LONGEST > nw or LONGEST > nh:
        ltrb = (
            (LONGEST - nw) // 2 if LONGEST > nw else 0,
            (LONGEST - nh) // 2 if LONGEST > nh else 0,
            (LONGEST - nw + 1) // 2 if LONGEST > nw else 0,
            (LONGEST - nh + 1) // 2 if LONGEST > nh else 0,
        )
        bands = len(img.getbands())
        fill = FILL if bands == 1 else (FILL,) * bands
        palette = img.getpalette() if img.mode == "P" else None
        img = ImageOps.expand(img, border=ltrb, fill=fill)
        if palette is not None:
            img.putpalette(palette)
        nw, nh = img.size
    left, top = int(round((nw - LONGEST) / 2.0)), int(round((nh - LONGEST) / 2.0))
    return img.crop((left, top, left + LONGEST, top + LONGEST)).convert("RGB")


def transformers_transform(img):
    """transformers' CLIPImageProcessor (Pillow backend) up to rescaling: `convert_to_rgb`
    (composited over white unless already RGB), shortest edge bicubic (`reducing_gap=None`),
    `center_crop` (floored offsets)."""
    if img.mode != "RGB":
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")
    img = img.resize(shortest_edge(img), Image.BICUBIC, reducing_gap=None)
    w, h = img.size
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    return img.crop((left, top, left + SIZE, top + SIZE))


def write(out):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    rng = np.random.default_rng(SEED)
    a8, a16 = content(rng)
    rgb = Image.fromarray(a8[..., :3], "RGB")
    # Every gray level, so Pillow's GIF writer keeps its 256-entry gray-ramp palette.
    every_level = ((np.arange(W * H).reshape(H, W) * 7) % 256).astype(np.uint8)
    writers = {
        "rgb8.png": lambda p: rgb.save(p),
        "rgba8.png": lambda p: Image.fromarray(a8, "RGBA").save(p),
        "la8.png": lambda p: Image.fromarray(a8[..., :2], "LA").save(p),
        "palette.png": lambda p: rgb.quantize(64).save(p),
        "palette-transparent.png": lambda p: rgb.quantize(64).save(p, transparency=3),
        "rgb16.png": lambda p: write_png16(p, a16, "RGB;16"),
        "rgba16.png": lambda p: write_png16(p, a16, "RGBA;16"),
        "la16.png": lambda p: write_png16(p, a16, "LA;16"),
        "gray16.png": lambda p: write_png16(p, a16, "L;16"),
        "lossy.webp": lambda p: rgb.save(p, quality=80),
        "lossy-alpha.webp": lambda p: Image.fromarray(a8, "RGBA").save(p, quality=80),
        "lossless.webp": lambda p: rgb.save(p, lossless=True),
        "bilevel.png": lambda p: Image.fromarray(a8[..., 0] > 128).save(p),
        "palette.gif": lambda p: rgb.save(p),
        "gray.gif": lambda p: Image.fromarray(a8[..., 0], "L").save(p),
        "palette-transparent.gif": lambda p: rgb.quantize(64).save(p, transparency=3),
        # Animations: every reader here and in Pillow opens the first frame.
        "animated.gif": lambda p: rgb.save(p, save_all=True, append_images=[rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]),
        "animated.png": lambda p: rgb.save(p, save_all=True, append_images=[rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]),
        "animated.webp": lambda p: rgb.save(p, save_all=True, lossless=True, append_images=[rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]),
        "interlaced.png": lambda p: png.from_array(a8[..., :3].reshape(H, W * 3), "RGB", info={"interlace": True}).save(p),
        "gray-ramp.gif": lambda p: Image.fromarray(every_level, "L").save(p),
        "rgb.bmp": lambda p: rgb.save(p),
        "palette.bmp": lambda p: rgb.quantize(64).save(p),
        "gray.bmp": lambda p: Image.fromarray(a8[..., 0], "L").save(p),
        "bilevel.bmp": lambda p: Image.fromarray(a8[..., 1] > 128).save(p),
        "tall-palette.png": lambda p: rgb.transpose(Image.Transpose.ROTATE_90).quantize(64).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(a8, "CMYK").save(p, quality=95),
        # Netpbm: Pillow's own writer (raw, maximum 255; bilevel raw), then files written
        # here for what its writer does not make: other maximum values (scaled, halves to
        # even), 16-bit samples, plain (ASCII) data, comments in the header and the data.
        "rgb.ppm": lambda p: rgb.save(p),
        "gray.pgm": lambda p: Image.fromarray(a8[..., 0], "L").save(p),
        "bilevel.pbm": lambda p: Image.fromarray(a8[..., 2] > 128).save(p),
        "maxval6.pgm": lambda p: write_pnm(p, "P5", a8[..., 1] % 7, 6, comment=True),
        "rgb1000.ppm": lambda p: write_pnm(p, "P6", (a16[..., :3].astype(np.int64) * 1000) // 65535, 1000),
        "gray16.pgm": lambda p: write_pnm(p, "P5", a16[..., 0], 65535),
        "plain.ppm": lambda p: write_pnm(p, "P3", a8[..., :3] * 100 // 255, 100, comment=True),
        "plain.pgm": lambda p: write_pnm(p, "P2", a8[..., 3] % 10, 9, comment=True),
        "plain.pbm": lambda p: write_pnm(p, "P1", (a8[..., 0] > 100).astype(np.uint8), 1, comment=True),
        # TIFF, through Pillow's writer (libtiff for the compressed ones): every kind clipcid
        # reads, with each lossless compression and LZW with the horizontal predictor.
        "rgb.tif": lambda p: rgb.save(p),
        "rgb-lzw-predictor.tif": lambda p: rgb.save(p, compression="tiff_lzw", tiffinfo={317: 2}),
        "rgb-deflate.tif": lambda p: rgb.save(p, compression="tiff_adobe_deflate"),
        "rgb-packbits.tif": lambda p: rgb.save(p, compression="packbits"),
        "rgba.tif": lambda p: Image.fromarray(a8, "RGBA").save(p, compression="tiff_lzw"),
        "la.tif": lambda p: Image.fromarray(a8[..., :2], "LA").save(p),
        "gray.tif": lambda p: Image.fromarray(a8[..., 0], "L").save(p),
        "white-is-zero.tif": lambda p: Image.fromarray(a8[..., 1], "L").save(p, tiffinfo={262: 0}),
        "bilevel.tif": lambda p: Image.fromarray(a8[..., 2] > 128).save(p),
        "white-is-zero-bilevel.tif": lambda p: Image.fromarray(a8[..., 0] > 128).save(p, tiffinfo={262: 0}),
        "gray16.tif": lambda p: Image.fromarray(np.ascontiguousarray(a16[..., 0])).save(p),
        "cmyk.tif": lambda p: Image.fromarray(a8, "CMYK").save(p, compression="tiff_lzw"),
    }
    # Files Pillow opens that clipcid refuses, with a part of the error it must give.
    refused = {
        "palette.tif": (lambda p: rgb.quantize(16).save(p), "with a palette"),
        "jpeg.tif": (lambda p: rgb.save(p, compression="jpeg"), "with JPEG compression"),
        "group4.tif": (lambda p: Image.fromarray(a8[..., 2] > 128).save(p, compression="group4"),
                       "with CCITT fax compression"),
        "ycbcr.tif": (lambda p: rgb.convert("YCbCr").save(p), "in YCbCr"),
        "float.tif": (lambda p: Image.fromarray(a8[..., 0], "L").convert("F").save(p),
                      "sample format [3]"),
    }
    refused_cases = []
    for name, (write_one, error) in refused.items():
        write_one(os.path.join(out, name))
        refused_cases.append({"file": name, "mode": Image.open(os.path.join(out, name)).mode,
                              "error": error})
    cases = []
    for name, write_one in writers.items():
        path = os.path.join(out, name)
        write_one(path)
        opened = Image.open(path)
        reference = f"{name}.rgba.png"
        # 16-bit grayscale (PNG's `I;16`, a PGM's `I` above 255, scaled to 16 bits): the
        # high byte, not Pillow's conversion, which clips it to white.
        pillow = opened.mode not in ("I;16", "I")
        if not pillow:
            high = (np.asarray(opened).astype(np.uint32) >> 8).astype(np.uint8)
            opened = Image.fromarray(high, "L")
        opened.convert("RGBA").save(os.path.join(out, reference))
        open_clip_transform(opened).save(os.path.join(out, f"{name}.open_clip{SIZE}.png"))
        transformers_transform(opened).save(os.path.join(out, f"{name}.transformers{SIZE}.png"))
        longest = f"{name}.open_clip_longest{LONGEST}.png"
        open_clip_longest_transform(opened).save(os.path.join(out, longest))
        # A loader that converts to RGB before the transform (torchvision's ImageFolder
        # `pil_loader`, webdataset's "pilrgb"): alpha dropped, palettes and CMYK resized as RGB.
        rgb_first = opened.convert("RGB")
        rgb_first_refs = {
            "open_clip": (open_clip_transform, f"{name}.rgb_first.open_clip{SIZE}.png"),
            "transformers": (transformers_transform, f"{name}.rgb_first.transformers{SIZE}.png"),
            "open_clip_longest": (open_clip_longest_transform,
                                  f"{name}.rgb_first.open_clip_longest{LONGEST}.png"),
        }
        for transform, file in rgb_first_refs.values():
            transform(rgb_first).save(os.path.join(out, file))
        cases.append({"file": name, "rgba": reference, "mode": Image.open(path).mode,
                      "pillow": pillow, "open_clip": f"{name}.open_clip{SIZE}.png",
                      "transformers": f"{name}.transformers{SIZE}.png",
                      "open_clip_longest": longest,
                      "rgb_first": {k: file for k, (_, file) in rgb_first_refs.items()}})
    meta = {"pillow": Image.__version__, "libwebp": features.version("webp"),
            "longest": {"size": LONGEST, "fill_color": FILL}, "cases": cases,
            "refused": refused_cases}
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {len(cases)} cases to {out}: {total / 1e3:.0f} kB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write(sys.argv[1])
