"""One launch per run at a time: a lock object beside the run's checkpoints, `<checkpoint.path>/<run name>/run.lock`.

Two launches of the same run (same run name and `checkpoint.path`) wrote into one checkpoint folder and one MLflow
run: duplicated metrics, then a crash. The launch (the driver under Ray, the process itself on the local path,
rank 0 under torchrun) now takes the lock first and holds it until it returns or raises:

- created with an exclusive write (local: `O_EXCL`; S3: a conditional PUT, `If-None-Match: *`), so of two launches
  starting together exactly one gets it;
- it holds `{host, pid, started, heartbeat, token}`; a thread rewrites `heartbeat` every `lock_stale_s / 5`
  seconds while the launch runs;
- another launch stops with `RunLockedError` naming the holder, unless the lock is stale: its heartbeat older than
  `checkpoint.lock_stale_s`, or its holder a process of this host that no longer exists (a killed driver). A stale
  lock is taken over with a warning; `checkpoint.break_lock=true` takes over any lock (the holder is known gone).

Heartbeats use the holder's clock and are read with the reader's: `lock_stale_s` must exceed the clock skew
between hosts (NTP keeps it far below the 300 s default).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pipeline.config import ConfigError
from pipeline.redaction import redact_text

LOCK = "run.lock"
log = logging.getLogger(__name__)


class RunLockedError(ConfigError):
    """Another launch of the same run holds its lock."""


def _alive_here(holder: dict[str, Any]) -> bool:
    """False only when the holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class RunLock:
    """The lock of the run folder `root` on fsspec filesystem `fs`."""

    def __init__(self, fs, root: str, stale_s: float) -> None:
        self.fs, self.path, self.stale_s = fs, f"{root.rstrip('/')}/{LOCK}", stale_s
        self.shown = redact_text(self.path)
        self.token = uuid.uuid4().hex
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                           "heartbeat": time.time(), "token": self.token}).encode()  # fmt: skip

    def holder(self) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock; {} while it is being written (local) or unreadable."""
        self.fs.invalidate_cache()
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _stale_because(self, holder: dict[str, Any]) -> str | None:
        if not holder:
            return None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_s:
            return f"its last heartbeat is {age:.0f} s old (checkpoint.lock_stale_s={self.stale_s:g})"
        if not _alive_here(holder):
            return f"process {holder.get('pid')} of this host ({holder.get('host')}) no longer exists"
        return None

    def _describe(self, holder: dict[str, Any]) -> str:
        if not holder:
            return "a launch that is writing the lock now"
        age = time.time() - float(holder.get("heartbeat", 0))
        return (f"host {holder.get('host')} pid {holder.get('pid')}, started {holder.get('started')}, "
                f"last heartbeat {age:.0f} s ago")  # fmt: skip

    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock, or raise `RunLockedError` naming its holder and how to take it over."""
        for _ in range(3):  # a stale lock removed, then created again: at most a few races with other launches
            try:
                self.fs.pipe_file(self.path, self._record(), mode="create")
                break
            except FileExistsError:
                pass
            holder = self.holder()
            if holder is None:
                continue  # released in between
            stale = "checkpoint.break_lock=true" if break_lock else self._stale_because(holder)
            if stale is None:
                raise RunLockedError(
                    f"run folder {redact_text(self.path.rsplit('/', 1)[0])} is in use by another launch of this run "
                    f"({self._describe(holder)}; lock {self.shown}). Wait for it to end, or choose another "
                    f"tracking.run_name. If that launch is gone, the lock is taken over once its heartbeat is older "
                    f"than checkpoint.lock_stale_s={self.stale_s:g} s, or now with checkpoint.break_lock=true."
                )
            log.warning("taking over run lock %s of %s: %s", self.shown, self._describe(holder), stale)
            self.fs.rm(self.path)
        else:
            raise RunLockedError(f"could not take run lock {self.shown}: other launches keep creating it")
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 5):
            try:
                holder = self.holder()
                if not holder or holder.get("token") != self.token:
                    log.warning("run lock %s was taken over by %s; this launch no longer holds it",
                                self.shown, self._describe(holder or {}))  # fmt: skip
                    return
                self.fs.pipe_file(self.path, self._record())
            except OSError as err:  # a storage hiccup: the next beat tries again, the lease covers a few misses
                log.warning("run lock %s: heartbeat failed (%s)", self.shown, err)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if this launch still holds it."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = self.holder()
        if holder and holder.get("token") == self.token:
            self.fs.rm(self.path)


@contextmanager
def run_lock(cfg) -> Iterator[RunLock]:
    """Hold the lock of `cfg`'s run folder for the block (`RunLockedError` if another launch holds it)."""
    from pipeline.checkpointing.storage import run_storage, storage_filesystem

    fs, root = storage_filesystem(cfg)
    if "://" not in run_storage(cfg):
        fs.makedirs(root, exist_ok=True)  # object stores need no folder; a bucket is never created here
    lock = RunLock(fs, root, cfg.checkpoint.lock_stale_s)
    lock.acquire(break_lock=cfg.checkpoint.break_lock)
    try:
        yield lock
    finally:
        lock.release()
