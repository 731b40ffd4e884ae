"""Stage 2: self-distillation: a trained smaller VideoMamba teaches a larger student (paper §3.3; docs/stages.md).

The student's final tokens (all of them, after norm_f) go through `distill_head` (RMSNorm + Linear to the
teacher's width; identity when the widths agree) and are pulled towards the frozen teacher's final tokens:
mean over batch and tokens of 2 - 2 cos. The paper adds this, with weight 1, to the student's
cross-entropy on ImageNet; our video shards carry no labels, so the loss here is the distillation term,
optionally plus stage 1's alignment to a frozen CLIP teacher (`clip_weight`, logged as `clip`).

With a data-side mask (`data.mask`) the student sees the visible tokens only, while the teacher sees the
whole clip and its targets are taken at the student's positions (cheaper student, full-context targets).

With `model.cuda_graph` on a GPU the student's forward and backward replay from CUDA graphs and the frozen
teacher's forward from a forward-only graph (pipeline/cuda_graph.py; docs/stages.md); the heads and losses run
eagerly. The step reads nothing back from the GPU: the visible-token count comes from the mask type.

Legend: B batch, L tokens (CLS first), D student width, Dt teacher width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models import create_model, load_pretrained
from models.teachers import CLIPTeacher
from pipeline.config import ConfigError, TaskConfig
from pipeline.cuda_graph import GraphedBackbone, GraphedInference
from pipeline.flops import clip_vision_flops, head_flops, videomamba_flops
from pipeline.losses import cosine_alignment_loss
from pipeline.tasks.backbone import backbone_export_meta, build_student, shapes_only
from pipeline.tasks.base import Task
from pipeline.tasks.clip_alignment import ClipTokenAlignment, visible_tokens
from pipeline.tasks.clip_teacher import CLIPTeacherConfig, clip_teacher_for
from pipeline.tasks.spec import TaskSpec, register_task
from pipeline.tasks.token_masks import TokenMasks


@dataclass
class SelfDistillConfig(TaskConfig):
    teacher_checkpoint: str | None = None
    """Teacher weights: an earlier stage's export (`<output_dir>/export/model.pt`) or a released VideoMamba file."""
    teacher_model: str | None = None
    """Registered teacher size (e.g. videomamba_small); None = the `model_name` stored in the export's meta."""
    teacher_model_kwargs: dict[str, Any] = field(default_factory=dict)
    """create_model overrides of the teacher (num_frames, img_size, ...); merged over the export's own."""
    distill_weight: float = 1.0
    """Weight of the feature-distillation loss (1.0 in the paper)."""
    clip_weight: float = 0.0
    """Weight of an extra alignment of the student's final visible tokens to a frozen CLIP teacher (stage 1's
    head and loss; pipeline/tasks/clip_alignment.py); 0 = off, no CLIP teacher is built."""
    clip_teacher: CLIPTeacherConfig = field(default_factory=CLIPTeacherConfig)
    """The CLIP teacher for `clip_weight` (stage 1's teacher settings)."""

    def __post_init__(self) -> None:
        if not self.teacher_checkpoint:
            raise ConfigError("task.teacher_checkpoint: required; set it to the smaller model's stage export "
                              "(e.g. outputs/<stage>/export/model.pt) or a released VideoMamba checkpoint")
        if self.distill_weight <= 0:
            raise ConfigError(f"task.distill_weight: must be > 0, got {self.distill_weight}")
        if self.clip_weight < 0:
            raise ConfigError(f"task.clip_weight: must be >= 0, got {self.clip_weight}")


class FrozenBackbone(nn.Module):
    """A VideoMamba without gradients that stays in eval mode when its parent task trains."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)

    @torch.no_grad()
    def forward(self, video_BCTHW: Tensor) -> Tensor:
        """Final tokens after norm_f, (B, L, Dt); bf16 autocast on GPU (fp32 on CPU)."""
        device_type = video_BCTHW.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            return self.model.forward_features(video_BCTHW).tokens_BLD


def build_teacher(task_cfg: SelfDistillConfig) -> FrozenBackbone:
    """Rebuild the teacher named in the config or in its export's meta, and load its weights."""
    path = task_cfg.teacher_checkpoint
    if shapes_only() and task_cfg.teacher_model:  # a dry run before the teacher's stage has run
        return FrozenBackbone(create_model(task_cfg.teacher_model, **task_cfg.teacher_model_kwargs, num_classes=0))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task.teacher_checkpoint: {path!r} does not exist; run the teacher's stage first "
                                "or point it at a released VideoMamba checkpoint")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    name = task_cfg.teacher_model or meta.get("model_name")
    if name is None:
        raise ConfigError(f"task.teacher_model: {path} carries no model name (not a stage export); "
                          "set task.teacher_model, e.g. videomamba_small")
    kwargs = {**meta.get("model_kwargs", {}), **task_cfg.teacher_model_kwargs, "num_classes": 0}
    teacher = create_model(name, **kwargs)
    report = load_pretrained(teacher, blob)
    if report.missing:
        raise ValueError(f"task.teacher_checkpoint: {path} lacks tensors {report.missing[:8]} of {name}; "
                         "check task.teacher_model")
    return FrozenBackbone(teacher)


