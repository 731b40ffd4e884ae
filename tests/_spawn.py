"""Spawned multi-process tests: a free rendezvous port, and processes that are always reaped."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(fn: Callable, args: tuple, nprocs: int, deadline_s: float) -> None:
    """Run `fn(index, *args)` in `nprocs` spawned processes; fail if they take longer than `deadline_s`, or if one
    fails. Survivors are killed either way, so no process outlives the test."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + deadline_s
        while not context.join(timeout=5):
            assert time.monotonic() < deadline, f"processes did not finish within {deadline_s:g} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
