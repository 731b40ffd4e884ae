#!/usr/bin/env bash
# GPU check of the Triton scan in one go (the device machine starts bare and keeps nothing):
#   1. build mamba-ssm's and causal-conv1d's kernels from their sdists for sm_90 (bf16) in the background
#      (scripts/build_released_kernels.py);
#   2. run tests/gpu/test_triton_scan.py (GPU kernels vs the float64 reference);
#   3. time our scan (inputs (B, E, L), then time-major) against mamba-ssm's selective_scan_fn, and the mixer core
#      against the released VideoMamba's fused path (bench_block.py), once the kernels are built.
# Results land in benchmarks/results/ and in $OUT/results.tgz (unpack it at the repository root), beside the logs.
# Usage, from the repository root on a machine with an H100/H200, nvcc and torch:
#   [CARRY=.cache/gpu_carry] [SWEEP=1] OUT=/tmp/out bash scripts/gpu_bench.sh
# CARRY holds sdist/ (mamba_ssm-2.3.2.post1.tar.gz, causal_conv1d-1.7.0.tar.gz) and VideoMamba/ (a checkout of
# OpenGVLab/VideoMamba, read by benchmarks/_released.py). Get the sdists (no CUDA needed) with:
#   MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: \
#       --no-build-isolation mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 -d $CARRY/sdist
# SWEEP=1 first times several launch configs per shape (to $OUT/sweep.txt); the benchmarks then use
# default_config per shape, with SCAN_CONFIG=field=value,... overriding ScanConfig fields for every shape.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
CARRY=${CARRY:-.cache/gpu_carry}
mkdir -p "$OUT"
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
EXT=/tmp/released_ext
WORK=/tmp/released_kernels_build

start=$(date +%s)
("$PY" scripts/build_released_kernels.py --sdists "$CARRY/sdist" --out "$EXT" --work "$WORK" \
    > "$OUT/kernels_build.log" 2>&1; echo "build exit $? after $(( $(date +%s) - start )) s" \
    >> "$OUT/kernels_build.log") &
build_pid=$!

LOG="$OUT/bench.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/tests.log"
if [ "${TESTS:-1}" != 0 ]; then  # TESTS=0: benchmarks only (the tests already ran on this code)
    "$PY" -m pytest -q -n 8 -p no:cacheprovider tests/gpu/test_triton_scan.py 2>&1 | tail -25 | tee -a "$OUT/tests.log"
fi

if [ -n "${SWEEP:-}" ]; then
    # Bounded, so that the comparison below still runs inside a 10-minute lease.
    # Time-major inputs first (the mixer's layout), then (B, E, L).
    timeout "${SWEEP_S:-400}" bash -c "\"$PY\" benchmarks/bench_scan.py --sweep --time-major; \
        \"$PY\" benchmarks/bench_scan.py --sweep" 2>&1 | tee "$OUT/sweep.txt" | tee -a "$LOG"
fi

wait "$build_pid"
tail -3 "$OUT/kernels_build.log"
export MAMBA_SRC="$WORK/selective_scan_cuda/src/mamba_ssm-2.3.2.post1" MAMBA_EXT="$EXT"
"$PY" benchmarks/bench_scan.py 2>&1 | tee -a "$LOG" | grep -v "^{"
"$PY" benchmarks/bench_scan.py --time-major 2>&1 | tee -a "$LOG" | grep -v "^{"
"$PY" benchmarks/bench_block.py --released-repo "$CARRY/VideoMamba" --released-ext "$EXT" 2>&1 | tee -a "$LOG" \
    | grep -v "^{"
# One archive: the device tool returns a limited number of files from $OUT.
tar czf "$OUT/results.tgz" benchmarks/results/scan.* benchmarks/results/scan_time_major.* benchmarks/results/block.*
