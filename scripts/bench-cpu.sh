#!/usr/bin/env bash
# CPU speed against the peers in one run: the image tower's forward (student w384 L6 h12 and
# teacher ViT-B/32) against ONNX Runtime and PyTorch, and the student's training step against
# PyTorch, then one table of ratios (clipcid / fastest peer; at or under 1.0x is the goal).
#
#   scripts/bench-cpu.sh [--python PY] [--peers DIR] [--batch 32] [--reps 5]
#
# PY is the peers' Python (default $CLIPCID_PEERS_PYTHON, else ~/peers-venv/bin/python; make
# it as ../shared/peers/README.md says). Without it, or without DIR (default ../shared/peers
# beside the checkout), only clipcid's figures are printed, with the reason. Everything runs
# twice, in opposite orders, and each figure is the better of its two medians. Close other
# work first: this machine's timings move by up to 20% between runs, so compare figures from
# one run of this script only. About 8 minutes on 2 cores.
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
        -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#'; exit 0 ;;
        *) echo "bench-cpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
threads="$(nproc)"

have_peers=1
if [ ! -x "$python" ]; then
    echo "(peers skipped: no Python at $python; see ../shared/peers/README.md)"
    have_peers=0
elif [ ! -f "$peers/bench_vit.py" ]; then
    echo "(peers skipped: no $peers/bench_vit.py)"
    have_peers=0
fi

# Each measurement writes $out/<name>.<round>.txt.
clipcid_fwd() {
    echo "== clipcid image-tower forward (cargo bench --bench vit_forward), round $1"
    cargo bench -q --bench vit_forward -- --batch "$batch" --reps "$reps" --warmup 1 \
        --models teacher,s12 | tee "$out/clipcid_fwd.$1.txt"
}
clipcid_train() {
    echo "== clipcid train step (cargo bench --bench train_step), round $1"
    cargo bench -q --bench train_step -- --batch "$batch" --reps "$reps" --warmup 2 \
        | tee "$out/clipcid_train.$1.txt"
}
ort() {
    [ "$have_peers" = 1 ] || return 0
    echo "== ONNX Runtime forward (bench_vit_ort.py), round $1"
    (cd "$peers" && "$python" bench_vit_ort.py --batch "$batch" --reps "$reps" --warmup 2 \
        --threads "$threads" 2>/dev/null) | tee "$out/ort.$1.txt"
}
torch() {
    [ "$have_peers" = 1 ] || return 0
    echo "== PyTorch forward and train step (bench_vit.py), round $1"
    (cd "$peers" && "$python" bench_vit.py --batch "$batch" --reps "$reps" --warmup 2 \
        --threads "$threads" 2>/dev/null) | tee "$out/torch.$1.txt"
}

# Two rounds in opposite orders (clipcid, peers, peers, clipcid), each figure the better of
# its two: a long run heats the machine and slows whatever follows it, so neither side may
# always go first.
clipcid_fwd 1; clipcid_train 1; ort 1; torch 1
torch 2; ort 2; clipcid_train 2; clipcid_fwd 2

python3 - "$out" "$batch" "$threads" <<'EOF'
import re, sys
out, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3]

def read(name):
    """Each round's lines of one measurement."""
    rounds = []
    for r in (1, 2):
        try:
            rounds.append(open(f"{out}/{name}.{r}.txt").read().splitlines())
        except FileNotFoundError:
            pass
    return rounds

def cell(rounds, pattern, col):
    """Column `col` of the first line matching `pattern`, as a float; the least over rounds."""
    found = []
    for lines in rounds:
        for line in lines:
            if re.search(pattern, line):
                parts = [p for p in re.split(r"\s*\|\s*|\s{2,}", line.strip()) if p]
                found.append(float(parts[col]))
                break
    return min(found) if found else None

fwd, train = read("clipcid_fwd"), read("clipcid_train")
ort, torch = read("ort"), read("torch")
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
print(f"batch {batch}, f32, 224 px, {threads} threads; median s/batch of each run, the better")
print("of two rounds run in opposite orders")
print()
print("| model | clipcid | PyTorch | ONNX Runtime | clipcid / best |")
print("|---|---:|---:|---:|---:|")
for name, ours, pt, ox in rows:
    peers = [v for v in (pt, ox) if v is not None]
    ratio = f"{ours / min(peers):.2f}x" if ours is not None and peers else "-"
    print(f"| {name} | {fmt(ours)} | {fmt(pt)} | {fmt(ox)} | {ratio} |")
EOF
