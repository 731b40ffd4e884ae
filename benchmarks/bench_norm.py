"""Fused Add -> RMSNorm: our Triton kernel (models/ops/triton_norm.py) vs the PyTorch reference (rms_norm_ref).

VideoMamba's call: bf16 x (the mixer output), fp32 residual stream, fp32 weight, prenorm (returns the new fp32
residual), rows = batch x tokens of the Ti/S/M widths at 8 frames (batch 16) and 64 frames (batch 4). Reports
milliseconds (median) of fwd and fwd+bwd, each two ways: "gpu", the calls captured in a CUDA graph and replayed
(device time only: what the kernels cost), and "eager", plain calls (what a training step pays when the GPU
waits for the host: autograd and launch overhead, large on a slow host CPU). Also effective GB/s of the gpu
times over the minimum bytes, the speedups over the reference, and the relative difference of the two
(outputs and gradients).

    PYTHONPATH=. python benchmarks/bench_norm.py [--shapes "S 8f b16" ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import bench_ms, gpu_ms, rel_err, write_results

from models.ops.ref import rms_norm_ref
from models.ops.triton_norm import add_rms_norm_triton

# (name, rows = batch x (1 + frames x 196), D)
SHAPES = [
    ("Ti 8f b16", 16 * 1569, 192),
    ("S 8f b16", 16 * 1569, 384),
    ("M 8f b16", 16 * 1569, 576),
    ("S 64f b4", 4 * 12545, 384),
]
EPS = 1e-5
# Bytes an element at the least: fwd reads x (bf16) + residual (fp32), writes out (bf16) + residual (fp32);
# the backward reads the saved residual (fp32), d out (bf16), d residual_out (fp32) and writes d x (bf16) and
# d residual (fp32). The weight and the per-row rstd are negligible.
FWD_BYTES, BWD_BYTES = 2 + 4 + 2 + 4, 4 + 2 + 4 + 2 + 4


def make_inputs(rows: int, D: int) -> dict[str, torch.Tensor]:
    return dict(
        x=torch.randn(rows, D, device="cuda", dtype=torch.bfloat16),
        weight=1 + 0.1 * torch.randn(D, device="cuda"),
        residual=4 * torch.randn(rows, D, device="cuda"),
        dout=torch.randn(rows, D, device="cuda", dtype=torch.bfloat16),
        dresidual=torch.randn(rows, D, device="cuda"),
    )


def run_fwd_bwd(fn: Callable, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Outputs (normed, residual) and the gradients of x, weight and residual with a gradient on both outputs."""
    leaves = [t[k].detach().requires_grad_() for k in ("x", "weight", "residual")]
    out, res = fn(leaves[0], leaves[1], EPS, leaves[2], True, True)
    return out, res, *torch.autograd.grad((out, res), leaves, (t["dout"], t["dresidual"]))


def time_norm(fn: Callable, t: dict[str, torch.Tensor]) -> dict[str, float]:
    """gpu/eager x fwd/fwd+bwd milliseconds."""
    def fwd() -> None:
        with torch.no_grad():
            fn(t["x"], t["weight"], EPS, t["residual"], True, True)

    def fwd_bwd() -> None:
        run_fwd_bwd(fn, t)

    times = {}
    for label, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        times[f"eager {label}"] = bench_ms(step)
        times[f"gpu {label}"] = gpu_ms(step)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", choices=[s[0] for s in SHAPES], help="subset of shape names")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_norm needs a CUDA device (it times GPU kernels)")
    rows_out = []
    for name, rows, D in (s for s in SHAPES if not args.shapes or s[0] in args.shapes):
        t = make_inputs(rows, D)
        row = {"shape": name, "rows x D": f"{rows}x{D}"}
        for label, fn in (("ours", add_rms_norm_triton), ("ref", rms_norm_ref)):
            row.update({f"{label} {k} ms": v for k, v in time_norm(fn, t).items()})
            row[f"{label} fwd GB/s"] = rows * D * FWD_BYTES / row[f"{label} gpu fwd ms"] / 1e6
            row[f"{label} fwd+bwd GB/s"] = rows * D * (FWD_BYTES + BWD_BYTES) / row[f"{label} gpu fwd+bwd ms"] / 1e6
        for k in ("gpu fwd", "gpu fwd+bwd", "eager fwd", "eager fwd+bwd"):
            row[f"speedup {k}"] = row[f"ref {k} ms"] / row[f"ours {k} ms"]
        ours, ref = run_fwd_bwd(add_rms_norm_triton, t), run_fwd_bwd(rms_norm_ref, t)
        row["max rel diff"] = max(rel_err(a, b) for a, b in zip(ours, ref, strict=True))
        rows_out.append(row)
        del t
        torch.cuda.empty_cache()
    columns = ["shape", "rows x D", "ours gpu fwd ms", "ref gpu fwd ms", "ours fwd GB/s", "ours gpu fwd+bwd ms",
               "ref gpu fwd+bwd ms", "ours fwd+bwd GB/s", "ref fwd+bwd GB/s", "speedup gpu fwd+bwd",
               "ours eager fwd+bwd ms", "ref eager fwd+bwd ms", "speedup eager fwd+bwd", "max rel diff"]
    write_results("norm", rows_out, columns, "Fused add + RMSNorm: Triton vs PyTorch reference",
                  setup={"x": "bf16", "residual": "fp32", "weight": "fp32", "prenorm": True, "eps": EPS},
                  notes=["gpu: CUDA-graph replay (device time); eager: plain calls, host overhead included.",
                         f"GB/s of the gpu times over the minimum bytes: {FWD_BYTES} B/element forward, "
                         f"{FWD_BYTES + BWD_BYTES} forward + backward (inputs read once, outputs written once).",
                         "max rel diff: largest ‖ours − ref‖/‖ref‖ over the two outputs and the gradients of x, "
                         "weight and residual (gradients on both outputs)."])


if __name__ == "__main__":
    main()
