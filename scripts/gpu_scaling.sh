#!/usr/bin/env bash
# Multi-GPU runs on one host without internet: a local S3 server (moto) holding synthetic shards, a Ray head owning
# every GPU, then benchmarks/bench_scaling.py submitting real Ray Jobs (DeepSpeed ZeRO, bf16, NCCL).
#
#   OUT=/tmp/out PHASES="setup scaling" bash scripts/gpu_scaling.sh
#
# PHASES (run in order; the services started by `setup` outlive this script, so a later call on the same machine
# can run the other phases):
#   setup      unpack the offline bundle (BUNDLE_PARTS, see scripts/make_offline_bundle.sh) into $SITE, start moto
#              and `ray start --head` in their own sessions, write the synthetic shards to s3://bench/synthetic
#   scaling    VideoMamba-S masked pretraining (configs/stages/pretrain_mask_s.yaml), ZeRO $SCALING_ZERO at 1..N GPUs
#   zero       the same at N GPUs for ZeRO stages 2 and 3
#   fault      SIGKILL one worker of an N-GPU run after its first checkpoint; Ray must restart it and resume
#   vtc        the video-text stage (pretrain_vtc_m_5m.yaml) at 1 and N GPUs
#   losstest   the gathered video-text loss on N NCCL ranks against one process (tests/unit/test_losses.py, gpu)
# Results and logs collect under $WORK (results/, logs/), which outlives this script like the services; each call
# packs them into $OUT/results.tgz (unpack at the repository root: benchmarks/results/scaling*.{json,md}).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT=${OUT:-/tmp/gpu_scaling}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/bench_scaling}
RESULTS_DIR="$WORK/results"
LOGS="$WORK/logs"
mkdir -p "$OUT" "$RESULTS_DIR" "$LOGS"
GPUS=$(nvidia-smi -L | wc -l)
WORKERS=${WORKERS:-$(python3 -c "print(' '.join(str(2**i) for i in range(8) if 2**i <= $GPUS))")}
CPUS_PER_WORKER=$(( $(nproc) / GPUS - 2 ))

# NVLink multicast stays off on this shared host (the device notes): every process started from here inherits it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$SITE:$REPO" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 RAY_ADDRESS=http://127.0.0.1:8265
export AWS_ENDPOINT_URL=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
DATA=s3://bench/synthetic
step() { printf '\n==> %s (%s)\n' "$*" "$(date +%T)"; }

