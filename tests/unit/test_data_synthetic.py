"""The synthetic demo set: captions are determined by the rendered content, generation is deterministic,
and the shards, clips and eval annotations agree."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.data.decode import decode_clip
from pipeline.data.keys import make_key
from pipeline.data.manifest import iter_shard
from pipeline.data.synthetic import COLOURS, DIRECTIONS, captions, random_spec, render_clip
from pipeline.data.urls import expand_shard_urls


def shape_pixels(frame_HW3: np.ndarray, colour: str, tolerance: int = 40) -> np.ndarray:
    return np.abs(frame_HW3.astype(int) - np.array(COLOURS[colour])).max(axis=-1) < tolerance


def test_caption_wording():
    spec = random_spec(np.random.default_rng(0))
    text, paraphrase = captions(spec)
    plural = spec.count > 1
    assert text == (
        f"{'two' if plural else 'a'} {spec.colour} {spec.shape}{'s' if plural else ''} "
        f"{'move' if plural else 'moves'} {spec.direction}"
    )
    assert paraphrase.startswith(text.rsplit(" ", 2)[0])


@pytest.mark.parametrize("seed", range(6))
def test_rendered_content_matches_the_caption(seed):
    spec = random_spec(np.random.default_rng([9, seed]))
    clip = render_clip(spec, num_frames=8, size=64)
    first, last = shape_pixels(clip[0], spec.colour), shape_pixels(clip[-1], spec.colour)
    assert first.sum() == last.sum() > 0  # shapes stay inside the frame
    # Count: connected blobs along the lane axis; direction: the centroid moves the captioned way.
    dx, dy = DIRECTIONS[spec.direction]
    ys, xs = np.nonzero(first)
    ye, xe = np.nonzero(last)
    assert np.sign(xe.mean() - xs.mean()) == dx and np.sign(ye.mean() - ys.mean()) == dy
    lane_axis = 0 if dx else 1
    lanes = np.unique(np.nonzero(first)[lane_axis])
    blobs = 1 + int((np.diff(lanes) > 1).sum())
    assert blobs == spec.count
    # Nothing else has the shape colour; other colours are absent.
    for other in COLOURS:
        if other != spec.colour:
            assert not shape_pixels(clip[0], other, tolerance=30).any()


def test_generation_is_deterministic():
    a = render_clip(random_spec(np.random.default_rng([1, 2])), 8, 32)
    b = render_clip(random_spec(np.random.default_rng([1, 2])), 8, 32)
    c = render_clip(random_spec(np.random.default_rng([1, 3])), 8, 32)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_shards_clips_and_annotations_agree(tiny_synthetic):
    root = os.path.dirname(tiny_synthetic["eval_annotations"])
    annotations = json.load(open(tiny_synthetic["eval_annotations"]))
    assert len(annotations) == 4
    eval_samples = {
        s["__key__"]: s for url in expand_shard_urls(tiny_synthetic["eval_shards"]) for s in iter_shard(url)
    }
    train_keys = {s["__key__"] for url in expand_shard_urls(tiny_synthetic["train_shards"]) for s in iter_shard(url)}
    assert len(train_keys) == 8 and not train_keys & set(eval_samples)
    for entry in annotations:
        sample = eval_samples[make_key(entry["video"])]  # the evaluator finds shard samples by this key
        meta = json.loads(sample["json"])
        assert meta["caption"][0] == entry["caption"] and meta["video_id"] == entry["video"]
        with open(os.path.join(tiny_synthetic["eval_video_root"], entry["video"]), "rb") as f:
            assert f.read() == sample["mp4"]
        clip = decode_clip(sample["mp4"], 8, "middle")
        colour = entry["caption"].split()[1]
        assert shape_pixels(clip[0], colour, tolerance=60).sum() > 4  # the captioned colour is on screen
    assert os.path.exists(os.path.join(root, "shards", "eval", "manifest.json"))
