"""Wall-clock seconds per phase of an evaluation (decoding, forward passes, scoring), for its report.

CUDA work is asynchronous: a phase on a GPU device synchronises at its start and end, so the seconds
belong to the phase that queued the work. Timings are this rank's; with several ranks the report shows rank 0's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

Item = TypeVar("Item")


class PhaseTimer:
    """Accumulates seconds per named phase; a phase measured several times adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        _sync(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def iterate(self, items: Iterable[Item], name: str) -> Iterator[Item]:
        """Yield from `items`, counting the time spent waiting for each one (a DataLoader's decoding) as `name`."""
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.add(name, time.perf_counter() - start)
            yield item

    def report(self) -> dict[str, float]:
        """{phase}_s rounded to ms, plus total_s since the timer was made."""
        out = {f"{name}_s": round(seconds, 3) for name, seconds in self.seconds.items()}
        out["total_s"] = round(time.perf_counter() - self._start, 3)
        return out


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
