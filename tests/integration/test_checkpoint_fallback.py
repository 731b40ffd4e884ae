"""A half-uploaded or truncated latest checkpoint is skipped, named with what is wrong, for the previous complete one.

Real runs of the toy task (DeepSpeed ZeRO-2 on CPU): on the local path, and under Ray Train with checkpoints on a
moto S3 server through s3fs, as in production. Ray's own checkpoint list (reloaded from storage on a resubmission)
names the damaged checkpoint as the latest, so the workers' check matters as much as the driver's scan.
"""

from __future__ import annotations

import logging

import pytest

from pipeline.checkpointing import layout
from pipeline.config import load_config

SKIPPED = "skipping incomplete checkpoint(s)"


def toy_overrides(tmp_path, checkpoint_path: str, *more: str) -> list[str]:
    return [
        "task.name=toy", "stage=toy", "deepspeed.zero_stage=2", f"output_dir={tmp_path}/out",
        f"checkpoint.path={checkpoint_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "data.batch_size=8",
        "checkpoint.interval_steps=10", "checkpoint.keep=3", "tracking.log_interval=10", *more,
    ]  # fmt: skip


def skip_warnings(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if SKIPPED in r.getMessage())


@pytest.mark.timeout(300)
def test_local_resume_skips_a_truncated_and_a_half_written_checkpoint(tmp_path, caplog):
    from pipeline.engine import train

    overrides = toy_overrides(tmp_path, f"{tmp_path}/ckpt", "scaling.use_ray=false")
    first = train(load_config(None, [*overrides, "optim.max_steps=30"]))
    run = tmp_path / "ckpt" / "toy"
    latest = run / layout.checkpoint_dir_name(30)
    state = latest / "rank0_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short, e.g. by a copy to shared storage that died
    (run / layout.checkpoint_dir_name(20) / layout.DEEPSPEED_TAG / layout.MODEL_STATES[0]).unlink()

    caplog.set_level(logging.WARNING)
    second = train(load_config(None, [*overrides, "optim.max_steps=40"]))
    assert (second.resumed_from_step, second.step) == (10, 40)
    assert second.mlflow_run_id == first.mlflow_run_id
    warned = skip_warnings(caplog)
    assert "checkpoint_00000030: rank0_state.pt is 100 bytes, checkpoint.json says" in warned
    assert "checkpoint_00000020: state/mp_rank_00_model_states.pt missing" in warned
    assert f"resuming from {run / layout.checkpoint_dir_name(10)}" in warned


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_ray_resume_on_s3_skips_a_half_uploaded_and_a_truncated_checkpoint(tmp_path, monkeypatch, moto_s3, caplog):
    import ray
    import s3fs

    from pipeline.launch import launch

    fs = s3fs.S3FileSystem()
    fs.mkdir("ckpts-fallback")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    overrides = toy_overrides(tmp_path, "s3://ckpts-fallback/runs", "scaling.use_ray=true", "scaling.num_workers=1",
                              "scaling.use_gpu=false")  # fmt: skip
    run = "ckpts-fallback/runs/toy"
    try:
        first = launch(load_config(None, [*overrides, "optim.max_steps=30"]))
        assert first.step == 30
        # checkpoint 30 half uploaded: its DeepSpeed folder never arrived; checkpoint 20: a shard cut short
        fs.rm(f"{run}/{layout.checkpoint_dir_name(30)}/{layout.DEEPSPEED_TAG}", recursive=True)
        shard = f"{run}/{layout.checkpoint_dir_name(20)}/rank0_state.pt"
        fs.pipe(shard, fs.cat(shard)[:100])

        caplog.set_level(logging.WARNING)
        second = launch(load_config(None, [*overrides, "optim.max_steps=40"]))
        assert (second.resumed_from_step, second.step) == (10, 40)
        assert second.mlflow_run_id == first.mlflow_run_id
        warned = skip_warnings(caplog)  # the driver's scan; the workers log the same in their own output
        assert "checkpoint_00000030: no DeepSpeed tag folder state/" in warned
        assert "checkpoint_00000020: rank0_state.pt is 100 bytes, checkpoint.json says" in warned
        fs.invalidate_cache()
        assert layout.problems(fs, f"{run}/{layout.checkpoint_dir_name(40)}") == []
    finally:
        ray.shutdown()
