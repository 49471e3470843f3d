"""Pillow's JPEG decoding, as fixtures for `clipcid_data::decode_image`.

    apt-get install libturbojpeg0 libjpeg-turbo-progs  # YCCK, arithmetic: Pillow writes neither
    python -m venv ~/jpeg-venv && ~/jpeg-venv/bin/pip install pillow numpy "PyTurboJPEG<2" imagecodecs
    ~/jpeg-venv/bin/python scripts/reference/jpeg_reference.py crates/clipcid-data/tests/fixtures/pillow-jpeg

Writes small JPEGs that Pillow encodes (each chroma subsampling, progressive, restart markers,
grayscale, CMYK, an EXIF orientation tag, sizes that are not whole MCUs), one YCCK JPEG (what
Photoshop writes for CMYK; Pillow cannot write it, so TurboJPEG's compressor does, from CMYK
pixels, through PyTurboJPEG 1.x and Debian's libturbojpeg), and three damaged ones (two that
libjpeg decodes with a warning, one where a fatal error follows a warning); two
arithmetic-coded JPEGs (sequential and progressive; Debian's `cjpeg -arithmetic` writes them)
and an 8-bit lossless one (SOF3, imagecodecs' libjpeg-turbo 3), which Pillow decodes, and a
12-bit and a 16-bit lossless JPEG (imagecodecs), which Pillow refuses: it opens only 8-bit
JPEGs ("cannot handle 12-bit layers"); and, beside each one Pillow decodes,
`Image.open(f).convert("RGB")` as a PNG: what every PIL-based pipeline (open_clip's transform,
transformers' PIL image processor) starts from; and the 16 x 16 crop open_clip's transform
makes of the opened image (`formats_reference.py`'s `open_clip_transform`), which resizes a
CMYK or YCCK JPEG in CMYK before converting it. `cases.json` lists them with the Pillow,
libjpeg-turbo, imagecodecs and cjpeg versions, and the ones Pillow refuses with its error (and,
for the other precisions, the sample precision and the reason Pillow's JPEG reader gives). The
test `crates/clipcid-data/tests/pillow_jpeg.rs` must give the same pixels, bit for bit.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image, JpegImagePlugin, features

from formats_reference import SIZE, open_clip_transform

SEED = 11

# name: (width, height, mode, save options)
CASES = {
    "420-q95": (37, 23, "RGB", {"quality": 95, "subsampling": 2}),
    "422-q75": (64, 48, "RGB", {"quality": 75, "subsampling": 1}),
    "444-q90": (33, 41, "RGB", {"quality": 90, "subsampling": 0}),
    "420-progressive": (45, 31, "RGB", {"quality": 85, "subsampling": 2, "progressive": True}),
    "420-restarts": (40, 40, "RGB", {"quality": 95, "subsampling": 2, "restart_marker_blocks": 1}),
    "420-optimized": (50, 17, "RGB", {"quality": 60, "subsampling": 2, "optimize": True}),
    "420-one-pixel": (1, 1, "RGB", {"quality": 95, "subsampling": 2}),
    "420-one-column": (1, 19, "RGB", {"quality": 95, "subsampling": 2}),
    "gray-q90": (29, 19, "L", {"quality": 90}),
    "cmyk-q95": (21, 17, "CMYK", {"quality": 95}),
    "420-exif-rotated": (26, 14, "RGB", {"quality": 95, "subsampling": 2, "exif": "orientation"}),
    "ycck-420-q95": (23, 19, "CMYK", {"quality": 95, "ycck": True}),
    # Damage libjpeg decodes through with a warning, which Pillow ignores: its pixels stand.
    "420-extraneous-bytes": (34, 21, "RGB", {"quality": 95, "subsampling": 2,
                                             "damage": "extraneous-bytes"}),
    "420-corrupt-scan": (36, 28, "RGB", {"quality": 90, "subsampling": 2,
                                         "damage": "corrupt-scan"}),
    # A warning, then a fatal error: Pillow refuses it (no PNG), though TurboJPEG's error code
    # says "warning" for the whole call.
    "progressive-fatal-after-warning": (45, 31, "RGB", {"quality": 85, "subsampling": 2,
                                                        "progressive": True,
                                                        "damage": "fatal-after-warning"}),
    # Entropy coding and a process Pillow cannot write but decodes (libjpeg-turbo 3).
    "arithmetic-420": (23, 19, "RGB", {"cjpeg": ["-arithmetic", "-quality", "90",
                                                 "-sample", "2x2"]}),
    "arithmetic-progressive": (30, 21, "RGB", {"cjpeg": ["-arithmetic", "-progressive",
                                                         "-quality", "85"]}),
    "lossless-8bit": (21, 17, "RGB", {"imagecodecs": {"lossless": True}}),
    # Sample precisions Pillow refuses ("cannot handle 12-bit layers").
    "12bit-q90": (25, 18, "RGB", {"imagecodecs": {"level": 90, "bitspersample": 12}}),
    "lossless-16bit": (19, 13, "L", {"imagecodecs": {"lossless": True, "bitspersample": 16}}),
}


def save_ycck(img, path, quality):
    """TurboJPEG's compressor turns CMYK pixels into a YCCK JPEG (4:2:0, Adobe transform 2).
    It stores the values as given, so Pillow's own convention (inverted CMYK) is written."""
    import turbojpeg

    inverted = 255 - np.asarray(img)
    data = turbojpeg.TurboJPEG().encode(inverted, quality=quality, pixel_format=turbojpeg.TJPF_CMYK,
                                        jpeg_subsample=turbojpeg.TJSAMP_420)
    with open(path, "wb") as f:
        f.write(data)


