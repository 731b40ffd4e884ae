"""Offline export of a stage-1 run whose student has frozen parameters (`student_feature=residual_before_last_block`
freezes the last block and norm_f). DeepSpeed's checkpoint leaves frozen parameters out; the engine saves the
student's own frozen ones in `frozen_student.pt`, and `jobs/export_checkpoint.py` must then give exactly the
engine's end-of-stage export. Real DeepSpeed on CPU (fp32, so the ZeRO master weights equal the module weights and
the match is bit for bit); a fixed list of batches replaces the loader (as
tests/unit/test_engine_resume_stage1.py does).
A resumed run takes its frozen parameters from that file too.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

from pathlib import Path

import pytest
import torch

from jobs.export_checkpoint import main as export_main
from pipeline.checkpointing import LocalCheckpointStore, run_storage
from pipeline.checkpointing.export import consolidate
from pipeline.checkpointing.layout import FROZEN_STUDENT
from pipeline.config import load_config
from pipeline.engine import Trainer
from pipeline.tasks import build_task

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 2, 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("zero_stage", "model"), [
    (2, "videomamba_test"),
    # ZeRO-3 leaves parameters under 1e5 elements unpartitioned (stage3_param_persistence_threshold); the tiny
    # model's 147k-element in_proj is partitioned, so the engine must gather the frozen block to save it.
    (3, "videomamba_tiny"),
])  # fmt: skip
def test_offline_export_of_a_frozen_last_block_equals_the_engine_export(tmp_path, tiny_synthetic, zero_stage, model):
    cfg = load_config(str(REPO / "configs/stages/pretrain_mask_test.yaml"), [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        "tracking.enabled=false", f"data.train_shards={tiny_synthetic['train_shards']}", "data.num_workers=0",
        f"data.batch_size={BATCH}", f"deepspeed.zero_stage={zero_stage}", f"optim.max_steps={STEPS}",
        f"checkpoint.interval_steps={STEPS}", "optim.warmup_steps=0", "optim.lr=1.0e-2",
        "task.student_feature=residual_before_last_block", f"model.name={model}", "model.num_frames=4",
        "model.img_size=32",
    ])  # fmt: skip
    trainer = Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))
    trainer.batches = iter([{"video": torch.randn(BATCH, 3, 4, 32, 32, generator=torch.Generator().manual_seed(s))}
                            for s in range(STEPS)])  # fmt: skip
    engine_export = torch.load(trainer.fit().export_path)

    student = trainer.task.student
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    last = f"layers.{student.depth - 1}."
    assert frozen == {name for name, _ in student.named_parameters() if name.startswith((last, "norm_f."))}
    checkpoint = tmp_path / "ckpt" / cfg.run_name / f"checkpoint_{STEPS:08d}"
    states_file = next((checkpoint / "state").glob("*mp_rank_00_model_states.pt"))  # ZeRO-3: zero_pp_rank_0_...
    module = torch.load(states_file, weights_only=False)["module"]
    assert not {f"student.{name}" for name in frozen} & set(module)  # DeepSpeed left them out ...
    assert set(torch.load(checkpoint / FROZEN_STUDENT)) == frozen  # ... the engine's own file has them

    out = tmp_path / "exported.pt"
    export_main([str(tmp_path / "ckpt" / cfg.run_name), str(out)])
    exported = torch.load(out)
    assert exported["meta"] == engine_export["meta"]
    assert sorted(exported["state_dict"]) == sorted(engine_export["state_dict"])
    for name, value in engine_export["state_dict"].items():
        assert exported["state_dict"][name].dtype == value.dtype == torch.float32, name
        assert torch.equal(exported["state_dict"][name], value), name

    # The run trained (the comparison is not between two copies of the initial weights), and the frozen part is
    # the seeded initial student, as the engine built it.
    torch.manual_seed(cfg.seed)
    initial = build_task(cfg).student.state_dict()
    for name in ("layers.0.mixer.in_proj.weight", "patch_embed.proj.weight"):
        assert not torch.equal(exported["state_dict"][name], initial[name]), name
    for name in frozen:
        assert torch.equal(exported["state_dict"][name], initial[name]), name

    # Resume puts the run's frozen parameters back from the file, not from the seed: a changed file shows up in
    # the resumed run's export (under ZeRO-3 through a gather whose rank-0 copy is scattered back).
    changed = {name: value + 1.0 for name, value in torch.load(checkpoint / FROZEN_STUDENT).items()}
    torch.save(changed, checkpoint / FROZEN_STUDENT)
    resumed = Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))
    assert resumed.step == STEPS
    resumed.batches = iter([])
    resumed_export = torch.load(resumed.fit().export_path)["state_dict"]
    for name in frozen:
        assert torch.equal(resumed_export[name], changed[name]), name

    # An older checkpoint without the file: the error names the frozen weights and what to use instead.
    (checkpoint / FROZEN_STUDENT).unlink()
    with pytest.raises(ValueError, match=rf"lacks \d+ frozen weight\(s\).*{last}.*has no frozen_student\.pt"):
        consolidate(checkpoint)
