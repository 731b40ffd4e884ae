"""The checkpoint format: the files of one checkpoint folder, and the one definition of a complete checkpoint.

    <checkpoint.path>/<run name>/checkpoint_<step:08d>/
        checkpoint.json     rank 0, last: {"step", "world_size", "zero_stage", "frozen_student", "files"}: what the
                            folder holds; "files" maps every other file (every rank's) to its size in bytes
        config.yaml         rank 0: the run's resolved config (credentials masked), what an export rebuilds from
        rank<r>_state.pt    every rank: its RNG states (global and the task's), its data position
        state/              DeepSpeed's tag folder: the module states (rank 0; every rank under ZeRO-3) and one
                            optimizer shard per rank under ZeRO 1-3
        latest              DeepSpeed's tag file, naming `state`
        frozen_student.pt   rank 0, when the exported module has frozen parameters ("frozen_student": true)
        metrics.json        the local store's metrics at the checkpoint (Ray records them itself)

    <output_dir>/export/model.pt   the stage export, written at the end of the stage (`STAGE_EXPORT`)

Under Ray every rank's files arrive in storage on their own, in any order, so no single file marks a checkpoint
complete: `problems()` checks that everything `checkpoint.json` promises is there, each file at the size it was
written with (a half-uploaded or truncated file is caught before anything loads it). Checkpoints written before
"files" existed are checked by name only. The local store, the workers' restore, the driver's scan for a
checkpoint to resume from and the offline export all use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "checkpoint_"
MANIFEST = "checkpoint.json"
CONFIG = "config.yaml"
FROZEN_STUDENT = "frozen_student.pt"
METRICS = "metrics.json"
DEEPSPEED_TAG = "state"
LATEST = "latest"
# DeepSpeed's module-state file (weights and our client state); ZeRO-3 writes one per rank, rank 0's named so.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_OPTIMIZER_SHARD_SUFFIX = "optim_states.pt"
STAGE_EXPORT = "export/model.pt"
"""Where a stage leaves its export (`pipeline.checkpointing.export`), under its `output_dir`."""


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"rank{rank}_state.pt"


def stage_export_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STAGE_EXPORT


def manifest(step: int, world_size: int, zero_stage: int, frozen_student: bool,
             files: dict[str, int] | None = None) -> dict[str, Any]:
    """The contents of `checkpoint.json`; `files`: every other file of the folder (relative path) and its size."""
    return {"step": step, "world_size": world_size, "zero_stage": zero_stage, "frozen_student": frozen_student,
            "files": dict(sorted((files or {}).items()))}


def file_sizes(directory: Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file under the local folder `directory`."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def _names(fs, path: str) -> set[str]:
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def _size_problems(fs, path: str, promised: dict[str, int], reported: list[str]) -> list[str]:
    """The files of `promised` ({relative path: size}) absent or of another size under `path`, except those
    `reported` already (a name, or a folder as `name/`)."""
    root = path.rstrip("/") + "/"
    found = {k.removeprefix(root): v["size"] for k, v in fs.find(path, detail=True).items() if k.startswith(root)}
    todo = {k: v for k, v in promised.items() if not any(k == r or k.startswith(r.rstrip("/") + "/") for r in reported)}
    missing = [name for name in todo if name not in found]
    wrong = [f"{name} is {found[name]} bytes, {MANIFEST} says {size} (truncated or rewritten)"
             for name, size in todo.items() if name in found and found[name] != size]  # fmt: skip
    return ([f"{', '.join(missing)} missing"] if missing else []) + wrong


def problems(fs, path: str) -> list[str]:
    """Why the checkpoint folder `path` (on fsspec filesystem `fs`) is incomplete; an empty list: complete."""
    names = _names(fs, path)
    if MANIFEST not in names:
        return [f"no {MANIFEST} (rank 0 writes it)"]
    try:
        promised = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
        world, zero_stage = promised["world_size"], promised["zero_stage"]
    except (ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"]
    missing = [name for name in (CONFIG, LATEST) if name not in names]
    missing += [rank_state_name(r) for r in range(world) if rank_state_name(r) not in names]
    if promised["frozen_student"] and FROZEN_STUDENT not in names:
        missing.append(FROZEN_STUDENT)
    found = [f"{', '.join(missing)} missing"] if missing else []
    if DEEPSPEED_TAG not in names:
        found.append(f"no DeepSpeed tag folder {DEEPSPEED_TAG}/")
        return found + _size_problems(fs, path, promised.get("files", {}), [*missing, f"{DEEPSPEED_TAG}/"])
    shards = _names(fs, f"{path}/{DEEPSPEED_TAG}")
    if not shards & set(MODEL_STATES):
        found.append(f"{DEEPSPEED_TAG}/{MODEL_STATES[0]} missing")
        missing += [f"{DEEPSPEED_TAG}/{name}" for name in MODEL_STATES]
    optimizer_shards = sum(n.endswith(_OPTIMIZER_SHARD_SUFFIX) for n in shards)
    # Without ZeRO the optimizer state is in the module-state file (a bf16 run may still write per-rank shards).
    expected = (0, world) if zero_stage == 0 else (world,)
    if optimizer_shards not in expected:
        found.append(f"{optimizer_shards} optimizer shard(s) in {DEEPSPEED_TAG}/ for {world} rank(s) of a "
                     f"ZeRO-{zero_stage} run")
    return found + _size_problems(fs, path, promised.get("files", {}), missing)


def checkpoint_dirs(fs, root: str) -> list[str]:
    """The `checkpoint_<step>` folders under the run folder `root`, newest first (complete or not)."""
    if not fs.exists(root):
        return []
    found = [p.rstrip("/") for p in fs.ls(root, detail=False)]
    return sorted((p for p in found if p.rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX)), reverse=True)


def newest_complete(fs, root: str) -> tuple[str | None, list[str]]:
    """(the newest complete checkpoint folder under `root` or None, why each newer one was passed over)."""
    skipped = []
    for path in checkpoint_dirs(fs, root):
        found = problems(fs, path)
        if not found:
            return path, skipped
        skipped.append(f"{path.rsplit('/', 1)[-1]}: {'; '.join(found)}")
    return None, skipped
