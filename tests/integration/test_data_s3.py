"""Writer -> reader round trip on a real local S3 server (moto), through s3fs and AWS_ENDPOINT_URL only."""

from __future__ import annotations

import json
import os

import pytest
import s3fs

from pipeline.config import DataConfig
from pipeline.data.check import inspect_shards
from pipeline.data.manifest import iter_shard, read_manifest
from pipeline.data.reader import build_loader
from pipeline.data.shards import make_shards
from pipeline.data.urls import expand_shard_urls


@pytest.mark.timeout(120)
def test_s3_round_trip_and_resume(moto_s3, tiny_synthetic):
    fs = s3fs.S3FileSystem()  # endpoint from AWS_ENDPOINT_URL, like a user's environment
    fs.mkdir("videos")  # creates the bucket
    listing = os.path.join(os.path.dirname(tiny_synthetic["train_shards"]), "..", "videos", "train", "list.jsonl")
    manifest = make_shards(listing, "s3://videos/webvid/train", shard_size=3, progress=False)
    assert sorted(fs.ls("videos/webvid/train")) == [
        "videos/webvid/train/classes.txt",  # the synthetic listing is labelled (motion direction)
        "videos/webvid/train/manifest.json",
        "videos/webvid/train/train-000000.tar",
        "videos/webvid/train/train-000001.tar",
        "videos/webvid/train/train-000002.tar",
    ]
    assert read_manifest("s3://videos/webvid/train") == manifest and manifest["num_samples"] == 8

    # Rerunning finds every shard complete and uploads nothing.
    modified = {p: fs.info(p)["LastModified"] for p in fs.ls("videos/webvid/train") if p.endswith(".tar")}
    assert make_shards(listing, "s3://videos/webvid/train", shard_size=3, progress=False) == manifest
    fs.invalidate_cache()
    assert {p: fs.info(p)["LastModified"] for p in modified} == modified

    # Exact pass over a brace pattern, in a loader worker process, through webdataset's gopen.
    cfg = DataConfig(
        eval_shards="s3://videos/webvid/train/train-{000000..000002}.tar",
        num_frames=4, img_size=32, batch_size=4, num_workers=1,
    )  # fmt: skip
    batches = list(build_loader(cfg, "eval", rank=0, world_size=1))
    keys = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
    assert sorted(keys) == sorted(s["__key__"] for s in _local_samples(tiny_synthetic))
    assert batches[0]["video"].shape == (4, 3, 4, 32, 32)

    # Training stream from the prefix (directory listing), and the inspector on S3.
    train_cfg = DataConfig(
        train_shards="s3://videos/webvid/train", num_frames=4, img_size=32, batch_size=2, num_workers=0
    )
    loader = build_loader(train_cfg, "train", rank=0, world_size=1)
    assert next(iter(loader))["video"].shape == (2, 3, 4, 32, 32)
    report = inspect_shards("s3://videos/webvid/train", decode=True)
    assert (report["num_samples"], report["num_bad"]) == (8, 0)


def _local_samples(tiny_synthetic):
    return [s for url in expand_shard_urls(tiny_synthetic["train_shards"]) for s in iter_shard(url)]


@pytest.mark.timeout(120)
def test_synthetic_set_written_to_s3(moto_s3):
    from pipeline.data.synthetic import make_synthetic

    fs = s3fs.S3FileSystem()
    fs.mkdir("demo")
    paths = make_synthetic("s3://demo/data", num_videos=10, split_ratio=0.8, num_frames=4, size=32)
    assert paths["eval_shards"] == "s3://demo/data/shards/eval"
    annotations = json.loads(fs.cat(paths["eval_annotations"]))
    assert len(annotations) == 2
    assert all(fs.exists(f"demo/data/videos/eval/{a['video']}") for a in annotations)
    assert read_manifest(paths["train_shards"])["num_samples"] == 8
    assert read_manifest(paths["eval_shards"])["num_samples"] == 2
