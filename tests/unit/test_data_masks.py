"""Data-side keep masks: the released visible counts (docs/data.md, "Masks"), their structure, and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.masks import make_keep_mask


@pytest.mark.parametrize("mask_type, visible", [("random", 314), ("tube", 320), ("tube_row", 336), ("random_row", 336)])
def test_visible_counts_match_the_paper_table(mask_type, visible):
    counts = {int(make_keep_mask(mask_type, 0.8, 8, 14, 14, np.random.default_rng(s)).sum()) for s in range(5)}
    assert counts == {visible}  # the same count for every sample: the model batches visible tokens


def test_masks_are_deterministic_given_the_generator_and_differ_across_seeds():
    for mask_type in ("random", "tube", "tube_row", "random_row"):
        a = make_keep_mask(mask_type, 0.8, 8, 14, 14, np.random.default_rng(11))
        b = make_keep_mask(mask_type, 0.8, 8, 14, 14, np.random.default_rng(11))
        c = make_keep_mask(mask_type, 0.8, 8, 14, 14, np.random.default_rng(12))
        assert a.dtype == bool and a.shape == (8 * 196,)
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_mask_structure():
    rng = np.random.default_rng(0)
    tube = make_keep_mask("tube", 0.8, 8, 14, 14, rng).reshape(8, 14, 14)
    assert all(np.array_equal(tube[0], tube[t]) for t in range(8))  # one spatial mask tiled over time

    tube_row = make_keep_mask("tube_row", 0.8, 8, 14, 14, rng).reshape(8, 14, 14)
    rows = tube_row.all(axis=2) | ~tube_row.any(axis=2)
    assert rows.all()  # whole rows only
    assert (tube_row.all(axis=2).sum(axis=1) == 3).all()  # 3 visible rows in every frame
    assert len({tuple(np.flatnonzero(tube_row[t].all(axis=1))) for t in range(8)}) > 1  # rows differ by frame

    random_row = make_keep_mask("random_row", 0.8, 8, 14, 14, rng).reshape(8, 14, 14)
    assert (random_row.all(axis=2) | ~random_row.any(axis=2)).all()
    assert random_row.all(axis=2).sum() == 24  # 24 visible rows over the clip, per-frame count free


def test_unknown_mask_type_is_rejected():
    with pytest.raises(ValueError, match="not a data-side mask"):
        make_keep_mask("attention", 0.8, 8, 14, 14, np.random.default_rng(0))
