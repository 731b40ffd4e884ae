"""Start-up of every DataLoader worker process: die with the process that forked it.

A loader worker is forked from a training process and inherits its descriptors: the Ray worker's sockets
(its connection to the raylet, its gRPC server) and the GPU's device files. When the training process is killed
(SIGKILL, the OOM killer, a preempted node's agent) torch's own check for a dead parent runs only between the
samples a worker asks for, so a worker blocked in reading or decoding outlives it. While such orphans hold the
dead process's sockets, Ray does not see its connection close and does not restart the worker group: on two
H100s a killed rank's three orphaned loader workers held the restart back 6.5 minutes; once they were killed it
took 16 s (benchmarks/results/scaling_fault.md, docs/operations.md). Linux's parent-death signal makes the
kernel kill each worker the moment its parent goes.

Linux sends it when the *thread* that forked the worker ends: start iterating a loader on a thread that outlives
its use (the training thread, as the engine and the retrieval encoder do), not on a short-lived helper thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

import torch

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def worker_init(parent_pid: int, worker_id: int, *, one_thread: bool) -> None:
    """Runs first in each worker. `parent_pid` is the forking process (bound by `init_fn`, in the parent)."""
    del worker_id  # torch passes it; every worker does the same
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a DataLoader worker")
        if os.getppid() != parent_pid:
            # The parent died between the fork and the prctl: the signal will never come.
            os._exit(1)
    if one_thread:
        torch.set_num_threads(1)  # one core per loader worker: processes, not threads, give the parallelism


def init_fn(*, one_thread: bool = False) -> Callable[[int], None]:
    """A DataLoader `worker_init_fn` for workers forked by this process (see the module docstring);
    `one_thread` also limits each worker's torch ops to one thread. Call it where the loader is built, in the
    process that will iterate it."""
    return functools.partial(worker_init, os.getpid(), one_thread=one_thread)
