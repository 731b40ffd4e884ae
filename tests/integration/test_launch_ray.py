"""Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers with checkpoints on S3 (moto): a killed worker is restarted from
the last checkpoint, and a second launch of the same run resumes it, continuing the same MLflow run without
duplicated steps; a non-finite stop reaches the driver without a Ray retry."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.engine import NonFiniteError
from pipeline.jobs_common import describe_plan
from pipeline.launch import launch


def history(tracking_uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_metric_history(run_id, key)


def metric_steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in history(tracking_uri, run_id, key))


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_worker_loss_restart_and_resubmit_resume(tmp_path, monkeypatch, moto_s3):
    import ray
    import s3fs
    from mlflow.tracking import MlflowClient

    fs = s3fs.S3FileSystem()
    fs.mkdir("ckpts-ray")  # checkpoints go to S3 (moto); Ray's workers inherit the endpoint and credentials env

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    marker = tmp_path / "rank1_exited"
    overrides = [
        "task.name=toy", "stage=toy", "scaling.use_ray=true", "scaling.num_workers=2", "scaling.use_gpu=false",
        "scaling.max_failures=1", "deepspeed.zero_stage=2", f"output_dir={tmp_path}/out",
        "checkpoint.path=s3://ckpts-ray/runs", f"tracking.uri={uri}", "data.batch_size=8", "optim.lr=0.03",
        "checkpoint.interval_steps=10", "tracking.log_interval=5",
        # rank 1 dies hard at its 16th batch (step 16), after checkpoint 10 and after steps 11-15 were logged
        "task.exit_at_batch=15", "task.exit_rank=1", f"task.exit_marker={marker}",
    ]  # fmt: skip
    try:
        first = launch(load_config(None, [*overrides, "optim.max_steps=30"]))
        assert marker.exists(), "the injected worker exit did not happen"
        assert (first.step, first.resumed_from_step) == (30, 10)  # the restarted group resumed from checkpoint 10
        assert MlflowClient(uri).get_run(first.mlflow_run_id).data.tags["resumed_from_step"] == "10"
        # steps 11-15 ran twice (before the crash and after the restart) but are logged once
        assert metric_steps(uri, first.mlflow_run_id, "train/loss") == [5, 10, 15, 20, 25, 30]

        cfg = load_config(None, [*overrides, "optim.max_steps=40"])
        assert "checkpoint_00000030" in describe_plan(cfg)  # the dry-run plan names what a launch resumes from
        second = launch(cfg)
        assert (second.step, second.resumed_from_step) == (40, 30)
        assert second.mlflow_run_id == first.mlflow_run_id
        assert metric_steps(uri, second.mlflow_run_id, "train/loss") == [5, 10, 15, 20, 25, 30, 35, 40]
        losses = [m.value for m in sorted(history(uri, second.mlflow_run_id, "train/loss"), key=lambda m: m.step)]
        assert losses[-1] < 0.2 * losses[0], losses  # it learned across the restart and the resubmission
        files = {p.rsplit("/", 1)[-1] for p in fs.ls("ckpts-ray/runs/toy/checkpoint_00000040")}
        assert {"rank0_state.pt", "rank1_state.pt", "latest"} <= files
        shards = [p for p in fs.ls("ckpts-ray/runs/toy/checkpoint_00000040/state") if "optim_states" in p]
        assert len(shards) == 2  # one ZeRO shard per rank, merged by Ray into one checkpoint
        kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpts-ray/runs/toy") if "checkpoint_0" in p)
        assert kept == ["checkpoint_00000030", "checkpoint_00000040"]  # checkpoint.keep=2

        # A worker lost before the first committed checkpoint: the group restarts from scratch into the same
        # MLflow run (not a second run of the same name), each step logged once.
        early_marker = tmp_path / "rank1_exited_early"
        early = [*overrides[:-3], "optim.max_steps=10", "task.exit_at_batch=6", "task.exit_rank=1",
                 f"task.exit_marker={early_marker}", "tracking.run_name=early"]
        result = launch(load_config(None, early))
        assert early_marker.exists() and (result.step, result.resumed_from_step) == (10, None)
        experiment = MlflowClient(uri).get_experiment_by_name("videomamba").experiment_id
        (run,) = MlflowClient(uri).search_runs([experiment], filter_string="attributes.run_name = 'early'")
        assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
        assert metric_steps(uri, run.info.run_id, "train/loss") == [5, 10]

        # nonfinite=stop under Ray: the driver gets NonFiniteError and Ray does not retry (same MLflow run, once)
        nan_run = [*overrides[:-3], "optim.max_steps=10", "task.nan_at_batches=[3]", "tracking.run_name=nan"]
        with pytest.raises(NonFiniteError, match=r"step 4: non-finite loss parts"):
            launch(load_config(None, nan_run))
        (nan,) = MlflowClient(uri).search_runs([experiment], filter_string="attributes.run_name = 'nan'")
        assert nan.info.status == "FAILED"
    finally:
        ray.shutdown()
