"""Triton selective scan and fused bidirectional mixer core vs the float64 PyTorch reference (models/ops/ref.py).

The kernel tests run on a CUDA device (marker `gpu`). On a CPU machine one test re-runs a small subset of
them (marker `interp`) in a subprocess under Triton's interpreter (TRITON_INTERPRET=1, which must be set
before triton is imported), so the kernels' logic is checked by CI too. Errors are ‖out − ref‖ / ‖ref‖
against the reference evaluated in float64 on the same (already rounded) inputs.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import triton
import triton.language as tl

from models.ops import DirectionWeights, bimamba_inner, triton_conv, triton_scan
from models.ops import triton_math as fm
from models.ops.ref import selective_scan_ref
from models.ops.scan_launch import BWD_MAX_WAVES, BWD_PROGRAMS_PER_SM, ScanConfig, default_config
from models.ops.triton_conv import conv1d_silu_bidirectional
from models.ops.triton_scan import (
    _channel_sum_scattered,
    bidirectional_scan_triton,
    bimamba_inner_triton,
    selective_scan_triton,
)
from tests._interpreter import run_interp_subset

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel_device = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET), reason="needs a CUDA device (or TRITON_INTERPRET=1)"
)
# Output rounding dominates: one bf16/fp16 rounding of outputs and gradients, fp32 accumulation inside.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _nan_padded(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` at the start of a larger NaN-filled buffer: a kernel that reads past the
    tensor's end (an unmasked or half-masked load) picks up NaN instead of whatever the allocator left there."""
    buf = torch.full((t.numel() + 4096,), float("nan"), device=t.device, dtype=t.dtype)
    out = buf[: t.numel()].view(t.shape)
    out.copy_(t)
    return out


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like fill floating tensors with NaN, so an output element no kernel wrote, or a
    buffer read before it is written, shows up as NaN in the results rather than as allocator leftovers."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def _rel(a: torch.Tensor, ref: torch.Tensor, name: str = "out") -> float:
    """‖a − ref‖ / ‖ref‖, with a floor of 1e-4 rms on ‖ref‖ for gradients that are exactly 0 (dA at L = 1,
    where the kernel's a·h_prev = h − x leaves ~1e-10 rms of rounding on an H200)."""
    assert torch.isfinite(a).all(), f"non-finite values in kernel result {name}"
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-4 * ref.numel() ** 0.5)).item()


def _scan_inputs(Bsz, E, L, N, dtype, groups=0, gen=None):
    """Fresh random inputs at realistic scales (mamba init: A = -(1..N), dt in [1e-3, 1e-1])."""
    kw = dict(device=DEVICE, generator=gen)
    u = torch.randn(Bsz, E, L, **kw).to(dtype)
    delta = (0.5 * torch.randn(Bsz, E, L, **kw)).to(dtype)
    A = -torch.arange(1, N + 1, device=DEVICE, dtype=torch.float32).repeat(E, 1) * (
        0.5 + torch.rand(E, N, **kw))
    shape_BC = (Bsz, groups, N, L) if groups else (Bsz, N, L)
    B = torch.randn(shape_BC, **kw).to(dtype)
    C = torch.randn(shape_BC, **kw).to(dtype)
    D = torch.randn(E, **kw)
    z = torch.randn(Bsz, E, L, **kw).to(dtype)
    dt = torch.exp(torch.rand(E, **kw) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    return u, delta, A, B, C, D, z, delta_bias


def _time_major_nan_padded(t: torch.Tensor) -> torch.Tensor:
    """`t` (..., X, L) stored time-major, X contiguous (as the projections produce it), NaN past its end."""
    return _nan_padded(t.transpose(-1, -2).contiguous()).transpose(-1, -2)


def _check_scan(Bsz, E, L, N, dtype, use_D=True, use_z=True, use_bias=True, softplus=True, groups=0,
                config=None, time_major=False):
    gen = torch.Generator(DEVICE).manual_seed(1000 * L + N)
    u, delta, A, B, C, D, z, bias = _scan_inputs(Bsz, E, L, N, dtype, groups, gen)
    if not softplus:  # without softplus the caller guarantees delta > 0 (else exp(delta A) grows without bound)
        delta = torch.nn.functional.softplus(delta.float() + bias[:, None]).to(dtype)
    D, z, bias = (D if use_D else None), (z if use_z else None), (bias if use_bias else None)
    pad = [_nan_padded] * 8
    if time_major:  # u, delta, B, C, z
        for i in (0, 1, 3, 4, 6):
            pad[i] = _time_major_nan_padded
    args = [p(t) if t is not None else None for p, t in zip(pad, (u, delta, A, B, C, D, z, bias), strict=True)]
    leaves = [t.requires_grad_() if t is not None else None for t in args]
    out = selective_scan_triton(*leaves, delta_softplus=softplus, config=config)
    assert out.dtype == dtype and out.shape == u.shape
    dout = torch.randn(out.shape, device=DEVICE, generator=gen).to(dtype)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, dout)

    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    ref = selective_scan_ref(*leaves64, delta_softplus=softplus)
    grads64 = torch.autograd.grad(ref, [t for t in leaves64 if t is not None], dout.double())
    tol = TOL[dtype]
    assert _rel(out, ref) < tol
    names = [n for n, t in zip("u delta A B C D z delta_bias".split(), args, strict=True) if t is not None]
    for name, g, g64, t in zip(names, grads, grads64, present, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        if time_major and name in ("u", "delta", "z"):
            assert g.stride(-2) == 1, f"grad {name} is not in its input's time-major layout: {g.stride()}"
        err = _rel(g, g64, name)
        assert err < tol, f"grad {name}: rel err {err:.2e} > {tol}"


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("N", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scan_dtypes_and_state_sizes(dtype, N):
    _check_scan(2, 12, 301, N, dtype)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("L", [1, 63, 64, 65, 1000])
def test_scan_sequence_lengths(L):
    _check_scan(2, 8, L, 16, torch.float32)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", [
    pytest.param(True, True, True, True, marks=pytest.mark.interp),
    (False, False, False, False),
    (True, False, True, True),
    (False, True, False, True),
])
def test_scan_optional_inputs(use_D, use_z, use_bias, softplus):
    _check_scan(2, 6, 37, 16, torch.float32, use_D, use_z, use_bias, softplus)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("groups,N", [pytest.param(2, 4, marks=pytest.mark.interp), (4, 16)])
