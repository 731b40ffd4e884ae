"""MLflow run tracking against a real sqlite store: params, config artifact, nesting, batched metrics, resume."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import load_config
from pipeline.tracking import RunTracker, tracking_uri


@pytest.mark.timeout(120)
def test_run_lifecycle_nested_and_resumed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # No system metrics sampler here: the trackers left open (a crash) would keep its thread polling.
    cfg = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", "stage=unit", "optim.lr=0.25",
                             "tracking.system_metrics_interval_s=0"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri(cfg))
    parent = client.create_run(client.create_experiment("videomamba")).info.run_id
    cfg.tracking.parent_run_id = parent

    tracker = RunTracker(cfg)
    run_id = tracker.start()
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    assert client.get_metric_history(run_id, "train/loss") == []  # buffered until flush
    tracker.flush()
    # A crash here: steps 1-3 are logged. The resumed attempt replays steps 2-4 from an older checkpoint.
    resumed = RunTracker(cfg)
    assert resumed.start(resume_run_id=run_id) == run_id
    for step in (2, 3, 4):
        resumed.log_metrics({"train/loss": 10.0 + step}, step)
    resumed.end("FINISHED")

    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 14.0)]
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] == "unit"
    assert "git_sha" in run.data.tags and "resumed_at" in run.data.tags
    assert run.data.params["optim.lr"] == "0.25" and run.data.params["task.name"] == "toy"
    config_path = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    with open(config_path) as f:
        assert yaml.safe_load(f)["optim"]["lr"] == 0.25


@pytest.mark.timeout(120)
def test_attempts_of_one_launch_share_a_run(tmp_path, monkeypatch):
    """Ray restarted the workers before any checkpoint: the new attempt finds its launch's run by tag."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", "stage=unit",
                             "tracking.system_metrics_interval_s=0"])  # trackers left open, as above
    first = RunTracker(cfg)
    run_id = first.start(launch_id="launch-a")
    first.log_metrics({"train/loss": 1.0}, 5)
    first.flush()  # then the workers die, with no checkpoint

    again = RunTracker(cfg)
    assert again.start(launch_id="launch-a") == run_id
    for step in (5, 10):  # the restart replays step 5 from scratch: logged once
        again.log_metrics({"train/loss": 2.0}, step)
    again.end("FINISHED")
    other = RunTracker(cfg).start(launch_id="launch-b")  # another launch of the same run name: its own run

    client = MlflowClient(tracking_uri(cfg))
    assert other != run_id and client.get_run(other).data.tags["launch_id"] == "launch-b"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")) == [(5, 1.0),
                                                                                                  (10, 2.0)]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.timeout(120)