class SelfDistillTask(Task):
    """Student VideoMamba + distill_head, frozen teacher; loss = distill_weight * mean(2 - 2 cos) [+ clip]."""

    def __init__(self, student: nn.Module, teacher: FrozenBackbone, distill_weight: float = 1.0,
                 clip_teacher: CLIPTeacher | None = None, clip_weight: float = 0.0, mask_type: str = "none",
                 mask_ratio: float = 0.8, export_meta: dict[str, Any] | None = None, cuda_graph: bool = False,
                 cuda_graph_required: bool = False) -> None:
        super().__init__()
        if (clip_weight > 0) != (clip_teacher is not None):
            raise ValueError("a CLIP teacher goes with clip_weight > 0, and only then")
        self.student = student
        self.teacher = teacher
        self.clip_teacher = clip_teacher
        self.clip_weight = clip_weight
        self.clip_alignment = ClipTokenAlignment(student, clip_teacher) if clip_teacher is not None else None
        width, teacher_width = student.embed_dim, teacher.model.embed_dim
        # The paper's head is RMSNorm + Linear; with equal widths the features are compared directly.
        self.distill_head = (nn.Sequential(nn.RMSNorm(width, eps=1e-5), nn.Linear(width, teacher_width))
                             if width != teacher_width else nn.Identity())
        self.distill_weight = distill_weight
        self.masks = TokenMasks(mask_type, mask_ratio, seed=0)  # data-side or none (`build` refuses attention)
        self._export_meta = dict(export_meta or {})
        self._student_runner = GraphedBackbone(student, (), "the student", enabled=cuda_graph,
                                               required=cuda_graph_required)
        self._teacher_runner = GraphedInference(teacher, "the teacher", enabled=cuda_graph,
                                                required=cuda_graph_required)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        video_BCTHW = batch["video"]
        keep_BL = self.masks(batch, None, video_BCTHW.device)
        index_BK = self.masks.visible_index(keep_BL, self.student)
        target_BLD = visible_tokens(self._teacher_runner(video_BCTHW, training=self.training), index_BK)
        tokens_BLD = self._student_runner(video_BCTHW, index_BK, self.training).tokens_BLD
        distill = cosine_alignment_loss(self.distill_head(tokens_BLD), target_BLD)
        out = {"loss": self.distill_weight * distill, "distill": distill.detach()}
        if self.clip_alignment is not None:
            clip_targets_BLC = self.clip_teacher(video_BCTHW).targets_KBLC[0]
            clip = self.clip_alignment(tokens_BLD, clip_targets_BLC, index_BK)
            out.update(loss=out["loss"] + self.clip_weight * clip, clip=clip.detach())
        return out

    def trainable_module(self) -> nn.Module:
        return self.student

    def flops_per_sample(self) -> float:
        """Student and heads over its visible tokens (3x forward); the teachers' forwards (pipeline/flops.py)."""
        student, teacher = self.student, self.teacher.model
        tokens = 1 + self.masks.visible_patches(*student.grid)
        flops = videomamba_flops(student, tokens) + videomamba_flops(teacher, 1 + teacher.grid[0] * teacher.num_patches)
        if isinstance(self.distill_head, nn.Sequential):
            flops += head_flops(self.distill_head[1], tokens)
        if self.clip_alignment is not None:
            flops += clip_vision_flops(self.clip_teacher, student.num_frames)
            flops += head_flops(self.clip_alignment.head.head, tokens)
        return flops

    def export_metadata(self) -> dict[str, Any]:
        return dict(self._export_meta)


def build(cfg) -> SelfDistillTask:
    task_cfg: SelfDistillConfig = cfg.task
    if cfg.data.mask.type == "attention":
        raise ConfigError("data.mask.type: attention masks are made by the masked-alignment and video-text tasks; "
                          "self-distillation takes data-side masks (random, tube, tube_row, random_row) or none")
    student = build_student(cfg)
    teacher = build_teacher(task_cfg)
    clip_teacher = clip_teacher_for(task_cfg.clip_teacher, student, num_layers=1) if task_cfg.clip_weight > 0 else None
    return SelfDistillTask(student, teacher, task_cfg.distill_weight, clip_teacher, task_cfg.clip_weight,
                           mask_type=cfg.data.mask.type, mask_ratio=cfg.data.mask.ratio,
                           export_meta=backbone_export_meta(cfg), cuda_graph=cfg.cuda_graph_wanted(),
                           cuda_graph_required=cfg.model.cuda_graph is True)


# The student is larger than its teacher and starts from scratch (as in the paper): `from:` names the teacher.
# Graphed steps are opt-in (`model.cuda_graph=true`) until they have run on a GPU.
register_task(TaskSpec(name="self_distill", config=SelfDistillConfig, build=build, init_key="task.teacher_checkpoint",
                       cuda_graph=True, cuda_graph_auto=False))
