"""Mixup / CutMix of a batch of clips, with label-smoothed soft targets (the released fine-tuning's batch mode).

One draw per batch: with probability `prob` the batch is mixed with itself reversed (sample i with sample B-1-i),
by mixup (a blend with weight lam ~ Beta(mixup_alpha, mixup_alpha)) or, with probability `switch_prob` when both
are on, by CutMix (a box of area about (1 - lam) of every frame, lam ~ Beta(cutmix_alpha, cutmix_alpha), pasted
at the same place in all frames; lam is then corrected to the box's clipped area). Targets are the same mix of
the label-smoothed one-hot vectors: on = 1 - s + s/K, off = s/K. An unmixed batch (lam = 1) keeps its smoothed
targets, so one soft-target cross-entropy serves both (`pipeline.losses.soft_target_cross_entropy`).

Legend: B batch, C channels, T frames, H/W pixels, K classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

_MIX_STREAM = 0x6D6978  # "mix": keeps this generator's seed apart from the other per-rank streams


def smoothed_targets(label_B: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B, K) float targets: 1 - smoothing + smoothing / K at the label, smoothing / K elsewhere."""
    off = smoothing / num_classes
    target_BK = torch.full((len(label_B), num_classes), off, device=label_B.device)
    return target_BK.scatter_(1, label_B.view(-1, 1).long(), 1.0 - smoothing + off)


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: weight `lam` of the original clip, and the CutMix box (top, bottom, left, right) or None."""

    lam: float
    box: tuple[int, int, int, int] | None = None


def mix_batch(video_BCTHW: Tensor, label_B: Tensor, draw: MixDraw, num_classes: int,
              smoothing: float) -> tuple[Tensor, Tensor]:
    """Apply `draw`: (mixed clips, (B, K) mixed smoothed targets). The batch is mixed with itself reversed."""
    target_BK = smoothed_targets(label_B, num_classes, smoothing)
    if draw.lam == 1.0:
        return video_BCTHW, target_BK
    other_BCTHW = video_BCTHW.flip(0)
    if draw.box is None:
        mixed_BCTHW = video_BCTHW * draw.lam + other_BCTHW * (1.0 - draw.lam)
    else:
        top, bottom, left, right = draw.box
        mixed_BCTHW = video_BCTHW.clone()
        mixed_BCTHW[..., top:bottom, left:right] = other_BCTHW[..., top:bottom, left:right]
    return mixed_BCTHW, target_BK * draw.lam + target_BK.flip(0) * (1.0 - draw.lam)


def cutmix_box(height: int, width: int, lam: float,
               rng: np.random.Generator) -> tuple[tuple[int, int, int, int], float]:
    """A box of sides sqrt(1 - lam) x (H, W) centred uniformly in the frame and clipped to it, and the lam its
    clipped area gives (timm's `rand_bbox` + lambda correction)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / (height * width)


class MixupCutmix:
    """Draws and applies one MixDraw per batch (module docstring); its generator is part of the task's RNG state."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1, seed: int = 0, rank: int = 0) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.smoothing = num_classes, smoothing
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, rank, _MIX_STREAM]))

    def draw(self, height: int, width: int) -> MixDraw:
        if self.rng.random() >= self.prob:
            return MixDraw(1.0)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        if not use_cutmix:
            return MixDraw(float(self.rng.beta(self.mixup_alpha, self.mixup_alpha)))
        box, lam = cutmix_box(height, width, float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha)), self.rng)
        return MixDraw(lam, box)

    def __call__(self, video_BCTHW: Tensor, label_B: Tensor) -> tuple[Tensor, Tensor]:
        draw = self.draw(video_BCTHW.shape[-2], video_BCTHW.shape[-1])
        return mix_batch(video_BCTHW, label_B, draw, self.num_classes, self.smoothing)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
