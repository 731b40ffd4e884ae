"""The released VideoMamba code path, imported from a user's checkout of OpenGVLab/VideoMamba, for side-by-side runs.

The checkout is read where it is and never copied into this project. What runs from it:
  videomamba/video_sm/models/videomamba.py   the released model (VisionMamba; videomamba_tiny/small/middle), with
                                             fused add + RMSNorm from its fork's Triton kernel;
  mamba/mamba_ssm/                           its mamba-ssm 1.0.1 fork: Mamba(bimamba=True) runs each direction
                                             through mamba_inner_fn_no_out_proj, one autograd function around
                                             causal-conv1d's kernel and the selective-scan kernel;
  causal-conv1d/causal_conv1d/               its causal-conv1d 1.0.0 Python.
The fork's package __init__ (the language model and its `transformers` generation helpers, which the video model
does not use) is not run. The two compiled modules come from scripts/build_released_kernels.py; causal-conv1d
1.4+ builds take output buffers, so `causal_conv1d_cuda` is given the fork's 1.0.0 call signatures on top.

`problems()` says what is missing without importing anything from the checkout (the benchmarks' --check-released);
`load()` imports it; `install_fork()` imports the kernel fork alone (for the other released models that use it:
scripts/released_eval_driver.py runs video_mm's), also without the compiled modules.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

MODEL_FILE = "videomamba/video_sm/models/videomamba.py"
FORK = "mamba/mamba_ssm"
CONV_PACKAGE = "causal-conv1d/causal_conv1d"
# The files the released path executes, and a name each must define (checked by reading, not importing).
REQUIRED = {
    MODEL_FILE: ("videomamba_tiny", "videomamba_small", "videomamba_middle"),
    f"{FORK}/modules/mamba_simple.py": ("Mamba",),
    f"{FORK}/ops/selective_scan_interface.py": ("mamba_inner_fn_no_out_proj",),
    f"{FORK}/ops/triton/layernorm.py": ("rms_norm_fn",),
    f"{FORK}/ops/triton/selective_state_update.py": ("selective_state_update",),
    f"{CONV_PACKAGE}/__init__.py": (),
    f"{CONV_PACKAGE}/causal_conv1d_interface.py": ("causal_conv1d_fn",),
}
PROVIDED = {"mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda"}  # not looked up on sys.path
EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
SIZES = {"Ti": "videomamba_tiny", "S": "videomamba_small", "M": "videomamba_middle"}


class ReleasedPathError(RuntimeError):
    """The released code path cannot run here; the message lists every reason."""


def _find_extension(name: str, ext_dir: Path | None) -> importlib.machinery.ModuleSpec | None:
    if ext_dir is not None:
        return importlib.machinery.PathFinder.find_spec(name, [str(ext_dir)])
    return importlib.util.find_spec(name)


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imported_modules(path: Path) -> set[str]:
    """Top-level module names that `path` imports when imported (absolute imports; its __main__ block left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    nodes = (n for stmt in tree.body if not _is_main_guard(stmt) for n in ast.walk(stmt))
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def problems(repo: Path | None, ext_dir: Path | None, need_cuda: bool = True, need_kernels: bool = True) -> list[str]:
    """Every reason the released path cannot run in this process (an empty list: it can); imports nothing.
    need_kernels=False leaves out the compiled modules (for `install_fork(..., kernels=False)`)."""
    if repo is None:
        return ["no checkout given: pass --released-repo PATH (a checkout of github.com/OpenGVLab/VideoMamba)"]
    found = []
    if not repo.is_dir():
        return [f"--released-repo {repo} is not a directory"]
    imported: set[str] = set()
    for rel, names in REQUIRED.items():
        path = repo / rel
        if not path.is_file():
            found.append(f"{path} is missing (is {repo} a checkout of OpenGVLab/VideoMamba?)")
            continue
        missing = [n for n in names if n not in _defined_names(path)]
        if missing:
            found.append(f"{path} defines no {', '.join(missing)}: not the released code this loader was written for")
        imported |= _imported_modules(path)
    for module in sorted(imported - PROVIDED - set(sys.builtin_module_names)):
        if importlib.util.find_spec(module) is None:
            found.append(f"the released code imports {module!r}, which is not installed here")
    for name in EXTENSIONS if need_kernels else ():
        if _find_extension(name, ext_dir) is None:
            where = f"in {ext_dir}" if ext_dir else "on sys.path (no --released-ext given)"
            found.append(f"compiled module {name!r} not found {where}: build it with "
                         "scripts/build_released_kernels.py --sdists DIR --out DIR, then pass --released-ext DIR")
    for name in PROVIDED:
        module = sys.modules.get(name)
        if module is not None and not getattr(module, "_released_path", False):
            found.append(f"{name!r} is already imported in this process (from {getattr(module, '__file__', '?')}); "
                         "the released fork must be the only one: run it in a fresh process")
    if need_cuda and not torch.cuda.is_available():
        found.append("no CUDA device: the released kernels run on CUDA only")
    return found


def _exec_module(name: str, path: Path, package_dir: Path | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    module._released_path = True
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _conv_signature_args(ext: types.ModuleType) -> int:
    """How many arguments the compiled causal_conv1d_fwd takes (pybind's docstring names arg0..argN)."""
    first_line = (ext.causal_conv1d_fwd.__doc__ or "").strip().splitlines()[0]
    return first_line.count("arg")


def conv_v1_api(ext: types.ModuleType) -> types.ModuleType:
    """`causal_conv1d_cuda` with causal-conv1d 1.0.0's fwd/bwd signatures, which the fork calls, over a 1.4+ build
    (whose calls take the output buffers and sequence-index / state arguments). Allocation as 1.0.0's C++ did:
    out like x; fp32 zeroed dweight/dbias cast back to the weights' dtype. The fork's fused path calls only
    these two; its decoding step (causal_conv1d_update) is left out."""
    module = types.ModuleType("causal_conv1d_cuda")
    module._released_path, module.__wrapped__ = True, ext
    module.__doc__ = f"causal-conv1d 1.0.0 signatures over {getattr(ext, '__file__', ext)}"

    def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, silu_activation: bool) -> Tensor:
        out = torch.empty_like(x)
        ext.causal_conv1d_fwd(x, weight, bias, None, None, out, None, silu_activation)
        return out

    def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor, dx: Tensor | None,
                          silu_activation: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        dx = torch.empty_like(x) if dx is None else dx
        dweight = torch.zeros_like(weight, dtype=torch.float32)
        dbias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        ext.causal_conv1d_bwd(x, weight, bias, dout, None, None, None, dx, dweight, dbias, None, silu_activation)
        return dx, dweight.to(weight.dtype), None if dbias is None else dbias.to(bias.dtype)

    module.causal_conv1d_fwd, module.causal_conv1d_bwd = causal_conv1d_fwd, causal_conv1d_bwd
    return module


def _load_extension(name: str, ext_dir: Path | None) -> types.ModuleType:
    spec = _find_extension(name, ext_dir)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._released_path = True
    return module


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _provenance(repo: Path, ext_dir: Path | None) -> dict:
    """What ran: the checkout's commit when it is a git checkout, the executed files' hashes, the kernels' builds."""
    commit = None
    if (repo / ".git").exists():
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = done.stdout.strip() or None
    builds = {}
    for name in EXTENSIONS:
        record = ext_dir / f"{name}.json" if ext_dir else None
        builds[name] = json.loads(record.read_text()) if record and record.is_file() else "installed (no build record)"
    return {"checkout": str(repo), "checkout_commit": commit or "not a git checkout",
            "sha256[:16]": {rel: _sha256(repo / rel) for rel in REQUIRED},
            "kernels": {name: {k: b[k] for k in ("sdist", "arch", "dtypes", "seconds")} if isinstance(b, dict) else b
                        for name, b in builds.items()}}


@dataclass
class ReleasedPath:
    """The imported released code: its model module and its fused mixer function."""

    model_module: types.ModuleType
    inner_fn_no_out_proj: Callable
    provenance: dict = field(default_factory=dict)

    def build_model(self, size: str, **kwargs) -> nn.Module:
        """The released videomamba_<size>(**kwargs) (its constructor's prints silenced)."""
        with contextlib.redirect_stdout(io.StringIO()):
            return getattr(self.model_module, SIZES[size])(**kwargs)

    def mixer_core(self, xz_BFL: Tensor, fwd, bwd) -> Tensor:
        """The released Mamba.forward between in_proj and out_proj, fast path: each direction through
        mamba_inner_fn_no_out_proj (the backward one on xz flipped along L), outputs summed. fwd/bwd are
        models.ops.DirectionWeights; A = -exp(A_log), D, dt bias in fp32, as the released module passes them."""

        def direction(xz: Tensor, w) -> Tensor:
            return self.inner_fn_no_out_proj(
                xz, w.conv_weight_EW.unsqueeze(1), w.conv_bias_E, w.x_proj_weight, w.dt_proj_weight,
                -torch.exp(w.A_log_EN.float()), None, None, w.D_E.float(), delta_bias=w.dt_proj_bias.float(),
                delta_softplus=True)

        return direction(xz_BFL, fwd) + direction(xz_BFL.flip([-1]), bwd).flip([-1])


class _NotBuilt(types.ModuleType):
    """A compiled module's stand-in for importing the fork where the kernels cannot load (no CUDA): every
    function it does not define raises, so nothing computes with it."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def not_built(*_args, **_kwargs):
            raise ReleasedPathError(f"{self.__name__}.{attr}: the released kernels were not loaded (imported "
                                    "without kernels, to build models on a machine without CUDA)")
        return not_built


def _reference_scan_module() -> types.ModuleType:
    """`selective_scan_cuda` whose forward is the fork's own selective_scan_ref (the kernel's outputs: the
    ungated output, no scan states, and the output gated by silu(z))."""
    module = _NotBuilt("selective_scan_cuda")

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: N803 (the kernel's argument names)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        out = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        return (out, None) if z is None else (out, None, out * torch.nn.functional.silu(z))

    module.fwd = fwd
    return module


def _reference_conv_module() -> types.ModuleType:
    """`causal_conv1d_cuda` (1.0.0 signatures) whose forward is the fork's own causal_conv1d_ref."""
    module = _NotBuilt("causal_conv1d_cuda")

    def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, silu_activation: bool) -> Tensor:
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

        return causal_conv1d_ref(x, weight, bias, "silu" if silu_activation else None)

    module.causal_conv1d_fwd = causal_conv1d_fwd
    return module


