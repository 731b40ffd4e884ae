"""End to end: scripts/demo.sh at a smaller size (real shards, a real local Ray cluster, the recipe as a Ray Job,
MLflow in sqlite, retrieval on the held-out split, the comparison table and PNG)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Fewer steps than the shipped demo; the retrieval bar below is set for this size.
SMALL = ("stages.mask.optim.max_steps=4 stages.distill.optim.max_steps=4 "
         "stages.vtc.optim.max_steps=200 stages.vtc.checkpoint.interval_steps=100 "
         "stages.finetune.optim.max_steps=200 stages.finetune.checkpoint.interval_steps=100 "
         "stages.finetune.eval.interval_steps=100")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_demo_script_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "DEMO_OVERRIDES": SMALL}
    proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=450)
    finally:
        if proc.poll() is None:  # timed out: TERM runs the script's trap, which stops its Ray cluster
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    (tmp_path / "demo.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]

    state = json.loads((out / "runs" / "recipe_state.json").read_text())
    assert list(state["steps"]) == ["mask", "distill", "vtc", "finetune", "synthetic"]
    assert all(step["status"] == "done" for step in state["steps"].values())
    for stage in ("mask", "distill", "vtc", "finetune"):
        assert (out / "runs" / stage / "export" / "model.pt").is_file()
    # The final numbers: $OUT/retrieval.json, one entry per evaluation, recalls beside chance in percent.
    results = json.loads((out / "retrieval.json").read_text())
    assert list(results) == ["synthetic"]
    final = results["synthetic"]
    keys = {f"{d}_{m}" for d in ("t2v", "v2t") for m in ("r1", "r5", "r10", "medr", "meanr")}
    assert keys | {"num_videos", "chance_r1"} <= set(final), sorted(final)
    assert {k: final[k] for k in keys} == {k: state["steps"]["synthetic"]["metrics"][k] for k in keys}
    assert final["num_videos"] == 40  # the generator's held-out 20% of 200 clips
    assert final["chance_r1"] == 100.0 / final["num_videos"]
    assert final["t2v_r5"] > 2 * final["chance_r5"], final  # learned something, through every stage

    # The fine-tuned classifier's multi-view test: 40 held-out clips, 4 motion directions (chance 25%).
    classification = json.loads((out / "classification.json").read_text())
    assert classification["counts"] == {"videos": 40, "classes": 4, "views_per_video": 12, "skipped_videos": 0}
    assert sum(row["videos"] for row in classification["per_class"]) == 40
    # Measured on the 2-core box: these sizes (200 fine-tuning steps from a 4/4/200-step backbone) 55.0% (32.5% with
    # the released augmentation); the shipped demo's 300 steps 67.5% and 65.0% (seeds 0, 1). Chance is 25%.
    assert classification["metrics"]["top1"] >= 45.0, classification["metrics"]
    assert state["steps"]["finetune"]["metrics"]["eval/top5"] == 100.0
    assert "## Classification: synthetic" in log

    assert "Job 'raysubmit_" in log and "succeeded" in log
    assert "zero-shot retrieval on the held-out split" in log and "chance" in log
    assert f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db" in log
    assert (out / "mlflow.db").is_file()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # The script's cluster is gone: no process still runs from its Ray temp dir.
    ray_tmp = next(line.split("Ray temp dir: ", 1)[1] for line in log.splitlines() if "Ray temp dir: " in line)
    leftover = subprocess.run(["pgrep", "-f", ray_tmp.strip()], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes of the demo's Ray cluster left running: {leftover}"
