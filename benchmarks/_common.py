"""Shared pieces of the GPU benchmarks: the scan shapes, realistic inputs, timing, mamba-ssm loading.

Run the benchmarks from the repository root with PYTHONPATH=. (scripts/gpu_bench.sh does).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from _results import RESULTS, write_result_files

# (name, batch, d_inner E, L, dt_rank R): VideoMamba-S/M/Ti at 224², 8 or 64 frames (1 + T*196 tokens).
SHAPES = [
    ("S 8f b16", 16, 768, 1569, 24),
    ("M 8f b16", 16, 1152, 1569, 36),
    ("Ti 64f b4", 4, 384, 12545, 12),
    ("S 64f b4", 4, 768, 12545, 24),
]
D_STATE = 16


def default_scan_config(rows: int, length: int, time_major: bool = False):
    """default_config for `rows` (batch x channels), the sequence length, the inputs' layout and this GPU."""
    from models.ops.scan_launch import default_config
    from models.ops.triton_scan import sm_count

    return default_config(D_STATE, rows, time_major, length=length, sm_count=sm_count("cuda"))


def scan_config(rows: int, length: int, time_major: bool = False):
    """default_scan_config with the ScanConfig fields named in SCAN_CONFIG overridden, e.g.
    SCAN_CONFIG="block_e_fwd=16,fwd_segments=2,chunk=32,bwd_sub_chunks=8"."""
    from dataclasses import fields, replace

    from models.ops.scan_launch import ScanConfig

    cfg = default_scan_config(rows, length, time_major)
    spec = os.environ.get("SCAN_CONFIG", "")
    if not spec:
        return cfg
    names = {f.name for f in fields(ScanConfig)}
    overrides = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"SCAN_CONFIG: unknown field {key!r}; ScanConfig has {sorted(names)}")
        overrides[key] = int(value)
    return replace(cfg, **overrides)


def log_uniform_dt(E: int, device: str) -> torch.Tensor:
    """mamba's dt init: dt ~ log-uniform [1e-3, 1e-1]; returns the delta_bias whose softplus is dt."""
    dt = torch.exp(torch.rand(E, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dt + torch.log(-torch.expm1(-dt))


def window_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` over one ~200 ms window of repeats after warm-up (CUDA events,
    triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))


def bench_ms(fn: Callable[[], object], windows: int = 1) -> float:
    """The least of `windows` window_ms medians: on the H100 a whole 200 ms window of the mixer's forward now
    and then ran 20-33% slow (2026-11-26)."""
    return min(window_ms(fn) for _ in range(windows))


def alternating_ms(fns: dict[str, Callable[[], object]], windows: int) -> dict[str, dict[str, float]]:
    """Per name: the median, least and largest of `windows` window_ms medians, the windows of all `fns` taken in
    turn and in alternating order (a, b, c, then c, b, a, ...), so that a slow stretch of the device or host
    falls on every contender alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for w in range(windows):
        for name in names if w % 2 == 0 else names[::-1]:
            samples[name].append(window_ms(fns[name]))
    return {name: {"ms": statistics.median(s), "min": min(s), "max": max(s)} for name, s in samples.items()}


def graph_replay(step: Callable[[], object]) -> Callable[[], None]:
    """`step` captured in a CUDA graph (after warm-up on a side stream, as torch.cuda.graph asks); returns the
    replay. The backward is captured too: autograd runs it inside the capture, as make_graphed_callables does."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def gpu_ms(step: Callable[[], object], windows: int = 1) -> float:
    """Device milliseconds of `step`: bench_ms of its CUDA-graph replay. Plain calls time the host instead
    whenever Python and the launches take longer than the kernels: on the H100 (2026-11-27) the mixer's fwd+bwd
    at Ti 64f b4 took 3.6-4.5 ms in plain calls across runs, for 3.56 ms of kernels."""
    return bench_ms(graph_replay(step), windows)


def load_mamba_selective_scan() -> Callable | None:
    """mamba-ssm's own `selective_scan_fn` from its unpacked sdist, with the compiled `selective_scan_cuda` built
    in place (MAMBA_SRC alone) or by scripts/build_released_kernels.py (MAMBA_EXT names its --out folder).

    mamba_ssm/__init__.py imports Mamba2/Mamba3 and their tilelang/quack dependencies, absent on the GPU image,
    so the package is registered without running it; the scan's module itself only needs torch, einops, triton
    and the extension.
    """
    src = os.environ.get("MAMBA_SRC")
    if not src:
        return None
    sys.path.insert(0, src)
    if os.environ.get("MAMBA_EXT"):
        sys.path.insert(0, os.environ["MAMBA_EXT"])
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(Path(src) / "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def kernel_versions() -> dict[str, str]:
    """mamba-ssm's and causal-conv1d's compiled modules as this process loaded them: the build record that
    scripts/build_released_kernels.py wrote beside the module, else the folder it came from; "not loaded"."""
    found = {}
    for package, module_name in (("mamba-ssm", "selective_scan_cuda"), ("causal-conv1d", "causal_conv1d_cuda")):
        module = sys.modules.get(module_name)
        module = getattr(module, "__wrapped__", module)  # benchmarks/_released.py's signature adapter
        path = Path(getattr(module, "__file__", "") or "") if module is not None else None
        if path is None or not path.name:
            found[package] = "not loaded"
            continue
        record = path.with_suffix(".json")
        if record.is_file():
            build = json.loads(record.read_text())
            found[package] = f"{build['version']} ({build['arch']}, {build['dtypes']})"
        else:
            found[package] = f"built in {path.parent.name}"
    return found


def gpu_meta() -> dict[str, object]:
    """Device, CUDA, torch and triton versions, and the mamba-ssm / causal-conv1d kernels loaded."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"device": device, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": __import__("triton").__version__, **kernel_versions()}


def write_results(stem: str, rows: list[dict], columns: list[str], title: str,
                  setup: dict | None = None, results_dir: Path = RESULTS, notes: list[str] = ()) -> None:
    """<results_dir>/<stem>.json (provenance, gpu_meta(), `setup`, every row) and <stem>.md (a table, `notes`)."""
    meta = {**gpu_meta(), **(setup or {})}
    header = [f"# {title}", "", f"{meta['device']}; CUDA {meta['cuda']}, torch {meta['torch']}, triton "
              f"{meta['triton']}; mamba-ssm {meta['mamba-ssm']}, causal-conv1d {meta['causal-conv1d']}."]
    write_result_files(results_dir, stem, meta, rows, columns, header, list(notes))
