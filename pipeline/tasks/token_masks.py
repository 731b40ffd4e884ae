"""Which patch tokens a student sees in a step, per `data.mask.type` (the stages share this).

- `none`: every token (no keep mask);
- `attention`: drawn from the teacher's CLS attention by an `AttentionMasker` (pipeline/tasks/attention_mask.py),
  whose generator is task state saved in checkpoints;
- `random | tube | tube_row | random_row`: made by the data loader, arriving as `batch["keep"]`.

Legend: B batch, T frames, P patches per frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.masks import make_keep_mask
from pipeline.tasks.attention_mask import AttentionMasker, num_visible


class TokenMasks:
    """`masks(batch, cls_attn_BTP, device) -> keep_BL | None` for one mask type; `state_dict()` / `load_state_dict()`
    carry the attention masks' generator across a resume."""

    def __init__(self, mask_type: str, ratio: float, seed: int) -> None:
        self.mask_type, self.ratio = mask_type, ratio
        self.attention = AttentionMasker(ratio, seed)
        self._visible: dict[tuple[int, int, int], int] = {}  # visible_patches per token grid

    @property
    def needs_attention(self) -> bool:
        """Whether the masks are drawn from a teacher's CLS attention (so a teacher must run first)."""
        return self.mask_type == "attention"

    def __call__(self, batch: dict[str, Any], cls_attn_BTP: Tensor | None, device: torch.device) -> Tensor | None:
        """(B, T*P) bool keep mask on `device` (True = visible), or None when the student sees every token."""
        if self.mask_type == "none":
            return None
        if self.needs_attention:
            return self.attention(cls_attn_BTP)
        keep_BL = batch.get("keep")
        if keep_BL is None:
            raise ValueError(f"data.mask.type={self.mask_type!r} is a data-side mask, but the batch has no 'keep' "
                             "entry; build the loader from the same data config (pipeline.data.build_loader)")
        return keep_BL.to(device)

    def visible_index(self, keep_BL: Tensor | None, backbone: Any) -> Tensor | None:
        """(B, K) positions of the visible patches of a `backbone` (a VideoMamba) for `keep_BL`, None for None.
        K is this mask type's count, so no host sync reads it from the mask (models.videomamba.visible_index)."""
        if keep_BL is None:
            return None
        grid = tuple(backbone.grid)
        if grid not in self._visible:
            self._visible[grid] = self.visible_patches(*grid)
        return backbone.visible_index(keep_BL, self._visible[grid])

    def visible_patches(self, frames: int, grid_h: int, grid_w: int) -> int:
        """Patch tokens the student sees per clip (every mask of one type keeps the same count)."""
        if self.mask_type == "none":
            return frames * grid_h * grid_w
        if self.needs_attention:
            return frames * num_visible(grid_h * grid_w, self.ratio)
        return int(make_keep_mask(self.mask_type, self.ratio, frames, grid_h, grid_w, np.random.default_rng(0)).sum())

    def state_dict(self) -> dict[str, Any]:
        return self.attention.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attention.load_state_dict(state)

