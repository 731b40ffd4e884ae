"""Exact (eval) pass split over ranks x loader workers: every sample key is seen exactly once across all ranks
(ignoring valid=False padding rows), and every rank yields the same number of full batches."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from pipeline.config import DataConfig
from pipeline.data.encode import encode_h264
from pipeline.data.reader import build_loader

# Uneven shards: 7 shards, 17 samples; one shard holds a single sample, one holds five.
SHARD_SIZES = (3, 1, 5, 2, 1, 3, 2)


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    video = encode_h264(np.full((4, 16, 16, 3), 128, dtype=np.uint8), fps=4.0)
    meta = b'{"caption": "grey", "video_id": "v", "duration": 1.0}'
    keys = []
    for shard, size in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(root / f"eval-{shard:06d}.tar")) as tar:
            for i in range(size):
                keys.append(f"s{shard}_{i}")
                tar.write({"__key__": keys[-1], "mp4": video, "json": meta})
    return str(root), keys


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size, workers", [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2)])
def test_every_key_exactly_once_across_ranks_and_workers(uneven_shards, world_size, workers):
    shards, all_keys = uneven_shards
    cfg = DataConfig(eval_shards=shards, num_frames=2, img_size=16, batch_size=3, num_workers=workers)
    seen, batch_counts = [], []
    for rank in range(world_size):
        batches = list(build_loader(cfg, "eval", rank=rank, world_size=world_size))
        batch_counts.append(len(batches))
        assert all(len(b["key"]) == 3 and b["video"].shape[0] == 3 for b in batches)
        seen += [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
    assert sorted(seen) == sorted(all_keys)  # no gap, no duplicate
    # Same count on every rank: the largest rank's ceil(samples / 3).
    per_rank = [sum(SHARD_SIZES[r::world_size]) for r in range(world_size)]
    assert batch_counts == [-(-max(per_rank) // 3)] * world_size