setup() {
  if [[ ! -f "$SITE/.complete" ]]; then
    step "unpacking the offline bundle into $SITE"
    mkdir -p "$SITE"
    # shellcheck disable=SC2086  # BUNDLE_PARTS is a glob on purpose
    cat ${BUNDLE_PARTS:?set BUNDLE_PARTS to the bundle parts, in order} | python3 -c "
import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], filter='tar')" "$SITE" || return 1
    # console scripts were written on the build machine: point them at this machine's python3
    sed -i "1s|^#!.*python.*|#!$(command -v python3)|" "$SITE"/bin/* && touch "$SITE/.complete"
  fi
  # a job's entrypoint says `python`: make sure it names this python3
  command -v python >/dev/null || ln -sf "$(command -v python3)" "$SITE/bin/python"
  python3 -c "import ray, deepspeed, mlflow, s3fs, webdataset, av, open_clip, moto; print('stack: ray', ray.__version__,
'deepspeed', deepspeed.__version__, 'mlflow', mlflow.__version__)" || return 1
  step "moto S3 server and Ray head ($GPUS GPUs, $(nproc) CPUs)"
  setsid python3 -m moto.server -H 127.0.0.1 -p 5555 > "$WORK/moto.log" 2>&1 < /dev/null &
  setsid ray start --head --num-gpus "$GPUS" --num-cpus "$(nproc)" --dashboard-host 127.0.0.1 \
    --disable-usage-stats > "$WORK/ray_head.log" 2>&1 < /dev/null || { cat "$WORK/ray_head.log"; return 1; }
  for _ in $(seq 60); do
    python3 -c "import urllib.request as u; u.urlopen('$RAY_ADDRESS/api/version', timeout=2)" 2>/dev/null && break
    sleep 1
  done
  python3 -c "import s3fs; s3fs.S3FileSystem().mkdir('bench')" || return 1
  step "synthetic shards -> $DATA"
  python3 jobs/make_synthetic.py --output "$DATA" --num-videos "${NUM_VIDEOS:-2400}" --split-ratio 0.9 \
    --size 224 --num-frames 16 --shard-size 20 --workers "$(nproc)" | tail -3
}

# Per-run settings for the random-init teacher and the synthetic data (the recipe's teacher is CLIP ViT-B/16
# weights from the Hugging Face cache; a random one costs the same).
MASK_SET=(task.teacher.pretrained=null "data.train_shards=$DATA/shards/train" data.samples_per_epoch=null
          "scaling.cpus_per_worker=$CPUS_PER_WORKER" "data.num_workers=$(( CPUS_PER_WORKER - 2 ))")
bench() { python3 benchmarks/bench_scaling.py --logs "$LOGS" --out "$RESULTS_DIR" --checkpoints "$WORK/checkpoints" \
            --outputs "$WORK/outputs" "$@"; }

scaling() {
  step "scaling: VideoMamba-S masked pretraining, ZeRO ${SCALING_ZERO:-1}, workers $WORKERS"
  # shellcheck disable=SC2086
  bench --config configs/stages/pretrain_mask_s.yaml --workers $WORKERS --zero ${SCALING_ZERO:-1} \
    --tag "S 8f b${BATCH:-64}" --set "${MASK_SET[@]}" "data.batch_size=${BATCH:-64}" ${EXTRA_SET:-}
}

zero() {
  step "ZeRO 2 and 3 at $GPUS GPUs"
  # shellcheck disable=SC2086
  bench --config configs/stages/pretrain_mask_s.yaml --workers "$GPUS" --zero 2 3 --tag "S 8f b${BATCH:-64}" \
    --set "${MASK_SET[@]}" "data.batch_size=${BATCH:-64}" ${EXTRA_SET:-}
}

fault() {
  step "worker loss at $GPUS GPUs"
  bench --config configs/stages/pretrain_mask_s.yaml --workers "$GPUS" --zero 2 --fault --steps 40 \
    --fault-checkpoint 10 --log-interval 5 --set "${MASK_SET[@]}" "checkpoint.path=s3://bench/checkpoints" \
    data.batch_size=32
}

vtc() {
  step "video-text stage (VideoMamba-M, 5M recipe) at 1 and $GPUS GPUs"
  # shellcheck disable=SC2046  # one or two worker counts
  bench --config configs/stages/pretrain_vtc_m_5m.yaml --workers $(printf '%s\n' 1 "$GPUS" | sort -un) --zero 1 --tag "VTC M 8f b${VTC_BATCH:-64}" \
    --set model.pretrained=null task.text.pretrained=null task.teacher.pretrained=null \
    "data.train_shards=$DATA/shards/train" \
    data.samples_per_epoch=null "scaling.cpus_per_worker=$CPUS_PER_WORKER" "data.num_workers=$(( CPUS_PER_WORKER - 2 ))" \
    "data.batch_size=${VTC_BATCH:-64}"
}

losstest() {
  step "gathered contrastive loss on $GPUS NCCL ranks"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_losses.py
}

status=0
for phase in ${PHASES:-setup scaling zero fault vtc}; do
  "$phase" 2>&1 | tee -a "$LOGS/phase_$phase.log" || { status=1; echo "phase $phase failed"; }
done
mkdir -p "$WORK/pack/benchmarks" && rm -rf "$WORK/pack/benchmarks/results" "$WORK/pack/logs"
cp -r "$RESULTS_DIR" "$WORK/pack/benchmarks/results" && cp -r "$LOGS" "$WORK/pack/logs"
tar czf "$OUT/results.tgz" -C "$WORK/pack" .
exit $status
