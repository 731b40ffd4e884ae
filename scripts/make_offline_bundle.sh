#!/usr/bin/env bash
# Build the training stack for a GPU machine without internet whose image already has torch (and its usual
# neighbours): the packages in requirements/offline_bundle.txt at requirements/lock.txt's versions, for that
# machine's Python and platform, installed into one folder, trimmed, packed as .tar.xz and split into parts that
# fit a transfer limit. scripts/gpu_scaling.sh's `setup` phase unpacks the parts (BUNDLE_PARTS) in order.
#
#   bash scripts/make_offline_bundle.sh DEST [PYTHON_VERSION=3.12] [PART_MB=50]
#
# Needs pip with registry access and a local interpreter of PYTHON_VERSION (to install the wheels; pyenv's is
# fine). DeepSpeed ships only an sdist: its wheel is built here once (pure Python, no ops compiled).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST=${1:?usage: make_offline_bundle.sh DEST [PYTHON_VERSION] [PART_MB]}
PYV=${2:-3.12}
PART_MB=${3:-50}
PY=${BUNDLE_PYTHON:-python$PYV}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)

python3 "$REPO/scripts/lock_pins.py" "$REPO/requirements/offline_bundle.txt" > "$WORK/pins.txt"
grep -v '^deepspeed==' "$WORK/pins.txt" > "$WORK/binary_pins.txt"
mkdir -p "$WORK/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${PLATFORMS[@]}" -d "$WORK/wheels" -r "$WORK/binary_pins.txt"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "$(grep '^deepspeed==' "$WORK/pins.txt")"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WORK"/wheels/*.whl
# Ray's Java jar and the dashboard's source maps are a third of the download and unused here.
rm -rf "$WORK/site/ray/jars"
find "$WORK/site" \( -name '*.js.map' -o -name __pycache__ \) -prune -exec rm -rf {} +
mkdir -p "$DEST"
tar -C "$WORK/site" -cf - . | xz -T0 -6 | split -b "${PART_MB}M" -d - "$DEST/bundle.tar.xz.part"
ls -la "$DEST"
