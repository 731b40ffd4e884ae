"""H.264 encoding with PyAV (its wheel bundles libx264): clips from frames, and transcoding.

Used by the shard writer's `--transcode` (the training preprocessing: size, rate, GOP, B-frames) and by the synthetic
data set.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction

import av
import numpy as np

from pipeline.data.decode import VideoDecodeError, open_video


def encode_h264(
    frames_THW3: np.ndarray, fps: float, crf: int = 23, preset: str = "veryfast", gop: int | None = None
) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) as an H.264 mp4 (yuv420p; H and W must be even).

    `gop` is the keyframe interval in frames (None: libx264's default, 250). One encoder thread: libx264 otherwise
    sizes its thread pool from the machine's cores and frame height, and the thread count changes the bitstream (and
    is written into its SEI), so the same frames would give other bytes on another machine.
    """
    T, H, W, _ = frames_THW3.shape
    if H % 2 or W % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {W}x{H}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, "threads": "1", **({"g": str(gop)} if gop else {})}
        for frame_HW3 in frames_THW3:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HW3), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


@dataclass(frozen=True)
class TranscodeOptions:
    """How the shard writer re-encodes videos (`jobs/make_shards.py --transcode ...`); recorded in the manifest.

    The output is always H.264 (yuv420p, 8-bit) in mp4, upright (a display rotation is applied to the pixels) and
    without audio. For training shards a short side of 256-320, a fixed rate, a keyframe every <= 16 frames and no
    B-frames make a sampled frame cost about one keyframe plus half a GOP of P-frames to decode (docs/data.md)."""

    short_side: int | None = None
    """Scale so the short side has this many pixels (never upscales); None keeps the size."""
    fps: float | None = None
    """Resample to this fixed frame rate (each output tick shows the latest input frame); None keeps the rate."""
    gop: int | None = None
    """Keyframe every this many frames; None = libx264's default (250)."""
    bframes: int | None = None
    """B-frames between references (0 = none: every frame is a reference, decoding forward wastes nothing);
    None = libx264's default (3)."""
    crf: int = 23
    """libx264 constant rate factor (lower = larger, better)."""
    preset: str = "veryfast"
    """libx264 preset (encoding speed vs size)."""
    tune: str | None = None
    """libx264 tune; "fastdecode" (CAVLC instead of CABAC, no deblocking or weighted prediction) trades size for
    decode speed."""

    def __post_init__(self) -> None:
        for name in ("short_side", "gop"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"transcode {name}: must be >= 2 (or unset), got {value}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"transcode fps: must be > 0 (or unset), got {self.fps}")
        if self.bframes is not None and not 0 <= self.bframes <= 16:
            raise ValueError(f"transcode bframes: must be in 0..16 (or unset), got {self.bframes}")

    def manifest_entry(self) -> dict[str, object]:
        """What the manifest records: these options and the fixed properties of the output."""
        return {**asdict(self), "codec": "h264", "pix_fmt": "yuv420p", "audio": "dropped", "rotation": "applied"}

    def x264_options(self) -> dict[str, str]:
        options = {"crf": str(self.crf), "preset": self.preset, **({"tune": self.tune} if self.tune else {})}
        if self.gop is not None:
            # A fixed interval: scene-cut keyframes would make some GOPs longer than asked.
            options.update(g=str(self.gop), keyint_min=str(self.gop), sc_threshold="0")
        if self.bframes is not None:
            options["bf"] = str(self.bframes)
        return options


def _output_size(width: int, height: int, short_side: int | None, turns: int) -> tuple[int, int]:
    scale = min(1.0, short_side / min(width, height)) if short_side else 1.0
    out_w, out_h = _even(width * scale), _even(height * scale)
    return (out_h, out_w) if turns % 2 else (out_w, out_h)


def transcode_h264(source: str | bytes, options: TranscodeOptions = TranscodeOptions()) -> bytes:
    """Re-encode a video as H.264 mp4 as `options` say, frame by frame (a long video never sits in memory whole).

    Frame-rate change keeps, for each output time k/fps, the latest input frame at or before it; this also turns
    variable-rate input into a fixed rate. Audio is dropped. Raises VideoDecodeError when the source cannot be read.
    """
    with open_video(source) as (container, stream):
        src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        out_fps = Fraction(options.fps or src_fps).limit_denominator(1001)
        start = stream.start_time or 0
        buffer, written = io.BytesIO(), 0
        with av.open(buffer, "w", format="mp4") as output:
            encoder = output.add_stream("libx264", rate=out_fps)
            encoder.pix_fmt, encoder.options = "yuv420p", options.x264_options()
            previous, previous_t = None, 0.0
            try:
                for frame in container.decode(stream):
                    t = float((frame.pts - start) * stream.time_base) if frame.pts is not None else previous_t
                    if previous is not None:
                        # The previous frame is on screen during [its time, t): it fills every output tick there.
                        written = _encode_ticks(output, encoder, previous, written, t, out_fps)
                    else:
                        turns = round((frame.rotation or 0) / 90) % 4
                        encoder.width, encoder.height = _output_size(frame.width, frame.height, options.short_side,
                                                                     turns)  # fmt: skip
                    previous, previous_t = _upright_yuv(frame, encoder.width, encoder.height), t
            except av.error.FFmpegError as err:
                raise VideoDecodeError(f"decoding failed: {err}") from err
            if previous is None:
                raise VideoDecodeError("no decodable frames")
            # The last frame lasts one source frame interval.
            _encode_ticks(output, encoder, previous, written, previous_t + 1.0 / src_fps, out_fps)
            output.mux(encoder.encode(None))
    return buffer.getvalue()


def _encode_ticks(output, encoder, frame: av.VideoFrame, written: int, until_s: float, fps: Fraction) -> int:
    """Encode `frame` at every output tick k (k >= written) with k/fps < until_s; returns the new tick count."""
    frame.pict_type = av.video.frame.PictureType.NONE  # a source keyframe would force one here: the GOP decides
    while written / fps < until_s - 1e-6:
        frame.pts, frame.time_base = written, 1 / fps
        output.mux(encoder.encode(frame))
        written += 1
    return written


def _upright_yuv(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """The frame as yuv420p at the output size (width x height after rotation), with its display rotation applied."""
    turns = round((frame.rotation or 0) / 90) % 4
    if not turns:
        return frame.reformat(width=width, height=height, format="yuv420p")
    pre_w, pre_h = (height, width) if turns % 2 else (width, height)
    rgb = frame.reformat(width=pre_w, height=pre_h, format="rgb24").to_ndarray()
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(rgb, k=turns)), format="rgb24").reformat(
        format="yuv420p")
