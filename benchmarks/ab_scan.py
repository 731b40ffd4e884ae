"""A/B of the scan kernels: a git revision's Triton scan and conv against the working copy, in one process.

Every kernel change is judged this way (docs/kernels.md, benchmarks/results/history/): both versions time the same
inputs alternately, `--reps` times, and the least time of each is kept, so the ratio is free of the drift between
calls. One direction of the scan and both directions in one call (each with time-major and with (B, E, L)
inputs), and the bidirectional mixer core, forward and forward + backward, on `_common.SHAPES`; plus the
bf16 error of every output and gradient against the fp32 reference at the first shape.

    PYTHONPATH=.:benchmarks python benchmarks/ab_scan.py --base HEAD [--reps 3] [--shapes "S 8f b16" ...]

--base also takes a folder holding the base's triton_scan.py (and triton_conv.py, else the working copy's): the
device machine's copy of the repository may carry older git data than the working tree (on 2026-11-26 its HEAD
was days behind the working tree's), so save the version to compare against there, e.g.
    mkdir -p .gpu/base && git show HEAD:models/ops/triton_scan.py > .gpu/base/triton_scan.py
and pass --base .gpu/base (carried with the run).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import SHAPES
from bench_block import make_weights, time_block
from bench_scan import (
    as_time_major,
    bidirectional_args,
    error_vs_fp32_reference,
    make_inputs,
    ours_bidirectional,
    time_fwd_and_bwd,
    time_scan,
)

import models.ops.triton_scan as working

REPO = Path(__file__).resolve().parents[1]


# The kernel modules an A/B takes from the base, in import order. A revision without one (scan_launch.py did not
# exist before 2026-11-26) imports nothing from it.
BASE_MODULES = ("triton_conv", "scan_launch", "triton_scan")


def load_revision(rev: str, folder: Path):
    """models/ops/triton_scan.py at `rev`, with the triton_conv and scan_launch it imports at `rev` too (any may
    have changed). `rev` may also be a folder holding triton_scan.py and, optionally, the others (the working
    copy's stand in for missing ones)."""
    saved = Path(rev)

    def source(name: str) -> str | None:
        path = f"models/ops/{name}.py"
        if saved.is_dir():
            copy = saved / f"{name}.py"
            return (copy if copy.exists() else REPO / path).read_text()
        out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True)
        if out.returncode and name != "triton_scan":
            return None
        out.check_returncode()
        return out.stdout

    loaded, module = [], None
    for name in BASE_MODULES:
        text = source(name)
        if text is None:
            continue
        for dep in loaded:
            text = text.replace(f"from models.ops.{dep} import", f"from models.ops.{dep}_base import")
        path = folder / f"{name}_base.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"models.ops.{name}_base", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded.append(name)
    return module


def best_of(reps: int, timers: dict) -> dict[str, tuple[float, float]]:
    """The least (fwd, fwd+bwd) ms of each timer over `reps` alternating rounds."""
    best = {tag: (float("inf"), float("inf")) for tag in timers}
    for _ in range(reps):
        for tag, timer in timers.items():
            f, fb = timer()
            best[tag] = (min(best[tag][0], f), min(best[tag][1], fb))
    return best


def line(kind: str, name: str, best: dict) -> str:
    (bf, bfb), (nf, nfb) = best["base"], best["new"]
    return (f"{kind} {name:10s} fwd {bf:.3f} -> {nf:.3f} ({bf / nf:.3f}x)   "
            f"fwd+bwd {bfb:.3f} -> {nfb:.3f} ({bfb / nfb:.3f}x)")


def scan_rows(mods: dict, shape: tuple, time_major: bool, reps: int, sm_count: int, with_error: bool) -> None:
    name, Bsz, E, L, _ = shape
    x = make_inputs(Bsz, E, L)
    x = as_time_major(x) if time_major else x
    cfg = working.default_config(16, Bsz * E, time_major, length=L, sm_count=sm_count)
    fns = {tag: functools.partial(_scan, mod, cfg) for tag, mod in mods.items()}
    best = best_of(reps, {tag: functools.partial(time_scan, fn, x) for tag, fn in fns.items()})
    print(line("TM " if time_major else "BEL", name, best), flush=True)
    if with_error:
        err = error_vs_fp32_reference(fns, x)
        print(f"    bf16 max rel err vs fp32 ref: base {err['base']:.3e} new {err['new']:.3e}", flush=True)


def bidirectional_row(mods: dict, shape: tuple, time_major: bool, reps: int, sm_count: int) -> None:
    """Both directions in one call: the mixer's scans without its glue, in either layout (on the H100 on
    2026-11-27, side-by-side forwards made the (B, E, L) call 2x slower while every single-direction and mixer row
    held)."""
    name, Bsz, E, L, _ = shape
    layout = as_time_major if time_major else dict
    args = bidirectional_args(layout(make_inputs(Bsz, E, L)), layout(make_inputs(Bsz, E, L)))
    dout = torch.randn_like(args[0])
    cfg = working.default_config(16, Bsz * E, time_major, length=L, sm_count=sm_count)
    timers = {tag: functools.partial(time_fwd_and_bwd, ours_bidirectional(mod, cfg), args, dout)
              for tag, mod in mods.items()}
    print(line("BI-TM " if time_major else "BI-BEL", name, best_of(reps, timers)), flush=True)


def mixer_row(mods: dict, shape: tuple, reps: int, sm_count: int) -> None:
    name, Bsz, E, L, R = shape
    x_t, z_t = torch.randn(Bsz, L, 2 * E, device="cuda", dtype=torch.bfloat16).transpose(1, 2).chunk(2, dim=1)
    fw, bw = make_weights(E, R), make_weights(E, R)  # x, z: time-major halves of in_proj's output, as in the model
    cfg = working.default_config(16, Bsz * E, True, length=L, sm_count=sm_count)
    timers = {tag: functools.partial(time_block, functools.partial(_mixer, mod, cfg), x_t, z_t, fw, bw)
              for tag, mod in mods.items()}
    print(line("MIX", name, best_of(reps, timers)), flush=True)


def _scan(mod, cfg, *args):
    return mod.selective_scan_triton(*args, config=cfg)


def _mixer(mod, cfg, x, z, fwd, bwd):
    return mod.bimamba_inner_triton(x, z, fwd, bwd, config=cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision (or folder of kernel files) to compare the "
                        "working copy against")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    parser.add_argument("--mixer-only", action="store_true", help="skip the single-scan rows (a change to the "
                        "conv or the mixer's glue)")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    print(f"{props.name}; base {args.base} vs the working copy; min of {args.reps}", flush=True)
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    with tempfile.TemporaryDirectory() as folder:
        mods = {"base": load_revision(args.base, Path(folder)), "new": working}
        for time_major in () if args.mixer_only else (True, False):
            for i, shape in enumerate(shapes):
                scan_rows(mods, shape, time_major, args.reps, sms, with_error=i == 0)
                torch.cuda.empty_cache()
            for shape in shapes:
                bidirectional_row(mods, shape, time_major, args.reps, sms)
                torch.cuda.empty_cache()
        for shape in shapes:
            mixer_row(mods, shape, args.reps, sms)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
