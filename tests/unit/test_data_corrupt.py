"""Corrupt inputs inside shards and in the writer's list: a truncated mp4, a text file named .mp4, a video member
named .avi and a zero-byte mp4 are skipped, counted, logged with their key, and stop the run past the limit."""

from __future__ import annotations

import json
import logging

import av
import numpy as np
import pytest
import webdataset as wds

from pipeline.config import DataConfig
from pipeline.data.check import inspect_shards
from pipeline.data.encode import encode_h264
from pipeline.data.reader import DataQualityError, build_loader
from pipeline.data.shards import make_shards

BAD_KEYS = ("truncated", "text_as_mp4", "avi_member", "zero_bytes")


def good_mp4(level: int = 90) -> bytes:
    return encode_h264(np.full((6, 32, 32, 3), level, dtype=np.uint8), fps=6.0)


def bad_members(video: bytes) -> dict[str, dict[str, bytes]]:
    """Key -> members of each corrupt sample (the mp4 is written without faststart: cutting it loses the index)."""
    return {
        "truncated": {"mp4": video[: len(video) // 2]},
        "text_as_mp4": {"mp4": b"caption list, not a video\n"},
        "avi_member": {"avi": video},  # right bytes, wrong member name: the sample has no mp4
        "zero_bytes": {"mp4": b""},
    }


@pytest.fixture
def corrupt_shard(tmp_path):
    """One shard: 6 good samples with the 4 corrupt ones in between."""
    video = good_mp4()
    meta = json.dumps({"caption": "grey", "video_id": "v", "duration": 1.0}).encode()
    bad = bad_members(video)
    with wds.TarWriter(str(tmp_path / "mixed-000000.tar")) as tar:
        for i in range(6):
            tar.write({"__key__": f"good{i}", "mp4": video, "json": meta})
            if i < len(BAD_KEYS):
                tar.write({"__key__": BAD_KEYS[i], **bad[BAD_KEYS[i]], "json": meta})
    return str(tmp_path)


def cfg(shards: str, **overrides) -> DataConfig:
    base = dict(eval_shards=shards, train_shards=shards, num_frames=4, img_size=32, batch_size=4, num_workers=0)
    return DataConfig(**{**base, **overrides})


def test_each_corrupt_sample_is_skipped_counted_and_logged_with_its_key(corrupt_shard, caplog):
    loader = build_loader(cfg(corrupt_shard, max_bad_fraction=0.5), "eval", 0, 1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.reader"):
        batches = list(loader)
    keys = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
    assert sorted(keys) == [f"good{i}" for i in range(6)]
    assert (loader.stats.samples_ok, loader.stats.samples_bad) == (6, 4)
    assert loader.stats.bad_fraction == pytest.approx(0.4)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample")]
    assert [m.split()[2] for m in logged] == list(BAD_KEYS)
    assert "KeyError('mp4')" in next(m for m in logged if "avi_member" in m)
    assert all("VideoDecodeError" in m for m in logged if "avi_member" not in m)
    assert [e.split()[0] for e in loader.stats.recent_errors] == list(BAD_KEYS)


@pytest.mark.timeout(60)
def test_counts_reach_the_main_process_from_a_worker_and_the_limit_stops_the_run(corrupt_shard):
    # Train stream in a loader process: the counters travel with the batches and are summed in the main process.
    loader = build_loader(cfg(corrupt_shard, num_workers=1, max_bad_fraction=0.5, shuffle_buffer=1), "train", 0, 1)
    iterator = iter(loader)
    for _ in range(5):  # 20 good rows: the shard (6 good, 4 bad) is read at least 3 times
        next(iterator)
    assert loader.stats.samples_ok >= 20 and loader.stats.samples_bad >= 8
    assert loader.stats.bad_fraction == pytest.approx(0.4, abs=0.1)
    del iterator

    strict = cfg(corrupt_shard, num_workers=1, max_bad_fraction=0.2, bad_check_min_samples=10)
    with pytest.raises(DataQualityError, match=r"above data.max_bad_fraction=0.2; recent errors: .*truncated"):
        for _ in build_loader(strict, "train", 0, 1):
            pass
    with pytest.raises(DataQualityError, match=r"4 of 10 samples \(40.0%\) could not be decoded"):
        list(build_loader(cfg(corrupt_shard, max_bad_fraction=0.2), "eval", 0, 1))


def test_inspector_names_every_corrupt_key(corrupt_shard):
    report = inspect_shards(corrupt_shard, decode=True)
    assert (report["num_samples"], report["num_bad"]) == (10, 4)
    assert [b["key"] for b in report["bad"]] == list(BAD_KEYS)


def test_writer_lists_corrupt_inputs_as_skipped_with_reasons(tmp_path):
    video = good_mp4()
    (tmp_path / "good.mp4").write_bytes(video)
    (tmp_path / "truncated.mp4").write_bytes(video[: len(video) // 2])
    (tmp_path / "notes.mp4").write_text("caption list, not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "clip.avi").write_bytes(avi_video())
    names = ["good.mp4", "truncated.mp4", "notes.mp4", "empty.mp4", "clip.avi"]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"video": n, "caption": n}) + "\n" for n in names))

    manifest = make_shards(str(tmp_path / "list.jsonl"), str(tmp_path / "out"), shard_size=10, progress=False)
    assert manifest["num_samples"] == 1
    skipped = {s["video"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == sorted(names[1:])
    assert skipped == {s["video"]: s["reason"] for s in manifest["shards"][0]["skipped"]}
    assert skipped["truncated.mp4"] == "no video stream"  # the container header survives, its index does not
    for name in ("notes.mp4", "empty.mp4"):
        assert skipped[name].startswith("cannot open video: [Errno 1094995529] Invalid data"), skipped[name]
    assert skipped["clip.avi"] == "container is 'avi', not mp4; rerun with --transcode"


def avi_video() -> bytes:
    """A real, decodable video in an AVI container (MPEG-4 part 2)."""
    import io

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 90, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()
