"""Decoding and preprocessing real-world-like footage (pipeline/data/footage.py) with PyAV: every kind of footage
(long GOP, B-frames, HEVC 10-bit, VP9/WebM, VFR + rotation + audio) decodes to exactly the frames a full decode
gives at the sampled indices, and the shard preprocessing (transcode) does what its options say."""

from __future__ import annotations

import io
import random

import av
import numpy as np
import pytest

from pipeline.data.decode import (
    DecodeOptions,
    FrameTable,
    decode_at,
    decode_clip,
    open_video,
    probe_video,
    sample_frame_indices,
    sparse_clip_indices,
)
from pipeline.data.encode import TranscodeOptions, transcode_h264
from pipeline.data.footage import FOOTAGE, frame_times, small
from tests._footage import full_decode


def picture_types(data: bytes) -> str:
    with av.open(io.BytesIO(data)) as container:
        return "".join("?IPB"[f.pict_type] for f in container.decode(container.streams.video[0]))


@pytest.mark.parametrize("name", list(FOOTAGE))
@pytest.mark.parametrize("options", [DecodeOptions(), DecodeOptions(skip_nonref=False), DecodeOptions(threads=0)],
                         ids=["skip_nonref", "decode_all", "ffmpeg_threads"])  # fmt: skip
def test_sampled_frames_equal_a_full_decode(footage, name, options):
    reference = full_decode(footage[name])
    for seed in range(3):
        for mode in ("rand", "middle", "stride", "sparse_middle"):
            expected = sample_frame_indices(len(reference), 6, mode, random.Random(seed), frame_stride=2)
            clip = decode_clip(footage[name], 6, mode, random.Random(seed), frame_stride=2, options=options)
            np.testing.assert_array_equal(clip, np.stack([reference[i] for i in expected]), err_msg=f"{mode} {seed}")


@pytest.mark.parametrize("name", list(FOOTAGE))
def test_multi_view_clips_in_one_pass_equal_a_full_decode(footage, name):
    """The classification test's clips come from one decode_at pass: clip-major, so out of order and overlapping."""
    def views(num_video_frames: int) -> list[int]:
        return [i for c in range(3) for i in sparse_clip_indices(num_video_frames, 5, 3, c)]

    reference = full_decode(footage[name])
    expected = np.stack([reference[i] for i in views(len(reference))])
    np.testing.assert_array_equal(decode_at(footage[name], views), expected)


def test_frame_table_numbers_variable_rate_frames_by_presentation_order(footage):
    spec = small(FOOTAGE["480p_vfr_rotated_audio"])
    times = frame_times(spec)
    assert len(set(np.diff([float(t) for t in times]).round(6))) > 1  # really variable
    with open_video(footage[spec.name], probe_decode=False) as (container, stream):
        table = FrameTable.read(container, stream)
    assert len(table.pts) == spec.num_frames == len(full_decode(footage[spec.name]))
    seconds = [(p - table.start_pts) * table.seconds_per_tick for p in table.pts]
    np.testing.assert_allclose(seconds, [float(t) for t in times], atol=1e-4)
    # trim_seconds counts the frames that start before the limit, whatever their spacing
    limit = float(times[10]) + 1e-3
    assert table.usable(limit) == 11
    clip = decode_clip(footage[spec.name], 4, "middle", trim_seconds=limit)
    reference = full_decode(footage[spec.name])
    np.testing.assert_array_equal(clip, np.stack([reference[i] for i in (0, 3, 6, 9)]))
    # the released middle rule: int(linspace(0, 11, 5)) = 0, 2, 5, 8, 11; (a + b - 1) // 2 of each segment


def test_display_rotation_is_applied(footage):
    spec = small(FOOTAGE["480p_vfr_rotated_audio"])
    upright = decode_clip(footage[spec.name], 3, "middle")
    with av.open(io.BytesIO(footage[spec.name])) as container:
        stored = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert stored[0].shape == (spec.height, spec.width, 3) and upright.shape == (3, spec.width, spec.height, 3)
    # 90 degrees counter-clockwise, as ffmpeg and torchcodec show it (tests/unit/test_data_torchcodec.py compares)
    assert len(stored) == 30  # middle frames of 3 segments: int(linspace(0, 30, 4)) = 0, 10, 20, 30 -> 4, 14, 24
    np.testing.assert_array_equal(upright, np.rot90(np.stack([stored[i] for i in (4, 14, 24)]), k=1, axes=(1, 2)))


