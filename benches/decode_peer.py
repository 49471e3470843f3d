#!/usr/bin/env python3
"""Peer of `cargo bench --bench decode`: Pillow + numpy doing open_clip's image transform.

    python3 benches/decode_peer.py [DIR] [--reps 5] [--size 224] [--batch 256]

DIR (default target/decode-bench) holds the JPEG sets the Rust bench writes (short256,
short512, own). open_clip's eval transform on a PIL image is torchvision's Resize(size,
BICUBIC) (PIL's resize of the shortest side to `size`, the other int(size * long / short)),
CenterCrop(size) (PIL's crop at round((w - size) / 2)), RGB conversion, ToTensor (/ 255,
channel-major) and Normalize(OpenAI's mean and std); torchvision calls exactly these PIL
operations, so Pillow and numpy alone reproduce what a DataLoader worker computes per image.
The bytes are read into memory first, so reading files is not counted. Needs Pillow and
numpy (`pip install pillow numpy`); one process, `--batch` images cycling through each set,
one after another: a core's rate.
"""

import argparse
import io
import os
import statistics
import time

import numpy as np
from PIL import Image, features

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SETS = [("short side 256", "short256"), ("short side 512", "short512"), ("own size", "own")]


def preprocess(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((nw, nh), Image.BICUBIC)
    left = int(round((nw - size) / 2.0))
    top = int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    x = np.asarray(img, dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default="target/decode-bench")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    turbo = features.check_feature("libjpeg_turbo")
    print(
        f"Pillow {Image.__version__} (libjpeg-turbo: {turbo}), numpy {np.__version__}, "
        f"open_clip's transform to {a.size} px, median of {a.reps}"
    )
    print()
    print("| set | images | one process: images/s | mean pixel |")
    print("|---|---:|---:|---:|")
    for name, folder in SETS:
        path = os.path.join(a.dir, folder)
        if not os.path.isdir(path):
            continue
        files = sorted(f for f in os.listdir(path) if f.endswith(".jpg"))
        blobs = [open(os.path.join(path, f), "rb").read() for f in files]
        work = [blobs[i % len(blobs)] for i in range(a.batch)]
        times, total, count = [], 0.0, 0
        for _ in range(a.reps):
            t0 = time.perf_counter()
            for b in work:
                x = preprocess(b, a.size)
                total += float(x.sum(dtype=np.float64))
                count += x.size
            times.append(time.perf_counter() - t0)
        rate = len(work) / statistics.median(times)
        print(f"| {name} | {len(blobs)} | {rate:.0f} | {total / count:.4f} |")


if __name__ == "__main__":
    main()
