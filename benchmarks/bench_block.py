"""Bidirectional mixer core (bimamba v2, in_proj output -> out_proj input): ours against the released fused path.

ours:     models.ops.triton_scan.bimamba_inner_triton: one conv+SiLU kernel for both directions, both scans on
          the original tensors (no flips), one gated output.
released: the released VideoMamba's Mamba.forward between in_proj and out_proj (bimamba v2, fast path): per
          direction its fork's mamba_inner_fn_no_out_proj (causal-conv1d's kernel, x_proj and dt_proj matmuls,
          mamba-ssm's selective-scan kernel in one autograd function), the backward direction on the flipped
          xz, the two outputs summed; read from --released-repo, kernels from --released-ext
          (benchmarks/_released.py, scripts/build_released_kernels.py).
bf16 activations under autocast, fp32 parameters, d_state 16, on the VideoMamba shapes of _common.SHAPES. Each
gets xz in the layout its in_proj produces, from the same values: ours, time-major halves of a (B, L, 2E) tensor,
as models/bimamba.py passes them (output time-major, read by out_proj without a copy); the released one, the
(B, 2E, L) view of W @ x^T that its Mamba.forward makes. The outputs and the gradients of xz and of every weight
are compared (relative differences), then both are timed: device times of CUDA-graph replays, and of plain
("eager") calls, which time the host instead when Python and the launches are slower than the kernels. Each time
is the median of --windows 200 ms windows taken in alternating order (ours, released, released, ours, ...), with
the spread of the window medians.

    PYTHONPATH=.:benchmarks python benchmarks/bench_block.py --released-repo PATH --released-ext DIR \
        [--shapes "S 8f b16" ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    D_STATE,
    RESULTS,
    SHAPES,
    alternating_ms,
    graph_replay,
    log_uniform_dt,
    rel_err,
    scan_config,
    write_results,
)
from _released import ReleasedPath, ReleasedPathError, load
from torch import Tensor

from models.ops import DirectionWeights
from models.ops.triton_scan import bimamba_inner_triton

WEIGHT_NAMES = DirectionWeights._fields


def make_weights(E: int, R: int, N: int = D_STATE) -> DirectionWeights:
    dev = "cuda"
    return DirectionWeights(
        conv_weight_EW=torch.randn(E, 4, device=dev) / 2,
        conv_bias_E=torch.randn(E, device=dev) / 10,
        x_proj_weight=torch.randn(R + 2 * N, E, device=dev) / math.sqrt(E),
        dt_proj_weight=torch.randn(E, R, device=dev) / math.sqrt(R),
        dt_proj_bias=log_uniform_dt(E, dev),
        A_log_EN=torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(E, 1),
        D_E=torch.ones(E, device=dev),
    )


class Contender:
    """A mixer core on its own xz layout: `run(leaves)` -> output, with leaves = [xz leaf, 14 weights]."""

    def __init__(self, xz_leaf: Tensor, as_mixer_input: Callable[[Tensor], Tensor],
                 core: Callable[[Tensor, DirectionWeights, DirectionWeights], Tensor],
                 dxz_as_BFL: Callable[[Tensor], Tensor]) -> None:
        self.xz_leaf, self.as_mixer_input, self.core, self.dxz_as_BFL = xz_leaf, as_mixer_input, core, dxz_as_BFL

    def forward(self, weights: list[Tensor]) -> Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            return self.core(self.as_mixer_input(self.xz_leaf), DirectionWeights(*weights[:7]),
                             DirectionWeights(*weights[7:]))

    def steps(self, weights: list[Tensor], dout: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
        """(forward without grad, forward + backward) as argument-free calls."""
        leaves = [self.xz_leaf, *weights]

        def forward() -> None:
            with torch.no_grad():
                self.forward(weights)

        def step() -> None:
            torch.autograd.grad(self.forward(weights), leaves, dout)

        return forward, step

    def grads(self, weights: list[Tensor], dout: Tensor) -> list[Tensor]:
        """Gradients of xz (as (B, 2E, L)) and of every weight for the output gradient `dout`."""
        dxz, *dweights = torch.autograd.grad(self.forward(weights), [self.xz_leaf, *weights], dout)
        return [self.dxz_as_BFL(dxz), *dweights]


def contenders(xz_BFL: Tensor, cfg, released: ReleasedPath | None) -> dict[str, Contender]:
    """Ours and (when loaded) the released core, each on the same xz values in its own in_proj layout."""
    B, F, L = xz_BFL.shape
    ours_leaf = xz_BFL.transpose(1, 2).contiguous().requires_grad_()  # (B, L, 2E), as in_proj(x_BLD) stores it
    found = {"ours": Contender(
        ours_leaf, lambda xz_BLF: xz_BLF.transpose(1, 2),
        lambda xz, f, b: bimamba_inner_triton(*xz.chunk(2, dim=1), f, b, config=cfg),
        lambda dxz_BLF: dxz_BLF.transpose(1, 2))}
    if released is not None:
        # The released Mamba.forward: rearrange(W @ rearrange(h, "b l d -> d (b l)"), "d (b l) -> b d l").
        leaf_FM = xz_BFL.permute(1, 0, 2).reshape(F, B * L).contiguous().requires_grad_()
        found["released"] = Contender(
            leaf_FM, lambda xz_FM: xz_FM.view(F, B, L).permute(1, 0, 2), released.mixer_core,
            lambda dxz_FM: dxz_FM.view(F, B, L).permute(1, 0, 2))
    return found


def gradient_checks(ours: Contender, released: Contender, weights: list[Tensor], dout_BEL: Tensor) -> dict:
    """Output and gradient differences of ours against the released core (same values in, same dout)."""
    with torch.no_grad():
        out = rel_err(ours.forward(weights), released.forward(weights))
    g_ours = ours.grads(weights, _like_output(ours, weights, dout_BEL))
    g_rel = released.grads(weights, _like_output(released, weights, dout_BEL))
    names = ["xz", *(f"fwd.{n}" for n in WEIGHT_NAMES), *(f"bwd.{n}" for n in WEIGHT_NAMES)]
    diffs = {name: rel_err(a, b) for name, a, b in zip(names, g_ours, g_rel, strict=True)}
    worst = max(diffs, key=diffs.get)
    return {"out rel diff": out, "dxz rel diff": diffs["xz"], "worst grad": f"{worst} {diffs[worst]:.2e}",
            "grad rel diffs": diffs}


def _like_output(contender: Contender, weights: list[Tensor], dout_BEL: Tensor) -> Tensor:
    """`dout_BEL`'s values in the layout of the contender's output (as out_proj's backward hands them over)."""
    with torch.no_grad():
        out = contender.forward(weights)
    return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device).copy_(dout_BEL)