def test_decode_short_side_scales_while_converting(footage):
    clip = decode_clip(footage["720p_longgop"], 4, "middle", options=DecodeOptions(short_side=32))
    full = decode_clip(footage["720p_longgop"], 4, "middle")
    assert clip.shape == (4, 32, 48, 3)
    # The same pictures, scaled: a box-filtered full frame is close (swscale's bilinear filter is not a box filter).
    boxed = full.reshape(4, 32, 2, 48, 2, 3).mean(axis=(2, 4))
    assert np.abs(clip.astype(float) - boxed).mean() < 6


@pytest.mark.parametrize("name", list(FOOTAGE))
def test_training_preprocessing(footage, name):
    """short side, fixed rate, fixed short GOP, no B-frames, 8-bit H.264 mp4, upright, no audio."""
    options = TranscodeOptions(short_side=32, fps=12.0, gop=4, bframes=0, tune="fastdecode")
    out = transcode_h264(footage[name], options)
    info = probe_video(out)
    spec = small(FOOTAGE[name])
    long_side = round(32 * max(spec.width, spec.height) / min(spec.width, spec.height) / 2) * 2
    upright = (32, long_side) if spec.rotation % 180 == 0 else (long_side, 32)
    assert (info.height, info.width, info.codec, info.container[:3], info.fps) == (*upright, "h264", "mov", 12.0)
    with av.open(io.BytesIO(out)) as container:
        assert [s.type for s in container.streams] == ["video"]
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    types = picture_types(out)
    assert "B" not in types and types == "".join("I" if k % 4 == 0 else "P" for k in range(len(types)))
    duration = float(frame_times(spec)[-1]) + 1 / spec.fps
    assert abs(len(types) - duration * 12) <= 1


def test_transcode_keeps_the_latest_frame_at_each_tick_of_variable_rate_input(footage):
    spec = small(FOOTAGE["480p_vfr_rotated_audio"])
    out = transcode_h264(footage[spec.name], TranscodeOptions(fps=spec.fps))  # same size, fixed rate
    source, resampled = full_decode(footage[spec.name]), full_decode(out)
    times = [float(t) for t in frame_times(spec)]
    for k, frame in enumerate(resampled[:-1]):
        shown = max(i for i, t in enumerate(times) if t <= k / spec.fps + 1e-6)
        errors = [np.abs(frame.astype(int) - s.astype(int)).mean() for s in source]
        assert int(np.argmin(errors)) == shown, (k, shown, np.round(errors, 1))


def test_transcode_options_are_checked():
    with pytest.raises(ValueError, match="transcode gop"):
        TranscodeOptions(gop=1)
    with pytest.raises(ValueError, match="transcode bframes"):
        TranscodeOptions(bframes=-1)
    with pytest.raises(ValueError, match="transcode fps"):
        TranscodeOptions(fps=0)


def test_make_shards_job_preprocesses_raw_footage_for_training(tmp_path, footage, capsys):
    from jobs.make_shards import main as make_shards_main
    from pipeline.data.manifest import iter_shard, read_manifest

    rows = []
    for name in ("720p_longgop", "720p_hevc_10bit", "720p_vp9", "480p_vfr_rotated_audio"):
        path = tmp_path / f"{name}.{FOOTAGE[name].container}"
        path.write_bytes(footage[name])
        rows.append(f'{{"video": "{path.name}", "caption": "{name}"}}')
    (tmp_path / "list.jsonl").write_text("\n".join(rows) + "\n")
    argv = ["--input", str(tmp_path / "list.jsonl"), "--output", str(tmp_path / "shards"), "--shard-size", "2",
            "--transcode", "--short-side", "32", "--gop", "4", "--bframes", "0", "--tune", "fastdecode"]  # fmt: skip
    assert make_shards_main(argv) == 0
    manifest = read_manifest(str(tmp_path / "shards"))
    assert manifest["num_samples"] == 4 and not manifest["skipped"]
    assert manifest["options"]["transcode"] == {
        "short_side": 32, "fps": None, "gop": 4, "bframes": 0, "crf": 23, "preset": "veryfast", "tune": "fastdecode",
        "codec": "h264", "pix_fmt": "yuv420p", "audio": "dropped", "rotation": "applied"}  # fmt: skip
    for shard in manifest["shards"]:
        for sample in iter_shard(str(tmp_path / "shards" / shard["name"])):
            assert "B" not in picture_types(sample["mp4"]) and min(probe_video(sample["mp4"]).width,
                                                                   probe_video(sample["mp4"]).height) == 32
    with pytest.raises(SystemExit):
        make_shards_main(["--input", "x.csv", "--output", str(tmp_path / "o"), "--gop", "4"])  # needs --transcode
    assert "need --transcode" in capsys.readouterr().err
