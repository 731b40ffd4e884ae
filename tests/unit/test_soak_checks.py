"""benchmarks/soak.py's bookkeeping: the fault plan, which process a line came from, and the end checks (one MLflow
value per step, no lost checkpoint) on a real sqlite MLflow store and real checkpoint folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soak import Events, checkpoints_check, make_plan, metric_steps_check  # noqa: E402


def test_plan_rotates_faults_and_keeps_checkpoints_on_log_steps():
    plan = make_plan(30, 150, {"startup_s": 40.0, "steps_per_s": 61.3}, checkpoint_every_s=20, log_interval=5)
    assert plan.fault_kinds[:4] == ["worker_kill", "nan_loss", "driver_stop", "worker_kill"]
    assert max(plan.fault_times_s) <= 30 * 60 - 60  # the last fault leaves a minute to recover
    assert plan.checkpoint_interval % 5 == 0 and plan.max_steps % plan.checkpoint_interval == 0
    assert len(plan.nan_positions) == plan.fault_kinds.count("nan_loss")
    assert all(0 < p < plan.max_steps for p in plan.nan_positions)
    assert plan.fault_steps == sorted(plan.fault_steps) and plan.fault_steps[-1] < plan.max_steps
    assert plan.nan_positions == [s for s, k in zip(plan.fault_steps, plan.fault_kinds, strict=True) if k == "nan_loss"]


def test_events_name_the_worker_that_printed_them():
    events = Events(0.0, "soak")
    events.parse("\x1b[36m(RayTrainWorker pid=4242)\x1b[0m [soak] step 35/100 loss 0.1 lr 1e-3 ...", driver_no=2)
    events.parse("[soak] step 40/100 loss 0.1 lr 1e-3 ...", driver_no=2)
    events.parse("(RayTrainWorker pid=77) [soak] resumed from step 30 (checkpoint_00000030)", driver_no=3)
    events.parse("(RayTrainWorker pid=77) [other] step 45/100 loss 0.1", driver_no=3)  # another run's line
    assert [(e.kind, e.step, e.source) for e in events.items] == [
        ("step", 35, (2, 4242)), ("step", 40, (2, None)), ("resumed", 30, (3, 77))]  # fmt: skip


def _log_run(uri: str, name: str, steps: list[int]) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("soak")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("soak")
    run = client.create_run(experiment_id, run_name=name)
    for key in ("train/loss", "train/lr"):
        # distinct timestamps, as a re-logged step has (MLflow stores identical entries once)
        client.log_batch(run.info.run_id, metrics=[Metric(key, 0.5, i, s) for i, s in enumerate(steps)])
    client.log_batch(run.info.run_id, metrics=[Metric("system/cpu", 1.0, 0, s) for s in (0, 0, 1)])
    client.set_terminated(run.info.run_id, "FINISHED")


@pytest.mark.timeout(120)
def test_mlflow_check_finds_duplicated_and_missing_steps(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _log_run(uri, "clean", [5, 10, 15, 20])
    _log_run(uri, "resumed_badly", [5, 10, 10, 20])  # step 10 logged again after a resume, 15 never
    clean = metric_steps_check(uri, "soak", "clean", max_steps=20, log_interval=5)
    assert clean["ok"] and clean["loss_values"] == 4 and clean["keys_checked"] == 2  # system/* left out
    bad = metric_steps_check(uri, "soak", "resumed_badly", max_steps=20, log_interval=5)
    assert not bad["ok"] and (bad["loss_duplicated"], bad["loss_missing"]) == (1, 1)
    assert bad["keys_with_problems"]["train/lr"]["duplicated_steps"] == [10]
    assert bad["keys_with_problems"]["train/loss"]["missing_steps"] == [15]
    _log_run(uri, "clean", [5, 10, 15, 20])  # a second run of the same name (a launch that did not resume)
    assert metric_steps_check(uri, "soak", "clean", max_steps=20, log_interval=5) == {"runs_of_this_name": 2,
                                                                                       "ok": False}


def _checkpoint(root: Path, step: int, complete: bool = True) -> None:
    folder = root / f"checkpoint_{step:08d}"
    (folder / "state").mkdir(parents=True)
    meta = {"step": step, "world_size": 1, "zero_stage": 2, "frozen_student": False}
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    for name in ("config.yaml", "latest", "rank0_state.pt", "state/mp_rank_00_model_states.pt"):
        (folder / name).write_text("x")
    if complete:
        (folder / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")


def test_checkpoint_check_finds_lost_and_incomplete_checkpoints(tmp_path):
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's file beside the folders
    assert checkpoints_check(tmp_path, max_steps=30, interval=10) == {
        "expected": 3, "complete": 3, "lost_steps": [], "incomplete": {}, "ok": True}  # fmt: skip
    _checkpoint(tmp_path, 50, complete=False)
    found = checkpoints_check(tmp_path, max_steps=55, interval=10)
    assert found["lost_steps"] == [40, 55] and list(found["incomplete"]) == ["checkpoint_00000050"]
    assert not found["ok"]