def test_a_resubmission_after_a_driver_lost_before_any_checkpoint_continues_its_run(tmp_path, monkeypatch):
    """benchmarks/soak.py found it: a driver SIGKILLed before the run's first checkpoint left its MLflow run
    RUNNING, and the resubmitted launch (a new launch_id, nothing to resume) opened a second run of the same name."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", "stage=unit",
                             "tracking.system_metrics_interval_s=0"])  # trackers left open, as above
    lost = RunTracker(cfg)
    run_id = lost.start(launch_id="launch-a")
    lost.log_metrics({"train/loss": 1.0}, 5)
    lost.flush()  # then the driver and its workers are killed: the run stays RUNNING, no checkpoint

    other_stage = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", "stage=other",
                                     "tracking.run_name=unit", "tracking.system_metrics_interval_s=0"])
    assert RunTracker(other_stage).start(launch_id="launch-x") != run_id  # another stage's run of the name: not it
    resubmitted = RunTracker(cfg)
    assert resubmitted.start(launch_id="launch-b") == run_id
    for step in (5, 10):  # from scratch: step 5 again, logged once
        resubmitted.log_metrics({"train/loss": 2.0}, step)
    resubmitted.end("FINISHED")

    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name("videomamba").experiment_id
    runs = client.search_runs([experiment], filter_string="attributes.run_name = 'unit' and tags.stage = 'unit'")
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(5, 1.0), (10, 2.0)]
    assert RunTracker(cfg).start(launch_id="launch-c") != run_id  # a finished run is not continued


def test_manifest_hash_tag(tmp_path, monkeypatch):
    from pipeline.tracking import manifest_hash

    (tmp_path / "manifest.json").write_text('{"samples": 8}')
    cfg = load_config(None, [f"data.train_shards={tmp_path}/train-{{000000..000003}}.tar"])
    import hashlib

    assert manifest_hash(cfg.data) == hashlib.sha256(b'{"samples": 8}').hexdigest()[:16]
    assert manifest_hash(load_config(None, [f"data.train_shards={tmp_path}/sub"]).data) is None


def _wait_for(predicate, timeout_s: float = 30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out waiting for system metrics"
        time.sleep(0.05)
    return value


@pytest.mark.timeout(120)
def test_system_metrics_sampled_while_the_run_is_open(tmp_path, monkeypatch):
    """MLflow's monitor samples the node into system/* metrics until `end`, continues its sample count on a
    resume, and its sample steps do not count as logged training steps."""
    import threading

    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    cfg = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", "stage=unit",
                             "tracking.system_metrics_interval_s=0.1"])
    client = MlflowClient(tracking_uri(cfg))
    key = "system/cpu_utilization_percentage"

    def samples(run_id):
        return client.get_metric_history(run_id, key)

    tracker = RunTracker(cfg)
    run_id = tracker.start()
    sampler = tracker._system_metrics._process
    try:
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.flush()
        _wait_for(lambda: len(samples(run_id)) >= 3)  # sample steps 0..2+: past training step 2
    finally:
        tracker.end("FAILED")
    before = len(samples(run_id))
    assert isinstance(sampler, threading.Thread) and not sampler.is_alive()

    resumed = RunTracker(cfg)
    assert resumed.start(resume_run_id=run_id) == run_id
    try:
        _wait_for(lambda: len(samples(run_id)) > before)
        resumed.log_metrics({"train/loss": 2.0}, 2)
    finally:
        resumed.end("FINISHED")

    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    steps = sorted(m.step for m in samples(run_id))
    assert steps == list(range(len(steps))), steps  # one sample count across both attempts
    assert all(0.0 <= m.value <= 100.0 for m in samples(run_id))
    assert any(k.startswith("system/system_memory") for k in client.get_run(run_id).data.metrics)


def test_system_metrics_interval_is_checked():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="system_metrics_interval_s"):
        load_config(None, ["tracking.system_metrics_interval_s=-1"])


@pytest.mark.timeout(120)
def test_missing_system_metrics_dependency_leaves_tracking_on(tmp_path, monkeypatch, capsys):
    """Without psutil (MLflow's monitor cannot import) the run is still tracked; the log says why no system/*."""
    import sys

    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)  # import fails
    cfg = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", "stage=unit"])
    tracker = RunTracker(cfg)
    run_id = tracker.start()
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.end("FINISHED")

    assert "system metrics off" in capsys.readouterr().out
    run = MlflowClient(tracking_uri(cfg)).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train/loss": 1.0}


@pytest.mark.timeout(60)
def test_tracking_run_is_the_one_way_runs_open(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RunNotFoundError, TrackingRun, git_sha, metric_entries, run_status

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = TrackingRun.create(uri, "exp", "parent", {"recipe": "r"})
    child = TrackingRun.create(uri, "exp", "child", {"stage": "s"}, parent_run_id=parent.run_id)
    child.log_params({"a.b": 1, "list": [1, 2], "long": "x" * 7000})
    child.log_metrics(metric_entries({f"m{i}": float(i) for i in range(1500)}, step=3))  # two requests
    child.end("FAILED")
    client = MlflowClient(uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["stage"] == "s"
    assert run.data.tags.get("git_sha") == git_sha()  # None outside a git work tree: then no tag either
    assert run.data.params["list"] == "[1, 2]" and len(run.data.params["long"]) == 6000
    assert len(run.data.metrics) == 1500 and client.get_metric_history(child.run_id, "m7")[0].step == 3
    assert run_status(uri, child.run_id) == "FAILED" and run_status(uri, "0" * 32) == "missing"

    again = TrackingRun.reopen(uri, child.run_id)
    assert run_status(uri, again.run_id) == "RUNNING"
    with pytest.raises(RunNotFoundError, match=f"the tracking store {uri} has no run 0+"):
        TrackingRun.reopen(uri, "0" * 32)
    assert TrackingRun.find(uri, "exp", "recipe", "r") == parent.run_id
    assert TrackingRun.find(uri, "exp", "recipe", "other") is None
