"""Triton selective scan (mamba-ssm semantics and shapes) and the fused bidirectional bimamba-v2 core.

Legend: B batch, E channels (d_inner), L sequence length, N state size, G groups of B/C, T steps per tile.

Memory layout. The kernels take strides, so (B, E, L) tensors may be stored L-contiguous (mamba-ssm's layout) or
time-major, channels contiguous ((B, L, E) storage: what in_proj and x_proj produce, and what the mixer keeps
end to end). Outputs and du/ddelta/dz follow u's layout; `default_config` (models/ops/scan_launch.py) picks
launch shapes per layout.

Scan: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = C_t . h_t + D u_t,  out_t = y_t * silu(z_t).

Kernel layout. One program owns BLOCK_E channels of one batch row and walks L (or one segment of it) in
tiles of T steps. Tiles are time-major, (T, N, E): Triton's default layout spreads the trailing axes (E,
then N) over lanes and repeats the leading one in registers, so each thread holds a tile's T steps and the
recurrence inside a tile (forward: a `tl.associative_scan` on affine maps; backward: T unrolled steps) runs
serially in-thread with no shuffles.
The state is carried between tiles in registers, fp32 throughout. Out-of-range steps get delta = 0, i.e.
decay 1 and input 0, so any L works. A direction flag makes the program walk L backwards (t = L-1-s): the
backward scan of the bidirectional mixer reads and writes the original tensors, with no flipped copies.

Backward (chunked recompute, as mamba-ssm does). The forward saves only the state at every `chunk`-th step,
(B, E, L/chunk, N) fp32. The backward walks the saved chunks in reverse: it walks each forward to its sub-tile
start states (kept in a scratch slot: the program's own, or with many programs one of its SM's, taken through a
lock), then per sub-tile in reverse recomputes the states and solves the adjoint recurrence r_t = C_t g_t +
a_{t+1} r_{t+1} (a_t = exp(delta_t A)) in-thread, last step first, carrying the decayed adjoint a_t r_t between
tiles in registers: no shifted delta is needed. With a_t h_{t-1} = h_t - delta_t B_t u_t no shifted state is
needed either. Gradients for B and C are sums over channels (an all-reduce across lanes, or with
`bwd_scatter_sums` a reduce-scatter), so programs add them into fp32 buffers atomically (as mamba-ssm's CUDA
kernel does); dA, dD and d delta_bias are summed in registers over L, then added atomically over the batch.

Few rows (long clips at small batch) give too few programs: then L is split into segments. A summary pass
gives each segment's end state (or decayed start adjoint) from zero and its delta sum, a fold kernel chains
them, and each segment's program starts from the folded value.

Bidirectional: the two directions run as two launches of the same kernels; the second adds its gated
output (and its share of dz) to what the first wrote.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.ops import triton_math as fm
from models.ops.scan_launch import BWD_SCRATCH_BUDGET, ScanConfig, default_config, split_segments
from models.ops.triton_conv import conv1d_silu_bidirectional, empty_like_layout, is_time_major


@triton.jit
def _affine_combine(a_first, b_first, a_second, b_second):
    # Compose x -> a_first x + b_first, then x -> a_second x + b_second.
    return a_first * a_second, a_second * b_first + b_second


@triton.jit
def _reverse_affine_scan(a, b, carry):
    """The adjoint recurrence r_t = b_t + a_{t+1} r_{t+1} over a (T, N, E) tile, last step first, where a_t is
    the tile's own decay exp(delta_t A). What crosses tiles is the decayed adjoint w_t = a_t r_t: carry is
    w after the tile's last step, a (1, N, E) plane (0 at the end of L). Returns r and w at the tile's first
    step (the carry into the previous tile). Carrying w, not r, means the adjoint needs no shifted
    delta_{t+1}: no extra load, softplus or exp2 an element.

    Written as T unrolled steps instead of `tl.associative_scan(..., reverse=True)`: with T in-thread every
    row select folds to a register pick, while Triton 3.6-3.8 lower a reverse scan with ~640 lane shuffles a
    tile (1 warp, 8 x 16 x 8), a quarter of the backward's instructions."""
    row = tl.arange(0, a.shape[0])[:, None, None]
    r = tl.zeros_like(b)
    for k in tl.static_range(a.shape[0]):
        pick = row == (a.shape[0] - 1 - k)
        # -0.0 is the identity of +: the masked sums over the in-thread axis fold to register moves.
        r_row = tl.sum(tl.where(pick, b, -0.0), axis=0, keep_dims=True) + carry
        r = tl.where(pick, r_row, r)
        carry = tl.sum(tl.where(pick, a, -0.0), axis=0, keep_dims=True) * r_row
    return r, carry


