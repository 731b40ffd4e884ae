"""Fused Triton Add -> RMSNorm (models/ops/triton_norm.py) vs the float64 PyTorch reference (rms_norm_ref).

Kernel tests run on a CUDA device (marker `gpu`); a small subset (marker `interp`) is re-run on CPU machines
in a subprocess under Triton's interpreter, as tests/gpu/test_triton_scan.py does. Inputs sit at the start of
NaN-filled buffers and torch.empty returns NaN-filled tensors, so an out-of-bounds read or an unwritten output
shows up as NaN. Errors are ‖out − ref‖ / ‖ref‖ against the reference evaluated in float64 on the same
(already rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

from models import ops
from models.ops.ref import rms_norm_ref
from models.ops.triton_norm import MAX_D, add_rms_norm_triton
from tests._interpreter import run_interp_subset
from tests.gpu.test_triton_scan import DEVICE, INTERPRET, TOL, _nan_padded, _rel, needs_kernel_device, poison_empty

__all__ = ["poison_empty"]  # a fixture: pytest finds it in this module's namespace

EPS = 1e-5


def _check_norm(shape, dtype, has_res, prenorm, *, res_dtype=torch.float32, w_dtype=torch.float32,
                residual_in_fp32=True, grad_on_out=True, grad_on_residual=True, bwd_programs=None):
    """Forward outputs (values and dtypes) and the gradients of x, weight and residual against the reference,
    with random gradients on the normed output and (prenorm) on the returned residual stream."""
    gen = torch.Generator(DEVICE).manual_seed(shape[-1] * 1000 + len(shape))
    D = shape[-1]
    x = _nan_padded(torch.randn(shape, device=DEVICE, generator=gen).to(dtype))
    w = _nan_padded((1 + 0.3 * torch.randn(D, device=DEVICE, generator=gen)).to(w_dtype))
    # A residual stream larger than the new input, as deep in the network.
    res = _nan_padded((3 * torch.randn(shape, device=DEVICE, generator=gen)).to(res_dtype)) if has_res else None
    leaves = [t.requires_grad_() for t in (x, w, res) if t is not None]
    outs = add_rms_norm_triton(x, w, EPS, res, prenorm, residual_in_fp32, bwd_programs=bwd_programs)
    outs = outs if prenorm else (outs,)

    l64 = [t.detach().double().requires_grad_() for t in leaves]
    refs = rms_norm_ref(l64[0], l64[1], EPS, l64[2] if has_res else None, prenorm, residual_in_fp32)
    refs = refs if prenorm else (refs,)
    s_dtype = torch.float32 if residual_in_fp32 else dtype
    for name, o, r, want_dtype in zip(("out", "residual_out")[:len(outs)], outs, refs, (dtype, s_dtype)[:len(outs)],
                                      strict=True):
        assert o.shape == x.shape and o.dtype == want_dtype, (name, o.shape, o.dtype)
        assert _rel(o, r, name) < TOL[dtype], name

    used = [i for i, on in enumerate((grad_on_out, grad_on_residual)) if on and i < len(outs)]
    gouts = [torch.randn(x.shape, device=DEVICE, generator=gen).to(outs[i].dtype) for i in used]
    grads = torch.autograd.grad([outs[i] for i in used], leaves, gouts, allow_unused=True)
    grads64 = torch.autograd.grad([refs[i] for i in used], l64, [g.double() for g in gouts], allow_unused=True)
    for name, g, g64, t in zip(("x", "weight", "residual")[:len(leaves)], grads, grads64, leaves, strict=True):
        if g64 is None:  # weight, when only the returned residual gets a gradient
            assert g is None, name
            continue
        assert g.shape == t.shape and g.dtype == t.dtype, (name, g.shape, g.dtype)
        err = _rel(g, g64, name)
        assert err < TOL[dtype], f"grad {name}: rel err {err:.2e} > {TOL[dtype]}"


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("dtype,D", [
    *((dtype, D) for dtype in (torch.float32, torch.bfloat16, torch.float16) for D in (37, 192, 384, 1000, 1024)
      if (dtype, D) not in ((torch.bfloat16, 192), (torch.float32, 1000))),
    pytest.param(torch.bfloat16, 192, marks=pytest.mark.interp),
    pytest.param(torch.float32, 1000, marks=pytest.mark.interp),
])
def test_add_norm_dtypes_and_widths(poison_empty, dtype, D):
    """VideoMamba's call (residual given, prenorm, fp32 stream) at odd and model widths, 3 x 333 rows."""
    _check_norm((3, 333, D), dtype, has_res=True, prenorm=True)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_res,prenorm", [
    pytest.param(True, True, marks=pytest.mark.interp),
    pytest.param(False, False, marks=pytest.mark.interp),
    (False, True),  # the first block: the residual stream starts as x in fp32
    (True, False),
])
def test_residual_and_prenorm_variants(poison_empty, dtype, has_res, prenorm):
    # 3 x 7 rows of 37: neither rows nor D fill a tile; one backward program loops over both row tiles.
    _check_norm((3, 7, 37), dtype, has_res, prenorm, bwd_programs=1)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("rows,bwd_programs", [
    (1, None), pytest.param(999, None, marks=pytest.mark.interp), (4097, 3), (25104, None)])
