"""Stage exports: the `{"state_dict", "meta"}` file a stage leaves for the next, from a live run or from a checkpoint.

The engine writes `<output_dir>/export/model.pt` at the end of a stage (`stage_export`, docs/architecture.md,
"Stage exports"); `export_checkpoint` (`jobs/export_checkpoint.py`) writes the same file offline from a run's
checkpoint (local or s3://). Under ZeRO 1-3 its weights come from the fp32 master copies in the optimizer shards
(DeepSpeed's `zero_to_fp32`), so a bf16 run exports its exact fp32 weights; without ZeRO they are the module
weights. The task is rebuilt on the meta device (no memory, no teacher weights) from the checkpoint's
`config.yaml`, to know the trainable module's keys and its metadata.

DeepSpeed's part of a checkpoint leaves every frozen parameter out. Frozen parameters of the exported module
itself (stage 1's last block under `student_feature=residual_before_last_block`) come from `frozen_student.pt`
beside it, as the run held them; they are not re-created from the seed, whose result depends on the model code
and torch version at export time.

Every file is read weights-only (`safe_load`): a checkpoint that asks to unpickle anything else is refused.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.access import access_named
from pipeline.checkpointing.layout import (
    CONFIG,
    DEEPSPEED_TAG,
    FROZEN_STUDENT,
    MANIFEST,
    MODEL_STATES,
    STAGE_EXPORT,
    newest_complete,
    problems,
)
from pipeline.checkpointing.safe_load import (
    DEEPSPEED_GLOBALS,
    TENSORS_ONLY,
    check_files,
    load_file,
    weights_only_loads,
)
from pipeline.config import Config, from_dict
from pipeline.redaction import redact_text


class CheckpointNotFoundError(FileNotFoundError):
    """No complete checkpoint at the given location; the message says what was looked for."""


def stage_export(cfg: Config, task: torch.nn.Module, state_dict: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
    """The stage-export payload `{"state_dict", "meta"}` (docs/architecture.md, "Stage exports"); the weights' key is
    the task's `export_weights_key`."""
    meta = {"task": cfg.task.name, "stage": cfg.stage, "step": step, **task.export_metadata()}
    return {task.export_weights_key: state_dict, "meta": meta}


def find_checkpoint(run_or_path: str) -> str:
    """The checkpoint folder `run_or_path` names, or the newest complete `checkpoint_*` of a run folder."""
    import fsspec

    with access_named(run_or_path, "list"):
        return _find_checkpoint(run_or_path, *fsspec.core.url_to_fs(run_or_path))


def _find_checkpoint(run_or_path: str, fs, path: str) -> str:
    fs.invalidate_cache()
    shown = redact_text(run_or_path)
    if not fs.isdir(path):
        raise CheckpointNotFoundError(
            f"{shown}: no such folder; give a run folder (<checkpoint.path>/<run name>) "
            "or one of its checkpoint_<step> folders"
        )
    if MANIFEST in {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}:
        found = problems(fs, path)
        if found:
            raise CheckpointNotFoundError(f"{shown} is an incomplete checkpoint: {'; '.join(found)}")
        return run_or_path
    newest, skipped = newest_complete(fs, path)
    if newest is None:
        detail = f" (incomplete: {' | '.join(skipped)})" if skipped else ""
        raise CheckpointNotFoundError(f"{shown} holds no complete checkpoint_<step> folder{detail}")
    return fs.unstrip_protocol(newest) if "://" in run_or_path else newest


def _local_copy(url: str, tmp: str) -> Path:
    """A local folder with the checkpoint's files (downloaded when `url` is remote)."""
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    with access_named(url, "read"):
        fs.get(path.rstrip("/") + "/", f"{tmp}/checkpoint/", recursive=True)
    return Path(tmp) / "checkpoint"


