"""Masked language modelling of captions as the released UMT / VideoMamba video-text pretraining draws it.

`mask_caption_tokens` picks each token with probability `prob` (0.5 released, `mlm_masking_prob`), never a pad
or [CLS] token ([SEP] can be picked, as released); of the picked ones 80% become [MASK], half of the rest (10%) a
token drawn uniformly from the whole vocabulary, the rest (10%) stay as they are. The labels are the original
ids at the picked positions and -100 elsewhere. `masked_lm_loss` is the cross-entropy over the picked positions
(BERT's `BertForMaskedLM` loss). Random draws come from `generator` (None: torch's default one, as released).

Legend: B captions, L tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # the label of positions that are not predicted (cross_entropy's ignore_index)


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids masking needs, read off a BERT tokenizer with `SpecialTokens.of(tokenizer)`."""

    pad: int
    cls: int
    mask: int
    vocab_size: int

    @classmethod
    def of(cls, tokenizer) -> SpecialTokens:
        return cls(pad=tokenizer.pad_token_id, cls=tokenizer.cls_token_id, mask=tokenizer.mask_token_id,
                   vocab_size=len(tokenizer))


def mask_caption_tokens(input_ids_BL: Tensor, special: SpecialTokens, prob: float = 0.5,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(masked ids, labels), both (B, L) long: see the module docstring for the rule."""
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"MLM masking probability must be in (0, 1], got {prob}")
    device = input_ids_BL.device

    def draw(p: float) -> Tensor:
        return torch.rand(input_ids_BL.shape, device=device, generator=generator) < p

    picked_BL = draw(prob) & (input_ids_BL != special.pad) & (input_ids_BL != special.cls)
    labels_BL = input_ids_BL.masked_fill(~picked_BL, IGNORE)
    to_mask_BL = draw(0.8) & picked_BL
    to_random_BL = draw(0.5) & picked_BL & ~to_mask_BL
    random_BL = torch.randint(special.vocab_size, input_ids_BL.shape, device=device, generator=generator)
    masked_BL = input_ids_BL.masked_fill(to_mask_BL, special.mask)
    masked_BL = torch.where(to_random_BL, random_BL, masked_BL)
    return masked_BL, labels_BL


def masked_lm_loss(logits_BLV: Tensor, labels_BL: Tensor) -> Tensor:
    """Mean cross-entropy (fp32) over the positions with a label. A batch without any (every caption empty, or no
    token drawn) gives 0 with a gradient of 0, where BERT's mean over no positions would be NaN."""
    total = F.cross_entropy(logits_BLV.flatten(0, 1).float(), labels_BL.flatten(), ignore_index=IGNORE,
                            reduction="sum")
    return total / (labels_BL != IGNORE).sum().clamp_min(1)