def test_row_counts_and_weight_partials(poison_empty, rows, bwd_programs):
    """Odd row counts, and backward programs owning many row tiles each (d weight partial sums)."""
    _check_norm((rows, 192), torch.bfloat16, True, True, bwd_programs=bwd_programs)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("w_dtype,res_dtype,residual_in_fp32", [
    pytest.param(torch.bfloat16, torch.float32, True, marks=pytest.mark.interp),  # model.bfloat16() weights
    pytest.param(torch.float32, torch.bfloat16, False, marks=pytest.mark.interp),  # bf16 residual stream
    (torch.bfloat16, torch.bfloat16, True),  # bf16 residual in, fp32 stream out
])
def test_weight_and_residual_dtypes(poison_empty, w_dtype, res_dtype, residual_in_fp32):
    _check_norm((5, 9, 100), torch.bfloat16, True, True, w_dtype=w_dtype, res_dtype=res_dtype,
                residual_in_fp32=residual_in_fp32, bwd_programs=2)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.parametrize("grad_on_out,grad_on_residual", [
    pytest.param(False, True, marks=pytest.mark.interp),  # released masked pretraining: the last norm unused
    (True, False),
])
def test_gradient_on_one_output_only(poison_empty, grad_on_out, grad_on_residual):
    _check_norm((3, 11, 64), torch.bfloat16, True, True, grad_on_out=grad_on_out,
                grad_on_residual=grad_on_residual)


