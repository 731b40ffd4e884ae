"""FFmpeg shared libraries for torchcodec, taken from PyAV's wheel.

torchcodec links against the system's FFmpeg (`libavcodec.so.62`, ...), which many machines lack (GPU images,
slim containers, CI). PyAV's wheel already ships FFmpeg 8 under hashed names (`av.libs/libavcodec-5e6b81c2.so.62`).
`pyav_ffmpeg_dir()` makes a folder of links that give those files the names torchcodec asks for; the dynamic
loader only reads LD_LIBRARY_PATH when a process starts, so the folder must be on it before Python starts:

    export LD_LIBRARY_PATH=$(python -m pipeline.data.ffmpeg_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

Both libraries then use the very same FFmpeg files in one process (the loader sees one file behind both names).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import av

_FFMPEG_LIBS = ("avcodec", "avformat", "avutil", "avdevice", "avfilter", "swscale", "swresample")
_HASHED_NAME = re.compile(r"^lib(?P<name>[a-z]+)-[0-9a-f]{8}\.so\.(?P<major>\d+)")


def pyav_library_files() -> dict[str, Path]:
    """{name torchcodec links against: PyAV's file}, e.g. {"libavcodec.so.62": av.libs/libavcodec-5e6b81c2.so.62}."""
    folder = Path(av.__file__).resolve().parent.parent / "av.libs"
    found = {}
    for path in sorted(folder.glob("lib*.so*")) if folder.is_dir() else []:
        match = _HASHED_NAME.match(path.name)
        if match and match["name"] in _FFMPEG_LIBS:
            found[f"lib{match['name']}.so.{match['major']}"] = path
    missing = sorted(set(_FFMPEG_LIBS) - {name[3:].split(".")[0] for name in found})
    if missing:
        raise FileNotFoundError(f"PyAV {av.__version__} at {folder} does not bundle FFmpeg's {missing}: install "
                                "FFmpeg's shared libraries instead (e.g. apt-get install ffmpeg)")  # fmt: skip
    return found


def pyav_ffmpeg_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of links to PyAV's FFmpeg (made once per PyAV version; safe when several processes race)."""
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "videomamba-pipeline"
    target = root / f"ffmpeg-from-pyav-{av.__version__}"
    files = pyav_library_files()
    if all((target / name).resolve() == path for name, path in files.items()):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".ffmpeg-"))
    for name, path in files.items():
        (staging / name).symlink_to(path)
    try:
        staging.replace(target)
    except OSError:  # another process made it first (or a stale one is there): keep that one if it is right
        for link in staging.iterdir():
            link.unlink()
        staging.rmdir()
        if not all((target / name).resolve() == path for name, path in files.items()):
            raise
    return target


if __name__ == "__main__":
    print(pyav_ffmpeg_dir(sys.argv[1] if len(sys.argv) > 1 else None))
