"""The frozen CLIP teacher the stages share: its config section and a builder sized to the student's token grid.

Stage 1 aligns every aligned student layer to it, self-distillation can add stage 1's alignment to it
(`clip_weight`), and the video-text stage aligns its visible tokens to it (`uta_weight`) or draws attention masks
from it. `models.teachers.CLIPTeacher` is the model; this is how a stage configures and builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from models.teachers import CLIPTeacher, build_clip_teacher, teacher_patch_size


@dataclass
class CLIPTeacherConfig:
    model_name: str = "ViT-B-16"
    """open_clip model config of the teacher (`open_clip.list_models()`); ViT-B-16 as released."""
    pretrained: str | None = "openai"
    """An open_clip tag read from the local HF cache (set HF_HUB_OFFLINE=1 offline), a checkpoint file (full
    CLIP or a vision-tower state dict such as UMT's vit_b16.pth), or null for random weights (tests only)."""
    image_size: int | None = None
    """Teacher input size; None = the student's token grid times the teacher's patch size (224 for ViT-B/16 at
    224 px). Frames are resized (bicubic) when it differs from the clip's size; the pos embedding is
    interpolated when it differs from the checkpoint's."""
    quick_gelu: bool = True
    """QuickGELU activation, which OpenAI's CLIP weights were trained with."""
    apply_ln_post: bool = False
    """Apply the tower's ln_post before `proj`; False reproduces the released targets."""
    layers: list[int] | None = None
    """Teacher blocks whose tokens are targets, one per aligned student layer; None = the last K blocks."""
    vision_overrides: dict[str, Any] = field(default_factory=dict)
    """Replace open_clip vision-config entries (e.g. {layers: 2, width: 64} for a tiny random test teacher)."""


def clip_teacher_for(teacher_cfg: CLIPTeacherConfig, backbone: nn.Module, num_layers: int) -> CLIPTeacher:
    """The CLIP teacher whose patch grid matches `backbone`'s, returning `num_layers` blocks (on the meta device,
    for a dry run, the architecture only: `build_clip_teacher` reads no weights there)."""
    image_size = teacher_cfg.image_size
    if image_size is None:
        grid = backbone.grid[1]
        image_size = grid * teacher_patch_size(teacher_cfg.model_name, teacher_cfg.vision_overrides)
    layers = teacher_cfg.layers if teacher_cfg.layers is not None else list(range(-num_layers, 0))
    return build_clip_teacher(
        model_name=teacher_cfg.model_name,
        pretrained=teacher_cfg.pretrained,
        image_size=image_size,
        return_layers=layers,
        apply_ln_post=teacher_cfg.apply_ln_post,
        quick_gelu=teacher_cfg.quick_gelu,
        vision_overrides=teacher_cfg.vision_overrides or None,
    )


def check_teacher_grid(teacher: CLIPTeacher, backbone: nn.Module) -> None:
    """The teacher's targets must sit at the backbone's token positions: the same patch grid per frame."""
    if teacher.grid_size != tuple(backbone.grid[1:]):
        raise ValueError(f"the teacher's patch grid {teacher.grid_size} differs from the backbone's token grid "
                         f"{tuple(backbone.grid[1:])}; set task.teacher.image_size to grid x teacher patch size")
