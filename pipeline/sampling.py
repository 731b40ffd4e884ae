"""Categorical draws on the device without a host sync: `torch.multinomial`'s own algorithm, minus its input checks.

For draws without replacement (or a single draw), `torch.multinomial` uses the exponential race: with q ~ Exp(1)
per entry, the indices of the largest p / q are a draw proportional to p (argmax for one draw, topk for several).
Before that it checks its input on the host (`(max < inf) & (min >= 0)` and no all-zero row: two `.item()` calls),
which stalls the training step until the GPU has caught up. `multinomial` here runs the same three operations on
the same generator, so it returns exactly what `torch.multinomial` returns for valid weights
(tests/unit/test_sampling.py compares them), and leaves the checks to the caller: the stages' weights are softmax or
attention outputs with a positive floor, so they are valid unless they are NaN, and a NaN there makes the loss NaN,
which the engine's non-finite policy handles.
"""

from __future__ import annotations

import torch
from torch import Tensor


def multinomial(weights_NP: Tensor, num_samples: int, replacement: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    """(N, num_samples) long indices drawn from each row of the (N, P) non-negative `weights_NP`, as
    `torch.multinomial(weights_NP, num_samples, replacement, generator=generator)` draws them (no host sync)."""
    if replacement and num_samples != 1:
        raise ValueError("multinomial: draws with replacement are supported for num_samples=1 only (torch's "
                         "exponential-race path); use torch.multinomial for more")
    if not 1 <= num_samples <= weights_NP.shape[-1]:
        raise ValueError(f"multinomial: num_samples={num_samples} must be in [1, {weights_NP.shape[-1]}] (the "
                         "categories per row)")
    race_NP = weights_NP / torch.empty_like(weights_NP).exponential_(1, generator=generator)
    if num_samples == 1:
        return race_NP.argmax(dim=-1, keepdim=True)
    return race_NP.topk(num_samples, dim=-1).indices
