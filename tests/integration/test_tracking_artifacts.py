"""Where MLflow run artifacts land: beside the sqlite store whatever the creating process's working directory, under
`tracking.artifact_location` (s3 on a moto server, through a real `mlflow server`), and what an old experiment does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.tracking import RunTracker, tracking_uri
from tests._spawn import free_port

REPO = Path(__file__).resolve().parents[2]

# A stage run's tracking as rank 0 does it, in a process of its own: start (params, config.yaml), end.
_RUN_ONE_STAGE = textwrap.dedent("""
    import json, sys
    from pipeline.config import load_config
    from pipeline.tracking import RunTracker
    cfg = load_config(None, ["task.name=toy", "stage=unit", "tracking.system_metrics_interval_s=0", *sys.argv[1:]])
    tracker = RunTracker(cfg)
    run_id = tracker.start()
    tracker.end()
    print(json.dumps({"run_id": run_id, "uri": tracker.uri}))
""")


def run_stage_tracking(cwd: Path, overrides: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", _RUN_ONE_STAGE, *overrides], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(360)
def test_artifacts_of_a_run_from_another_working_directory_stay_beside_the_sqlite_store(tmp_path):
    """MLflow put them in ./mlruns of the creating process (a Ray worker's session folder, deleted with it)."""
    from mlflow.tracking import MlflowClient

    worker_cwd = tmp_path / "worker_cwd"
    worker_cwd.mkdir()
    made = run_stage_tracking(worker_cwd, [f"output_dir={tmp_path / 'out'}"])
    assert list(worker_cwd.iterdir()) == []  # no ./mlruns where the process happened to run
    shutil.rmtree(worker_cwd)  # as Ray removes a job's unpacked working dir

    client = MlflowClient(made["uri"])
    run = client.get_run(made["run_id"])
    assert run.info.artifact_uri.startswith(f"{tmp_path / 'out' / 'mlartifacts' / 'videomamba'}/")
    config = client.download_artifacts(made["run_id"], "config.yaml", str(tmp_path / "dl"))
    assert "task:" in Path(config).read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_artifacts_of_rank_0_in_a_ray_job_working_dir_stay_beside_the_store(tmp_path):
    """A Ray task running in a runtime_env working_dir, as `ray job submit --working-dir` runs the driver: its cwd is
    Ray's unpacked copy under the session folder, a temporary place on one node, where ./mlruns used to go."""
    import ray
    from mlflow.tracking import MlflowClient

    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "note.txt").write_text("the job's files")
    out = tmp_path / "out"

    def start_and_end_a_run(output_dir: str) -> tuple[str, str, str]:
        cfg = load_config(None, ["task.name=toy", "stage=unit", "tracking.system_metrics_interval_s=0",
                                 f"output_dir={output_dir}"])  # fmt: skip
        tracker = RunTracker(cfg)
        run_id = tracker.start()
        tracker.end()
        return run_id, tracker.uri, os.getcwd()

    ray.init(num_cpus=1, include_dashboard=False, runtime_env={
        "working_dir": str(tmp_path / "job"), "env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        run_id, uri, worker_cwd = ray.get(ray.remote(start_and_end_a_run).remote(str(out)))
    finally:
        ray.shutdown()
    assert "/session_" in worker_cwd  # the task ran in Ray's copy of the working dir
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.artifact_uri.startswith(f"{out / 'mlartifacts' / 'videomamba'}/")
    assert not Path(worker_cwd, "mlruns").exists()
    config = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    assert "task:" in Path(config).read_text()


def mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on a sqlite store, started in its own folder."""
    (tmp_path / "server").mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server/mlflow.db"],
        cwd=tmp_path / "server", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_until_serving(server: subprocess.Popen, port: int, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_s3_artifact_location_through_a_real_mlflow_server(moto_s3, tmp_path, monkeypatch):
    """`tracking.artifact_location=s3://...` with an MLflow server: the run's artifacts are objects in the bucket,
    readable through the server's client; nothing lands in the logging process's cwd or the server's folder."""
    import s3fs
    from mlflow.tracking import MlflowClient

    s3fs.S3FileSystem().mkdir("mlflow-artifacts")
    port = free_port()
    server = mlflow_server(tmp_path, port)
    try:
        wait_until_serving(server, port, 300)  # 10-80 s on a busy 2-core machine
        uri = f"http://127.0.0.1:{port}"
        (tmp_path / "cwd").mkdir()
        monkeypatch.chdir(tmp_path / "cwd")
        cfg = load_config(None, ["task.name=toy", "stage=unit", "tracking.system_metrics_interval_s=0",
                                 f"output_dir={tmp_path / 'out'}", f"tracking.uri={uri}",
                                 "tracking.artifact_location=s3://mlflow-artifacts/runs"])  # fmt: skip
        tracker = RunTracker(cfg)
        made = {"run_id": tracker.start()}
        tracker.end()
        client = MlflowClient(uri)
        assert client.get_experiment_by_name("videomamba").artifact_location == "s3://mlflow-artifacts/runs/videomamba"
        key = f"mlflow-artifacts/runs/videomamba/{made['run_id']}/artifacts/config.yaml"
        s3fs.S3FileSystem.clear_instance_cache()
        assert "task:" in s3fs.S3FileSystem().cat(key).decode()
        config = client.download_artifacts(made["run_id"], "config.yaml", str(tmp_path / "dl"))
        assert "task:" in Path(config).read_text()
        assert list((tmp_path / "cwd").iterdir()) == [] and not (tmp_path / "server" / "mlartifacts").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.timeout(120)
def test_an_experiment_created_in_an_old_mlruns_is_named_in_a_warning(tmp_path, monkeypatch, capsys):
    """An experiment made with MLflow's default keeps ./mlruns of its creator: runs go there too, and the user is
    told where, instead of finding the artifacts missing later."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old_cwd = tmp_path / "old_cwd"
    old_cwd.mkdir()
    monkeypatch.chdir(old_cwd)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    (tmp_path / "out").mkdir()
    MlflowClient(uri).create_experiment("videomamba")  # as the pipeline did before artifact locations were given
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["task.name=toy", "stage=unit", f"output_dir={tmp_path / 'out'}",
                             "tracking.system_metrics_interval_s=0"])  # fmt: skip
    tracker = RunTracker(cfg)
    tracker.start()
    tracker.end()
    warning = capsys.readouterr().out
    assert f"experiment 'videomamba' of {uri} keeps its artifacts in {old_cwd / 'mlruns'}/1" in warning
    assert f"not in {tmp_path / 'out' / 'mlartifacts' / 'videomamba'}" in warning
    assert "set a new tracking.experiment" in warning

    fresh = load_config(None, ["task.name=toy", "stage=unit", f"output_dir={tmp_path / 'out'}",
                               "tracking.experiment=fresh", "tracking.system_metrics_interval_s=0"])  # fmt: skip
    tracker = RunTracker(fresh)
    run_id = tracker.start()
    tracker.end()
    assert "warning" not in capsys.readouterr().out
    assert MlflowClient(uri).get_run(run_id).info.artifact_uri.startswith(str(tmp_path / "out" / "mlartifacts"))


def test_a_database_store_without_an_artifact_location_is_refused_in_the_plan(tmp_path):
    """A postgres store has no folder to sit beside: the artifacts went to ./mlruns of whoever created the
    experiment. The dry run's checks say so; with a location they plan it."""
    from pipeline.preflight import check_storage

    uri = "postgresql://mlflow:hunter22@db:5432/mlflow"
    cfg = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", f"tracking.uri={uri}"])
    with pytest.raises(ConfigError, match=r"tracking.uri 'postgresql://mlflow:\*\*\*@db:5432/mlflow' is a database "
                                          r"with no folder for artifacts.*Set tracking.artifact_location"):
        check_storage(cfg)
    cfg = load_config(None, ["task.name=toy", f"output_dir={tmp_path}", f"tracking.uri={uri}",
                             "tracking.artifact_location=shared/artifacts"])  # fmt: skip
    assert check_storage(cfg) == [
        f"tracking: a new experiment 'videomamba' keeps artifacts in {Path.cwd() / 'shared/artifacts/videomamba'}"]
    assert tracking_uri(load_config(None, ["tracking.uri=sqlite:///rel/mlflow.db"])) == \
        f"sqlite:///{Path.cwd() / 'rel/mlflow.db'}"  # a relative store means the same file for every worker
