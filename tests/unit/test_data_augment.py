"""Fine-tuning augmentation of whole clips: one RandAugment draw for every frame, random erasing at one place in
every frame, the policy parser, and the multi-crop / centre-crop eval transforms."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, ConfigError
from pipeline.data.augment import (
    OP_NAMES,
    ClipAugment,
    RandAugmentPolicy,
    apply_op,
    parse_rand_augment,
    rand_augment,
)
from pipeline.data.augment import random_erase as erase
from pipeline.data.transforms import eval_transform, spatial_crops, train_transform

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def test_policy_strings():
    assert parse_rand_augment("rand-m7-n4-mstd0.5-inc1") == RandAugmentPolicy(7.0, 4, 0.5, True)
    assert parse_rand_augment("rand-m5-n2-mstd0.25-inc1") == RandAugmentPolicy(5.0, 2, 0.25, True)
    assert parse_rand_augment("rand") == RandAugmentPolicy(10.0, 2, 0.0, False)
    with pytest.raises(ValueError, match="unknown part 'x3'"):
        parse_rand_augment("rand-m7-x3")
    with pytest.raises(ConfigError, match="data.augment.rand_augment"):
        AugmentConfig(rand_augment="auto-m7")
    with pytest.raises(ConfigError, match="multiple of data.augment.repeats"):
        from pipeline.config import DataConfig

        DataConfig(batch_size=3, augment=AugmentConfig(repeats=2))


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_changes_all_frames_alike(name, increasing):
    # values 20-240: room for autocontrast to stretch and for solarize's high threshold to bite
    frame = np.random.default_rng(0).integers(20, 241, (1, 24, 24, 3), dtype=np.uint8)
    clip_TCHW = torch.from_numpy(np.repeat(frame, 3, axis=0)).permute(0, 3, 1, 2).contiguous()
    out = apply_op(name, clip_TCHW, 9.0, increasing, random.Random(0))
    assert out.dtype == torch.uint8 and out.shape == clip_TCHW.shape
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # identical frames stay identical
    assert not torch.equal(out, clip_TCHW), f"{name} at level 9 left the clip unchanged"


def test_a_draw_applies_several_ops_to_the_whole_clip():
    frames = np.random.default_rng(1).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    clip_TCHW = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    changed = sum(not torch.equal(rand_augment(clip_TCHW, RandAugmentPolicy(9.0, 4, 0.5, True), random.Random(s)),
                                  clip_TCHW) for s in range(20))
    assert changed >= 18  # each of 4 ops fires with probability 0.5: (1/2)^4 of the draws change nothing
    assert len(OP_NAMES) == 15


def test_rand_augment_is_a_function_of_the_rng():
    clip = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))
    policy = RandAugmentPolicy(7.0, 4, 0.5, True)
    assert torch.equal(rand_augment(clip, policy, random.Random(5)), rand_augment(clip, policy, random.Random(5)))


def test_random_erasing_puts_one_box_in_every_frame():
    clip = torch.zeros(3, 4, 20, 20)
    erase(clip, 1.0, random.Random(0))
    touched_THW = clip.ne(0).any(dim=0)
    assert touched_THW.any()
    assert all(torch.equal(touched_THW[0], touched_THW[t]) for t in range(4))  # the same place
    assert not torch.equal(clip[:, 0], clip[:, 1])  # fresh noise per frame
    rows, cols = touched_THW[0].nonzero(as_tuple=True)
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert touched_THW[0].sum() == area and 0.02 * 400 * 0.5 <= area <= 400 / 3 * 1.2  # one box of 2%-33%
    untouched = torch.zeros(3, 4, 20, 20)
    assert torch.equal(erase(untouched, 0.0, random.Random(0)), torch.zeros(3, 4, 20, 20))


def test_train_transform_with_augment_is_reproducible():
    frames = np.random.default_rng(2).integers(0, 256, (4, 30, 40, 3), dtype=np.uint8)
    augment = ClipAugment.from_config(AugmentConfig(rand_augment="rand-m7-n4-mstd0.5-inc1", random_erasing=0.5))
    a = train_transform(frames, 16, (0.08, 1.0), True, MEAN, STD, random.Random(3), augment)
    b = train_transform(frames, 16, (0.08, 1.0), True, MEAN, STD, random.Random(3), augment)
    assert a.shape == (3, 4, 16, 16) and torch.equal(a, b)
    assert ClipAugment.from_config(AugmentConfig()) is None


def test_spatial_crops_cover_the_long_side():
    # a 20 x 40 frame whose pixel value is its column: after resizing the short side to 10 (-> 10 x 20), three
    # 10 x 10 crops start at columns 0, 5 and 10 of the resized frame
    frames = np.broadcast_to(np.arange(40, dtype=np.uint8)[None, None, :, None] * 6, (2, 20, 40, 3)).copy()
    crops = spatial_crops(frames, 10, 3, [0, 0, 0], [1 / 255] * 3)
    assert [tuple(c.shape) for c in crops] == [(3, 2, 10, 10)] * 3
    left_edges = [float(c[0, 0, 5, 0]) for c in crops]
    assert left_edges[0] < left_edges[1] < left_edges[2]
    assert left_edges[1] == pytest.approx(6 * 10.5, abs=7) and left_edges[2] == pytest.approx(6 * 20.5, abs=7)
    centre = eval_transform(frames, 10, [0, 0, 0], [1 / 255] * 3, crop="center")
    assert torch.equal(centre, crops[1])  # one centre crop = the middle of the three
    tall = np.ascontiguousarray(frames.transpose(0, 2, 1, 3))  # 40 x 20: crops run down the long side
    assert [tuple(c.shape) for c in spatial_crops(tall, 10, 3, MEAN, STD)] == [(3, 2, 10, 10)] * 3
