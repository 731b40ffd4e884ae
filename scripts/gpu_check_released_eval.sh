#!/usr/bin/env bash
# Our zero-shot evaluation against the released VideoMamba code (scripts/check_released_eval.py) on a bare GPU
# machine, in one command that ends within ~8 minutes:
#   1. installs the carried wheels: $CARRY/wheels/ours (PyAV, webdataset, braceexpand: what our evaluation imports
#      that the machine lacks) into /tmp/site_ours, on this shell's PYTHONPATH; $CARRY/wheels/released (the
#      released code's versions: transformers 4.36.1, tokenizers 0.15.2, huggingface_hub 0.20.3, timm 0.4.12)
#      into /tmp/site_released, which only the released side's process sees;
#   2. runs check_released_eval.py (default --size full: VideoMamba-M + bert-base, 798 keys, random weights, fp32):
#      the released kernels are built for fp32 from $CARRY/sdist while our side runs jobs/eval_retrieval.py,
#      then the released evaluation runs on the frames our pipeline decoded, and the matrices and R@k are compared.
# Needs under $CARRY (default .cache/gpu_carry): wheels/{ours,released}/*.whl; sdist/mamba_ssm-2.3.2.post1.tar.gz
# and sdist/causal_conv1d-1.7.0.tar.gz; VideoMamba/ (a checkout of OpenGVLab/VideoMamba, or its mamba/,
# causal-conv1d/, videomamba/video_sm/models/videomamba.py and videomamba/video_mm/) and VideoMamba.commit.
# docs/evaluation.md ("Checked against the released code") says how to fetch them. $OUT receives the comparison's
# files; extra arguments go to check_released_eval.py. DRY_RUN=1 checks the carry without a GPU (--dry-run: no
# kernels built, no video encoded).
#   OUT=/tmp/out bash scripts/gpu_check_released_eval.sh [--size tiny]
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-/tmp/check_released_eval_out}
CARRY=${CARRY:-.cache/gpu_carry}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
for side in ours released; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/site_$side" \
        "$CARRY"/wheels/$side/*.whl || { echo "FAIL: installing $CARRY/wheels/$side"; exit 1; }
done
export PYTHONPATH=/tmp/site_ours:. PYTHONUNBUFFERED=1 NVIDIA_TF32_OVERRIDE=0 HF_HUB_OFFLINE=1
if [ "${DRY_RUN:-0}" = 1 ]; then
    MODE=(--dry-run)
else
    MODE=(--build-kernels "$CARRY/sdist")
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
timeout "${LIMIT_S:-460}" "$PY" scripts/check_released_eval.py --videomamba-repo "$CARRY/VideoMamba" \
    --videomamba-commit "$(cat "$CARRY/VideoMamba.commit" 2>/dev/null)" --released-site /tmp/site_released \
    "${MODE[@]}" --work /tmp/check_released_eval --results "$OUT" "$@"
status=$?
[ "$status" = 124 ] && echo "FAIL: stopped after ${LIMIT_S:-460} s"
echo "exit $status after $(( $(date +%s) - START )) s"
exit "$status"
