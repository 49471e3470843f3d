"""PyTorch side of scripts/gpu-check.sh: the same three workloads as `clipcid self-check
--bench`, on the same GPU, and one table with clipcid's figures beside them.

Usage: python3 scripts/gpu-check.py --clipcid BENCH.md [--device cuda] [--batch 256]
       [--rows 1000000] [--reps 10]

Workloads (random init, no download; median of --reps after warm-up):
  vit    : transformers CLIPVisionModelWithProjection, ViT-B/32 shape, bf16, eval,
           inference_mode; images/s.
  train  : transformers CLIPModel with the student's shape (vision width 384, 6 layers,
           12 heads, patch 32; ViT-B/32 text tower), CLIP loss, AdamW; one step per batch, in
           f32 and under torch.autocast(bfloat16) (open_clip's amp_bf16); samples/s.
  dedup  : 1M x 512 unit rows, f16 4096 x 4096 tiles over the upper triangle, pairs with
           distance < 0.07 counted (torch's blockwise-matmul dedup); seconds.
--clipcid reads the rows clipcid printed (| workload | value | unit |, in that order), and
its train-step phases (unit ms), which get a second table beside PyTorch's.
"""
import argparse
import statistics
import time

import torch
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device, reps, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def vision_b32():
    return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, image_size=224, patch_size=32,
                            projection_dim=512, hidden_act="quick_gelu")


def bench_vit(device, batch, reps):
    model = CLIPVisionModelWithProjection(vision_b32()).to(device, torch.bfloat16).eval()
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.bfloat16)

    @torch.inference_mode()
    def step():
        model(pixel_values=x)

    return batch / median_time(step, device, reps)


def bench_train(device, batch, reps, amp):
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              hidden_act="quick_gelu")
    text = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, max_position_embeddings=77,
                          hidden_act="quick_gelu")
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                     projection_dim=512)
    model = CLIPModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device)
    ids = (torch.arange(batch * 77, device=device) * 7919 % 49408).reshape(batch, 77)

    def forward():
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=amp):
            return model(input_ids=ids, pixel_values=x, return_loss=True).loss

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        forward().backward()
        update()

    per_second = batch / median_time(step, device, reps)
    # The phases clipcid prints (forward with the loss, backward, AdamW), synced between.
    phases = [[], [], []]
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = forward()
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        update()
        sync(device)
        t3 = time.perf_counter()
        for p, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            p.append(1e3 * dt)
    return per_second, [statistics.median(p) for p in phases]


def bench_dedup(device, rows, block=4096, thr=0.07):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(rows, 512, generator=g), dim=1)
    x = x.to(device, torch.float16 if device.startswith("cuda") else torch.float32)
    cut = 1 - thr * thr / 2
    sync(device)
    t0 = time.perf_counter()
    pairs = 0
    for i in range(0, rows, block):
        for j in range(i, rows, block):
            s = x[i:i + block] @ x[j:j + block].T
            if i == j:
                s = torch.triu(s, diagonal=1)
            pairs += int((s > cut).sum())
    sync(device)
    return time.perf_counter() - t0


def read_clipcid(path):
    """clipcid's four headline figures, then its six step-phase milliseconds (maybe none)."""
    values, phases = [], []
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[2] in ("images/s", "samples/s", "s"):
                values.append(float(cells[1]))
            elif len(cells) == 3 and cells[2] == "ms":
                phases.append(float(cells[1]))
    if len(values) != 4:
        # PyTorch's figures are still worth the device time: print them without clipcid's.
        print(f"{path}: expected clipcid's 4 benchmark rows, found {len(values)}")
        return [None] * 4, []
    return values, phases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clipcid", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    ours, our_phases = read_clipcid(a.clipcid)
    torch.manual_seed(0)
    # Each workload on its own: one that fails (memory, a missing kernel) leaves the others'
    # rows standing, with the error in its cell.
    theirs, their_phases = [], {}

    def train(amp):
        per_second, phases = bench_train(a.device, a.batch, a.reps, amp=amp)
        their_phases[amp] = phases
        return per_second

    for name, fn in [("vit", lambda: bench_vit(a.device, a.batch, a.reps)),
                     ("train f32", lambda: train(False)),
                     ("train amp", lambda: train(True)),
                     ("dedup", lambda: bench_dedup(a.device, a.rows))]:
        try:
            theirs.append(fn())
        except Exception as e:  # noqa: BLE001 - reported in the table, not swallowed
            print(f"PyTorch {name}: {type(e).__name__}: {e}")
            theirs.append(None)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    print(f"\nGPU check on {name}, torch {torch.__version__}; ratio = clipcid / PyTorch "
          "(throughput) or PyTorch / clipcid (seconds): above 1 means clipcid is faster\n")
    print("| workload | clipcid | PyTorch | ratio |\n|---|---|---|---|")
    labels = [
        f"ViT-B/32 image tower, bf16, batch {a.batch} (images/s)",
        f"student w384 L6 train step, batch {a.batch} (samples/s; clipcid f32 vs torch f32)",
        "same, bf16 (clipcid bf16 casts, f32 master vs torch AMP bf16)",
        f"balance tiles, {a.rows} x 512 (s; torch: blockwise matmul pair count)",
    ]
    for i, label in enumerate(labels):
        seconds = i == 3
        fmt = "{:.3f}" if seconds else "{:.1f}"
        mine, other = ours[i], theirs[i]
        if other is None or mine is None:
            ratio = "-"
        elif seconds:
            ratio = f"{other / mine:.2f}" if mine > 0 else "-"
        else:
            ratio = f"{mine / other:.2f}" if other > 0 else "-"
        other_cell = "failed" if other is None else fmt.format(other)
        mine_cell = "failed" if mine is None else fmt.format(mine)
        print(f"| {label} | {mine_cell} | {other_cell} | {ratio} |")
    if len(our_phases) == 6:
        print("\n| train step phase (median ms, synced) | clipcid | PyTorch | clipcid / PyTorch (below 1: clipcid faster) |"
              "\n|---|---|---|---|")
        for k, (precision, amp) in enumerate([("f32", False), ("bf16 / AMP", True)]):
            for m, phase in enumerate(["forward and loss", "backward", "AdamW update"]):
                mine = our_phases[3 * k + m]
                other = their_phases.get(amp, [None] * 3)[m]
                cell = "failed" if other is None else f"{other:.2f}"
                ratio = "-" if not other else f"{mine / other:.2f}"
                print(f"| {precision}: {phase} | {mine:.2f} | {cell} | {ratio} |")

if __name__ == "__main__":
    main()
