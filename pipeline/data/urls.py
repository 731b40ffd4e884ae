"""Shard URL expansion and fsspec-backed opening for WebDataset.

webdataset 1.0.2 cannot open s3:// (or use fsspec at all), so `register_fsspec_openers` puts an fsspec
opener into `webdataset.gopen_schemes` for the object-store schemes (docs/data.md, "S3 and other object stores").
s3fs reads `AWS_ENDPOINT_URL` and the usual AWS credential variables by itself.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

import braceexpand
import fsspec
import webdataset as wds

from pipeline.access import AccessDenied, access_named

__all__ = ["AccessDenied", "access_named", "expand_shard_urls", "filesystem", "join_url", "register_fsspec_openers",
           "split_protocol"]

FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
    with access_named(url):
        return fsspec.open(url, mode).open()


def register_fsspec_openers() -> None:
    """Let webdataset open s3://, gs://, az:// ... URLs through fsspec (idempotent)."""
    for scheme in FSSPEC_SCHEMES:
        wds.gopen_schemes[scheme] = _fsspec_open


def split_protocol(url: str) -> tuple[str, str]:
    """("s3", "bucket/prefix") for "s3://bucket/prefix"; ("file", path) for local paths."""
    if "://" in url:
        protocol, path = url.split("://", 1)
        return protocol, path
    return "file", url


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with `/`."""
    return posixpath.join(base, *parts)


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem that serves `url`."""
    return fsspec.filesystem(split_protocol(url)[0])


def _with_protocol(protocol: str, path: str) -> str:
    return path if protocol == "file" else f"{protocol}://{path}"


def expand_shard_urls(spec: str | Iterable[str]) -> list[str]:
    """Shard URLs from a brace pattern, a list of patterns, or a directory/prefix holding `*.tar`.

    Raises ValueError when nothing matches, naming the spec.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in braceexpand.braceexpand(item):
            if url.split("?", 1)[0].endswith(".tar"):  # a signed URL carries its signature as a query
                urls.append(url)
                continue
            protocol, path = split_protocol(url)
            fs = filesystem(url)
            with access_named(url):
                found = sorted(fs.glob(posixpath.join(path.rstrip("/"), "*.tar")))
            urls.extend(_with_protocol(protocol, p) for p in found)
    if not urls:
        raise ValueError(
            f"no shards found for {spec!r}: give `<prefix>-{{000000..000009}}.tar`, a list of .tar URLs, "
            "or a directory/prefix that holds *.tar files"
        )
    return urls
