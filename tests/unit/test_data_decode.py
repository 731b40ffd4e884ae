"""PyAV decoding: the sampled frame indices come out (frames whose grey level encodes their index), short
clips repeat frames, trimming, transcoding, and the clip transforms."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.data.decode import VideoDecodeError, decode_clip, probe_video, sample_frame_indices
from pipeline.data.encode import TranscodeOptions, encode_h264, transcode_h264
from pipeline.data.transforms import eval_transform, random_crop_box, train_transform

LEVEL = 8  # grey level step per frame index: survives H.264 quantisation of flat frames


def indexed_video(num_frames: int, fps: float = 10.0, height: int = 32, width: int = 48) -> bytes:
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        frames[i] = (i * LEVEL) % 256
    return encode_h264(frames, fps)


def decoded_indices(clip_THW3: np.ndarray, period: int = 32) -> list[int]:
    return [int(round(float(frame.mean()) / LEVEL)) % period for frame in clip_THW3]


def test_encodes_are_single_threaded_and_byte_identical():
    # 256 px: libx264's own choice here is 2+ threads (more on larger machines), which changes the bytes.
    frames = np.random.default_rng(0).integers(0, 256, (6, 256, 256, 3), dtype=np.uint8)
    first, second = encode_h264(frames, 8.0), encode_h264(frames, 8.0)
    assert first == second
    assert b" threads=1 " in first  # the encoder's options string in the stream's SEI


def test_probe_reports_the_encoded_stream():
    info = probe_video(indexed_video(30, fps=10.0))
    assert (info.num_frames, info.fps, info.width, info.height) == (30, 10.0, 48, 32)
    assert info.duration_s == pytest.approx(3.0)


def test_sample_frame_indices_rules():
    # Released "middle": bounds linspace(0, 80, 9) = 0, 10, ..., 80; segment [a, b) -> (a + b - 1) // 2.
    assert sample_frame_indices(80, 8, "middle") == [4, 14, 24, 34, 44, 54, 64, 74]
    rand = sample_frame_indices(80, 8, "rand", random.Random(0))
    assert all(10 * i <= j < 10 * (i + 1) for i, j in enumerate(rand))  # one per equal segment
    assert sample_frame_indices(80, 4, "stride", None, frame_stride=4) == [33, 37, 41, 45]  # centred: (80 - 13) // 2
    start = sample_frame_indices(80, 4, "stride", random.Random(1), frame_stride=4)
    assert np.diff(start).tolist() == [4, 4, 4] and 0 <= start[0] <= 80 - 13
    with pytest.raises(ValueError, match="needs a random generator"):
        sample_frame_indices(80, 8, "rand")
    with pytest.raises(ValueError, match="unknown sampling mode"):
        sample_frame_indices(80, 8, "uniform")


@pytest.mark.parametrize("mode", ["middle", "rand", "stride"])
def test_decoded_frames_are_the_sampled_indices(mode):
    video = indexed_video(30)
    expected = sample_frame_indices(30, 8, mode, random.Random(7), frame_stride=3)
    clip = decode_clip(video, 8, mode, random.Random(7), frame_stride=3)
    assert clip.shape == (8, 32, 48, 3) and clip.dtype == np.uint8
    assert decoded_indices(clip) == expected


def test_seeking_in_a_long_video_with_keyframes():
    # 200 frames with a keyframe every 25 (encoded by hand so seeks really happen): grey level = index % 32.
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.options = {"g": "25", "keyint_min": "25"}
        for i in range(200):
            frame = np.full((32, 48, 3), (i % 32) * LEVEL, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    expected = sample_frame_indices(200, 8, "rand", random.Random(3))
    clip = decode_clip(buffer.getvalue(), 8, "rand", random.Random(3))
    assert decoded_indices(clip) == [i % 32 for i in expected]


def test_short_clip_repeats_frames():
    clip = decode_clip(indexed_video(3), 8, "middle")
    assert decoded_indices(clip) == [0, 1, 2, 2, 2, 2, 2, 2]  # 3 segments of 1 frame, then the last repeated
    stride = decode_clip(indexed_video(3), 4, "stride", frame_stride=2)
    assert decoded_indices(stride) == [0, 2, 2, 2]


def test_trim_seconds_limits_sampling_to_the_start():
    clip = decode_clip(indexed_video(30, fps=10.0), 4, "middle", trim_seconds=1.0)  # first 10 frames
    assert decoded_indices(clip) == [0, 3, 5, 8]  # bounds int(linspace(0, 10, 5)) = 0, 2, 5, 7, 10


def test_corrupt_bytes_raise_a_decode_error():
    with pytest.raises(VideoDecodeError):
        decode_clip(b"\x00\x01not a video" * 100, 8, "middle")
    truncated = indexed_video(30)[:300]
    with pytest.raises(VideoDecodeError):
        decode_clip(truncated, 8, "middle")


def test_transcode_changes_size_and_rate_keeping_content():
    out = transcode_h264(indexed_video(30, fps=10.0, height=32, width=48), TranscodeOptions(short_side=16, fps=5.0))
    info = probe_video(out)
    assert (info.width, info.height, info.num_frames, info.fps) == (24, 16, 15, 5.0)
    # Output frame k shows input frame 2k (the latest at time k/5 s).
    assert decoded_indices(decode_clip(out, 15, "middle")) == list(range(0, 30, 2))


@pytest.mark.parametrize("size", [16, 48])  # down- and up-sampling
def test_eval_transform_is_the_released_test_transform(size):
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 20, 30, 3), dtype=np.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    out = eval_transform(frames, size, mean, std)
    # Reference: the released test transform on (T, C, H, W) uint8 frames, with the antialias=False that
    # torchvision < 0.17 applied to tensors by default; then float / 255 and Normalize.
    released = transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=False),
        transforms.Lambda(lambda x: x.float().div(255.0)),
        transforms.Normalize(mean, std),
    ])
    ref_TCHW = released(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
    assert out.shape == (3, 2, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_TCHW.permute(1, 0, 2, 3), rtol=0, atol=0)


def test_train_transform_crops_one_box_for_all_frames():
    frames = np.zeros((3, 40, 60, 3), dtype=np.uint8)
    frames[:, :, 30:] = 255  # right half white
    out = train_transform(frames, 16, (0.3, 0.6), False, [0.0] * 3, [1.0] * 3, random.Random(5))
    assert out.shape == (3, 3, 16, 16)
    torch.testing.assert_close(out[:, 0], out[:, 2])  # same crop on every frame
    top, left, h, w = random_crop_box(40, 60, (0.3, 0.6), random.Random(5))
    assert 0.3 * 2400 * 0.9 <= h * w <= 0.6 * 2400 * 1.1 and 0 <= top <= 40 - h and 0 <= left <= 60 - w
    flipped = train_transform(frames, 16, (1.0, 1.0), True, [0.0] * 3, [1.0] * 3, random.Random(2))
    unflipped = train_transform(frames, 16, (1.0, 1.0), False, [0.0] * 3, [1.0] * 3, random.Random(2))
    assert torch.equal(flipped, unflipped) or torch.allclose(flipped, unflipped.flip(-1))
