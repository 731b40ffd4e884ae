"""benchmarks/bench_data.py's pieces on CPU: the Stage 1 data-wait loop (real task, real loader, real shards), the
cores-per-GPU arithmetic, and a decode timing row."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _data_wait import stage1_data_wait  # noqa: E402
from bench_data import core_rows, gpu_stage_rates, pyav, time_clips  # noqa: E402

from pipeline.data.decode import DecodeOptions  # noqa: E402
from pipeline.data.footage import FOOTAGE, render_footage, small  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage1_data_wait_times_the_loader_and_the_step(tiny_synthetic):
    row = stage1_data_wait(tiny_synthetic["train_shards"], workers=1, batch=2, steps=2, warmup=1, device="cpu",
                           model="videomamba_test", img_size=32, backend="ref")  # fmt: skip
    assert row["stage"] == "Stage 1 videomamba_test" and row["loader_workers"] == 1
    assert 0 <= row["data_wait_ms"] <= row["step_ms_with_loader"]
    assert row["data_wait_fraction"] == pytest.approx(row["data_wait_ms"] / row["step_ms_with_loader"])
    assert row["step_ms_in_memory"] > 0 and row["clips_per_s_with_loader"] == pytest.approx(
        2e3 / row["step_ms_with_loader"])


def test_cores_per_gpu_divide_each_stage_rate_by_the_rate_per_core():
    rows = [{"footage": "720p_longgop", "variant": "raw", "decoder": "pyav", "clips_per_s_per_core": 4.0},
            {"footage": "720p_longgop", "variant": "raw", "decoder": "pyav, no nonref skip",
             "clips_per_s_per_core": 2.0}]  # fmt: skip
    cores = core_rows(rows)
    stages = gpu_stage_rates()
    assert [c["stage"] for c in cores] == [stage for stage, _ in stages]  # one row per stage: pyav only
    for row, (_, rate) in zip(cores, stages, strict=True):
        assert row["cores_per_gpu"] == math.ceil(rate / 4.0) and row["gpu_clips_per_s"] == rate


def test_time_clips_reports_cpu_and_wall_per_clip():
    data = render_footage(small(FOOTAGE["640x272_bframes"]))
    row = time_clips(pyav(DecodeOptions()), data, frames=4, clips=2)
    assert row["decode_cpu_ms"] > 0 and row["transform_cpu_ms"] > 0
    assert row["clips_per_s_per_core"] == pytest.approx(1e3 / (row["decode_cpu_ms"] + row["transform_cpu_ms"]))