@pytest.mark.gpu
@needs_kernel_device
@pytest.mark.interp
def test_non_contiguous_inputs_and_chained_blocks(poison_empty):
    """Two chained add-norms (the second adds to the first's returned residual, so it gets a gradient from
    both), on a column slice and a transposed view; gradients against the reference through the same chain."""
    gen = torch.Generator(DEVICE).manual_seed(5)
    D = 48
    x_base = torch.randn(2, 9, D + 5, device=DEVICE, generator=gen)
    x_base[..., D:] = float("nan")  # the columns past D of each strided row: never read
    h_base = torch.randn(9, 2, D, device=DEVICE, generator=gen).bfloat16()
    w1, w2 = (1 + 0.3 * torch.randn(2, D, device=DEVICE, generator=gen)).unbind(0)
    dout = torch.randn(2, 9, D, device=DEVICE, generator=gen)

    def chain(norm, x_base, h_base, w1, w2):
        x_BLD, h_BLD = x_base[..., :D], h_base.transpose(0, 1)  # rows strided; rows not viewable (a copy)
        n1, r1 = norm(x_BLD, w1, EPS, None, True, True)
        n2, r2 = norm(h_BLD + n1.to(h_BLD.dtype), w2, EPS, r1, True, True)
        return n2.float() * dout + r2

    leaves = [t.detach().clone().requires_grad_() for t in (x_base, h_base, w1, w2)]
    y = chain(add_rms_norm_triton, *leaves)
    grads = torch.autograd.grad(y.sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = chain(rms_norm_ref, *l64)
    grads64 = torch.autograd.grad(y64.sum(), l64)
    assert _rel(y, y64) < TOL[torch.bfloat16]
    for name, g, g64 in zip(("x", "h", "w1", "w2"), grads, grads64, strict=True):
        assert _rel(g, g64, name) < TOL[torch.bfloat16], name


@pytest.mark.gpu
@needs_kernel_device
def test_inference_matches_training_forward():
    x = torch.randn(4, 77, 384, device=DEVICE).bfloat16()
    res = torch.randn(4, 77, 384, device=DEVICE)
    w = torch.rand(384, device=DEVICE) + 0.5
    with torch.no_grad():
        out_inf, res_inf = add_rms_norm_triton(x, w, EPS, res, True)
    out_train, res_train = add_rms_norm_triton(x, w.requires_grad_(), EPS, res, True)
    torch.testing.assert_close(out_inf, out_train.detach(), rtol=0, atol=0)
    torch.testing.assert_close(res_inf, res_train.detach(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_videomamba_triton_backend_matches_ref():
    """A small VideoMamba on scan_backend="triton" (fused norms and Triton scan) against the same weights on
    "ref": the same tokens and parameter gradients, in fp32 and under bf16 autocast."""
    from models.videomamba import videomamba_test

    torch.manual_seed(0)
    arch = dict(embed_dim=64, depth=3, img_size=64, num_frames=8)  # 8 x 16 patches + CLS = 129 tokens
    triton_model = videomamba_test(scan_backend="triton", **arch).cuda()
    ref_model = videomamba_test(scan_backend="ref", **arch).cuda()
    ref_model.load_state_dict(triton_model.state_dict())
    assert all(n.backend == "triton" for n in (triton_model.norm_f, *(b.norm for b in triton_model.layers)))
    video = torch.randn(2, 3, 8, 64, 64, device="cuda")
    dout = torch.randn(2, 129, 64, device="cuda")
    for autocast, tol_tokens, tol_grads in ((False, 1e-4, 1e-3), (True, 2e-2, 5e-2)):
        results = []
        for m in (triton_model, ref_model):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                feats = m.forward_features(video, return_residuals=[1])
                loss = (feats.tokens_BLD.float() * dout).sum() + feats.residuals[1].square().mean()
            loss.backward()
            results.append((feats.tokens_BLD, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
        (tokens, grads), (tokens_ref, grads_ref) = results
        assert _rel(tokens, tokens_ref.double()) < tol_tokens
        assert grads.keys() == grads_ref.keys()
        for k, g in grads.items():
            err = _rel(g, grads_ref[k].double(), k)
            assert err < tol_grads, f"autocast={autocast} grad {k}: rel err {err:.2e}"


def test_seam_dispatch_on_cpu():
    """On CPU "auto" is the reference, bit for bit; "triton" refuses CPU tensors; the model passes its
    scan_backend to every norm."""
    from models.videomamba import videomamba_test

    g = torch.Generator().manual_seed(0)
    x, res, w = torch.randn(2, 5, 16, generator=g).bfloat16(), torch.randn(2, 5, 16, generator=g), torch.rand(16)
    for a, b in zip(ops.rms_norm(x, w, EPS, res, True), rms_norm_ref(x, w, EPS, res, True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if not INTERPRET:
        with pytest.raises(ValueError, match="CUDA"):
            ops.rms_norm(x, w, backend="triton")
    model = videomamba_test(scan_backend="ref")
    assert {n.backend for n in (model.norm_f, *(b.norm for b in model.layers))} == {"ref"}


def test_bad_inputs_raise_clear_errors():
    x, w = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm_triton(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must have"):
        add_rms_norm_triton(x, w, residual=torch.randn(2, 8))
    with pytest.raises(ValueError, match="float64"):
        add_rms_norm_triton(x.double(), w)
    with pytest.raises(ValueError, match=f"D <= {MAX_D}"):
        add_rms_norm_triton(torch.randn(1, MAX_D + 1), torch.ones(MAX_D + 1))
    if not INTERPRET:
        with pytest.raises(ValueError, match="CUDA"):
            add_rms_norm_triton(x, w)


def test_kernels_under_triton_interpreter():
    """CPU CI: the `interp` subset above, run by Triton's interpreter in a fresh interpreter process."""
    run_interp_subset(__file__, expected_passed=11, timeout_s=300)
