"""The shard set's `manifest.json` and reading shards back sample by sample.

The manifest lives beside the shards:

    {"format": "videomamba-wds/1", "complete": true, "shard_size": 100,
     "source": "videos.csv", "source_sha256": "…", "options": {...},
     "num_shards": 2, "num_samples": 180, "total_duration_s": 1234.5,
     "shards": [{"name": "train-000000.tar", "num_samples": 100, "duration_s": 700.1}, …],
     "skipped": [{"video": "a.mp4", "reason": "cannot open video: …"}]}

`complete` is false while the writer runs; the shards it lists are final and are not rewritten on resume.
A shard that its directory's manifest does not list is named in a warning wherever a count is needed.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
from webdataset import tariterators

from pipeline.data.urls import access_named, join_url, split_protocol
from pipeline.writes import disk_full_named

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "videomamba-wds/1"


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The manifest in a shard directory/prefix, or None when there is none."""
    url = join_url(directory, MANIFEST_NAME)
    fs, path = fsspec.core.url_to_fs(url)
    with access_named(url):
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            return json.load(f)


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (local: temp file + rename; object stores: one PUT)."""
    text = json.dumps(manifest, indent=1)
    protocol, path = split_protocol(join_url(directory, MANIFEST_NAME))
    if protocol == "file":
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".manifest.", suffix=".tmp")
        with disk_full_named(tmp, "manifest", "--output"), os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        with fsspec.open(join_url(directory, MANIFEST_NAME), "w") as f:
            f.write(text)


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard as webdataset dicts (`__key__`, `mp4`, `json`, ...), read through fsspec."""
    with access_named(url), fsspec.open(url, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from tariterators.group_by_keys(files)


def listed_sample_counts(urls: list[str]) -> list[int | None]:
    """Each shard's sample count in the manifest beside it; None where the manifest does not list it (or there
    is no manifest)."""
    listed: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    for url in urls:
        directory, name = posixpath.split(url)
        if directory not in listed:
            manifest = read_manifest(directory) or {"shards": []}
            listed[directory] = {s["name"]: s["num_samples"] for s in manifest["shards"]}
        counts.append(listed[directory].get(name))
    return counts


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Samples per shard, from the manifests beside the shards; a shard they do not list is named in a warning and
    counted by reading it (up to where it cannot be read: what a stream over it can deliver)."""
    counts = listed_sample_counts(urls)
    for i, url in enumerate(urls):
        if counts[i] is None:
            log.warning("shard %s is not listed in the %s beside it; counting its samples by reading it", url,
                        MANIFEST_NAME)
            counts[i] = _readable_samples(url)
    return counts


def _readable_samples(url: str) -> int:
    count = 0
    try:
        for _ in iter_shard(url):
            count += 1
    except (OSError, ValueError, tarfile.TarError) as err:
        log.warning("shard %s cannot be read past sample %d: %r", url, count, err)
    return count
