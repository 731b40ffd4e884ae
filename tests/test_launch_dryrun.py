"""`--dry-run`: validate, print and save the resolved config and the plan, start nothing."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.jobs_common import run_training_job


def test_dry_run_prints_plan_and_saves_config(tmp_path, capsys):
    result = run_training_job(
        "toy", ["--config", "configs/stages/toy.yaml", f"output_dir={tmp_path}", "scaling.num_workers=3", "--dry-run"]
    )
    assert result is None
    out = capsys.readouterr().out
    assert "toy_mlp: 676 parameters (676 trainable)" in out  # 16*32+32 + 32*4+4
    assert "3 Ray worker(s)" in out and "global batch 48" in out and "resume from: nothing yet" in out
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["scaling"]["num_workers"] == 3 and saved["task"]["name"] == "toy"
    assert not (tmp_path / "export").exists()


def test_bad_key_stops_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"scaling\.num_worker: unknown key \(did you mean 'num_workers'\?\)"):
        run_training_job("toy",
            ["--config", "configs/stages/toy.yaml", f"output_dir={tmp_path}", "scaling.num_worker=1"])
    assert not (tmp_path / "config.yaml").exists()
