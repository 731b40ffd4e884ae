"""The released-code comparison's own logic (scripts/check_released_eval.py, scripts/released_eval_driver.py): the
matrix and R@k checks catch what they are there for, and the driver's placeholders stand in only for modules
that are not installed, refusing every call but the import-time settings."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


check = _script("check_released_eval")
driver = _script("released_eval_driver")


def _pair(seed: int = 0) -> tuple[dict, dict]:
    """Our side's files and the released side's, for 6 texts x 3 videos (text i shows video i // 2), agreeing."""
    rng = np.random.default_rng(seed)
    sim_TV = rng.uniform(-1, 1, (6, 3)).astype(np.float32)
    rerank_t2v, rerank_v2t = np.full_like(sim_TV, -100.0), np.full_like(sim_TV, -100.0)
    rerank_t2v[:, :2] = rng.normal(size=(6, 2))
    rerank_v2t[:4] = rng.normal(size=(4, 3))
    texts = [f"text {i}" for i in range(6)]
    ours = {"scores": {"similarity_t2v_TV": sim_TV, "similarity_v2t_TV": sim_TV, "rerank_t2v_TV": rerank_t2v,
                       "rerank_v2t_TV": rerank_v2t, "texts": np.asarray(texts)},
            "result": {"metrics": {f"{p}{d}_r{k}": 50.0 for p in ("", "similarity/") for d in ("t2v", "v2t")
                                   for k in (1, 5, 10)}}}
    metrics = {f"{n}_r{k}": 50.0 for n in ("img", "txt") for k in (1, 5, 10)}
    released = {"scores": {"t2i_emb": sim_TV.copy(), "i2t_emb": sim_TV.T.copy(), "t2i_x": rerank_t2v.copy(),
                           "i2t_x": rerank_v2t.T.copy()},
                "record": {"texts": list(texts), "metrics": metrics, "metrics_emb": dict(metrics),
                           "load": {"missing": [], "unexpected": ["text_encoder.cls.predictions.bias"]}}}
    return ours, released


def _failed(ours: dict, released: dict) -> set[str]:
    return {name for name, c in check.compare_scores(ours, released, 1e-5, 1e-5).items() if not c["ok"]}


def test_agreeing_sides_pass_every_check():
    assert _failed(*_pair()) == set()


def test_each_mismatch_fails_its_own_check():
    ours, released = _pair()
    released["scores"]["i2t_x"][0, 0] += 1e-4  # beyond 1e-5 + 1e-5 * max |score| (scores of a few units)
    assert _failed(ours, released) == {"re-ranked v2t"}
    ours, released = _pair()
    released["scores"]["t2i_emb"] = released["scores"]["t2i_emb"][::-1].copy()  # rows in another order
    released["record"]["texts"][2] = "text two"
    released["record"]["metrics_emb"]["txt_r5"] = 51.0
    released["record"]["load"]["missing"] = ["itm_head.weight"]
    assert _failed(ours, released) == {"similarity t2v", "cleaned queries identical",
                                       "R@1/5/10, re-ranked and similarity-only, both directions, equal",
                                       "released load: no missing key, only text_encoder.cls.* unexpected "
                                       "(unused at evaluation)"}


def test_rerank_fill_is_no_score_but_a_one_sided_candidate_fails():
    ours, released = _pair()
    result = check.max_diff(ours["scores"]["rerank_t2v_TV"], released["scores"]["t2i_x"], 1e-5, 1e-5)
    assert result["ok"] and result["max_abs_released"] < 100  # the -100 fill is not the matrix's scale
    released["scores"]["t2i_x"][0, 2] = 0.5  # a candidate on the released side only
    assert "re-ranked t2v" in _failed(ours, released)


def test_placeholders_only_for_missing_modules_and_refuse_calls(monkeypatch):
    monkeypatch.setattr(driver, "UNUSED_AT_EVALUATION", ("json", "not_installed_reader_x"))
    monkeypatch.setattr(driver, "RECORDED_CALLS", {"not_installed_reader_x.bridge.set_bridge"})
    monkeypatch.delitem(sys.modules, "not_installed_reader_x", raising=False)
    placed = driver.install_placeholders()
    try:
        assert list(placed) == ["not_installed_reader_x"] and sys.modules["json"].__file__
        import not_installed_reader_x as reader
        from not_installed_reader_x import VideoReader

        assert reader.bridge.set_bridge("torch") is None and placed["not_installed_reader_x"] == [
            "not_installed_reader_x.bridge.set_bridge('torch',)"]
        assert importlib.util.find_spec("not_installed_reader_x").origin.startswith("placeholder")
        with pytest.raises(RuntimeError, match="not_installed_reader_x.VideoReader was called, but "
                                               "not_installed_reader_x is not installed"):
            VideoReader("clip.mp4")
    finally:
        sys.modules.pop("not_installed_reader_x", None)


def test_rerank_depth_must_keep_every_recall_comparable():
    # 16 videos, 32 texts: R@10 needs the depth of 10 in both directions.
    assert check.incomparable_recalls(10, 16) == []
    assert check.incomparable_recalls(5, 16) == ["t2v_r10", "v2t_r10"]
    # 4 videos, 8 texts: R@10 is 100 on both sides whatever the depth; R@5 of the 8 texts needs 5.
    assert check.incomparable_recalls(5, 4) == []
    assert check.incomparable_recalls(4, 4) == ["v2t_r5"]


def test_released_layout_at_another_resolution_changes_only_the_position_embedding():
    full = check.expected_released_layout(224)
    small = check.expected_released_layout(64)
    assert len(full) == len(small) == 798
    differ = [(a, b) for a, b in zip(full, small, strict=True) if a != b]
    assert differ == [(["vision_encoder.pos_embed", [1, 197, 576]], ["vision_encoder.pos_embed", [1, 17, 576]])]


def test_markdown_report_gives_every_check_and_both_sides_recalls():
    ours, released = _pair()
    checks = check.compare_scores(ours, released, 1e-5, 1e-5)
    summary = {"verdict": "PASS", "mode": "fp32 on the CPU", "size": "full", "num_frames": 8, "img_size": 64,
               "videos": 3, "texts": 6, "k_test": 5, "checks": checks, "ours": {"metrics": ours["result"]["metrics"]},
               "released": {k: released["record"][k] for k in ("metrics", "metrics_emb")}}
    report = check.markdown_report(summary)
    assert report.count("| yes |") == len(checks) and "| re-ranked t2v | 0.00e+00 |" in report
    assert "| similarity v2t R@10 | 50.00 | 50.00 |" in report
