"""Triton depthwise conv1d + SiLU for both directions of the bimamba mixer in one pass over x.

Legend: B batch, E channels, L sequence length, W conv width (4).

The forward direction is causal: u_f[t] = silu(b_f + sum_k w_f[k] x[t - (W-1) + k]). The backward direction
is the same causal conv applied to x reversed along L; expressed in the original positions it is
anti-causal: u_b[t] = silu(b_b + sum_k w_b[k] x[t + (W-1) - k]). Both are computed from one read of x and
no flipped copy is made. The backward pass recomputes the pre-activations instead of saving them, and is one
kernel (`_conv_bi_bwd_kernel`) that writes only dx and per-program weight and bias gradient sums; widths up to
4 (as causal-conv1d's CUDA kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.ops import triton_math as fm

_BLOCK_E = 16
_BLOCK_L = 128
# The backward: (T, E) tiles of 16 steps x 16 channels on two warps, L split until ~4096 programs; 4 taps. On
# one warp the 10 accumulators and 7 x tiles spill (708 bytes a thread at sm_90): mixer fwd+bwd 3-4% slower
# (sweep_round7.txt run 10; 8 steps on one warp, or 4 warps, are as fast as two).
_BWD_BLOCK_E, _BWD_STEPS, _BWD_WARPS, _BWD_PROGRAMS, _BWD_TAPS = 16, 16, 2, 4096, 4


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
def _x_at(x_ptr, x_row, e_ok, p, L, s_l):
    """x at steps p (T,) of a program's channels (x_row: their (1, E) offsets) as a (T, E) fp32 tile, 0 outside
    [0, L) (the convs' zero padding)."""
    ok = ((p >= 0) & (p < L))[:, None] & e_ok[None, :]
    return tl.load(x_ptr + x_row + p[:, None] * s_l, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _taps(w_ptr, e, e_ok):
    """A 4-tap (E, 4) weight's columns as fp32 (E,) vectors."""
    w = w_ptr + e * 4
    return (tl.load(w, mask=e_ok, other=0.0).to(tl.float32), tl.load(w + 1, mask=e_ok, other=0.0).to(tl.float32),
            tl.load(w + 2, mask=e_ok, other=0.0).to(tl.float32), tl.load(w + 3, mask=e_ok, other=0.0).to(tl.float32))


@triton.jit
def _conv_out_grad(du_ptr, row, e_ok, p, L, s_l, bias, w0, w1, w2, w3, x0, x1, x2, x3):
    """Gradient at the pre-activation of one direction's conv at steps p: du[p] silu'(pre[p]), with
    pre = bias + w0 x0 + w1 x1 + w2 x2 + w3 x3 (the four taps' x tiles, oldest first in that direction)."""
    pre = bias[None, :] + w0[None, :] * x0 + w1[None, :] * x1 + w2[None, :] * x2 + w3[None, :] * x3
    s = fm.sigmoid(pre)
    return _x_at(du_ptr, row, e_ok, p, L, s_l) * s * (1.0 + pre * (1.0 - s))


@triton.jit
def _conv_bi_bwd_kernel(
    x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, duf_ptr, dub_ptr, dx_ptr, part_ptr,
    E, L, seg_tiles, s_xb, s_xe, s_xl, s_b, s_e, s_l,
    HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, T: tl.constexpr,
):
    """The whole conv backward in one pass, 4 taps (narrower convs come zero-padded at the oldest taps).

    Program (e block, batch, segment) walks its segment of L in (T, E) tiles. Nothing is stored between
    passes: dx[t] = sum_j wf[3-j] dc_f[t+j] + wb[3-j] dc_b[t-j] needs the output gradients (dc) at 3 steps
    either side, and each dc is pointwise in x and du, so the tile recomputes them from x at t-3..t+3 (7
    tiles, cached loads) instead of writing fp32 dc buffers and reading them back (round 6: 0.48 ms of the
    S 8f mixer step). The weight and bias gradients, sums over L of dc times x, are accumulated elementwise
    over the walk and reduced once at its end: part[(batch, segment), direction, tap or bias (4), e]."""
    pid_e, pid_b, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    b64 = pid_b.to(tl.int64)
    x_row = (b64 * s_xb + e * s_xe)[None, :]
    row = (b64 * s_b + e * s_e)[None, :]  # du_f, du_b and dx
    wf0, wf1, wf2, wf3 = _taps(wf_ptr, e, e_ok)
    wb0, wb1, wb2, wb3 = _taps(wb_ptr, e, e_ok)
    if HAS_BIAS:
        bf = tl.load(bf_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        bb = tl.load(bb_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    else:
        bf = tl.zeros((BLOCK_E,), tl.float32)
        bb = tl.zeros((BLOCK_E,), tl.float32)
    zero = tl.zeros((T, BLOCK_E), tl.float32)
    gf0, gf1, gf2, gf3, gfb = zero, zero, zero, zero, zero  # d wf[k], d bf (before the sum over steps)
    gb0, gb1, gb2, gb3, gbb = zero, zero, zero, zero, zero
    c_end = tl.minimum((pid_s + 1) * seg_tiles, tl.cdiv(L, T))
    for c in range(pid_s * seg_tiles, c_end):
        t = c * T + tl.arange(0, T)
        xm3 = _x_at(x_ptr, x_row, e_ok, t - 3, L, s_xl)
        xm2 = _x_at(x_ptr, x_row, e_ok, t - 2, L, s_xl)
        xm1 = _x_at(x_ptr, x_row, e_ok, t - 1, L, s_xl)
        x0 = _x_at(x_ptr, x_row, e_ok, t, L, s_xl)
        xp1 = _x_at(x_ptr, x_row, e_ok, t + 1, L, s_xl)
        xp2 = _x_at(x_ptr, x_row, e_ok, t + 2, L, s_xl)
        xp3 = _x_at(x_ptr, x_row, e_ok, t + 3, L, s_xl)
        # The forward direction's taps at step p read x[p-3..p]; the backward's x[p+3..p].
        dcf = _conv_out_grad(duf_ptr, row, e_ok, t, L, s_l, bf, wf0, wf1, wf2, wf3, xm3, xm2, xm1, x0)
        dcb = _conv_out_grad(dub_ptr, row, e_ok, t, L, s_l, bb, wb0, wb1, wb2, wb3, xp3, xp2, xp1, x0)
        gf0 += dcf * xm3
        gf1 += dcf * xm2
        gf2 += dcf * xm1
        gf3 += dcf * x0
        gfb += dcf
        gb0 += dcb * xp3
        gb1 += dcb * xp2
        gb2 += dcb * xp1
        gb3 += dcb * x0
        gbb += dcb
        dx = wf3[None, :] * dcf + wb3[None, :] * dcb
        dx += wf2[None, :] * _conv_out_grad(duf_ptr, row, e_ok, t + 1, L, s_l, bf, wf0, wf1, wf2, wf3, xm2, xm1,
                                            x0, xp1)
        dx += wb2[None, :] * _conv_out_grad(dub_ptr, row, e_ok, t - 1, L, s_l, bb, wb0, wb1, wb2, wb3, xp2, xp1,
                                            x0, xm1)
        dx += wf1[None, :] * _conv_out_grad(duf_ptr, row, e_ok, t + 2, L, s_l, bf, wf0, wf1, wf2, wf3, xm1, x0,
                                            xp1, xp2)
        dx += wb1[None, :] * _conv_out_grad(dub_ptr, row, e_ok, t - 2, L, s_l, bb, wb0, wb1, wb2, wb3, xp1, x0,
                                            xm1, xm2)
        dx += wf0[None, :] * _conv_out_grad(duf_ptr, row, e_ok, t + 3, L, s_l, bf, wf0, wf1, wf2, wf3, x0, xp1,
                                            xp2, xp3)
        dx += wb0[None, :] * _conv_out_grad(dub_ptr, row, e_ok, t - 3, L, s_l, bb, wb0, wb1, wb2, wb3, x0, xm1,
                                            xm2, xm3)
        ok = (t < L)[:, None] & e_ok[None, :]
        tl.store(dx_ptr + row + t[:, None] * s_l, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    part = part_ptr + (b64 * tl.num_programs(2) + pid_s) * 10 * E + e
    tl.store(part, tl.sum(gf0, axis=0), mask=e_ok)
    tl.store(part + E, tl.sum(gf1, axis=0), mask=e_ok)
    tl.store(part + 2 * E, tl.sum(gf2, axis=0), mask=e_ok)
    tl.store(part + 3 * E, tl.sum(gf3, axis=0), mask=e_ok)
    tl.store(part + 4 * E, tl.sum(gfb, axis=0), mask=e_ok)
    tl.store(part + 5 * E, tl.sum(gb0, axis=0), mask=e_ok)
    tl.store(part + 6 * E, tl.sum(gb1, axis=0), mask=e_ok)
    tl.store(part + 7 * E, tl.sum(gb2, axis=0), mask=e_ok)
    tl.store(part + 8 * E, tl.sum(gb3, axis=0), mask=e_ok)
    tl.store(part + 9 * E, tl.sum(gbb, axis=0), mask=e_ok)


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
        e_blocks, tiles = triton.cdiv(E, _BWD_BLOCK_E), triton.cdiv(L, _BWD_STEPS)
        seg_tiles = triton.cdiv(tiles, min(tiles, triton.cdiv(_BWD_PROGRAMS, e_blocks * Bsz)))
        n_seg = triton.cdiv(tiles, seg_tiles)
        part = torch.empty(Bsz * n_seg, 2, _BWD_TAPS + 1, E, device=x_BEL.device, dtype=torch.float32)
        _conv_bi_bwd_kernel[(e_blocks, Bsz, n_seg)](
            x_BEL, wf4, bf, wb4, bb, duf, dub, dx, part, E, L, seg_tiles, *x_BEL.stride(), *dx.stride(),
            HAS_BIAS=ctx.has_bias, BLOCK_E=_BWD_BLOCK_E, T=_BWD_STEPS, num_warps=_BWD_WARPS,
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
