#!/usr/bin/env bash
# The same split under torchrun (or any launcher that sets RANK and WORLD_SIZE): one clipcid
# process per GPU of this node, each on its own device.
#   torchrun --nproc-per-node 8 --no-python examples/scale/embed-torchrun.sh
set -euo pipefail
: "${CLIPCID:=target/release/clipcid}"
: "${SHARDS:=/data/laion400m/{00000..41455}.tar}"
: "${TEACHER:=/models/teacher}"
: "${OUT:=/data/laion400m-embeddings}"
exec "$CLIPCID" --device "cuda:${LOCAL_RANK:-0}" embed --teacher "$TEACHER" --data "$SHARDS" \
    --out "$OUT" --dtype f16 --precision bf16 --batch-size 1024 --shard-size 100000 --quiet
