"""jobs/export_checkpoint.py: a run's ZeRO checkpoint -> the stage export the engine writes itself.

Real short local runs (DeepSpeed on CPU), consolidated with DeepSpeed's zero_to_fp32, compared with the engine's
own export (fp32 CPU training: the master weights equal the module weights, so the match is exact).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from jobs.export_checkpoint import main as export_main
from pipeline.checkpointing.export import CheckpointNotFoundError, export_checkpoint
from pipeline.config import load_config
from pipeline.engine import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toy_run(tmp_path, zero_stage: int, steps: int = 2):
    cfg = load_config(None, [
        "task.name=toy", "stage=toy", "scaling.use_ray=false", f"output_dir={tmp_path}/out",
        f"checkpoint.path={tmp_path}/ckpt", "tracking.enabled=false", "data.batch_size=8",
        f"deepspeed.zero_stage={zero_stage}", "optim.lr=0.03", f"optim.max_steps={steps}",
        "checkpoint.interval_steps=1", "checkpoint.keep=3",
    ])  # fmt: skip
    return train(cfg)


def assert_same_export(actual: dict, expected: dict) -> None:
    assert actual["meta"] == expected["meta"]
    assert sorted(actual["state_dict"]) == sorted(expected["state_dict"])
    for key, value in expected["state_dict"].items():
        assert actual["state_dict"][key].dtype == torch.float32, key
        torch.testing.assert_close(actual["state_dict"][key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero2_videomamba_export_equals_the_engine_export_and_loads(tmp_path):
    from models import create_model, load_pretrained
    from pipeline.data.synthetic import make_synthetic

    shards = make_synthetic(str(tmp_path / "data"), num_videos=4, num_frames=8, size=32, shard_size=2)
    cfg = load_config(os.path.join(REPO, "configs/stages/pretrain_mask_test.yaml"), [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        "tracking.enabled=false", f"data.train_shards={shards['train_shards']}", "deepspeed.zero_stage=2",
        "optim.max_steps=2", "optim.warmup_steps=0", "checkpoint.interval_steps=2", "data.batch_size=2",
        "data.num_workers=0",
    ])  # fmt: skip
    result = train(cfg)
    out = tmp_path / "exported" / "model.pt"
    export_main([str(tmp_path / "ckpt" / cfg.run_name), str(out)])  # the run folder -> its latest checkpoint

    exported, engine_export = torch.load(out), torch.load(result.export_path)
    assert_same_export(exported, engine_export)
    assert exported["meta"]["step"] == 2 and exported["meta"]["task"] == "masked_alignment"
    student = create_model(exported["meta"]["model_name"], **exported["meta"]["model_kwargs"])
    report = load_pretrained(student, out)
    assert report.missing == [] and report.unexpected == []
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, engine_export["state_dict"][key], rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_toy_export_equals_the_engine_export(tmp_path, zero_stage):
    result = toy_run(tmp_path, zero_stage)
    checkpoint = tmp_path / "ckpt" / "toy" / "checkpoint_00000002"
    source, meta = export_checkpoint(str(checkpoint), str(tmp_path / "toy.pt"))  # one checkpoint folder
    assert source == str(checkpoint) and meta["step"] == 2
    assert_same_export(torch.load(tmp_path / "toy.pt"), torch.load(result.export_path))


@pytest.mark.timeout(240)
def test_latest_complete_checkpoint_is_chosen_and_errors_say_why(tmp_path, moto_s3):
    import fsspec

    toy_run(tmp_path, zero_stage=2, steps=3)
    run = tmp_path / "ckpt" / "toy"
    steps = {n: torch.load(run / f"checkpoint_0000000{n}" / "state" / "mp_rank_00_model_states.pt",
                           weights_only=False)["step"] for n in (2, 3)}  # fmt: skip
    assert steps == {2: 2, 3: 3}
    # The newest checkpoint loses a rank's ZeRO shard: the run folder falls back to the one before it ...
    for shard in (run / "checkpoint_00000003" / "state").glob("*optim_states.pt"):
        shard.unlink()
    source, meta = export_checkpoint(str(run), str(tmp_path / "fallback.pt"))
    assert source.endswith("checkpoint_00000002") and meta["step"] == 2
    # ... and naming it directly says what is missing.
    incomplete = r"incomplete checkpoint: 0 optimizer shard\(s\) in state/ for 1 rank\(s\) of a ZeRO-2 run"
    with pytest.raises(CheckpointNotFoundError, match=incomplete):
        export_checkpoint(str(run / "checkpoint_00000003"), str(tmp_path / "x.pt"))
    with pytest.raises(CheckpointNotFoundError, match="no such folder"):
        export_checkpoint(str(tmp_path / "nope"), str(tmp_path / "x.pt"))
    with pytest.raises(CheckpointNotFoundError, match="holds no complete checkpoint"):
        export_checkpoint(str(tmp_path / "out"), str(tmp_path / "x.pt"))

    # From S3 (a real local S3 server) to S3: the run folder is downloaded only for the chosen checkpoint.
    fs = fsspec.filesystem("s3")
    fs.mkdir("bucket")
    shutil.rmtree(run / "checkpoint_00000003")
    fs.put(str(run), "bucket/ckpt/", recursive=True)
    source, meta = export_checkpoint("s3://bucket/ckpt/toy", "s3://bucket/exports/toy.pt")
    assert source == "s3://bucket/ckpt/toy/checkpoint_00000002"
    with fs.open("bucket/exports/toy.pt", "rb") as f:
        assert_same_export(torch.load(f), torch.load(tmp_path / "fallback.pt"))
