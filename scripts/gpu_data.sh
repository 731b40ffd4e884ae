#!/usr/bin/env bash
# The data path on a GPU machine without internet, in one go: per-core decode rates of PyAV and torchcodec on every
# footage kind (raw and preprocessed), NVDEC decoding through torchcodec, the training loader with up to all cores,
# and the data wait of Stage 1 VideoMamba-S with CUDA graphs fed from S3 shards on a local moto server
# (benchmarks/bench_data.py --gpu -> benchmarks/results/data_gpu.{json,md}), plus the NVDEC test.
#
#   bash scripts/gpu_data_bundle.sh .whl          # here, once: the packages the GPU image lacks (~44 MB)
#   OUT=/tmp/out BENCH_GIT_COMMIT=<sha> bash scripts/gpu_data.sh      # there, from the repository root
#
# BUNDLE (default .whl/gpu_data_site.tar.xz) is unpacked into SITE (default /tmp/site) unless that is done.
# torchcodec uses PyAV's bundled FFmpeg: its folder goes on LD_LIBRARY_PATH before Python starts. Results and logs
# are packed into $OUT/results.tgz (unpack at the repository root).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT=${OUT:-/tmp/gpu_data}
SITE=${SITE:-/tmp/site}
BUNDLE=${BUNDLE:-.whl/gpu_data_site.tar.xz}
WORK=${WORK:-/tmp/bench_data}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$SITE:$REPO:$REPO/benchmarks" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
step() { printf '\n==> %s (%s)\n' "$*" "$(date +%T)"; }

if [[ ! -f "$SITE/.complete" ]]; then
  step "unpacking $BUNDLE into $SITE"
  mkdir -p "$SITE" && tar -xJf "$BUNDLE" -C "$SITE" && touch "$SITE/.complete" || exit 1
fi
LD_LIBRARY_PATH="$(python3 -m pipeline.data.ffmpeg_libs "$WORK")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" || exit 1
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
df -h /dev/shm | tee -a "$OUT/gpu.txt"  # loader workers hand batches over in shared memory
python3 -c "import torch, av, torchcodec; print('torch', torch.__version__, 'av', av.__version__, 'torchcodec',
torchcodec.__version__, 'FFmpeg', torchcodec.ffmpeg_major_version)" 2>&1 | tee -a "$OUT/gpu.txt"

status=0
step "NVDEC test (tests/unit/test_data_torchcodec.py -m gpu)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_data_torchcodec.py 2>&1 | tail -15 | tee "$OUT/tests.log"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
step "benchmarks/bench_data.py --gpu"
python3 benchmarks/bench_data.py --gpu --work-dir "$WORK" --workers 1 4 "$(( $(nproc) - 1 ))" --batch-size 32 \
  --batches 6 --clips "${CLIPS:-8}" 2>&1 | tee "$OUT/bench.log" | grep -v "^{'footage"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
tar czf "$OUT/results.tgz" benchmarks/results/data_gpu.json benchmarks/results/data_gpu.md -C "$OUT" bench.log \
  tests.log gpu.txt 2>/dev/null
exit $status
