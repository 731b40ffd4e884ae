"""Triton depthwise conv1d + SiLU for both directions of the bimamba mixer in one pass over x.

Legend: B batch, E channels, L sequence length, W conv width (4).

The forward direction is causal: u_f[t] = silu(b_f + sum_k w_f[k] x[t - (W-1) + k]). The backward direction
is the same causal conv applied to x reversed along L; expressed in the original positions it is
anti-causal: u_b[t] = silu(b_b + sum_k w_b[k] x[t + (W-1) - k]). Both are computed from one read of x and
no flipped copy is made. The backward pass recomputes the pre-activations instead of saving them, and is one
kernel (`_conv_bi_bwd_kernel`), streaming along L, that writes only dx and per-program weight and bias gradient
sums; widths up to 4 (as causal-conv1d's CUDA kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.ops import triton_math as fm

# The forward: (E, L) tiles of 128 channels x 32 steps (a 256-byte time-major row a step): 1.4-1.5x faster than
# 16 x 128 tiles at every mixer shape (S 8f b16 0.087 -> 0.062 ms; H100, 2026-11-27).
_BLOCK_E = 128
_BLOCK_L = 32
# The backward: 128 channels a program on two warps, a step's row of them at a time, 4 steps unrolled an
# iteration, L split until ~4096 programs; 4 taps. Within 0.5% of the best of 21 launches at every mixer shape
# (32-128 channels, 1-2 warps, 4-16 steps, 2048-16384 programs; H100, 2026-11-27).
_BWD_BLOCK_E, _BWD_UNROLL, _BWD_WARPS, _BWD_PROGRAMS, _BWD_TAPS = 128, 4, 2, 4096, 4


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
        acc_f += tl.load(wf_ptr + e * W + k, mask=e_ok, other=0.0).to(tl.float32)[:, None] * xf
        acc_b += tl.load(wb_ptr + e * W + k, mask=e_ok, other=0.0).to(tl.float32)[:, None] * xb
    ok = e_ok[:, None] & (t < L)[None, :]
    offs = row + t[None, :] * s_l
    tl.store(uf_ptr + offs, (acc_f * fm.sigmoid(acc_f)).to(uf_ptr.dtype.element_ty), mask=ok)
    tl.store(ub_ptr + offs, (acc_b * fm.sigmoid(acc_b)).to(ub_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_at(ptr, row, e_ok, i, L, s_l):
    """Step i of a program's channels (row: their (E,) offsets) as fp32, 0 outside [0, L) (the convs' zero
    padding, and no gradient flows from steps past L)."""
    return tl.load(ptr + row + i * s_l, mask=e_ok & (i >= 0) & (i < L), other=0.0).to(tl.float32)


@triton.jit
def _taps(w_ptr, e, e_ok):
    """A 4-tap (E, 4) weight's columns as fp32 (E,) vectors."""
    w = w_ptr + e * 4
    return (tl.load(w, mask=e_ok, other=0.0).to(tl.float32), tl.load(w + 1, mask=e_ok, other=0.0).to(tl.float32),
            tl.load(w + 2, mask=e_ok, other=0.0).to(tl.float32), tl.load(w + 3, mask=e_ok, other=0.0).to(tl.float32))


@triton.jit
def _silu_grad(pre):
    """d silu / d pre."""
    s = fm.sigmoid(pre)
    return s * (1.0 + pre * (1.0 - s))


