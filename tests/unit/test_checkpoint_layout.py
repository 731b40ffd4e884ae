"""The checkpoint format (pipeline/checkpointing/layout.py): what a real checkpoint holds, what makes one complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from pipeline.checkpointing import LocalCheckpointStore, layout
from pipeline.checkpointing.stores import NoCompleteCheckpointError
from pipeline.config import load_config
from pipeline.engine import train

FS = fsspec.filesystem("file")


def fake_checkpoint(root: Path, step: int, world: int = 2, zero_stage: int = 1, frozen: bool = False) -> Path:
    """Every file the layout names, empty: what `problems` checks is their presence."""
    path = root / layout.checkpoint_dir_name(step)
    (path / layout.DEEPSPEED_TAG).mkdir(parents=True)
    (path / layout.MANIFEST).write_text(json.dumps(layout.manifest(step, world, zero_stage, frozen)))
    names = [layout.CONFIG, layout.LATEST, *(layout.rank_state_name(r) for r in range(world))]
    names += [f"{layout.DEEPSPEED_TAG}/{layout.MODEL_STATES[0]}"]
    names += [f"{layout.DEEPSPEED_TAG}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)
              if zero_stage]  # fmt: skip
    names += [layout.FROZEN_STUDENT] if frozen else []
    for name in names:
        (path / name).touch()
    return path


@pytest.mark.parametrize(("remove", "problem"), [
    (layout.MANIFEST, "no checkpoint.json (rank 0 writes it)"),
    ("rank1_state.pt", "rank1_state.pt missing"),
    (layout.LATEST, "latest missing"),
    (layout.CONFIG, "config.yaml missing"),
    (layout.FROZEN_STUDENT, "frozen_student.pt missing"),
    (f"{layout.DEEPSPEED_TAG}/{layout.MODEL_STATES[0]}", "state/mp_rank_00_model_states.pt missing"),
    (f"{layout.DEEPSPEED_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt",
     "1 optimizer shard(s) in state/ for 2 rank(s) of a ZeRO-1 run"),
    (layout.DEEPSPEED_TAG, "no DeepSpeed tag folder state/"),
])  # fmt: skip
def test_each_missing_piece_is_named(tmp_path, remove, problem):
    path = fake_checkpoint(tmp_path, 10, frozen=True)
    assert layout.problems(FS, str(path)) == []
    target = path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert problem in "; ".join(layout.problems(FS, str(path)))


def sized_checkpoint(root: Path, step: int) -> Path:
    """`fake_checkpoint` with content in every file and their sizes in `checkpoint.json`, as the engine writes it."""
    path = fake_checkpoint(root, step)
    for name in layout.file_sizes(path):
        if name != layout.MANIFEST:
            (path / name).write_bytes(b"x" * 100)
    files = {k: v for k, v in layout.file_sizes(path).items() if k != layout.MANIFEST}
    (path / layout.MANIFEST).write_text(json.dumps(layout.manifest(step, 2, 1, False, files)))
    return path


def test_a_truncated_or_absent_file_is_named_with_its_sizes(tmp_path):
    path = sized_checkpoint(tmp_path, 10)
    assert layout.problems(FS, str(path)) == []
    (path / "rank0_state.pt").write_bytes(b"x" * 40)  # an upload cut short
    shard = path / layout.DEEPSPEED_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 100 + b"y")
    assert layout.problems(FS, str(path)) == [
        "rank0_state.pt is 40 bytes, checkpoint.json says 100 (truncated or rewritten)",
        f"{shard.relative_to(path)} is 101 bytes, checkpoint.json says 100 (truncated or rewritten)",
    ]
    (path / "zero_to_fp32.py").touch()  # files the manifest does not list are no problem
    manifest = json.loads((path / layout.MANIFEST).read_text())
    manifest["files"]["extra/by_rank_3.pt"] = 7
    (path / layout.MANIFEST).write_text(json.dumps(manifest))
    assert "extra/by_rank_3.pt missing" in layout.problems(FS, str(path))
    shutil.rmtree(path / layout.DEEPSPEED_TAG)  # the tag folder is named once, not file by file
    assert [p for p in layout.problems(FS, str(path)) if "state/" in p] == ["no DeepSpeed tag folder state/"]


def test_an_unreadable_manifest_is_a_problem_not_a_crash(tmp_path):
    path = sized_checkpoint(tmp_path, 10)
    (path / layout.MANIFEST).write_text('{"step": 10, "world_')  # cut mid-write
    (problem,) = layout.problems(FS, str(path))
    assert problem.startswith("checkpoint.json is unreadable (JSONDecodeError")


def test_without_zero_the_optimizer_shards_may_be_absent(tmp_path):
    assert layout.problems(FS, str(fake_checkpoint(tmp_path, 10, world=3, zero_stage=0))) == []


def test_the_newest_complete_checkpoint_is_chosen_and_the_newer_ones_say_why(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    (fake_checkpoint(tmp_path, 30) / "rank1_state.pt").unlink()  # rank 1's files have not arrived
    (tmp_path / ".staging_checkpoint_00000040").mkdir()  # the local store's staging folder is no checkpoint
    newest, skipped = layout.newest_complete(FS, str(tmp_path))
    assert newest == str(tmp_path / "checkpoint_00000020")
    assert skipped == ["checkpoint_00000030: rank1_state.pt missing"]
    assert LocalCheckpointStore(tmp_path, keep=2).checkpoints() == [tmp_path / "checkpoint_00000010",
                                                                     tmp_path / "checkpoint_00000020"]
    assert layout.newest_complete(FS, str(tmp_path / "nothing")) == (None, [])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_real_checkpoint_is_complete_and_holds_what_the_layout_says(tmp_path, zero_stage):
    cfg = load_config(None, [
        "task.name=toy", "stage=toy", "scaling.use_ray=false", f"output_dir={tmp_path}/out",
        f"checkpoint.path={tmp_path}/ckpt", "tracking.enabled=false", f"deepspeed.zero_stage={zero_stage}",
        "optim.max_steps=2", "checkpoint.interval_steps=1", "checkpoint.keep=1",
    ])  # fmt: skip
    train(cfg)
    run = tmp_path / "ckpt" / "toy"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000002", "result.json"]  # keep=1
    path = run / "checkpoint_00000002"
    assert layout.problems(FS, str(path)) == []
    written = {k: v for k, v in layout.file_sizes(path).items() if k not in (layout.MANIFEST, layout.METRICS)}
    assert json.loads((path / layout.MANIFEST).read_text()) == layout.manifest(2, 1, zero_stage, False, written)
    assert "rank0_state.pt" in written and f"{layout.DEEPSPEED_TAG}/{layout.MODEL_STATES[0]}" in written
    assert (path / layout.LATEST).read_text() == layout.DEEPSPEED_TAG
    assert {layout.CONFIG, layout.METRICS, "rank0_state.pt"} <= {p.name for p in path.iterdir()}
    assert layout.stage_export_path(cfg.output_dir).is_file()


def test_a_run_whose_every_checkpoint_is_incomplete_is_not_silently_restarted(tmp_path):
    (fake_checkpoint(tmp_path, 10) / "rank0_state.pt").unlink()
    with pytest.raises(NoCompleteCheckpointError, match=r"no complete checkpoint in .*checkpoint_00000010: "
                       r"rank0_state.pt missing.*another tracking.run_name"):  # fmt: skip
        with LocalCheckpointStore(tmp_path, keep=2).restore():
            pass
    with LocalCheckpointStore(tmp_path / "fresh", keep=2).restore() as found:
        assert found is None  # no checkpoint at all: a fresh start
