#!/usr/bin/env bash
# The one-call GPU check: clipcid's CPU-vs-CUDA parity checks, then the same three workloads
# in clipcid and in PyTorch on the same GPU, printed as one table (see scripts/gpu-check.py).
#
# Two halves, because the GPU machine has no Rust toolchain and reaches no registry:
#   scripts/gpu-check.sh --pack   here: builds `clipcid` with `--features nccl` (release),
#                                 strips it and packs it with the shared libraries it needs
#                                 that a bare machine may lack (OpenBLAS, LAPACK, gfortran)
#                                 and the device-parametrised test binaries (same features)
#                                 into gpu-check/pack.tar.xz (with the working tree at
#                                 most 63 MiB, to carry);
#   scripts/gpu-check.sh          there: unpacks, points LD_LIBRARY_PATH at the CUDA
#                                 libraries of the Python environment's nvidia-* wheels, runs
#                                 `clipcid --device cuda:0 self-check --bench` and then
#                                 gpu-check.py, prints the tables, then runs the packed
#                                 device-parametrised test binaries. At most ~8 minutes.
# Through the device tool: run(command="scripts/gpu-check.sh", carry=["gpu-check"]);
# `scripts/gpu-check.sh --quick` skips PyTorch and all but the kernel, parity and model tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/gpu-check"

if [ "${1:-}" = "--pack" ]; then
  "$root/scripts/setup-cuda.sh" >/dev/null
  # shellcheck source=/dev/null
  source "$root/.cuda/13.0/env.sh"
  # A target folder of its own: its C++ flags (below) differ from a plain build's, and
  # faiss-sys's artifacts would otherwise be shared, and rebuilt for whichever came last.
  target="${CARGO_TARGET_DIR:-$root/target/gpu-pack}"
  export CARGO_TARGET_DIR="$target"
  # The pack runs on another machine's CPU. .cargo/config.toml compiles C++ (faiss, and the
  # tokenizer's and the kernel emulator's) for this one (-march=native); on a GPU host whose
  # CPU lacks an instruction this one has (AVX-512 FP16 or AMX, say), the binary could stop
  # with SIGILL. faiss's own AVX2 level runs on any x86-64 host of an H100 or H200, and the
  # check times no k-means. The environment's value overrides the config's.
  export CXXFLAGS_x86_64_unknown_linux_gnu="-mavx2 -mfma -mf16c -mpopcnt"
  # Build scripts that do not watch the variable keep their old objects: rebuild them when
  # the flags differ from the last pack's, or when faiss's build log (its compile lines) shows
  # a build for this CPU, as a plain `cargo build` into the same target folder leaves it.
  stamp="$target/.clipcid-pack-cxxflags"
  faiss_native() {
    grep -l -- '-march=native' "$target"/{release,debug}/build/faiss-sys-*/output 2>/dev/null
  }
  if [ "$(cat "$stamp" 2>/dev/null)" != "$CXXFLAGS_x86_64_unknown_linux_gnu" ] \
      || faiss_native >/dev/null; then
    for profile in release dev; do
      (cd "$root" && cargo clean --profile "$profile" \
        -p faiss-sys -p esaxx-rs -p clipcid-cuda-emulator)
    done
  fi
  # `nccl` (a superset of `cuda`): self-check then also runs a one-rank NCCL group.
  (cd "$root" && cargo build --release -p clipcid --features nccl)
  rm -rf "$out" && mkdir -p "$out/stage/lib"
  cp "$target/release/clipcid" "$out/stage/clipcid"
  strip "$out/stage/clipcid"
  # Libraries outside glibc and CUDA (those come with the GPU machine's driver and wheels).
  ldd "$out/stage/clipcid" | awk '/=> \// { print $3 }' \
    | grep -vE '/(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|ld-linux[^/]*|libcuda|libcublas[A-Za-z]*|libcurand|libnvrtc|libcudart|libnccl)\.so' \
    | while read -r lib; do cp -L "$lib" "$out/stage/lib/"; done
  # The device-parametrised tests (kernels, models, losses, dedup, trainer, pipeline parity), built
  # with the same features, so the GPU machine asserts their properties on cuda:0 as well.
  mkdir -p "$out/stage/tests"
  (cd "$root" && cargo test --no-run --message-format=json --features clipcid-pipeline/nccl \
      -p clipcid-dedup -p clipcid-kernels -p clipcid-loss -p clipcid-models -p clipcid-pipeline \
      -p clipcid-train) \
    | python3 -c '
