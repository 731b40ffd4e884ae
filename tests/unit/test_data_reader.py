"""Streaming loader on real shards: batch contract, seeding, worker processes, equal eval batches across
ranks (pad / drop), the fewer-shards-than-readers error, corrupt samples (skipped, counted, limit), and
nominal epochs (boundaries, seeds, resume, worker processes kept across boundaries)."""

from __future__ import annotations

import gc
import itertools
import json
import multiprocessing
import os
import random

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.config import DataConfig, MaskConfig
from pipeline.data.encode import encode_h264
from pipeline.data.keys import sample_id
from pipeline.data.reader import DataQualityError, build_loader, choose_caption, worker_epoch_shares
from pipeline.data.shards import make_shards


def data_cfg(**overrides) -> DataConfig:
    base = dict(num_frames=4, img_size=32, batch_size=2, num_workers=0, shuffle_buffer=4, flip=False)
    return DataConfig(**{**base, **overrides})


def first_batches(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def test_train_batch_contract(tiny_synthetic):
    cfg = data_cfg(train_shards=tiny_synthetic["train_shards"], batch_size=3, mask=MaskConfig(type="tube", ratio=0.5))
    batch = first_batches(build_loader(cfg, "train", rank=0, world_size=1), 1)[0]
    assert batch["video"].shape == (3, 3, 4, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["index"].dtype == torch.long
    assert batch["index"].tolist() == [sample_id(k) for k in batch["key"]]
    assert all(isinstance(t, str) and t.split()[0] in ("a", "two") for t in batch["text"])
    # keep: (B, T*P) with P = (32/16)^2 = 4 patches per frame; tube at 0.5 keeps 2 per frame, same for all rows.
    assert batch["keep"].shape == (3, 16) and batch["keep"].dtype == torch.bool
    assert batch["keep"].sum(1).tolist() == [8, 8, 8]
    # Normalised with ImageNet statistics: the synthetic grey background lands well below zero.
    assert -2.2 < batch["video"].min() < -0.5 and batch["video"].max() < 2.7


def test_train_stream_is_seeded(tiny_synthetic):
    cfg = data_cfg(train_shards=tiny_synthetic["train_shards"])
    keys = lambda seed: [b["key"] for b in first_batches(build_loader(cfg, "train", 0, 1, seed=seed), 4)]
    assert keys(1) == keys(1) and keys(1) != keys(2)
    rank1 = [b["key"] for b in first_batches(build_loader(cfg, "train", 1, 2, seed=1), 4)]
    assert rank1 != keys(1)  # ranks draw different streams


@pytest.mark.timeout(120)
def test_resumed_loader_draws_the_masks_of_an_uninterrupted_one(tiny_synthetic):
    # The data-side mask generator is resume state: after 3 batches, a new loader given the old one's
    # state_dict() continues the same mask sequence (the clips come from the next epoch's stream by design).
    mask = MaskConfig(type="random", ratio=0.5)
    cfg = data_cfg(train_shards=tiny_synthetic["train_shards"], num_workers=1, mask=mask)
    straight = [b["keep"] for b in first_batches(build_loader(cfg, "train", 1, 2, seed=4), 6)]
    stopped = build_loader(cfg, "train", 1, 2, seed=4)
    first = [b["keep"] for b in first_batches(stopped, 3)]
    resumed = build_loader(cfg, "train", 1, 2, seed=4)
    resumed.load_state_dict(stopped.state_dict())
    assert resumed.state_dict()["segment"] == 1  # a fresh stream order...
    rest = [b["keep"] for b in first_batches(resumed, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first + rest, straight, strict=True))  # ...the same masks
    assert len({tuple(k.flatten().tolist()) for k in straight}) > 1  # masks do vary from batch to batch
    other_rank = [b["keep"] for b in first_batches(build_loader(cfg, "train", 0, 2, seed=4), 6)]
    assert not all(torch.equal(a, b) for a, b in zip(other_rank, straight, strict=True))


@pytest.mark.parametrize("batches_done", [0, 1, 3])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_worker_epoch_shares_follow_the_round_robin(num_workers, batches_done):
    # Reference: the DataLoader hands out the n-th batch after the start from worker n % W, and that batch is
    # the (batches_done + n)-th of the run, in epoch 2 + (batches_done + n) // 3 (3 batches per epoch).
    planned = {}  # epoch -> [(epoch-local index, slot)]
    for worker in range(num_workers):
        shares = worker_epoch_shares(2, batches_done, 3, worker, num_workers)
        n = worker
        for epoch, slot, share in itertools.islice(shares, 12):
            for _ in range(share):
                assert epoch == 2 + (batches_done + n) // 3
                planned.setdefault(epoch, []).append(((batches_done + n) % 3, slot))
                n += num_workers
    # every batch planned once (the started epoch: those not handed out yet); a batch's slot is its turn in its epoch
    assert sorted(planned.get(2, [])) == [(i, i % num_workers) for i in range(batches_done, 3)]
    for epoch in range(3, 6):
        assert sorted(planned[epoch]) == [(i, i % num_workers) for i in range(3)]
    assert list(worker_epoch_shares(5, 0, None, 1, 2)) == [(5, 1, None)]  # one endless epoch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [1, 2])
def test_samples_per_epoch_sets_epoch_boundaries_and_seeds(tiny_synthetic, num_workers):
    shards = tiny_synthetic["train_shards"]  # 8 clips listed in the manifest
    assert build_loader(data_cfg(train_shards=shards), "train", 0, 2).batches_per_epoch == 2  # 8 / (2 ranks x 2)
    cfg = data_cfg(train_shards=shards, samples_per_epoch=6, num_workers=num_workers)
    keys = lambda batches: [b["key"] for b in batches]
    loader = build_loader(cfg, "train", 0, 1, seed=2)
    assert loader.batches_per_epoch == 3  # with 2 workers an epoch starts on alternate workers
    seen, epochs = [], []
    for batch in loader:
        seen.append(batch)
        epochs.append(loader.epoch)
        if len(seen) == 9:
            break
    assert epochs == pytest.approx([i / 3 for i in range(1, 10)])
    # epoch e's batches are the stream seeded with e: the same as a loader started at that epoch
    assert keys(seen[3:6]) == keys(first_batches(build_loader(cfg, "train", 0, 1, epoch=1, seed=2), 3))
    assert keys(seen[3:6]) != keys(seen[:3])

    # stopped inside epoch 1: the resumed loader finishes it (fresh segment), then epoch 2 is the usual one
    stopped = build_loader(cfg, "train", 0, 1, seed=2)
    assert keys(first_batches(stopped, 4)) == keys(seen[:4])
    resumed = build_loader(cfg, "train", 0, 1, seed=2)
    resumed.load_state_dict(stopped.state_dict())
    assert resumed.epoch == pytest.approx(4 / 3)
    after = first_batches(resumed, 5)
    assert resumed.epoch == pytest.approx(3)
    assert keys(after[:2]) != keys(seen[4:6])  # a new segment: no replay of the uninterrupted order
    assert keys(after[2:]) == keys(seen[6:9])
    with pytest.raises(ValueError, match="data.samples_per_epoch"):
        data_cfg(samples_per_epoch=0)


@pytest.mark.timeout(120)
def test_epoch_boundaries_keep_the_worker_processes(tiny_synthetic):
    # Workers reseed themselves at epoch boundaries: the processes that served the first batch serve every
    # batch across 3 boundaries (restarting them costs seconds of imports and the prefetched batches).
    cfg = data_cfg(train_shards=tiny_synthetic["train_shards"], samples_per_epoch=4, num_workers=2)
    gc.collect()  # workers of earlier tests' abandoned loaders
    before = {p.pid for p in multiprocessing.active_children()}
    loader = build_loader(cfg, "train", 0, 1, seed=5)
    assert loader.batches_per_epoch == 2
    iterator = iter(loader)
    try:
        serving = []
        for _ in range(7):
            next(iterator)
            serving.append({p.pid for p in multiprocessing.active_children()} - before)
        assert loader.epoch == pytest.approx(3.5)
        assert len(serving[0]) == 2 and all(pids == serving[0] for pids in serving)
    finally:
        iterator.close()  # shuts the workers down


def test_loader_leaves_the_global_torch_rng_alone(tiny_synthetic):
    # The model's random draws (dropout, drop path) must not depend on when a loader starts (e.g. a resume).
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first_batches(build_loader(data_cfg(train_shards=tiny_synthetic["train_shards"]), "train", 0, 1), 2)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.timeout(120)
def test_train_with_worker_processes_counts_samples(tiny_synthetic):
    cfg = data_cfg(train_shards=tiny_synthetic["train_shards"], num_workers=2)
    loader = build_loader(cfg, "train", rank=0, world_size=1)
    batches = first_batches(loader, 6)
    assert len(batches) == 6 and all(b["video"].shape[0] == 2 for b in batches)
    assert loader.stats.samples_ok >= 12 and loader.stats.samples_bad == 0


@pytest.fixture(scope="module")
def uneven_shards(tiny_synthetic, tmp_path_factory):
    """The 8 synthetic training clips in shards of 3, 3, 2 samples."""
    listing = os.path.join(os.path.dirname(tiny_synthetic["train_shards"]), "..", "videos", "train", "list.jsonl")
    out = str(tmp_path_factory.mktemp("uneven") / "part")
    make_shards(listing, out, shard_size=3, progress=False)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("remainder, expected_batches", [("pad", 3), ("drop", 1)])
def test_eval_ranks_get_equal_batch_counts(uneven_shards, remainder, expected_batches):
    # Rank 0 reads shards 0 and 2 (5 samples), rank 1 shard 1 (3 samples); batch size 2.
    cfg = data_cfg(eval_shards=uneven_shards, num_workers=1, eval_remainder=remainder)
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, "eval", rank=rank, world_size=2)
        batches = list(loader)
        assert len(loader) == len(batches) == expected_batches
        assert all(b["video"].shape[0] == 2 and b["valid"].shape == (2,) for b in batches)
        per_rank.append([k for b in batches for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok])
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen))
    assert len(seen) == (8 if remainder == "pad" else 4)  # pad: every sample once; drop: 1 full batch per rank


