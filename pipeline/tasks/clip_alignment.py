"""Alignment of a backbone's final visible tokens to a frozen CLIP teacher, as an extra loss of later stages.

Stage 1's loss and head (pipeline/tasks/masked_alignment.py) applied to the backbone's final output: the
visible tokens plus stage 1's fixed sinusoidal position table -> `AlignHead` (Linear -> LayerNorm -> L2) ->
mean(2 - 2 cos) against the teacher's last-layer tokens at the same positions. UMT calls it UTA and uses it
in its masked video-text phase; the self-distillation stage can add it too.

Legend: B batch, L = 1 + T*P tokens, V visible ones (CLS first), D backbone width, C teacher output width.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.teachers import CLIPTeacher
from pipeline.losses import cosine_alignment_loss
from pipeline.tasks.masked_alignment import AlignHead, sinusoid_table, visible_tokens


class ClipTokenAlignment(nn.Module):
    """`forward(tokens_BVD, targets_BLC, keep_BL) -> loss`: head + position table + 2 - 2 cos at visible tokens."""

    def __init__(self, backbone: nn.Module, teacher: CLIPTeacher) -> None:
        super().__init__()
        if teacher.grid_size != tuple(backbone.grid[1:]):
            raise ValueError(f"the teacher's patch grid {teacher.grid_size} differs from the backbone's token grid "
                             f"{tuple(backbone.grid[1:])}; set task.teacher.image_size to grid x teacher patch size")
        self.head = AlignHead(backbone.embed_dim, teacher.output_dim)
        length = 1 + backbone.num_frames * backbone.num_patches
        # Not persistent: a fixed function of the shape, so checkpoints need not carry it.
        self.register_buffer("pos_LD", sinusoid_table(length, backbone.embed_dim), persistent=False)

    def forward(self, tokens_BVD: Tensor, targets_BLC: Tensor, keep_BL: Tensor | None) -> Tensor:
        pos_BVD = visible_tokens(self.pos_LD.expand(len(tokens_BVD), -1, -1), keep_BL)
        pred_BVC = self.head((tokens_BVD + pos_BVD).to(self.head.head.weight.dtype))
        return cosine_alignment_loss(pred_BVC, visible_tokens(targets_BLC, keep_BL))