def test_scan_grouped_and_padded_state(groups, N):
    """Grouped B/C (B, G, N, L), and N = 4 (< the tile's minimum) exercises state padding."""
    _check_scan(2, 16, 45, N, torch.float32, groups=groups)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("param_dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.interp), torch.float16])
def test_scan_reads_low_precision_parameters(param_dtype):
    """A, D and delta_bias as a bf16/fp16 model stores them go into the kernels uncast (read into fp32 there):
    output and gradients match the float64 reference on the same rounded values, each gradient in its
    parameter's dtype."""
    gen = torch.Generator(DEVICE).manual_seed(7)
    u, delta, A, B, C, D, z, bias = _scan_inputs(2, 6, 37, 4, torch.float32, gen=gen)
    A, D, bias = (t.to(param_dtype) for t in (A, D, bias))
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    out = selective_scan_triton(*leaves, delta_softplus=True, config=SMALL_CHUNKS)
    dout = torch.randn(out.shape, device=DEVICE, generator=gen)
    grads = torch.autograd.grad(out, leaves, dout)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = selective_scan_ref(*l64, delta_softplus=True)
    grads64 = torch.autograd.grad(ref, l64, dout.double())
    assert _rel(out, ref) < TOL[torch.float32]
    for name, g, g64, t in zip("u delta A B C D z delta_bias".split(), grads, grads64, leaves, strict=True):
        assert g.dtype == t.dtype, name
        assert _rel(g, g64, name) < (TOL[param_dtype] if t.dtype == param_dtype else 1e-4), name


@pytest.mark.gpu
@needs_kernel_device
def test_scan_inference_matches_training_forward():
    u, delta, A, B, C, D, z, bias = _scan_inputs(2, 8, 130, 16, torch.bfloat16)
    with torch.no_grad():
        y_inf = selective_scan_triton(u, delta, A, B, C, D, z, bias, True)
    y_train = selective_scan_triton(u.requires_grad_(), delta, A, B, C, D, z, bias, True)
    torch.testing.assert_close(y_inf, y_train.detach(), rtol=0, atol=0)


def _direction_weights(E, N, R, W, gen):
    kw = dict(device=DEVICE, generator=gen)
    dt = torch.exp(torch.rand(E, **kw) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return DirectionWeights(
        conv_weight_EW=torch.randn(E, W, **kw) * 0.5,
        conv_bias_E=torch.randn(E, **kw) * 0.1,
        x_proj_weight=torch.randn(R + 2 * N, E, **kw) / math.sqrt(E),
        dt_proj_weight=torch.randn(E, R, **kw) / math.sqrt(R),
        dt_proj_bias=dt + torch.log(-torch.expm1(-dt)),
        A_log_EN=torch.log(torch.arange(1, N + 1, device=DEVICE, dtype=torch.float32)).repeat(E, 1),
        D_E=torch.ones(E, device=DEVICE) + 0.1 * torch.randn(E, **kw),
    )


def _check_bimamba(Bsz, E, L, N, R, dtype, tol, config=None, time_major=False):
    """time_major: x and z are the two halves of one (B, L, 2E) tensor, as models/bimamba.py passes in_proj's
    output; the output then comes back time-major too."""
    gen = torch.Generator(DEVICE).manual_seed(L)
    fwd, bwd = _direction_weights(E, N, R, 4, gen), _direction_weights(E, N, R, 4, gen)
    x = _nan_padded(torch.randn(Bsz, E, L, device=DEVICE, generator=gen).to(dtype))
    z = _nan_padded(torch.randn(Bsz, E, L, device=DEVICE, generator=gen).to(dtype))
    params = [_nan_padded(t).requires_grad_() for t in (*fwd, *bwd)]
    if time_major:
        xz = _nan_padded(torch.cat([x, z], dim=1).transpose(1, 2).contiguous()).requires_grad_()
        x_in, z_in = xz.transpose(1, 2).chunk(2, dim=1)
        leaves = [xz, *params]
    else:
        x_in, z_in = x.requires_grad_(), z.requires_grad_()
        leaves = [x_in, z_in, *params]
    out = bimamba_inner_triton(x_in, z_in, DirectionWeights(*params[:7]), DirectionWeights(*params[7:]),
                               config=config)
    dout = torch.randn(out.shape, device=DEVICE, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    if time_major:
        assert out.stride(1) == 1, f"output not time-major: {out.stride()}"
        grads = (*grads[0].transpose(1, 2).chunk(2, dim=1), *grads[1:])

    l64 = [t.detach().double().requires_grad_() for t in (x_in, z_in, *params)]
    ref = bimamba_inner(l64[0], l64[1], DirectionWeights(*l64[2:9]), DirectionWeights(*l64[9:]), backend="ref")
    grads64 = torch.autograd.grad(ref, l64, dout.double())
    assert out.dtype == dtype
    assert _rel(out, ref) < tol
    names = ["x", "z"] + [f"{d}.{f}" for d in ("fwd", "bwd") for f in DirectionWeights._fields]
    for name, g, g64 in zip(names, grads, grads64, strict=True):
        err = _rel(g, g64, name)
        assert err < tol, f"grad {name}: rel err {err:.2e} > {tol}"


# The kernels at small shapes, tiles as default_config's at N = 16 but a state saved every 16 steps (so odd
# L leave a partial saved chunk and a partial sub-tile).
SMALL_CHUNKS = ScanConfig(block_e_fwd=8, block_e_bwd=16, chunk=16, fwd_steps=8, bwd_sub_chunks=4)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("E,L,N,groups,dtype", [
    # E, L fill neither a block nor a chunk; N = 4 pads the state.
    pytest.param(6, 37, 4, 0, torch.float32, marks=pytest.mark.interp),
    (16, 45, 4, 2, torch.float32),  # grouped B/C
    (40, 301, 16, 0, torch.bfloat16),
    (12, 1000, 64, 0, torch.float32),
])
def test_scan_small_chunks(E, L, N, groups, dtype):
    # N = 64: a state saved every 4 steps (no sub-tiles), fewer channels a program.
    cfg = SMALL_CHUNKS if N <= 16 else ScanConfig(4, 4, chunk=4, num_warps_bwd=1, fwd_steps=4, bwd_sub_chunks=1)
    _check_scan(2, E, L, N, dtype, groups=groups, config=cfg)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_bimamba_inner_small_chunks(poison_empty, dtype, tol):
    _check_bimamba(2, 16, 301, 16, 3, dtype, tol, config=SMALL_CHUNKS)


def _split(fwd_steps: int, fwd_segments: int, bwd_segments: int, sub: int = 4, block_e: int = 16) -> ScanConfig:
    """L split into segments in both passes (a state saved every 16 steps); dB/dC summed as a reduce-scatter."""
    return ScanConfig(block_e, block_e, chunk=16, fwd_steps=fwd_steps, bwd_sub_chunks=sub,
                      fwd_segments=fwd_segments, bwd_segments=bwd_segments, bwd_scatter_sums=True)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("slots", [1, 0])
def test_scan_backward_shares_sm_scratch_slots(slots, monkeypatch):
    """More backward programs than the GPU holds at once (512 and 2048 here): they take turns on the SMs'
    scratch slots through locks. One slot an SM forces programs to wait for one; 0 gives each SM as many
    slots as it holds programs (here with the scratch budget that switches slots on lowered to 0)."""
    monkeypatch.setattr(triton_scan, "BWD_SCRATCH_BUDGET", 0)
    config = ScanConfig(4, 4, chunk=16, fwd_steps=8, bwd_sub_chunks=4, bwd_segments=4, bwd_sm_slots=slots)
    _check_scan(2 if slots else 8, 256, 301, 16, torch.bfloat16, config=config)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("E,L,N,groups,dtype,config", [
    # Odd E and L; more segments than saved chunks (L = 37 has 3): the surplus segments are dropped.
    pytest.param(6, 37, 4, 0, torch.float32, _split(4, 5, 5, sub=2, block_e=4), marks=pytest.mark.interp),
    pytest.param(8, 21, 16, 2, torch.float32, _split(8, 1, 2, sub=1, block_e=8), marks=pytest.mark.interp),
    (16, 45, 4, 2, torch.float32, _split(16, 3, 3)),  # grouped B/C, padded state
    (40, 301, 16, 0, torch.bfloat16, _split(8, 4, 7)),
    (24, 1569, 16, 0, torch.float32, _split(16, 16, 16)),
    (12, 1000, 64, 0, torch.float32, ScanConfig(4, 4, chunk=4, fwd_steps=4, bwd_sub_chunks=1, fwd_segments=8,
                                                bwd_segments=8)),
])
def test_scan_split_length(E, L, N, groups, dtype, config):
    """L split into segments: each segment's incoming state (adjoint) folds the summaries of the segments
    before (after) it."""
    _check_scan(2, E, L, N, dtype, groups=groups, config=config)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("E,L,N,groups,dtype,config", [
    pytest.param(6, 37, 4, 2, torch.float32, _split(4, 3, 3, sub=2, block_e=2), marks=pytest.mark.interp),
    (40, 301, 16, 0, torch.bfloat16, SMALL_CHUNKS),
    (48, 1569, 16, 0, torch.bfloat16, None),
])
def test_scan_time_major_layout(E, L, N, groups, dtype, config):
    """Inputs stored (B, L, E) / (B, L, N), as in_proj and x_proj produce them: the kernels read them through
    their strides, and the gradients come back in the same layout."""
    _check_scan(2, E, L, N, dtype, groups=groups, config=config, time_major=True)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("E,L,dtype,config", [
    pytest.param(6, 37, torch.float32, _split(4, 3, 3, sub=2, block_e=4), marks=pytest.mark.interp),
    (40, 1569, torch.bfloat16, None),
])
def test_bidirectional_scan_matches_two_reference_scans(E, L, dtype, config):
    """One call, both directions, no flipped copies == scan(forward) + flip(scan(flip(backward))), z gating
    both; outputs and every gradient against float64."""
    gen = torch.Generator(DEVICE).manual_seed(L)
    f_in, b_in = (_scan_inputs(2, E, L, 16, dtype, gen=gen) for _ in range(2))
    z = f_in[6]
    fwd = [f_in[i] for i in (0, 1, 2, 3, 4, 5, 7)]  # u, delta, A, B, C, D, delta_bias
    bwd = [b_in[i] for i in (0, 1, 2, 3, 4, 5, 7)]
    leaves = [_nan_padded(t).requires_grad_() for t in (*fwd, *bwd, z)]
    out = bidirectional_scan_triton(tuple(leaves[:7]), tuple(leaves[7:14]), leaves[14], True, config=config)
    dout = torch.randn(out.shape, device=DEVICE, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    l64 = [t.detach().double().requires_grad_() for t in leaves]
    u, delta, A, B, C, D, bias = l64[7:14]
    flip = lambda t: t.flip(-1)  # noqa: E731
    ref = selective_scan_ref(*l64[:5], D=l64[5], z=l64[14], delta_bias=l64[6], delta_softplus=True) + flip(
        selective_scan_ref(flip(u), flip(delta), A, flip(B), flip(C), D=D, z=flip(l64[14]), delta_bias=bias,
                           delta_softplus=True))
    grads64 = torch.autograd.grad(ref, l64, dout.double())
    tol = TOL[dtype]
    assert _rel(out, ref) < tol
    names = [f"{d}.{n}" for d in ("fwd", "bwd") for n in ("u", "delta", "A", "B", "C", "D", "delta_bias")] + ["z"]
    for name, g, g64 in zip(names, grads, grads64, strict=True):
        err = _rel(g, g64, name)
        assert err < tol, f"grad {name}: rel err {err:.2e} > {tol}"


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("Bsz,E,L,dtype,tol,config", [
    pytest.param(2, 6, 37, torch.float32, 1e-4, None, marks=pytest.mark.interp),
    (2, 16, 301, torch.bfloat16, 3e-2, SMALL_CHUNKS),
    (2, 32, 1569, torch.float32, 1e-4, None),
])
def test_bimamba_inner_time_major(poison_empty, Bsz, E, L, dtype, tol, config):
    """x and z as time-major halves of in_proj's output: conv, projections, scans and output keep that layout."""
    _check_bimamba(Bsz, E, L, 16, 3, dtype, tol, config=config, time_major=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-by-side forwards run on CUDA only")
def test_bimamba_inner_side_by_side_forward_is_deterministic():
    """With a time-major output the two directions' forwards run at once and add into it atomically, in whatever
    order they arrive (_launch_directions). Two 16-bit values added into zero round the same either way, so
    repeated calls must agree bit for bit, with the model's split 64-frame launch too."""
    gen = torch.Generator(DEVICE).manual_seed(0)
    E, L = 64, 3137  # L split into segments by default_config at this row count
    fwd, bwd = _direction_weights(E, 16, 4, 4, gen), _direction_weights(E, 16, 4, 4, gen)
    xz = torch.randn(2, L, 2 * E, device=DEVICE, generator=gen).to(torch.bfloat16)
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        outs = [bimamba_inner_triton(x, z, DirectionWeights(*fwd), DirectionWeights(*bwd)) for _ in range(5)]
    assert outs[0].stride(1) == 1, "the output should be time-major, the side-by-side layout"
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_bimamba_inner_split_length(poison_empty, dtype, tol):
    # The reverse direction walks the segments from the end of L.
    _check_bimamba(2, 16, 301, 16, 3, dtype, tol, config=_split(8, 3, 4))


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("Bsz,E,L,dtype,tol", [
    # Odd sizes: E = 6 fills neither a conv block (16) nor a scan block (4); L = 37 neither a chunk (16) nor
    # a conv block (128). With NaN past every input, the first of these caught the conv backward reading
    # x beyond its end (non-finite conv weight gradients of the last channel, issue 4).
    pytest.param(2, 6, 37, torch.float32, 1e-4, marks=pytest.mark.interp),
    pytest.param(1, 6, 21, torch.bfloat16, 5e-2, marks=pytest.mark.interp),  # 21 steps: little averaging
    (2, 16, 1569, torch.float32, 1e-4),
    (2, 16, 1569, torch.bfloat16, 3e-2),
])
def test_bimamba_inner_matches_reference(poison_empty, Bsz, E, L, dtype, tol):
    # fp32 tolerance covers tf32-free cuBLAS vs fp64 through x_proj/dt_proj and the 2-direction sum.
    _check_bimamba(Bsz, E, L, 16, 3, dtype, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_videomamba_bf16_masked_grads_match_fp32_reference():
    """A whole (small) VideoMamba in bf16 weights on the Triton backend, with a token keep mask, against the
    same weights in fp32 on the reference backend: every parameter gradient finite and as close as the
    reference backend itself gets in bf16 (the yardstick for bf16 rounding through the network)."""
    from models.videomamba import videomamba_test

    torch.manual_seed(0)
    arch = dict(embed_dim=64, depth=2, img_size=64, num_frames=8)  # 8 x 16 patches + CLS = 129 tokens
    models = {
        "triton": videomamba_test(scan_backend="triton", **arch).cuda(),
        "ref bf16": videomamba_test(scan_backend="ref", **arch).cuda(),
        "ref fp32": videomamba_test(scan_backend="ref", **arch).cuda(),
    }
    for m in models.values():
        m.load_state_dict(models["triton"].state_dict())
    models["triton"].bfloat16()
    models["ref bf16"].bfloat16()
    # fp32 reference on exactly the bf16-rounded weights.
    models["ref fp32"].load_state_dict({k: v.float() for k, v in models["triton"].state_dict().items()})
    video = torch.randn(2, 3, 8, 64, 64, device="cuda")
    keep = torch.zeros(2, 128, dtype=torch.bool, device="cuda")
    for row in keep:
        row[torch.randperm(128, device="cuda")[:75]] = True  # 1 + 75 tokens: no block size divides it
    dout = torch.randn(2, 76, 64, device="cuda")
    grads = {}
    for name, m in models.items():
        dtype = next(m.parameters()).dtype
        tokens = m.forward_features(video.to(dtype), keep).tokens_BLD
        tokens.backward(dout.to(dtype))
        grads[name] = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["ref fp32"].keys()
    for k, g in grads["triton"].items():
        ref = grads["ref fp32"][k].double()
        err = _rel(g, ref, k)
        yardstick = _rel(grads["ref bf16"][k], ref, k)
        assert err <= max(3 * yardstick, 2e-2), f"grad {k}: rel err {err:.2e} (ref backend in bf16: {yardstick:.2e})"


def test_kernels_under_triton_interpreter():
    """CPU CI: the `interp` subset above, run by Triton's interpreter in a fresh interpreter process."""
    run_interp_subset(__file__, expected_passed=16, timeout_s=600)


@triton.jit
def _channel_sum_kernel(x_ptr, out_ptr, T: tl.constexpr, N: tl.constexpr, E: tl.constexpr):
    t = tl.arange(0, T)[:, None, None]
    n = tl.arange(0, N)[None, :, None]
    e = tl.arange(0, E)
    x = tl.load(x_ptr + (t * N + n) * E + e[None, None, :])
    sums, rows, owner = _channel_sum_scattered(x, e)
    tl.store(out_ptr + rows * N + n, sums, mask=owner & (n < N))


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("W,time_major,L,programs", [
    pytest.param(2, True, 37, None, marks=pytest.mark.interp),
    pytest.param(4, True, 2, None, marks=pytest.mark.interp),  # L shorter than the taps' reach
    pytest.param(3, True, 37, 4, marks=pytest.mark.interp),  # 2 segments of 20 steps: several iterations each
    (3, False, 37, None), (4, True, 37, None), (4, False, 203, 4),
])
def test_conv_bidirectional_matches_torch_conv(W, time_major, L, programs, monkeypatch):
    """Both directions' conv + SiLU and all their gradients against torch's conv1d in float64: the backward
    kernel takes narrower convs as 4-tap ones with zero oldest taps. E = 20 and L = 37 fill neither a channel
    block nor a tile; NaN lies past x. The backward's L segments (each computing the 3 steps either side for
    dx, and summing the weight gradients over its own steps) are 4 steps long at the default launch, or
    longer with `programs` (fewer programs aimed at)."""
    if programs is not None:
        monkeypatch.setattr(triton_conv, "_BWD_PROGRAMS", programs)
    gen = torch.Generator(DEVICE).manual_seed(W)
    Bsz, E = 2, 20
    x = torch.randn(Bsz, E, L, device=DEVICE, generator=gen)
    if time_major:
        x = _nan_padded(x.transpose(1, 2).contiguous()).transpose(1, 2)
    else:
        x = _nan_padded(x)
    weights = [torch.randn(*shape, device=DEVICE, generator=gen) * 0.5 for shape in ((E, W), (E,), (E, W), (E,))]
    dout = [torch.randn(Bsz, E, L, device=DEVICE, generator=gen) for _ in range(2)]
    leaves = [x.requires_grad_(), *(w.requires_grad_() for w in weights)]
    outs = conv1d_silu_bidirectional(*leaves)
    grads = torch.autograd.grad(outs, leaves, dout)

    def torch_conv(x, w, b):  # causal depthwise conv + SiLU
        return torch.nn.functional.silu(torch.nn.functional.conv1d(x, w[:, None, :], b, padding=W - 1,
                                                                   groups=E)[..., :L])

    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = (torch_conv(l64[0], l64[1], l64[2]), torch_conv(l64[0].flip(-1), l64[3], l64[4]).flip(-1))
    grads64 = torch.autograd.grad(ref, l64, [d.double() for d in dout])
    for name, got, want in zip(("u_f", "u_b"), outs, ref, strict=True):
        assert _rel(got, want, name) < 1e-5, name
    for name, g, g64 in zip(("x", "w_f", "b_f", "w_b", "b_b"), grads, grads64, strict=True):
        assert g.shape == g64.shape, name
        assert _rel(g, g64, name) < 1e-5, f"grad {name}: rel err {_rel(g, g64, name):.2e}"


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("T,E", [pytest.param(4, 16, marks=pytest.mark.interp), (8, 8), (16, 4), (2, 32)])
def test_channel_sum_scattered_matches_sum(T, E):
    """The backward's reduce-scatter over channels (dB, dC) gives every row's channel sum exactly once:
    fewer rows than channels, as many, and more."""
    x = torch.randn(T, 4, E, device=DEVICE)
    out = torch.full((T, 4), float("nan"), device=DEVICE)
    _channel_sum_kernel[(1,)](x, out, T=T, N=4, E=E)
    torch.testing.assert_close(out, x.sum(dim=2), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    u = torch.randn(1, 4, 8)
    A = -torch.ones(4, 2)
    B = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="u and delta"):
        selective_scan_triton(u, u[:, :, :4], A, B, B)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_triton(u, u, A[:3], B, B)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_triton(u, u, A, B[:, :, :4], B)
    with pytest.raises(ValueError, match="groups"):
        selective_scan_triton(u, u, A, torch.randn(1, 3, 2, 8), B)
    if not INTERPRET:
        with pytest.raises(ValueError, match="CUDA"):
            selective_scan_triton(u, u, A, B, B)
    wide = torch.randn(4, 5)
    with pytest.raises(ValueError, match="conv width 5"):
        conv1d_silu_bidirectional(u, wide, None, wide, None)


def test_default_config_keeps_tiles_small():
    for n, rows, time_major in itertools.product((1, 4, 16, 32, 64, 128), (4, 1536, 12288, 24576), (False, True)):
        cfg = default_config(n, rows, time_major)
        block_n = max(2, 1 << (n - 1).bit_length())
        assert 4 <= cfg.chunk <= 64 and cfg.chunk & (cfg.chunk - 1) == 0
        # fp32 tiles of at most 64 values a thread (forward) and 32 (backward, which holds more at once).
        assert cfg.block_e_fwd * block_n * cfg.fwd_steps <= 64 * 32 * cfg.num_warps_fwd, (n, cfg)
        per_thread = cfg.block_e_bwd * block_n * (cfg.chunk // cfg.bwd_sub_chunks) // (32 * cfg.num_warps_bwd)
        assert per_thread <= 32, (n, rows, cfg)
        # L is split into a bounded number of segments, only as far as BWD_MAX_WAVES waves of programs.
        assert 1 <= cfg.fwd_segments <= 64 and 1 <= cfg.bwd_segments <= 64
        wave = 132 * BWD_PROGRAMS_PER_SM
        programs = -(-rows // cfg.block_e_bwd)
        assert cfg.bwd_segments == 1 or -(-programs * cfg.bwd_segments // wave) <= BWD_MAX_WAVES, (rows, cfg)
        # The dB/dC reduce-scatter goes with the 4-step backward tile (it was slower with 8 x 8).
        assert cfg.bwd_scatter_sums == (cfg.chunk // cfg.bwd_sub_chunks == 4), cfg


def _bwd_launch(rows: int, length: int) -> tuple[int, int, int]:
    cfg = default_config(16, rows, True, length=length)
    return cfg.block_e_bwd, cfg.chunk // cfg.bwd_sub_chunks, cfg.bwd_segments


def test_default_config_backward_model_picks_the_measured_best():
    """The wave model against the backward launch sweeps (H100, 2026-11-26, bwd ms): M 8f b16, where 16 x 4 in 4
    segments beat 8 x 8 unsplit by 18% (2.11 against 2.58); Ti 8f b64, where 8 x 8 unsplit won (2.63 against
    2.77 for 16 x 4 in 2); S 8f b16, where a split gained 3% for 5 MB more scratch; Ti 64f b4, whose 96
    programs in one full wave of 132 x 8 (11 segments) took 1.62 ms against 1.43 for 22 segments."""
    assert _bwd_launch(16 * 1152, 1569) == (16, 4, 4)
    assert _bwd_launch(64 * 384, 1569) == (8, 8, 1)
    assert _bwd_launch(16 * 768, 1569) == (16, 4, 1)
    assert _bwd_launch(4 * 384, 12545) == (16, 4, 22)
    # Segments are whole saved chunks: a short L is split only as far as its chunks go.
    assert _bwd_launch(4 * 384, 100)[2] <= 2
    # A GPU with fewer SMs needs fewer segments to fill its waves.
    assert default_config(16, 4 * 384, True, length=12545, sm_count=66).bwd_segments < 22


def test_default_config_caps_time_major_forward_registers():
    """The register-cap sweep (H100, 2026-11-26): the time-major forward at 168 registers with >= 8 programs an SM
    (M 8f b16: 1152 programs), else at 224 (S 8f b16: 768); the (B, E, L) forward uncapped."""
    assert default_config(16, 16 * 1152, True, length=1569, sm_count=132).fwd_max_registers == 168
    assert default_config(16, 16 * 768, True, length=1569, sm_count=132).fwd_max_registers == 224
    assert default_config(16, 4 * 384, True, length=12545, sm_count=132).fwd_max_registers == 168  # split L
    assert default_config(16, 16 * 768, False, length=1569, sm_count=132).fwd_max_registers == 0
    # Split time-major forwards fill one wave of 12 programs an SM (run 10): Ti 64f b4 16 segments, S 64f b4 8.
    assert default_config(16, 4 * 384, True, length=12545, sm_count=132).fwd_segments == 16
    assert default_config(16, 4 * 768, True, length=12545, sm_count=132).fwd_segments == 8
    assert default_config(16, 4 * 384, False, length=12545, sm_count=132).fwd_segments == 32


def test_scan_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="bwd_sub_chunks"):
        ScanConfig(1, 4, chunk=16, bwd_sub_chunks=3)
    with pytest.raises(ValueError, match="fwd_steps"):
        ScanConfig(1, 4, chunk=16, fwd_steps=6)
    with pytest.raises(ValueError, match="segments"):
        ScanConfig(1, 4, chunk=16, bwd_sub_chunks=4, fwd_segments=0)
    with pytest.raises(ValueError, match="bwd_scatter_sums"):
        ScanConfig(1, 128, chunk=16, bwd_sub_chunks=4, bwd_scatter_sums=True)
    with pytest.raises(ValueError, match="bwd_sm_slots"):
        ScanConfig(1, 4, chunk=16, bwd_sub_chunks=4, bwd_sm_slots=-1)
    for cap in (-1, 16, 300):
        with pytest.raises(ValueError, match="fwd_max_registers"):
            ScanConfig(1, 4, chunk=16, bwd_sub_chunks=4, fwd_max_registers=cap)


@triton.jit
def _fast_math_kernel(x_ptr, softplus_ptr, slope_ptr, sigmoid_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x = fm.upcast(tl.load(x_ptr + i, mask=ok, other=0.0))
    softplus, e = fm.softplus_and_exp(x)
    tl.store(softplus_ptr + i, softplus, mask=ok)
    tl.store(slope_ptr + i, e / (1.0 + e), mask=ok)
    tl.store(sigmoid_ptr + i, fm.sigmoid(x), mask=ok)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.interp), torch.float16,
                                   torch.float32])
def test_fast_math_matches_torch(dtype):
    """triton_math's softplus (log1p's series below e^x = 1/8, the hardware lg2 above, x itself above 20), its
    e^x-derived slope, sigmoid (hardware ex2 and rcp) and 16-bit upcast, elementwise against torch in float64
    over the range delta and the gate take, both sides of the series' switch (x = ln 1/8) and of 20."""
    edges = torch.tensor([math.log(0.125), 20.0])
    x = torch.cat([torch.linspace(-30, 30, 6001), edges, edges.nextafter(torch.tensor(-math.inf)),
                   edges.nextafter(torch.tensor(math.inf))]).to(dtype).to(DEVICE)
    outs = [torch.full(x.shape, float("nan"), device=DEVICE) for _ in range(3)]
    _fast_math_kernel[(triton.cdiv(x.numel(), 1024),)](x, *outs, x.numel(), BLOCK=1024)
    x64 = x.double()
    want_sp = torch.where(x64 <= 20, torch.nn.functional.softplus(x64, threshold=1000), x64)
    for name, got, want in (("softplus", outs[0], want_sp), ("slope", outs[1], torch.sigmoid(x64.clamp(max=20))),
                            ("sigmoid", outs[2], torch.sigmoid(x64))):
        rel = ((got.double() - want).abs() / want.abs()).max().item()
        # H100: 1.7e-6 at most for all three, at x near -30 (ex2.approx's error grows with |x log2 e|).
        assert rel < 3e-6, f"{name}: max relative error {rel:.2e}"
