#!/usr/bin/env bash
# Whole-model and mixer benchmarks against the released VideoMamba code path, on a bare GPU machine, in one
# command that ends within ~9.5 minutes (each step is bounded; results are written as they come):
#   1. build the released path's kernels (scripts/build_released_kernels.py, sm_90, bf16) in the background,
#      unless KERNELS names a folder that already holds them;
#   2. meanwhile compile our Triton kernels for this part's configurations (bench_model.py --models ours
#      --rounds 0; untimed: it fills Triton's cache for the timed run);
#   3. PART=1: bench_model.py at 8, 32 and 64 frames (targets first); PART=2: bench_block.py, then bench_model.py
#      at 16 frames and any of 32 that part 1 skipped (MODEL_ARGS overrides the part's bench_model arguments).
# Needs, under $CARRY (default .cache/gpu_carry): sdist/mamba_ssm-2.3.2.post1.tar.gz, sdist/causal_conv1d-1.7.0.tar.gz
# and VideoMamba/ (a checkout of OpenGVLab/VideoMamba, or the subfolders benchmarks/_released.py reads), with
# VideoMamba.commit holding its commit. BENCH_GIT_COMMIT=<this project's commit> is recorded in every result.
# $OUT receives: results/<stem>.{json,md}, kernels.tgz (the built modules and their build records, to carry
# as KERNELS into a later call), logs.tgz; the end of each log is printed.
#   PART=1 BENCH_GIT_COMMIT=<sha> OUT=/tmp/out bash scripts/gpu_bench_model.sh
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_bench_model}
PART=${PART:-1}
CARRY=${CARRY:-.cache/gpu_carry}
DEADLINE_S=${DEADLINE_S:-555}  # seconds after START by which everything, packing included, is done
PY=${PYTHON:-python3}
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
mkdir -p "$OUT/results" /tmp/gpu_logs
LOGS=/tmp/gpu_logs
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }

case "$PART" in
    1) DEFAULT_ARGS="--frames 8 32 64"; STEM=model ;;
    2) DEFAULT_ARGS="--frames 16 32"; STEM=model_part2 ;;
    *) echo "PART must be 1 or 2" >&2; exit 2 ;;
esac
read -r -a MODEL_ARGS <<< "${MODEL_ARGS:-$DEFAULT_ARGS}"
RELEASED=(--released-repo "$CARRY/VideoMamba" --released-commit "$(cat "$CARRY/VideoMamba.commit" 2>/dev/null)")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/env.log"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$LOGS/env.log"

if [ -n "${KERNELS:-}" ] && [ -f "$KERNELS/selective_scan_cuda.so" ] && [ -f "$KERNELS/causal_conv1d_cuda.so" ]; then
    EXT=$KERNELS
    echo "kernels carried in $EXT" | tee -a "$LOGS/env.log"
else
    EXT=/tmp/released_ext
    timeout 330 "$PY" scripts/build_released_kernels.py --sdists "$CARRY/sdist" --out "$EXT" --jobs 14 \
        > "$LOGS/build.log" 2>&1 &
    build_pid=$!
    timeout 300 "$PY" benchmarks/bench_model.py --models ours --rounds 0 "${MODEL_ARGS[@]}" \
        --stem warmup --results-dir /tmp/warmup > "$LOGS/warmup.log" 2>&1 &
    warm_pid=$!
    wait "$build_pid"; echo "build exit $? after $(( $(date +%s) - START )) s" | tee -a "$LOGS/build.log"
    # The warm-up gets 30 s more, then stops: the timed run must have the GPU to itself.
    for _ in $(seq 30); do kill -0 "$warm_pid" 2>/dev/null || break; sleep 1; done
    kill "$warm_pid" 2>/dev/null
    wait "$warm_pid"; echo "warm-up exit $? after $(( $(date +%s) - START )) s" | tee -a "$LOGS/warmup.log"
    tar czf "$OUT/kernels.tgz" -C "$EXT" . 2>/dev/null
fi
RELEASED+=(--released-ext "$EXT")
"$PY" benchmarks/bench_model.py "${RELEASED[@]}" --check-released 2>&1 | tee "$LOGS/check.log"

if [ "$PART" = 2 ]; then
    timeout $(( $(left) - 240 )) "$PY" benchmarks/bench_block.py "${RELEASED[@]}" --results-dir "$OUT/results" \
        2>&1 | tee "$LOGS/block.log" | grep -v "^{"
fi
# The budget stops starting configurations; the timeout is the backstop for the last one.
timeout $(( $(left) - 15 )) "$PY" benchmarks/bench_model.py "${RELEASED[@]}" "${MODEL_ARGS[@]}" \
    --budget-s $(( $(left) - 75 )) --stem "$STEM" --results-dir "$OUT/results" 2>&1 | tee "$LOGS/bench_model.log" \
    | grep -v "^{"
tar czf "$OUT/logs.tgz" -C "$LOGS" .
for log in "$LOGS"/*.log; do echo "== $log"; tail -4 "$log"; done
echo "done after $(( $(date +%s) - START )) s"
