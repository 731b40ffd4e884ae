"""Bidirectional mixer core (bimamba v2, in_proj output -> out_proj input) on the gpu-baseline shapes.

ours:     models.ops.triton_scan.bimamba_inner_triton: one conv+SiLU kernel for both directions, both
          scans on the original tensors (no flips), one gated output.
baseline: mamba-ssm's CUDA `selective_scan_fn` per direction with the unfused glue VideoMamba runs when
          causal-conv1d is absent: PyTorch conv1d + SiLU, flips of x/z/out, x_proj/dt_proj matmuls, a sum.
bf16 activations under autocast, fp32 parameters, d_state 16. mamba-ssm is loaded as in bench_scan.py.
Each gets x and z in the layout its in_proj produces (one GEMM either way): ours, time-major halves of a
(B, L, 2E) tensor, as models/bimamba.py passes them (output time-major, read by out_proj without a copy); the
baseline, (B, E, L) contiguous, as mamba-ssm's Mamba computes W @ x^T.
Times are device times of CUDA-graph replays (`_common.gpu_ms`), and of plain ("eager") calls beside them: those
time the host instead when Python and the launches are slower than the kernels (ours at Ti 64f b4, round 11).

    PYTHONPATH=.:benchmarks python benchmarks/bench_block.py [--shapes "S 8f b16" ...]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from _common import (
    D_STATE,
    SHAPES,
    bench_ms,
    gpu_ms,
    load_mamba_selective_scan,
    log_uniform_dt,
    rel_err,
    scan_config,
    write_results,
)

from models.ops import DirectionWeights
from models.ops.ref import causal_conv1d_ref
from models.ops.triton_conv import empty_like_layout
from models.ops.triton_scan import bimamba_inner_triton


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


def baseline_block(scan):
    """The seam's reference composition, with mamba-ssm's CUDA scan in place of the reference scan."""

    def direction(x, z, w: DirectionWeights):
        u = causal_conv1d_ref(x, w.conv_weight_EW, w.conv_bias_E, "silu")
        N, R = w.A_log_EN.shape[1], w.dt_proj_weight.shape[1]
        dt, B, C = F.linear(u.transpose(1, 2), w.x_proj_weight).split([R, N, N], dim=-1)
        delta = F.linear(dt, w.dt_proj_weight).transpose(1, 2)
        return scan(u, delta, -torch.exp(w.A_log_EN.float()), B.transpose(1, 2), C.transpose(1, 2),
                    w.D_E.float(), z, w.dt_proj_bias.float(), True)

    def block(x, z, fwd, bwd):
        return direction(x, z, fwd) + direction(x.flip(-1), z.flip(-1), bwd).flip(-1)

    return block


BLOCK_NOTE = ("fwd / fwd+bwd ms: median device time of CUDA-graph replays (least of 3 windows); eager: plain "
              "calls, which time the host instead when Python and the launches take longer than the kernels.")


def block_steps(fn, x, z, fwd, bwd):
    """(forward, forward + backward) of the mixer `fn` as argument-free calls, under bf16 autocast."""
    def forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            fn(x, z, fwd, bwd)

    leaves = [x.detach().requires_grad_(), z.detach().requires_grad_(),
              *(t.detach().requires_grad_() for t in (*fwd, *bwd))]
    f, b = DirectionWeights(*leaves[2:9]), DirectionWeights(*leaves[9:])
    dout = empty_like_layout(x).normal_()  # in the output's layout, as out_proj's backward hands it over

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            out = fn(leaves[0], leaves[1], f, b)
        torch.autograd.grad(out, leaves, dout)

    return forward, step


def time_block(fn, x, z, fwd, bwd, eager: bool = False) -> tuple[float, float]:
    """(fwd, fwd+bwd) ms: device time from CUDA-graph replay, or (`eager`) of plain calls, which time the host
    instead when it is the slower of the two."""
    timer = bench_ms if eager else gpu_ms
    return tuple(timer(step, windows=3) for step in block_steps(fn, x, z, fwd, bwd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    args = parser.parse_args()
    mamba = load_mamba_selective_scan()
    print(f"mamba-ssm selective_scan_fn: {'loaded' if mamba else 'not available (set MAMBA_SRC)'}")
    rows = []
    for name, Bsz, E, L, R in [s for s in SHAPES if not args.shapes or s[0] in args.shapes]:
        x = torch.randn(Bsz, E, L, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(Bsz, E, L, device="cuda", dtype=torch.bfloat16)
        x_t, z_t = torch.cat([x, z], dim=1).transpose(1, 2).contiguous().transpose(1, 2).chunk(2, dim=1)
        fwd, bwd = make_weights(E, R), make_weights(E, R)
        cfg = scan_config(Bsz * E, L, time_major=True)
        ours = lambda x, z, f, b, cfg=cfg: bimamba_inner_triton(x, z, f, b, config=cfg)
        row = {"shape": name, "B,E,L": f"{Bsz},{E},{L}", "config": str(cfg)}
        impls = {"ours": (ours, x_t, z_t)}
        if mamba is not None:
            impls["base"] = (baseline_block(mamba), x, z)
        for tag, (fn, xi, zi) in impls.items():
            row[f"{tag} fwd ms"], row[f"{tag} fwd+bwd ms"] = time_block(fn, xi, zi, fwd, bwd)
            row[f"{tag} eager fwd ms"], row[f"{tag} eager fwd+bwd ms"] = time_block(fn, xi, zi, fwd, bwd, eager=True)
            row[f"{tag} peak GiB (fwd+bwd)"] = _peak_gib(fn, xi, zi, fwd, bwd)
        if mamba is not None:
            base = impls["base"][0]
            for kind in ("fwd", "fwd+bwd", "eager fwd", "eager fwd+bwd"):
                row[f"speedup {kind}"] = row[f"base {kind} ms"] / row[f"ours {kind} ms"]
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                row["out rel diff vs base"] = rel_err(ours(x_t, z_t, fwd, bwd), base(x, z, fwd, bwd))
        rows.append(row)
        print(row, flush=True)
        del x, z, x_t, z_t
        torch.cuda.empty_cache()
    columns = ["shape", "B,E,L", "ours fwd ms", "base fwd ms", "speedup fwd", "ours fwd+bwd ms",
               "base fwd+bwd ms", "speedup fwd+bwd", "ours eager fwd+bwd ms", "base eager fwd+bwd ms",
               "speedup eager fwd+bwd", "ours peak GiB (fwd+bwd)", "base peak GiB (fwd+bwd)", "out rel diff vs base"]
    write_results("block", rows, columns,
                  "Bidirectional mixer core: fused Triton (ours) vs mamba-ssm scan + unfused PyTorch glue",
                  notes=[BLOCK_NOTE])


def _peak_gib(fn, x, z, fwd, bwd) -> float:
    """Peak CUDA memory of one fwd+bwd above what the inputs already hold."""
    leaves = [x.detach().requires_grad_(), z.detach().requires_grad_(),
              *(t.detach().requires_grad_() for t in (*fwd, *bwd))]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", torch.bfloat16):
        out = fn(leaves[0], leaves[1], DirectionWeights(*leaves[2:9]), DirectionWeights(*leaves[9:]))
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


if __name__ == "__main__":
    main()
