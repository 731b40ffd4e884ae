#!/usr/bin/env bash
# Pack what `scripts/gpu_data.sh` needs on a GPU machine without internet into one archive that fits a 64 MiB
# transfer: the packages in requirements/gpu_data_bundle.txt at requirements/lock.txt's versions, for the GPU
# machine's Python (default 3.12), installed into one folder, trimmed (botocore keeps only the S3 and STS models:
# its other 400 services are 27 MB), packed as DEST/gpu_data_site.tar.xz.
#
#   bash scripts/gpu_data_bundle.sh DEST [PYTHON_VERSION=3.12]
#
# Needs pip with registry access here; nothing is run with the target Python (pip installs for another
# interpreter with --python-version and --target).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST=${1:?usage: gpu_data_bundle.sh DEST [PYTHON_VERSION]}
PYV=${2:-3.12}
PIP=(python3 -m pip)
[[ -x "$REPO/.venv/bin/python" ]] && PIP=("$REPO/.venv/bin/python" -m pip)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TARGET=(--only-binary=:all: --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64)

python3 "$REPO/scripts/lock_pins.py" "$REPO/requirements/gpu_data_bundle.txt" > "$WORK/pins.txt"
"${PIP[@]}" download -q --no-deps "${TARGET[@]}" -d "$WORK/wheels" -r "$WORK/pins.txt"
"${PIP[@]}" install -q --no-index --no-deps --no-compile "${TARGET[@]}" --target "$WORK/site" "$WORK"/wheels/*.whl
find "$WORK/site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
rm -rf "$WORK/site/torchcodec/_core"/*.cpp "$WORK/site/torchcodec/_core"/*.h "$WORK/site/torchcodec/share" \
       "$WORK/site/bin"
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$DEST"
tar -C "$WORK/site" -cf - . | xz -T0 -6 > "$DEST/gpu_data_site.tar.xz"
ls -la "$DEST/gpu_data_site.tar.xz"
