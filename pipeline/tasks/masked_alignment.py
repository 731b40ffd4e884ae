"""Stage 1: masked video pretraining against a frozen CLIP teacher (UMT-style, as released; docs/stages.md).

The CLIP teacher sees every frame whole. The VideoMamba student sees only the visible tokens (CLS + about
20% of the patches). At each aligned layer, a head (`clip_decoder.{k}`: Linear -> LayerNorm -> L2 norm)
maps the student's tokens to the teacher's output width, and the loss is mean(2 - 2 cos) against the
teacher's normalised tokens at the same positions (the CLS target is the frame-mean CLS).

Masks: `data.mask.type: attention` (the default of the paper) samples visible tokens per frame in proportion
to the teacher's CLS attention (pipeline/tasks/attention_mask.py); `random | tube | tube_row | random_row`
come from the data loader as `batch["keep"]`; `none` shows the student everything.

Which student feature is aligned at the last layer (`task.student_feature`, docs/stages.md):
- `final_norm` (default): the true final output, norm_f(residual + last mixer output).
- `residual_before_last_block`: the released code's quirk (its `(idx - 1) in return_index` test): the raw
  residual stream entering the last block. The last block and norm_f then get no gradient, so they are frozen.
Earlier aligned layers j always use norm_f(output of block j), as released.

Legend: B batch, T frames, P patches per frame, L = 1 + T*P tokens (V: visible ones), D student width,
C teacher output width, K aligned layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models import Features
from models.teachers import CLIPTeacher
from models.videomamba import gather_tokens
from pipeline.config import ConfigError, TaskConfig
from pipeline.cuda_graph import GraphedBackbone
from pipeline.flops import clip_vision_flops, head_flops, videomamba_flops
from pipeline.losses import cosine_alignment_loss
from pipeline.tasks.backbone import backbone_export_meta, build_student
from pipeline.tasks.base import Task
from pipeline.tasks.clip_alignment import AlignHead, sinusoid_table
from pipeline.tasks.clip_teacher import CLIPTeacherConfig, check_teacher_grid, clip_teacher_for
from pipeline.tasks.spec import TaskSpec, register_task
from pipeline.tasks.token_masks import TokenMasks


@dataclass
class MaskedAlignmentConfig(TaskConfig):
    teacher: CLIPTeacherConfig = field(default_factory=CLIPTeacherConfig)
    """The frozen CLIP teacher."""
    num_align_layers: int = 1
    """Align the last K student blocks with the last K teacher blocks (1 in the paper: 'last 1' was best)."""
    align_layers: list[int] | None = None
    """Explicit student block indices to align (negative counts from the end); overrides num_align_layers."""
    student_feature: Literal["final_norm", "residual_before_last_block"] = "final_norm"
    """Last-layer student feature: the true output (default) or the released residual quirk (see module doc)."""
    head_pos_embed: bool = True
    """Add a fixed sinusoidal position table before the heads, as released (`clip_pos_embed`)."""

    def __post_init__(self) -> None:
        if self.num_align_layers < 1:
            raise ConfigError(f"task.num_align_layers: must be >= 1, got {self.num_align_layers}")
        count = len(self.align_layers) if self.align_layers is not None else self.num_align_layers
        if self.teacher.layers is not None and len(self.teacher.layers) != count:
            raise ConfigError(f"task.teacher.layers: {self.teacher.layers} must name one teacher block per aligned "
                              f"student layer ({count})")


class MaskedAlignmentTask(Task):
    """Student VideoMamba + per-layer alignment heads + frozen CLIP teacher; loss = mean over layers of 2 - 2 cos."""

    def __init__(self, student: nn.Module, teacher: CLIPTeacher, align_layers: list[int],
                 student_feature: str = "final_norm", head_pos_embed: bool = True, mask_type: str = "attention",
                 mask_ratio: float = 0.8, seed: int = 0, export_meta: dict[str, Any] | None = None,
                 cuda_graph: bool = False, cuda_graph_required: bool = False) -> None:
        super().__init__()
        depth = student.depth
        if any(not -depth <= i < depth for i in align_layers):
            raise ValueError(f"task.align_layers: {align_layers} must be block indices of the {depth}-block student")
        self.align_layers = sorted({i % depth for i in align_layers})
        if len(self.align_layers) != len(teacher.return_layers):
            raise ValueError(f"{len(self.align_layers)} student layers {self.align_layers} but "
                             f"{len(teacher.return_layers)} teacher layers {teacher.return_layers}")
        if student.tubelet_size != 1:
            raise ValueError(f"model.tubelet_size: the frame-wise CLIP teacher needs 1, got {student.tubelet_size}")
        check_teacher_grid(teacher, student)
        self.student = student
        self.teacher = teacher
        self.student_feature = student_feature
        self.masks = TokenMasks(mask_type, mask_ratio, seed)
        self.clip_decoder = nn.ModuleList(AlignHead(student.embed_dim, teacher.output_dim) for _ in self.align_layers)
        length = 1 + student.num_frames * student.num_patches
        # Not persistent: it is a fixed function of the shape, so checkpoints need not carry it.
        self.register_buffer("head_pos_LD", sinusoid_table(length, student.embed_dim) if head_pos_embed else None,
                             persistent=False)
        if student_feature == "residual_before_last_block":
            # Released quirk: nothing reads the last block's output, so it gets no gradient; freezing it keeps
            # the optimizer (and its weight decay) off it, as PyTorch's AdamW skips grad-less parameters.
            student.layers[-1].requires_grad_(False)
            if self.align_layers == [depth - 1]:
                student.norm_f.requires_grad_(False)
        self._export_meta = dict(export_meta or {})
        self._student_runner = GraphedBackbone(student, self._residual_indices(), "the student", enabled=cuda_graph,
                                               required=cuda_graph_required)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        video_BCTHW = batch["video"]
        teacher_out = self.teacher(video_BCTHW)
        keep_BL = self.masks(batch, teacher_out.cls_attn_BTP, video_BCTHW.device)
        index_BK = self.masks.visible_index(keep_BL, self.student)
        features = self._student_runner(video_BCTHW, index_BK, self.training)
        targets_KBVC = teacher_out.targets_KBLC
        pos_BVD = None if self.head_pos_LD is None else self.head_pos_LD.expand(len(video_BCTHW), -1, -1)
        if index_BK is not None:
            targets_KBVC = gather_tokens(targets_KBVC, index_BK)
            pos_BVD = None if pos_BVD is None else gather_tokens(pos_BVD, index_BK)
        parts = {}
        for k, (layer, head) in enumerate(zip(self.align_layers, self.clip_decoder, strict=True)):
            x_BVD = self._student_tokens(features, layer)
            if pos_BVD is not None:
                x_BVD = x_BVD + pos_BVD
            pred_BVC = head(x_BVD.to(head.head.weight.dtype))
            parts[f"loss_align_L{layer}"] = cosine_alignment_loss(pred_BVC, targets_KBVC[k])
        loss = torch.stack(list(parts.values())).mean()
        return {"loss": loss, **{name: value.detach() for name, value in parts.items()}}

    def trainable_module(self) -> nn.Module:
        return self.student

    def export_metadata(self) -> dict[str, Any]:
        return dict(self._export_meta)

    def flops_per_sample(self) -> float:
        """Student and heads over CLS + the visible tokens (3x forward), the teacher's forward (pipeline/flops.py)."""
        tokens = 1 + self.masks.visible_patches(*self.student.grid)
        heads = sum(head_flops(head.head, tokens) for head in self.clip_decoder)
        return videomamba_flops(self.student, tokens) + heads + clip_vision_flops(self.teacher, self.student.num_frames)

    def rng_state_dict(self) -> dict[str, Any]:
        return {"attention_masks": self.masks.state_dict()}

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["attention_masks"])

    def _residual_indices(self) -> list[int]:
        """Residuals needed: the output of block j is the residual entering block j + 1."""
        last = self.student.depth - 1
        wanted = {j + 1 for j in self.align_layers if j < last}
        if last in self.align_layers and self.student_feature == "residual_before_last_block":
            wanted.add(last)
        return sorted(wanted)

    def _student_tokens(self, features: Features, layer: int) -> Tensor:
        last = self.student.depth - 1
        if layer == last:
            if self.student_feature == "final_norm":
                return features.tokens_BLD
            return features.residuals[last]
        norm_f = self.student.norm_f
        return norm_f.add_norm(features.residuals[layer + 1].to(norm_f.weight.dtype), None)[0]


