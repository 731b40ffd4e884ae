#!/usr/bin/env bash
# GPU check of the Triton scan in one go (the device machine starts bare and keeps nothing):
#   1. build mamba-ssm's selective_scan_cuda from its sdist for sm_90 only, in the background (~3 min);
#   2. run tests/test_triton_scan.py (GPU kernels vs the float64 reference);
#   3. time our scan (inputs (B, E, L), then time-major) and mixer core against mamba-ssm once it is built.
# Results land in benchmarks/results/ and in $OUT/results.tgz (unpack it at the repository root), beside the logs.
# Usage, from the repository root on a machine with an H100/H200, nvcc and torch:
#   MAMBA_SDIST=path/mamba_ssm-2.3.2.post1.tar.gz [SWEEP=1] OUT=/tmp/out bash scripts/gpu_bench.sh
# SWEEP=1 first times several launch configs per shape (to $OUT/sweep.txt); the benchmarks then use
# default_config per shape, with SCAN_CONFIG=field=value,... overriding ScanConfig fields for every shape.
# Get the sdist (no CUDA needed) with:
#   MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: --no-build-isolation \
#       mamba-ssm==2.3.2.post1 -d <dir>
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MAMBA_DIR=/tmp/mamba_build

build_mamba() {
    mkdir -p "$MAMBA_DIR" && tar xzf "$MAMBA_SDIST" -C "$MAMBA_DIR" || return 1
    local src
    src=$(echo "$MAMBA_DIR"/mamba_ssm-*)
    # setup.py hard-codes 9 -gencode targets (CUDA 13) and ignores TORCH_CUDA_ARCH_LIST: keep sm_90 only.
    "$PY" - "$src/setup.py" <<'EOF' || return 1
import re, sys
p = sys.argv[1]
s = open(p).read()
s, n = re.subn(r'cc_flag\.append\("-gencode"\)\n(\s*)cc_flag\.append\("arch=compute_(?!90,)\d+,code=sm_\d+"\)',
               'pass', s)
open(p, "w").write(s)
print("gencode targets removed:", n)
EOF
    (cd "$src" && MAMBA_FORCE_BUILD=TRUE MAX_JOBS=16 "$PY" setup.py build_ext --inplace) || return 1
    echo "$src" > "$MAMBA_DIR/src"
}

if [ -n "${MAMBA_SDIST:-}" ]; then
    start=$(date +%s)
    (build_mamba > "$OUT/mamba_build.log" 2>&1; echo "build exit $? after $(( $(date +%s) - start )) s" \
        >> "$OUT/mamba_build.log") &
    build_pid=$!
fi

LOG="$OUT/bench.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/tests.log"
if [ "${TESTS:-1}" != 0 ]; then  # TESTS=0: benchmarks only (the tests already ran on this code)
    "$PY" -m pytest -q -n 8 -p no:cacheprovider tests/test_triton_scan.py 2>&1 | tail -25 | tee -a "$OUT/tests.log"
fi

if [ -n "${SWEEP:-}" ]; then
    # Bounded, so that the comparison below still runs inside a 10-minute lease.
    # Time-major inputs first (the mixer's layout), then (B, E, L).
    timeout "${SWEEP_S:-400}" bash -c "\"$PY\" benchmarks/bench_scan.py --sweep --time-major; \
        \"$PY\" benchmarks/bench_scan.py --sweep" 2>&1 | tee "$OUT/sweep.txt" | tee -a "$LOG"
fi

if [ -n "${MAMBA_SDIST:-}" ]; then
    wait "$build_pid"
    tail -3 "$OUT/mamba_build.log"
    if [ -f "$MAMBA_DIR/src" ]; then
        MAMBA_SRC=$(cat "$MAMBA_DIR/src")
        export MAMBA_SRC
    fi
fi
"$PY" benchmarks/bench_scan.py 2>&1 | tee -a "$LOG" | grep -v "^{"
"$PY" benchmarks/bench_scan.py --time-major 2>&1 | tee -a "$LOG" | grep -v "^{"
"$PY" benchmarks/bench_block.py 2>&1 | tee -a "$LOG" | grep -v "^{"
# One archive: the device tool returns a limited number of files from $OUT (round 8 lost four of them).
tar czf "$OUT/results.tgz" benchmarks/results/scan.* benchmarks/results/scan_time_major.* benchmarks/results/block.*
