"""Attention-guided token masks for masked pretraining (videomamba.md §4.2, `attention`, the default).

Per frame, N_vis = P - int(P * ratio) patches stay visible. They are *sampled* without replacement with
probability proportional to the teacher's CLS -> patch attention (not the top-k), so salient tokens are
favoured while every token keeps a chance. Legend: B batch, T frames, P patches per frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The attention of a bf16 teacher can underflow to exactly 0 for some patches; torch.multinomial without
# replacement fails if fewer than N_vis entries are positive, so every weight gets this floor.
_MIN_WEIGHT = 1e-12


def num_visible(num_patches: int, ratio: float) -> int:
    """Visible patches per frame at mask ratio `ratio` (the released rounding: P - int(P * ratio))."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return num_patches - int(num_patches * ratio)


def attention_keep_mask(attn_BTP: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Keep mask (B, T*P) bool, True = visible, frame-major like the token order; exactly N_vis per frame.

    `generator` (on attn_BTP's device) makes the draw reproducible.
    """
    B, T, P = attn_BTP.shape
    weights_NP = attn_BTP.detach().float().reshape(B * T, P).clamp_min(_MIN_WEIGHT)
    visible_NV = torch.multinomial(weights_NP, num_visible(P, ratio), replacement=False, generator=generator)
    keep_NP = torch.zeros(B * T, P, dtype=torch.bool, device=attn_BTP.device)
    keep_NP.scatter_(1, visible_NV, True)
    return keep_NP.reshape(B, T * P)
