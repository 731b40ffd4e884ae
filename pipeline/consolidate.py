"""Turn a run's DeepSpeed checkpoint into a stage export offline (`jobs/export_checkpoint.py`).

A checkpoint (`<checkpoint.path>/<run name>/checkpoint_<step>`, local or s3://) holds ZeRO shards per rank; the
stage export is one file `{"state_dict", "meta"}` of the task's trainable module that `models.load_pretrained`
reads (docs/architecture.md, "Stage exports"). Under ZeRO 1-3 the weights come from the fp32 master copies in the
optimizer shards (DeepSpeed's `zero_to_fp32`), so a bf16 run exports its exact fp32 weights; without ZeRO they
are the module weights. The task is rebuilt on the meta device (no memory, no teacher weights) from the
`config.yaml` the engine writes into every checkpoint, to know the trainable module's keys and its metadata.

DeepSpeed's part of a checkpoint leaves every frozen parameter out. Frozen parameters of the exported module
itself (stage 1's last block under `student_feature=residual_before_last_block`) come from the engine's
`frozen_student.pt` beside it, as the run held them; they are not re-created from the seed, whose result depends
on the model code and torch version at export time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, from_dict, load_config
from pipeline.engine import CHECKPOINT_CONFIG, FROZEN_STUDENT, stage_export
from pipeline.redaction import redact_text

# DeepSpeed's module-state file (weights and our client state); ZeRO-3 writes one per rank, rank 0's named so.
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class CheckpointNotFoundError(FileNotFoundError):
    """No complete checkpoint at the given location; the message says what was looked for."""


def _names(fs, path: str) -> set[str]:
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def checkpoint_problems(fs, path: str) -> list[str]:
    """Why the checkpoint folder `path` cannot be exported (empty list: complete)."""
    names = _names(fs, path)
    if "latest" not in names:
        return ["no `latest` tag file (DeepSpeed writes it last)"]
    tag = fs.cat_file(f"{path}/latest").decode().strip()
    if tag not in names:
        return [f"`latest` names tag {tag!r} but that folder is missing"]
    shard_names = _names(fs, f"{path}/{tag}")
    problems = [] if shard_names & set(_MODEL_STATES) else [f"{tag}/{_MODEL_STATES[0]} is missing"]
    ranks = sum(n.startswith("rank") and n.endswith("_state.pt") for n in names)
    optim_shards = sum(n.endswith("optim_states.pt") for n in shard_names)
    # Without ZeRO the optimizer lives in the model states file: no shards. Unknown stage (no config): either.
    zero_stage = _saved_zero_stage(fs, path) if CHECKPOINT_CONFIG in names else None
    expected = {0: (0,), None: (0, ranks)}.get(zero_stage, (ranks,))
    if ranks == 0:
        problems.append("no rank<r>_state.pt files")
    elif optim_shards not in expected:
        problems.append(
            f"{optim_shards} ZeRO optimizer shard(s) for {ranks} rank(s) of a ZeRO-{zero_stage} run: a rank's "
            "shard is missing"
        )
    return problems


def _saved_zero_stage(fs, path: str) -> int:
    import yaml

    return int(yaml.safe_load(fs.cat_file(f"{path}/{CHECKPOINT_CONFIG}"))["deepspeed"]["zero_stage"])


def find_checkpoint(run_or_path: str) -> str:
    """The checkpoint folder `run_or_path` names, or the newest complete `checkpoint_*` of a run folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_or_path)
    fs.invalidate_cache()
    shown = redact_text(run_or_path)
    if not fs.isdir(path):
        raise CheckpointNotFoundError(
            f"{shown}: no such folder; give a run folder (<checkpoint.path>/<run name>) "
            "or one of its checkpoint_<step> folders"
        )
    remote = "://" in run_or_path
    if "latest" in _names(fs, path):
        problems = checkpoint_problems(fs, path)
        if problems:
            raise CheckpointNotFoundError(f"{shown} is an incomplete checkpoint: {'; '.join(problems)}")
        return run_or_path
    candidates = sorted((p for p in fs.ls(path, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(
        "checkpoint_")), reverse=True)  # fmt: skip
    skipped = []
    for candidate in candidates:
        problems = checkpoint_problems(fs, candidate)
        if not problems:
            return fs.unstrip_protocol(candidate) if remote else candidate
        skipped.append(f"{candidate.rsplit('/', 1)[-1]}: {'; '.join(problems)}")
    detail = f" (incomplete: {' | '.join(skipped)})" if skipped else ""
    raise CheckpointNotFoundError(f"{shown} holds no complete checkpoint_<step> folder{detail}")


def _local_copy(url: str, tmp: str) -> Path:
    """A local folder with the checkpoint's files (downloaded when `url` is remote)."""
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.get(path.rstrip("/") + "/", f"{tmp}/checkpoint/", recursive=True)
    return Path(tmp) / "checkpoint"


def _read_config(directory: Path, config: Config | None) -> Config:
    if config is not None:
        return config
    path = directory / CHECKPOINT_CONFIG
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{directory} has no {CHECKPOINT_CONFIG} (checkpoints written before it was added); pass the run's "
            "config with --config FILE [key=value ...]"
        )
    import yaml

    return from_dict(Config, yaml.safe_load(path.read_text()), "")


