"""The kernel seam's reference backend against independent fp64 step-by-step definitions, and its dispatch."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from models import ops
from models.ops import ref


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan written as its recurrence, one step at a time, in fp64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bsz, E, L = u.shape
    if B.dim() == 4:  # grouped: group g serves channels [g*E/G, (g+1)*E/G)
        B, C = (t.repeat_interleave(E // t.shape[1], dim=1) for t in (B, C))
    else:
        B, C = B[:, None], C[:, None]
    h = torch.zeros(Bsz, E, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * u[:, :, t, None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


def naive_causal_conv(x, w, b=None, silu=False):
    """out[t] = b + sum_k w[k] * x[t - W + 1 + k], zero before the start."""
    W = w.shape[1]
    out = torch.zeros_like(x) if b is None else b[:, None].expand_as(x).clone()
    for k in range(W):
        shift = W - 1 - k
        out[..., shift:] += w[:, k, None] * x[..., : x.shape[-1] - shift]
    return F.silu(out) if silu else out


def scan_inputs(Bsz=2, E=8, L=50, N=4, groups=0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_BC = (Bsz, groups, N, L) if groups else (Bsz, N, L)
    return dict(
        u=torch.randn(Bsz, E, L, generator=g, dtype=dtype),
        delta=torch.randn(Bsz, E, L, generator=g, dtype=dtype) * 0.5,
        A=-torch.rand(E, N, generator=g, dtype=dtype) * 4,
        B=torch.randn(*shape_BC, generator=g, dtype=dtype),
        C=torch.randn(*shape_BC, generator=g, dtype=dtype),
        D=torch.randn(E, generator=g, dtype=dtype),
        z=torch.randn(Bsz, E, L, generator=g, dtype=dtype),
        delta_bias=torch.randn(E, generator=g, dtype=dtype) * 0.5,
    )


VARIANTS = {
    "plain": dict(drop=("D", "z", "delta_bias"), softplus=False, groups=0),
    "full": dict(drop=(), softplus=True, groups=0),
    "grouped": dict(drop=(), softplus=True, groups=2),
    "bias_only": dict(drop=("D", "z"), softplus=True, groups=0),
}


def variant_inputs(name, **kw):
    v = VARIANTS[name]
    args = scan_inputs(groups=v["groups"], **kw)
    if not v["softplus"]:
        args["delta"] = args["delta"].abs()  # without softplus, delta must stay positive for a decaying state
    for key in v["drop"]:
        args[key] = None
    return args, v["softplus"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("L,chunk", [(50, 64), (130, 16), (37, 5)])
def test_selective_scan_ref_matches_stepwise_fp64(variant, L, chunk):
    args, softplus = variant_inputs(variant, L=L)
    expected = naive_scan(**args, delta_softplus=softplus)
    got = ref.selective_scan_ref(**args, delta_softplus=softplus, chunk=chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    got64 = ref.selective_scan_ref(**{k: (v.double() if v is not None else None) for k, v in args.items()},
                                   delta_softplus=softplus, chunk=chunk)
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-12)


def test_selective_scan_carries_state_across_segments(monkeypatch):
    args, _ = variant_inputs("full", L=90)
    expected = naive_scan(**args, delta_softplus=True)
    monkeypatch.setattr(ref, "SEGMENT_LEN", 32)  # 3 segments of which the last is partial
    got = ops.selective_scan(**args, delta_softplus=True, backend="ref")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_selective_scan_keeps_bf16_io_and_fp32_math():
    args, _ = variant_inputs("full", L=40)
    args = {k: v.bfloat16() for k, v in args.items()}
    got = ops.selective_scan(**args, delta_softplus=True, backend="ref")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), naive_scan(**args, delta_softplus=True), rtol=1e-2, atol=1e-2)


def test_grouped_bf16_B_C_gradients_are_rounded_once_after_the_group_sum():
    """A group's B/C gradient sums E/G channels' contributions: summed in fp32 and rounded to bf16 once, it is the
    fp64 gradient rounded to bf16; rounding each channel's share before the sum lost up to a few ulps."""
    args, _ = variant_inputs("grouped", Bsz=2, E=64, L=16, N=4)  # 32 channels per group
    args = {k: (v.bfloat16() if k in ("B", "C") else v) for k, v in args.items()}
    args["B"].requires_grad_()
    args["C"].requires_grad_()
    y = ref.selective_scan_ref(**args, delta_softplus=True)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    B_grad, C_grad = torch.autograd.grad(y, (args["B"], args["C"]), grad_y)
    exact = {k: v.detach().double().requires_grad_() for k, v in args.items() if v is not None}
    expected = torch.autograd.grad(naive_scan(**exact, delta_softplus=True), (exact["B"], exact["C"]), grad_y.double())
    for got, want in zip((B_grad, C_grad), expected, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)


