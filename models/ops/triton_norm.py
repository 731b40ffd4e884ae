"""Fused Add -> RMSNorm on Triton (the `triton` backend of models.ops.rms_norm), forward and backward.

Legend: R rows (all leading dims flattened, B*L in VideoMamba), D features (normalised over), P backward programs.

Semantics are models/ops/ref.py `rms_norm_ref` (mamba-ssm's fused add + norm):
  s = x + residual (or x);  out = s * rstd * weight,  rstd = 1 / sqrt(mean(s^2) + eps)
in fp32, `out` in x's dtype; with prenorm, also the new residual stream s (fp32 if residual_in_fp32, else x's
dtype). One pass over memory each way: the forward reads x (+ residual) once and writes out (+ s); it saves s
and the per-row rstd only. The backward reads s, rstd, d out and the gradient arriving on the returned s, and
writes d s to x's gradient and to residual's (each in its input's dtype): d x = d residual = d s.

  d s = rstd * (g - y * mean(g * y)) + d s_returned,   y = s * rstd,  g = d out * weight,
  d weight = sum over rows of d out * y.

d weight is summed per program over its rows in registers, written to a (P, D) fp32 buffer, then reduced by one
small torch sum (P is a few per SM): no atomics on the D addresses. Inputs are viewed as (R, D) with unit stride
along D; a tensor whose rows cannot be viewed that way (e.g. a transposed one) is copied (.contiguous()) first.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# One (ROWS, BLOCK_D) tile a program step, about this many elements, 16 fp32 values a thread (more warps for wide
# rows). The backward, whose programs loop over row tiles, was fastest on an H200 with small tiles and many
# programs (fwd+bwd at D = 192/384/576, 25104 rows: 57/91/130 us against 62/96/142 with 2048-element tiles and
# 4 programs an SM; benchmarks/results/norm.md); the forward's time did not depend on its tile.
FWD_TILE_ELEMENTS, BWD_TILE_ELEMENTS = 2048, 1024
# Rows wider than this would need a loop over D (not written: VideoMamba's widths are 192..768).
MAX_D = 8192
# Backward programs per SM: enough to hide latency; each writes one D-wide row of d weight partials.
BWD_PROGRAMS_PER_SM = 8
IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, s_out_ptr, rstd_ptr,
    n_rows, D, stride_x, stride_res, stride_out, stride_s, eps,
    HAS_RES: tl.constexpr, STORE_S: tl.constexpr, STORE_RSTD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]  # R * D can pass 2^31 elements
    s = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + r64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_S:
        tl.store(s_out_ptr + r64 * stride_s + cols[None, :], s.to(s_out_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(s * s, axis=1) / D + eps)  # masked columns hold 0: the sum is exact
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = s * rstd[:, None] * w[None, :]
    tl.store(out_ptr + r64 * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_rms_norm_bwd_kernel(
    s_ptr, rstd_ptr, w_ptr, dout_ptr, ds_out_ptr, dx_ptr, dres_ptr, dw_part_ptr,
    n_rows, D, rows_per_program, stride_s, stride_dout, stride_ds_out, stride_dx, stride_dres,
    HAS_DS_OUT: tl.constexpr, STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    first = pid * rows_per_program  # rows_per_program is a multiple of ROWS
    last = tl.minimum(first + rows_per_program, n_rows)
    for r0 in range(first, last, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        # Masked rows and columns load 0 everywhere, so they add nothing to d weight or the row sums.
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(s_ptr + r64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
        dout = tl.load(dout_ptr + r64 * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dw_acc += dout * y
        g = dout * w[None, :]
        mean_gy = tl.sum(g * y, axis=1) / D
        ds = (g - y * mean_gy[:, None]) * rstd[:, None]
        if HAS_DS_OUT:
            ds += tl.load(ds_out_ptr + r64 * stride_ds_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if STORE_DX:
            tl.store(dx_ptr + r64 * stride_dx + cols[None, :], ds.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DRES:
            tl.store(dres_ptr + r64 * stride_dres + cols[None, :], ds.to(dres_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * D + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def _launch_shape(D: int, tile_elements: int) -> tuple[int, int, int]:
    """(rows a tile, BLOCK_D, warps): ~tile_elements a tile, 16 fp32 values a thread."""
    block_d = triton.next_power_of_2(D)
    rows = max(1, tile_elements // block_d)
    return rows, block_d, max(1, min(16, rows * block_d // 512))


@functools.cache
def _sm_count(device: torch.device) -> int:
    # The interpreter (CPU tensors) has no SMs; 2 gives it a few programs to reduce over.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _rows_view(t: Tensor, D: int) -> Tensor:
    """(R, D) view with unit stride along D; copies only when no such view exists."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x2: Tensor, weight: Tensor, res2: Tensor | None, eps: float, s_dtype: torch.dtype | None,
             store_rstd: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """out (R, D) in x's dtype; s (R, D) in s_dtype unless that is None; rstd (R,) fp32 if store_rstd."""
    R, D = x2.shape
    out = torch.empty((R, D), device=x2.device, dtype=x2.dtype)
    s = None if s_dtype is None else torch.empty((R, D), device=x2.device, dtype=s_dtype)
    rstd = torch.empty(R, device=x2.device, dtype=torch.float32) if store_rstd else None
    rows, block_d, warps = _launch_shape(D, FWD_TILE_ELEMENTS)
    if R:
        _add_rms_norm_fwd_kernel[(triton.cdiv(R, rows),)](
            x2, res2, weight, out, s, rstd, R, D, x2.stride(0), 0 if res2 is None else res2.stride(0),
            out.stride(0), 0 if s is None else s.stride(0), eps,
            HAS_RES=res2 is not None, STORE_S=s is not None, STORE_RSTD=store_rstd,
            ROWS=rows, BLOCK_D=block_d, num_warps=warps,
        )
    return out, s, rstd


