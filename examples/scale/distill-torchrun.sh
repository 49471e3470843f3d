#!/usr/bin/env bash
# Data-parallel distillation: one clipcid process per GPU of this node, started by torchrun,
# which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. batch_size in the
# config is per rank; N ranks at batch b train as one process at batch N b. Rank 0 writes the
# run folder (resume with the same number of ranks: add --resume). A rank waits at most
# CLIPCID_DIST_TIMEOUT seconds (default 600) for the others, to join or within a step.
#   torchrun --nproc-per-node 8 --no-python examples/scale/distill-torchrun.sh
set -euo pipefail
: "${CLIPCID:=target/release/clipcid}"
: "${CONFIG:=examples/reproduction/clip-cid-vit-b-32.toml}"
: "${OUT:=runs/clip-cid-b32}"
exec "$CLIPCID" --device "cuda:${LOCAL_RANK:-0}" distill --config "$CONFIG" --out "$OUT" --quiet "$@"
