"""Selective scan on `_common.SHAPES`: our Triton kernel vs mamba-ssm's CUDA `selective_scan_fn`.

bf16 u/delta/B/C/z, fp32 A/D/delta_bias, d_state 16, delta_softplus, with z (as VideoMamba calls it).
Reports fwd and fwd+bwd milliseconds (median device time, from CUDA-graph replay: `_common.gpu_ms`), effective
GB/s over the minimum bytes, and the relative difference between the two kernels' outputs and input gradients.
mamba-ssm is used when MAMBA_SRC names its unpacked sdist, with the extension built in place or in the folder
MAMBA_EXT names (scripts/build_released_kernels.py; scripts/gpu_bench.sh sets both); otherwise only ours is timed.

--time-major hands our kernel u, delta, z, B and C stored time-major ((B, L, E) / (B, L, N) storage, the
layout in_proj and x_proj produce and the mixer keeps) and writes scan_time_major.{json,md}; mamba-ssm
always gets its own (B, E, L) layout.

    [SCAN_CONFIG=field=value,...] PYTHONPATH=.:benchmarks python benchmarks/bench_scan.py \
        [--sweep] [--time-major] [--shapes "S 8f b16" ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import (
    D_STATE,
    SHAPES,
    bench_ms,
    default_scan_config,
    gpu_ms,
    load_mamba_selective_scan,
    log_uniform_dt,
    rel_err,
    scan_config,
    write_results,
)

import models.ops.triton_scan as triton_scan
from models.ops.ref import selective_scan_ref
from models.ops.scan_launch import ScanConfig
from models.ops.triton_scan import selective_scan_triton


def make_inputs(Bsz: int, E: int, L: int, N: int = D_STATE) -> dict[str, torch.Tensor]:
    dev, bf16 = "cuda", torch.bfloat16
    A_log = torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(E, 1)
    return dict(
        u=torch.randn(Bsz, E, L, device=dev, dtype=bf16),
        delta=(0.5 * torch.randn(Bsz, E, L, device=dev)).to(bf16),
        A=-torch.exp(A_log),
        B=torch.randn(Bsz, N, L, device=dev, dtype=bf16),
        C=torch.randn(Bsz, N, L, device=dev, dtype=bf16),
        D=torch.ones(E, device=dev),
        z=torch.randn(Bsz, E, L, device=dev, dtype=bf16),
        delta_bias=log_uniform_dt(E, dev),
    )


def as_time_major(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same values with u, delta, z, B and C stored time-major (channels or states contiguous)."""
    return {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if k in ("u", "delta", "z", "B", "C") else v
            for k, v in x.items()}


def min_bytes(Bsz: int, E: int, L: int, N: int = D_STATE) -> tuple[int, int]:
    """Each input read once, each output written once, 2 B/elt: fwd (u, delta, z, out; B, C) and
    fwd+bwd (fwd, then u, delta, z, dout, du, ddelta, dz; B, C, dB, dC)."""
    bel, bnl = Bsz * E * L * 2, Bsz * N * L * 2
    return 4 * bel + 2 * bnl, 11 * bel + 6 * bnl


def time_scan(fn: Callable, x: dict[str, torch.Tensor], with_bwd: bool = True, eager: bool = False
              ) -> tuple[float, float]:
    """(fwd, fwd+bwd) milliseconds of `fn` on x: device time from CUDA-graph replay (gpu_ms), or with `eager`
    plain calls (bench_ms; the PyTorch reference, whose thousands of small kernels make a graph impractical)."""
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    return time_fwd_and_bwd(lambda *a: fn(*a, True), args, torch.randn_like(x["u"]),
                            timer=bench_ms if eager else gpu_ms, with_bwd=with_bwd)


