"""A recipe execution's record, `<out_dir>/recipe_state.json` (the parent run and every finished step), and the
result an execution returns."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.recipe.resolve import default_tracking, fingerprint
from pipeline.recipe.spec import Recipe, RecipeError, StepSpec
from pipeline.tracking import run_status

STATE_FILE = "recipe_state.json"


@dataclass
class RecipeState:
    """The completion record kept in `<out_dir>/recipe_state.json`."""

    path: Path
    parent_run_id: str | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, out_dir: Path) -> RecipeState:
        path = out_dir / STATE_FILE
        if not path.is_file():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, data.get("parent_run_id"), data.get("steps", {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"parent_run_id": self.parent_run_id, "steps": self.steps}, indent=2))
        tmp.replace(self.path)  # atomic: an interrupted write never leaves a half record


def step_is_complete(step: StepSpec, record: dict[str, Any] | None, cfg: Any, tracking_uri: str,
                     log: Callable[[str], None]) -> bool:
    """True when the record, the MLflow run and the export all say the step finished with this config."""
    if not record or record.get("status") != "done":
        return False
    if record.get("fingerprint") != fingerprint(cfg):
        raise RecipeError(
            f"[{step.name}] was completed with a different configuration than the recipe now gives; "
            f"use a new out_dir=, or delete {Path(cfg.output_dir)} and its entry in {STATE_FILE} to redo it"
        )
    if step.kind == "stage" and not Path(record.get("export", "")).is_file():
        log(f"[{step.name}] recorded as done but its export {record.get('export')} is missing; running it again")
        return False
    if record.get("run_id"):
        status = run_status(tracking_uri, record["run_id"])
        if status != "FINISHED":
            log(f"[{step.name}] recorded as done but its MLflow run is {status}; running it again")
            return False
    return True


@dataclass
class RecipeResult:
    parent_run_id: str | None
    tracking_uri: str
    experiment: str
    steps: dict[str, dict[str, Any]]
    """Per step: the completion record (run_id, export, metrics, ...); empty for a dry run."""
    skipped: list[str] = field(default_factory=list)
    """Steps found complete from an earlier execution and not run again."""


def recorded_result(recipe: Recipe) -> RecipeResult:
    """What an earlier execution of `recipe` (same out_dir) recorded, without running anything."""
    state = RecipeState.load(recipe.out_dir)
    if state.parent_run_id is None:
        raise RecipeError(f"{recipe.out_dir / STATE_FILE} does not exist: this recipe has not run with this out_dir")
    uri, experiment = default_tracking(recipe)
    return RecipeResult(state.parent_run_id, uri, experiment, dict(state.steps))
