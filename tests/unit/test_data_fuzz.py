"""Fuzzing the streaming reader: seeded random shards (random bytes, truncated tars, random JSON, wrong member names,
absurd durations, damaged mp4s) must never hang or crash a run. Each case has its own time limit; every sample
webdataset groups from an intact shard is either yielded or counted bad, damaged shards are counted as shard
errors, and a stream that can never give a batch stops with a clear error."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.check import inspect_shards
from pipeline.data.encode import encode_h264
from pipeline.data.reader import DataQualityError, build_loader

CASES = 40  # seeds for the exact (eval) pass
TRAIN_CASES = 8


@pytest.fixture(scope="module")
def clip() -> bytes:
    frames = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    return encode_h264(frames, fps=6.0)


def good_meta(rng: random.Random) -> dict:
    return {"caption": f"clip {rng.random():.3f}", "video_id": "v", "duration": 1.0}


# Metadata members a shard may carry instead of `{"caption": str | [str], "duration": float, ...}`.
JSON_VARIANTS = {
    "not_json": b"\x9c\xff caption?",
    "invalid_utf8": b'{"caption": "\xff\xfe"}',
    "empty": b"",
    "cut": b'{"caption": "a red ci',
    "list": b"[]",
    "number": b"3",
    "string": b'"caption"',
    "null": b"null",
    "no_caption": b'{"duration": 1.0}',
    "caption_null": b'{"caption": null}',
    "caption_number": b'{"caption": 3}',
    "caption_empty_list": b'{"caption": []}',
    "caption_numbers": b'{"caption": [1, 2]}',
    "caption_mapping": b'{"caption": {"0": "x"}}',
    "caption_with_null": b'{"caption": ["a", null]}',
    "caption_nested": b'{"caption": [["deep"]]}',
    "caption_huge": json.dumps({"caption": "c" * 100_000}).encode(),
    "deeply_nested": b"[" * 100_000 + b"]" * 100_000,  # deeper than the interpreter's recursion limit
    "duration_overflow": b'{"caption": "c", "duration": 1e400}',
    "duration_negative": b'{"caption": "c", "duration": -5}',
    "duration_nan": b'{"caption": "c", "duration": NaN}',
    "duration_text": b'{"caption": "c", "duration": "long"}',
    "duration_null": b'{"caption": "c", "duration": null}',
}


def random_json(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(0, 64))
    return JSON_VARIANTS[rng.choice(sorted(JSON_VARIANTS))]


def damaged_video(rng: random.Random, video: bytes) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 2000))
    if kind == 1:
        return video[: rng.randrange(0, len(video))]
    if kind == 2:
        flipped = bytearray(video)
        for _ in range(rng.randrange(1, 20)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    return b""


def random_sample(rng: random.Random, video: bytes) -> tuple[dict[str, bytes], bool]:
    """Members of one sample ({extension: bytes}) and whether it is intact (must come out of the reader)."""
    kind = rng.randrange(6)
    meta = json.dumps(good_meta(rng)).encode()
    if kind <= 1:
        members = {"mp4": video, "json": meta}
        if kind == 1:
            members["txt"] = rng.randbytes(8)  # an extra member does no harm
        return members, True
    if kind == 2:
        return {"mp4": video, "json": random_json(rng)}, False
    if kind == 3:
        return {"mp4": damaged_video(rng, video), "json": meta}, False
    if kind == 4:  # wrong member names (each with an extension, so webdataset still groups them into a sample)
        name = rng.choice(["MP4", "mp4.bak", "avi", "video", "json.mp4"])
        return rng.choice([{name: video, "json": meta}, {"mp4": video}, {"json": meta}, {name: video}]), False
    return {"mp4": damaged_video(rng, video), "json": random_json(rng)}, False


def write_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def damage_shard(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    kind = rng.choice(["intact", "intact", "truncated", "random", "garbage_tail", "bad_header"])
    if kind == "truncated":
        return data[: rng.randrange(1, len(data))], kind
    if kind == "random":
        return rng.randbytes(rng.randrange(0, 4096)), kind
    if kind == "garbage_tail":
        return data + rng.randbytes(rng.randrange(1, 2000)), kind
    if kind == "bad_header":  # a member header that claims far more data than the archive holds
        header = bytearray(data)
        header[124:136] = b"77777777777\0"  # the size field of the first member, octal
        return bytes(header), kind
    return data, kind


def write_fuzzed_shards(rng: random.Random, root, video: bytes, num_shards: int) -> dict[str, dict]:
    """Shards under root; per shard URL: written keys, the keys that must come out, and how the shard was damaged."""
    written = {}
    manifest = {"shards": []}
    for s in range(num_shards):
        samples, intact_keys = [], []
        for i in range(rng.randrange(0, 6)):
            members, intact = random_sample(rng, video)
            key = f"s{s}_{i:02d}"
            samples.append((key, members))
            if intact:
                intact_keys.append(key)
        data, damage = damage_shard(rng, write_tar(samples))
        name = f"fuzz-{s:06d}.tar"
        (root / name).write_bytes(data)
        manifest["shards"].append({"name": name, "num_samples": len(samples)})
        written[str(root / name)] = {"keys": [k for k, _ in samples], "intact": intact_keys, "damage": damage}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return written


def data_cfg(shards: str, **overrides) -> DataConfig:
    base = dict(train_shards=shards, eval_shards=shards, num_frames=4, img_size=32, batch_size=2, num_workers=0,
                shuffle_buffer=1, flip=False, max_bad_fraction=1.0)  # fmt: skip
    return DataConfig(**{**base, **overrides})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(CASES))
def test_exact_pass_over_fuzzed_shards_accounts_for_every_sample(seed, tmp_path, clip):
    rng = random.Random(seed)
    written = write_fuzzed_shards(rng, tmp_path, clip, num_shards=3)
    loader = build_loader(data_cfg(str(tmp_path)), "eval", 0, 1)
    try:
        batches = list(loader)
    except DataQualityError as err:  # only when nothing at all could be decoded
        assert "decoded no eval samples" in str(err) and loader.stats.samples_ok == 0
        return
    assert all(isinstance(t, str) for b in batches for t in b["text"])
    yielded = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
    assert len(yielded) == len(set(yielded)), "a sample came out twice"
    all_keys = {k for shard in written.values() for k in shard["keys"]}
    assert set(yielded) <= all_keys
    assert len(batches) == len(loader) and all(len(b["key"]) == 2 for b in batches)  # equal batches, whatever broke
    intact = [shard for shard in written.values() if shard["damage"] in ("intact", "garbage_tail")]
    for shard in intact:
        assert set(shard["intact"]) <= set(yielded), "a good sample of an undamaged shard was lost"
    stats = loader.stats
    if len(intact) == len(written):
        assert stats.shard_errors == 0
        assert stats.samples_ok + stats.samples_bad == len(all_keys), "a sample was neither yielded nor counted bad"
    else:
        assert stats.samples_ok + stats.samples_bad <= len(all_keys)
    if any(shard["damage"] == "random" and shard["keys"] for shard in written.values()):
        assert stats.shard_errors >= 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(0, CASES, 4))
def test_inspector_reports_fuzzed_shards_without_crashing(seed, tmp_path, clip):
    written = write_fuzzed_shards(random.Random(seed), tmp_path, clip, num_shards=3)
    report = inspect_shards(str(tmp_path), decode=True)
    assert [s["url"] for s in report["shards"]] == sorted(written)
    unreadable = {b["shard"] for b in report["bad"] if b["key"] is None}
    for url, shard in written.items():
        if shard["damage"] in ("intact", "garbage_tail"):
            assert url not in unreadable
            assert report["shards"][sorted(written).index(url)]["num_samples"] == len(shard["keys"])
        elif shard["damage"] == "random" and shard["keys"]:
            assert url in unreadable
    bad_keys = {b["key"] for b in report["bad"] if b["key"] is not None}
    assert bad_keys <= {k for s in written.values() for k in s["keys"]}
    assert not bad_keys & {k for s in written.values() for k in s["intact"]}, "a good sample was reported bad"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(TRAIN_CASES))
def test_training_stream_over_fuzzed_shards_yields_or_stops_clearly(seed, tmp_path, clip):
    rng = random.Random(1000 + seed)
    write_fuzzed_shards(rng, tmp_path, clip, num_shards=2)
    try:
        loader = build_loader(data_cfg(str(tmp_path), bad_check_min_samples=50, num_workers=seed % 2), "train", 0, 1)
        for _, batch in zip(range(4), loader, strict=False):
            assert len(batch["key"]) == 2
    except (DataQualityError, RuntimeError) as err:  # never a hang: a stream that cannot give a batch says why
        message = str(err)
        assert any(reason in message for reason in (
            "shard read errors in a row", "holds no samples", "could not be decoded", "none of the",
            "the manifests list no samples")), message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("variant", sorted(JSON_VARIANTS))
def test_every_metadata_variant_is_read_as_text_or_counted_bad(variant, tmp_path, clip):
    meta = json.dumps({"caption": "good", "duration": 1.0}).encode()
    samples = [("good", {"mp4": clip, "json": meta}), ("odd", {"mp4": clip, "json": JSON_VARIANTS[variant]})]
    (tmp_path / "v-000000.tar").write_bytes(write_tar(samples))
    loader = build_loader(data_cfg(str(tmp_path)), "eval", 0, 1)
    (batch,) = list(loader)
    texts = dict(zip(batch["key"], batch["text"], strict=True))
    assert texts["good"] == "good" and all(isinstance(t, str) for t in batch["text"])
    assert loader.stats.samples_ok + loader.stats.samples_bad == 2
    assert ("odd" in texts) == (loader.stats.samples_bad == 0)  # read as text, or counted bad: never lost
