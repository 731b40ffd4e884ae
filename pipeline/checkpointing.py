"""Where checkpoints live: Ray Train's storage (local path or s3://) or a plain local folder.

The engine writes a checkpoint into a directory it is given (every rank writes its own ZeRO shard and its RNG /
data state) and finds the latest one to resume from; these two stores decide where that directory lives.

- `RayCheckpointStore`: every rank writes into a private temp dir and calls `ray.train.report`; Ray merges the
  ranks' files into one checkpoint under `<storage_path>/<run name>/checkpoint_<step>` and keeps `checkpoint.keep`
  of them. `ray.train.get_checkpoint()` returns the latest after a worker restart, and after a resubmission of the
  same run (Ray Train V2 reloads its checkpoint manager's snapshot from the run's storage folder). Each rank
  restores from its own download of a remote checkpoint (`private_checkpoint_dir`).
- `LocalCheckpointStore`: the no-Ray path (one process or torchrun on one node): `<path>/<run name>/checkpoint_<step>`,
  written into a temp folder and renamed when every rank is done, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pipeline.distributed import barrier, is_main_process
from pipeline.redaction import redact_text
from pipeline.writes import disk_full_named

WriteFn = Callable[[Path], None]


class CheckpointStore(Protocol):
    def restore(self) -> Any:
        """Context manager yielding the latest checkpoint directory (a Path) or None."""

    def save(self, step: int, write: WriteFn, metrics: dict[str, Any]) -> None:
        """Persist a checkpoint: `write(dir)` runs on every rank with a directory to fill."""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def run_storage(cfg) -> str:
    """`<checkpoint.path>/<run name>`: this run's checkpoints and result record (local or s3://)."""
    return f"{cfg.checkpoint.path.rstrip('/')}/{cfg.run_name}"


def storage_filesystem(cfg) -> tuple[Any, str]:
    """(fsspec filesystem, path) of the run's storage folder, opened with `checkpoint.storage_options`."""
    import fsspec

    return fsspec.core.url_to_fs(run_storage(cfg), **cfg.checkpoint.storage_options)


def write_run_record(cfg, record: dict[str, Any]) -> None:
    """Rank 0: the run's outcome (result metrics or a non-finite stop) as `<run storage>/result.json`.

    Ray's `Result.metrics` only carries metrics attached to checkpoints, so the driver reads this instead.
    """
    fs, root = storage_filesystem(cfg)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/result.json", "w") as f:
        json.dump(record, f, default=str)


def pop_run_record(cfg) -> dict[str, Any] | None:
    """Read and delete the run's result record (None if the workers wrote none)."""
    fs, root = storage_filesystem(cfg)
    path = f"{root}/result.json"
    fs.invalidate_cache()  # s3fs caches listings; the workers wrote this file behind its back
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        record = json.load(f)
    fs.rm(path)
    return record


class RayCheckpointStore:
    """Checkpoints through `ray.train.report`; only usable inside a Ray Train worker.

    `fallback` is a checkpoint the driver found by scanning storage; it is used only when Ray itself has none
    for this run (Ray Train V2 dropped `resume_from_checkpoint` in favour of this pattern).
    """

    def __init__(self, fallback: str | None = None) -> None:
        self.fallback = fallback

    @contextmanager
    def restore(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.fallback is not None:
            checkpoint = ray.train.Checkpoint(self.fallback)
        if checkpoint is None:
            yield None
            return
        with private_checkpoint_dir(checkpoint) as local_dir:
            yield local_dir

    def save(self, step: int, write: WriteFn, metrics: dict[str, Any]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="ckpt_") as tmp:
            with disk_full_named(tmp, "checkpoint staging folder", "TMPDIR (Ray stages checkpoints there)"):
                write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(step))
        # Block until the controller has registered it: otherwise a worker lost soon after this point can make
        # Ray restart the group from an older checkpoint (it may not have processed this report yet).
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


@contextmanager
def private_checkpoint_dir(checkpoint) -> Iterator[Path]:
    """A Ray checkpoint as a local directory that no other process writes to while this one reads it.

    Local storage is read in place. Remote storage is downloaded into this process's own temp dir:
    `Checkpoint.as_directory()` shares one download dir among a node's processes, and a rank that arrives after
    another rank's download has finished downloads again into it, rewriting the files that rank is still loading
    (seen on 4 GPUs: torch.load's "EOFError: Ran out of input" on ZeRO shards after a restart).
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="restore_") as tmp:
        yield Path(checkpoint.to_directory(tmp))


class LocalCheckpointStore:
    """Checkpoints in `<root>/checkpoint_<step>` on a filesystem every rank can see."""

    def __init__(self, root: str | Path, keep: int) -> None:
        if "://" in str(root):
            raise ValueError(
                f"checkpoint.path: {redact_text(str(root))!r} is remote; the local (scaling.use_ray=false) path "
                "writes to a local folder only. Use scaling.use_ray=true for s3:// storage, or give a local path."
            )
        self.root, self.keep = Path(root), keep

    def checkpoints(self) -> list[Path]:
        """Completed checkpoints, oldest first."""
        return sorted(p for p in self.root.glob("checkpoint_*") if (p / "metrics.json").is_file())

    @contextmanager
    def restore(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def save(self, step: int, write: WriteFn, metrics: dict[str, Any]) -> None:
        final = self.root / checkpoint_dir_name(step)
        staging = self.root / f".staging_{checkpoint_dir_name(step)}"
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        with disk_full_named(staging, "checkpoint", "checkpoint.path"):
            write(staging)
        barrier()  # every rank's shard is on disk before the checkpoint becomes visible
        if is_main_process():
            # metrics.json is written last: its presence marks a complete checkpoint.
            (staging / "metrics.json").write_text(json.dumps(metrics, default=str))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
        barrier()
