#!/usr/bin/env bash
# Installs a CUDA 13.0 toolkit from NVIDIA's PyPI wheels into a folder, so that
# `cargo build --features cuda` works on a machine without a GPU or a system CUDA:
#   nvcc, crt, nvvm (cicc, libdevice) and cccl  - candle-kernels compiles its .cu files to PTX
#                                                 at build time, cudarc reads `nvcc --version`;
#   cudart, cublas, curand, nvrtc               - the libraries candle links (dynamic-linking);
#   lib/stubs/libcuda.so                        - a link-time stub of the driver API, made here
#                                                 from cuda.h (the driver itself comes with the
#                                                 GPU's driver install, never from a toolkit).
# Versions are pinned to CUDA 13.0 (the device machine's driver 580 and its PyTorch cu130).
#
# Usage: scripts/setup-cuda.sh [--compiler-only] [DIR]   (default DIR: .cuda/13.0 here)
# Then:  source DIR/env.sh && cargo build --release --features cuda
# --compiler-only skips cuBLAS, cuRAND, NVRTC and NCCL (~770 MB of the ~880 MB download): enough
# for `cargo check --features cuda` (CI), which compiles the kernels but links nothing.
# A second run with everything in place downloads nothing. Needs python3 with pip (installed
# with apt-get when missing) and gcc.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
compiler_only=0
if [ "${1:-}" = "--compiler-only" ]; then
  compiler_only=1
  shift
fi
dir="${1:-$root/.cuda/13.0}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

# name==version, one per wheel; the toolkit of CUDA 13.0 update 2.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
)
if [ "$compiler_only" = 0 ]; then
  wheels+=(nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
    nvidia-nccl-cu13==2.28.9)
fi
stamp="$dir/.installed"
want="$(printf '%s\n' "${wheels[@]}")"
# Installed already when the stamp lists every wanted wheel (a full install also serves
# --compiler-only, so CI-style runs never strip a developer's libraries).
have_all=1
[ -f "$stamp" ] || have_all=0
for w in "${wheels[@]}"; do
  [ "$have_all" = 1 ] && grep -qxF "$w" "$stamp" || have_all=0
done
if [ "$have_all" = 1 ] && [ -x "$dir/bin/nvcc" ] && [ -f "$dir/lib/stubs/libcuda.so" ]; then
  echo "CUDA 13.0 toolkit already in $dir"
else
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
      $sudo apt-get update -qq && $sudo apt-get install -y -qq python3-pip >/dev/null
    else
      echo "python3 with pip is required" >&2
      exit 1
    fi
  fi
  command -v gcc >/dev/null 2>&1 || { echo "gcc is required (apt-get install gcc)" >&2; exit 1; }
  download="$dir/.wheels"
  mkdir -p "$download"
  echo "downloading ${#wheels[@]} CUDA 13.0 wheels into $download"
  python3 -m pip download --quiet --no-cache-dir --no-deps --dest "$download" "${wheels[@]}"
  staging="$dir/.staging"
  rm -rf "$staging"
  mkdir -p "$staging"
  for w in "$download"/*.whl; do
    # A wheel is a zip; its files sit under nvidia/cu13/ (bin, include, lib, nvvm).
    python3 -m zipfile -e "$w" "$staging"
  done
  for sub in bin include lib nvvm; do
    rm -rf "${dir:?}/$sub"
    mv "$staging/nvidia/cu13/$sub" "$dir/$sub"
  done
  # NCCL's wheel keeps its own tree (nvidia/nccl/{include,lib}): merged into the toolkit's.
  if [ -d "$staging/nvidia/nccl" ]; then
    cp -a "$staging/nvidia/nccl/include/." "$dir/include/"
    cp -a "$staging/nvidia/nccl/lib/." "$dir/lib/"
  fi
  rm -rf "$staging"
  # zip does not keep the executable bit.
  chmod +x "$dir"/bin/* "$dir"/nvvm/bin/*

  # The unversioned names the linker looks for (-lcublas ...), as a toolkit install has them.
  for lib in "$dir"/lib/lib*.so.*; do
    base="$(basename "$lib")"
    ln -sf "$base" "$dir/lib/${base%%.so.*}.so"
  done

  # libcuda.so stub: every driver entry point cuda.h declares (after its #defines map the
  # names to the versioned symbols, cuMemAlloc -> cuMemAlloc_v2), as an empty function, with
  # the driver's soname so that the real libcuda.so.1 is what loads at run time.
  mkdir -p "$dir/lib/stubs"
  printf '#include <cuda.h>\n' > "$dir/lib/stubs/cuda_stub_src.c"
  gcc -E -I"$dir/include" "$dir/lib/stubs/cuda_stub_src.c" \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' \
    | tr -d ' (' | sort -u \
    | awk '{ print "void " $1 "(void) {}" }' > "$dir/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -o "$dir/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 \
    "$dir/lib/stubs/cuda_stub.c"
  rm -f "$dir/lib/stubs/cuda_stub_src.c" "$dir/lib/stubs/cuda_stub.c"
  rm -rf "$download"
  printf '%s\n' "$want" > "$stamp"
  echo "installed CUDA 13.0 toolkit in $dir"
fi

# What a build needs: nvcc on PATH, the toolkit root for cudarc and candle-kernels, and a
# compute capability when no GPU can be queried (90: H100/H200; override for other GPUs).
cat > "$dir/env.sh" <<EOF
export CUDA_HOME="$dir"
export CUDA_PATH="$dir"
export PATH="$dir/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$dir/lib:$dir/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
"$dir/bin/nvcc" --version | tail -2
echo "now: source $dir/env.sh"