def _reference_add_norm(norm_ref: Callable) -> Callable:
    """The fused add + norm function's signature over the fork's reference norm."""
    def add_norm(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
        out = norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm)
        return (out[0], out[1].float()) if prenorm and residual_in_fp32 else out
    return add_norm


KERNELS = ("built", "reference", "none")


def install_fork(repo: Path, ext_dir: Path | None, kernels: str = "built") -> types.ModuleType:
    """Make `mamba_ssm` and `causal_conv1d` this process's imports of the checkout's fork; returns the fork's
    selective_scan_interface. Callers check `problems()` first. `kernels`:
      built      the compiled modules in `ext_dir` (None: installed ones);
      reference  the fork's own reference functions in their place (selective_scan_ref, causal_conv1d_ref, and
                 rms_norm_ref / layer_norm_ref for the fused add + norm Triton kernel): the released models'
                 forward runs on any device, without CUDA;
      none       stand-ins that raise when called: the released models build, their forward cannot run."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}; got {kernels!r}")
    if kernels == "built":
        scan = _load_extension("selective_scan_cuda", ext_dir)
        conv = _load_extension("causal_conv1d_cuda", ext_dir)
        args = _conv_signature_args(conv)
        if args not in (4, 8):
            raise ReleasedPathError(f"{conv.__file__}: causal_conv1d_fwd takes {args} arguments; known are 4 "
                                    "(causal-conv1d 1.0.x) and 8 (1.4 to 1.7)")
        conv = conv if args == 4 else conv_v1_api(conv)
    elif kernels == "reference":
        scan, conv = _reference_scan_module(), _reference_conv_module()
    else:
        scan, conv = _NotBuilt("selective_scan_cuda"), _NotBuilt("causal_conv1d_cuda")
    scan._released_path = conv._released_path = True
    sys.modules["selective_scan_cuda"], sys.modules["causal_conv1d_cuda"] = scan, conv
    conv_dir = repo / CONV_PACKAGE
    _exec_module("causal_conv1d", conv_dir / "__init__.py", conv_dir)
    fork = types.ModuleType("mamba_ssm")  # a package without its __init__ (see the module docstring)
    fork.__path__, fork._released_path = [str(repo / FORK)], True
    sys.modules["mamba_ssm"] = fork
    interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    importlib.import_module("mamba_ssm.modules.mamba_simple")
    if kernels == "reference":
        # Before the released models import them by name; RMSNorm.forward looks rms_norm_fn up at call time.
        norm = importlib.import_module("mamba_ssm.ops.triton.layernorm")
        norm.rms_norm_fn, norm.layer_norm_fn = (_reference_add_norm(norm.rms_norm_ref),
                                                _reference_add_norm(norm.layer_norm_ref))
    return interface


def load(repo: Path | None, ext_dir: Path | None, need_cuda: bool = True) -> ReleasedPath:
    """Import the released path from `repo` with the kernels in `ext_dir` (None: installed ones). need_cuda=False
    imports it on a machine without a GPU (its models build there; their forward needs CUDA)."""
    found = problems(repo, ext_dir, need_cuda)
    if found:
        raise ReleasedPathError("the released VideoMamba code path cannot run here:\n  - " + "\n  - ".join(found))
    interface = install_fork(repo, ext_dir)
    model_module = _exec_module("released_videomamba_model", repo / MODEL_FILE)
    return ReleasedPath(model_module, interface.mamba_inner_fn_no_out_proj, _provenance(repo, ext_dir))
