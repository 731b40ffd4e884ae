"""Running a recipe: validate every step, then run the unfinished ones in order under one MLflow parent run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.checkpointing.layout import stage_export_path
from pipeline.config import Config
from pipeline.recipe.report import plan_lines, write_retrieval_results
from pipeline.recipe.resolve import default_artifact_root, default_tracking, fingerprint, resolve_step_config
from pipeline.recipe.spec import Recipe, RecipeError, StepSpec, looks_like_name, recipe_yaml
from pipeline.recipe.state import STATE_FILE, RecipeResult, RecipeState, step_is_complete
from pipeline.tracking import RunNotFoundError, TrackingRun, metric_entries


def run_recipe(recipe: Recipe, dry_run: bool = False, log: Callable[[str], None] = print) -> RecipeResult:
    """Validate every step, then (unless `dry_run`) run the steps that are not complete yet, in order."""
    uri, experiment = default_tracking(recipe)
    state = RecipeState.load(recipe.out_dir)
    configs = {s.name: resolve_step_config(recipe, s, uri, experiment, state.parent_run_id) for s in recipe.steps}
    for line in plan_lines(recipe, configs):
        log(line)
    if dry_run:
        log(f"dry run: {len(configs)} step config(s) validated; nothing was trained")
        return RecipeResult(state.parent_run_id, uri, experiment, {})

    parent = _ParentRun(uri, experiment, default_artifact_root(recipe))
    state.parent_run_id = parent.start(recipe, state.parent_run_id)
    state.save()
    log(f"MLflow parent run {state.parent_run_id} in experiment {experiment!r} ({uri})")
    skipped: list[str] = []
    status = "FAILED"
    try:
        for step in recipe.steps:
            cfg = resolve_step_config(recipe, step, uri, experiment, state.parent_run_id)
            if step_is_complete(step, state.steps.get(step.name), cfg, uri, log):
                log(f"[{step.name}] complete in an earlier execution (run {state.steps[step.name]['run_id']}); skipped")
                skipped.append(step.name)
                continue
            _check_init_exists(recipe, step)
            log(f"[{step.name}] running {step.kind} ({step.config.name})")
            started = time.time()
            record = _run_stage(cfg) if step.kind == "stage" else _run_eval(cfg)
            record.update(kind=step.kind, status="done", fingerprint=fingerprint(cfg),
                          seconds=round(time.time() - started, 1))
            state.steps[step.name] = record
            state.save()
            parent.log_step_metrics(step.name, record["metrics"])
            log(f"[{step.name}] done in {record['seconds']:.0f} s (run {record['run_id']})")
        if recipe.evals:
            path = write_retrieval_results(recipe, state.steps)
            log(f"retrieval results of {len(recipe.evals)} evaluation(s) -> {path}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.end(status)
    return RecipeResult(state.parent_run_id, uri, experiment, dict(state.steps), skipped)


def _run_stage(cfg: Config) -> dict[str, Any]:
    from pipeline.launch import launch

    result = launch(cfg)
    export = stage_export_path(cfg.output_dir)
    if not export.is_file():
        raise RuntimeError(f"stage {cfg.stage!r} finished without writing its export {export}")
    return {"run_id": result.mlflow_run_id, "export": str(export), "metrics": _scalars(result.metrics),
            "resumed_from_step": result.resumed_from_step}


def _run_eval(cfg: Any) -> dict[str, Any]:
    from pipeline.evaluation.run import evaluate_retrieval

    metrics = evaluate_retrieval(cfg)
    return {"run_id": metrics.get("run_id"), "metrics": _scalars(metrics), "checkpoint": str(cfg.model.checkpoint)}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _check_init_exists(recipe: Recipe, step: StepSpec) -> None:
    source = step.init_from
    if source is None or "://" in source:
        return
    path = recipe.export_path(source) if looks_like_name(source) else Path(source)
    if not path.is_file():
        raise RecipeError(f"{step.kind} {step.name!r}: initial weights {path} do not exist")


class _ParentRun:
    """The recipe execution's MLflow run: created once, reopened by every rerun of the same out_dir."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None) -> None:
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.run: TrackingRun | None = None

    def start(self, recipe: Recipe, run_id: str | None) -> str:
        if run_id is not None:
            try:
                self.run = TrackingRun.reopen(self.uri, run_id)
            except RunNotFoundError as err:
                raise RecipeError(
                    f"{recipe.out_dir / STATE_FILE} names parent run {run_id}, which the tracking store {self.uri} "
                    "does not have; use the store of the first execution or a new out_dir="
                ) from err
            return run_id
        tags = {"recipe": recipe.name, "out_dir": str(recipe.out_dir)}
        self.run = TrackingRun.create(self.uri, self.experiment, recipe.name, tags, artifact_root=self.artifact_root)
        self.run.log_params({"steps": ",".join(s.name for s in recipe.steps)})
        self.run.log_text(recipe_yaml(recipe), "recipe.yaml")
        return self.run.run_id

    def log_step_metrics(self, step: str, metrics: dict[str, float]) -> None:
        self.run.log_metrics(metric_entries({f"{step}/{key}": value for key, value in metrics.items()}, step=0))

    def end(self, status: str) -> None:
        if self.run is not None:
            self.run.end(status)
