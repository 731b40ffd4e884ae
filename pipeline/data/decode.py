"""PyAV video probing and frame-accurate decoding of only the sampled frames.

Frames are addressed by index in presentation order, exactly as decoding every frame would number them, also in
variable-frame-rate video: opening a clip reads its packets' timestamps (demuxing only, no decoding: under 1 ms
for 300 packets), so frame i is the i-th timestamp. The decoder then
- seeks only when a target's keyframe lies beyond the last keyframe fed (seeking there is never slower than decoding
  forward to it), so a short-GOP clip costs about half a GOP per sampled frame and a single-keyframe clip is decoded
  forward once, never re-seeked;
- skips non-reference frames that are not sampled (`skip_nonref`; they cannot affect any other frame), which
  B-frame footage has a third or more of;
- opens the container without the probe's trial decoding (FFmpeg's stream-info probe decodes ~20 frames of
  B-frame H.264: 21 ms of a 720p clip);
- converts only the sampled frames to RGB through one swscale context, optionally scaled down on the way
  (`short_side`), and turns them upright when the container carries a display rotation.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

SAMPLING_MODES = ("rand", "middle", "stride", "sparse_middle")
# The stream-info probe at open decodes frames only to guess parameters the decoder finds by itself.
_OPEN_OPTIONS = {"skip_frame": "all"}


class VideoDecodeError(ValueError):
    """A video cannot be opened or decoded; the message says why."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    codec: str
    container: str


@dataclass(frozen=True)
class DecodeOptions:
    """How the PyAV decoder works (data.decode_threads / data.decode_skip_nonref / data.decode_short_side)."""

    threads: int = 1
    """FFmpeg decoder threads: 1 for loader workers that own one core each; 0 = FFmpeg's choice (frame threads)."""
    skip_nonref: bool = True
    """Do not reconstruct non-reference frames that are not sampled (single-threaded decoding only)."""
    short_side: int | None = None
    """Scale frames so their short side is this many pixels while converting to RGB; None = decoded size."""


@contextlib.contextmanager
def open_video(
    source: str | bytes, probe_decode: bool = True
) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open a path or in-memory bytes; yields (container, first video stream). probe_decode=False skips FFmpeg's
    trial decoding at open (the stream's pixel format stays unknown until its first frame is decoded)."""
    try:
        options = {} if probe_decode else _OPEN_OPTIONS
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source, "r", options=options)
    except (av.error.FFmpegError, OSError) as err:
        raise VideoDecodeError(f"cannot open video: {err}") from err
    try:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _stream_info(container, stream) -> VideoInfo:
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    num_frames = stream.frames or int(round(duration * fps))
    if fps <= 0 or num_frames <= 0:
        raise VideoDecodeError(f"no frame rate or frame count in the stream (fps={fps}, frames={num_frames})")
    return VideoInfo(
        num_frames=num_frames,
        fps=fps,
        duration_s=duration or num_frames / fps,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        codec=stream.codec_context.name,
        container=container.format.name,
    )


def probe_video(source: str | bytes) -> VideoInfo:
    """Frame count, rate, duration and size from the container headers (no decoding)."""
    with open_video(source) as (container, stream):
        return _stream_info(container, stream)


def sample_frame_indices(
    num_video_frames: int, num_frames: int, mode: str, rng: random.Random | None = None, frame_stride: int = 1
) -> list[int]:
    """Indices of the frames a clip uses; short videos repeat frames.

    rand: a random frame in each of `num_frames` equal segments (needs `rng`); middle: each segment's
    middle frame, as the released zero-shot evaluation picks it (`middle_frame_indices`); stride: `num_frames`
    frames `frame_stride` apart, at a random start (with `rng`) or centred (without), the last frame repeated when
    the video is too short; sparse_middle: the released classification validation view (`sparse_clip_indices`
    with one clip), which can sit a frame away from `middle`.
    """
    n, T = num_video_frames, num_frames
    if mode == "middle":
        return middle_frame_indices(n, T)
    if mode == "sparse_middle":
        return sparse_clip_indices(n, T)
    if mode == "rand":
        if rng is None:
            raise ValueError("sampling mode 'rand' needs a random generator")
        return [min(n - 1, math.floor((i + rng.random()) * n / T)) for i in range(T)]
    if mode == "stride":
        span = (T - 1) * frame_stride + 1
        slack = max(0, n - span)
        start = rng.randint(0, slack) if rng is not None else slack // 2
        return [min(n - 1, start + i * frame_stride) for i in range(T)]
    raise ValueError(f"unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}")


