#!/usr/bin/env bash
# Our zero-shot evaluation against the released VideoMamba code on a CPU, in one command
# (scripts/check_released_eval.py --reference-kernels):
#   1. installs the released code's package versions (transformers 4.36.1, tokenizers 0.15.2,
#      huggingface_hub 0.20.3, timm 0.4.12) with pip into $SITE (default .cache/released_site) when it lacks them;
#      only the released side's process has that folder on its path;
#   2. evaluates one random-weight released-layout checkpoint (VideoMamba-M + bert-base, the 798 keys) with
#      jobs/eval_retrieval.py and with the released code on the same frames, both sides at once, fp32. The
#      released model's CUDA and Triton kernels are replaced by its kernel fork's own PyTorch references
#      (selective_scan_ref, causal_conv1d_ref, rms_norm_ref); ours runs its CPU path (models/ops/ref.py). So this
#      checks our evaluation, model and CPU kernels against the released evaluation and model; the CUDA kernels
#      are scripts/gpu_check_released_eval.sh's part.
# Defaults, for a 2-core machine: 8 frames of 64 px (a 4 x 4 patch grid; at 224 px our side's reference scan
# took 942 s for 2 videos on one core), 4 videos, 8 captions, re-rank depth 5. Extra arguments go to check_released_eval.py
# and win (e.g. --img-size 224 --videos 2).
# Needs $VIDEOMAMBA (default .cache/VideoMamba): a checkout of OpenGVLab/VideoMamba, or its mamba/,
# causal-conv1d/, videomamba/video_sm/models/videomamba.py and videomamba/video_mm/; its commit is read from
# its .git or from $VIDEOMAMBA.commit. Writes $RESULTS/$NAME.{json,md} (default
# benchmarks/results/checks/released_eval_cpu: a correctness check, not a timing) and the whole comparison
# under $WORK/results.
#   bash scripts/check_released_eval_cpu.sh [--img-size 112]
set -uo pipefail
PY=${PYTHON:-python}
VIDEOMAMBA=${VIDEOMAMBA:-.cache/VideoMamba}
SITE=${SITE:-.cache/released_site}
RESULTS=${RESULTS:-benchmarks/results/checks}
NAME=${NAME:-released_eval_cpu}
WORK=${WORK:-outputs/check_released_eval_cpu}
RELEASED_PACKAGES=(transformers==4.36.1 tokenizers==0.15.2 huggingface_hub==0.20.3 timm==0.4.12)
if [ ! -d "$SITE/transformers" ]; then
    "$PY" -m pip install -q --no-deps --target "$SITE" "${RELEASED_PACKAGES[@]}" \
        || { echo "FAIL: installing ${RELEASED_PACKAGES[*]} into $SITE"; exit 1; }
fi
if [ -d "$VIDEOMAMBA/.git" ]; then
    commit=$(git -C "$VIDEOMAMBA" rev-parse HEAD)
else
    commit=$(cat "$VIDEOMAMBA.commit" 2>/dev/null || echo "unknown")
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" scripts/check_released_eval.py --videomamba-repo "$VIDEOMAMBA" --videomamba-commit "$commit" \
    --released-site "$SITE" --reference-kernels --size full --img-size 64 --videos 4 --k-test 5 \
    --work "$WORK" --results "$WORK/results" "$@"
status=$?
if [ -f "$WORK/results/check_released_eval.json" ]; then
    mkdir -p "$RESULTS"
    cp "$WORK/results/check_released_eval.json" "$RESULTS/$NAME.json"
    cp "$WORK/results/check_released_eval.md" "$RESULTS/$NAME.md"
fi
exit "$status"
