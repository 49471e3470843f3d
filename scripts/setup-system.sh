#!/usr/bin/env bash
# Installs the system packages clipcid builds against (Debian/Ubuntu), only those missing:
#   cmake >= 3.24 and g++  - faiss is compiled from the source the faiss-sys crate vendors
#                            (its `static` feature) and linked statically; ~2 min on 2 cores,
#                            once per target folder and profile;
#   libopenblas-dev        - BLAS for faiss and for clipcid-dedup's CPU distance tiles;
#   libopenblas0-openmp    - the OpenMP build of OpenBLAS, which the workspace's binaries load
#                            first (run path in .cargo/config.toml): it shares faiss's OpenMP
#                            threads instead of spinning against them;
#   liblapack-dev          - LAPACK, which faiss links.
# Called by .ci/run; run it once by hand on a fresh machine before the README's commands.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
for pkg in libopenblas-dev libopenblas0-openmp liblapack-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing: ${need[*]} (install them with your system's package manager)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "installing ${need[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
