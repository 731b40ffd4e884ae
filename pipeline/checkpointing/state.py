"""What a training worker saves into a checkpoint folder and restores from it (the files: `layout`).

Every rank: DeepSpeed's part (its ZeRO shard; rank 0 the module states with our client state) and its own
`rank<r>_state.pt` (global RNG states, the task's RNG, the loader position). Rank 0 also: `config.yaml`,
`frozen_student.pt` when the exported module has frozen parameters, and `checkpoint.json` last, listing every
rank's files with their sizes (gathered from the ranks: under Ray each writes into its own folder).

Every file is read back weights-only (`safe_load`): DeepSpeed's through its checkpoint engine, ours directly.

Frozen parameters are left out of DeepSpeed's files (`exclude_frozen_parameters`): teachers never change and are
rebuilt from the config on resume (`load_trainable_state` accepts their absence, nothing else). The exported
module's own frozen parameters go to `frozen_student.pt`, so an export and a resume take them as the run held them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpointing.layout import (
    CONFIG,
    DEEPSPEED_TAG,
    FROZEN_STUDENT,
    MANIFEST,
    file_sizes,
    manifest,
    rank_state_name,
)
from pipeline.checkpointing.safe_load import (
    NUMPY_ARRAY_GLOBALS,
    TENSORS_ONLY,
    load_file,
    weights_only_checkpoint_engine,
)
from pipeline.distributed import all_gather_object, barrier


@dataclass
class WorkerState:
    """A worker's state besides DeepSpeed's engine (module, optimizer, LR scheduler)."""

    step: int
    """Optimizer steps done."""
    skipped_batches: int
    """Micro-batches dropped under `nonfinite: skip`."""
    mlflow_run_id: str | None
    """The run's MLflow run (rank 0's), continued on resume."""
    task_rng: dict[str, Any] = field(default_factory=dict)
    """This rank's `Task.rng_state_dict()`."""
    loader: dict[str, Any] | None = None
    """This rank's loader position (`state_dict()`), None for loaders without one."""
    frozen_student: dict[str, torch.Tensor] = field(default_factory=dict)
    """The exported module's frozen parameters (rank 0 writes them; {} when it has none)."""


def rng_state() -> dict[str, Any]:
    """This process's global RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_trainable_state(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Load a checkpoint's module state that lacks the frozen parameters (DeepSpeed's `custom_load_fn`).

    Frozen weights (teachers, and the student blocks a task freezes) are what `build_task(cfg)` rebuilt, from the
    same seed or weight files. Any other missing or unexpected key means the checkpoint belongs to another task or
    config, which is an error.
    """
    own = dst.state_dict()
    reshaped = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in src.items()
                if k in own and v.shape != own[k].shape]  # fmt: skip
    if reshaped:
        raise RuntimeError(
            f"the checkpoint does not fit this task: {len(reshaped)} tensor(s) of another shape (checkpoint != "
            f"this config), e.g. {reshaped[:4]}; resume with the config the run was started with"
        )
    result = dst.load_state_dict(src, strict=False)
    frozen = {name for name, param in dst.named_parameters() if not param.requires_grad}
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the checkpoint does not fit this task: missing trainable tensors {missing[:8]} "
            f"({len(missing)} in all), unexpected tensors {result.unexpected_keys[:8]} "
            f"({len(result.unexpected_keys)} in all); resume with the config the run was started with"
        )


def save_worker_state(directory: Path, engine: Any, state: WorkerState, rank: int, world_size: int,
                      config_yaml: str, zero_stage: int) -> None:
    """Write this rank's part of a checkpoint into `directory` (every rank calls it: DeepSpeed's save is collective),
    with this process's global RNG states as they are now.

    `config_yaml` is the run's config with credentials masked; rank 0 writes it, `state.frozen_student` and, last,
    the manifest with every rank's files and sizes.
    """
    client = {"step": state.step, "skipped_batches": state.skipped_batches, "mlflow_run_id": state.mlflow_run_id}
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state=client, exclude_frozen_parameters=True)
    torch.save({"rng": rng_state(), "task_rng": state.task_rng, "loader": state.loader},
               directory / rank_state_name(rank))
    if rank == 0:
        (directory / CONFIG).write_text(config_yaml)
        if state.frozen_student:
            torch.save(state.frozen_student, directory / FROZEN_STUDENT)
    barrier()  # in a folder the ranks share (the local store) each rank then lists every rank's files
    files = _merged(all_gather_object(file_sizes(directory)))
    if rank == 0:
        written = manifest(state.step, world_size, zero_stage, bool(state.frozen_student), files)
        (directory / MANIFEST).write_text(json.dumps(written))


def _merged(listings: list[dict[str, int]]) -> dict[str, int]:
    """One {file: size} from every rank's listing (disjoint in private folders, equal in a shared one)."""
    merged: dict[str, int] = {}
    for listing in listings:
        for name, size in listing.items():
            if merged.setdefault(name, size) != size:
                raise RuntimeError(f"two ranks wrote checkpoint file {name} with different sizes")
    return merged


def restore_worker_state(directory: Path, engine: Any, rank: int, world_size: int) -> WorkerState:
    """Load DeepSpeed's part into `engine`, set this process's global RNG states, and return the rest of this rank's
    state for the caller to apply (task RNG, loader position, frozen student)."""
    saved = json.loads((directory / MANIFEST).read_text())
    if saved["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {directory} was written by {saved['world_size']} worker(s) but this run has {world_size}; "
            "resuming needs the same number of workers (ZeRO shards are per rank)"
        )
    weights_only_checkpoint_engine(engine)
    loaded, client = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, custom_load_fn=load_trainable_state)
    if loaded is None:  # DeepSpeed only logs a warning when its files are absent
        raise RuntimeError(f"checkpoint {directory}: DeepSpeed found no {DEEPSPEED_TAG}/ module states to load")
    frozen = load_file(directory / FROZEN_STUDENT, TENSORS_ONLY) if saved["frozen_student"] else {}
    own = load_file(directory / rank_state_name(rank), NUMPY_ARRAY_GLOBALS)
    set_rng_state(own["rng"])
    return WorkerState(step=client["step"], skipped_batches=client["skipped_batches"],
                       mlflow_run_id=client["mlflow_run_id"], task_rng=own["task_rng"], loader=own["loader"],
                       frozen_student=frozen)
