"""Where the bidirectional mixer core's time goes: kernel times of its forward + backward, by kernel.

Runs the Triton mixer (bench_block's inputs, bf16 autocast) under the torch profiler and prints, for each shape,
every kernel's device time a step (its total over the profiled steps / steps) and share of the step, largest
first. Device times, so host overhead does not show; bench_block gives the step's wall time beside it.

    PYTHONPATH=.:benchmarks python benchmarks/profile_mixer.py [--shapes "Ti 64f b4" ...] [--steps 10]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from _common import SHAPES, scan_config
from bench_block import block_steps, make_weights
from torch.profiler import ProfilerActivity, profile

from models.ops.triton_scan import bimamba_inner_triton


def kernel_ms_per_step(step, steps: int) -> dict[str, float]:
    """Device ms a step of each kernel `step` launches, over `steps` profiled steps after warm-up."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:90]] += event.device_time / 1e3 / steps
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for name, Bsz, E, L, R in [s for s in SHAPES if not args.shapes or s[0] in args.shapes]:
        x, z = (torch.randn(Bsz, L, 2 * E, device="cuda", dtype=torch.bfloat16).transpose(1, 2).chunk(2, dim=1))
        cfg = scan_config(Bsz * E, L, time_major=True)
        mixer = lambda x, z, f, b, cfg=cfg: bimamba_inner_triton(x, z, f, b, config=cfg)  # noqa: E731
        forward, step = block_steps(mixer, x, z, make_weights(E, R), make_weights(E, R))
        for label, fn in (("fwd", forward), ("fwd+bwd", step)):
            kernels = kernel_ms_per_step(fn, args.steps)
            total = sum(kernels.values())
            print(f"\n{name} {label}: {total:.3f} ms of kernels a step ({cfg})")
            for kernel, ms in kernels.items():
                print(f"  {ms:8.4f} ms {100 * ms / total:5.1f}%  {kernel}")


if __name__ == "__main__":
    main()