def middle_frame_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """The released "middle" sampling (UMT / VideoMamba `get_frame_indices`): segment bounds
    `linspace(0, n, S + 1)` truncated to ints, S = min(num_frames, n); segment [a, b) gives frame
    `(a + b - 1) // 2`; a video shorter than `num_frames` repeats its last frame at the end."""
    segments = min(num_frames, num_video_frames)
    bounds = np.linspace(0, num_video_frames, segments + 1).astype(int).tolist()
    indices = [(start + stop - 1) // 2 for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    return indices + [indices[-1]] * (num_frames - segments)


def sparse_clip_indices(num_video_frames: int, num_frames: int, num_clips: int = 1, clip: int = 0) -> list[int]:
    """Temporal clip `clip` of `num_clips` as the released classification test and validation sample it
    (VideoMamba `Kinetics_sparse`): T equal segments of s = (n - 1) / T frames; in segment i the clip takes frame
    round(s i) + floor(s / (C + 1) (c + 1)) (round halves to even, as numpy's does), at most n - 1. So the C clips
    sit at evenly spaced offsets inside the segments; one clip sits near the segment middles, but by another rule
    than the zero-shot `middle_frame_indices`."""
    segment = max(0.0, (num_video_frames - 1) / num_frames)
    offset = int(segment / (num_clips + 1) * (clip + 1))
    return [min(round(segment * i) + offset, num_video_frames - 1) for i in range(num_frames)]


def decode_clip(
    source: str | bytes,
    num_frames: int,
    mode: str,
    rng: random.Random | None = None,
    frame_stride: int = 1,
    trim_seconds: float | None = None,
    options: DecodeOptions = DecodeOptions(),
) -> np.ndarray:
    """Sample and decode a clip: uint8 RGB (T, H, W, 3), upright.

    `trim_seconds` restricts sampling to the start of the video (DiDeMo's first 30 s).
    Raises VideoDecodeError for unreadable or empty videos.
    """
    return decode_at(source, lambda usable: sample_frame_indices(usable, num_frames, mode, rng, frame_stride),
                     trim_seconds, options)


def decode_at(
    source: str | bytes,
    choose: Callable[[int], Sequence[int]],
    trim_seconds: float | None = None,
    options: DecodeOptions = DecodeOptions(),
) -> np.ndarray:
    """Decode the frames `choose(usable_frames)` names (indices in presentation order below the number of frames
    that start within `trim_seconds`), in its order: uint8 RGB (N, H, W, 3), upright. Repeats are allowed and
    each frame is decoded once, so several clips of one video (multi-view testing) cost one decoding pass.

    Raises VideoDecodeError for unreadable or empty videos.
    """
    with open_video(source, probe_decode=False) as (container, stream):
        try:
            table = FrameTable.read(container, stream)
            indices = list(choose(table.usable(trim_seconds)))
            frames = _decode_indices(container, stream, table, sorted(set(indices)), options)
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"decoding failed: {err}") from err
    return np.stack([frames[i] for i in indices])