def test_selective_scan_gradcheck_fp64():
    args, _ = variant_inputs("grouped", Bsz=1, E=4, L=7, N=3, dtype=torch.float64)
    names = list(args)
    tensors = [args[k].requires_grad_() for k in names]

    def fn(*ts):
        return ref.selective_scan_ref(**dict(zip(names, ts, strict=True)), delta_softplus=True, chunk=3)

    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


def test_causal_conv1d_ref_matches_shifted_sum():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 6, 20, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    torch.testing.assert_close(ops.causal_conv1d(x, w, b, "silu", backend="ref"), naive_causal_conv(x, w, b, True))
    torch.testing.assert_close(ops.causal_conv1d(x, w, backend="ref"), naive_causal_conv(x, w))
    with pytest.raises(ValueError, match="activation"):
        ops.causal_conv1d(x, w, b, "relu")


def test_rms_norm_add_prenorm_fp32_residual():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=g).bfloat16()
    residual = torch.randn(2, 5, 16, generator=g)
    weight = torch.randn(16, generator=g)
    out, res = ops.rms_norm(x, weight, eps=1e-5, residual=residual, prenorm=True)
    summed = x.double() + residual.double()
    expected = summed / torch.sqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float32
    torch.testing.assert_close(res.double(), summed)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)
    plain = ops.rms_norm(x.float(), weight)
    xd = x.double()
    torch.testing.assert_close(plain.double(), xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
                               * weight.double(), rtol=1e-5, atol=1e-5)


def direction_weights(E, N, R, W, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return ops.DirectionWeights(
        conv_weight_EW=torch.randn(E, W, generator=g, dtype=dtype) * 0.5,
        conv_bias_E=torch.randn(E, generator=g, dtype=dtype) * 0.1,
        x_proj_weight=torch.randn(R + 2 * N, E, generator=g, dtype=dtype) * 0.3,
        dt_proj_weight=torch.randn(E, R, generator=g, dtype=dtype) * 0.3,
        dt_proj_bias=torch.randn(E, generator=g, dtype=dtype) * 0.3,
        A_log_EN=torch.log(torch.rand(E, N, generator=g, dtype=dtype) * 3 + 0.5),
        D_E=torch.randn(E, generator=g, dtype=dtype),
    )


def explicit_direction(x, z, w):
    """One direction, spelled out with the naive conv and scan (independent of models.ops)."""
    N, R = w.A_log_EN.shape[1], w.dt_proj_weight.shape[1]
    u = naive_causal_conv(x, w.conv_weight_EW, w.conv_bias_E, silu=True)
    x_dbl = torch.einsum("fe,bel->bfl", w.x_proj_weight, u)
    dt, B, C = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
    delta = torch.einsum("er,brl->bel", w.dt_proj_weight, dt)
    return naive_scan(u, delta, -torch.exp(w.A_log_EN), B, C, w.D_E, z, w.dt_proj_bias, delta_softplus=True)


def test_bimamba_inner_ref_matches_two_explicit_directions():
    E, N, R, W, L = 6, 4, 2, 4, 23
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(2, E, L, generator=g, dtype=torch.float64), torch.randn(2, E, L, generator=g,
                                                                               dtype=torch.float64)
    fwd, bwd = direction_weights(E, N, R, W, 4), direction_weights(E, N, R, W, 5)
    expected = explicit_direction(x, z, fwd) + explicit_direction(x.flip(-1), z.flip(-1), bwd).flip(-1)
    got = ops.bimamba_inner(x, z, fwd, bwd, backend="ref")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # The backward direction really sees the reversed sequence: swapping the weights changes the result.
    assert not torch.allclose(ops.bimamba_inner(x, z, bwd, fwd, backend="ref"), got)


def test_bimamba_inner_gradcheck_fp64():
    E, N, R, W, L = 2, 2, 1, 3, 6
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, E, L, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, E, L, generator=g, dtype=torch.float64, requires_grad=True)
    fwd = [t.requires_grad_() for t in direction_weights(E, N, R, W, 7)]
    bwd = [t.requires_grad_() for t in direction_weights(E, N, R, W, 8)]

    def fn(x, z, *ws):
        return ops.bimamba_inner(x, z, ops.DirectionWeights(*ws[:7]), ops.DirectionWeights(*ws[7:]), "ref")

    assert torch.autograd.gradcheck(fn, [x, z, *fwd, *bwd], fast_mode=True)


