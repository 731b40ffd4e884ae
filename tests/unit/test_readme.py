"""The README's generated sections (model zoo, benchmark results) equal what the renderer makes of the code and
benchmarks/results/ now, so they cannot drift from the measurements."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _renderer(name: str = "render_readme_results"):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _renderer()
performance = _renderer("render_performance")


def test_readme_generated_sections_are_up_to_date():
    current = (REPO / "README.md").read_text()
    assert render.render_readme(current) == current, (
        f"README.md's zoo/results sections differ from the code and benchmarks/results/; run `{render.COMMAND}`"
    )


def test_results_from_another_file_and_layout(tmp_path):
    """A result file the renderer has no layout for (a future benchmark) still becomes a section."""
    (tmp_path / "eval.json").write_text(json.dumps({
        "setup": {"videos": 1000, "texts": 1000, "clips": "synthetic", "device": "CPU", "model": "m", "num_frames": 8,
                  "img_size": 64, "batch_size": 32, "decode_workers": 0, "precision": "fp32", "torch": "2"},
        "timing": {"video_decode_s": 30.0, "video_forward_s": 10.0, "scoring_s": 0.5, "total_s": 50.0},
        "rates": {"video_decode_clips_per_s": 33.3}, "bounded_by": "video_decode",
    }))
    (tmp_path / "newbench.json").write_text(json.dumps({
        "meta": {"device": "NVIDIA H100"}, "model": "videomamba_small",
        "rows": [{"workers": 1, "clips_per_s": 123.456, "nested": {"x": 1}}, {"workers": 2, "clips_per_s": 240.0}],
    }))
    text = render.render_results(tmp_path)
    assert text.index("#### Retrieval evaluation") < text.index("#### newbench")  # known layouts first
    assert "| video_decode | 30.00 | 60% |" in text and "| total | 50.00 | 100% |" in text
    assert "Bounded by **video_decode** (video decode 33.3 clips/s)." in text
    assert "meta: device NVIDIA H100." in text and "model videomamba_small." in text
    assert "| workers | clips_per_s |" in text  # the nested column is left out
    assert "| 1 | 123.5 |" in text and "| 2 | 240.0 |" in text


def test_missing_markers_are_named():
    with pytest.raises(ValueError, match="exactly one '<!-- results:start -->'"):
        render.replace_section("# README\n<!-- results:end -->\n", "results", "body")


def test_performance_page_is_up_to_date():
    assert performance.render_page() == performance.PAGE.read_text(), (
        f"docs/performance.md differs from benchmarks/results/; run `{performance.COMMAND}`")


def _model_row(mode, frames, size, model, clips, **extra):
    return {"mode": mode, "frames": frames, "size": size, "model": model, "batch": 4, "clips/s": clips, **extra}


def test_whole_model_results_pivot_and_targets(tmp_path):
    rows = [
        _model_row("train step", 8, "S", "ours", 70.0, **{"vs timesformer-sdpa": 0.7, "vs released": 3.5,
                                                          "out rel diff": 0.004, "grad rel diff": 0.02}),
        _model_row("train step", 8, "S", "released", 20.0),
        _model_row("train step", 8, "S", "timesformer-sdpa", 100.0),
        {"mode": "train step", "frames": 8, "size": "S", "model": "timesformer-eager", "batch": None,
         "did not fit (batch)": "4, 2, 1", "error": "out of memory at batch 1"},
        _model_row("train step", 8, "M", "ours", 30.0, **{"vs timesformer-sdpa": 0.5}),
        _model_row("train step", 8, "M", "timesformer-sdpa", 60.0),
        _model_row("inference", 64, "Ti", "ours", 50.0, batch=8, **{"vs timesformer-sdpa": 2.5}),
        _model_row("inference", 64, "Ti", "timesformer-sdpa", 20.0, batch=2),
    ]
    (tmp_path / "model.json").write_text(json.dumps({"meta": {"date": "2026-12-01 10:00 UTC", "device": "H100",
                                                             "released path": {"kernels": {}}}, "rows": rows}))
    text = render.render_results(tmp_path)
    assert "date 2026-12-01 10:00 UTC; device H100. In the JSON also: released path." in text
    assert "| S | 8 | 4 | 70.00 | 20.00 | 100.0 | OOM (batch 4, 2, 1) | 0.7 | 3.50 |" in text
    assert "| Ti | 64 | 8 | 50.00 | 20.00 (b2) | 2.50 |" in text  # TimeSformer ran at another batch
    targets = {(t["target"], t["size"]): t["status"] for t in performance.target_rows(tmp_path)}
    assert targets[("train step, 8 frames: ours vs timesformer-sdpa >= 0.67", "S")] == "met"
    assert targets[("train step, 8 frames: ours vs timesformer-sdpa >= 0.67", "M")] == "not met"
    assert targets[("train step, 8 frames: ours vs released >= 3", "M")] == "not measured"
    assert targets[("inference, 64 frames: ours vs timesformer-sdpa >= 2", "Ti")] == "met"
    assert ("train step, 32 frames: ours vs timesformer-sdpa >= 1.5", "S") not in targets  # no such row
