"""Kernel seam: the selective scan, the causal depthwise conv, RMSNorm and the bidirectional mixer core.

One function per op, several backends, chosen by name or by "auto":
  ref     pure PyTorch (models/ops/ref.py): the numerical reference and the CPU path;
  triton  our fused Triton kernels (models/ops/triton_scan.py), imported lazily; CUDA tensors only;
  cuda    mamba-ssm's compiled kernels (models/ops/cuda.py), when their extensions are installed.
"auto" = the fastest usable for the tensors' device: on CUDA, triton (faster than mamba-ssm's kernels at every
measured shape, forward and backward, on the H100 on 2026-11-27: docs/performance.md), else cuda, else ref; on
CPU, ref. Layout is mamba-ssm's:
u/delta/z (B, E, L), A (E, N), B/C (B, N, L) or grouped (B, G, N, L).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from models.ops import cuda as _cuda
from models.ops.ref import DirectionWeights, causal_conv1d_ref, rms_norm_ref, selective_scan_ref

__all__ = [
    "BACKENDS",
    "DirectionWeights",
    "available_backends",
    "bimamba_inner",
    "causal_conv1d",
    "resolve_backend",
    "rms_norm",
    "selective_scan",
]

BACKENDS = ("auto", "ref", "triton", "cuda")


@functools.cache
def _triton() -> tuple[ModuleType | None, str | None]:
    """(module, None) if the Triton backend imports, else (None, why not)."""
    try:
        return importlib.import_module("models.ops.triton_scan"), None
    except ImportError as err:  # module not written yet on this checkout, or triton not installed
        return None, f"models.ops.triton_scan does not import ({err})"


def available_backends() -> list[str]:
    """Backends usable on this machine: "ref" always; "triton"/"cuda" when a GPU and their code are present."""
    names = ["ref"]
    if torch.cuda.is_available() and _triton()[0] is not None:
        names.append("triton")
    if _cuda.unavailable_reason() is None:
        names.append("cuda")
    return names


def resolve_backend(backend: str, x: Tensor) -> str:
    """Turn a backend name (or "auto") into the concrete backend for tensors like `x`; explain refusals."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if not x.is_cuda:
            return "ref"
        if _triton()[0] is not None:
            return "triton"
        return "cuda" if _cuda.unavailable_reason() is None else "ref"
    if backend == "triton":
        module, why = _triton()
        if module is None:
            raise RuntimeError(f"backend='triton' is not usable: {why}; use backend='ref' or 'auto'")
        if not x.is_cuda:
            raise ValueError("backend='triton' needs CUDA tensors; use backend='ref' (or 'auto') on CPU")
    if backend == "cuda":
        why = _cuda.unavailable_reason()
        if why is not None:
            raise RuntimeError(why)
        if not x.is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors; use backend='ref' (or 'auto') on CPU")
    return backend


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """y = C.h + D*u, gated by silu(z), where h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t. Returns (B, E, L)."""
    name = resolve_backend(backend, u)
    if name == "triton":
        return _triton()[0].selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    fn = _cuda.selective_scan if name == "cuda" else selective_scan_ref
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(
    x_BEL: Tensor,
    weight_EW: Tensor,
    bias_E: Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """Depthwise causal conv over L (+ optional SiLU).

    The Triton backend fuses the conv into `bimamba_inner` and has no standalone conv, so "triton" here runs
    PyTorch's conv (ref), and "auto" prefers causal-conv1d's kernel when it is installed.
    """
    name = resolve_backend(backend, x_BEL)
    if name == "cuda" or (backend == "auto" and x_BEL.is_cuda and _cuda.unavailable_reason() is None):
        return _cuda.causal_conv1d(x_BEL, weight_EW, bias_E, activation)
    return causal_conv1d_ref(x_BEL, weight_EW, bias_E, activation)


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = True,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Add -> RMSNorm (mamba-ssm's fused semantics); with prenorm also returns the new residual stream.

    "triton" runs one fused kernel each way (models/ops/triton_norm.py); "cuda" and "ref" run the PyTorch
    reference (mamba-ssm's own fused norm is a Triton kernel too, not part of its CUDA extension).
    """
    if resolve_backend(backend, x) == "triton":
        from models.ops.triton_norm import add_rms_norm_triton  # triton imports: resolve_backend checked

        return add_rms_norm_triton(x, weight, eps, residual, prenorm, residual_in_fp32)
    return rms_norm_ref(x, weight, eps, residual, prenorm, residual_in_fp32)


def _at_least_fp32(t: Tensor) -> Tensor:
    """A, D and the dt bias stay fp32 under autocast (as mamba-ssm keeps them); fp64 stays fp64 for gradcheck."""
    return t if t.dtype == torch.float64 else t.float()


def _mixer_direction(x_BEL: Tensor, z_BEL: Tensor, w: DirectionWeights, backend: str) -> Tensor:
    """One direction of the mixer: conv -> SiLU -> x_proj -> dt_proj -> selective scan, gated by silu(z)."""
    u_BEL = causal_conv1d(x_BEL, w.conv_weight_EW, w.conv_bias_E, "silu", backend)
    N, R = w.A_log_EN.shape[1], w.dt_proj_weight.shape[1]
    # Projections run in the activations' dtype (bf16 under autocast, like mamba-ssm's fused path).
    x_dbl_BLF = F.linear(u_BEL.transpose(1, 2), w.x_proj_weight.to(u_BEL.dtype))
    dt_BLR, B_BLN, C_BLN = x_dbl_BLF.split([R, N, N], dim=-1)
    delta_BEL = F.linear(dt_BLR, w.dt_proj_weight.to(u_BEL.dtype)).transpose(1, 2)  # bias: inside the scan
    return selective_scan(
        u_BEL, delta_BEL, -torch.exp(_at_least_fp32(w.A_log_EN)), B_BLN.transpose(1, 2), C_BLN.transpose(1, 2),
        D=_at_least_fp32(w.D_E), z=z_BEL, delta_bias=_at_least_fp32(w.dt_proj_bias), delta_softplus=True,
        backend=backend,
    )


def bimamba_inner(
    x_BEL: Tensor, z_BEL: Tensor, fwd: DirectionWeights, bwd: DirectionWeights, backend: str = "auto"
) -> Tensor:
    """Everything of the bimamba-v2 mixer between in_proj and out_proj.

    y = out_f + flip(out_b), out_d = scan_d(x_d) * silu(z_d), where the backward direction sees x and z
    reversed along L. A plain sum, no division by 2 (the released VideoMamba). Returns (B, E, L).
    """
    name = resolve_backend(backend, x_BEL)
    if name == "triton":
        return _triton()[0].bimamba_inner_triton(x_BEL, z_BEL, fwd, bwd)
    y_f = _mixer_direction(x_BEL, z_BEL, fwd, name)
    y_b = _mixer_direction(x_BEL.flip(-1), z_BEL.flip(-1), bwd, name)
    return y_f + y_b.flip(-1)
