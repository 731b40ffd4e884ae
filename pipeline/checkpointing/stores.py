"""Where a worker's checkpoint directory lives: Ray Train's storage (local path or s3://) or a plain local folder.

The engine writes a checkpoint into a directory it is given (`pipeline.checkpointing.state`: every rank its own
files) and resumes from the latest one; these two stores decide where that directory lives.

- `RayCheckpointStore`: every rank writes into a private temp dir and calls `ray.train.report`; Ray merges the
  ranks' files into one checkpoint under `<storage_path>/<run name>/checkpoint_<step>` and keeps `checkpoint.keep`
  of them. `ray.train.get_checkpoint()` returns the latest after a worker restart, and after a resubmission of the
  same run (Ray Train V2 reloads its checkpoint manager's snapshot from the run's storage folder). Ray's pick is
  checked first (`layout.problems`: a file missing or of another size than written); an incomplete one is skipped
  with a warning for the newest complete checkpoint beside it, chosen by rank 0 for every rank. Each rank
  restores from its own download of a remote checkpoint (`private_checkpoint_dir`).
- `LocalCheckpointStore`: the no-Ray path (one process or torchrun on one node): `<path>/<run name>/checkpoint_<step>`,
  written into a temp folder and renamed when every rank is done, so a crash never leaves a half checkpoint.
  The restore takes the newest complete one and warns about newer ones it passes over.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from pipeline.access import access_named
from pipeline.checkpointing.layout import METRICS, checkpoint_dir_name, checkpoint_dirs, newest_complete, problems
from pipeline.distributed import barrier, broadcast_object, is_main_process
from pipeline.redaction import redact_text
from pipeline.writes import disk_full_named

WriteFn = Callable[[Path], None]
log = logging.getLogger(__name__)


class NoCompleteCheckpointError(RuntimeError):
    """The run has checkpoints but none is complete: resuming would silently start over."""


def warn_skipped(skipped: list[str], chosen: str | None) -> None:
    """Log (rank 0) the checkpoints passed over, each with what is wrong, and the one resumed from instead."""
    if skipped and is_main_process():
        instead = f"resuming from {redact_text(chosen)}" if chosen else "no complete checkpoint left"
        log.warning("skipping incomplete checkpoint(s): %s; %s", " | ".join(skipped), instead)


class CheckpointStore(Protocol):
    def restore(self) -> Any:
        """Context manager yielding the latest checkpoint directory (a Path) or None."""

    def save(self, step: int, write: WriteFn, metrics: dict[str, Any]) -> None:
        """Persist a checkpoint: `write(dir)` runs on every rank with a directory to fill."""


class RayCheckpointStore:
    """Checkpoints through `ray.train.report`; only usable inside a Ray Train worker.

    `fallback` is a checkpoint the driver found by scanning storage; it is used only when Ray itself has none
    for this run (Ray Train V2 dropped `resume_from_checkpoint` in favour of this pattern). `storage` (the run's
    storage folder) and its `storage_options` name the checkpoint in an access-denied error.
    """

    def __init__(self, fallback: str | None = None, storage: str = "the run's storage",
                 storage_options: dict[str, Any] | None = None) -> None:
        self.fallback, self.storage, self.storage_options = fallback, storage, storage_options

    @contextmanager
    def restore(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.fallback is not None:
            checkpoint = ray.train.Checkpoint(self.fallback)
        if checkpoint is None:
            yield None
            return
        # rank 0 checks and picks; every rank loads the same checkpoint
        path = broadcast_object(complete_or_previous(checkpoint) if is_main_process() else None)
        chosen = ray.train.Checkpoint(path, filesystem=checkpoint.filesystem)
        with private_checkpoint_dir(chosen, self._access(Path(path).name, "read")) as local_dir:
            yield local_dir

    def _access(self, name: str, verb: str):
        return access_named(f"{self.storage}/{name}", verb, self.storage_options)

    def save(self, step: int, write: WriteFn, metrics: dict[str, Any]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="ckpt_") as tmp:
            with disk_full_named(tmp, "checkpoint staging folder", "TMPDIR (Ray stages checkpoints there)"):
                write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            with self._access(checkpoint_dir_name(step), "write"):  # rank r uploads its files here
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(step))
        # Block until the controller has registered it: otherwise a worker lost soon after this point can make
        # Ray restart the group from an older checkpoint (it may not have processed this report yet).
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def complete_or_previous(checkpoint) -> str:
    """The path of Ray's `checkpoint` if it is complete, else of the newest complete checkpoint in its run folder
    (the ones passed over are logged with what is wrong); `NoCompleteCheckpointError` when there is none."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    fs = ArrowFSWrapper(checkpoint.filesystem)
    path = checkpoint.path.rstrip("/")
    found = problems(fs, path)
    if not found:
        return path
    root = path.rsplit("/", 1)[0]
    newest, skipped = newest_complete(fs, root)
    return checked_choice(root, newest, skipped)


def checked_choice(root: str, newest: str | None, skipped: list[str]) -> str:
    """`newest`, after logging the checkpoints `skipped` for it; `NoCompleteCheckpointError` when it is None."""
    warn_skipped(skipped, newest)
    if newest is None:
        raise NoCompleteCheckpointError(
            f"no complete checkpoint in {redact_text(root)} ({' | '.join(skipped)}); restore the missing files, or "
            "start over with another tracking.run_name"
        )
    return newest


@contextmanager
def private_checkpoint_dir(checkpoint, download_errors: Any = None) -> Iterator[Path]:
    """A Ray checkpoint as a local directory that no other process writes to while this one reads it.

    Local storage is read in place. Remote storage is downloaded into this process's own temp dir:
    `Checkpoint.as_directory()` shares one download dir among a node's processes, and a rank that arrives after
    another rank's download has finished downloads again into it, rewriting the files that rank is still loading
    (seen on 4 GPUs: torch.load's "EOFError: Ran out of input" on ZeRO shards after a restart).
    `download_errors`: a context manager around the download only (e.g. `access_named`).
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="restore_") as tmp:
        with download_errors or nullcontext():
            local = Path(checkpoint.to_directory(tmp))
        yield local


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
        """Complete checkpoints (`layout.problems`), oldest first."""
        import fsspec

        fs = fsspec.filesystem("file")
        return [Path(p) for p in reversed(checkpoint_dirs(fs, str(self.root))) if not problems(fs, p)]

    @contextmanager
    def restore(self) -> Iterator[Path | None]:
        import fsspec

        newest, skipped = newest_complete(fsspec.filesystem("file"), str(self.root))
        if not skipped:
            yield Path(newest) if newest else None
            return
        yield Path(checked_choice(str(self.root), newest, skipped))

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
            (staging / METRICS).write_text(json.dumps(metrics, default=str))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
        barrier()
