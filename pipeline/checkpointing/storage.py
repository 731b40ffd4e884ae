"""A run's storage folder `<checkpoint.path>/<run name>` (local or s3://): its checkpoints and its result record.

A refused request raises `AccessDenied` naming the folder or object and the credential source (pipeline/access.py).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.access import access_named
from pipeline.checkpointing.layout import newest_complete
from pipeline.checkpointing.stores import warn_skipped

RESULT_RECORD = "result.json"


def run_storage(cfg) -> str:
    """`<checkpoint.path>/<run name>`: this run's checkpoints and result record (local or s3://)."""
    return f"{cfg.checkpoint.path.rstrip('/')}/{cfg.run_name}"


def storage_filesystem(cfg) -> tuple[Any, str]:
    """(fsspec filesystem, path) of the run's storage folder, opened with `checkpoint.storage_options`."""
    import fsspec

    return fsspec.core.url_to_fs(run_storage(cfg), **cfg.checkpoint.storage_options)


def latest_checkpoint(cfg) -> str | None:
    """The newest complete checkpoint of this run in storage (`layout.problems`), or None; newer incomplete ones
    are logged with what is wrong."""
    fs, root = storage_filesystem(cfg)
    fs.invalidate_cache()  # s3fs caches listings; Ray's workers add checkpoints behind its back
    with access_named(run_storage(cfg), "list", cfg.checkpoint.storage_options):
        path, skipped = newest_complete(fs, root)
    warn_skipped(skipped, path)
    if path is None:
        return None
    return fs.unstrip_protocol(path) if "://" in run_storage(cfg) else path


def write_run_record(cfg, record: dict[str, Any]) -> None:
    """Rank 0: the run's outcome (result metrics or a non-finite stop) as `<run storage>/result.json`.

    Ray's `Result.metrics` only carries metrics attached to checkpoints, so the driver reads this instead.
    """
    fs, root = storage_filesystem(cfg)
    if "://" not in run_storage(cfg):  # object stores have no folders, and s3fs's makedirs creates missing buckets
        fs.makedirs(root, exist_ok=True)
    with (access_named(f"{run_storage(cfg)}/{RESULT_RECORD}", "write", cfg.checkpoint.storage_options),
          fs.open(f"{root}/{RESULT_RECORD}", "w") as f):
        json.dump(record, f, default=str)


def pop_run_record(cfg) -> dict[str, Any] | None:
    """Read and delete the run's result record (None if the workers wrote none)."""
    fs, root = storage_filesystem(cfg)
    path = f"{root}/{RESULT_RECORD}"
    fs.invalidate_cache()  # s3fs caches listings; the workers wrote this file behind its back
    with access_named(f"{run_storage(cfg)}/{RESULT_RECORD}", "read and delete", cfg.checkpoint.storage_options):
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            record = json.load(f)
        fs.rm(path)
    return record
