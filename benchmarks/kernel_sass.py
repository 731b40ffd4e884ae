"""The scan and conv kernels' sm_90 machine code, compiled on any machine (no GPU needed): registers, spills and
the instruction mix of each kernel's hottest loop.

The scan kernels are bound by instruction issue, so their instruction count per tile is the number to watch
(docs/kernels.md). Triton compiles for an H100 target without one (GPUTarget("cuda", 90, 32)), and
its wheel ships ptxas and cuobjdump. Integer arguments are compiled as the launches specialize them: the
channel strides of time-major tensors equal 1, other strides and sizes divisible by 16.

    PYTHONPATH=. python benchmarks/kernel_sass.py [--kernels fwd bwd_16x4 ...] [--dump DIR]
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from models.ops import scan_launch, triton_conv, triton_scan

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_SIXTEEN_BIT = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
                "dz_ptr", "x_ptr", "duf_ptr", "dub_ptr", "dx_ptr", "uf_ptr", "ub_ptr"}
_FLAGS = dict(A_IS_LOG=True, REVERSE=False, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, ACCUMULATE=False,
              ATOMIC_ADD=False)
# Time-major channel strides, and B/C's state stride (x_proj's output is (B, L, R + 2N)).
_UNIT_STRIDES = ("s_ue", "s_de", "s_ze", "s_oe", "s_ge", "s_Ge", "s_Bn", "s_Cn", "s_xe", "s_e")


@dataclass(frozen=True)
class Variant:
    kernel: object
    constexprs: dict
    num_warps: int = 1
    maxnreg: int | None = None


def variants() -> dict[str, Variant]:
    """The launches default_config makes for VideoMamba's time-major mixer at d_state 16."""
    fwd = dict(_FLAGS, STORE_STATES=True, SUMMARY=False, SPLIT=False, BLOCK_E=16, BLOCK_N=16, T=8, SAVE_EVERY=8)
    bwd = dict(_FLAGS, SPLIT=False, SM_SLOTS=False, BLOCK_N=16)
    summary = {k: v for k, v in _FLAGS.items() if k in ("REVERSE", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "A_IS_LOG")}
    return {
        "fwd": Variant(triton_scan._scan_fwd_kernel, fwd, maxnreg=scan_launch.FWD_REGISTERS_FEW_PROGRAMS),
        "bwd_16x4": Variant(triton_scan._scan_bwd_kernel, dict(bwd, SCATTER_SUMS=True, BLOCK_E=16, T=4, SUB=16)),
        "bwd_8x8": Variant(triton_scan._scan_bwd_kernel, dict(bwd, SCATTER_SUMS=False, BLOCK_E=8, T=8, SUB=8)),
        "summary": Variant(triton_scan._adjoint_summary_kernel, dict(summary, BLOCK_E=16, BLOCK_N=16, T=4)),
        "conv_bwd": Variant(triton_conv._conv_bi_bwd_kernel,
                            dict(HAS_BIAS=True, BLOCK_E=triton_conv._BWD_BLOCK_E, U=triton_conv._BWD_UNROLL),
                            num_warps=triton_conv._BWD_WARPS),
    }


@dataclass
class Report:
    registers: int
    spill_bytes: int
    instructions: int
    loop_instructions: int
    loop_mix: collections.Counter


def compile_sass(v: Variant, dump: Path | None = None, name: str = "kernel") -> Report:
    params = list(inspect.signature(v.kernel.fn).parameters)
    signature, constexprs, attrs = {}, {}, {}
    unit = {p: 1 for p in _UNIT_STRIDES if p in params}
    for i, p in enumerate(params):
        if p in v.constexprs or p in unit:
            signature[p] = "constexpr"
            constexprs[(i,)] = v.constexprs.get(p, unit.get(p))
            continue
        signature[p] = ("*bf16" if p in _SIXTEEN_BIT else "*fp32") if p.endswith("_ptr") else "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": v.num_warps, **({"maxnreg": v.maxnreg} if v.maxnreg else {})}
    compiled = triton.compile(ASTSource(fn=v.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        ptxas = subprocess.run([str(_BIN / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                               capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ttgir").write_text(compiled.asm["ttgir"])
        (dump / f"{name}.sass").write_text(sass)
    instructions = _instructions(sass)
    loop = _longest_loop(instructions)
    return Report(registers=int(re.search(r"Used (\d+) registers", ptxas).group(1)),
                  spill_bytes=int(re.search(r"(\d+) bytes spill stores", ptxas).group(1)),
                  instructions=len(instructions), loop_instructions=len(loop),
                  loop_mix=collections.Counter(op for _, op, _ in loop))


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each SASS instruction; predicates dropped."""
    pattern = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", re.M)
    return [(int(a, 16), op, rest) for a, op, rest in pattern.findall(sass)]


def _longest_loop(instructions: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the longest backward branch's range: a kernel's main loop body (with any loops and
    branches inside it)."""
    spans = [(int(m.group(1), 16), pc) for pc, op, rest in instructions if op == "BRA"
             if (m := re.search(r"0x([0-9a-f]+)", rest)) and int(m.group(1), 16) < pc]
    if not spans:
        return []
    start, end = max(spans, key=lambda s: s[1] - s[0])
    return [ins for ins in instructions if start <= ins[0] <= end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="*", help=f"subset of {', '.join(variants())}")
    parser.add_argument("--dump", type=Path, help="also write each kernel's TTGIR and SASS here")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed per loop")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_90a")
    for name, v in variants().items():
        if args.kernels and name not in args.kernels:
            continue
        r = compile_sass(v, args.dump, name)
        mix = "  ".join(f"{op}:{n}" for op, n in r.loop_mix.most_common(args.top))
        print(f"{name}: {r.registers} registers, {r.spill_bytes} B spilled, {r.instructions} instructions, "
              f"main loop {r.loop_instructions}\n    {mix}", flush=True)


if __name__ == "__main__":
    main()
