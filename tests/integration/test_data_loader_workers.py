"""DataLoader workers die with the process that forked them (pipeline/data/loader_workers.py).

A real training-like parent (its own Python process) starts a DataLoader whose workers block inside the
dataset, as a worker reading a slow shard does, and is then SIGKILLed. With the project's worker_init_fn the
kernel kills the workers at once; without it they stay (the control case), which is what held Ray's restart of
a killed rank back for minutes on the GPU hosts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

_PARENT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from torch.utils.data import DataLoader, IterableDataset
    from pipeline.data import loader_workers

    class Blocked(IterableDataset):
        def __iter__(self):
            Path(sys.argv[1], str(os.getpid())).touch()
            time.sleep(600)  # a worker stuck in I/O: torch's parent check never runs
            yield 0

    init = loader_workers.init_fn(one_thread=True) if sys.argv[2] == "fixed" else None
    next(iter(DataLoader(Blocked(), batch_size=None, num_workers=2, worker_init_fn=init)))
""")


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _orphans_after_parent_killed(tmp_path: Path, mode: str) -> list[int]:
    """Worker pids still alive 10 s after their parent was SIGKILLed (killed here in any case before returning)."""
    pids_dir = tmp_path / mode
    pids_dir.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(pids_dir), mode], cwd=Path(__file__).parents[2],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2:
            assert parent.poll() is None, f"the parent exited early (code {parent.returncode})"
            assert time.monotonic() < deadline, "the loader workers did not start within 60 s"
            time.sleep(0.2)
            workers = [int(p.name) for p in pids_dir.iterdir()]
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [pid for pid in workers if _alive(pid)]
    finally:
        parent.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(120)
def test_workers_die_with_a_killed_parent(tmp_path):
    assert _orphans_after_parent_killed(tmp_path, "fixed") == []


@pytest.mark.timeout(120)
def test_without_the_init_fn_blocked_workers_outlive_their_parent(tmp_path):
    # The control: the failure the init fn prevents is real on this machine.
    assert len(_orphans_after_parent_killed(tmp_path, "plain")) == 2


def test_the_training_loader_passes_it_to_its_workers(tiny_synthetic):
    from pipeline.config import DataConfig
    from pipeline.data import loader_workers
    from pipeline.data.reader import build_loader

    cfg = DataConfig(train_shards=tiny_synthetic["train_shards"], num_frames=4, img_size=32, batch_size=2,
                     num_workers=2)
    init = build_loader(cfg, "train", rank=0, world_size=1).dataloader.worker_init_fn
    assert init.func is loader_workers.worker_init and init.args == (os.getpid(),)
    assert init.keywords == {"one_thread": True}
