"""mamba-ssm's compiled kernels behind the seam ("cuda" backend), imported lazily and only when usable.

mamba-ssm imports its CUDA extension unguarded at package import (docs/install.md), so nothing here
touches `mamba_ssm` / `causal_conv1d` until a CUDA tensor actually asks for this backend; CPU machines
never import them. A cluster image builds the extensions (infra/), then this backend becomes available.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

_EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")


def unavailable_reason() -> str | None:
    """None if the backend can run here, else a sentence saying why not and what to do."""
    if not torch.cuda.is_available():
        return "the 'cuda' backend needs a CUDA device"
    for ext in _EXTENSIONS:
        if importlib.util.find_spec(ext) is None:
            return (f"the 'cuda' backend needs mamba-ssm's compiled extension {ext!r}, which is not installed; "
                    "build mamba-ssm and causal-conv1d with CUDA (see infra/) or use backend='triton'/'ref'")
    return None


@functools.cache
def _kernels() -> tuple[Callable, Callable]:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn, causal_conv1d_fn


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
) -> Tensor:
    """mamba-ssm's `selective_scan_fn` (same layout as models.ops.selective_scan)."""
    return _kernels()[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(x_BEL: Tensor, weight_EW: Tensor, bias_E: Tensor | None = None,
                  activation: str | None = None) -> Tensor:
    """causal-conv1d's `causal_conv1d_fn`."""
    return _kernels()[1](x_BEL, weight_EW, bias_E, activation=activation)
