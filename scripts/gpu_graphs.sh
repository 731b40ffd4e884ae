#!/usr/bin/env bash
# CUDA graphs for every stage and the training step's host syncs, checked and measured on one GPU in one command
# (at most 6 minutes: every part is bounded by a timeout, 140 + 90 + 120 s):
#   1. the GPU tests: tests/gpu/test_cuda_graph.py (replay against eager, every stage, DeepSpeed ZeRO-1/2),
#      tests/unit/test_host_syncs.py (syncs per step of real stage steps), tests/unit/test_sampling.py (the GPU draws);
#   2. benchmarks/bench_distill.py: Stage 2 (VideoMamba-S -> M) and Stage 4 (VideoMamba-S, 8 frames) steps, eager
#      against CUDA-graphed, side by side;
#   3. benchmarks/bench_syncs.py: host syncs per step of every stage through the Trainer, the code before the
#      change against this one.
# Results land in benchmarks/results/{distill,syncs}.{json,md} and in $OUT/results.tgz (unpack it at the
# repository root, then run scripts/render_performance.py); logs in $OUT.
#
#   bash scripts/gpu_graphs.sh prepare [BASE]   # here, with registry access: the carry folder, .cache/gpu_graphs
#                                               # (PYTHON: an interpreter with torch and pip; default .venv's)
#   OUT=/tmp/out bash scripts/gpu_graphs.sh run  # on the GPU machine, with .cache/gpu_graphs carried
#
# prepare writes .cache/gpu_graphs/wheels (the packages in requirements/gpu_graphs_bundle.txt at the lock file's
# versions for Python 3.12 / manylinux x86-64: DeepSpeed, PyAV, WebDataset, open_clip, pytest; ~45 MB) and
# .cache/gpu_graphs/before (pipeline/, models/, configs/ of BASE, default: the commit before this change's first,
# as `git archive`), the code bench_syncs.py measures as "before".
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CARRY=${CARRY:-.cache/gpu_graphs}

prepare() {
  local base=${1:-$(git log --format=%H --grep='replay from CUDA graphs; the step reads the GPU once' | tail -1)~1}
  # pip of an interpreter that has torch: DeepSpeed's setup.py imports it (the repository's .venv by default)
  local py=${PYTHON:-python3}
  [[ -z "${PYTHON:-}" && -x "$REPO/.venv/bin/python" ]] && py="$REPO/.venv/bin/python"
  set -e
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/before"
  git archive "$base" pipeline models configs | tar -x -C "$CARRY/before"
  git rev-parse "$base" > "$CARRY/before/COMMIT"
  git rev-parse HEAD > "$CARRY/COMMIT"  # the code that runs (result files record it: BENCH_GIT_COMMIT)
  python3 scripts/lock_pins.py requirements/gpu_graphs_bundle.txt > "$CARRY/pins.txt"
  local target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
                --platform manylinux1_x86_64)
  # DeepSpeed ships only an sdist: its pure-Python wheel is built here (no ops compiled).
  grep -v '^deepspeed==' "$CARRY/pins.txt" > "$CARRY/binary_pins.txt"
  "$py" -m pip download -q --no-deps "${target[@]}" -d "$CARRY/wheels" -r "$CARRY/binary_pins.txt"
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/wheels" \
    "$(grep '^deepspeed==' "$CARRY/pins.txt")"
  du -sh "$CARRY"
}

run() {
  OUT=${OUT:-/tmp/gpu_graphs}
  mkdir -p "$OUT"
  local site=/tmp/site_graphs
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$CARRY"/wheels/*.whl > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; echo "FAIL: wheels"; exit 1; }
  export PYTHONPATH="$REPO:$REPO/benchmarks:$site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DS_BUILD_OPS=0
  export BENCH_GIT_COMMIT=${BENCH_GIT_COMMIT:-$(cat "$CARRY/COMMIT")}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  python3 -c "import torch, triton, deepspeed, av, open_clip; print('torch', torch.__version__, 'triton',
triton.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
  local start=$SECONDS status=0
  # -v: one line per test as it ends, so a run cut off by the timeout still says how far it got
  # the carried pytest with its timeout plugin only: the image's own plugins need not suit this pytest
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 140 python3 -m pytest -p pytest_timeout -v --tb=short -m gpu \
    -p no:cacheprovider -o addopts="-rs" -o timeout=100 \
    tests/gpu/test_cuda_graph.py tests/unit/test_host_syncs.py tests/unit/test_sampling.py > "$OUT/tests.log" 2>&1 || status=1
  grep -E " (PASSED|FAILED|ERROR|SKIPPED)" "$OUT/tests.log" | sed 's/ *\[ *[0-9]*%\]//' | tail -45
  grep -E "^(FAILED|ERROR) |^E  |passed|failed" "$OUT/tests.log" | tail -30
  echo "tests: $((SECONDS - start)) s"
  timeout 90 python3 benchmarks/bench_distill.py --warmup 2 --steps 6 > "$OUT/bench_distill.log" 2>&1 || status=1
  grep -E '^\||^# ' "$OUT/bench_distill.log"; tail -3 "$OUT/bench_distill.log"
  echo "bench_distill: $((SECONDS - start)) s"
  timeout 120 python3 benchmarks/bench_syncs.py --before "$CARRY/before" --timeout-s 58 \
    > "$OUT/bench_syncs.log" 2>&1 || status=1
  grep -E '^\||^# ' "$OUT/bench_syncs.log"; tail -3 "$OUT/bench_syncs.log"
  echo "bench_syncs: $((SECONDS - start)) s"
  tar czf "$OUT/results.tgz" benchmarks/results/distill.* benchmarks/results/syncs.* 2>/dev/null
  exit $status
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) echo "usage: $0 prepare [BASE] | run" >&2; exit 2 ;;
esac
