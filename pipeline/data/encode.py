"""H.264 encoding with PyAV (its wheel bundles libx264): clips from frames, and transcoding.

Used by the shard writer's `--transcode` and by the synthetic data set.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from pipeline.data.decode import VideoDecodeError, open_video


def encode_h264(
    frames_THW3: np.ndarray, fps: float, crf: int = 23, preset: str = "veryfast", gop: int | None = None
) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) as an H.264 mp4 (yuv420p; H and W must be even).

    `gop` is the keyframe interval in frames (None: libx264's default, 250).
    """
    T, H, W, _ = frames_THW3.shape
    if H % 2 or W % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {W}x{H}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, **({"g": str(gop)} if gop else {})}
        for frame_HW3 in frames_THW3:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HW3), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def transcode_h264(source: str | bytes, short_side: int | None, fps: float | None) -> bytes:
    """Re-encode a video as H.264 mp4, resized to `short_side` pixels and resampled to `fps`.

    Frame-rate change keeps, for each output time k/fps, the latest input frame at or before it.
    None keeps the source's size or rate. Raises VideoDecodeError when the source cannot be read.
    """
    with open_video(source) as (container, stream):
        src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        out_fps = fps or src_fps
        W, H = stream.codec_context.width, stream.codec_context.height
        scale = short_side / min(W, H) if short_side else 1.0
        out_W, out_H = _even(W * scale), _even(H * scale)
        frames: list[np.ndarray] = []
        tick, previous, t = 0.0, None, 0.0
        try:
            for frame in container.decode(stream):
                t = float((frame.pts - (stream.start_time or 0)) * stream.time_base)
                # The previous frame is on screen during [its time, t): it fills every output tick there.
                while previous is not None and tick < t - 1e-6:
                    frames.append(previous)
                    tick += 1.0 / out_fps
                previous = frame.reformat(width=out_W, height=out_H, format="rgb24").to_ndarray()
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"decoding failed: {err}") from err
        while previous is not None and tick < t + 1.0 / src_fps - 1e-6:
            frames.append(previous)
            tick += 1.0 / out_fps
    if not frames:
        raise VideoDecodeError("no decodable frames")
    return encode_h264(np.stack(frames), out_fps)