def _task_weights(directory: Path, zero_stage: int, model_states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every weight of the task: fp32 master copies under ZeRO 1-3, the module weights without ZeRO."""
    if zero_stage == 0:
        return dict(model_states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_files(sorted((directory / DEEPSPEED_TAG).glob("*.pt")), DEEPSPEED_GLOBALS)  # names a bad file first
    with weights_only_loads(DEEPSPEED_GLOBALS):  # zero_to_fp32 passes weights_only=False itself
        return get_fp32_state_dict_from_zero_checkpoint(str(directory))


def consolidate(directory: Path) -> dict[str, Any]:
    """The stage export of the local, complete checkpoint folder `directory`: trainable weights (fp32) and meta."""
    import yaml

    from pipeline.tasks import build_task

    cfg = from_dict(Config, yaml.safe_load((directory / CONFIG).read_text()), "")
    with torch.device("meta"):
        task = build_task(cfg)
    trainable = task.trainable_module()
    prefix = next(name for name, module in task.named_modules() if module is trainable)
    prefix = f"{prefix}." if prefix else ""
    tag_dir = directory / DEEPSPEED_TAG
    states_file = next(tag_dir / name for name in MODEL_STATES if (tag_dir / name).is_file())
    model_states = load_file(states_file, DEEPSPEED_GLOBALS)
    task_weights = _task_weights(directory, cfg.deepspeed.zero_stage, model_states)
    weights = {k: task_weights[prefix + k] for k in trainable.state_dict() if prefix + k in task_weights}
    weights.update(_frozen_weights(directory, trainable, weights))
    state = {k: weights[k].float() if weights[k].is_floating_point() else weights[k] for k in trainable.state_dict()}
    state = task.export_state_dict(state, task_weights)  # e.g. the classification task's EMA, as the live export
    return stage_export(cfg, task, state, int(model_states["step"]))


def _frozen_weights(directory: Path, trainable: torch.nn.Module, found: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The weights of `trainable` (built on the meta device) missing from `found`, read from `FROZEN_STUDENT`.

    Only frozen parameters may be missing; each one taken from the file must have its parameter's shape.
    """
    missing = [k for k in trainable.state_dict() if k not in found]
    if not missing:
        return {}
    params = dict(trainable.named_parameters())
    not_frozen = [k for k in missing if k not in params or params[k].requires_grad]
    if not_frozen:
        raise ValueError(
            f"{directory}: the checkpoint lacks {len(not_frozen)} trainable weight(s) of the exported module "
            f"(e.g. {not_frozen[:3]}); was it written by a run of this task with this config?"
        )
    path = directory / FROZEN_STUDENT
    saved = load_file(path, TENSORS_ONLY) if path.is_file() else {}
    absent = [k for k in missing if k not in saved]
    if absent:
        where = f"its {FROZEN_STUDENT} lacks them" if saved else f"it has no {FROZEN_STUDENT}"
        raise ValueError(
            f"{directory}: the checkpoint lacks {len(absent)} frozen weight(s) of the exported module "
            f"(e.g. {absent[:3]}) and {where}; use the run's end-of-stage export (<output_dir>/{STAGE_EXPORT})"
        )
    wrong = [f"{k} {tuple(saved[k].shape)} != {tuple(params[k].shape)}" for k in missing
             if saved[k].shape != params[k].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{directory}/{FROZEN_STUDENT} does not fit this config's module: {wrong[:3]}")
    return {k: saved[k] for k in missing}


def export_checkpoint(run_or_path: str, out: str) -> tuple[str, dict[str, Any]]:
    """Write the stage export of a run's latest complete checkpoint (or of one checkpoint) to `out`.

    Returns (the checkpoint used, the export's meta).
    """
    import fsspec

    source = find_checkpoint(run_or_path)
    with tempfile.TemporaryDirectory(prefix="export_") as tmp:
        payload = consolidate(_local_copy(source, tmp))
    # auto_mkdir only for local files: on s3 it would create a missing bucket
    with access_named(out, "write"), fsspec.open(out, "wb", auto_mkdir="://" not in out) as f:
        torch.save(payload, f)
    return source, payload["meta"]