@triton.jit
def _channel_sum_scattered(x, e_local):
    """Sums a (T, N, E) tile over its channels E as a reduce-scatter. Returns the sums (R, N, E), R = T / E
    rows (1 when T <= E), column e holding rows `rows` (R, 1, E); and `owner` (1, 1, E), False on the columns
    that repeat another column's rows (T < E). e_local is arange(E).

    With channels on lanes, tl.sum is an all-reduce: log2(E) shuffles and adds for each of a thread's T x N
    values, every lane ending with all of them. Here each level halves the rows a column keeps: it keeps one
    half, sends the other to its partner channel (a lane shuffle, through tl.gather) and adds what it
    receives (8 x 16 x 8 tile on one warp: 28 shuffles a thread instead of 96). The atomics that follow
    then carry no repeated values."""
    T: tl.constexpr = x.shape[0]
    E: tl.constexpr = x.shape[2]
    tl.static_assert(E <= 64, "the reduce-scatter covers channel blocks of up to 64")
    rows = tl.zeros((1, 1, E), tl.int32)
    for k in tl.static_range(6):
        if (1 << k) < E:
            bit = ((e_local >> k) & 1)[None, None, :]
            if x.shape[0] > 1:
                lo, hi = tl.split(tl.permute(tl.reshape(x, (2, x.shape[0] // 2, x.shape[1], E)), (1, 2, 3, 0)))
                send = tl.where(bit == 1, lo, hi)
                rows += bit * lo.shape[0]
                x = tl.where(bit == 1, hi, lo) + tl.gather(
                    send, (e_local ^ (1 << k))[None, None, :] + tl.zeros(send.shape, tl.int32), axis=2)
            else:
                x += tl.gather(x, (e_local ^ (1 << k))[None, None, :] + tl.zeros(x.shape, tl.int32), axis=2)
    rows = rows + tl.arange(0, x.shape[0])[:, None, None]
    # With T < E the last levels were all-reduces: columns e and e + T hold the same rows.
    return x, rows, (e_local < T)[None, None, :]


@triton.jit
def _load_delta(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta as the recurrence uses it (bias, broadcast to offs; softplus), 0 outside `mask`, and d delta /
    d(pre-softplus delta)."""
    return _delta(tl.load(delta_ptr + offs, mask=mask, other=0.0), mask, bias, HAS_BIAS, SOFTPLUS)


@triton.jit
def _delta(loaded, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """_load_delta on an already loaded tile."""
    dt = fm.upcast(loaded)
    if HAS_BIAS:
        dt += bias
    slope = tl.full(dt.shape, 1.0, tl.float32)
    if SOFTPLUS:
        # softplus' derivative is sigmoid = e^x / (1 + e^x), from the e^x softplus took (dead in the forward).
        dt, e = fm.softplus_and_exp(dt)
        slope = e / (1.0 + e)
    return tl.where(mask, dt, 0.0), slope


@triton.jit
def _load_A(A_ptr, n, e, ne_ok, N, A_IS_LOG: tl.constexpr):
    """A as an fp32 (N, E) plane, from A itself or (A_IS_LOG) from A_log, A = -exp(A_log): the mixer passes its
    parameter as stored (bf16 under a bf16 model), sparing the casts and their autograd nodes each call."""
    A = tl.load(A_ptr + n[:, None] + e[None, :] * N, mask=ne_ok, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -fm.exp(A)
    return A


@triton.jit
def _channel_block(A_ptr, bias_ptr, E, N, group_E, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels e and states n with their masks, the (N, E) mask, its B/C group, A as an fp32
    (N, E) plane and delta_bias in fp32 (0 without one)."""
    pid_e = tl.program_id(0)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_ok, n_ok = e < E, n < N
    ne_ok = n_ok[:, None] & e_ok[None, :]
    A = _load_A(A_ptr, n, e, ne_ok, N, A_IS_LOG)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_E,), tl.float32)
    return e, n, e_ok, n_ok, ne_ok, (pid_e * BLOCK_E) // group_E, A, bias


@triton.jit
def _state_loads(s, s_stop, L, u_base, d_base, B_base, e, n, e_ok, n_ok, s_ue, s_ul, s_de, s_dl, s_Bn, s_Bl,
                 REVERSE: tl.constexpr, NEED_STATES: tl.constexpr):
    """Steps s' u, delta and B as stored (what recomputing the states needs), 0 outside [0, s_stop). Without
    NEED_STATES only delta is loaded, and stands in for u and B."""
    s_ok = (s >= 0) & (s < s_stop)
    t = (L - 1 - s) if REVERSE else s
    d = tl.load(d_base + t[:, None] * s_dl + e[None, :] * s_de, mask=s_ok[:, None] & e_ok[None, :], other=0.0)
    u, Bt = d, d
    if NEED_STATES:
        u = tl.load(u_base + t[:, None] * s_ul + e[None, :] * s_ue, mask=s_ok[:, None] & e_ok[None, :], other=0.0)
        Bt = tl.load(B_base + t[:, None] * s_Bl + n[None, :] * s_Bn, mask=s_ok[:, None] & n_ok[None, :], other=0.0)
    return u, d, Bt


@triton.jit
def _tile_states(u, dt, Bt, A2, h0):
    """A tile's inputs x = delta u B, decays a = exp(delta A) and states, all (T, N, E), from u, delta (T, E),
    B (T, N) and the start state (1, N, E)."""
    x = (dt * u)[:, None, :] * Bt[:, :, None]
    a = tl.exp2(dt[:, None, :] * A2[None, :, :])
    # The start state enters through the first step (h_0 = a_0 h0 + x_0), so the scan's running products of a
    # go unused and are dropped by the compiler (an in-thread scan): 2 fewer multiplies an element than
    # adding a_cum h0 afterwards. With T in-thread the row-0 select folds away.
    first = (tl.arange(0, x.shape[0]) == 0)[:, None, None]
    _, hs = tl.associative_scan((a, tl.where(first, x + a * h0, x)), axis=0,
                                combine_fn=_affine_combine)
    return x, a, hs


@triton.jit
def _fwd_tile_loads(c, L, u_ptr, d_ptr, B_ptr, C_ptr, z_ptr, o_ptr, e, n, e_ok, n_ok, s_ue, s_ul, s_de, s_dl, s_Bn,
                    s_Bl, s_Cn, s_Cl, s_ze, s_zl, s_oe, s_ol, REVERSE: tl.constexpr, NEED_C: tl.constexpr,
                    NEED_Z: tl.constexpr, NEED_OUT: tl.constexpr, T: tl.constexpr):
    """Tile c's u, delta, B, C (NEED_C), z (NEED_Z) and the output so far (NEED_OUT: the first direction's, which
    the second adds to) as stored (0 past L); B and u stand in for those not needed."""
    s = c * T + tl.arange(0, T)
    t = (L - 1 - s) if REVERSE else s
    m = (s < L)[:, None] & e_ok[None, :]
    mn = (s < L)[:, None] & n_ok[None, :]
    u = tl.load(u_ptr + t[:, None] * s_ul + e[None, :] * s_ue, mask=m, other=0.0)
    d = tl.load(d_ptr + t[:, None] * s_dl + e[None, :] * s_de, mask=m, other=0.0)
    Bt = tl.load(B_ptr + t[:, None] * s_Bl + n[None, :] * s_Bn, mask=mn, other=0.0)
    Ct, zt = Bt, u
    if NEED_C:
        Ct = tl.load(C_ptr + t[:, None] * s_Cl + n[None, :] * s_Cn, mask=mn, other=0.0)
    if NEED_Z:
        zt = tl.load(z_ptr + t[:, None] * s_zl + e[None, :] * s_ze, mask=m, other=0.0)
    o = u
    if NEED_OUT:
        o = tl.load(o_ptr + t[:, None] * s_ol + e[None, :] * s_oe, mask=m, other=0.0)
    return u, d, Bt, Ct, zt, o


@triton.jit
def _bwd_tile_loads(s, L, u_base, d_base, B_base, C_base, g_base, z_base, dz_base, e, n, e_ok, n_ok, s_ue, s_ul,
                    s_de, s_dl, s_Bn, s_Bl, s_Cn, s_Cl, s_ge, s_gl, s_ze, s_zl, s_Ge, s_Gl, REVERSE: tl.constexpr,
                    HAS_Z: tl.constexpr, NEED_STATES: tl.constexpr, NEED_DZ: tl.constexpr):
    """Steps s' u, delta, B, C, dout, z and (NEED_DZ: the first direction's, which the second adds to) dz as
    stored, 0 outside [0, L); u stands in for those not loaded. Without NEED_STATES (the adjoint alone needs no
    state) u and B are not loaded (_state_loads)."""
    u, d, Bt = _state_loads(s, L, L, u_base, d_base, B_base, e, n, e_ok, n_ok, s_ue, s_ul, s_de, s_dl, s_Bn, s_Bl,
                            REVERSE, NEED_STATES)
    s_ok = (s >= 0) & (s < L)
    t = (L - 1 - s) if REVERSE else s
    m = s_ok[:, None] & e_ok[None, :]
    Ct = tl.load(C_base + t[:, None] * s_Cl + n[None, :] * s_Cn, mask=s_ok[:, None] & n_ok[None, :], other=0.0)
    dout = tl.load(g_base + t[:, None] * s_gl + e[None, :] * s_ge, mask=m, other=0.0)
    zt, dz = u, u
    if HAS_Z:
        zt = tl.load(z_base + t[:, None] * s_zl + e[None, :] * s_ze, mask=m, other=0.0)
    if NEED_DZ:
        dz = tl.load(dz_base + t[:, None] * s_Gl + e[None, :] * s_Ge, mask=m, other=0.0)
    return u, d, Bt, Ct, dout, zt, dz


@triton.jit
def _fold_segments_kernel(seg_v_ptr, seg_dt_ptr, A_ptr, E, N, n_seg, BACKWARD: tl.constexpr,
                          A_IS_LOG: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """When L is split into segments: replaces, in place, each segment's summary (its local end state, or
    start adjoint, from zero (N, E), and its delta sum (E,)) with what flows into it from the segments before
    it in scan order (after it, BACKWARD): carry = exp2(A2 dt_sum) carry + v, folded sequentially. The
    main kernels then start from a plain load (folding there, in a loop of program-dependent length,
    made the backward 1.7x slower on Triton 3.6)."""
    pid_e, b64 = tl.program_id(0), tl.program_id(1).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_ok = e < E
    ne_ok = (n < N)[:, None] & e_ok[None, :]
    A2 = _load_A(A_ptr, n, e, ne_ok, N, A_IS_LOG) * 1.4426950408889634
    carry = tl.zeros_like(A2)
    # The segment that is last in fold order has no summary (nothing follows it): it only receives.
    for i in range(n_seg):
        row = b64 * n_seg + ((n_seg - 1 - i) if BACKWARD else i)
        plane = seg_v_ptr + (row * E + e[None, :]) * BLOCK_N + n[:, None]
        if i < n_seg - 1:
            v = tl.load(plane, mask=ne_ok, other=0.0)
            dt_sum = tl.load(seg_dt_ptr + row * E + e, mask=e_ok, other=0.0)
            tl.store(plane, carry, mask=ne_ok)
            carry = tl.exp2(A2 * dt_sum[None, :]) * carry + v
        else:
            tl.store(plane, carry, mask=ne_ok)


@triton.jit
def _load_carry(seg_v_ptr, b64, n_seg, seg, n, e, ne_ok, E, BLOCK_N: tl.constexpr):
    """The state (decayed adjoint) flowing into segment `seg`, written by _fold_segments_kernel."""
    return tl.load(seg_v_ptr + ((b64 * n_seg + seg) * E + e[None, :]) * BLOCK_N + n[:, None], mask=ne_ok, other=0.0)


@triton.jit
def _store_summary(seg_v_ptr, seg_dt_ptr, b64, n_seg, seg, v, dt_sum, n, e, ne_ok, e_ok, E,
                   BLOCK_N: tl.constexpr):
    row = b64 * n_seg + seg
    tl.store(seg_v_ptr + (row * E + e[None, :]) * BLOCK_N + n[:, None], v, mask=ne_ok)
    tl.store(seg_dt_ptr + row * E + e, dt_sum, mask=e_ok)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr, seg_h_ptr, seg_dt_ptr,
    E, L, N, group_E, n_saved, seg_tiles, n_seg,
    s_ub, s_ue, s_ul, s_db, s_de, s_dl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
    s_zb, s_ze, s_zl, s_ob, s_oe, s_ol,
    REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
    SOFTPLUS: tl.constexpr, ACCUMULATE: tl.constexpr, ATOMIC_ADD: tl.constexpr, STORE_STATES: tl.constexpr,
    SUMMARY: tl.constexpr, SPLIT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
    SAVE_EVERY: tl.constexpr,
):
    """Forward on a time-major (T, N, E) tile: channels (then states) on lanes, the T steps of a tile in each
    thread, so the chunk scan runs serially in-thread with no shuffles. Program (pid_e, pid_b, pid_s) walks
    segment pid_s of L (seg_tiles tiles of T steps; n_seg = 1: all of L). SUMMARY: only the segment's end
    state from a zero start and its delta sum (_fold_segments_kernel turns them into each segment's start
    state). Otherwise the outputs, and (STORE_STATES) the state at every SAVE_EVERY-th tile start for the
    backward."""
    pid_s = tl.program_id(2)
    b64 = tl.program_id(1).to(tl.int64)
    e, n, e_ok, n_ok, ne_ok, g, A, bias = _channel_block(A_ptr, bias_ptr, E, N, group_E, HAS_BIAS, A_IS_LOG,
                                                         BLOCK_E, BLOCK_N)
    A2 = A * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    col = tl.arange(0, T)
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    u_base, d_base = u_ptr + b64 * s_ub, delta_ptr + b64 * s_db
    B_base = B_ptr + b64 * s_Bb + g * s_Bg
    st_plane = state_ptr + n[:, None] + ((b64 * E + e) * n_saved * BLOCK_N)[None, :]
    # -0.0 is the identity of +, so with T in-thread the masked sum folds to a register move.
    last = (col == T - 1)[:, None, None]

    if SPLIT and not SUMMARY:
        h = _load_carry(seg_h_ptr, b64, n_seg, pid_s, n, e, ne_ok, E, BLOCK_N)[None, :, :]
    else:
        h = tl.zeros((1, BLOCK_N, BLOCK_E), tl.float32)
    dt_sum = tl.zeros((BLOCK_E,), tl.float32)
    c0 = pid_s * seg_tiles
    C_base = C_ptr + b64 * s_Cb + g * s_Cg
    z_base = z_ptr + b64 * s_zb
    # Software pipelining by hand (Triton pipelines only loads that feed dots): tile c + 1's loads are issued
    # before tile c's scan, so their latency overlaps its compute. Past L they are masked off.
    NEED_C: tl.constexpr = not SUMMARY
    NEED_Z: tl.constexpr = HAS_Z and not SUMMARY
    # ACCUMULATE: the second direction, run after the first, adds the first's output, prefetched like the other
    # inputs (loaded right before the add, it stalled every tile on a full memory latency: the bidirectional
    # forward ran 1.2x the time of two independent scans at S 8f b16; H100, 2026-11-27).
    NEED_OUT: tl.constexpr = ACCUMULATE and not SUMMARY
    o_base = out_ptr + b64 * s_ob
    nxt = _fwd_tile_loads(c0, L, u_base, d_base, B_base, C_base, z_base, o_base, e, n, e_ok, n_ok, s_ue, s_ul, s_de,
                          s_dl, s_Bn, s_Bl, s_Cn, s_Cl, s_ze, s_zl, s_oe, s_ol, REVERSE, NEED_C, NEED_Z, NEED_OUT, T)
    for c in range(c0, tl.minimum(c0 + seg_tiles, tl.cdiv(L, T))):
        u_c, d_c, B_c, C_c, z_c, o_c = nxt
        nxt = _fwd_tile_loads(c + 1, L, u_base, d_base, B_base, C_base, z_base, o_base, e, n, e_ok, n_ok, s_ue, s_ul,
                              s_de, s_dl, s_Bn, s_Bl, s_Cn, s_Cl, s_ze, s_zl, s_oe, s_ol, REVERSE, NEED_C, NEED_Z,
                              NEED_OUT, T)
        if STORE_STATES and not SUMMARY:
            if c % SAVE_EVERY == 0:
                tl.store(st_plane[None, :, :] + (c // SAVE_EVERY) * BLOCK_N, h, mask=ne_ok[None, :, :])
        s = c * T + col
        t = (L - 1 - s) if REVERSE else s
        m = (s < L)[:, None] & e_ok[None, :]  # (T, E)
        u = u_c.to(tl.float32)
        dt, _ = _delta(d_c, m, bias[None, :], HAS_BIAS, SOFTPLUS)
        _, _, hs = _tile_states(u, dt, fm.upcast(B_c), A2, h)
        h = tl.sum(tl.where(last, hs, -0.0), axis=0, keep_dims=True)
        if SUMMARY:
            dt_sum += tl.sum(dt, axis=0)
        else:
            y = tl.sum(hs * fm.upcast(C_c)[:, :, None], axis=1)
            if HAS_D:
                y += D[None, :] * u
            if HAS_Z:
                zt = z_c.to(tl.float32)
                y *= zt * fm.sigmoid(zt)
            o_offs = o_base + t[:, None] * s_ol + e[None, :] * s_oe
            if ACCUMULATE:
                y += o_c.to(tl.float32)
            if ATOMIC_ADD:
                # Both directions at once (_launch_directions) add into a zeroed output.
                tl.atomic_add(o_offs, y.to(out_ptr.dtype.element_ty), mask=m, sem="relaxed")
            else:
                tl.store(o_offs, y.to(out_ptr.dtype.element_ty), mask=m)
    if SUMMARY:
        _store_summary(seg_h_ptr, seg_dt_ptr, b64, n_seg, pid_s, tl.reshape(h, (BLOCK_N, BLOCK_E)), dt_sum, n, e,
                       ne_ok, e_ok, E, BLOCK_N)


@triton.jit
def _take_sm_slot(scratch_ptr, program, n_sm, slots_per_sm, SLOT: tl.constexpr, LOCK: tl.constexpr):
    """A free scratch slot among the slots_per_sm of the SM this program runs on (its %smid, folded into
    n_sm groups), SLOT floats each with a lock word at offset LOCK: the lock goes 0 -> 1 by compare-and-swap,
    probing from program % slots_per_sm. With slots_per_sm at least the programs an SM holds at once, a
    program finds a slot in a few probes: it started because one on its SM ended and gave its slot back.
    With fewer, the extra programs wait for a slot, which only costs time. Returns the slot's start; the
    program gives it back with _give_back_slot. The lock lives in the slot, so only the slot's pointer stays
    live through the kernel (with a separate lock array, the slot index and that array's pointer did too)."""
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    first = (sm % n_sm) * slots_per_sm
    k = program % slots_per_sm
    while tl.atomic_cas(_slot_lock(scratch_ptr + (first + k).to(tl.int64) * SLOT, LOCK), 0, 1, sem="acquire") != 0:
        k = (k + 1) % slots_per_sm
    return scratch_ptr + (first + k).to(tl.int64) * SLOT


@triton.jit
def _slot_lock(slot_ptr, LOCK: tl.constexpr):
    return (slot_ptr + LOCK).to(tl.pointer_type(tl.int32), bitcast=True)


@triton.jit
def _give_back_slot(slot_ptr, LOCK: tl.constexpr):
    tl.atomic_xchg(_slot_lock(slot_ptr, LOCK), 0, sem="release")


@triton.jit(do_not_specialize=["n_sm", "slots_per_sm"])
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, state_ptr, scratch_ptr,
    seg_r_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    E, L, N, group_E, n_chunks, seg_chunks, n_seg, n_sm, slots_per_sm,
    s_ub, s_ue, s_ul, s_db, s_de, s_dl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
    s_zb, s_ze, s_zl, s_gb, s_ge, s_gl, s_Gb, s_Ge, s_Gl, s_dBb, s_dBg, s_dBn, s_dBl,
    REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
    SOFTPLUS: tl.constexpr, ACCUMULATE: tl.constexpr, SPLIT: tl.constexpr, SCATTER_SUMS: tl.constexpr,
    SM_SLOTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, SUB: tl.constexpr,
):
    """Gradients of one direction on a time-major (T, N, E) state tile: each thread holds a tile's T steps,
    so both scans run serially in-thread (no shuffles) and the sums over N are mostly in-thread (~2.4x fewer
    instructions per element than a time-last tile, whose scans shuffle across lanes; H200, 2026-11-26).

    The forward saved a state every SUB * T steps. With SUB > 1 each saved chunk is first walked forward
    to get its SUB sub-tile start states, which go to a scratch slot (L2-resident); then its sub-tiles are
    differentiated in reverse. Saved states far apart cost little memory (default_config) for a partial
    second recompute. The slot is the program's own, or with SM_SLOTS one of slots_per_sm slots of the SM
    it runs on, taken and given back through a lock (_take_sm_slot): the scratch then scales with the
    programs resident at once, not with the grid.

    Program (pid_e, pid_b, pid_s) differentiates segment pid_s of L (seg_chunks saved chunks); its incoming
    adjoint comes from the summaries of the segments after it (_adjoint_summary_kernel, then
    _fold_segments_kernel) when SPLIT."""
    pid_e, pid_b, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b64 = pid_b.to(tl.int64)
    e, n, e_ok, n_ok, ne_ok, g, A, bias = _channel_block(A_ptr, bias_ptr, E, N, group_E, HAS_BIAS, A_IS_LOG,
                                                         BLOCK_E, BLOCK_N)
    A2 = A * 1.4426950408889634
    col = tl.arange(0, T)
    e_local = tl.arange(0, BLOCK_E)
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    st_plane = state_ptr + n[:, None] + ((b64 * E + e) * n_chunks * BLOCK_N)[None, :]
    # du/ddelta/dz share strides (s_G*), as do dB/dC (s_dB*): _scan_backward picks them.
    dBC_base = b64 * s_dBb + g * s_dBg
    grad_base = b64 * s_Gb
    last = (col == T - 1)[:, None, None]
    u_base, d_base = u_ptr + b64 * s_ub, delta_ptr + b64 * s_db
    B_base = B_ptr + b64 * s_Bb + g * s_Bg
    slot = n[:, None] + tl.arange(0, BLOCK_E)[None, :] * BLOCK_N
    program = (pid_s * tl.num_programs(1) + pid_b) * tl.num_programs(0) + pid_e
    # A slot: the SUB sub-tile start states, then (SM_SLOTS) a lock word, padded to 128 bytes.
    SLOT_LOCK: tl.constexpr = SUB * BLOCK_E * BLOCK_N
    SLOT: tl.constexpr = SLOT_LOCK + 32 if SM_SLOTS else SLOT_LOCK
    if SM_SLOTS:
        scratch = _take_sm_slot(scratch_ptr, program, n_sm, slots_per_sm, SLOT, SLOT_LOCK)
    else:
        scratch = scratch_ptr + program.to(tl.int64) * SLOT

    # The decayed adjoint flowing in from after this segment (0 at the end of L).
    if SPLIT:
        w_next = _load_carry(seg_r_ptr, b64, n_seg, pid_s, n, e, ne_ok, E, BLOCK_N)[None, :, :]
        c_begin = pid_s * seg_chunks
        c_end = tl.minimum(c_begin + seg_chunks, n_chunks)
    else:
        w_next = tl.zeros((1, BLOCK_N, BLOCK_E), tl.float32)
        c_begin = 0
        c_end = n_chunks
    dA_acc = tl.zeros((1, BLOCK_N, BLOCK_E), tl.float32)
    dD_acc = tl.zeros((BLOCK_E,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_E,), tl.float32)
    C_base, g_base, z_base = C_ptr + b64 * s_Cb + g * s_Cg, dout_ptr + b64 * s_gb, z_ptr + b64 * s_zb
    # Software pipelining by hand, as in the forward: each sub-tile's loads are issued one sub-tile ahead. The
    # sub-tile after the last of a chunk (in this reverse walk) is the first of the chunk before it, so the
    # prefetch runs on across chunks and the forward walk between them.
    # The second direction's read of the first's dz is prefetched as well (read right before the add, it
    # stalled every sub-tile on a full memory latency).
    NEED_DZ: tl.constexpr = ACCUMULATE and HAS_Z
    dz_base = dz_ptr + grad_base
    nxt = _bwd_tile_loads(((c_end - 1) * SUB + SUB - 1) * T + col, L, u_base, d_base, B_base, C_base, g_base,
                          z_base, dz_base, e, n, e_ok, n_ok, s_ue, s_ul, s_de, s_dl, s_Bn, s_Bl, s_Cn, s_Cl, s_ge,
                          s_gl, s_ze, s_zl, s_Ge, s_Gl, REVERSE, HAS_Z, True, NEED_DZ)
    for ci in range(c_end - c_begin):
        c = c_end - 1 - ci
        if SUB > 1:
            # Walk the saved chunk forward to its sub-tile start states, each sub-tile's loads issued one sub-tile
            # ahead (unpipelined, every step of the walk waited a full memory latency). It stops before the
            # chunk's last sub-tile, whose start state stays in registers for the reverse pass to begin with.
            s = c * SUB * T + col
            s_stop = tl.minimum(L, (c * SUB + SUB - 1) * T)
            walk = _state_loads(s, s_stop, L, u_base, d_base, B_base, e, n, e_ok, n_ok, s_ue, s_ul, s_de, s_dl,
                                s_Bn, s_Bl, REVERSE, True)
        # States are carried as (1, N, E) planes in the tiles' own layout; memory sees (N, E).
        h = tl.load(st_plane + c * BLOCK_N, mask=ne_ok, other=0.0)[None, :, :]
        if SUB > 1:
            tl.store(scratch + slot, tl.sum(h, axis=0))
            for j in range(SUB - 1):
                u_w, d_w, B_w = walk
                walk = _state_loads(s + T, s_stop, L, u_base, d_base, B_base, e, n, e_ok, n_ok, s_ue, s_ul, s_de,
                                    s_dl, s_Bn, s_Bl, REVERSE, True)
                dt_w, _ = _delta(d_w, (s < L)[:, None] & e_ok[None, :], bias[None, :], HAS_BIAS, SOFTPLUS)
                _, _, hs = _tile_states(u_w.to(tl.float32), dt_w, fm.upcast(B_w), A2, h)
                h = tl.sum(tl.where(last, hs, -0.0), axis=0, keep_dims=True)
                # The last sub-tile's start state is stored but never read back (it stays in registers): masking
                # that one store off costs more instructions a sub-tile than it saves (local sm_90 compile).
                tl.store(scratch + (j + 1) * BLOCK_E * BLOCK_N + slot, tl.sum(h, axis=0))
                s += T
            tl.debug_barrier()
        h0_next = h  # the start state of the chunk's last sub-tile
        for jj in range(SUB):
            j = SUB - 1 - jj
            h0 = h0_next
            if SUB > 1:
                # The start state of the sub-tile before, loaded one sub-tile ahead (none before sub-tile 0).
                h0_next = tl.load(scratch + (j - 1) * BLOCK_E * BLOCK_N + slot, mask=j > 0, other=0.0)[None, :, :]
            s = (c * SUB + j) * T + col
            s_ok = s < L
            t = (L - 1 - s) if REVERSE else s
            m = s_ok[:, None] & e_ok[None, :]  # (T, E)
            mn = s_ok[:, None] & n_ok[None, :]  # (T, N)
            u_c, d_c, B_c, C_c, g_c, z_c, dz_c = nxt
            nxt = _bwd_tile_loads(s - T, L, u_base, d_base, B_base, C_base, g_base, z_base, dz_base, e, n, e_ok, n_ok,
                                  s_ue, s_ul, s_de, s_dl, s_Bn, s_Bl, s_Cn, s_Cl, s_ge, s_gl, s_ze, s_zl, s_Ge, s_Gl,
                                  REVERSE, HAS_Z, True, NEED_DZ)
            Ct = fm.upcast(C_c)
            dout = g_c.to(tl.float32)
            zt = z_c.to(tl.float32)
            u = u_c.to(tl.float32)
            dt, slope = _delta(d_c, m, bias[None, :], HAS_BIAS, SOFTPLUS)
            Bt = fm.upcast(B_c)
            x, a, hs = _tile_states(u, dt, Bt, A2, h0)
            grad_offs = grad_base + t[:, None] * s_Gl + e[None, :] * s_Ge
            dtu = dt * u

            # Gate.
            if HAS_Z:
                sig = fm.sigmoid(zt)
                y = tl.sum(hs * Ct[:, :, None], axis=1)
                if HAS_D:
                    y += D[None, :] * u
                dz = dout * y * sig * (1.0 + zt * (1.0 - sig))
                if ACCUMULATE:
                    dz += dz_c.to(tl.float32)
                tl.store(dz_ptr + grad_offs, dz.to(dz_ptr.dtype.element_ty), mask=m)
                gy = dout * zt * sig
            else:
                gy = dout

            # Adjoint: r_t = C_t g_t + a_{t+1} r_{t+1}, the decayed a_{t+1} r_{t+1} carried in from the following tile.
            r, w_next = _reverse_affine_scan(a, Ct[:, :, None] * gy[:, None, :], w_next)

            r_ah = r * (hs - x)  # r_t a_t h_{t-1}
            rB = tl.sum(r * Bt[:, :, None], axis=1)
            du = dt * rB
            if HAS_D:
                du += D[None, :] * gy
                dD_acc += tl.sum(gy * u, axis=0)
            ddt = u * rB + tl.sum(r_ah * A[None, :, :], axis=1)
            dA_acc += tl.sum(r_ah * dt[:, None, :], axis=0, keep_dims=True)
            if SOFTPLUS:
                ddt = ddt * slope
            ddt = tl.where(m, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + grad_offs, du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddelta_ptr + grad_offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
            if SCATTER_SUMS:
                dB, rows, owner = _channel_sum_scattered(r * dtu[:, None, :], e_local)
                dC, _, _ = _channel_sum_scattered(hs * gy[:, None, :], e_local)
                s_row = (c * SUB + j) * T + rows  # (R, 1, E)
                t_row = (L - 1 - s_row) if REVERSE else s_row
                dBC_offs = dBC_base + t_row * s_dBl + n[None, :, None] * s_dBn
                dBC_ok = owner & (s_row < L) & n_ok[None, :, None]
            else:
                dB = tl.sum(r * dtu[:, None, :], axis=2)
                dC = tl.sum(hs * gy[:, None, :], axis=2)
                dBC_offs = dBC_base + t[:, None] * s_dBl + n[None, :] * s_dBn
                dBC_ok = mn
            tl.atomic_add(dB_ptr + dBC_offs, dB, mask=dBC_ok, sem="relaxed")
            tl.atomic_add(dC_ptr + dBC_offs, dC, mask=dBC_ok, sem="relaxed")
        if SUB > 1:
            # The next saved chunk's forward walk must not overwrite slots this one still reads.
            tl.debug_barrier()

    if SM_SLOTS:
        # After the last chunk's barrier no thread touches the slot any more.
        _give_back_slot(scratch, SLOT_LOCK)
    if A_IS_LOG:
        dA_acc *= A[None, :, :]  # d A_log = dA * dA/dA_log = dA * A
    tl.atomic_add(dA_ptr + n[None, :, None] + e[None, None, :] * N, dA_acc, mask=ne_ok[None, :, :], sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + e, dD_acc, mask=e_ok, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + e, dbias_acc, mask=e_ok, sem="relaxed")


@triton.jit
def _adjoint_summary_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, seg_r_ptr, seg_dt_ptr,
    E, L, N, group_E, seg_steps, n_seg,
    s_db, s_de, s_dl, s_Cb, s_Cg, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl,
    REVERSE: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    """For segment seg = pid_s + 1 of L: the decayed adjoint a_t r_t at its first step from a zero one after
    it, and the sum of delta over its steps (the decayed adjoint crosses the segment scaled by exp(A sum
    delta)). It needs no state: r_t = C_t g_t + a_{t+1} r_{t+1} with g_t = dout_t silu(z_t)."""
    seg = tl.program_id(2) + 1
    b64 = tl.program_id(1).to(tl.int64)
    e, n, e_ok, n_ok, ne_ok, g, A, bias = _channel_block(A_ptr, bias_ptr, E, N, group_E, HAS_BIAS, A_IS_LOG,
                                                         BLOCK_E, BLOCK_N)
    A2 = A * 1.4426950408889634
    col = tl.arange(0, T)

    w_next = tl.zeros((1, BLOCK_N, BLOCK_E), tl.float32)
    dt_sum = tl.zeros((BLOCK_E,), tl.float32)
    s_begin = seg * seg_steps
    n_tiles = tl.cdiv(tl.minimum(s_begin + seg_steps, L) - s_begin, T)
    d_base, C_base = delta_ptr + b64 * s_db, C_ptr + b64 * s_Cb + g * s_Cg
    g_base, z_base = dout_ptr + b64 * s_gb, z_ptr + b64 * s_zb
    # Each tile's loads are issued one tile ahead, as in the backward (the last prefetch reads the
    # tile before the segment for nothing).
    s = s_begin + (n_tiles - 1) * T + col
    nxt = _bwd_tile_loads(s, L, d_base, d_base, C_base, C_base, g_base, z_base, d_base, e, n, e_ok, n_ok, s_de,
                          s_dl, s_de, s_dl, s_Cn, s_Cl, s_Cn, s_Cl, s_ge, s_gl, s_ze, s_zl, s_de, s_dl, REVERSE, HAS_Z,
                          False, False)
    for _ in range(n_tiles):
        _, d_c, _, C_c, g_c, z_c, _ = nxt
        nxt = _bwd_tile_loads(s - T, L, d_base, d_base, C_base, C_base, g_base, z_base, d_base, e, n, e_ok, n_ok,
                              s_de, s_dl, s_de, s_dl, s_Cn, s_Cl, s_Cn, s_Cl, s_ge, s_gl, s_ze, s_zl, s_de, s_dl,
                              REVERSE, HAS_Z, False, False)
        m = (s < L)[:, None] & e_ok[None, :]
        dt, _ = _delta(d_c, m, bias[None, :], HAS_BIAS, SOFTPLUS)
        gy = g_c.to(tl.float32)
        if HAS_Z:
            zt = z_c.to(tl.float32)
            gy = gy * zt * fm.sigmoid(zt)
        _, w_next = _reverse_affine_scan(tl.exp2(dt[:, None, :] * A2[None, :, :]),
                                         fm.upcast(C_c)[:, :, None] * gy[:, None, :], w_next)
        dt_sum += tl.sum(dt, axis=0)
        s -= T
    _store_summary(seg_r_ptr, seg_dt_ptr, b64, n_seg, seg, tl.reshape(w_next, (BLOCK_N, BLOCK_E)), dt_sum, n, e,
                   ne_ok, e_ok, E, BLOCK_N)


class _Direction(NamedTuple):
    """One direction's scan inputs; B/C already (B, G, N, L)."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None
    bias: Tensor | None


def _block_e(block_e: int, group_E: int) -> int:
    """Programs must not straddle a B/C group: the largest power of two <= block_e dividing group_E."""
    while group_E % block_e:
        block_e //= 2
    return block_e


def _summary_buffers(Bsz: int, n_seg: int, E: int, block_n: int, device) -> tuple[Tensor, Tensor]:
    """Per-segment local end state (or decayed adjoint), (B, S, E, block_n), and delta sum, (B, S, E); fp32."""
    f32 = dict(device=device, dtype=torch.float32)
    return torch.empty(Bsz, n_seg, E, block_n, **f32), torch.empty(Bsz, n_seg, E, **f32)


def _scan_forward(dirs: list[_Direction], reverse: list[bool], z: Tensor | None, softplus: bool, a_is_log: bool,
                  cfg: ScanConfig, store_states: bool) -> tuple[Tensor, list[Tensor]]:
    u0 = dirs[0].u
    Bsz, E, L = u0.shape
    G, N = dirs[0].B.shape[1], dirs[0].A.shape[1]
    block_n = max(2, triton.next_power_of_2(N))
    n_chunks = triton.cdiv(L, cfg.chunk)
    block_e = _block_e(cfg.block_e_fwd, E // G) if G > 1 else cfg.block_e_fwd
    out = empty_like_layout(u0, u0.dtype)
    # Both directions at once only where the output is time-major: there each lane adds 4 adjacent channels in one
    # instruction (REDG.ADD.BF16x4 in the sm_90 SASS). Into (B, E, L) rows the atomic adds made the bidirectional
    # forward 1.9-2.2x slower (H100, 2026-11-27). NVIDIA only, where the 16-bit atomics were measured; ROCm keeps the
    # sequential add, as it keeps a scratch slot a program in the backward.
    side_by_side = len(dirs) > 1 and u0.is_cuda and torch.version.hip is None and is_time_major(out)
    if side_by_side:
        out.zero_()  # both directions add into it
    zz = z if z is not None else out
    states, launches = [], []
    for i, (d, rev) in enumerate(zip(dirs, reverse, strict=True)):
        st = torch.empty(Bsz, E, n_chunks, block_n, device=u0.device, dtype=torch.float32) if store_states \
            else out
        Dp = d.D if d.D is not None else d.A
        bp = d.bias if d.bias is not None else d.A
        args = [d.u, d.delta, d.A, d.B, d.C, Dp, zz, bp, out, st]
        strides = [*d.u.stride(), *d.delta.stride(), *d.B.stride(), *d.C.stride(), *zz.stride(), *out.stride()]
        flags = dict(REVERSE=rev, HAS_D=d.D is not None, HAS_Z=z is not None, HAS_BIAS=d.bias is not None,
                     A_IS_LOG=a_is_log, SOFTPLUS=softplus, ACCUMULATE=i > 0 and not side_by_side,
                     ATOMIC_ADD=side_by_side, STORE_STATES=store_states, BLOCK_E=block_e, BLOCK_N=block_n,
                     num_warps=cfg.num_warps_fwd)
        if cfg.fwd_max_registers and u0.is_cuda and torch.version.hip is None:
            flags["maxnreg"] = cfg.fwd_max_registers
        save_every = cfg.chunk // cfg.fwd_steps
        # Segments need not start on a saved state: a program saves those that fall in its tiles (c % SAVE_EVERY
        # is global), and whole tiles balance the programs better than whole chunks.
        seg_tiles, n_seg = split_segments(triton.cdiv(L, cfg.fwd_steps), cfg.fwd_segments)
        seg_h, seg_dt = _summary_buffers(Bsz, n_seg, E, block_n, u0.device) if n_seg > 1 else (out, out)
        sizes = [E, L, N, E // G, n_chunks, seg_tiles, n_seg, *strides]
        grid = (triton.cdiv(E, block_e), Bsz)
        tm = dict(T=cfg.fwd_steps, SAVE_EVERY=save_every, SPLIT=n_seg > 1, **flags)
        kernels = []
        if n_seg > 1:
            kernels.append((_scan_fwd_kernel[(*grid, n_seg - 1)], [*args, seg_h, seg_dt, *sizes],
                            dict(SUMMARY=True, **tm)))
            kernels.append((_fold_segments_kernel[grid], [seg_h, seg_dt, d.A, E, N, n_seg],
                            dict(BACKWARD=False, A_IS_LOG=a_is_log, BLOCK_E=block_e, BLOCK_N=block_n)))
        kernels.append((_scan_fwd_kernel[(*grid, n_seg)], [*args, seg_h, seg_dt, *sizes], dict(SUMMARY=False, **tm)))
        launches.append(kernels)
        states.append(st)
    _launch_directions(launches, u0.device, side_by_side)
    return out, states


# One side stream per device for the second direction's forward (_launch_directions).
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _launch_directions(launches: list[list[tuple]], device: torch.device, side_by_side: bool) -> None:
    """Launches each direction's forward kernels, [(kernel, args, kwargs)], in order. With `side_by_side` the
    second direction's run on a side stream, beside the first's: one direction's programs leave most warp slots idle
    (at S 8f b16, 768 one-warp programs for 132 SMs that hold 12 each), and the two together fill twice as many.
    Both add into the zeroed output atomically, so their order does not matter. The mixer's forward got
    1.08-1.16x faster (H100, 2026-11-27). Everything the kernels touch is allocated beforehand on the current stream,
    which waits for the side stream before going on.

    The backward stays one direction after the other: concurrent, adding dz atomically, it made the mixer's
    fwd+bwd 0.90-1.02x as fast (its launches are sized to fill the GPU alone, by the wave model)."""
    def launch(kernels: list[tuple]) -> None:
        for kernel, args, kwargs in kernels:
            kernel(*args, **kwargs)

    if not side_by_side:
        for kernels in launches:
            launch(kernels)
        return
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device)
    if side is None:  # created once: setdefault would build a stream every call
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(main)
    launch(launches[0])
    with torch.cuda.stream(side):
        launch(launches[1])
    main.wait_stream(side)


def _scan_backward(dirs: list[_Direction], reverse: list[bool], z: Tensor | None, softplus: bool, a_is_log: bool,
                   cfg: ScanConfig, states: list[Tensor], dout: Tensor):
    u0 = dirs[0].u
    Bsz, E, L = u0.shape
    G, N = dirs[0].B.shape[1], dirs[0].A.shape[1]
    block_n = states[0].shape[-1]
    n_chunks = states[0].shape[2]
    block_e = _block_e(cfg.block_e_bwd, E // G) if G > 1 else cfg.block_e_bwd
    # du, ddelta and dz in u's layout (the kernel takes one set of strides for the three). dB and dC stay
    # L-contiguous (B, G, N, L) whatever B's layout: every channel block of a row adds into them atomically,
    # and time-major (B, G, L, N) buffers made the S 8f b16 mixer's fwd+bwd 13% slower on an H200 (Ti 64f b4:
    # 3% faster).
    dz = empty_like_layout(u0, z.dtype) if z is not None else None
    grads = []
    for i, (d, rev, st) in enumerate(zip(dirs, reverse, states, strict=True)):
        f32 = dict(device=u0.device, dtype=torch.float32)
        du = empty_like_layout(u0, d.u.dtype)
        ddelta = empty_like_layout(u0, d.delta.dtype)
        # The fp32 accumulators the kernel adds into, as views of two zeroed buffers, one for B and C and one
        # for the parameters (a parameter's gradient keeps its buffer alive: it must not hold dB and dC too).
        dB, dC = _views(torch.zeros(2 * Bsz * G * N * L, **f32), [(Bsz, G, N, L)] * 2)
        params = [t for t in (d.A, d.D, d.bias) if t is not None]
        param_acc = torch.zeros(sum(t.numel() for t in params), **f32)
        dA, dD, dbias = _param_grads(param_acc, d)
        zz = z if z is not None else dout
        grid = (triton.cdiv(E, block_e), Bsz)
        ptrs = [d.u, d.delta, d.A, d.B, d.C, d.D if dD is not None else dA, zz, d.bias if dbias is not None else dA,
                dout, st]
        outs = [du, ddelta, dA, dB, dC, dD if dD is not None else dA, dz if dz is not None else du,
                dbias if dbias is not None else dA]
        strides = [*d.u.stride(), *d.delta.stride(), *d.B.stride(), *d.C.stride(), *zz.stride(), *dout.stride(),
                   *du.stride(), *dB.stride()]
        flags = dict(REVERSE=rev, HAS_D=d.D is not None, HAS_Z=z is not None, HAS_BIAS=d.bias is not None,
                     A_IS_LOG=a_is_log, SOFTPLUS=softplus, ACCUMULATE=i > 0, BLOCK_E=block_e, BLOCK_N=block_n,
                     num_warps=cfg.num_warps_bwd)
        sub = cfg.bwd_sub_chunks
        seg_chunks, n_seg = split_segments(n_chunks, cfg.bwd_segments)
        seg_r, seg_dt = _summary_buffers(Bsz, n_seg, E, block_n, u0.device) if n_seg > 1 else (dA, dA)
        if n_seg > 1:
            _adjoint_summary_kernel[(*grid, n_seg - 1)](
                d.delta, d.A, d.C, zz, ptrs[7], dout, seg_r, seg_dt, E, L, N, E // G, seg_chunks * cfg.chunk,
                n_seg, *d.delta.stride(), *d.C.stride(), *zz.stride(), *dout.stride(), REVERSE=rev,
                HAS_Z=z is not None, HAS_BIAS=d.bias is not None, A_IS_LOG=a_is_log, SOFTPLUS=softplus,
                BLOCK_E=block_e, BLOCK_N=block_n, T=cfg.chunk // sub, num_warps=cfg.num_warps_bwd)
            _fold_segments_kernel[grid](seg_r, seg_dt, d.A, E, N, n_seg, BACKWARD=True, A_IS_LOG=a_is_log,
                                        BLOCK_E=block_e, BLOCK_N=block_n)
        bwd_grid = (*grid, n_seg)
        tiles = dict(T=cfg.chunk // sub, SUB=sub, SPLIT=n_seg > 1, SCATTER_SUMS=cfg.bwd_scatter_sums, **flags)
        sizes = [E, L, N, E // G, n_chunks, seg_chunks, n_seg]
        scratch, n_sm, per_sm, sm_slots = dA, 0, 0, False
        if sub > 1:
            if u0.is_cuda and torch.version.hip is None:  # %smid is NVIDIA PTX; ROCm keeps a slot a program
                n_sm, per_sm = _sm_occupancy([*ptrs, dA, seg_r, *outs, *sizes, 0, 0, *strides], bwd_grid, tiles)
                per_sm = min(per_sm, cfg.bwd_sm_slots or per_sm)
            # More programs than the GPU holds at once share the SMs' scratch slots, each with a lock word, when
            # a slot a program would take more than BWD_SCRATCH_BUDGET: the locks cost 0.5-2.4% (H100, 2026-11-26).
            slot_floats = sub * block_e * block_n  # the sub-tile start states
            programs = math.prod(bwd_grid)
            sm_slots = 0 < n_sm * per_sm < programs and (
                cfg.bwd_sm_slots > 0 or programs * slot_floats * 4 > BWD_SCRATCH_BUDGET)
            if sm_slots:
                scratch = torch.empty(n_sm * per_sm, slot_floats + 32, **f32)
                scratch[:, slot_floats].zero_()  # the lock words (0.0 and int 0 share their bits)
            else:
                scratch = torch.empty(programs * slot_floats, **f32)
        _scan_bwd_kernel[bwd_grid](*ptrs, scratch, seg_r, *outs, *sizes, n_sm, per_sm, *strides,
                                   SM_SLOTS=sm_slots, **tiles)
        dB, dC = dB.to(d.B.dtype), dC.to(d.C.dtype)
        if len({t.dtype for t in params}) == 1:  # the usual case: one cast for the three
            dA, dD, dbias = _param_grads(param_acc.to(params[0].dtype), d)
        else:
            dA, dD, dbias = (None if g is None else g.to(t.dtype) for g, t in zip((dA, dD, dbias), (d.A, d.D, d.bias),
                                                                               strict=True))
        grads.append(_Direction(du, ddelta, dA, dB, dC, dD, dbias))
    return grads, dz


def _param_grads(flat: Tensor, d: _Direction) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """dA, dD and d delta_bias as consecutive views of `flat` (None for an absent D or delta_bias)."""
    present = [t for t in (d.A, d.D, d.bias) if t is not None]
    views = iter(_views(flat, [tuple(t.shape) for t in present]))
    return next(views), next(views) if d.D is not None else None, next(views) if d.bias is not None else None


def _views(flat: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Consecutive views of a flat tensor in the given shapes."""
    views, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[start:start + size].view(shape))
        start += size
    return views


# (device, backward variant) -> (SMs, programs an SM holds at once).
_OCCUPANCY: dict[tuple, tuple[int, int]] = {}


def _sm_occupancy(args: list, grid: tuple[int, ...], constexprs: dict) -> tuple[int, int]:
    """The SM count and how many programs of the backward variant these arguments select one SM holds at
    once, from its compiled registers and shared memory. Cached per variant: `warmup` costs a launch's
    host time."""
    key = (args[0].device, *sorted(constexprs.items()), *(a.dtype for a in args if isinstance(a, Tensor)))
    if key not in _OCCUPANCY:
        kernel = _scan_bwd_kernel.warmup(*args, grid=grid, SM_SLOTS=True, **constexprs)
        kernel._init_handles()  # loads the binary: n_regs is known only then
        props = torch.cuda.get_device_properties(args[0].device)
        warps = kernel.metadata.num_warps
        # Registers go to warps in units of 256, 64K an SM; an SM holds at most 32 programs (sm_80+), each
        # with its shared memory plus the 1 KB the runtime reserves.
        regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256
        per_sm = min(32, 65536 // (regs_per_warp * warps),
                     props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024),
                     props.max_threads_per_multi_processor // (32 * warps))
        _OCCUPANCY[key] = props.multi_processor_count, max(1, per_sm)
    return _OCCUPANCY[key]


class _ScanFn(torch.autograd.Function):
    """Autograd over one or two scan directions sharing z and a summed, gated output."""

    @staticmethod
    def forward(ctx, reverse, softplus, a_is_log, cfg, z, *flat):
        dirs = [_Direction(*flat[i:i + 7]) for i in range(0, len(flat), 7)]
        # Chunk states are only needed by a backward: skip writing them in inference.
        needs_grad = any(t is not None and t.requires_grad for t in (z, *flat))
        out, states = _scan_forward(dirs, reverse, z, softplus, a_is_log, cfg, store_states=needs_grad)
        ctx.reverse, ctx.softplus, ctx.a_is_log, ctx.cfg, ctx.n_dirs = reverse, softplus, a_is_log, cfg, len(dirs)
        ctx.has_z = z is not None
        ctx.present = [t is not None for t in flat]
        ctx.save_for_backward(*(t for t in flat if t is not None), *states, *([z] if z is not None else []))
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = list(ctx.saved_tensors)
        z = saved.pop() if ctx.has_z else None
        states = saved[len(saved) - ctx.n_dirs:]
        it = iter(saved[: len(saved) - ctx.n_dirs])
        flat = [next(it) if p else None for p in ctx.present]
        dirs = [_Direction(*flat[i:i + 7]) for i in range(0, len(flat), 7)]
        grads, dz = _scan_backward(dirs, ctx.reverse, z, ctx.softplus, ctx.a_is_log, ctx.cfg, states, dout)
        return (None, None, None, None, dz, *(t for gr in grads for t in gr))


def _apply(reverse: tuple[bool, ...], softplus: bool, cfg: ScanConfig, z: Tensor | None,
           dirs: list[_Direction], a_is_log: bool = False) -> Tensor:
    """a_is_log: each direction's A holds A_log (A = -exp(A_log)), and its gradient is A_log's."""
    flat = [t for d in dirs for t in d]
    if torch.is_grad_enabled():
        return _ScanFn.apply(reverse, softplus, a_is_log, cfg, z, *flat)
    return _scan_forward(dirs, list(reverse), z, softplus, a_is_log, cfg, store_states=False)[0]


def _as_grouped(BC: Tensor, name: str, Bsz: int, E: int, L: int, N: int) -> Tensor:
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    if BC.dim() != 4 or BC.shape[0] != Bsz or BC.shape[2] != N or BC.shape[3] != L:
        raise ValueError(f"{name} must be (B={Bsz}, N={N}, L={L}) or (B, G, N, L); got {tuple(BC.shape)}")
    if E % BC.shape[1]:
        raise ValueError(f"{name} has {BC.shape[1]} groups, which does not divide E={E}")
    return BC


def sm_count(device: torch.device | str) -> int:
    """The SM count default_config plans for: the GPU's, or an H100's 132 off CUDA (the CPU interpreter)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _default_config_for(u: Tensor, A: Tensor) -> ScanConfig:
    Bsz, E, L = u.shape
    return default_config(A.shape[1], Bsz * E, is_time_major(u), length=L, sm_count=sm_count(u.device))


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, z: Tensor | None) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, E, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1] or A.is_complex():
        raise ValueError(f"A must be a real (E={u.shape[1]}, N) tensor; got {tuple(A.shape)}, {A.dtype}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}; got {tuple(z.shape)}")


def _check_device(t: Tensor) -> None:
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors (slowly): the CPU tests use it.
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernels need CUDA tensors; use the 'ref' backend on CPU")


def _direction(u, delta, A, B, C, D, bias) -> _Direction:
    Bsz, E, L = u.shape
    N = A.shape[1]
    for name, v in (("D", D), ("delta_bias", bias)):
        if v is not None and v.shape != (E,):
            raise ValueError(f"{name} must be (E={E},); got {tuple(v.shape)}")
    # A, D and delta_bias go in as stored (the kernels read them into fp32): no cast, no autograd node.
    return _Direction(u, delta, A.contiguous(), _as_grouped(B, "B", Bsz, E, L, N),
                      _as_grouped(C, "C", Bsz, E, L, N), None if D is None else D.contiguous(),
                      None if bias is None else bias.contiguous())


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    config: ScanConfig | None = None,
) -> Tensor:
    """mamba-ssm's selective_scan_fn on Triton. u/delta/z (B, E, L); A (E, N); B/C (B, N, L) or (B, G, N, L);
    D, delta_bias (E,). Returns (B, E, L) in u's dtype; differentiable w.r.t. every tensor argument."""
    _check_inputs(u, delta, A, z)
    d = _direction(u, delta, A, B, C, D, delta_bias)
    _check_device(u)
    cfg = config or _default_config_for(u, A)
    return _apply((False,), delta_softplus, cfg, z, [d])


def bidirectional_scan_triton(
    forward: tuple[Tensor, ...],
    backward: tuple[Tensor, ...],
    z: Tensor,
    delta_softplus: bool = False,
    *,
    config: ScanConfig | None = None,
) -> Tensor:
    """The two scans of the bimamba-v2 mixer in one call, with no flipped copies: `forward` and `backward` are
    each (u, delta, A, B, C, D, delta_bias) in original time order (D, delta_bias may be None). The backward
    direction is scanned from t = L - 1 down to 0. Returns scan_f * silu(z) + scan_b * silu(z), (B, E, L),
    which equals selective_scan(forward) + flip(selective_scan(flip(backward), z=flip(z))) with z gating both."""
    dirs = []
    for name, inputs in (("forward", forward), ("backward", backward)):
        if len(inputs) != 7:
            raise ValueError(f"{name} must be (u, delta, A, B, C, D, delta_bias); got {len(inputs)} items")
        u, delta, A, B, C, D, bias = inputs
        _check_inputs(u, delta, A, z)
        dirs.append(_direction(u, delta, A, B, C, D, bias))
    if dirs[0].u.shape != dirs[1].u.shape or dirs[0].A.shape != dirs[1].A.shape:
        raise ValueError("forward and backward must have the same (B, E, L) and (E, N) shapes")
    _check_device(z)
    cfg = config or _default_config_for(dirs[0].u, dirs[0].A)
    return _apply((False, True), delta_softplus, cfg, z, dirs)


def bimamba_inner_triton(x_BEL: Tensor, z_BEL: Tensor, fwd, bwd, *, config: ScanConfig | None = None) -> Tensor:
    """The bimamba-v2 mixer core between in_proj and out_proj: out_f + flip(out_b), (B, E, L).

    `fwd`/`bwd` are models.ops.DirectionWeights. Conv + SiLU of both directions is one kernel; the backward
    direction is scanned in reverse in place (no flips); both scans add into one gated output. When x's
    channels are contiguous (x, z are views of in_proj's (B, L, 2E) output, as models/bimamba.py passes them)
    every intermediate and the output are stored time-major too, so out_proj reads the output without a copy.
    """
    if z_BEL.shape != x_BEL.shape:
        raise ValueError(f"x and z must have the same (B, E, L) shape; got {tuple(x_BEL.shape)}, "
                         f"{tuple(z_BEL.shape)}")
    _check_device(x_BEL)
    u_f, u_b = conv1d_silu_bidirectional(x_BEL, fwd.conv_weight_EW, fwd.conv_bias_E,
                                         bwd.conv_weight_EW, bwd.conv_bias_E)
    dirs = []
    for u_BEL, w in ((u_f, fwd), (u_b, bwd)):
        N, R = w.A_log_EN.shape[1], w.dt_proj_weight.shape[1]
        # x_proj / dt_proj in u's dtype (mamba-ssm casts them to the autocast dtype in its fused path).
        x_dbl_BLF = torch.matmul(u_BEL.transpose(1, 2), w.x_proj_weight.to(u_BEL.dtype).t())
        dt_BLR, B_BLN, C_BLN = x_dbl_BLF.split([R, N, N], dim=-1)
        dt_proj = w.dt_proj_weight.to(u_BEL.dtype)
        if is_time_major(u_BEL):
            delta_BEL = torch.matmul(dt_BLR, dt_proj.t()).transpose(1, 2)
        else:
            delta_BEL = torch.matmul(dt_proj, dt_BLR.transpose(1, 2))
        dirs.append(_direction(u_BEL, delta_BEL, w.A_log_EN, B_BLN.transpose(1, 2), C_BLN.transpose(1, 2), w.D_E,
                               w.dt_proj_bias))
    cfg = config or _default_config_for(u_f, dirs[0].A)
    return _apply((False, True), True, cfg, z_BEL, dirs, a_is_log=True)