def _task_weights(directory: Path, zero_stage: int, model_states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every weight of the task: fp32 master copies under ZeRO 1-3, the module weights without ZeRO."""
    if zero_stage == 0:
        return dict(model_states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory))


def consolidate(directory: Path, config: Config | None = None) -> dict[str, Any]:
    """The stage export of the local checkpoint folder `directory`: trainable module weights (fp32) and meta."""
    from pipeline.tasks import build_task

    cfg = _read_config(directory, config)
    with torch.device("meta"):
        task = build_task(cfg)
    trainable = task.trainable_module()
    prefix = next(name for name, module in task.named_modules() if module is trainable)
    prefix = f"{prefix}." if prefix else ""
    tag_dir = directory / (directory / "latest").read_text().strip()
    states_file = next(tag_dir / name for name in _MODEL_STATES if (tag_dir / name).is_file())
    model_states = torch.load(states_file, map_location="cpu", weights_only=False)  # DeepSpeed pickles objects
    task_weights = _task_weights(directory, cfg.deepspeed.zero_stage, model_states)
    weights = {k: task_weights[prefix + k] for k in trainable.state_dict() if prefix + k in task_weights}
    weights.update(_frozen_weights(directory, trainable, weights))
    state = {k: weights[k].float() if weights[k].is_floating_point() else weights[k] for k in trainable.state_dict()}
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
    saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
    absent = [k for k in missing if k not in saved]
    if absent:
        where = f"its {FROZEN_STUDENT} lacks them" if saved else f"it has no {FROZEN_STUDENT} (an older checkpoint)"
        raise ValueError(
            f"{directory}: the checkpoint lacks {len(absent)} frozen weight(s) of the exported module "
            f"(e.g. {absent[:3]}) and {where}; use the run's end-of-stage export (<output_dir>/export/model.pt), "
            "or resume the run with the current code: its next checkpoint has the file"
        )
    wrong = [f"{k} {tuple(saved[k].shape)} != {tuple(params[k].shape)}" for k in missing
             if saved[k].shape != params[k].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{directory}/{FROZEN_STUDENT} does not fit this config's module: {wrong[:3]}")
    return {k: saved[k] for k in missing}


def export_checkpoint(run_or_path: str, out: str, config: Config | None = None) -> tuple[str, dict[str, Any]]:
    """Write the stage export of a run's latest complete checkpoint (or of one checkpoint) to `out`.

    Returns (the checkpoint used, the export's meta).
    """
    import fsspec

    source = find_checkpoint(run_or_path)
    with tempfile.TemporaryDirectory(prefix="export_") as tmp:
        payload = consolidate(_local_copy(source, tmp), config)
    with fsspec.open(out, "wb", auto_mkdir=True) as f:
        torch.save(payload, f)
    return source, payload["meta"]


def config_from_args(config_path: str | None, overrides: list[str]) -> Config | None:
    """The `--config FILE key=value ...` fallback for checkpoints without their own config.yaml."""
    if config_path is None:
        if overrides:
            raise ValueError(f"overrides {overrides} given without --config FILE")
        return None
    return load_config(config_path, overrides)
