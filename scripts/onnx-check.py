#!/usr/bin/env python3
"""Checks and times a `clipcid export --format onnx` folder in ONNX Runtime.

Usage: python3 scripts/onnx-check.py EXPORT_DIR [--batch 32] [--reps 5] [--warmup 2]
                                     [--threads 2] [--peer]
Needs: numpy, onnxruntime, safetensors (and torch + open_clip_torch for --peer); the peers'
environment has them (../shared/peers/README.md, plus `pip install onnx onnxruntime`).

For every graph in EXPORT_DIR/onnx/ it runs the inputs of onnx/check.safetensors (written by
the export with clipcid's own outputs) and compares: f32 graphs must agree within 1e-4 (max
absolute difference), f16 graphs within a cosine of 0.999. Then it times each graph at
--batch (random pixels; the check captions repeated) with graph optimisations on and
--threads intra-op threads, and prints one table: file size, agreement, median seconds per
batch and items per second. With --peer it also exports open_clip's VisionTransformer of the
same shape with torch.onnx (opset 17, as ../shared/peers/bench_vit_ort.py does) and times it
in the same session, so the last column is clipcid's graph / PyTorch's graph.
Exits 1 when a graph disagrees with clipcid.
"""
import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def median_time(sess, feed, warmup, reps):
    for _ in range(warmup):
        sess.run(None, feed)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peer_time(cfg, batch, args):
    """open_clip's VisionTransformer of the same shape, exported by torch.onnx, in ORT."""
    import torch
    import torch.nn as nn
    from open_clip.transformer import VisionTransformer
    from open_clip.model import QuickGELU

    v = cfg["vision_config"]
    act = QuickGELU if v.get("hidden_act", "quick_gelu") == "quick_gelu" else nn.GELU
    model = VisionTransformer(image_size=v["image_size"], patch_size=v["patch_size"],
                              width=v["hidden_size"], layers=v["num_hidden_layers"],
                              heads=v["num_attention_heads"],
                              mlp_ratio=v["intermediate_size"] / v["hidden_size"],
                              output_dim=cfg["projection_dim"], act_layer=act).eval()
    x = torch.randn(batch, 3, v["image_size"], v["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peer.onnx")
        torch.onnx.export(model, (x,), path, input_names=["pixels"], output_names=["emb"],
                          opset_version=17, dynamo=False)
        return median_time(session(path, args.threads), {"pixels": x.numpy()},
                           args.warmup, args.reps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", action="store_true")
    args = ap.parse_args()
    onnx_dir = os.path.join(args.export_dir, "onnx")
    check_path = os.path.join(onnx_dir, "check.safetensors")
    if not os.path.exists(check_path):
        sys.exit(f"{check_path}: not found (run `clipcid export --format onnx` first)")
    check = load_file(check_path)
    with open(os.path.join(args.export_dir, "config.json")) as f:
        cfg = json.load(f)
    graphs = sorted(glob.glob(os.path.join(onnx_dir, "*.onnx")))
    if not graphs:
        sys.exit(f"{onnx_dir}: no .onnx files")
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, batch {args.batch}")
    print("| graph | MB | max abs diff | min cosine | s/batch | items/s | vs PyTorch's ONNX |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    failed = False
    rng = np.random.default_rng(0)
    for path in graphs:
        name = os.path.basename(path)
        size = os.path.getsize(path)
        if os.path.exists(path + ".data"):
            size += os.path.getsize(path + ".data")
        sess = session(path, args.threads)
        image = name.startswith("vision_model")
        inp, ref = ("pixel_values", "image_embeds") if image else ("input_ids", "text_embeds")
        if inp not in check:
            print(f"| {name} | {size / 1e6:.1f} | (no {inp} in check.safetensors) | | | | |")
            continue
        got = sess.run(None, {inp: check[inp]})[0]
        want = check[ref]
        diff = float(np.abs(got - want).max())
        cos = float(np.min(np.sum(got * want, 1) /
                           (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))))
        ok = cos >= 0.999 if "fp16" in name else diff <= 1e-4
        failed |= not ok
        if image:
            s = cfg["vision_config"]["image_size"]
            feed = {inp: rng.standard_normal((args.batch, 3, s, s), dtype=np.float32)}
        else:
            reps = -(-args.batch // len(check[inp]))
            feed = {inp: np.tile(check[inp], (reps, 1))[: args.batch]}
        t = median_time(sess, feed, args.warmup, args.reps)
        ratio = ""
        if args.peer and image:
            ratio = f"{t / peer_time(cfg, args.batch, args):.2f}x"
        mark = "" if ok else " FAIL"
        print(f"| {name} | {size / 1e6:.1f} | {diff:.2e}{mark} | {cos:.6f} | {t:.3f} | "
              f"{args.batch / t:.1f} | {ratio} |", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
