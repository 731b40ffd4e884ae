"""Checkpoint files are read weights-only: a crafted pickle in a checkpoint folder is refused, its code never runs.

A real ZeRO-2 toy checkpoint (DeepSpeed on CPU) gets one file replaced by a pickle whose `__reduce__` runs a shell
command (it would create a marker file), and its `checkpoint.json` sizes rewritten to match, as someone who can
write to the checkpoint bucket would. Resuming (our loads and DeepSpeed's `engine.load_checkpoint`) and the offline
export (our loads and DeepSpeed's `zero_to_fp32`) must refuse it, naming the file, without creating the marker.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fsspec
import pytest
import torch

from pipeline.checkpointing import layout
from pipeline.checkpointing.export import export_checkpoint
from pipeline.checkpointing.safe_load import UnsafeCheckpointError
from pipeline.config import load_config
from pipeline.engine import train

CHECKPOINT = layout.checkpoint_dir_name(2)
MODEL_STATES = f"{layout.DEEPSPEED_TAG}/{layout.MODEL_STATES[0]}"
OPTIMIZER_SHARD = f"{layout.DEEPSPEED_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class ShellPayload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def toy_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [
        "task.name=toy", "stage=toy", "scaling.use_ray=false", f"output_dir={tmp_path}/out",
        f"checkpoint.path={tmp_path}/ckpt", "tracking.enabled=false", "data.batch_size=8",
        "deepspeed.zero_stage=2", "checkpoint.interval_steps=1", "checkpoint.keep=1", *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """The run folder of a real 2-step ZeRO-2 toy run (one checkpoint, step 2)."""
    root = tmp_path_factory.mktemp("clean")
    train(toy_cfg(root, "optim.max_steps=2"))
    return root / "ckpt" / "toy"


def plant(run: Path, name: str, marker: Path) -> Path:
    """Replace checkpoint file `name` with the payload, keeping the content a real file has around it, and make
    `checkpoint.json` promise its new size (so the checkpoint looks complete)."""
    path = run / CHECKPOINT / name
    original = torch.load(path, weights_only=False)  # our own clean file, written by the fixture's run
    torch.save({**original, "payload": ShellPayload(marker)}, path)
    manifest_path = run / CHECKPOINT / layout.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    assert layout.problems(fsspec.filesystem("file"), str(run / CHECKPOINT)) == []
    return path


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["rank0_state.pt", MODEL_STATES, OPTIMIZER_SHARD])
def test_resume_refuses_a_planted_pickle_and_never_runs_it(tmp_path, clean_run, name):
    shutil.copytree(clean_run, tmp_path / "ckpt" / "toy")
    marker = tmp_path / "payload_ran"
    planted = plant(tmp_path / "ckpt" / "toy", name, marker)
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as refused:
        train(toy_cfg(tmp_path, "optim.max_steps=3"))
    assert str(planted) in str(refused.value)
    assert "posix.system" in str(refused.value)  # what the file asked for
    assert not marker.exists(), "the payload ran"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", [MODEL_STATES, OPTIMIZER_SHARD])
def test_export_refuses_a_planted_pickle_and_never_runs_it(tmp_path, clean_run, name):
    shutil.copytree(clean_run, tmp_path / "run")
    marker = tmp_path / "payload_ran"
    planted = plant(tmp_path / "run", name, marker)
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as refused:
        export_checkpoint(str(tmp_path / "run"), str(tmp_path / "model.pt"))
    assert str(planted) in str(refused.value)
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.timeout(240)
def test_a_clean_checkpoint_still_resumes_and_exports_weights_only(tmp_path, clean_run):
    shutil.copytree(clean_run, tmp_path / "ckpt" / "toy")
    result = train(toy_cfg(tmp_path, "optim.max_steps=3"))
    assert (result.resumed_from_step, result.step) == (2, 3)
    _, meta = export_checkpoint(str(tmp_path / "ckpt" / "toy"), str(tmp_path / "model.pt"))
    assert meta["step"] == 3


@pytest.mark.timeout(240)
def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path, clean_run):
    shutil.copytree(clean_run, tmp_path / "ckpt" / "toy")
    shapes = r"does not fit this task: 3 tensor\(s\) of another shape.*model.0.weight \(32, 16\) != \(8, 16\)"
    with pytest.raises(RuntimeError, match=shapes + ".*resume with the config the run was started with"):
        train(toy_cfg(tmp_path, "optim.max_steps=3", "task.hidden_dim=8"))