def test_backend_dispatch_on_cpu():
    x = torch.zeros(1, 2, 3)
    assert "ref" in ops.available_backends()
    assert ops.resolve_backend("auto", x) == "ref"
    with pytest.raises(ValueError, match="auto, ref, triton, cuda"):
        ops.resolve_backend("fast", x)
    if not torch.cuda.is_available():
        assert ops.available_backends() == ["ref"]
        with pytest.raises(RuntimeError, match="CUDA device"):
            ops.resolve_backend("cuda", x)
        with pytest.raises((RuntimeError, ValueError), match="triton"):
            ops.resolve_backend("triton", x)


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba-ssm is not installed")
def test_matches_mamba_ssm_selective_scan_ref():
    """mamba-ssm's own reference as an external check. Its package imports a CUDA extension unguarded, so it
    runs in a subprocess with a stub module standing in for the extension (the stub must not leak here)."""
    script = textwrap.dedent("""
        import sys, types, torch
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as theirs
        from models.ops.ref import selective_scan_ref as ours
        sys.path.insert(0, "tests/unit")
        from test_ops import variant_inputs
        for variant in ("plain", "full", "grouped"):
            args, softplus = variant_inputs(variant, L=70)
            a = ours(**args, delta_softplus=softplus, chunk=16)
            b = theirs(**args, delta_softplus=softplus)
            err = (a - b).abs().max().item()
            assert err < 1e-4, (variant, err)
            print(variant, err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\n") == 3, done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backend_matches_ref_through_the_seam(backend):
    """Each GPU backend against the reference on the same CUDA tensors: the mixer core, forward and grads."""
    if backend not in ops.available_backends():
        pytest.skip(f"the {backend!r} backend is not installed on this machine")
    E, N, R, W, L = 384, 16, 12, 4, 1569
    g = torch.Generator().manual_seed(9)
    x, z = (torch.randn(2, E, L, generator=g).cuda().bfloat16().requires_grad_() for _ in range(2))
    weights = [direction_weights(E, N, R, W, s, dtype=torch.float32) for s in (10, 11)]
    results = []
    for name in ("ref", backend):
        fwd, bwd = ([t.detach().cuda().requires_grad_() for t in w] for w in weights)
        x.grad = z.grad = None
        y = ops.bimamba_inner(x, z, ops.DirectionWeights(*fwd), ops.DirectionWeights(*bwd), backend=name)
        y.float().square().mean().backward()
        results.append([y.detach().float(), x.grad.float(), z.grad.float()] + [t.grad for t in fwd + bwd])
    names = ["y", "dx", "dz"] + [f"d{d}.{f}" for d in ("fwd", "bwd") for f in ops.DirectionWeights._fields]
    for name, ref_t, got in zip(names, *results, strict=True):
        rel = ((got - ref_t).norm() / ref_t.norm()).item()
        assert rel < 5e-2, (name, rel)  # bf16 activations: both sides round differently (conv, projections)
