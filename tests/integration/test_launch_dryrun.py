"""`--dry-run`: validate, print and save the resolved config and the plan, start nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("job", [
    ["jobs/train_toy.py", "--config", "configs/stages/toy.yaml"],
    ["jobs/eval_retrieval.py", "--config", "configs/eval/synthetic.yaml"],
    ["jobs/finetune_cls.py", "--config", "configs/stages/finetune_test.yaml"],
    ["jobs/eval_cls.py", "--config", "configs/eval/synthetic_cls.yaml"],
], ids=["stage job", "eval job", "fine-tuning job", "classification test job"])  # fmt: skip
def test_config_error_is_one_line_on_stderr_not_a_traceback(job, tmp_path):
    argv = [sys.executable, *job, f"output_dir={tmp_path}", "tracking.uri=[http://u:pw-9x@mlflow:5000]"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "pw-9x" not in done.stderr  # the message is redacted too
    assert done.stderr.strip().splitlines() == [
        "error: tracking.uri: expected a string, got ['http://u:***@mlflow:5000']"]
