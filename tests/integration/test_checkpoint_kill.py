"""A SIGKILL in the middle of a checkpoint write loses nothing beyond the last checkpoint interval.

`jobs/train_toy.py` runs in a real subprocess (local path, DeepSpeed ZeRO-2 on CPU, MLflow on sqlite) with a Python
audit hook that SIGKILLs the process at an exact point of checkpoint 20's write: when DeepSpeed opens its `latest`
file (its shards written, our rank state not), when rank 0 opens `config.yaml` (every rank's files written, no
`checkpoint.json`), or at the rename that would publish the checkpoint. Rerunning the same command resumes from
checkpoint 10 and ends with the weights of an uninterrupted run, one MLflow value per step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.checkpointing import layout
from pipeline.checkpointing.run_lock import LOCK
from pipeline.config import load_config
from pipeline.engine import train
from pipeline.launch import launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_YAML = os.path.join(REPO, "configs", "stages", "toy.yaml")
STAGING = f".staging_{layout.checkpoint_dir_name(20)}"

# Runs the job with an audit hook; `point` is (event, file name): kill when that event touches that staging file.
KILLED_JOB = textwrap.dedent("""
    import os, runpy, signal, sys
    event_name, file_name, staging = sys.argv[1:4]
    def hook(event, args):
        if event == event_name and args and str(args[0]).endswith(f"{staging}/{file_name}".rstrip("/")):
            os.kill(os.getpid(), signal.SIGKILL)
    sys.addaudithook(hook)
    sys.argv = ["jobs/train_toy.py", *sys.argv[4:]]
    runpy.run_path("jobs/train_toy.py", run_name="__main__")
""")


def overrides(tmp_path, run_name: str) -> list[str]:
    return [
        "task.name=toy", "stage=toy", "scaling.use_ray=false", "deepspeed.zero_stage=2", f"output_dir={tmp_path}/out",
        f"checkpoint.path={tmp_path}/ckpt", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "data.batch_size=8",
        "optim.max_steps=30", "checkpoint.interval_steps=10", "tracking.log_interval=10",
        f"tracking.run_name={run_name}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The export of the same run without a kill."""
    tmp_path = tmp_path_factory.mktemp("straight")
    return torch.load(train(load_config(TOY_YAML, overrides(tmp_path, "straight"))).export_path)["state_dict"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("event", "file_name", "written"), [
    ("open", layout.LATEST, {layout.DEEPSPEED_TAG}),  # DeepSpeed's shards are on disk, our rank state is not
    ("open", layout.CONFIG, {layout.DEEPSPEED_TAG, "rank0_state.pt"}),
    ("os.rename", "", {layout.DEEPSPEED_TAG, "rank0_state.pt", layout.CONFIG, layout.MANIFEST, layout.METRICS}),
])  # fmt: skip
def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, straight_weights, event,
                                                                         file_name, written):
    from mlflow.tracking import MlflowClient

    args = overrides(tmp_path, "killed")
    env = {**os.environ, "PYTHONPATH": REPO}
    job = subprocess.run([sys.executable, "-c", KILLED_JOB, event, file_name, STAGING, "--config",
                          TOY_YAML, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert job.returncode == -9, job.stderr[-3000:]
    run = tmp_path / "ckpt" / "killed"
    # SIGKILL cannot release the run lock: it stays, and the rerun takes it over (its holder is dead on this host)
    assert sorted(p.name for p in run.iterdir()) == sorted([STAGING, layout.checkpoint_dir_name(10), LOCK])
    assert {p.name for p in (run / STAGING).iterdir()} >= written  # the kill came mid-write, where intended

    resumed = launch(load_config(TOY_YAML, args))  # the same command again
    assert (resumed.resumed_from_step, resumed.step) == (10, 30)
    weights = torch.load(resumed.export_path)["state_dict"]
    for key, value in straight_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(resumed.mlflow_run_id, "train/loss")
    assert sorted(m.step for m in history) == [10, 20, 30]
    assert not (run / STAGING).exists()
