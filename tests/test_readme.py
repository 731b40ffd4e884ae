"""The README's generated sections (model zoo, benchmark results) equal what the renderer makes of the code and
benchmarks/results/ now, so they cannot drift from the measurements."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _renderer():
    path = REPO / "scripts" / "render_readme_results.py"
    spec = importlib.util.spec_from_file_location("render_readme_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _renderer()


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
