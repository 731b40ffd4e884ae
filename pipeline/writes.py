"""Local writes that say "disk full" when the disk is full: the path, the free space, what to do.

Python reports a full disk as `OSError: [Errno 28] No space left on device` without the file it was writing, and
`torch.save(obj, path)` worse: its C++ writer drops the errno and raises `RuntimeError: [enforce fail at
inline_container.cc:672] . unexpected pos 576 vs 534`. `disk_full_named(path, what)` turns both into a
`DiskFullError` (an OSError with errno ENOSPC) naming the path, the free space left on its filesystem and the
setting to change. The torch case is recognised by its writer's message together with a filesystem that has
(almost) nothing left, since the message alone says nothing about the cause. `torch_save_file` writes through a
Python file object, so a full disk surfaces as the OSError it is in the first place, and into a temp file renamed
over the target, so a failed write never leaves a truncated file under the final name.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch's PyTorchStreamWriter messages when a write comes up short.
_TORCH_WRITER_MARKERS = ("PytorchStreamWriter failed", "inline_container.cc")
# Below this much free space a failed torch write is taken for a full disk.
_NEARLY_FULL_BYTES = 16 << 20


class DiskFullError(OSError):
    """A local write failed because its filesystem is full (or the user's quota is used up)."""


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def free_space(path: str | Path) -> tuple[int, int, Path]:
    """(free bytes, total bytes, the folder measured) of the filesystem that holds `path` (or would hold it)."""
    folder = _existing_ancestor(Path(path))
    usage = shutil.disk_usage(folder)
    return usage.free, usage.total, folder


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _is_disk_full(err: Exception, path: Path) -> bool:
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL_ERRNOS
    message = str(err)
    return any(m in message for m in _TORCH_WRITER_MARKERS) and free_space(path)[0] < _NEARLY_FULL_BYTES


@contextmanager
def disk_full_named(path: str | Path, what: str, setting: str | None = None) -> Iterator[None]:
    """Re-raise a full-disk failure of the block as DiskFullError naming `path`, the free space and `setting`."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as err:
        path = Path(path)
        if not _is_disk_full(err, path):
            raise
        free, total, folder = free_space(path)
        hint = f"free space there or set {setting} to a filesystem with room" if setting else "free space there"
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full writing the {what} {path}: {_gib(free)} free of {_gib(total)} on the filesystem of {folder} "
            f"({err}); {hint}",
        ) from err


def torch_save_file(obj: Any, path: str | Path, what: str, setting: str | None = None) -> None:
    """`torch.save(obj, path)`, atomically (temp file + rename), through a Python file object: a full disk raises a
    DiskFullError naming `path` and leaves no partial file."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_full_named(path, what, setting):
            with open(tmp, "wb") as f:
                torch.save(obj, f)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
