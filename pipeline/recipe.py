"""Multi-stage recipes: training stages and retrieval evaluations chained under one MLflow parent run.

A recipe YAML names its steps in order; each step starts from an earlier step's export:

    name: demo_cpu
    out_dir: demo_out                      # everything the recipe writes goes under here
    data_root: demo_out/data               # substituted for ${data_root} in settings and overrides
    settings:                              # overrides applied to every training stage
      scaling: {num_workers: 1}
      data: {train_shards: "${data_root}/train"}
    stages:
      - {name: mask, config: ../stages/masked_alignment_test.yaml}
      - {name: distill, config: ../stages/self_distill_test.yaml, from: mask}
      - {name: vtc, config: ../stages/video_text_test.yaml, from: distill, overrides: {optim: {max_steps: 50}}}
    evals:
      - {name: synthetic, config: ../eval/synthetic.yaml, from: vtc}
    results_file: ${out_dir}/retrieval.json   # the default: every evaluation's final numbers, one file

`from:` is an earlier step's name (its `<out_dir>/<name>/export/model.pt`) or a file path; the runner
writes it into the key the stage's task reads its initial weights from (`INIT_KEYS`, or `init_key:`).
`${export:<stage>}` in any override value names a stage's export, for a second set of weights.

Rerunning the same recipe with the same `out_dir` continues it: the parent run id and every finished
step are kept in `<out_dir>/recipe_state.json`; a finished step (recorded there, its MLflow run
FINISHED, its export present) is skipped, and an interrupted stage is restarted with the same run name
and checkpoint path, so the engine resumes it from its last checkpoint into the same MLflow run.

When the recipe has evaluations, the runner ends by writing `results_file` (default
`<out_dir>/retrieval.json`): `{<eval name>: {t2v_r1, ..., v2t_meanr, num_videos, num_texts, chance_r1,
chance_r5, chance_r10, run_id, checkpoint}}`, recalls and chance levels in percent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, flatten, load_config, load_yaml_tree, to_dict

STATE_FILE = "recipe_state.json"
EXPORT_FILE = "export/model.pt"
RESULTS_FILE = "retrieval.json"

# Config key that receives a stage's initial weights, per task: the student backbone for masked
# alignment and video-text (the latter loads a backbone into its vision encoder), the teacher for
# self-distillation (the student there is larger and starts from scratch, as in the paper).
INIT_KEYS = {
    "masked_alignment": "model.pretrained",
    "self_distill": "task.teacher_checkpoint",
    "video_text": "model.pretrained",
    "toy": "model.pretrained",
    "classification": "model.pretrained",
}
EVAL_INIT_KEY = "model.checkpoint"

# Keys the runner owns: every step of one recipe execution must agree on them.
_RUNNER_KEYS = ("output_dir", "tracking.parent_run_id", "tracking.run_name")

_STEP_KEYS = {"name", "config", "overrides", "from", "init_key"}
_RECIPE_KEYS = {"name", "description", "out_dir", "data_root", "experiment", "settings", "stages", "evals",
                "results_file"}
_VAR = re.compile(r"\$\{(out_dir|data_root|export:([A-Za-z0-9_.-]+))\}")


class RecipeError(ConfigError):
    """A recipe file, override or state record is wrong; the message says which and what to do."""


@dataclass
class StepSpec:
    """One recipe step: a training stage or a retrieval evaluation."""

    kind: str
    """"stage" or "eval"."""
    name: str
    """Unique step name: the MLflow child run name and the step's folder under `out_dir`."""
    config: Path
    """The stage or eval YAML (relative paths are relative to the recipe file)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested or dotted overrides of that config, applied after the recipe's `settings`."""
    init_from: str | None = None
    """Initial weights: an earlier step's name, or a file path / URL; None = the config's own."""
    init_key: str | None = None
    """Config key that receives `init_from`; None = `INIT_KEYS[task]` (stages) or model.checkpoint (evals)."""


