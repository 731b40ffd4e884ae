"""One launch per run: the run lock in the checkpoint store (local and S3), with real processes.

Two identical launches of the toy job used to share one checkpoint folder and MLflow run. Now the second stops
with a one-line error naming the first (host, pid) and how to take over; after the first is SIGKILLed (its lock
left behind), the next launch takes the lock over and resumes; a finished launch leaves no lock.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.checkpointing import layout
from pipeline.checkpointing.run_lock import LOCK, RunLock, RunLockedError
from pipeline.config import load_config
from pipeline.launch import launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_YAML = os.path.join(REPO, "configs", "stages", "toy.yaml")


def job_args(tmp_path, max_steps: int) -> list[str]:
    return [
        "--config", TOY_YAML, "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"optim.max_steps={max_steps}",
        "checkpoint.interval_steps=50", "tracking.log_interval=50",
    ]  # fmt: skip


def start_job(tmp_path, max_steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/train_toy.py", *job_args(tmp_path, max_steps)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(condition, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.timeout(420)
def test_a_second_launch_of_a_running_run_stops_naming_the_first(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "ckpt" / "toy"
    first = start_job(tmp_path, max_steps=10**6)  # trains until killed
    try:
        wait_for(lambda: (run / layout.checkpoint_dir_name(50)).is_dir() or first.poll() is not None,
                 "the first launch's first checkpoint")  # fmt: skip
        assert first.poll() is None, first.stderr.read()[-3000:]
        holder = json.loads((run / LOCK).read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), first.pid)

        second = subprocess.run([sys.executable, "jobs/train_toy.py", *job_args(tmp_path, 10**6)], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                                timeout=240)  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith("error: run folder") and "in use by another launch of this run" in error
        assert f"host {socket.gethostname()} pid {first.pid}" in error and "checkpoint.break_lock=true" in error
        assert first.poll() is None  # the first launch goes on, its lock untouched
        assert json.loads((run / LOCK).read_text())["token"] == holder["token"]

        first.send_signal(signal.SIGKILL)  # the driver dies without releasing its lock
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    assert (run / LOCK).is_file()
    last = max(int(p.name.removeprefix(layout.CHECKPOINT_PREFIX)) for p in run.glob(f"{layout.CHECKPOINT_PREFIX}*"))

    caplog.set_level(logging.WARNING)
    third = launch(load_config(TOY_YAML, [*job_args(tmp_path, last + 10)[2:]]))
    assert (third.resumed_from_step, third.step) == (last, last + 10)
    taken = [r.getMessage() for r in caplog.records if "taking over run lock" in r.getMessage()]
    assert taken and f"process {first.pid} of this host" in taken[0] and "no longer exists" in taken[0]
    assert not (run / LOCK).exists()  # released on exit
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert [r.info.run_id for r in runs] == [third.mlflow_run_id]  # the refused launch made no MLflow run


HOLDER = textwrap.dedent("""
    import sys, time, s3fs
    from pipeline.checkpointing.run_lock import RunLock
    lock = RunLock(s3fs.S3FileSystem(), sys.argv[1], stale_s=float(sys.argv[2]))
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.mark.timeout(120)
def test_the_lock_on_s3_refuses_takes_over_stale_locks_and_is_released(moto_s3, caplog):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("ckpts-lock")
    root = "ckpts-lock/runs/toy"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, root, "60"], cwd=REPO, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": REPO}, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid}, started .* last heartbeat \d+ s ago"):
            RunLock(fs, root, stale_s=60).acquire()
        holder.kill()
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)

    caplog.set_level(logging.WARNING)
    lock = RunLock(fs, root, stale_s=1.0)
    lock.acquire()  # its holder process is gone: taken over at once
    assert f"process {holder.pid} of this host" in caplog.text
    beat = json.loads(fs.cat(f"{root}/{LOCK}"))["heartbeat"]
    time.sleep(1.0)  # a beat every stale_s / 5
    assert json.loads(fs.cat(f"{root}/{LOCK}"))["heartbeat"] > beat
    with pytest.raises(RunLockedError):  # held and beating: refused even with a short stale time
        RunLock(fs, root, stale_s=1.0).acquire()
    lock.release()
    assert not fs.exists(f"{root}/{LOCK}")

    # A holder on another host: refused while its heartbeat is fresh, taken over once it is older than stale_s,
    # or at once with break_lock.
    def foreign(heartbeat_age_s: float) -> None:
        record = {"host": "elsewhere", "pid": 1, "started": "then", "heartbeat": time.time() - heartbeat_age_s,
                  "token": "theirs"}  # fmt: skip
        fs.pipe(f"{root}/{LOCK}", json.dumps(record).encode())

    foreign(5)
    with pytest.raises(RunLockedError, match="host elsewhere pid 1"):
        RunLock(fs, root, stale_s=60).acquire()
    forced = RunLock(fs, root, stale_s=60)
    forced.acquire(break_lock=True)
    forced.release()
    foreign(120)
    late = RunLock(fs, root, stale_s=60)
    late.acquire()
    assert "its last heartbeat is 120 s old" in caplog.text
    late.release()
