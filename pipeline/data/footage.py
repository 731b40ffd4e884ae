"""Realistic test footage made with PyAV: camera-like texture and motion, in the codecs and containers real data sets
ship (H.264 / HEVC / VP9, long GOPs, B-frames, 10-bit, variable frame rate, rotation metadata, an audio track).

Flat synthetic shapes (pipeline/data/synthetic.py) decode several times faster than camera footage, so decode speed
measured on them says little. Here every frame is a smooth colour field with fine grain that pans (the keyframes
cost what textured footage costs), a square crossing the frame, and a little sensor noise that changes from frame to
frame (so predicted frames carry residuals, as in real video). Frames are rendered one at a time and streamed into
the encoder: a 1080p clip never sits in memory whole.

    data = render_footage(FootageSpec("720p", 1280, 720, seconds=10, bframes=3))     # mp4 bytes
    path = write_footage(spec, ".cache/footage")                                      # cached file

`FOOTAGE` names the kinds the tests and benchmarks/bench_data.py use.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

# The sensor noise comes from a small bank of noise fields (drawing fresh noise for every 1080p frame would cost
# more than encoding it); the bank is longer than any encoder's reference window, so no frame is predictable
# from an earlier copy of its noise.
_NOISE_BANK = 17
_VFR_TICKS = 90_000  # mp4's usual time base for variable-rate video
_AUDIO_RATE = 48_000


@dataclass(frozen=True)
class FootageSpec:
    """One kind of test footage. Sizes must be even (4:2:0 chroma)."""

    name: str
    width: int
    height: int
    seconds: float = 4.0
    fps: float = 30.0
    codec: str = "libx264"
    """libx264, libx265 or libvpx-vp9."""
    gop: int | None = None
    """Keyframe interval in frames; None = one keyframe for the whole clip (long-GOP footage)."""
    bframes: int = 0
    """B-frames between references (always used: x264's adaptive choice would drop them on noisy content)."""
    pix_fmt: str = "yuv420p"
    """yuv420p10le for 10-bit footage."""
    vfr: bool = False
    """Variable frame rate: frame durations of 1, 2 or 3 thirds of 1/fps in a fixed pseudo-random order."""
    rotation: int = 0
    """Display rotation written into the container (degrees counter-clockwise, a multiple of 90)."""
    audio: bool = False
    """Add a stereo AAC (Opus in WebM) track."""
    container: str = "mp4"
    """mp4, or webm for VP9."""
    crf: int = 23
    seed: int = 0

    @property
    def num_frames(self) -> int:
        return max(1, round(self.seconds * self.fps))


FOOTAGE: dict[str, FootageSpec] = {
    spec.name: spec
    for spec in (
        FootageSpec("720p_longgop", 1280, 720, seconds=10, bframes=3),
        FootageSpec("1080p_longgop", 1920, 1080, seconds=6, bframes=3),
        FootageSpec("640x272_bframes", 640, 272, seconds=10, fps=24, gop=250, bframes=3),
        FootageSpec("720p_hevc_10bit", 1280, 720, seconds=6, codec="libx265", pix_fmt="yuv420p10le", gop=120,
                    bframes=3),
        FootageSpec("720p_vp9", 1280, 720, seconds=6, codec="libvpx-vp9", container="webm", gop=120),
        FootageSpec("480p_vfr_rotated_audio", 854, 480, seconds=8, gop=60, bframes=2, vfr=True, rotation=90,
                    audio=True),
    )
}
"""The footage kinds of the benchmark: long-GOP 720p / 1080p H.264 with B-frames (as cameras and many web videos),
a 640x272 film-like clip with B-frames, 10-bit HEVC, VP9 in WebM, and a VFR phone-like clip with rotation and audio."""


def small(spec: FootageSpec, width: int = 96, height: int = 64, seconds: float = 1.0) -> FootageSpec:
    """The same kind of footage at a test-friendly size and length (GOP capped to the clip)."""
    gop = None if spec.gop is None else min(spec.gop, max(2, round(seconds * spec.fps) // 3))
    return replace(spec, width=width, height=height, seconds=seconds, gop=gop)


def frame_times(spec: FootageSpec) -> list[Fraction]:
    """Presentation time (s) of every frame: k / fps, or the VFR pattern's running sum."""
    if not spec.vfr:
        return [Fraction(k) / Fraction(spec.fps).limit_denominator(1001) for k in range(spec.num_frames)]
    rng = np.random.default_rng(spec.seed + 1)
    thirds = rng.integers(1, 4, size=spec.num_frames)
    step = Fraction(1, 3) / Fraction(spec.fps).limit_denominator(1001)
    return [step * int(t) for t in np.concatenate([[0], np.cumsum(thirds[:-1])])]


def _frames_HW3(spec: FootageSpec) -> Iterator[np.ndarray]:
    """uint8 RGB frames: panning textured field + moving square + frame-to-frame sensor noise."""
    g = torch.Generator().manual_seed(spec.seed)
    margin = max(16, spec.width // 8) // 2 * 2
    H, W = spec.height + margin, spec.width + margin
    coarse = torch.rand(1, 3, max(2, H // 16), max(2, W // 16), generator=g)
    field_3HW = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)[0]
    grain_3HW = torch.rand(field_3HW.shape, generator=g) * 0.2
    texture_HW3 = ((field_3HW * 0.8 + grain_3HW).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    noise = torch.randint(-4, 5, (_NOISE_BANK, spec.height, spec.width, 1), generator=g, dtype=torch.int16).numpy()
    side = max(4, spec.height // 6)
    n = spec.num_frames
    for t in range(n):
        phase = 2 * math.pi * t / max(n, 1)
        dy = int((margin - 1) * (0.5 + 0.5 * math.sin(phase)))
        dx = int((margin - 1) * t / max(n - 1, 1))
        frame = texture_HW3[dy : dy + spec.height, dx : dx + spec.width].astype(np.int16) + noise[t % _NOISE_BANK]
        x = int((spec.width - side) * t / max(n - 1, 1))
        y = (spec.height - side) // 2
        frame[y : y + side, x : x + side] = (230, 60, 40)
        yield frame.clip(0, 255).astype(np.uint8)


def _video_options(spec: FootageSpec) -> dict[str, str]:
    keyint = str(spec.gop or spec.num_frames + 1)
    if spec.codec == "libx264":
        return {"crf": str(spec.crf), "preset": "veryfast", "g": keyint, "keyint_min": keyint,
                "bf": str(spec.bframes), "x264-params": "b-adapt=0:scenecut=0"}  # fmt: skip
    if spec.codec == "libx265":
        params = f"log-level=error:keyint={keyint}:min-keyint={keyint}:bframes={spec.bframes}:b-adapt=0:scenecut=0"
        # ultrafast: x265's slower presets take minutes for a few seconds of 720p on two cores
        return {"crf": str(spec.crf), "preset": "ultrafast", "x265-params": params}
    if spec.codec == "libvpx-vp9":
        return {"crf": str(spec.crf + 10), "b": "0", "deadline": "realtime", "cpu-used": "8", "g": keyint,
                "row-mt": "1"}  # fmt: skip
    raise ValueError(f"footage codec {spec.codec!r}: choose libx264, libx265 or libvpx-vp9")


def _audio_frames(stream: av.audio.stream.AudioStream, seconds: float) -> Iterator[av.AudioFrame]:
    """A 440 Hz stereo tone in the encoder's frame size."""
    size = stream.codec_context.frame_size or 1024
    total = int(seconds * _AUDIO_RATE)
    for start in range(0, total, size):
        t = (np.arange(start, min(start + size, total)) / _AUDIO_RATE).astype(np.float32)
        tone = 0.2 * np.sin(2 * np.pi * 440 * t)
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = _AUDIO_RATE, start
        yield frame


def render_footage(spec: FootageSpec) -> bytes:
    """Encode the footage described by `spec`; returns the container's bytes."""
    if spec.width % 2 or spec.height % 2:
        raise ValueError(f"footage {spec.name}: sizes must be even, got {spec.width}x{spec.height}")
    buffer = io.BytesIO()
    rate = Fraction(spec.fps).limit_denominator(1001)
    with av.open(buffer, "w", format=spec.container) as container:
        video = container.add_stream(spec.codec, rate=rate)
        video.width, video.height, video.pix_fmt = spec.width, spec.height, spec.pix_fmt
        video.options = _video_options(spec)
        time_base = Fraction(1, _VFR_TICKS) if spec.vfr else 1 / rate
        video.codec_context.time_base = time_base
        if spec.rotation:
            video.set_display_rotation(spec.rotation)
        audio, sound = None, iter(())
        if spec.audio:
            codec = "libopus" if spec.container == "webm" else "aac"
            audio = container.add_stream(codec, rate=_AUDIO_RATE, layout="stereo")
            sound = _audio_frames(audio, spec.seconds)
        pending_sound = next(sound, None)
        for t, frame_HW3 in zip(frame_times(spec), _frames_HW3(spec), strict=True):
            # Interleaved as cameras write it: the audio up to this frame's time, then the frame.
            while pending_sound is not None and pending_sound.pts <= t * _AUDIO_RATE:
                container.mux(audio.encode(pending_sound))
                pending_sound = next(sound, None)
            frame = av.VideoFrame.from_ndarray(frame_HW3, format="rgb24")
            frame.pts, frame.time_base = int(t / time_base), time_base
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            while pending_sound is not None:
                container.mux(audio.encode(pending_sound))
                pending_sound = next(sound, None)
            container.mux(audio.encode(None))
    return buffer.getvalue()


def write_footage(spec: FootageSpec, directory: str | Path) -> Path:
    """Render `spec` into `directory` unless it is there already (a cache: the file name carries a hash of the
    spec and the encoder settings, so a change renders anew); returns the file's path."""
    digest = hashlib.sha1(repr((spec, _video_options(spec), av.__version__)).encode()).hexdigest()[:10]
    path = Path(directory) / f"{spec.name}-{digest}.{spec.container}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(render_footage(spec))
        tmp.replace(path)
    return path
