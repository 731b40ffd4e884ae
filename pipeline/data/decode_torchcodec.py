"""Clip decoding with torchcodec (optional): CPU, or CUDA through NVDEC.

torchcodec's "exact" seek mode scans the packets once when a clip is opened, so frame i is the i-th frame in
presentation order, as PyAV's path numbers them (pipeline/data/decode.py) and variable-rate video is safe. The same
`sample_frame_indices` choose the frames. torchcodec needs FFmpeg 4-9 shared libraries at process start: the system's,
or PyAV's bundled copy (`LD_LIBRARY_PATH=$(python -m pipeline.data.ffmpeg_libs)`, see pipeline/data/ffmpeg_libs.py).
"""

from __future__ import annotations

import random

import av
import torch

from pipeline.data.decode import FrameTable, VideoDecodeError, open_video, sample_frame_indices

_PYAV_FFMPEG_HINT = (
    "install FFmpeg's shared libraries (e.g. apt-get install ffmpeg), or start the process with PyAV's bundled "
    "FFmpeg on the library path: export LD_LIBRARY_PATH=$(python -m pipeline.data.ffmpeg_libs)"
)


def torchcodec_problem(device: str = "cpu") -> str | None:
    """Why torchcodec cannot decode on `device` in this process, or None when it can."""
    try:
        import torchcodec
    except ImportError as err:
        return f"torchcodec is not installed ({err}); pip install torchcodec==0.17.0 (needs torch >= 2.11)"
    if torchcodec.ffmpeg_major_version is None:
        return f"torchcodec {torchcodec.__version__} found no FFmpeg 4-9 libraries: {_PYAV_FFMPEG_HINT}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA decoding needs a CUDA device, and torch sees none"
    return None


def decode_clip_torchcodec(
    source: bytes,
    num_frames: int,
    mode: str,
    rng: random.Random | None = None,
    frame_stride: int = 1,
    trim_seconds: float | None = None,
    device: str = "cpu",
    threads: int = 1,
) -> torch.Tensor:
    """Sample and decode a clip like `decode_clip`: uint8 RGB (T, H, W, 3), upright, on `device`.

    Raises VideoDecodeError for unreadable or empty videos.
    """
    from torchcodec.decoders import VideoDecoder

    try:
        decoder = VideoDecoder(source, dimension_order="NHWC", num_ffmpeg_threads=threads, device=device,
                               seek_mode="exact")  # fmt: skip
        usable = len(decoder) if trim_seconds is None else _frames_within(source, trim_seconds)
        if usable < 1:
            raise VideoDecodeError("no frames in the video stream")
        indices = sample_frame_indices(usable, num_frames, mode, rng, frame_stride)
        unique = sorted(set(indices))
        frames_NHW3 = decoder.get_frames_at(unique).data
    except RuntimeError as err:  # torchcodec reports unreadable input as RuntimeError
        raise VideoDecodeError(f"torchcodec could not decode the video: {err}") from err
    if len(unique) == len(indices):
        return frames_NHW3
    position = {index: k for k, index in enumerate(unique)}
    return frames_NHW3[[position[i] for i in indices]]


def _frames_within(source: bytes, trim_seconds: float) -> int:
    """Frames starting in the first `trim_seconds`, counted from the packets' timestamps (exact for VFR)."""
    with open_video(source, probe_decode=False) as (container, stream):
        try:
            return FrameTable.read(container, stream).usable(trim_seconds)
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"cannot read the video's packets: {err}") from err
