"""How much of a training step is communication: a torch.profiler window of a few steps on rank 0.

`tracking.profile_start: N` profiles steps N .. N + `tracking.profile_steps` - 1 on rank 0 and logs, as fractions
of the window's wall time:

- `profile/comm_busy_fraction`: time some collective kernel was running (NCCL kernels on GPU; gloo's `c10d::`
  operations on CPU);
- `profile/comm_exposed_fraction`: time a collective ran while no compute kernel did, the part that data-parallel
  overlap failed to hide (on CPU, where collectives block the process, it equals the busy fraction);
- `profile/compute_busy_fraction`: time some other kernel was running (GPU only);
- `profile/step_s`: wall seconds per profiled step.

The window also leaves a Chrome trace, `<output_dir>/profile/rank0_steps{first}-{last}.json.gz`, for
chrome://tracing or Perfetto. Only rank 0 records; the other ranks run unchanged, and since every step
synchronises the ranks, rank 0's window is the job's. Profiling slows the profiled steps a little: keep it out of
throughput measurements (benchmarks/bench_scaling.py profiles after its timed windows).
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

Interval = tuple[float, float]

_GPU_COLLECTIVE_PREFIX = "nccl"
_CPU_COLLECTIVE_PREFIXES = ("c10d::", "gloo:")


def merged(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of `intervals` as sorted, disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def total(intervals: Iterable[Interval]) -> float:
    return sum(e - s for s, e in merged(intervals))


def uncovered(intervals: Iterable[Interval], cover: Iterable[Interval]) -> float:
    """Length of the union of `intervals` outside the union of `cover`."""
    cover = merged(cover)
    length, i = 0.0, 0
    for start, end in merged(intervals):
        while i < len(cover) and cover[i][1] <= start:
            i += 1
        cursor, j = start, i
        while j < len(cover) and cover[j][0] < end:
            if cover[j][0] > cursor:
                length += cover[j][0] - cursor
            cursor = max(cursor, cover[j][1])
            j += 1
        length += max(0.0, end - cursor)
    return length


def communication_fractions(comm: list[Interval], compute: list[Interval], wall: float) -> dict[str, float]:
    """Busy and exposed collective time, and busy compute time, as fractions of `wall` (same time unit)."""
    if wall <= 0:
        raise ValueError(f"the profiled window's wall time must be positive, got {wall}")
    return {
        "profile/comm_busy_fraction": total(comm) / wall,
        "profile/comm_exposed_fraction": uncovered(comm, compute) / wall,
        "profile/compute_busy_fraction": total(compute) / wall,
    }


def split_events(events: Iterable, on_gpu: bool) -> tuple[list[Interval], list[Interval]]:
    """(collective, compute) intervals in µs from torch.profiler's events: device kernels on GPU, where NCCL
    kernels are the collectives; on CPU the collectives are gloo's c10d operations and nothing else counts."""
    comm: list[Interval] = []
    compute: list[Interval] = []
    for event in events:
        span = (float(event.time_range.start), float(event.time_range.end))
        if on_gpu:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            (comm if event.name.startswith(_GPU_COLLECTIVE_PREFIX) else compute).append(span)
        elif event.name.startswith(_CPU_COLLECTIVE_PREFIXES):
            comm.append(span)
    return comm, compute


class StepProfiler:
    """Profiles steps [start, start + steps) of the process it runs in; inactive when `start` is 0."""

    def __init__(self, start: int, steps: int, device: torch.device, trace_dir: Path) -> None:
        self.start, self.steps, self.device, self.trace_dir = start, steps, device, trace_dir
        self._profile: torch.profiler.profile | None = None
        self._began = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run (steps count from 1)."""
        if not self.start or step != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(activities=activities)
        self._sync()
        self._profile.start()
        self._began = time.perf_counter()

    def after_step(self, step: int) -> dict[str, float]:
        """Call with the number of the step that just ran; returns the metrics once the window closes."""
        if self._profile is None or step != self.start + self.steps - 1:
            return {}
        self._sync()
        wall_s = time.perf_counter() - self._began
        self._profile.stop()
        profile, self._profile = self._profile, None
        comm, compute = split_events(profile.events(), on_gpu=self.device.type == "cuda")
        metrics = communication_fractions(comm, compute, wall_s * 1e6)
        metrics["profile/step_s"] = wall_s / self.steps
        self._write_trace(profile)
        return metrics

    def _write_trace(self, profile: torch.profiler.profile) -> None:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        raw = self.trace_dir / f"rank0_steps{self.start}-{self.start + self.steps - 1}.json"
        profile.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
