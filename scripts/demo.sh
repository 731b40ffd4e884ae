#!/usr/bin/env bash
# The end-to-end CPU demo behind `make demo`: synthetic video-text shards -> local Ray cluster ->
# the demo_cpu recipe (masked alignment -> self-distillation -> video-text -> fine-tuning -> retrieval)
# submitted as a Ray Job -> MLflow runs in a local sqlite store -> a retrieval table, the fine-tuned
# classifier's multi-view test (jobs/eval_cls.py) and a run comparison.
#
# Everything lands under $OUT (default demo_out); the final zero-shot numbers in $OUT/retrieval.json
# ({eval name: {t2v_r1, ..., v2t_meanr, num_videos, chance_r1, ...}}), the classification test in
# $OUT/classification.json (top-1/top-5, per class, confusion). Environment knobs:
#   OUT=dir                 output folder (data, runs, checkpoints, mlflow.db, Ray's temp dir)
#   DEMO_RECIPE=file        recipe to submit (default configs/recipes/demo_cpu.yaml)
#   DEMO_OVERRIDES="k=v .." extra recipe overrides (e.g. settings.optim.max_steps=5 for a smoke run)
#   DEMO_DATA_ARGS="..."    extra arguments for jobs/make_synthetic.py
#   DEMO_CPUS=2             CPUs the local Ray cluster offers
# Rerunning the same command reuses the data and skips finished stages (the recipe resumes).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-demo_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RECIPE="${DEMO_RECIPE:-configs/recipes/demo_cpu.yaml}"
CPUS="${DEMO_CPUS:-2}"

# The venv's python must be first on PATH: the job's `python` resolves on the Ray head's PATH.
export PATH="$REPO/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
step() { printf '\n==> %s\n' "$*"; }

step "synthetic data set -> $OUT/data"
if [[ -f "$OUT/data/.complete" ]]; then
  echo "already there (delete $OUT/data to regenerate)"
else
  rm -rf "$OUT/data"
  # shellcheck disable=SC2086  # DEMO_DATA_ARGS is a list of words on purpose
  python jobs/make_synthetic.py --output "$OUT/data" ${DEMO_DATA_ARGS:-}
  touch "$OUT/data/.complete"
fi

step "local Ray cluster ($CPUS CPUs)"
# Ray's socket paths must stay short (AF_UNIX limit): use $OUT/ray when its path is short enough.
RAY_TMP="$OUT/ray"
RAY_TMP_IS_OURS=0
if (( ${#RAY_TMP} > 40 )); then RAY_TMP="$(mktemp -d /tmp/vmdemo-ray.XXXXXX)"; RAY_TMP_IS_OURS=1; fi
# Free ports for every fixed-port service, so the demo can run beside another local Ray cluster.
read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_PORT METRICS_PORT RTENV_PORT < <(python - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
# --block keeps `ray start` in the foreground as the owner of this cluster's processes: stopping it
# (TERM) stops exactly this cluster, where `ray stop` would stop every Ray cluster of this user.
ray start --head --block --num-cpus "$CPUS" --num-gpus 0 --disable-usage-stats \
  --temp-dir "$RAY_TMP" --port "$GCS_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
  --dashboard-agent-listen-port "$AGENT_PORT" --metrics-export-port "$METRICS_PORT" \
  --runtime-env-agent-port "$RTENV_PORT" >"$OUT/ray_head.log" 2>&1 &
RAY_PID=$!
stop_ray() {
  if kill -0 "$RAY_PID" 2>/dev/null; then
    echo "stopping the local Ray cluster (pid $RAY_PID)"
    kill -TERM "$RAY_PID" 2>/dev/null || true
    wait "$RAY_PID" 2>/dev/null || true
  fi
  if (( RAY_TMP_IS_OURS )); then rm -rf "$RAY_TMP"; fi
}
trap stop_ray EXIT
trap 'exit 130' INT TERM

export RAY_ADDRESS="http://127.0.0.1:$DASH_PORT"
for _ in $(seq 120); do
  if python -c "import urllib.request as u; u.urlopen('$RAY_ADDRESS/api/version', timeout=2)" 2>/dev/null; then
    break
  fi
  kill -0 "$RAY_PID" 2>/dev/null || { cat "$OUT/ray_head.log"; echo "ray start failed" >&2; exit 1; }
  sleep 1
done
echo "Ray dashboard and job API: $RAY_ADDRESS (head log: $OUT/ray_head.log, Ray temp dir: $RAY_TMP)"

step "submitting $RECIPE as a Ray Job"
# The job runs in an uploaded copy of the repo: exclude what is big or generated; paths are absolute.
RUNTIME_ENV=$(python - "$OUT" "$REPO" <<'EOF'
import json, os, sys
out, repo = sys.argv[1], sys.argv[2]
excludes = [".venv", ".git", "demo_out", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".cache"]
if out.startswith(repo + os.sep):
    excludes.append(os.path.relpath(out, repo))
env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "RAY_AUTH_MODE")}
print(json.dumps({"working_dir": ".", "excludes": excludes, "env_vars": env}))
EOF
)
# shellcheck disable=SC2086  # DEMO_OVERRIDES is a list of words on purpose
ray job submit --runtime-env-json "$RUNTIME_ENV" -- \
  python jobs/run_recipe.py "$RECIPE" "out_dir=$OUT/runs" "data_root=$OUT/data" "results_file=$OUT/retrieval.json" \
  ${DEMO_OVERRIDES:-} 2>&1 | tee "$OUT/job.log"
stop_ray

step "results"
# shellcheck disable=SC2086
python jobs/run_recipe.py "$RECIPE" "out_dir=$OUT/runs" "data_root=$OUT/data" "results_file=$OUT/retrieval.json" \
  ${DEMO_OVERRIDES:-} --summary
test -s "$OUT/retrieval.json" || { echo "the recipe wrote no $OUT/retrieval.json" >&2; exit 1; }
PARENT=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['parent_run_id'])" "$OUT/runs/recipe_state.json")
EXPERIMENT=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1])).get('name'))" "$RECIPE")

FINETUNED="$OUT/runs/finetune/export/model.pt"
if [[ -f "$FINETUNED" ]]; then
  step "classification test of the fine-tuned model on the held-out split (4 clips x 3 crops)"
  python jobs/eval_cls.py --config configs/eval/synthetic_cls.yaml "model.checkpoint=$FINETUNED" \
    "data.annotation=$OUT/data/videos/eval/list.jsonl" "data.class_index=$OUT/data/classes.txt" \
    "output_dir=$OUT/runs/eval_cls" "tracking.experiment=$EXPERIMENT" "tracking.parent_run_id=$PARENT" \
    | sed -n '/^## Classification/,$p'
  cp "$OUT/runs/eval_cls/classification_synthetic.json" "$OUT/classification.json"
fi

step "comparison of the recipe's runs (parent $PARENT)"
python jobs/compare_runs.py --experiment "$EXPERIMENT" --parent "$PARENT" --max-params 10 --plot "$OUT/compare.png"

cat <<EOF

Everything is under $OUT:
  data/            synthetic shards, eval videos and annotations
  runs/<step>/     each stage's resolved config and export (export/model.pt), eval reports
  runs/checkpoints Ray Train checkpoints (a rerun resumes from them)
  retrieval.json   the final zero-shot retrieval numbers (recalls, ranks, num_videos, chance_r1)
  classification.json  the fine-tuned classifier's test: top-1/top-5, per-class accuracy, confusion
  mlflow.db        the MLflow store; compare.png the loss curves and retrieval bars
Open the MLflow UI:
  $REPO/.venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI
EOF