@dataclass
class Recipe:
    name: str
    out_dir: Path
    stages: list[StepSpec]
    evals: list[StepSpec] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    """Local folder or URL (s3://...) of the data; substituted for ${data_root}."""
    experiment: str | None = None
    description: str = ""
    source: Path | None = None
    results_file: str | None = None
    """Where the evaluations' final numbers go (${out_dir} etc. substituted); None = <out_dir>/retrieval.json."""

    @property
    def steps(self) -> list[StepSpec]:
        return [*self.stages, *self.evals]

    def results_path(self) -> Path:
        """The evaluations' summary file: `results_file` with its variables replaced, or <out_dir>/retrieval.json."""
        if self.results_file is None:
            return self.out_dir / RESULTS_FILE
        return Path(_substitute(self, self.results_file, "results_file")).expanduser().resolve()

    def export_path(self, step_name: str) -> Path:
        """Where the stage named `step_name` leaves its weights (docs/architecture.md, Stage exports)."""
        return self.out_dir / step_name / EXPORT_FILE


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply `key=value` overrides, check names and `from:` references.

    Overrides: `out_dir=`, `data_root=`, `experiment=`, `settings.<key>=` (every stage),
    `stages.<name>.<key>=` / `evals.<name>.<key>=` (one step; `.from=` and `.config=` set those fields).
    """
    path = Path(path)
    raw = load_yaml_tree(path)
    unknown = set(raw) - _RECIPE_KEYS
    if unknown:
        raise RecipeError(f"{path}: unknown recipe keys {sorted(unknown)}; allowed: {sorted(_RECIPE_KEYS)}")
    name = raw.get("name") or path.stem
    stages = [_parse_step(entry, "stages", i, path) for i, entry in enumerate(_as_list(raw, "stages", path))]
    evals = [_parse_step(entry, "evals", i, path) for i, entry in enumerate(_as_list(raw, "evals", path))]
    if not stages and not evals:
        raise RecipeError(f"{path}: a recipe needs at least one entry under `stages:` or `evals:`")
    recipe = Recipe(
        name=str(name),
        out_dir=Path(raw.get("out_dir") or f"outputs/{name}"),
        stages=stages,
        evals=evals,
        settings=_nested(raw.get("settings") or {}, f"{path}: settings"),
        data_root=str(raw["data_root"]) if raw.get("data_root") else None,
        experiment=raw.get("experiment"),
        description=str(raw.get("description", "")),
        source=path,
        results_file=str(raw["results_file"]) if raw.get("results_file") else None,
    )
    for item in overrides:
        _apply_recipe_override(recipe, item)
    recipe.out_dir = recipe.out_dir.expanduser().resolve()
    if recipe.data_root is not None and "://" not in recipe.data_root:
        recipe.data_root = str(Path(recipe.data_root).expanduser().resolve())
    _check_references(recipe)
    return recipe


def _as_list(raw: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise RecipeError(f"{path}: `{key}` must be a list of steps, got {type(value).__name__}")
    return value


def _parse_step(entry: Any, section: str, index: int, recipe_path: Path) -> StepSpec:
    where = f"{recipe_path}: {section}[{index}]"
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: expected a mapping with name and config, got {entry!r}")
    unknown = set(entry) - _STEP_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_STEP_KEYS)}")
    for key in ("name", "config"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise RecipeError(f"{where}: `{key}` is required and must be a string")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry["name"]):
        raise RecipeError(f"{where}: name {entry['name']!r} may use only letters, digits, '_', '.', '-'")
    init_from = entry.get("from")
    if init_from is not None and not isinstance(init_from, str):
        raise RecipeError(f"{where}: `from` must be a step name or a path, got {init_from!r}")
    return StepSpec(
        kind="stage" if section == "stages" else "eval",
        name=entry["name"],
        config=(recipe_path.parent / entry["config"]).resolve(),
        overrides=_nested(entry.get("overrides") or {}, f"{where}.overrides"),
        init_from=init_from,
        init_key=entry.get("init_key"),
    )


def _nested(value: Any, where: str) -> dict[str, Any]:
    """A mapping whose dotted keys (`optim.lr: 1e-3`) are expanded into nested mappings."""
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping of config keys, got {value!r}")
    out: dict[str, Any] = {}
    for key, item in flatten(value).items():
        node = out
        *parents, last = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = item
    return out


def _apply_recipe_override(recipe: Recipe, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key=value (e.g. out_dir=/tmp/run)")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text.strip() else None
    head, _, rest = key.partition(".")
    if key == "out_dir":
        recipe.out_dir = Path(str(value))
    elif key == "data_root":
        recipe.data_root = str(value) if value is not None else None
    elif key == "experiment":
        recipe.experiment = str(value)
    elif key == "results_file":
        recipe.results_file = str(value) if value is not None else None
    elif head == "settings" and rest:
        recipe.settings = _nested({**flatten(recipe.settings), rest: value}, f"override {item!r}")
    elif head in ("stages", "evals") and rest:
        step_name, _, field_key = rest.partition(".")
        steps = {s.name: s for s in (recipe.stages if head == "stages" else recipe.evals)}
        if step_name not in steps or not field_key:
            raise RecipeError(f"override {item!r}: no {head[:-1]} named {step_name!r}; have {sorted(steps)}")
        step = steps[step_name]
        if field_key == "from":
            step.init_from = value
        elif field_key == "config":
            step.config = Path(str(value)).resolve()
        else:
            step.overrides = _nested({**flatten(step.overrides), field_key: value}, f"override {item!r}")
    else:
        raise RecipeError(
            f"override {item!r}: unknown recipe key {key!r}; use out_dir=, data_root=, experiment=, results_file=, "
            "settings.<key>=, stages.<name>.<key>= or evals.<name>.<key>="
        )


def _check_references(recipe: Recipe) -> None:
    seen: list[str] = []
    stage_names = [s.name for s in recipe.stages]
    for step in recipe.steps:
        if step.name in seen:
            raise RecipeError(f"recipe {recipe.name}: step name {step.name!r} is used twice; names must be unique")
        refs = [step.init_from] if step.init_from and _looks_like_name(step.init_from) else []
        refs += [m.group(2) for m in _VAR.finditer(json.dumps(step.overrides)) if m.group(2)]
        for ref in refs:
            if ref not in stage_names:
                raise RecipeError(
                    f"{step.kind} {step.name!r}: initial weights from {ref!r}, which is not a stage of this "
                    f"recipe (stages: {stage_names}); name an earlier stage or give a file path"
                )
            if ref not in seen:
                raise RecipeError(
                    f"{step.kind} {step.name!r}: initial weights from stage {ref!r}, which runs later; "
                    "a step can only start from a stage listed before it"
                )
        seen.append(step.name)


def _looks_like_name(value: str) -> bool:
    """Step names have no path separator, URL scheme or file suffix; anything else is a path."""
    return re.fullmatch(r"[A-Za-z0-9_-]+", value) is not None


# ----------------------------------------------------------------------------- resolving step configs


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
        merged[init_key] = str(recipe.export_path(source)) if _looks_like_name(source) else source
    merged.update({
        "output_dir": str(recipe.out_dir / step.name),
        "tracking.uri": tracking_uri,
        "tracking.experiment": experiment,
        "tracking.run_name": f"{recipe.name}.{step.name}",
        "tracking.parent_run_id": parent_run_id,
    })
    if step.kind == "stage":
        merged["stage"] = step.name
    return [f"{key}={_yaml_text(_substitute(recipe, value, f'{step.name}: {key}'))}" for key, value in merged.items()]


def _yaml_text(value: Any) -> str:
    """One-line YAML that load_config's override parsing turns back into `value` (8e-05 stays a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def _substitute(recipe: Recipe, value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_substitute(recipe, v, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        if match.group(2):
            return str(recipe.export_path(match.group(2)))
        found = getattr(recipe, match.group(1))
        if found is None:
            raise RecipeError(f"{where}: uses ${{{match.group(1)}}} but the recipe has none; pass {match.group(1)}=")
        return str(found)

    return _VAR.sub(lookup, value)


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
    if task not in INIT_KEYS:
        raise RecipeError(f"stage {step.name!r}: no default weights key for task {task!r}; add `init_key:` to it")
    return INIT_KEYS[task]


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


