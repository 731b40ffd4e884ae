"""benchmarks/bench_scaling.py's bookkeeping: which logged windows are timed, and merging result rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_scaling import merge_rows, timed_window_ends  # noqa: E402


def test_timed_windows_skip_the_start_and_the_profile():
    # 30 steps logged every 5: windows end at 5..30; the first 10 steps and the profiled 28-30 are left out
    assert timed_window_ends(skip=10, log_interval=5, profile_start=28) == {15, 20, 25}
    # the CPU rehearsal's settings: 14 steps every 3, profile 13-14
    assert timed_window_ends(skip=2, log_interval=3, profile_start=13) == {6, 9, 12}
    assert timed_window_ends(skip=10, log_interval=5, profile_start=8) == set()


def test_new_rows_replace_old_rows_of_the_same_setting(tmp_path):
    path = tmp_path / "scaling.json"
    old = [{"tag": "S", "zero": 1, "workers": 1, "clips/s": 1.0}, {"tag": "S", "zero": 1, "workers": 2, "clips/s": 2.0}]
    path.write_text(json.dumps({"meta": {}, "rows": old}))
    merged = merge_rows(path, [{"tag": "S", "zero": 1, "workers": 2, "clips/s": 3.0}], ("tag", "zero", "workers"))
    assert [(r["workers"], r["clips/s"]) for r in merged] == [(1, 1.0), (2, 3.0)]
