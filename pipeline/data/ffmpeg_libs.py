"""FFmpeg shared libraries for torchcodec, taken from PyAV's wheel.

torchcodec links against the system's FFmpeg (`libavcodec.so.62`, ...), which many machines lack (GPU images,
slim containers, CI). PyAV's wheel already ships FFmpeg 8 under hashed names (`av.libs/libavcodec-5e6b81c2.so.62`).
`pyav_ffmpeg_dir()` makes a folder of links that give those files the names torchcodec asks for; the dynamic
loader only reads LD_LIBRARY_PATH when a process starts, so the folder must be on it before Python starts:

    export LD_LIBRARY_PATH=$(python -m pipeline.data.ffmpeg_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

Both libraries then use the very same FFmpeg files in one process (the loader sees one file behind both names).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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
    """The folder of links to PyAV's FFmpeg (made once per PyAV install; safe when several processes race).

    The folder's name carries a hash of PyAV's library folder, so two virtual environments (or a moved one) never
    share a folder whose links point into the other; a folder left wrong by a crash is replaced.
    """
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "videomamba-pipeline"
    files = pyav_library_files()
    install = hashlib.sha256(str(next(iter(files.values())).parent).encode()).hexdigest()[:10]
    target = root / f"ffmpeg-from-pyav-{av.__version__}-{install}"
    if _links_right(target, files):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".ffmpeg-"))
    for name, path in files.items():
        (staging / name).symlink_to(path)
    try:
        staging.replace(target)
    except OSError:  # a folder is there already: another process made it first, or a crash left it wrong
        if _links_right(target, files):
            shutil.rmtree(staging)
        else:
            stale = Path(tempfile.mkdtemp(dir=root, prefix=".stale-"))
            target.replace(stale / "old")
            shutil.rmtree(stale)
            staging.replace(target)
    return target


def _links_right(folder: Path, files: dict[str, Path]) -> bool:
    return all((folder / name).resolve() == path for name, path in files.items())


if __name__ == "__main__":
    print(pyav_ffmpeg_dir(sys.argv[1] if len(sys.argv) > 1 else None))