def _replays(plain: dict[str, Callable[[], None]], kind: str, row: dict) -> dict[str, Callable[[], None]]:
    """CUDA-graph replays of the calls; a call that cannot be captured is left out and its error kept in `row`."""
    replays = {}
    for tag, fn in plain.items():
        try:
            replays[tag] = graph_replay(fn)
        except RuntimeError as err:
            row[f"{tag} {kind} graph error"] = str(err)[:200]
    return replays


def peak_gib(step: Callable[[], None]) -> float:
    """Peak CUDA memory of one call of `step` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def measure_shape(name: str, Bsz: int, E: int, L: int, R: int, released: ReleasedPath | None,
                  windows: int) -> dict:
    xz_BFL = torch.randn(Bsz, 2 * E, L, device="cuda", dtype=torch.bfloat16)
    weights = [t.requires_grad_() for t in (*make_weights(E, R), *make_weights(E, R))]
    dout_BEL = torch.randn(Bsz, E, L, device="cuda", dtype=torch.bfloat16)
    cfg = scan_config(Bsz * E, L, time_major=True)
    found = contenders(xz_BFL, cfg, released)
    row: dict = {"shape": name, "B,E,L": f"{Bsz},{E},{L}", "config": str(cfg)}
    if "released" in found:
        row.update(gradient_checks(found["ours"], found["released"], weights, dout_BEL))
    steps = {tag: c.steps(weights, _like_output(c, weights, dout_BEL)) for tag, c in found.items()}
    for i, kind in enumerate(("fwd", "fwd+bwd")):
        plain = {tag: s[i] for tag, s in steps.items()}
        for timing, fns in (("", _replays(plain, kind, row)), ("eager ", plain)):
            for tag, stats in alternating_ms(fns, windows).items():
                row[f"{tag} {timing}{kind} ms"] = stats["ms"]
                row[f"{tag} {timing}{kind} spread %"] = (stats["max"] - stats["min"]) / stats["ms"] * 100
    for tag, (_, step) in steps.items():
        row[f"{tag} peak GiB (fwd+bwd)"] = peak_gib(step)
    if "released" in found:
        for kind in ("fwd", "fwd+bwd", "eager fwd", "eager fwd+bwd"):
            if f"released {kind} ms" in row and f"ours {kind} ms" in row:
                row[f"speedup {kind}"] = row[f"released {kind} ms"] / row[f"ours {kind} ms"]
    return row


BLOCK_NOTE = ("fwd / fwd+bwd ms: median device time of CUDA-graph replays over the windows; eager: plain calls, "
              "which time the host instead when Python and the launches take longer than the kernels. spread %: "
              "(largest - least window median) / median. speedup = released / ours. rel diff: ours against the "
              "released core, same inputs; the JSON holds every gradient's.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    parser.add_argument("--released-repo", type=Path, help="a checkout of github.com/OpenGVLab/VideoMamba")
    parser.add_argument("--released-ext", type=Path, help="folder of scripts/build_released_kernels.py's modules")
    parser.add_argument("--windows", type=int, default=5, help="timing windows per contender and timing")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    released = None
    try:
        released = load(args.released_repo, args.released_ext)
    except ReleasedPathError as err:
        print(f"{err}\n(timing ours alone)", file=sys.stderr)
    rows = []
    for name, Bsz, E, L, R in [s for s in SHAPES if not args.shapes or s[0] in args.shapes]:
        rows.append(measure_shape(name, Bsz, E, L, R, released, args.windows))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    columns = ["shape", "B,E,L", "ours fwd ms", "released fwd ms", "speedup fwd", "ours fwd+bwd ms",
               "released fwd+bwd ms", "speedup fwd+bwd", "ours eager fwd+bwd ms", "released eager fwd+bwd ms",
               "speedup eager fwd+bwd", "ours fwd+bwd spread %", "released fwd+bwd spread %",
               "ours peak GiB (fwd+bwd)", "released peak GiB (fwd+bwd)", "out rel diff", "dxz rel diff", "worst grad"]
    setup = {"released path": released.provenance if released else "not loaded", "windows": args.windows}
    write_results("block", rows, columns,
                  "Bidirectional mixer core: fused Triton (ours) vs the released fused path (mamba-ssm, causal-conv1d)",
                  setup=setup, results_dir=args.results_dir, notes=[BLOCK_NOTE])
    return 0


if __name__ == "__main__":
    sys.exit(main())
