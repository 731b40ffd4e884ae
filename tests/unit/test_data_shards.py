"""Shard writer and inspector on a local directory: round trip, skipped inputs, stable keys, crash resume,
transcoding with worker processes, and the inspector's exit codes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.decode import probe_video
from pipeline.data.encode import encode_h264
from pipeline.data.keys import make_key
from pipeline.data.manifest import iter_shard, read_manifest
from pipeline.data.shards import TranscodeOptions, make_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_inputs(root, num_videos: int = 5) -> str:
    """`num_videos` real clips + one unreadable file + one missing file, listed in a CSV."""
    os.makedirs(root / "clips", exist_ok=True)
    rows = ["video,caption"]
    for i in range(num_videos):
        frames = np.full((6 + i, 16, 24, 3), 20 * i, dtype=np.uint8)
        (root / "clips" / f"v{i}.mp4").write_bytes(encode_h264(frames, fps=6.0))
        caption = f'"[""clip {i}"", ""video {i}""]"' if i == 0 else f"clip {i}"
        rows.append(f"clips/v{i}.mp4,{caption}")
    (root / "clips" / "broken.mp4").write_bytes(b"this is not a video")
    rows += ["clips/broken.mp4,broken", "clips/missing.mp4,missing"]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return str(root / "list.csv")


def shard_keys(out) -> dict[str, list[str]]:
    return {
        name: [s["__key__"] for s in iter_shard(os.path.join(out, name))]
        for name in sorted(os.listdir(out))
        if name.endswith(".tar")
    }


def test_round_trip_manifest_and_skipped_inputs(tmp_path):
    out = str(tmp_path / "train")
    manifest = make_shards(write_inputs(tmp_path), out, shard_size=3, progress=False)
    assert manifest["complete"] and manifest["num_shards"] == 3
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 2, 0]
    assert manifest["num_samples"] == 5
    assert manifest["total_duration_s"] == pytest.approx(sum(6 + i for i in range(5)) / 6, abs=1e-3)
    skipped = {s["video"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"clips/broken.mp4", "clips/missing.mp4"}
    assert "cannot open video" in skipped["clips/broken.mp4"] and "No such file" in skipped["clips/missing.mp4"]
    assert read_manifest(out) == manifest

    samples = {s["__key__"]: s for name in shard_keys(out) for s in iter_shard(os.path.join(out, name))}
    assert set(samples) == {make_key(f"clips/v{i}.mp4") for i in range(5)}
    first = json.loads(samples[make_key("clips/v0.mp4")]["json"])
    assert first["caption"] == ["clip 0", "video 0"] and first["video_id"] == "v0.mp4"
    assert first["num_frames"] == 6 and first["duration"] == pytest.approx(1.0)
    with open(tmp_path / "clips" / "v3.mp4", "rb") as f:
        assert samples[make_key("clips/v3.mp4")]["mp4"] == f.read()  # stored as-is without --transcode


def test_same_list_gives_the_same_shards(tmp_path):
    listing = write_inputs(tmp_path)
    make_shards(listing, str(tmp_path / "a" / "train"), shard_size=2, progress=False)
    make_shards(listing, str(tmp_path / "b" / "train"), shard_size=2, progress=False)
    assert shard_keys(tmp_path / "a" / "train") == shard_keys(tmp_path / "b" / "train")


def test_resume_after_a_crash_rewrites_only_missing_shards(tmp_path):
    listing, out = write_inputs(tmp_path), tmp_path / "train"
    full = make_shards(listing, str(out), shard_size=2, progress=False)
    before = shard_keys(out)
    # Simulate a crash while shard 2 was being written: its temp file is left, the manifest is partial,
    # and shard 1 was committed but the manifest update after it was lost.
    os.unlink(out / "train-000002.tar")
    (out / ".train-000002.tar.abc123.tmp").write_bytes(b"half a tar")
    partial = dict(full, complete=False, shards=full["shards"][:1])
    (out / "manifest.json").write_text(json.dumps(partial))
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in ("train-000000.tar", "train-000001.tar")}

    resumed = make_shards(listing, str(out), shard_size=2, progress=False)

    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes  # committed shards not rewritten
    assert not list(out.glob(".*.tmp"))
    assert shard_keys(out) == before
    keys = [k for ks in shard_keys(out).values() for k in ks]
    assert len(keys) == len(set(keys)) == 5
    assert resumed["complete"] and resumed["num_samples"] == 5
    assert [s["num_samples"] for s in resumed["shards"]] == [s["num_samples"] for s in full["shards"]]
    assert {s["video"] for s in resumed["skipped"]} == {"clips/broken.mp4", "clips/missing.mp4"}


def test_a_changed_list_is_refused(tmp_path):
    listing, out = write_inputs(tmp_path), str(tmp_path / "train")
    make_shards(listing, out, shard_size=2, progress=False)
    with open(listing, "a") as f:
        f.write("clips/v1.mp4,another caption\n")
    with pytest.raises(ValueError, match="different source_sha256"):
        make_shards(listing, out, shard_size=2, progress=False)


def test_bad_list_rows_name_the_row(tmp_path):
    (tmp_path / "list.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4"}\n')
    with pytest.raises(ValueError, match="row 2: caption must be"):
        make_shards(str(tmp_path / "list.jsonl"), str(tmp_path / "out"), progress=False)


@pytest.mark.timeout(120)
def test_transcode_with_worker_processes(tmp_path):
    listing = write_inputs(tmp_path)
    manifest = make_shards(
        listing, str(tmp_path / "t"), shard_size=2, transcode=TranscodeOptions(short_side=8, fps=3.0), workers=2,
        progress=False,
    )  # fmt: skip
    assert manifest["num_samples"] == 5 and manifest["options"]["transcode"] == {
        "short_side": 8, "fps": 3.0, "gop": None, "bframes": None, "crf": 23, "preset": "veryfast", "tune": None,
        "codec": "h264", "pix_fmt": "yuv420p", "audio": "dropped", "rotation": "applied"}  # fmt: skip
    for name in sorted(os.listdir(tmp_path / "t")):
        if name.endswith(".tar"):
            for sample in iter_shard(str(tmp_path / "t" / name)):
                info = probe_video(sample["mp4"])
                assert (info.height, info.width, info.fps) == (8, 12, 3.0)


def write_shard_with_a_corrupt_sample(path) -> None:
    good = encode_h264(np.zeros((4, 16, 16, 3), dtype=np.uint8), fps=4.0)
    meta = json.dumps({"caption": "c", "video_id": "v", "duration": 1.0}).encode()
    with wds.TarWriter(str(path)) as tar:
        for i in range(3):
            tar.write({"__key__": f"good{i}", "mp4": good, "json": meta})
        tar.write({"__key__": "bad", "mp4": good[: len(good) // 3], "json": meta})


def inspector_main():
    spec = importlib.util.spec_from_file_location("inspect_shards_job", os.path.join(REPO, "jobs", "inspect_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.timeout(180)
def test_inspector_exit_codes(tmp_path, capsys):
    write_shard_with_a_corrupt_sample(tmp_path / "s-000000.tar")
    main = inspector_main()
    assert main([str(tmp_path), "--json"]) == 0  # without --decode only the metadata is checked
    assert json.loads(capsys.readouterr().out)["num_samples"] == 4

    assert main([str(tmp_path), "--decode", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["num_bad"] == 1 and report["bad"][0]["key"] == "bad"
    assert report["bad_fraction"] == pytest.approx(0.25)

    # The real command line, as a user runs it.
    tolerant = subprocess.run(
        [sys.executable, "jobs/inspect_shards.py", str(tmp_path), "--decode", "--max-bad-fraction", "0.3"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert tolerant.returncode == 0 and "bad samples: 1 (25.00%)" in tolerant.stdout