def test_too_few_shards_for_the_readers_is_an_error(uneven_shards):
    cfg = data_cfg(eval_shards=uneven_shards, num_workers=2)
    with pytest.raises(ValueError, match=r"3 shards but 2 ranks x 2 loader workers need at least 4"):
        build_loader(cfg, "eval", rank=0, world_size=2)


def test_eval_uses_segment_middles_and_first_caption(tiny_synthetic):
    cfg = data_cfg(eval_shards=tiny_synthetic["eval_shards"], batch_size=4)
    a = list(build_loader(cfg, "eval", 0, 1))
    b = list(build_loader(cfg, "eval", 0, 1, seed=5))
    assert len(a) == 1 and a[0]["valid"].all()
    torch.testing.assert_close(a[0]["video"], b[0]["video"])  # deterministic: no random crop or sampling
    assert all(len(t.split()) == 5 for t in a[0]["text"])  # canonical "<a|two> <colour> <shape> <verb> <dir>"


def test_choose_caption_modes():
    captions = ["one", "two", "three"]
    assert choose_caption("only", "random", random.Random(0)) == "only"
    assert choose_caption(captions, "first", random.Random(0)) == "one"
    assert choose_caption(captions, "join", random.Random(0)) == "one two three"
    picks = {choose_caption(captions, "random", random.Random(s)) for s in range(20)}
    assert picks == set(captions)


