"""Host syncs of the training step (pipeline/engine.py's step, pipeline/host_syncs.py; docs/performance.md).

On a CPU the counter counts Python-level reads of tensor values, which are host syncs on a GPU: that checks the
engine's logic (which values it reads, and when) on the toy task. On a GPU (marker `gpu`) torch's sync debug mode
counts the real syncs of real stage steps through the Trainer and DeepSpeed; only the ones this repository's
code makes are asserted (DeepSpeed's own are printed).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.host_syncs import REPO, SyncLog, count_host_syncs, print_summary, site_of

SHARDS = Path(__file__).resolve().parents[1] / "data" / "stage_losses_shards"
ENGINE_FLAG_READ = "pipeline/engine.py"


def trainer_for(tmp_path: Path, config: str | None, *overrides: str):
    from pipeline.checkpointing import LocalCheckpointStore, run_storage
    from pipeline.engine import Trainer

    cfg = load_config(config, [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        "tracking.enabled=false", "tracking.log_interval=1000", "checkpoint.interval_steps=1000", *overrides,
    ])  # fmt: skip
    return Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))


def step_syncs(trainer, steps: int) -> list[SyncLog]:
    """The host syncs of `steps` training steps (none of them a log step), after one step that warms up."""
    trainer.train_step()  # first step: capture of CUDA graphs, compilation, NCCL set-up
    logs = []
    for _ in range(steps):
        with count_host_syncs(trainer.device) as log:
            trainer.train_step()
        logs.append(log)
    return logs


def test_a_sync_is_charged_to_the_first_frame_outside_torch():
    import traceback

    inner = traceback.FrameSummary(str(Path(torch.__file__).parent / "_tensor.py"), 10, "item")
    ours = traceback.FrameSummary(str(REPO / "pipeline" / "engine.py"), 123, "any_rank_flags")
    test = traceback.FrameSummary(str(REPO / "tests" / "test_x.py"), 5, "test")
    assert str(site_of([test, ours, inner])) == "pipeline/engine.py:123 (any_rank_flags)"
    assert site_of([test, inner]).origin == "caller"
    x = torch.ones(3)
    with count_host_syncs("cpu") as log:
        float(x.sum())
        x.tolist()
    assert [(site.origin, site.function) for site in log.sites] == [
        ("caller", "test_a_sync_is_charged_to_the_first_frame_outside_torch")] * 2
    assert "item" not in vars(torch.Tensor) and x.sum().item() == 3.0  # the methods are torch's again


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nonfinite,zero_stage,accum,reads", [
    ("stop", 2, 1, 1), ("stop", 2, 3, 1), ("stop", 0, 2, 1),  # the step's flags (and dense grad norm): one read
    ("skip", 2, 3, 3),  # one per micro-batch: each must be known good before its backward
    ("skip", 0, 1, 2),  # + the gradient norm without ZeRO, read at the update
])
def test_engine_step_reads_the_device_once_per_step_outside_log_steps(tmp_path, nonfinite, zero_stage, accum, reads):
    """The toy task's forward reads nothing back, so every read here is the engine's: the loss parts and the
    gradient norm stay on the device until the log step."""
    trainer = trainer_for(tmp_path, "configs/stages/toy.yaml", f"nonfinite={nonfinite}",
                          f"deepspeed.zero_stage={zero_stage}", f"deepspeed.grad_accum_steps={accum}",
                          "scaling.num_workers=1")
    for log in step_syncs(trainer, steps=3):
        assert len(log.ours) == reads, log.summary()
        assert {site.function for site in log.ours} == {"any_rank_flags"}, log.summary()
    # The log step's metrics: every loss part, averaged over the window, and the gradient norm, in one read.
    with count_host_syncs("cpu") as log:
        metrics = trainer.window_metrics()
    assert [site.function for site in log.ours] == ["window_metrics"], log.summary()
    assert {"train/loss", "train/mse", "train/mae", "train/grad_norm"} <= set(metrics)
    assert metrics["train/loss"] == pytest.approx(metrics["train/mse"]) and metrics["train/grad_norm"] > 0


# ----------------------------------------------------------------------------- on a GPU


def _teacher_export(path: Path) -> str:
    from models import create_model

    kwargs = {"num_frames": 4, "img_size": 32, "num_classes": 0}
    torch.manual_seed(0)
    teacher = create_model("videomamba_test", **kwargs)
    torch.save({"state_dict": teacher.state_dict(),
                "meta": {"task": "masked_alignment", "model_name": "videomamba_test", "model_kwargs": kwargs}}, path)
    return str(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["toy", "self_distill", "classification"])
def test_stage_steps_sync_at_most_once_on_a_gpu(tmp_path, tiny_synthetic, stage):
    """Real steps (DeepSpeed bf16 ZeRO-1, Triton scan, CUDA graphs, the pipeline's loader on real shards): the
    repository's code syncs once per step (the engine's non-finite read); the tasks and models not at all."""
    common = ["model.scan_backend=triton", "model.cuda_graph=true", "data.batch_size=4", "data.num_workers=1"]
    if stage == "toy":
        trainer = trainer_for(tmp_path, "configs/stages/toy.yaml", "scaling.num_workers=1")
    elif stage == "self_distill":
        trainer = trainer_for(tmp_path, "configs/stages/self_distill_test.yaml", *common,
                              f"task.teacher_checkpoint={_teacher_export(tmp_path / 'teacher.pt')}",
                              f"data.train_shards={SHARDS}", "data.mask.type=tube", "data.mask.ratio=0.5")
    else:
        root = Path(tiny_synthetic["train_shards"]).parents[1]
        trainer = trainer_for(tmp_path, "configs/stages/finetune_test.yaml", *common,
                              f"data.train_shards={tiny_synthetic['train_shards']}", "data.eval_shards=null",
                              f"task.class_index={root}/classes.txt", "task.ema_decay=0.99")
    logs = step_syncs(trainer, steps=3)
    for i, log in enumerate(logs):
        print_summary(f"{stage} step {i + 2}", log)
    for log in logs:
        assert len(log.ours) == 1 and log.ours[0].file == ENGINE_FLAG_READ, log.summary()
