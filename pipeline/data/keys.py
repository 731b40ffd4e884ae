"""Stable sample keys and ids.

A shard key is derived from the video's path (or id) as written in the input list, never from its
position, so re-running the writer gives the same keys and the same shard contents. The integer id
used as the duplicate id of video-text contrastive losses is a hash of that key.
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(video_ref: str) -> str:
    """Shard key for a video path or id: a readable stem plus a digest of the full reference.

    WebDataset splits member names at the first dot and treats `/` as a folder, so the key holds only
    `[A-Za-z0-9_-]`; the digest keeps keys of equal stems in different folders apart.
    """
    stem = video_ref.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    readable = _UNSAFE.sub("_", stem)[:48] or "video"
    digest = hashlib.sha1(video_ref.encode("utf-8")).hexdigest()[:12]
    return f"{readable}-{digest}"


def sample_id(key: str) -> int:
    """Non-negative int64 id of a key (blake2b, 63 bits), identical in every process and run."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
