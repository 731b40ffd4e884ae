"""On-disk cache of extracted retrieval features, so re-scoring a checkpoint does not re-run the model.

The key is a digest of everything that changes the features: the checkpoint's identity (content hash, or
resolved path + size + mtime), the annotation file's hash, the video source, the kept videos and the clip
protocol. Entries are written atomically (temp file + rename) by rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import broadcast_object, is_main_process


def checkpoint_identity(path: str | Path, hash_content: bool) -> dict[str, Any]:
    """What identifies a checkpoint's weights: its sha256, or (resolved path, size, mtime) when cheapness matters."""
    path = Path(path).resolve()
    if hash_content:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        return {"sha256": digest.hexdigest()}
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(material: dict[str, Any]) -> str:
    """Stable digest of JSON-serialisable key material."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureCache:
    """`<dir>/<name>-<kind>-<key>.pt` files holding tensors plus the key material they were made from."""

    def __init__(self, directory: str | Path | None, name: str) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.name = name

    def _path(self, kind: str, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{self.name}-{kind}-{key}.pt"

    def load(self, kind: str, key: str) -> dict[str, Any] | None:
        """The stored entry, or None when caching is off or nothing is stored under this key."""
        if self.directory is None or not self._path(kind, key).is_file():
            return None
        return torch.load(self._path(kind, key), map_location="cpu", weights_only=True)

    def save(self, kind: str, key: str, entry: dict[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(entry, tmp)
        os.replace(tmp, path)  # readers never see a half-written file
        return path


def cached_on_all_ranks(cache: FeatureCache, kind: str, key: str, compute: Callable[[], dict[str, Any]]) -> dict:
    """Rank 0 looks the entry up; on a miss every rank computes it (collectively) and rank 0 stores it.
    Returns the entry plus `hit` (whether it came from the cache)."""
    entry = broadcast_object(cache.load(kind, key) if is_main_process() else None)
    hit = entry is not None
    if not hit:
        entry = compute()
        if is_main_process():
            cache.save(kind, key, entry)
    return {**entry, "hit": hit}
