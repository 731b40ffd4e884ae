"""Alignment of a backbone's visible tokens to a frozen CLIP teacher's: the head, position table and loss.

Stage 1 (pipeline/tasks/masked_alignment.py) aligns one or more student layers this way; `ClipTokenAlignment` applies
it to a backbone's final output as an extra loss of later stages: the visible tokens plus stage 1's fixed
sinusoidal position table -> `AlignHead` (Linear -> LayerNorm -> L2) -> mean(2 - 2 cos) against the teacher's
last-layer tokens at the same positions. UMT calls it UTA and uses it in its masked video-text phase; the
self-distillation stage can add it too.

Legend: B batch, L = 1 + T*P tokens, V visible ones (CLS first), D backbone width, C teacher output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.teachers import CLIPTeacher
from models.videomamba import gather_tokens
from pipeline.losses import cosine_alignment_loss
from pipeline.tasks.clip_teacher import check_teacher_grid


class AlignHead(nn.Module):
    """Linear(D -> C) -> LayerNorm(C) -> L2 normalisation (released `Linear_Decoder`, xavier init)."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_BVD: Tensor) -> Tensor:
        return F.normalize(self.norm(self.head(x_BVD)), dim=-1)


def sinusoid_table(length: int, width: int) -> Tensor:
    """(length, width) fixed 1-D position table: sin on even channels, cos on odd, period 10000^(2i/width)."""
    position_L1 = torch.arange(length, dtype=torch.float64)[:, None]
    channel = torch.arange(width)
    angle_LD = position_L1 / torch.pow(10000.0, (2 * (channel // 2)).double() / width)
    return torch.where(channel % 2 == 0, torch.sin(angle_LD), torch.cos(angle_LD)).float()


def visible_tokens(x_BLC: Tensor, index_BV: Tensor | None) -> Tensor:
    """CLS + the patch tokens at `index_BV` of every clip, in order: (..., B, 1 + V, C); all tokens if it is None.

    x may carry leading dims (e.g. K layers); index_BV holds positions among the patches, as
    `models.videomamba.visible_index` (or `TokenMasks.visible_index`) gives them.
    """
    if index_BV is None:
        return x_BLC
    return gather_tokens(x_BLC, index_BV)


class ClipTokenAlignment(nn.Module):
    """`forward(tokens_BVD, targets_BLC, index_BV) -> loss`: head + position table + 2 - 2 cos at the visible tokens
    (index_BV: their positions among the patches; None: every token)."""

    def __init__(self, backbone: nn.Module, teacher: CLIPTeacher) -> None:
        super().__init__()
        check_teacher_grid(teacher, backbone)
        self.head = AlignHead(backbone.embed_dim, teacher.output_dim)
        length = 1 + backbone.num_frames * backbone.num_patches
        # Not persistent: a fixed function of the shape, so checkpoints need not carry it.
        self.register_buffer("pos_LD", sinusoid_table(length, backbone.embed_dim), persistent=False)

    def forward(self, tokens_BVD: Tensor, targets_BLC: Tensor, index_BV: Tensor | None) -> Tensor:
        return alignment_loss(self.head, tokens_BVD, self.pos_LD, targets_BLC, index_BV)


def alignment_loss(head: nn.Module, tokens_BVD: Tensor, pos_LD: Tensor, targets_BLC: Tensor,
                   index_BV: Tensor | None) -> Tensor:
    """mean(2 - 2 cos) of head(visible tokens + their rows of the position table) against the teacher's tokens at
    the same positions; `pos_LD` is `sinusoid_table(1 + T*P, D)`, `head` maps D to the teacher's width C, `index_BV`
    the visible patches' positions (None: every token)."""
    pos_BVD = visible_tokens(pos_LD.expand(len(tokens_BVD), -1, -1), index_BV)
    pred_BVC = head((tokens_BVD + pos_BVD).to(next(head.parameters()).dtype))
    return cosine_alignment_loss(pred_BVC, visible_tokens(targets_BLC, index_BV))