def _backward(s2: Tensor, rstd: Tensor, weight: Tensor, dout2: Tensor, ds_out2: Tensor | None,
              dx_dtype: torch.dtype | None, dres_dtype: torch.dtype | None,
              programs: int | None) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(d x, d residual, d weight): d x / d residual in the given dtypes (None: not wanted), d weight fp32."""
    R, D = s2.shape
    rows, block_d, warps = _launch_shape(D, BWD_TILE_ELEMENTS)
    row_tiles = triton.cdiv(R, rows)
    want = programs or BWD_PROGRAMS_PER_SM * _sm_count(s2.device)
    rows_per_program = triton.cdiv(row_tiles, max(1, min(want, row_tiles))) * rows
    P = triton.cdiv(R, rows_per_program)
    dx = None if dx_dtype is None else torch.empty((R, D), device=s2.device, dtype=dx_dtype)
    dres = None if dres_dtype is None else torch.empty((R, D), device=s2.device, dtype=dres_dtype)
    dw_part = torch.empty((P, D), device=s2.device, dtype=torch.float32)
    if R:
        _add_rms_norm_bwd_kernel[(P,)](
            s2, rstd, weight, dout2, ds_out2, dx, dres, dw_part, R, D, rows_per_program,
            s2.stride(0), dout2.stride(0), 0 if ds_out2 is None else ds_out2.stride(0),
            0 if dx is None else dx.stride(0), 0 if dres is None else dres.stride(0),
            HAS_DS_OUT=ds_out2 is not None, STORE_DX=dx is not None, STORE_DRES=dres is not None,
            ROWS=rows, BLOCK_D=block_d, num_warps=warps,
        )
    return dx, dres, dw_part.sum(0)


class _AddRMSNormFn(torch.autograd.Function):
    """Autograd over (R, D) views: inputs x, weight, residual; outputs out and (prenorm) the new residual s."""

    @staticmethod
    def forward(ctx, x2, weight, res2, eps, prenorm, residual_in_fp32, bwd_programs):
        # The backward recomputes y from s. Without a residual and without prenorm, s is x itself: save x.
        # Otherwise s is written: in the returned dtype with prenorm, else (kept only for the backward) fp32.
        s_is_x = res2 is None and not prenorm
        s_dtype = None if s_is_x else (torch.float32 if residual_in_fp32 or not prenorm else x2.dtype)
        out, s, rstd = _forward(x2, weight, res2, eps, s_dtype, store_rstd=True)
        ctx.save_for_backward(x2 if s_is_x else s, rstd, weight)
        ctx.dtypes = (x2.dtype, None if res2 is None else res2.dtype)
        ctx.prenorm, ctx.bwd_programs = prenorm, bwd_programs
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zeros read
        return (out, s) if prenorm else out

    @staticmethod
    def backward(ctx, dout, ds_out=None):
        s2, rstd, weight = ctx.saved_tensors
        x_dtype, res_dtype = ctx.dtypes
        need_x, need_w, need_res = ctx.needs_input_grad[:3]
        D = s2.shape[1]
        ds_out2 = None if ds_out is None else _rows_view(ds_out, D)
        if dout is None:  # only the returned residual is used (e.g. the released masked-pretraining target)
            if ds_out2 is None:
                return (None,) * 7
            return (ds_out2.to(x_dtype) if need_x else None, None,
                    ds_out2.to(res_dtype) if need_res else None, None, None, None, None)
        dx, dres, dw = _backward(s2, rstd, weight, _rows_view(dout, D), ds_out2,
                                 x_dtype if need_x else None, res_dtype if need_res else None, ctx.bwd_programs)
        return dx, dw.to(weight.dtype) if need_w else None, dres, None, None, None, None


def _check(x: Tensor, weight: Tensor, residual: Tensor | None) -> None:
    D = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.shape != (D,):
        raise ValueError(f"weight must be (D,) with D = x.shape[-1]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.dtype not in IO_DTYPES:
            raise ValueError(f"the Triton RMSNorm takes fp32/bf16/fp16 tensors; {name} is {t.dtype} "
                             "(use backend='ref' for float64)")
    if D > MAX_D:
        raise ValueError(f"the Triton RMSNorm handles D <= {MAX_D} features; got D = {D} (use backend='ref')")
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors (slowly): the CPU tests use it.
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernels need CUDA tensors; use the 'ref' backend on CPU")


def add_rms_norm_triton(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = True,
    *,
    bwd_programs: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """rms_norm_ref's (Add ->) RMSNorm in one kernel each way. x (..., D), weight (D,), residual like x.

    Returns out in x's dtype; with prenorm, (out, x + residual) with the sum in fp32 if residual_in_fp32,
    else in x's dtype. Differentiable w.r.t. x, weight and residual, including through the returned sum.
    `bwd_programs` (default: 8 per SM) sets how many programs split the rows in the backward; tests use it to
    make programs loop over several row tiles.
    """
    _check(x, weight, residual)
    D = x.shape[-1]
    x2 = _rows_view(x, D)
    res2 = None if residual is None else _rows_view(residual, D)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual)):
        outs = _AddRMSNormFn.apply(x2, weight, res2, eps, prenorm, residual_in_fp32, bwd_programs)
    else:
        s_dtype = (torch.float32 if residual_in_fp32 else x.dtype) if prenorm else None
        out, s, _ = _forward(x2, weight, res2, eps, s_dtype, store_rstd=False)
        outs = (out, s) if prenorm else out
    if prenorm:
        return outs[0].view(x.shape), outs[1].view(x.shape)
    return outs.view(x.shape)