def fingerprint(cfg: Any) -> str:
    """Hash of a resolved step config, ignoring where it is tracked and how many workers run it."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in ("tracking", "scaling")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- state


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


def plan_lines(recipe: Recipe, configs: dict[str, Any]) -> list[str]:
    """Human-readable plan: one block per step with its task, model, length and weights source."""
    lines = [f"recipe {recipe.name}: {len(recipe.stages)} stage(s), {len(recipe.evals)} evaluation(s)",
             f"  out_dir  {recipe.out_dir}"]
    for i, step in enumerate(recipe.steps, 1):
        cfg = configs[step.name]
        weights = f"{init_key_of(step)} <- {step.init_from}" if step.init_from else "as configured"
        if step.kind == "stage":
            what = (f"task={cfg.task.name} model={cfg.model.name} steps={cfg.optim.max_steps} "
                    f"batch={cfg.data.batch_size}x{cfg.scaling.num_workers} workers ray={cfg.scaling.use_ray}")
        else:
            what = f"data={cfg.data.name} frames={cfg.data.num_frames} rerank_top_k={cfg.scoring.rerank_top_k}"
        lines.append(f"  {i}. {step.kind:5s} {step.name:12s} {what}")
        lines.append(f"     config {step.config}; weights {weights}; output {recipe.out_dir / step.name}")
    return lines


# ----------------------------------------------------------------------------- running


@dataclass
class RecipeResult:
    parent_run_id: str | None
    tracking_uri: str
    experiment: str
    steps: dict[str, dict[str, Any]]
    """Per step: the completion record (run_id, export, metrics, ...); empty for a dry run."""
    skipped: list[str] = field(default_factory=list)
    """Steps found complete from an earlier execution and not run again."""


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

    parent = _ParentRun(uri, experiment)
    state.parent_run_id = parent.start(recipe, state.parent_run_id)
    state.save()
    log(f"MLflow parent run {state.parent_run_id} in experiment {experiment!r} ({uri})")
    skipped: list[str] = []
    status = "FAILED"
    try:
        for step in recipe.steps:
            cfg = resolve_step_config(recipe, step, uri, experiment, state.parent_run_id)
            if _is_complete(step, state.steps.get(step.name), cfg, parent.client, log):
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
    export = Path(cfg.output_dir) / EXPORT_FILE
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


def _is_complete(step: StepSpec, record: dict[str, Any] | None, cfg: Any, client: Any,
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
        from mlflow.exceptions import MlflowException

        try:
            run_status = client.get_run(record["run_id"]).info.status
        except MlflowException:
            run_status = "missing"
        if run_status != "FINISHED":
            log(f"[{step.name}] recorded as done but its MLflow run is {run_status}; running it again")
            return False
    return True


def _check_init_exists(recipe: Recipe, step: StepSpec) -> None:
    source = step.init_from
    if source is None or "://" in source:
        return
    path = recipe.export_path(source) if _looks_like_name(source) else Path(source)
    if not path.is_file():
        raise RecipeError(f"{step.kind} {step.name!r}: initial weights {path} do not exist")


class _ParentRun:
    """The recipe execution's MLflow run: created once, reopened by every rerun of the same out_dir."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.uri, self.experiment = uri, experiment
        self.run_id: str | None = None

    def start(self, recipe: Recipe, run_id: str | None) -> str:
        from mlflow.exceptions import MlflowException

        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except MlflowException as err:
                raise RecipeError(
                    f"{recipe.out_dir / STATE_FILE} names parent run {run_id}, which the tracking store {self.uri} "
                    "does not have; use the store of the first execution or a new out_dir="
                ) from err
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        from pipeline.tracking import git_sha

        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        tags = {"recipe": recipe.name, "out_dir": str(recipe.out_dir)}
        if sha := git_sha(Path(__file__).parent):
            tags["git_sha"] = sha
        run = self.client.create_run(experiment_id, run_name=recipe.name, tags=tags)
        self.run_id = run.info.run_id
        self.client.log_param(self.run_id, "steps", ",".join(s.name for s in recipe.steps))
        self.client.log_text(self.run_id, recipe_yaml(recipe), "recipe.yaml")
        return self.run_id

    def log_step_metrics(self, step: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, f"{step}/{key}", value)

    def end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as resolved (overrides applied), for the parent run's artifacts."""
    def step(s: StepSpec) -> dict[str, Any]:
        return {"name": s.name, "config": str(s.config), "from": s.init_from, "init_key": s.init_key,
                "overrides": s.overrides}

    data = {"name": recipe.name, "out_dir": str(recipe.out_dir), "data_root": str(recipe.data_root),
            "experiment": recipe.experiment, "settings": recipe.settings,
            "stages": [step(s) for s in recipe.stages], "evals": [step(s) for s in recipe.evals]}
    return yaml.safe_dump(data, sort_keys=False)


