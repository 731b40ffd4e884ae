"""Triton depthwise conv1d + SiLU for both directions of the bimamba mixer in one pass over x.

Legend: B batch, E channels, L sequence length, W conv width (4).

The forward direction is causal: u_f[t] = silu(b_f + sum_k w_f[k] x[t - (W-1) + k]). The backward direction
is the same causal conv applied to x reversed along L; expressed in the original positions it is
anti-causal: u_b[t] = silu(b_b + sum_k w_b[k] x[t + (W-1) - k]). Both are computed from one read of x and
no flipped copy is made. The backward pass recomputes the pre-activations instead of saving them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_E = 16
_BLOCK_L = 128


@triton.jit
def _load_shifted(ptr, row, e_ok, tt, L, s_l):
    """x[row, tt] (row: the (E, 1) offsets of a program's channels; tt steps s_l apart) as fp32, 0 where tt
    is outside [0, L). Both bounds matter: lanes past L in the last block would otherwise read the next row,
    or past the tensor's end (garbage that 0 * NaN turns into NaN)."""
    ok = e_ok[:, None] & ((tt >= 0) & (tt < L))[None, :]
    return tl.load(ptr + row + tt[None, :] * s_l, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _conv_bi_fwd_kernel(
    x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, uf_ptr, ub_ptr,
    E, L, s_xb, s_xe, s_xl, s_b, s_e, s_l,
    HAS_BIAS: tl.constexpr, W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """u_f, u_b (strides s_b, s_e, s_l) from x (strides s_x*)."""
    pid_l, pid_e, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    e_ok = e < E
    x_row = pid_b.to(tl.int64) * s_xb + e[:, None] * s_xe
    row = pid_b.to(tl.int64) * s_b + e[:, None] * s_e
    acc_f = tl.zeros((BLOCK_E, BLOCK_L), tl.float32)
    acc_b = tl.zeros((BLOCK_E, BLOCK_L), tl.float32)
    if HAS_BIAS:
        acc_f += tl.load(bf_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
        acc_b += tl.load(bb_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        tf = t - (W - 1) + k
        tb = t + (W - 1) - k
        xf = _load_shifted(x_ptr, x_row, e_ok, tf, L, s_xl)
        xb = _load_shifted(x_ptr, x_row, e_ok, tb, L, s_xl)
        acc_f += tl.load(wf_ptr + e * W + k, mask=e_ok, other=0.0)[:, None] * xf
        acc_b += tl.load(wb_ptr + e * W + k, mask=e_ok, other=0.0)[:, None] * xb
    ok = e_ok[:, None] & (t < L)[None, :]
    offs = row + t[None, :] * s_l
    tl.store(uf_ptr + offs, (acc_f * tl.sigmoid(acc_f)).to(uf_ptr.dtype.element_ty), mask=ok)
    tl.store(ub_ptr + offs, (acc_b * tl.sigmoid(acc_b)).to(ub_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_bi_bwd_pre_kernel(
    x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, duf_ptr, dub_ptr, dcf_ptr, dcb_ptr, part_ptr,
    E, L, s_xb, s_xe, s_xl, s_b, s_e, s_l,
    HAS_BIAS: tl.constexpr, W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients at the conv outputs (through SiLU), and this program's share of the weight and bias
    gradients: part[program, d, k, e] for direction d, tap k < W, bias at k = W (summed by the caller).
    Partial sums, not atomics: every program of a channel block would add into the same few addresses."""
    pid_l, pid_e, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    e_ok = e < E
    ok = e_ok[:, None] & (t < L)[None, :]
    x_row = pid_b.to(tl.int64) * s_xb + e[:, None] * s_xe
    offs = pid_b.to(tl.int64) * s_b + e[:, None] * s_e + t[None, :] * s_l  # du_f, du_b, dc_f, dc_b
    acc_f = tl.zeros((BLOCK_E, BLOCK_L), tl.float32)
    acc_b = tl.zeros((BLOCK_E, BLOCK_L), tl.float32)
    if HAS_BIAS:
        acc_f += tl.load(bf_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
        acc_b += tl.load(bb_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        tf = t - (W - 1) + k
        tb = t + (W - 1) - k
        xf = _load_shifted(x_ptr, x_row, e_ok, tf, L, s_xl)
        xb = _load_shifted(x_ptr, x_row, e_ok, tb, L, s_xl)
        acc_f += tl.load(wf_ptr + e * W + k, mask=e_ok, other=0.0)[:, None] * xf
        acc_b += tl.load(wb_ptr + e * W + k, mask=e_ok, other=0.0)[:, None] * xb
    sf = tl.sigmoid(acc_f)
    sb = tl.sigmoid(acc_b)
    duf = tl.load(duf_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dub = tl.load(dub_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dcf = tl.where(ok, duf * sf * (1.0 + acc_f * (1.0 - sf)), 0.0)
    dcb = tl.where(ok, dub * sb * (1.0 + acc_b * (1.0 - sb)), 0.0)
    tl.store(dcf_ptr + offs, dcf, mask=ok)
    tl.store(dcb_ptr + offs, dcb, mask=ok)
    part_f = part_ptr + (pid_b.to(tl.int64) * tl.num_programs(0) + pid_l) * 2 * (W + 1) * E + e
    part_b = part_f + (W + 1) * E
    tl.store(part_f + W * E, tl.sum(dcf, axis=1), mask=e_ok)
    tl.store(part_b + W * E, tl.sum(dcb, axis=1), mask=e_ok)
    for k in tl.static_range(W):
        tf = t - (W - 1) + k
        tb = t + (W - 1) - k
        xf = _load_shifted(x_ptr, x_row, e_ok, tf, L, s_xl)
        xb = _load_shifted(x_ptr, x_row, e_ok, tb, L, s_xl)
        tl.store(part_f + k * E, tl.sum(dcf * xf, axis=1), mask=e_ok)
        tl.store(part_b + k * E, tl.sum(dcb * xb, axis=1), mask=e_ok)


@triton.jit
def _conv_bi_bwd_dx_kernel(
    dcf_ptr, dcb_ptr, wf_ptr, wb_ptr, dx_ptr,
    E, L, s_b, s_e, s_l,
    W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dx[t] = sum_k w_f[k] dc_f[t + (W-1) - k] + w_b[k] dc_b[t - (W-1) + k] (transposed convs); dc_f, dc_b
    and dx share strides."""
    pid_l, pid_e, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    e_ok = e < E
    row = pid_b.to(tl.int64) * s_b + e[:, None] * s_e
    acc = tl.zeros((BLOCK_E, BLOCK_L), tl.float32)
    for k in tl.static_range(W):
        tf = t + (W - 1) - k
        tb = t - (W - 1) + k
        dcf = _load_shifted(dcf_ptr, row, e_ok, tf, L, s_l)
        dcb = _load_shifted(dcb_ptr, row, e_ok, tb, L, s_l)
        acc += tl.load(wf_ptr + e * W + k, mask=e_ok, other=0.0)[:, None] * dcf
        acc += tl.load(wb_ptr + e * W + k, mask=e_ok, other=0.0)[:, None] * dcb
    ok = e_ok[:, None] & (t < L)[None, :]
    tl.store(dx_ptr + row + t[None, :] * s_l, acc.to(dx_ptr.dtype.element_ty), mask=ok)


def _grid(x_BEL: Tensor) -> tuple[int, int, int]:
    Bsz, E, L = x_BEL.shape
    return triton.cdiv(L, _BLOCK_L), triton.cdiv(E, _BLOCK_E), Bsz


def is_time_major(x_BEL: Tensor) -> bool:
    """Whether (B, E, L) x has its channels contiguous: time-major, like a view of in_proj's (B, L, 2E)."""
    return x_BEL.stride(1) == 1 and x_BEL.shape[1] > 1


def empty_like_layout(x_BEL: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty dense (B, E, L) tensor stored as x is: (B, L, E) storage when x is time-major, else (B, E, L).
    The mixer's kernels take any strides; keeping one layout end to end avoids transposed copies."""
    Bsz, E, L = x_BEL.shape
    dtype = dtype or x_BEL.dtype
    if is_time_major(x_BEL):
        return torch.empty(Bsz, L, E, device=x_BEL.device, dtype=dtype).transpose(1, 2)
    return torch.empty(Bsz, E, L, device=x_BEL.device, dtype=dtype)


def _in_layout(t: Tensor, like: Tensor) -> Tensor:
    """t with like's strides (a copy only when they differ)."""
    if t.stride() == like.stride():
        return t
    out = torch.empty_strided(like.shape, like.stride(), device=t.device, dtype=t.dtype)
    return out.copy_(t)


class _ConvBiSiluFn(torch.autograd.Function):
    """x may be any strided (B, E, L) view, e.g. time-major channels of in_proj's output; the outputs, and the
    backward's buffers, are dense in x's layout (time-major or not), so no transposed copy is made."""

    @staticmethod
    def forward(ctx, x_BEL, wf_EW, bf_E, wb_EW, bb_E):
        wf32, wb32 = wf_EW.float().contiguous(), wb_EW.float().contiguous()
        has_bias = bf_E is not None
        bf32 = bf_E.float().contiguous() if has_bias else wf32  # placeholder pointer, never read
        bb32 = bb_E.float().contiguous() if has_bias else wb32
        uf, ub = empty_like_layout(x_BEL), empty_like_layout(x_BEL)
        E, L = x_BEL.shape[1:]
        _conv_bi_fwd_kernel[_grid(x_BEL)](
            x_BEL, wf32, bf32, wb32, bb32, uf, ub, E, L, *x_BEL.stride(), *uf.stride(),
            HAS_BIAS=has_bias, W=wf32.shape[1], BLOCK_E=_BLOCK_E, BLOCK_L=_BLOCK_L,
        )
        ctx.save_for_backward(x_BEL, wf32, bf32, wb32, bb32)
        ctx.has_bias = has_bias
        ctx.dtypes = (wf_EW.dtype, None if bf_E is None else bf_E.dtype, wb_EW.dtype,
                      None if bb_E is None else bb_E.dtype)
        return uf, ub

    @staticmethod
    def backward(ctx, duf, dub):
        x_BEL, wf32, bf32, wb32, bb32 = ctx.saved_tensors
        E, L = x_BEL.shape[1:]
        W = wf32.shape[1]
        dcf = empty_like_layout(x_BEL, torch.float32)
        dcb = empty_like_layout(x_BEL, torch.float32)
        duf = torch.zeros_like(dcf) if duf is None else _in_layout(duf, dcf)
        dub = torch.zeros_like(dcf) if dub is None else _in_layout(dub, dcf)
        grid = _grid(x_BEL)
        part = torch.empty(grid[2], grid[0], 2, W + 1, E, device=x_BEL.device, dtype=torch.float32)
        _conv_bi_bwd_pre_kernel[grid](
            x_BEL, wf32, bf32, wb32, bb32, duf, dub, dcf, dcb, part, E, L, *x_BEL.stride(), *dcf.stride(),
            HAS_BIAS=ctx.has_bias, W=W, BLOCK_E=_BLOCK_E, BLOCK_L=_BLOCK_L,
        )
        sums = part.sum(dim=(0, 1))  # (2, W + 1, E)
        dwf, dwb = sums[0, :W].t().contiguous(), sums[1, :W].t().contiguous()
        dbf, dbb = sums[0, W], sums[1, W]
        dx = empty_like_layout(x_BEL)
        _conv_bi_bwd_dx_kernel[grid](dcf, dcb, wf32, wb32, dx, E, L, *dx.stride(), W=W, BLOCK_E=_BLOCK_E,
                                     BLOCK_L=_BLOCK_L)
        twf, tbf, twb, tbb = ctx.dtypes
        return (dx, dwf.to(twf), dbf.to(tbf) if ctx.has_bias else None,
                dwb.to(twb), dbb.to(tbb) if ctx.has_bias else None)


def conv1d_silu_bidirectional(
    x_BEL: Tensor, wf_EW: Tensor, bf_E: Tensor | None, wb_EW: Tensor, bb_E: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(silu(causal_conv(x; w_f, b_f)), flip(silu(causal_conv(flip(x); w_b, b_b)))), each (B, E, L), stored
    time-major ((B, L, E) storage) when x's channels are contiguous, else (B, E, L). x may be any strided view.

    Biases are both given or both None. Differentiable w.r.t. x, weights and biases.
    """
    if x_BEL.dim() != 3:
        raise ValueError(f"x must be (B, E, L); got shape {tuple(x_BEL.shape)}")
    E = x_BEL.shape[1]
    for name, w in (("forward", wf_EW), ("backward", wb_EW)):
        if w.dim() != 2 or w.shape[0] != E:
            raise ValueError(f"{name} conv weight must be (E={E}, W); got shape {tuple(w.shape)}")
    if wf_EW.shape != wb_EW.shape:
        raise ValueError(f"both directions need the same conv width; got {tuple(wf_EW.shape)} "
                         f"and {tuple(wb_EW.shape)}")
    if (bf_E is None) != (bb_E is None):
        raise ValueError("give a conv bias for both directions or for neither")
    return _ConvBiSiluFn.apply(x_BEL, wf_EW, bf_E, wb_EW, bb_E)
