"""Shared pieces of the CPU benchmarks (engine overhead, VTC gather): machine description, timing, result files.

The CI machine has 2 cores shared with other jobs, so timings are taken in interleaved rounds (A, B, A, B, ...)
and reported as medians, with the load average before and after.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _results import RESULTS, write_result_files


def cpu_meta() -> dict[str, object]:
    """CPU model, core count, torch version, threads and the 1-minute load average now."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0]}  # fmt: skip


def interleaved_ms_per_step(variants: dict[str, Callable[[int], None]], steps: int, rounds: int,
                            warmup: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per variant: median and min over `rounds` of (wall ms of `run(steps)`) / steps, rounds interleaved."""
    for run in variants.values():
        run(warmup)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run(steps)
            samples[name].append((time.perf_counter() - start) * 1e3 / steps)
    return {name: {"ms_median": statistics.median(s), "ms_min": min(s)} for name, s in samples.items()}


def write_cpu_results(stem: str, meta: dict, rows: list[dict], columns: list[str], title: str,
                      notes: list[str], out_dir: str | Path | None = None) -> None:  # fmt: skip
    """<out_dir or benchmarks/results>/<stem>.json (meta + rows) and <stem>.md (notes + a table)."""
    write_result_files(Path(out_dir) if out_dir else RESULTS, stem, meta, rows, columns, [f"# {title}", "", *notes])