def compare(ours: Callable, theirs: Callable, x: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative difference of outputs and of every input gradient between the two kernels."""
    args = [x[k].detach().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dout = torch.randn_like(x["u"])
    results = []
    for fn in (ours, theirs):
        out = fn(*args, True)
        results.append((out, torch.autograd.grad(out, args, dout)))
    (o1, g1), (o2, g2) = results
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    diff = {"out": rel_err(o1, o2)}
    diff.update({f"d{n}": rel_err(a, b) for n, a, b in zip(names, g1, g2, strict=True)})
    return diff


ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def copy_bandwidth_gbs() -> float:
    """The GPU's measured device-to-device copy bandwidth (read + write bytes / s) on a 1 GiB buffer."""
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def peak_gib(fn: Callable, x: dict[str, torch.Tensor]) -> float:
    """Peak CUDA memory of one forward + backward above the inputs."""
    leaves = [x[k].detach().requires_grad_() for k in ARG_NAMES]
    dout = torch.randn_like(x["u"])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(*leaves, True), leaves, dout)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def error_vs_fp32_reference(fns: dict[str, Callable], x: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest relative error (output and each input gradient) of each bf16 kernel against the float32
    reference scan run on the same bf16-rounded inputs."""
    dout = torch.randn_like(x["u"])
    leaves32 = [x[k].detach().float().requires_grad_() for k in ARG_NAMES]
    ref_out = selective_scan_ref(*leaves32, delta_softplus=True)
    ref = [ref_out, *torch.autograd.grad(ref_out, leaves32, dout.float())]
    errors = {}
    for name, fn in fns.items():
        leaves = [x[k].detach().requires_grad_() for k in ARG_NAMES]
        out = fn(*leaves, True)
        errors[name] = max(rel_err(a, b) for a, b in zip([out, *torch.autograd.grad(out, leaves, dout)], ref,
                                                         strict=True))
    return errors


BIDIR_KEYS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def bidirectional_args(x: dict[str, torch.Tensor], x_b: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """bidirectional_scan's arguments as one list: the forward direction's 7 inputs, the backward's, then z."""
    return [x[k] for k in BIDIR_KEYS] + [x_b[k] for k in BIDIR_KEYS] + [x["z"]]


def ours_bidirectional(module, cfg: ScanConfig) -> Callable:
    """`module`'s bidirectional_scan_triton (the working copy's, or a base revision's in ab_scan.py) over the flat
    arguments of bidirectional_args."""
    return lambda *a: module.bidirectional_scan_triton(a[:7], a[7:14], a[14], True, config=cfg)


def time_fwd_and_bwd(fn: Callable, args: list[torch.Tensor], dout: torch.Tensor, timer: Callable | None = None,
                     with_bwd: bool = True) -> tuple[float, float]:
    """(fwd, fwd+bwd) ms of fn(*args) by `timer` (gpu_ms unless given): the forward without grad, then (with_bwd,
    else nan) the forward and the gradient of every argument."""
    timer = timer or gpu_ms
    def fwd() -> None:
        with torch.no_grad():
            fn(*args)

    t_fwd = timer(fwd)
    if not with_bwd:
        return t_fwd, float("nan")
    leaves = [t.detach().requires_grad_() for t in args]
    return t_fwd, timer(lambda: torch.autograd.grad(fn(*leaves), leaves, dout))


def bidirectional(mamba: Callable | None, x: dict[str, torch.Tensor], x_b: dict[str, torch.Tensor],
                  cfg: ScanConfig, time_major: bool = False) -> dict[str, float]:
    """Both directions of the mixer's scan: ours in one call without flipped copies (inputs time-major if asked),
    against two mamba-ssm calls with flips of the backward direction's inputs and output (as VideoMamba runs
    them)."""
    def theirs(*a):
        u, delta, A, B, C, D, bias = a[7:14]
        flip = lambda t: t.flip(-1)  # noqa: E731
        back = mamba(flip(u), flip(delta), A, flip(B), flip(C), D, flip(a[14]), bias, True)
        return mamba(*a[:5], a[5], a[14], a[6], True) + flip(back)

    row = {}
    ours = ours_bidirectional(triton_scan, cfg)
    for name, fn in (("ours", ours), ("mamba", theirs)) if mamba is not None else (("ours", ours),):
        layout = as_time_major if time_major and name == "ours" else dict
        args = bidirectional_args(layout(x), layout(x_b))
        row[f"bidir {name} fwd ms"], row[f"bidir {name} fwd+bwd ms"] = time_fwd_and_bwd(
            fn, args, torch.randn_like(args[0]))
    if mamba is not None:
        row["bidir speedup fwd"] = row["bidir mamba fwd ms"] / row["bidir ours fwd ms"]
        row["bidir speedup fwd+bwd"] = row["bidir mamba fwd+bwd ms"] / row["bidir ours fwd+bwd ms"]
    return row


def sweep_configs(rows: int, length: int, time_major: bool = False) -> list[ScanConfig]:
    """Launch shapes around default_config for `rows` (batch x channels) and the inputs' layout: the forward's
    channels a program and L segments; the backward's tile (16 channels x 4 steps with the dB/dC
    reduce-scatter, or 8 x 8 with tl.sum) and L segments (H100, 2026-11-26: the best tile depends on how many
    programs fill the GPU's waves)."""
    from dataclasses import replace

    base = default_scan_config(rows, length, time_major)
    few = rows < 8192
    configs = [base]
    fwd_segments = (16, 32, 64) if few else (1, 2)
    configs += [replace(base, block_e_fwd=be, fwd_segments=sg) for be in (8, 16) for sg in fwd_segments
                if (be, sg) != (base.block_e_fwd, base.fwd_segments)]
    for be, steps, scatter in ((16, 4, True), (8, 8, False)):
        for sg in (16, 32, 64) if few else (1, 2, 4):
            cfg = replace(base, block_e_bwd=be, bwd_sub_chunks=base.chunk // steps, bwd_segments=sg,
                          bwd_scatter_sums=scatter)
            if cfg != base:
                configs.append(cfg)
    return configs


def sweep(shapes: list[tuple], time_major: bool = False) -> None:
    """Time launch shapes of ours per shape (fwd, fwd+bwd); print them and each shape's best by fwd+bwd."""
    for name, Bsz, E, L, _ in shapes:
        x = make_inputs(Bsz, E, L)
        if time_major:
            x = as_time_major(x)
        results = []
        for cfg in sweep_configs(Bsz * E, L, time_major):
            fwd, fwd_bwd = time_scan(lambda *a, cfg=cfg: selective_scan_triton(*a, config=cfg), x)
            print(f"sweep {name}: {cfg}: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd:.3f} ms", flush=True)
            results.append((fwd_bwd, cfg))
        best = min(results, key=lambda r: r[0])
        print(f"best {name}: {best[1]} ({best[0]:.3f} ms)", flush=True)
        del x
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="only time several launch configs of ours")
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    parser.add_argument("--time-major", action="store_true", help="our kernel's inputs stored time-major")
    args = parser.parse_args()
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    if args.sweep:
        sweep(shapes, args.time_major)
        return
    mamba = load_mamba_selective_scan()
    print(f"mamba-ssm selective_scan_fn: {'loaded' if mamba else 'not available (set MAMBA_SRC)'}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s")
    rows = []
    for name, Bsz, E, L, _ in shapes:
        x, x_b = make_inputs(Bsz, E, L), make_inputs(Bsz, E, L)
        x_ours = as_time_major(x) if args.time_major else x
        b_fwd, b_fb = min_bytes(Bsz, E, L)
        cfg = scan_config(Bsz * E, L, args.time_major)
        ours = lambda *a, cfg=cfg: selective_scan_triton(*a, config=cfg)
        row = {"shape": name, "B,E,L": f"{Bsz},{E},{L}", "config": str(cfg)}
        row["ours fwd ms"], row["ours fwd+bwd ms"] = time_scan(ours, x_ours)
        row["ours fwd GB/s"] = b_fwd / row["ours fwd ms"] / 1e6
        row["ours fwd % of copy bw"] = 100 * row["ours fwd GB/s"] / copy_gbs
        row["ours fwd+bwd GB/s"] = b_fb / row["ours fwd+bwd ms"] / 1e6
        row["ours peak GiB"] = peak_gib(ours, x_ours)
        kernels = {"ours": ours}
        if mamba is not None:
            kernels["mamba"] = mamba
            row["mamba fwd ms"], row["mamba fwd+bwd ms"] = time_scan(mamba, x)
            row["mamba fwd GB/s"] = b_fwd / row["mamba fwd ms"] / 1e6
            row["mamba peak GiB"] = peak_gib(mamba, x)
            row["speedup fwd"] = row["mamba fwd ms"] / row["ours fwd ms"]
            row["speedup fwd+bwd"] = row["mamba fwd+bwd ms"] / row["ours fwd+bwd ms"]
            diff = compare(ours, mamba, x)
            row["max rel diff vs mamba"] = max(diff.values())
            row["rel diff vs mamba"] = diff
        row.update(bidirectional(mamba, x, x_b, cfg, args.time_major))
        if name == shapes[0][0] and not args.time_major:
            # The PyTorch reference once (it is slow): its time, and each kernel's bf16 error against it in fp32.
            ref = lambda *a: selective_scan_ref(*a)  # noqa: E731
            row["ref fwd ms"], row["ref fwd+bwd ms"] = time_scan(ref, x, eager=True)
            for kernel, err in error_vs_fp32_reference(kernels, x).items():
                row[f"{kernel} max rel err vs fp32 ref"] = err
        rows.append(row)
        print(row, flush=True)
        del x, x_b
        torch.cuda.empty_cache()
    report(rows, copy_gbs, {"our inputs": "time-major" if args.time_major else "(B, E, L)"},
           stem="scan_time_major" if args.time_major else "scan")


