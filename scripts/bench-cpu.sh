#!/usr/bin/env bash
# CPU speed against the peers in one run: the image tower's forward (student w384 L6 h12 and
# teacher ViT-B/32) against ONNX Runtime and PyTorch, and the student's training step against
# PyTorch, then one table of ratios (clipcid / fastest peer; at or under 1.0x is the goal).
#
#   scripts/bench-cpu.sh [--python PY] [--peers DIR] [--batch 32] [--reps 5]
#
# PY is the peers' Python (default $CLIPCID_PEERS_PYTHON, else ~/peers-venv/bin/python; make
# it as ../shared/peers/README.md says). Without it, or without DIR (default ../shared/peers
# beside the checkout), only clipcid's figures are printed, with the reason. All runs use the
# machine's cores as they are; close other work first: this machine's timings move by up to
# 20% between runs, so compare figures from one run only.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${CLIPCID_PEERS_PYTHON:-$HOME/peers-venv/bin/python}"
peers="../shared/peers"
batch=32
reps=5
while [ $# -gt 0 ]; do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        --peers) peers="$2"; shift 2 ;;
        --batch) batch="$2"; shift 2 ;;
        --reps) reps="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "bench-cpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
threads="$(nproc)"

echo "== clipcid image-tower forward (cargo bench --bench vit_forward)"
cargo bench -q --bench vit_forward -- --batch "$batch" --reps "$reps" --warmup 1 \
    --models teacher,s12 | tee "$out/clipcid_fwd.txt"

have_peers=1
if [ ! -x "$python" ]; then
    echo "(peers skipped: no Python at $python; see ../shared/peers/README.md)"
    have_peers=0
elif [ ! -f "$peers/bench_vit.py" ]; then
    echo "(peers skipped: no $peers/bench_vit.py)"
    have_peers=0
fi
if [ "$have_peers" = 1 ]; then
    echo "== ONNX Runtime forward (bench_vit_ort.py)"
    (cd "$peers" && "$python" bench_vit_ort.py --batch "$batch" --reps "$reps" --warmup 2 \
        --threads "$threads" 2>/dev/null) | tee "$out/ort.txt"
    echo "== PyTorch forward and train step (bench_vit.py)"
    (cd "$peers" && "$python" bench_vit.py --batch "$batch" --reps "$reps" --warmup 2 \
        --threads "$threads" 2>/dev/null) | tee "$out/torch.txt"
fi

echo "== clipcid train step (cargo bench --bench train_step)"
cargo bench -q --bench train_step -- --batch "$batch" --reps "$reps" --warmup 2 \
    | tee "$out/clipcid_train.txt"

python3 - "$out" "$batch" "$threads" <<'EOF'
import re, sys
out, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3]

def read(name):
    try:
        return open(f"{out}/{name}").read().splitlines()
    except FileNotFoundError:
        return []

def cell(lines, pattern, col):
    """Column `col` of the first line matching `pattern`, as a float."""
    for line in lines:
        if re.search(pattern, line):
            parts = [p for p in re.split(r"\s*\|\s*|\s{2,}", line.strip()) if p]
            return float(parts[col])
    return None

fwd, train = read("clipcid_fwd.txt"), read("clipcid_train.txt")
ort, torch = read("ort.txt"), read("torch.txt")
rows = [
    ("student w384 L6 h12, forward",
     cell(fwd, r"student PicCollage \(w384 L6 h12\)", 2),
     cell(torch, r"student w384 L6 h12 .* fwd", 3),
     cell(ort, r"student w384 L6 h12", 1)),
    ("teacher ViT-B/32, forward",
     cell(fwd, r"teacher ViT-B/32", 2),
     cell(torch, r"teacher w768 L12 h12 .* fwd", 3),
     cell(ort, r"teacher w768 L12 h12", 1)),
    ("student h6 train step (fwd+loss+bwd+AdamW)",
     cell(train, r"w384 L6 h6 \| peer", 5),
     cell(torch, r"student w384 L6 h6 .* train", 3),
     None),
    ("student h12 train step (fwd+loss+bwd+AdamW)",
     cell(train, r"w384 L6 h12 \| peer", 5),
     cell(torch, r"student w384 L6 h12 .* train", 3),
     None),
]
fmt = lambda v: "-" if v is None else f"{v:.3f} s"
print()
print(f"batch {batch}, f32, 224 px, {threads} threads, median s/batch; one run")
print()
print("| model | clipcid | PyTorch | ONNX Runtime | clipcid / best |")
print("|---|---:|---:|---:|---:|")
for name, ours, pt, ox in rows:
    peers = [v for v in (pt, ox) if v is not None]
    ratio = f"{ours / min(peers):.2f}x" if ours is not None and peers else "-"
    print(f"| {name} | {fmt(ours)} | {fmt(pt)} | {fmt(ox)} | {ratio} |")
EOF
