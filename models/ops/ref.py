"""Pure-PyTorch reference backend of the kernel seam: the numerical reference, and the CPU path.

Legend: B batch, E channels (d_inner), L sequence length, N state size, G groups of B/C, W conv width,
T steps per chunk, K chunks per segment.

The selective scan runs in fp32 (fp64 if given fp64) and is organised so that autograd stays cheap:
  * L is cut into segments (bounded memory without grad) and each segment into K chunks of T steps;
  * a short loop over T advances all K chunks at once from a zero state (the intra-chunk scan);
  * a loop over K carries the true state across chunk borders; the carried state reaches step t of its
    chunk through exp(cumulative log-decay), which is <= 1, so nothing can overflow.
That is T + K Python steps per segment instead of L, and per-step tensors come from `unbind`
(whose backward is one `stack`), not from indexing a big tensor (whose backward allocates a full-size
gradient per step: that is why mamba-ssm's selective_scan_ref takes 45 s backward at L=1568).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Steps per segment: bounds the (B, E, L, N) state tensors materialised at once when there is no grad.
SEGMENT_LEN = 4096


class DirectionWeights(NamedTuple):
    """Parameters of one direction of the bidirectional mixer (mamba-ssm / VideoMamba layout)."""

    conv_weight_EW: Tensor  # depthwise causal conv kernel, (E, W)
    conv_bias_E: Tensor | None
    x_proj_weight: Tensor  # (R + 2N, E): u -> [dt_raw, B, C]
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,), added inside the scan before softplus
    A_log_EN: Tensor  # A = -exp(A_log)
    D_E: Tensor  # skip connection


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expand_groups(BC: Tensor, E: int) -> Tensor:
    """(B, N, L) -> (B, 1, N, L); grouped (B, G, N, L) -> (B, E, N, L), each group serving E/G channels."""
    if BC.dim() == 3:
        return BC.unsqueeze(1)
    if BC.dim() == 4:
        G = BC.shape[1]
        if E % G:
            raise ValueError(f"grouped B/C have {G} groups, which does not divide the {E} channels of u")
        return BC.repeat_interleave(E // G, dim=1)
    raise ValueError(f"B and C must be (batch, N, L) or (batch, groups, N, L); got shape {tuple(BC.shape)}")


def _scan_segment(delta_BEL: Tensor, u_BEL: Tensor, A_EN: Tensor, B_BeNL: Tensor, C_BeNL: Tensor,
                  h_BEN: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, from state h; returns (y_BEL, h_last).

    Work tensors are laid out (T, B, E, K, N) so that each step of the intra-chunk loop is a contiguous slice.
    """
    Bsz, E, L = delta_BEL.shape
    K = math.ceil(L / chunk)
    pad = K * chunk - L
    if pad:  # padded steps have delta 0: decay 1 and input 0, the state passes through unchanged
        delta_BEL, u_BEL, B_BeNL, C_BeNL = (F.pad(t, (0, pad)) for t in (delta_BEL, u_BEL, B_BeNL, C_BeNL))

    def steps_first(t: Tensor) -> Tensor:  # (B, E|e, [N,] K*T) -> (T, B, E|e, K, N|1)
        t = t if t.dim() == 4 else t.unsqueeze(2)
        return t.unflatten(3, (K, chunk)).permute(4, 0, 1, 3, 2)

    delta_T = steps_first(delta_BEL)
    dA_log = delta_T * A_EN[:, None, :]
    dBu = delta_T * steps_first(u_BEL) * steps_first(B_BeNL)

    # Intra-chunk scan of all K chunks together, each from a zero state.
    h_local = torch.zeros_like(dBu[0])
    local_states = []
    for dA_t, dBu_t in zip(dA_log.exp().unbind(0), dBu.unbind(0), strict=True):
        h_local = dA_t * h_local + dBu_t
        local_states.append(h_local)

    # Carry the true state across chunks: state at a chunk start = decayed previous start + local final.
    decay = dA_log.cumsum(dim=0).exp()
    starts = []
    for decay_c, final_c in zip(decay[-1].unbind(2), local_states[-1].unbind(2), strict=True):
        starts.append(h_BEN)
        h_BEN = decay_c * h_BEN + final_c
    start_BEKN = torch.stack(starts, dim=2)

    h_TBEKN = torch.stack(local_states) + decay * start_BEKN
    y_TBEK = (h_TBEKN * steps_first(C_BeNL)).sum(-1)
    return y_TBEK.permute(1, 2, 3, 0).reshape(Bsz, E, K * chunk)[:, :, :L], h_BEN


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = 64,
) -> Tensor:
    """Selective scan with mamba-ssm's semantics and layout; returns y (B, E, L) in u's dtype.

    u, delta, z: (B, E, L); A: (E, N) real; B, C: (B, N, L) or grouped (B, G, N, L); D, delta_bias: (E,).
    """
    if A.dim() != 2 or A.is_complex():
        raise ValueError(f"A must be a real (E, N) tensor; got shape {tuple(A.shape)}, dtype {A.dtype}")
    if u.shape != delta.shape or u.dim() != 3:
        raise ValueError(f"u and delta must both be (B, E, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    dtype_in, cd = u.dtype, _compute_dtype(u)
    Bsz, E, L = u.shape
    u, delta = u.to(cd), delta.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(cd)
    # Cast before expanding groups: the expansion's backward sums the E/G channels' gradients, which must happen
    # in cd and be rounded to a bf16 B/C once, not channel by channel.
    B_BeNL = _expand_groups(B.to(cd), E)
    C_BeNL = _expand_groups(C.to(cd), E)

    h_BEN = u.new_zeros(Bsz, E, A.shape[1])
    ys = []
    for s in range(0, L, SEGMENT_LEN):
        e = min(s + SEGMENT_LEN, L)
        y_seg, h_BEN = _scan_segment(delta[:, :, s:e], u[:, :, s:e], A, B_BeNL[..., s:e], C_BeNL[..., s:e],
                                     h_BEN, chunk)
        ys.append(y_seg)
    y = torch.cat(ys, dim=2)

    if D is not None:
        y = y + u * D.to(cd)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(dtype_in)


def causal_conv1d_ref(
    x_BEL: Tensor, weight_EW: Tensor, bias_E: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Depthwise causal conv: out_t depends on x_{t-W+1..t} (zero left padding); optional SiLU."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu'; got {activation!r}")
    E, W = weight_EW.shape
    out = F.conv1d(x_BEL, weight_EW.unsqueeze(1).to(x_BEL.dtype),
                   None if bias_E is None else bias_E.to(x_BEL.dtype), padding=W - 1, groups=E)
    out = out[..., : x_BEL.shape[-1]]
    return out if activation is None else F.silu(out)


def rms_norm_ref(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """(Add ->) RMSNorm with mamba-ssm's fused semantics.

    residual_out = x + residual (or x); out = residual_out / rms(residual_out) * weight, computed in fp32 (fp64
    for fp64 input) and returned in x's dtype. With prenorm, also returns residual_out (fp32 if residual_in_fp32).
    """
    dtype_in, cd = x.dtype, _compute_dtype(x)
    summed = x.to(cd) if residual is None else x.to(cd) + residual.to(cd)
    out = (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cd)).to(dtype_in)
    if not prenorm:
        return out
    return out, (summed if residual_in_fp32 else summed.to(dtype_in))