import json, sys
want = {"balance", "fused_ops", "losses", "model", "devices", "distill"}
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("kind") == ["test"] \
            and t.get("name") in want and m.get("executable"):
        print(t["name"], m["executable"])' \
    | while read -r name exe; do cp "$exe" "$out/stage/tests/$name" && strip "$out/stage/tests/$name"; done
  if faiss_native; then
    echo "faiss built with -march=native is still in $target (above): cargo clean -p faiss-sys" >&2
    exit 1
  fi
  echo "$CXXFLAGS_x86_64_unknown_linux_gnu" > "$stamp"
  found=$(find "$out/stage/tests" -type f | wc -l)
  if [ "$found" -ne 6 ]; then
    echo "expected 6 device-parametrised test binaries, built $found" >&2
    exit 1
  fi
  # Tests find fixtures under the source root they were built in; the GPU machine links it.
  echo "$root" > "$out/stage/build-root"
  tar -C "$out/stage" -cJf "$out/pack.tar.xz" .
  rm -rf "$out/stage"
  ls -l "$out/pack.tar.xz"
  # The device tool carries the working tree and this pack, 64 MiB in all; keep 1 MiB spare.
  size=$(stat -c %s "$out/pack.tar.xz")
  tree=$(cd "$root" && { git ls-files -z --cached --others --exclude-standard \
    | xargs -0 stat -c %s 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }')
  if [ $((size + tree)) -gt $((63 * 1024 * 1024)) ]; then
    echo "pack.tar.xz is $size bytes and the working tree $tree: over the 63 MiB that" \
      "leaves room to carry both (64 MiB in all)" >&2
    exit 1
  fi
  echo "pack.tar.xz $size bytes + working tree $tree bytes, of 64 MiB carried"
  exit 0
fi

if [ ! -f "$out/pack.tar.xz" ]; then
  echo "no $out/pack.tar.xz: run scripts/gpu-check.sh --pack first, and carry gpu-check/" >&2
  exit 1
fi
# The device tool returns the last 12,000 characters of output and what is under $OUT: the
# whole log goes there too.
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  exec > >(tee "$OUT/gpu-check.log") 2>&1
fi
work="$(mktemp -d)"
tar -C "$work" -xJf "$out/pack.tar.xz"
python="${PYTHON:-python3}"
cuda_libs="$("$python" - <<'EOF'
import glob, os
try:
    import nvidia
    dirs = sorted({os.path.dirname(p) for base in nvidia.__path__
                   for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)})
    print(":".join(dirs))
except ImportError:
    print("")
EOF
)"
# Only for clipcid: PyTorch below keeps its own library path.
clipcid_libs="$work/lib${cuda_libs:+:$cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The driver's libcuda: the loader's cache finds it where PyTorch does; the GPU machine's
# driver folder is added in case only PyTorch's own start-up knows it.
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -d "$d" ] && clipcid_libs="$clipcid_libs:$d"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Name a shared library nothing provides before the binary fails on it in one opaque line.
missing="$(LD_LIBRARY_PATH="$clipcid_libs" ldd "$work/clipcid" | awk '/not found/ { print $1 }' \
  | tr '\n' ' ')"
[ -z "$missing" ] || echo "clipcid's libraries not found: $missing(LD_LIBRARY_PATH: $clipcid_libs)"

echo "## clipcid self-check (parity with the CPU) and throughput"
status=0
LD_LIBRARY_PATH="$clipcid_libs" "$work/clipcid" --device cuda:0 self-check --bench \
  | tee "$work/bench.md" || status=$?

# `--quick`: clipcid's own tables and the kernel, parity and model tests only (about a minute),
# for a second look after a change; the full check compares with PyTorch and runs all tests.
quick=0
[ "${1:-}" = "--quick" ] && quick=1
if [ "$quick" = 0 ]; then
  echo
  echo "## clipcid vs PyTorch, same GPU, same run"
  "$python" "$root/scripts/gpu-check.py" --clipcid "$work/bench.md" || status=$?
fi

if [ -d "$work/tests" ]; then
  echo
  echo "## device-parametrised tests (each property on the CPU and on cuda:0)"
  build_root="$(cat "$work/build-root")"
  if [ ! -e "$build_root" ]; then
    mkdir -p "$(dirname "$build_root")" && ln -s "$root" "$build_root" || true
  fi
  # The newest kernels first; each binary at most 90 s, so all six fit the call's budget.
  names="fused_ops devices model losses balance distill"
  [ "$quick" = 1 ] && names="fused_ops devices model"
  for name in $names; do
    t="$work/tests/$name"
    echo "### $name"
    (cd "$root" && CLIPCID_EXPECT_CUDA=1 LD_LIBRARY_PATH="$clipcid_libs" \
      timeout 90 "$t" --test-threads 4 2>&1 \
      | grep -E -A1 'test result|FAILED|panicked' | grep -v '^--$' | tail -n 16) || status=$?
  done
fi
rm -rf "$work"
exit "$status"
