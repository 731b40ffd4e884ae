"""Attention-guided token masks for masked pretraining (`attention`, the released default; docs/stages.md).

Per frame, N_vis = P - int(P * ratio) patches stay visible. They are *sampled* without replacement with
probability proportional to the teacher's CLS -> patch attention (not the top-k), so salient tokens are
favoured while every token keeps a chance. Legend: B batch, T frames, P patches per frame.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.distributed import get_rank
from pipeline.sampling import multinomial

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
    # torch.multinomial's draw without its two host-side input checks (pipeline/sampling.py): the floor above
    # keeps the weights valid, and the training step does not wait for the GPU here.
    visible_NV = multinomial(weights_NP, num_visible(P, ratio), generator=generator)
    keep_NP = torch.zeros(B * T, P, dtype=torch.bool, device=attn_BTP.device)
    keep_NP.scatter_(1, visible_NV, True)
    return keep_NP.reshape(B, T * P)


class AttentionMasker:
    """Draws `attention_keep_mask`s from a generator of its own, seeded `seed + rank` on first use (masks differ
    across ranks and repeat across runs with the same seed; no other random draw shifts them).

    The generator lives on the teacher's device, so it is created at the first call. `state_dict()` /
    `load_state_dict()` carry it across a resume: a resumed run draws the masks an uninterrupted one would.
    """

    def __init__(self, ratio: float, seed: int) -> None:
        self.ratio, self.seed = ratio, seed
        self._generator: torch.Generator | None = None
        self._restored: dict[str, Any] | None = None

    def __call__(self, attn_BTP: Tensor) -> Tensor:
        if self._generator is None or self._generator.device != attn_BTP.device:
            self._generator = self._new_generator(attn_BTP.device)
        return attention_keep_mask(attn_BTP, self.ratio, generator=self._generator)

    def _new_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        restored, self._restored = self._restored, None
        if restored is None:
            generator.manual_seed(self.seed + get_rank())
        elif restored["device"] != device.type:
            # A CUDA generator's state is not a CPU generator's: the draws could not continue.
            raise ValueError(f"the checkpoint's attention-mask generator ran on {restored['device']}, this run on "
                             f"{device.type}; resume on the device type the run was started on")
        else:
            generator.set_state(restored["state"])
        return generator

    def state_dict(self) -> dict[str, Any]:
        """The generator's state ({} before the first mask: then a restore seeds it afresh)."""
        if self._generator is None:
            return dict(self._restored or {})
        return {"device": self._generator.device.type, "state": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator, self._restored = None, (dict(state) if state else None)
