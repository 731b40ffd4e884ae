"""A recipe step's config: the recipe's settings, the step's overrides and the runner's keys, loaded and validated."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import yaml

from pipeline.config import ConfigError, flatten, load_config, load_yaml_tree, to_dict
from pipeline.recipe.spec import Recipe, RecipeError, StepSpec, looks_like_name, substitute
from pipeline.tasks.spec import task_spec

EVAL_INIT_KEY = "model.checkpoint"

# Keys the runner owns: every step of one recipe execution must agree on them.
_RUNNER_KEYS = ("output_dir", "tracking.parent_run_id", "tracking.run_name")


def step_overrides(recipe: Recipe, step: StepSpec, tracking_uri: str, experiment: str, parent_run_id: str | None,
                   init_key: str | None) -> list[str]:
    """The `key=value` overrides a step's config is loaded with: settings, the step's own, the runner's."""
    merged: dict[str, Any] = {}
    if step.kind == "stage":
        merged.update(flatten(recipe.settings))
        merged.setdefault("checkpoint.path", str(recipe.out_dir / "checkpoints"))
    merged.update(flatten(step.overrides))
    for key in _RUNNER_KEYS:
        if key in merged:
            raise RecipeError(f"{step.kind} {step.name!r}: {key} is set by the recipe runner; remove it")
    if step.init_from is not None and init_key is not None:
        source = step.init_from
        merged[init_key] = str(recipe.export_path(source)) if looks_like_name(source) else source
    if artifact_root := default_artifact_root(recipe):  # evaluations too: the parent's experiment is theirs
        merged["tracking.artifact_location"] = artifact_root
    merged.update({
        "output_dir": str(recipe.out_dir / step.name),
        "tracking.uri": tracking_uri,
        "tracking.experiment": experiment,
        "tracking.run_name": f"{recipe.name}.{step.name}",
        "tracking.parent_run_id": parent_run_id,
    })
    if step.kind == "stage":
        merged["stage"] = step.name
    return [f"{key}={_yaml_text(substitute(recipe, value, f'{step.name}: {key}'))}" for key, value in merged.items()]


def _yaml_text(value: Any) -> str:
    """One-line YAML that load_config's override parsing turns back into `value` (8e-05 stays a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def resolve_step_config(recipe: Recipe, step: StepSpec, tracking_uri: str, experiment: str,
                        parent_run_id: str | None = None) -> Any:
    """Load and validate a step's config with every recipe override applied (a Config or an eval config)."""
    if step.kind == "eval":
        from pipeline.evaluation.config import load_eval_config

        overrides = step_overrides(recipe, step, tracking_uri, experiment, parent_run_id, init_key_of(step))
        return _load(load_eval_config, step, overrides)
    overrides = step_overrides(recipe, step, tracking_uri, experiment, parent_run_id, init_key_of(step))
    return _load(load_config, step, overrides)


def init_key_of(step: StepSpec) -> str | None:
    """The config key `from:` is written into: explicit `init_key`, else the task's (or evaluation's) default."""
    if step.init_key is not None or step.init_from is None:
        return step.init_key
    if step.kind == "eval":
        return EVAL_INIT_KEY
    task = flatten(step.overrides).get("task.name") or load_yaml_tree(step.config).get("task", {}).get("name")
    try:
        init_key = task_spec(task).init_key
    except ValueError as err:
        raise RecipeError(f"stage {step.name!r} ({step.config}): task.name: {err}") from None
    if init_key is None:
        raise RecipeError(f"stage {step.name!r}: task {task!r} has no default weights key; add `init_key:` to it")
    return init_key


def _load(loader: Callable[..., Any], step: StepSpec, overrides: list[str]) -> Any:
    try:
        return loader(step.config, overrides)
    except ConfigError as err:
        raise RecipeError(f"{step.kind} {step.name!r} ({step.config}): {err}") from err


def default_tracking(recipe: Recipe) -> tuple[str, str]:
    """(tracking URI, experiment) shared by the parent run and every step."""
    uri = recipe.settings.get("tracking", {}).get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or f"sqlite:///{recipe.out_dir / 'mlflow.db'}"
    experiment = recipe.experiment or recipe.settings.get("tracking", {}).get("experiment") or recipe.name
    return uri, experiment


def default_artifact_root(recipe: Recipe) -> str | None:
    """`settings.tracking.artifact_location` (a local folder made absolute), shared by the parent run and every step;
    None = beside the tracking store (pipeline/tracking_artifacts.py)."""
    from pipeline.tracking_artifacts import absolute_artifact_root

    return absolute_artifact_root(recipe.settings.get("tracking", {}).get("artifact_location"))


def fingerprint(cfg: Any) -> str:
    """Hash of a resolved step config, ignoring where it is tracked and how many workers run it."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in ("tracking", "scaling")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