@triton.jit
def _conv_bi_bwd_kernel(
    x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, duf_ptr, dub_ptr, dx_ptr, part_ptr,
    E, L, seg_len, s_xb, s_xe, s_xl, s_b, s_e, s_l,
    HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, U: tl.constexpr,
):
    """The whole conv backward in one streaming pass, 4 taps (narrower convs come zero-padded at the oldest taps).

    Program (e block, batch, segment) walks steps i = s0 .. s1 + 2 of its segment [s0, s1), U steps an iteration,
    keeping sliding windows in registers: x[i-3..i], the forward direction's pre-activation gradients
    dc_f[i-3..i] and the backward direction's dc_b[i-6..i-3]. Step i computes dc_f[i] and dc_b[i-3] (both read
    x[i-3..i]), once each, and then dx[i-3] = sum_j wf[3-j] dc_f[i-3+j] + wb[3-j] dc_b[i-3-j]. (A tiled kernel
    recomputed each dc at the 4 steps that need it: 16 exponentials an element instead of 4.) The weight and
    bias gradients, sums over the segment's steps of dc times x, are accumulated per channel and stored once:
    part[(batch, segment), direction, tap or bias (4), e]. The 3 steps either side of a segment are computed
    by both neighbours (for dx), and counted in the sums by the one that owns them."""
    pid_e, pid_b, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    b64 = pid_b.to(tl.int64)
    x_row = b64 * s_xb + e * s_xe
    row = b64 * s_b + e * s_e  # du_f, du_b and dx
    wf0, wf1, wf2, wf3 = _taps(wf_ptr, e, e_ok)
    wb0, wb1, wb2, wb3 = _taps(wb_ptr, e, e_ok)
    if HAS_BIAS:
        bf = tl.load(bf_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        bb = tl.load(bb_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    else:
        bf = tl.zeros((BLOCK_E,), tl.float32)
        bb = tl.zeros((BLOCK_E,), tl.float32)
    s0 = pid_s * seg_len
    s1 = tl.minimum(s0 + seg_len, L)
    x3 = _row_at(x_ptr, x_row, e_ok, s0 - 3, L, s_xl)  # x[i-3], x[i-2], x[i-1] at i = s0
    x2 = _row_at(x_ptr, x_row, e_ok, s0 - 2, L, s_xl)
    x1 = _row_at(x_ptr, x_row, e_ok, s0 - 1, L, s_xl)
    zero = tl.zeros((BLOCK_E,), tl.float32)
    f3, f2, f1 = zero, zero, zero  # dc_f[i-3], dc_f[i-2], dc_f[i-1] (read only once i >= s0 + 3)
    b4, b5, b6 = zero, zero, zero  # dc_b[i-4], dc_b[i-5], dc_b[i-6]
    gf0, gf1, gf2, gf3, gfb = zero, zero, zero, zero, zero  # d wf[k], d bf
    gb0, gb1, gb2, gb3, gbb = zero, zero, zero, zero, zero
    for i0 in range(s0, s1 + 3, U):
        for k in tl.static_range(U):
            i = i0 + k
            x0 = _row_at(x_ptr, x_row, e_ok, i, L, s_xl)
            dcf = _row_at(duf_ptr, row, e_ok, i, L, s_l) * _silu_grad(bf + wf0 * x3 + wf1 * x2 + wf2 * x1 + wf3 * x0)
            dcb = _row_at(dub_ptr, row, e_ok, i - 3, L, s_l) * _silu_grad(bb + wb0 * x0 + wb1 * x1 + wb2 * x2
                                                                         + wb3 * x3)
            cf = tl.where(i < s1, dcf, 0.0)  # dc_f[i] and dc_b[i-3] in this segment's sums
            cb = tl.where((i - 3 >= s0) & (i - 3 < s1), dcb, 0.0)
            gf0 += cf * x3
            gf1 += cf * x2
            gf2 += cf * x1
            gf3 += cf * x0
            gfb += cf
            gb0 += cb * x0
            gb1 += cb * x1
            gb2 += cb * x2
            gb3 += cb * x3
            gbb += cb
            dx = wf3 * f3 + wf2 * f2 + wf1 * f1 + wf0 * dcf + wb3 * dcb + wb2 * b4 + wb1 * b5 + wb0 * b6
            t = i - 3
            tl.store(dx_ptr + row + t * s_l, dx.to(dx_ptr.dtype.element_ty), mask=e_ok & (t >= s0) & (t < s1))
            x3, x2, x1 = x2, x1, x0
            f3, f2, f1 = f2, f1, dcf
            b6, b5, b4 = b5, b4, dcb
    part = part_ptr + (b64 * tl.num_programs(2) + pid_s) * 10 * E + e
    tl.store(part, gf0, mask=e_ok)
    tl.store(part + E, gf1, mask=e_ok)
    tl.store(part + 2 * E, gf2, mask=e_ok)
    tl.store(part + 3 * E, gf3, mask=e_ok)
    tl.store(part + 4 * E, gfb, mask=e_ok)
    tl.store(part + 5 * E, gb0, mask=e_ok)
    tl.store(part + 6 * E, gb1, mask=e_ok)
    tl.store(part + 7 * E, gb2, mask=e_ok)
    tl.store(part + 8 * E, gb3, mask=e_ok)
    tl.store(part + 9 * E, gbb, mask=e_ok)


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
        # Weights and biases as stored (the kernels read them into fp32): no per-call casts.
        wf, wb = wf_EW.contiguous(), wb_EW.contiguous()
        has_bias = bf_E is not None
        bf = bf_E.contiguous() if has_bias else wf  # placeholder pointer, never read
        bb = bb_E.contiguous() if has_bias else wb
        uf, ub = empty_like_layout(x_BEL), empty_like_layout(x_BEL)
        E, L = x_BEL.shape[1:]
        _conv_bi_fwd_kernel[_grid(x_BEL)](
            x_BEL, wf, bf, wb, bb, uf, ub, E, L, *x_BEL.stride(), *uf.stride(),
            HAS_BIAS=has_bias, W=wf.shape[1], BLOCK_E=_BLOCK_E, BLOCK_L=_BLOCK_L,
        )
        ctx.save_for_backward(x_BEL, wf, bf, wb, bb)
        ctx.has_bias = has_bias
        return uf, ub

    @staticmethod
    def backward(ctx, duf, dub):
        x_BEL, wf, bf, wb, bb = ctx.saved_tensors
        Bsz, E, L = x_BEL.shape
        W = wf.shape[1]
        dx = empty_like_layout(x_BEL)
        # The incoming gradients in dx's layout (the kernel takes one set of strides for the three).
        duf = torch.zeros_like(dx) if duf is None else _in_layout(duf, dx)
        dub = torch.zeros_like(dx) if dub is None else _in_layout(dub, dx)
        # Narrower convs as 4-tap ones whose oldest taps are 0 (their gradients are dropped below).
        wf4, wb4 = (w if W == _BWD_TAPS else torch.nn.functional.pad(w, (_BWD_TAPS - W, 0)) for w in (wf, wb))
        e_blocks, steps = triton.cdiv(E, _BWD_BLOCK_E), triton.cdiv(L, _BWD_UNROLL)
        seg_len = _BWD_UNROLL * triton.cdiv(steps, min(steps, triton.cdiv(_BWD_PROGRAMS, e_blocks * Bsz)))
        n_seg = triton.cdiv(L, seg_len)
        part = torch.empty(Bsz * n_seg, 2, _BWD_TAPS + 1, E, device=x_BEL.device, dtype=torch.float32)
        _conv_bi_bwd_kernel[(e_blocks, Bsz, n_seg)](
            x_BEL, wf4, bf, wb4, bb, duf, dub, dx, part, E, L, seg_len, *x_BEL.stride(), *dx.stride(),
            HAS_BIAS=ctx.has_bias, BLOCK_E=_BWD_BLOCK_E, U=_BWD_UNROLL, num_warps=_BWD_WARPS,
        )
        sums = part.sum(dim=0)  # (direction, taps then bias, E)
        dwf, dwb = (sums[d, _BWD_TAPS - W:_BWD_TAPS].t().contiguous() for d in (0, 1))
        dbf, dbb = sums[0, _BWD_TAPS], sums[1, _BWD_TAPS]
        return (dx, dwf.to(wf.dtype), dbf.to(bf.dtype) if ctx.has_bias else None,
                dwb.to(wb.dtype), dbb.to(bb.dtype) if ctx.has_bias else None)


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
    if not 1 <= wf_EW.shape[1] <= _BWD_TAPS:
        raise ValueError(f"conv width {wf_EW.shape[1]}: the kernels take widths 1 to {_BWD_TAPS} (causal-conv1d's "
                         "CUDA kernel takes 2 to 4); use the 'ref' backend for wider convs")
    return _ConvBiSiluFn.apply(x_BEL, wf_EW, bf_E, wb_EW, bb_E)
