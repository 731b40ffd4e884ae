"""The whole-model benchmark's CPU paths: tiny models timed side by side with their outputs compared, the result
file's provenance and ratios, the released-path checker on a checkout tree, and the kernel build's dtype filter."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import _released  # noqa: E402
import bench_model  # noqa: E402


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_tiny_models_side_by_side(tmp_path):
    args = ["--device", "cpu", "--tiny", "--backend", "ref", "--frames", "2", "--sizes", "Ti", "--rounds", "2",
            "--round-s", "0", "--max-calls", "1", "--train-clip-frames", "4", "--infer-clip-frames", "4",
            "--results-dir", str(tmp_path), "--stem", "tiny"]
    assert bench_model.main(args) == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert list(meta)[:3] == ["date", "git_commit", "git_dirty"] and meta["device"] == "CPU"
    assert "no checkout given" in meta["released path"]  # why the released rows did not run
    assert [(r["mode"], r["model"]) for r in rows] == [(m, k) for m in ("train step", "inference")
                                                        for k in bench_model.MODELS]
    for row in rows:
        if row["model"] == "released":
            assert row["error"].startswith("not run") and "clips/s" not in row
            continue
        assert row["batch"] == 2 and row["calls"] == 2 and row["clips/s"] == pytest.approx(2e3 / row["ms"])
        assert row["ms round min"] <= row["ms"] <= row["ms round max"]
    by_mode = {(r["mode"], r["model"]): r for r in rows}
    for mode in ("train step", "inference"):
        eager, sdpa = by_mode[(mode, "timesformer-eager")], by_mode[(mode, "timesformer-sdpa")]
        assert eager["checked against"] == "timesformer-sdpa" and eager["out rel diff"] < 1e-5  # fp32 on CPU
        assert eager["vs timesformer-sdpa"] == pytest.approx(eager["clips/s"] / sdpa["clips/s"])
    assert by_mode[("train step", "timesformer-eager")]["grad rel diff"] < 1e-5


def test_plan_runs_targets_first():
    args = argparse.Namespace(modes=["train", "infer"], frames=[16, 8, 64], sizes=["Ti", "S", "M"])
    planned = bench_model.plan(args)
    assert planned[:3] == [("train", 8, "S"), ("train", 8, "M"), ("train", 8, "Ti")]
    assert planned[3] == ("infer", 8, "Ti") and planned[6] == ("train", 64, "S")
    assert len(planned) == 18 and planned[-1] == ("infer", 16, "M")


def test_timesformer_twins_match_the_paper_pairing():
    assert bench_model.SIZES["Ti"].timesformer == (192, 12, 3)  # DeiT-Ti
    assert bench_model.SIZES["S"].timesformer == (384, 12, 6)  # DeiT-S
    assert bench_model.SIZES["M"].timesformer == (576, 16, 9)


def _checkout(root: Path, skip: str | None = None) -> Path:
    """A tree with the released path's files, each defining the names the checker looks for."""
    for rel, names in _released.REQUIRED.items():
        if rel == skip:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("import torch\n" + "".join(f"def {n}():\n    pass\n" for n in names)
                        + "if __name__ == '__main__':\n    import fvcore\n")
    return root


def test_released_checker_names_what_is_missing(tmp_path):
    repo = _checkout(tmp_path / "repo", skip=_released.MODEL_FILE)
    (repo / "mamba/mamba_ssm/ops/selective_scan_interface.py").write_text("import torch\nimport not_a_module_x\n")
    found = _released.problems(repo, tmp_path / "ext", need_cuda=False)
    assert any(_released.MODEL_FILE in p and "missing" in p for p in found)
    assert any("defines no mamba_inner_fn_no_out_proj" in p for p in found)
    assert any("'not_a_module_x', which is not installed" in p for p in found)
    assert not any("fvcore" in p for p in found)  # imported only under __main__
    assert sum("not found in" in p and "build_released_kernels.py" in p for p in found) == 2
    assert _released.problems(None, None) == [
        "no checkout given: pass --released-repo PATH (a checkout of github.com/OpenGVLab/VideoMamba)"]


def test_released_checker_passes_a_complete_checkout(tmp_path, monkeypatch):
    for name in _released.PROVIDED:  # another test may have put a stand-in of mamba-ssm's modules there
        monkeypatch.delitem(sys.modules, name, raising=False)
    repo = _checkout(tmp_path / "repo")
    ext = tmp_path / "ext"
    ext.mkdir()
    for name in _released.EXTENSIONS:
        (ext / f"{name}.so").write_bytes(b"")  # found, not imported: the checker only looks
    assert _released.problems(repo, ext, need_cuda=False) == []
    with pytest.raises(_released.ReleasedPathError, match="no checkout given"):
        _released.load(None, None)


CPP = """#define DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(ITYPE, NAME, ...)                    \\
    if (ITYPE == at::ScalarType::Half) {                                            \\
        using input_t = at::Half;                                                   \\
        __VA_ARGS__();                                                              \\
    } else if (ITYPE == at::ScalarType::BFloat16) {                                 \\
        using input_t = at::BFloat16;                                               \\
        __VA_ARGS__();                                                              \\
    } else {                                                                        \\
        AT_ERROR(#NAME, " not implemented for input type '", toString(ITYPE), "'"); \\
    }

#define DISPATCH_WTYPE_FLOAT_AND_COMPLEX(WTYPE, NAME, ...)                           \\
    if (WTYPE == at::ScalarType::Float) {                                            \\
       using weight_t = float;                                                       \\
        __VA_ARGS__();                                                               \\
    } else {                                                                         \\
        AT_ERROR(#NAME, " not implemented for weight type '", toString(WTYPE), "'"); \\
    }
int after;
"""
CU = """template void f_cuda<float, float>(P &params, cudaStream_t stream);
template void f_cuda<at::BFloat16, float>(P &params, cudaStream_t stream);
template void f_cuda<at::BFloat16, complex_t>(P &params, cudaStream_t stream);
template void g_cuda<at::Half, at::BFloat16>(P &params, cudaStream_t stream);"""


def test_kernel_build_keeps_bf16_inputs_and_fp32_weights():
    build = _script("build_released_kernels")
    cu, removed = build.restrict_dtypes(CU, "bf16")
    assert removed == 3 and cu == "template void f_cuda<at::BFloat16, float>(P &params, cudaStream_t stream);\n"
    cpp, rewritten = build.restrict_dtypes(CPP, "bf16")
    assert rewritten == 2 and cpp.endswith("int after;\n")
    assert "at::Half" not in cpp and "using input_t = at::BFloat16;" in cpp and "using weight_t = float;" in cpp
    assert "ComplexFloat" not in cpp and cpp.count("was built for") == 2


def test_kernel_build_can_keep_fp32_inputs_instead():
    build = _script("build_released_kernels")
    cu, removed = build.restrict_dtypes(CU, "fp32")
    assert removed == 3 and cu.startswith("template void f_cuda<float, float>(") and cu.count("template") == 1
    cpp, _ = build.restrict_dtypes(CPP, "fp32")
    assert "using input_t = float;" in cpp and "at::BFloat16" not in cpp and "Float inputs only" in cpp
    scan = build.EXTENSIONS["selective_scan_cuda"]
    assert [s.format(dtype="fp32").rsplit("/", 1)[-1] for s in scan.restricted_sources] == [
        "selective_scan.cpp", "selective_scan_fwd_fp32.cu", "selective_scan_bwd_fp32_real.cu"]
