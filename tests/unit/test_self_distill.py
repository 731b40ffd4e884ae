"""Stage 2 (pipeline/tasks/self_distill.py): zero loss for an identical student, learning, masks, teacher loading."""

from __future__ import annotations

import pytest
import torch

from models import create_model, load_pretrained
from pipeline.config import ConfigError, load_config
from pipeline.losses import cosine_alignment_loss
from pipeline.tasks import build_task

CONFIG = "configs/stages/self_distill_test.yaml"


def write_teacher_export(path, seed: int = 0) -> torch.nn.Module:
    """A videomamba_test 'stage export' as the engine writes it, with the meta that rebuilds the model."""
    torch.manual_seed(seed)
    kwargs = {"num_frames": 4, "img_size": 32, "scan_backend": "ref", "num_classes": 0}
    teacher = create_model("videomamba_test", **kwargs)
    torch.save({"state_dict": teacher.state_dict(),
                "meta": {"task": "masked_alignment", "model_name": "videomamba_test", "model_kwargs": kwargs}}, path)
    return teacher


def distill_task(teacher_path, *overrides: str):
    torch.manual_seed(1)
    return build_task(load_config(CONFIG, [f"task.teacher_checkpoint={teacher_path}", "task.teacher_model=null",
                                           "model.scan_backend=ref", *overrides]))


def clip(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_loss_is_zero_for_a_student_identical_to_its_teacher(tmp_path):
    teacher = write_teacher_export(tmp_path / "teacher.pt")
    task = distill_task(tmp_path / "teacher.pt", "model.name=videomamba_test")
    assert isinstance(task.distill_head, torch.nn.Identity)  # equal widths: compared directly
    task.student.load_state_dict(teacher.state_dict())
    task.train()
    assert not task.teacher.training  # the frozen teacher ignores the task's train()
    out = task({"video": clip()})
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    # ... and it is the loss of the features: a perturbed student is penalised.
    with torch.no_grad():
        task.student.norm_f.weight.add_(torch.randn_like(task.student.norm_f.weight))
    assert task({"video": clip()})["loss"].item() > 1e-3


def test_wider_student_learns_the_teachers_features(tmp_path):
    teacher = write_teacher_export(tmp_path / "teacher.pt")
    task = distill_task(tmp_path / "teacher.pt")  # videomamba_test_wide (48) <- videomamba_test (32)
    assert task.student.embed_dim == 48 and task.teacher.model.embed_dim == 32
    task.train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    video = clip(batch=4)
    losses = []
    for _ in range(6):
        out = task({"video": video})
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["distill"].item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(p.grad is None for p in task.teacher.parameters())
    torch.testing.assert_close(task.teacher.model.state_dict()["norm_f.weight"], teacher.state_dict()["norm_f.weight"])


def test_masked_student_is_compared_at_its_visible_positions(tmp_path):
    write_teacher_export(tmp_path / "teacher.pt")
    task = distill_task(tmp_path / "teacher.pt", "task.distill_weight=2.0", "data.mask.type=tube")
    task.eval()
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, ::4] = True  # one patch per frame
    video = clip()
    with torch.no_grad():
        out = task({"video": video, "keep": keep})
        student = task.distill_head(task.student.forward_features(video, keep_BL=keep).tokens_BLD)
        full = task.teacher(video)
        target = torch.cat([full[:, :1], full[:, 1::4]], dim=1)  # CLS + patches 0, 4, 8, 12
    expected = cosine_alignment_loss(student, target)
    torch.testing.assert_close(out["distill"], expected)
    torch.testing.assert_close(out["loss"], 2.0 * expected)


def test_export_is_the_student_backbone(tmp_path):
    write_teacher_export(tmp_path / "teacher.pt")
    task = distill_task(tmp_path / "teacher.pt")
    meta = task.export_metadata()
    assert meta["model_name"] == "videomamba_test_wide"
    fresh = create_model(meta["model_name"], **meta["model_kwargs"])
    report = load_pretrained(fresh, task.trainable_module().state_dict())
    assert report.missing == [] and report.unexpected == []


def test_teacher_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="task.teacher_checkpoint"):
        load_config(CONFIG, ["task.teacher_checkpoint=null"])
    with pytest.raises(FileNotFoundError, match="task.teacher_checkpoint"):
        distill_task(tmp_path / "missing.pt")
    torch.save(create_model("videomamba_test", num_classes=0).state_dict(), tmp_path / "raw.pt")
    with pytest.raises(ConfigError, match="task.teacher_model"):  # a raw state dict does not say which model
        distill_task(tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="shape"):  # the wrong size named
        distill_task(tmp_path / "raw.pt", "task.teacher_model=videomamba_test_wide")


def test_optional_clip_alignment_adds_stage_one_loss(tmp_path):
    write_teacher_export(tmp_path / "teacher.pt")
    task = distill_task(tmp_path / "teacher.pt", "task.clip_weight=0.5", "task.clip_teacher.pretrained=null",
                        "task.clip_teacher.vision_overrides={layers: 1, width: 64, head_width: 32}",
                        "data.mask.type=tube", "data.mask.ratio=0.5")
    task.train()
    keep = torch.tensor([[True, False, True, False] * 4] * 2)  # a tube mask: the same 2 patches in each frame
    out = task({"video": clip(), "keep": keep})
    assert set(out) == {"loss", "distill", "clip"}
    torch.testing.assert_close(out["loss"].detach(), out["distill"] + 0.5 * out["clip"])
    out["loss"].backward()
    assert task.clip_alignment.head.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.clip_teacher.parameters())
    with pytest.raises(ConfigError, match="data.mask.type"):
        distill_task(tmp_path / "teacher.pt", "data.mask.type=attention")
