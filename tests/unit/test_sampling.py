"""pipeline/sampling.py: torch.multinomial's draws without its host syncs, checked against torch.multinomial itself."""

from __future__ import annotations

import pytest
import torch

from pipeline.sampling import multinomial

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,categories,draws,replacement", [
    (8, 16, 4, False), (6, 196, 40, False), (5, 7, 1, True), (5, 7, 1, False), (3, 4, 4, False)])
def test_draws_are_torch_multinomials_own(device, rows, categories, draws, replacement):
    for seed in range(20):
        weights = torch.rand(rows, categories, generator=torch.Generator().manual_seed(1000 + seed)).to(device)
        if seed % 3 == 0:  # many tiny weights, as attention that underflowed to the floor
            weights[:, : categories // 2] = 1e-12
        expected = torch.multinomial(weights, draws, replacement,
                                     generator=torch.Generator(device).manual_seed(seed))
        got = multinomial(weights, draws, replacement, generator=torch.Generator(device).manual_seed(seed))
        assert torch.equal(got, expected), (seed, got, expected)
        if not replacement:
            assert all(len(set(row)) == draws for row in got.tolist())  # without replacement: distinct


def test_unsupported_draws_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="num_samples=1 only"):
        multinomial(torch.ones(2, 4), 2, replacement=True)
    with pytest.raises(ValueError, match=r"num_samples=5 must be in \[1, 4\]"):
        multinomial(torch.ones(2, 4), 5)