def build(cfg) -> MaskedAlignmentTask:
    task_cfg: MaskedAlignmentConfig = cfg.task
    student = build_student(cfg)
    if task_cfg.align_layers is None and task_cfg.num_align_layers > student.depth:
        raise ConfigError(f"task.num_align_layers: {task_cfg.num_align_layers} exceeds the model's depth "
                          f"{student.depth}")
    if (cfg.data.num_frames, cfg.data.img_size) != (student.num_frames, student.img_size):
        raise ConfigError(f"data.num_frames/img_size ({cfg.data.num_frames}, {cfg.data.img_size}) must match the "
                          f"model's ({student.num_frames}, {student.img_size}); set model.num_frames/img_size")
    align = (task_cfg.align_layers if task_cfg.align_layers is not None
             else list(range(student.depth - task_cfg.num_align_layers, student.depth)))
    teacher = clip_teacher_for(task_cfg.teacher, student, len(align))
    return MaskedAlignmentTask(
        student, teacher, align,
        student_feature=task_cfg.student_feature,
        head_pos_embed=task_cfg.head_pos_embed,
        mask_type=cfg.data.mask.type,
        mask_ratio=cfg.data.mask.ratio,
        seed=cfg.seed,
        export_meta=backbone_export_meta(cfg),
        cuda_graph=cfg.cuda_graph_wanted(),
        cuda_graph_required=cfg.model.cuda_graph is True,
    )


register_task(TaskSpec(name="masked_alignment", config=MaskedAlignmentConfig, build=build, init_key="model.pretrained",
                       cuda_graph=True))
