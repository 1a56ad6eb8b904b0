#!/usr/bin/env bash
# Wheels of everything requirements.txt needs besides torch, for a GPU machine without network
# (scripts/gpu_check.py): `make gpu-wheels`, or
#
#   scripts/gpu_wheels.sh [DEST]        (default DEST: wheels/, ignored by git)
#
# Environment:
#   GPU_PYTHON        the GPU machine's Python, e.g. 3.12 (default): binary wheels are per version
#   GPU_TORCHVISION   torchvision release for the machine's torch (default 0.26, for torch 2.11);
#                     installed only where torchvision is missing, without dependencies
#   GPU_WHEELS_SKIP   distributions the machine already has, left out to keep DEST small, e.g.
#                     "numpy pillow scipy" (a machine's own check: `pip list`)
#   PIP               pip to run (default: python3 -m pip)
#
# On the GPU machine, from the repository root:
#   pip install --no-index --find-links wheels -r requirements.txt   # installs only what is missing
#   PYTHONPATH=$PWD python scripts/gpu_check.py --out gpu_check.jsonl
set -euo pipefail

DEST=${1:-wheels}
GPU_PYTHON=${GPU_PYTHON:-3.12}
GPU_TORCHVISION=${GPU_TORCHVISION:-0.26}
GPU_WHEELS_SKIP=${GPU_WHEELS_SKIP:-}
read -r -a PIP <<<"${PIP:-python3 -m pip}"
cd "$(dirname "$0")/.."
mkdir -p "$DEST"
abi="cp${GPU_PYTHON/./}"
target=(--only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp --abi "$abi" --abi abi3 --abi none
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform any)

# omegaconf's parser runtime is published as a source archive only: built here into a pure-Python wheel.
"${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$DEST" "antlr4-python3-runtime==4.9.3"
# everything else as released binary wheels for the target Python (torch and its CUDA libraries excluded)
grep -v -E '^\s*(#|$|torch([<>=! ]|$)|torchvision)' requirements.txt >"$DEST/.requirements"
"${PIP[@]}" download --quiet --dest "$DEST" --find-links "$DEST" "${target[@]}" -r "$DEST/.requirements"
"${PIP[@]}" download --quiet --no-deps --dest "$DEST" "${target[@]}" "torchvision==${GPU_TORCHVISION}.*"
rm -f "$DEST/.requirements"

for name in $GPU_WHEELS_SKIP; do
    stem=$(echo "$name" | tr '[:upper:]-' '[:lower:]_')
    find "$DEST" -maxdepth 1 -iname "${stem}-*.whl" -print -delete | sed 's/^/skipped: /'
done

total=$(du -sm "$DEST" | cut -f1)
echo "gpu-wheels: $(find "$DEST" -name '*.whl' | wc -l) wheels for CPython $GPU_PYTHON in $DEST ($total MB)"
if [ "$total" -gt 64 ]; then
    echo "gpu-wheels: more than 64 MB; the largest:" >&2
    du -m "$DEST"/*.whl | sort -rn | head -n 5 >&2
    echo "gpu-wheels: leave out what the GPU machine has, e.g. GPU_WHEELS_SKIP=\"numpy pillow scipy\"" >&2
fi