def recorded_result(recipe: Recipe) -> RecipeResult:
    """What an earlier execution of `recipe` (same out_dir) recorded, without running anything."""
    state = RecipeState.load(recipe.out_dir)
    if state.parent_run_id is None:
        raise RecipeError(f"{recipe.out_dir / STATE_FILE} does not exist: this recipe has not run with this out_dir")
    uri, experiment = default_tracking(recipe)
    return RecipeResult(state.parent_run_id, uri, experiment, dict(state.steps))


def chance_recall(k: int, num_videos: float) -> float:
    """Chance R@k in percent: k / number of videos in both directions (for v2t with c captions per video among
    T texts, about c*k/T = k/videos)."""
    return min(100.0, 100.0 * k / num_videos)


def retrieval_results(recipe: Recipe, steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{eval name: recalls, ranks, num_videos, num_texts, chance_r1/5/10, run_id, checkpoint} of the recipe's
    finished evaluations, from their completion records."""
    results = {}
    for step in recipe.evals:
        record = steps.get(step.name)
        if not record or record.get("status") != "done":
            continue
        metrics = record["metrics"]
        entry: dict[str, Any] = {k: v for k, v in metrics.items() if re.fullmatch(r"(t2v|v2t)_\w+", k)}
        entry["num_videos"], entry["num_texts"] = int(metrics["videos"]), int(metrics["texts"])
        entry.update({f"chance_r{k}": chance_recall(k, entry["num_videos"]) for k in (1, 5, 10)})
        entry.update(run_id=record.get("run_id"), checkpoint=record.get("checkpoint"))
        results[step.name] = entry
    return results


def write_retrieval_results(recipe: Recipe, steps: dict[str, dict[str, Any]]) -> Path:
    """Write `retrieval_results` to the recipe's results file (atomically) and return its path."""
    path = recipe.results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(retrieval_results(recipe, steps), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def summary_tables(result: RecipeResult) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the steps run, then (header, rows) of retrieval recalls beside chance level.

    Chance R@k (`chance_recall`) is shown when the evaluation reports its video count.
    """
    step_rows = [[name, rec["kind"], str(rec.get("run_id") or "-")[:12], f"{rec.get('seconds', 0):.0f}",
                  _format_loss(rec["metrics"])] for name, rec in result.steps.items()]
    step_header = ["step", "kind", "mlflow run", "seconds", "final loss"]
    ret_header = ["eval", "direction", "R@1", "R@5", "R@10", "chance R@1/5/10"]
    ret_rows = []
    for name, rec in result.steps.items():
        metrics = {k.rsplit("/", 1)[-1]: v for k, v in rec["metrics"].items()}
        pool = metrics.get("videos")
        for direction in ("t2v", "v2t"):
            if f"{direction}_r1" not in metrics:
                continue
            chance = "/".join(f"{chance_recall(k, pool):.1f}" for k in (1, 5, 10)) if pool else "-"
            ret_rows.append([name, direction] + [f"{metrics.get(f'{direction}_r{k}', float('nan')):.1f}"
                                                 for k in (1, 5, 10)] + [chance])
    return step_header, step_rows, ret_header, ret_rows


def _format_loss(metrics: dict[str, float]) -> str:
    losses = [v for k, v in metrics.items() if k == "loss" or k.endswith("/loss")]
    return f"{losses[0]:.4f}" if losses else "-"
