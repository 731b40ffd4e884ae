"""Cheap elementwise math for the scan and conv kernels: e^x, softplus and sigmoid in the instructions they need.

The scan forward is bound by instruction issue, and per (step, channel) it evaluates softplus(delta) and the
gate's sigmoid; the backward also softplus' derivative. Triton's generic lowering makes these dear on sm_90
(local compile, Triton 3.6):
- `tl.exp(x)` is x * log2(e), then ex2 *without* flush-to-zero, which ptxas guards with a compare and two
  predicated multiplies for denormal results: 4 instructions. `tl.exp2` is one MUFU.EX2 (flushing, as
  mamba-ssm's --use_fast_math build does).
- `1 / x` is a division with range fix-ups around MUFU.RCP: ~5 instructions; rcp.approx is one (1 ulp).
- `tl.log` is libdevice's accurate logf: ~22 instructions. Softplus is log1p(e^x), so we take log1p's series
  where e^x is small and the hardware's lg2 (one MUFU.LG2) where it is not. 1 + e^x >= 1.125 there, so
  lg2's absolute error (2^-22) is < 1.5e-6 relative; the series' cut-off error is < 6e-7 relative. Over
  x in [-30, 30] softplus, its slope and sigmoid are within 1.7e-6 relative of float64 on an H100 (the
  largest near -30, from ex2.approx; tests/gpu/test_triton_scan.py::test_fast_math_matches_torch).

The hardware lg2 and rcp (and `upcast`'s cvt) are inline PTX, so they are only emitted on NVIDIA GPUs; Triton's
CPU interpreter (the CPU tests) and ROCm use the plain operations.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Below this e^x, log1p(e^x) comes from its series (6 terms), above it from lg2(1 + e^x).
SERIES_BELOW: tl.constexpr = tl.constexpr(0.125)
# mamba-ssm's threshold: softplus(x) = x above 20 (e^x would add nothing representable).
SOFTPLUS_LINEAR_ABOVE: tl.constexpr = tl.constexpr(20.0)
_PTX: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None)


@triton.jit
def exp(x):
    """e^x as one MUFU.EX2 (results below 2^-126 flush to 0)."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _ptx(instruction: tl.constexpr, constraints: tl.constexpr, x):
    """One PTX instruction on each element of x, an fp32 result."""
    return tl.inline_asm_elementwise(instruction, constraints, [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _log2(x):
    if _PTX:
        return _ptx("lg2.approx.ftz.f32 $0, $1;", "=f,f", x)
    else:
        return tl.log2(x)


@triton.jit
def softplus_and_exp(x):
    """softplus(x) = log(1 + e^x) (x itself above 20) and e^x (capped at e^20), which the backward reuses for
    softplus' derivative, sigmoid(x) = e^x / (1 + e^x)."""
    e = exp(tl.minimum(x, SOFTPLUS_LINEAR_ABOVE))
    series = e * (1.0 + e * (-0.5 + e * (1.0 / 3.0 + e * (-0.25 + e * (0.2 - e * (1.0 / 6.0))))))
    logged = _log2(1.0 + e) * LN2
    log1p = tl.where(e < SERIES_BELOW, series, logged)
    return tl.where(x <= SOFTPLUS_LINEAR_ABOVE, log1p, x), e


@triton.jit
def reciprocal(x):
    if _PTX:
        return _ptx("rcp.approx.ftz.f32 $0, $1;", "=f,f", x)
    else:
        return 1.0 / x


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) as two MUFU ops (ex2, rcp) and two FP32 ones: tl.sigmoid's exp fix-up and division
    take ~12 (the conv backward evaluates 8 sigmoids an element)."""
    return reciprocal(1.0 + exp(-x))


@triton.jit
def upcast(x):
    """x in fp32. From bf16/fp16 as inline PTX on the GPU: Triton moves a plain upcast after any layout
    conversion that follows it, so each lane then converts the 16-bit values it gathered (a tile of B
    broadcast over 16 channels: 64 values a lane a tile, 1.5 instructions each); an opaque upcast keeps the
    conversion before, and the shared-memory exchange carries fp32."""
    if _PTX and x.dtype == tl.bfloat16:
        return _ptx("cvt.f32.bf16 $0, $1;", "=r,h", x)
    elif _PTX and x.dtype == tl.float16:
        return _ptx("cvt.f32.f16 $0, $1;", "=r,h", x)
    else:
        return x.to(tl.float32)