@dataclass(frozen=True)
class FrameTable:
    """The video stream's frames from its packets' timestamps: frame i (presentation order) has `pts[i]`."""

    pts: list[int]
    keyframe_pts: list[int]
    """Timestamps of the keyframes, sorted."""
    seconds_per_tick: float
    start_pts: int

    @classmethod
    def read(cls, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> FrameTable:
        """Demux (without decoding) every packet of `stream`, then rewind to the start."""
        pts, keys = set(), []
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the end-of-stream marker; edit-list trimmed frames
                continue
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None:
                raise VideoDecodeError("the video's packets carry no timestamps; re-encode it "
                                       "(jobs/make_shards.py --transcode)")  # fmt: skip
            pts.add(stamp)
            if packet.is_keyframe:
                keys.append(stamp)
        if not pts:
            raise VideoDecodeError("no video packets")
        ordered = sorted(pts)
        container.seek(ordered[0], stream=stream, backward=True)
        return cls(ordered, sorted(keys) or ordered[:1], float(stream.time_base), ordered[0])

    def usable(self, trim_seconds: float | None) -> int:
        """Frames that start within the first `trim_seconds` (all of them for None; at least one)."""
        if trim_seconds is None:
            return len(self.pts)
        limit = self.start_pts + trim_seconds / self.seconds_per_tick
        return max(1, bisect.bisect_left(self.pts, limit - 1e-6))

    def keyframe_before(self, stamp: int) -> int:
        """The last keyframe at or before `stamp` (the first keyframe for frames before it)."""
        return self.keyframe_pts[max(0, bisect.bisect_right(self.keyframe_pts, stamp) - 1)]


class _FrameConverter:
    """One swscale context for a clip's frames: RGB, optionally scaled, then turned upright."""

    def __init__(self, short_side: int | None):
        # frame.to_ndarray(format=...) sets up a new swscale context for every frame (4-6x the conversion itself).
        self.reformatter = VideoReformatter()
        self.short_side = short_side

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = frame.width, frame.height
        if self.short_side and min(width, height) > self.short_side:
            scale = self.short_side / min(width, height)
            width, height = max(2, round(width * scale)), max(2, round(height * scale))
        rgb = self.reformatter.reformat(frame, format="rgb24", width=width, height=height,
                                        interpolation="BILINEAR").to_ndarray()  # fmt: skip
        turns = round((frame.rotation or 0) / 90) % 4
        # frame.rotation: the display matrix turns the picture this many degrees counter-clockwise (as ffmpeg and
        # torchcodec show it); np.rot90 turns counter-clockwise too.
        return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _decode_indices(container, stream, table: FrameTable, targets: list[int], options: DecodeOptions):
    """Decode the frames at sorted frame indices `targets`; returns {index: upright RGB frame}."""
    codec = stream.codec_context
    codec.thread_count = options.threads
    # Frame threads decode several packets at once: a per-packet skip decision would land on the wrong packet.
    codec.thread_type = "SLICE" if options.threads == 1 else "AUTO"
    convert = _FrameConverter(options.short_side)
    wanted = {table.pts[i]: i for i in targets}
    pending = sorted(wanted)
    out: dict[int, np.ndarray] = {}
    for frame in _sampled_frames(container, stream, table, pending, options.skip_nonref and options.threads == 1):
        out[wanted[frame.pts]] = convert(frame)
        pending.remove(frame.pts)
    if pending:
        # Frames the seeking pass missed (a seek that landed past an open-GOP frame, a frame that fails to decode):
        # one plain pass from the start; frames that never decode repeat the nearest decoded one.
        container.seek(table.pts[0], stream=stream, backward=True)
        codec.skip_frame = "DEFAULT"
        for frame in _decoded(container, stream):
            if frame.pts in pending:
                out[wanted[frame.pts]] = convert(frame)
                pending.remove(frame.pts)
                if not pending:
                    break
    if not out:
        raise VideoDecodeError("no decodable frames")
    for stamp in pending:
        earlier = [i for i in out if i < wanted[stamp]]
        out[wanted[stamp]] = out[max(earlier) if earlier else min(out)]
    return out


def _sampled_frames(container, stream, table: FrameTable, pending: list[int], skip_nonref: bool):
    """Yield the decoded frames whose pts are in `pending` (sorted; the caller removes each one it receives).

    Seeks to a target's keyframe only when it lies beyond the last keyframe fed to the decoder; otherwise decodes
    forward. Non-reference frames that are not targets are not reconstructed when `skip_nonref`."""
    codec = stream.codec_context
    fed_keyframe = table.keyframe_pts[0]  # the container is at its start
    seeked_to = None
    while pending:
        target_key = table.keyframe_before(pending[0])
        if target_key > fed_keyframe and target_key != seeked_to:
            container.seek(target_key, stream=stream, backward=True)
            fed_keyframe = seeked_to = target_key
        exhausted = True
        for packet in container.demux(stream):
            if packet.size and packet.is_keyframe:
                fed_keyframe = packet.pts
            if skip_nonref:
                codec.skip_frame = "DEFAULT" if packet.pts in pending else "NONREF"
            for frame in codec.decode(packet):
                if frame.pts in pending:
                    yield frame
            if not pending:
                return
            next_key = table.keyframe_before(pending[0])
            if next_key > fed_keyframe and next_key != seeked_to:
                exhausted = False  # the next target is in a later GOP: seeking there beats decoding forward
                break
        if exhausted:
            return


def _decoded(container, stream) -> Iterator[av.VideoFrame]:
    for packet in container.demux(stream):
        yield from stream.codec_context.decode(packet)