@pytest.fixture
def shard_with_a_corrupt_sample(tmp_path):
    good = encode_h264(np.full((6, 32, 32, 3), 90, dtype=np.uint8), fps=6.0)
    meta = json.dumps({"caption": "grey", "video_id": "v", "duration": 1.0}).encode()
    with wds.TarWriter(str(tmp_path / "c-000000.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"good{i}", "mp4": good, "json": meta})
        tar.write({"__key__": "bad", "mp4": good[: len(good) // 3], "json": meta})
    return str(tmp_path)


def test_corrupt_sample_is_skipped_and_counted(shard_with_a_corrupt_sample):
    cfg = data_cfg(eval_shards=shard_with_a_corrupt_sample, batch_size=4, max_bad_fraction=0.5)
    loader = build_loader(cfg, "eval", 0, 1)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["valid"].tolist() == [True, True, True, False]
    assert sorted(batches[0]["key"][:3]) == ["good0", "good1", "good2"]
    assert (loader.stats.samples_ok, loader.stats.samples_bad) == (3, 1)
    assert "bad" in loader.stats.recent_errors[0]


def test_too_many_corrupt_samples_stop_the_run(shard_with_a_corrupt_sample):
    eval_cfg = data_cfg(eval_shards=shard_with_a_corrupt_sample, batch_size=4, max_bad_fraction=0.1)
    with pytest.raises(DataQualityError, match=r"1 of 4 samples \(25.0%\) could not be decoded"):
        list(build_loader(eval_cfg, "eval", 0, 1))
    train_cfg = data_cfg(train_shards=shard_with_a_corrupt_sample, max_bad_fraction=0.1, bad_check_min_samples=8)
    with pytest.raises(DataQualityError, match="data.max_bad_fraction=0.1"):
        first_batches(build_loader(train_cfg, "train", 0, 1), 50)


@pytest.mark.timeout(60)
def test_an_all_corrupt_stream_fails_instead_of_hanging(tmp_path):
    meta = json.dumps({"caption": "x", "video_id": "v", "duration": 1.0}).encode()
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"bad{i}", "mp4": b"not a video", "json": meta})
    cfg = data_cfg(train_shards=str(tmp_path), num_workers=1, bad_check_min_samples=5)
    with pytest.raises(DataQualityError, match=r"5 of 5 samples \(100.0%\)"):
        next(iter(build_loader(cfg, "train", 0, 1)))