def report(rows: list[dict], copy_gbs: float, setup: dict | None = None, stem: str = "scan") -> None:
    """benchmarks/results/<stem>.{json,md} from the rows main() measured."""
    columns = ["shape", "ours fwd ms", "mamba fwd ms", "speedup fwd", "ours fwd+bwd ms", "mamba fwd+bwd ms",
               "speedup fwd+bwd", "bidir ours fwd+bwd ms", "bidir mamba fwd+bwd ms", "bidir speedup fwd",
               "bidir speedup fwd+bwd", "ours fwd GB/s", "ours fwd % of copy bw", "ours peak GiB", "mamba peak GiB",
               "max rel diff vs mamba"]
    notes = ["ms: median device time of CUDA-graph replays (the host's Python and launch overhead not timed).",
             f"Measured copy bandwidth: {copy_gbs:.0f} GB/s (read + write). GB/s counts each input read once and "
             "each output written once (2 B per element).",
             "bidir: both directions of the mixer's scan; ours in one call without flipped copies, mamba-ssm as two "
             "calls with flips of the backward direction's inputs and output."]
    first = rows[0]
    if "ref fwd ms" in first:
        errs = ", ".join(f"{k.split()[0]} {first[k]:.2e}" for k in first if k.endswith("vs fp32 ref"))
        notes.append(f"{first['shape']}: the PyTorch reference scan takes {first['ref fwd ms']:.1f} ms fwd, "
                     f"{first['ref fwd+bwd ms']:.1f} ms fwd+bwd; max relative error of output and gradients vs "
                     f"the fp32 reference on the same bf16 inputs: {errs}.")
    layout = (setup or {}).get("our inputs", "(B, E, L)")
    notes.append(f"Our kernel's inputs: {layout}; mamba-ssm's: (B, E, L).")
    write_results(stem, rows, columns, "Selective scan: Triton (ours) vs mamba-ssm CUDA, bf16, N=16, with z",
                  setup={"copy GB/s": round(copy_gbs, 1), **(setup or {})}, notes=notes)


if __name__ == "__main__":
    main()
