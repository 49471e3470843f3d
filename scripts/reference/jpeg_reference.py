"""Pillow's JPEG decoding, as fixtures for `clipcid_data::decode_image`.

    python -m venv ~/jpeg-venv && ~/jpeg-venv/bin/pip install pillow numpy
    ~/jpeg-venv/bin/python scripts/reference/jpeg_reference.py crates/clipcid-data/tests/fixtures/pillow-jpeg

Writes small JPEGs that Pillow encodes (each chroma subsampling, progressive, restart
markers, grayscale, CMYK, an EXIF orientation tag, sizes that are not whole MCUs) and, beside
each, `Image.open(f).convert("RGB")` as a PNG: what every PIL-based pipeline (open_clip's
transform, transformers' PIL image processor) starts from. `cases.json` lists them with the
Pillow and libjpeg-turbo versions. The test `crates/clipcid-data/tests/pillow_jpeg.rs` must
give the same pixels, bit for bit.
"""
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image, features

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
}


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


def write(out):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    rng = np.random.default_rng(SEED)
    cases = []
    for name, (w, h, mode, opts) in CASES.items():
        img = content(w, h, mode, rng)
        opts = dict(opts)
        if opts.get("exif") == "orientation":
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90 degrees to display; PIL's open does not apply it
            opts["exif"] = exif.tobytes()
        img.save(os.path.join(out, f"{name}.jpg"), "JPEG", **opts)
        decoded = Image.open(os.path.join(out, f"{name}.jpg"))
        decoded.convert("RGB").save(os.path.join(out, f"{name}.png"))
        cases.append({"jpeg": f"{name}.jpg", "rgb": f"{name}.png", "mode": decoded.mode,
                      "width": w, "height": h})
    meta = {"pillow": Image.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "cases": cases}
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {len(cases)} JPEG cases to {out}: {total / 1e3:.0f} kB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write(sys.argv[1])
