"""Stage-1 checkpoints through the real engine (DeepSpeed ZeRO-2 on CPU): they hold the trainable state only (no
frozen CLIP teacher), and a run stopped at step 2 and resumed equals an uninterrupted run bit for bit, attention
masks included (their generator is restored, not reseeded).

The engine's own loader is replaced by a fixed list of batches (as tests/integration/test_engine_zero_ranks.py
does), so the
two runs see the same clips and only the checkpointed state decides whether they agree.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

from pathlib import Path

import pytest
import torch

from pipeline.checkpointing import LocalCheckpointStore, run_storage
from pipeline.config import load_config
from pipeline.engine import Trainer

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 4, 2


def stage1_cfg(tmp_path: Path, shards: str, *overrides: str):
    return load_config(str(REPO / "configs/stages/pretrain_mask_test.yaml"), [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        "tracking.enabled=false", f"data.train_shards={shards}", "data.num_workers=0", f"data.batch_size={BATCH}",
        "deepspeed.zero_stage=2", "checkpoint.interval_steps=2", "checkpoint.keep=3", "tracking.log_interval=1",
        # a constant LR, so that a run can be extended from 2 to 4 steps without changing its schedule
        "optim.lr=1.0e-3", "optim.min_lr=1.0e-3", "optim.warmup_steps=0", *overrides,
    ])  # fmt: skip


def fixed_batches(start: int) -> list[dict]:
    """The clips of steps start+1 .. STEPS (the same for every run)."""
    return [{"video": torch.randn(BATCH, 3, 4, 32, 32, generator=torch.Generator().manual_seed(step))}
            for step in range(start, STEPS)]  # fmt: skip


def run(cfg) -> tuple[Trainer, dict]:
    """Build a trainer (resuming if its run has a checkpoint), train on the fixed batches, return its export."""
    trainer = Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))
    trainer.batches = iter(fixed_batches(trainer.step))
    result = trainer.fit()
    return trainer, torch.load(result.export_path)["state_dict"]


def string_keys(obj) -> set[str]:
    """Every string dict key anywhere in a (nested) checkpoint object."""
    if isinstance(obj, dict):
        return {k for k in obj if isinstance(k, str)} | {k for v in obj.values() for k in string_keys(v)}
    if isinstance(obj, list | tuple):
        return {k for v in obj for k in string_keys(v)}
    return set()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_has_no_teacher_and_resume_is_exact(tmp_path, tiny_synthetic):
    shards = tiny_synthetic["train_shards"]
    mask = "data.mask.type=attention"  # drawn by the task from its own generator: resumed, not reseeded
    straight, straight_export = run(stage1_cfg(tmp_path, shards, mask, "tracking.run_name=straight",
                                               f"optim.max_steps={STEPS}"))  # fmt: skip

    # On disk: no tensor of the frozen teacher in any file, every trainable tensor in the module states.
    checkpoint = tmp_path / "ckpt" / "straight" / "checkpoint_00000002"
    keys = set().union(*(string_keys(torch.load(f, weights_only=False)) for f in checkpoint.rglob("*.pt")))
    teacher = {f"teacher.{name}" for name in straight.task.teacher.state_dict()}
    assert teacher and not keys & teacher
    module = torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    trainable = {name for name, p in straight.task.named_parameters() if p.requires_grad}
    assert trainable <= set(module) and not any(k.startswith("teacher.") for k in module)

    first, _ = run(stage1_cfg(tmp_path, shards, mask, "tracking.run_name=split", "optim.max_steps=2"))
    second, resumed_export = run(stage1_cfg(tmp_path, shards, mask, "tracking.run_name=split",
                                            f"optim.max_steps={STEPS}"))  # fmt: skip
    assert (first.resumed_from_step, second.resumed_from_step, second.step) == (None, 2, STEPS)
    assert sorted(resumed_export) == sorted(straight_export)
    for name, value in straight_export.items():
        torch.testing.assert_close(resumed_export[name], value, rtol=0, atol=0, msg=name)
    # the next masks both runs would draw are the same too
    attn = torch.rand(BATCH, 4, 4)
    assert torch.equal(second.task.masks.attention(attn), straight.task.masks.attention(attn))
