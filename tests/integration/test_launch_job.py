"""`ray job submit` of jobs/train_toy.py against a private `ray start --head` cluster (token auth disabled).

The cluster is started with `--block` so that stopping that one process (by pid) stops exactly this cluster;
`ray stop` would stop every Ray cluster of the user, including other test runs'.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start exited early"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} did not come up in {timeout_s} s")


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_ray_job_submit_trains_toy(tmp_path):
    from mlflow.tracking import MlflowClient

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # AF_UNIX socket paths under it must stay short
    gcs, dash, client, agent, metrics, rtenv = free_ports(6)
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
         f"--temp-dir={ray_tmp}", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rtenv}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(address, head, timeout_s=90)
        runtime_env = {
            "working_dir": str(REPO),
            "excludes": [".venv", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "demo_out", "outputs"],
            "env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
        }
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", f"--address={address}",
             f"--runtime-env-json={json.dumps(runtime_env)}", "--",
             "python", "jobs/train_toy.py", "--config", "configs/stages/toy.yaml", f"output_dir={tmp_path}/out",
             f"checkpoint.path={tmp_path}/ckpt", f"tracking.uri={uri}", "optim.max_steps=10",
             "checkpoint.interval_steps=5", "tracking.log_interval=5"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log and "done: step 10" in log, log[-4000:]
        # every progress line once (rank 0 prints it; Ray forwards worker output to the job's log)
        progress = re.findall(r"\[toy\] step (\d+)/10 loss", log)
        assert progress == ["5", "10"], "\n".join(line for line in log.splitlines() if "] step " in line)
        assert (tmp_path / "out" / "export" / "model.pt").is_file()
        assert (tmp_path / "out" / "config.yaml").is_file()
        (run,) = MlflowClient(uri).search_runs(MlflowClient(uri).get_experiment_by_name("toy").experiment_id)
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")) == [5, 10]
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its cluster's processes on TERM
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