def save_cjpeg(img, path, args):
    """Debian's cjpeg (libjpeg-turbo-progs) encodes a PPM of the image with `args`."""
    ppm = path + ".ppm"
    img.save(ppm)
    try:
        subprocess.run(["cjpeg", *args, "-outfile", path, ppm], check=True)
    finally:
        os.remove(ppm)


def save_imagecodecs(img, path, opts):
    """imagecodecs' libjpeg-turbo 3 encodes the image with `opts`: 8-bit values scaled to the
    sample precision (x 16 for 12 bits, x 257 for 16) where it is not 8."""
    import imagecodecs

    a = np.asarray(img)
    bits = opts.get("bitspersample", 8)
    if bits != 8:
        a = a.astype(np.uint16) * {12: 16, 16: 257}[bits]
    with open(path, "wb") as f:
        f.write(imagecodecs.jpeg8_encode(a, **opts))


def tool_versions():
    """imagecodecs' and cjpeg's versions, for cases.json."""
    import imagecodecs

    cjpeg = subprocess.run(["cjpeg", "-version"], capture_output=True, text=True)
    return {"imagecodecs": imagecodecs.__version__,
            "imagecodecs_libjpeg_turbo": imagecodecs.jpeg8_version(),
            "cjpeg": (cjpeg.stderr or cjpeg.stdout).strip()}


def content(w, h, mode, rng):
    """Smooth colour gradients, hard-edged coloured blocks and noise: chroma rounding shows."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([np.sin(x / 4.0 + y / 7.0 + c) * 100 + 128 for c in range(4)], axis=-1)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        a[y0:y0 + 1 + h // 3, x0:x0 + 1 + w // 3] = rng.integers(0, 256, 4)
    a += rng.normal(0, 6, a.shape)
    a = np.clip(a, 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(a[..., 0], "L")
    if mode == "CMYK":
        return Image.fromarray(a, "CMYK")
    return Image.fromarray(a[..., :3], "RGB")


def damage(data, how):
    """Breaks a JPEG's bytes in one of the ways above."""
    scans = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    eoi = data.rindex(b"\xff\xd9")
    if how == "extraneous-bytes":  # "Corrupt JPEG data: 3 extraneous bytes before marker 0xda",
        # from the header reader (libjpeg-turbo 3 never reads what precedes the end marker)
        return data[:scans[0]] + b"\x00\x17\x2a" + data[scans[0]:]
    if how == "corrupt-scan":  # six entropy-coded bytes overwritten mid-scan (libjpeg warns)
        header = data[scans[-1] + 2] * 256 + data[scans[-1] + 3]
        mid = (scans[-1] + 2 + header + eoi) // 2
        return data[:mid] + b"\x55" * 6 + data[mid + 6:]
    if how == "fatal-after-warning":  # junk before the 2nd scan, a bad component in the 4th
        broken = bytearray(data)
        broken[scans[3] + 5] = 0x77  # "Invalid component ID 119 in SOS"
        return bytes(broken[:scans[1]]) + b"\x00\x17\x2a" + bytes(broken[scans[1]:])
    raise ValueError(how)


def write(out):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    rng = np.random.default_rng(SEED)
    cases, refused = [], []
    for name, (w, h, mode, opts) in CASES.items():
        img = content(w, h, mode, rng)
        opts = dict(opts)
        if opts.get("exif") == "orientation":
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90 degrees to display; PIL's open does not apply it
            opts["exif"] = exif.tobytes()
        path = os.path.join(out, f"{name}.jpg")
        how = opts.pop("damage", None)
        if opts.pop("ycck", False):
            save_ycck(img, path, opts["quality"])
        elif "cjpeg" in opts:
            save_cjpeg(img, path, opts["cjpeg"])
        elif "imagecodecs" in opts:
            save_imagecodecs(img, path, opts["imagecodecs"])
        else:
            img.save(path, "JPEG", **opts)
        if how:
            with open(path, "rb") as f:
                data = damage(f.read(), how)
            with open(path, "wb") as f:
                f.write(data)
        try:
            decoded = Image.open(path)
            decoded.load()
        except OSError as e:  # UnidentifiedImageError included
            why = {"jpeg": f"{name}.jpg", "pillow_error": str(e).replace(path, f"{name}.jpg")}
            bits = opts.get("imagecodecs", {}).get("bitspersample", 8)
            if bits != 8:
                # Image.open swallows the JPEG reader's own reason; ask the reader.
                try:
                    JpegImagePlugin.JpegImageFile(path)
                except SyntaxError as reason:
                    why.update(precision=bits, pillow_reason=str(reason))
            refused.append(why)
            continue
        decoded.convert("RGB").save(os.path.join(out, f"{name}.png"))
        crop = f"{name}.open_clip{SIZE}.png"
        open_clip_transform(decoded).save(os.path.join(out, crop))
        cases.append({"jpeg": f"{name}.jpg", "rgb": f"{name}.png", "mode": decoded.mode,
                      "width": w, "height": h, "open_clip": crop})
    meta = {"pillow": Image.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            **tool_versions(), "cases": cases, "refused_by_pillow": refused}
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {len(cases)} JPEG cases and {len(refused)} refused by Pillow to {out}: "
          f"{total / 1e3:.0f} kB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write(sys.argv[1])
