"""Recipe files: the `Recipe` and its steps, loading and overrides, step references and `${...}` variables.

The format is in `pipeline/recipe/__init__.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.checkpointing.layout import stage_export_path
from pipeline.config import ConfigError, flatten, load_yaml_tree, require_local_folder
from pipeline.redaction import redact

RESULTS_FILE = "retrieval.json"

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
    """Config key that receives `init_from`; None = the task's `TaskSpec.init_key` (stages) or model.checkpoint
    (evals)."""


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
        return Path(substitute(self, self.results_file, "results_file")).expanduser().resolve()

    def export_path(self, step_name: str) -> Path:
        """Where the stage named `step_name` leaves its weights (docs/architecture.md, Stage exports)."""
        return stage_export_path(self.out_dir / step_name)


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
        out_dir=Path(require_local_folder("out_dir", str(raw.get("out_dir") or f"outputs/{name}"))),
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
        recipe.out_dir = Path(require_local_folder("out_dir", str(value)))
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
        refs = [step.init_from] if step.init_from and looks_like_name(step.init_from) else []
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


def looks_like_name(value: str) -> bool:
    """Step names have no path separator, URL scheme or file suffix; anything else is a path."""
    return re.fullmatch(r"[A-Za-z0-9_-]+", value) is not None


def substitute(recipe: Recipe, value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [substitute(recipe, v, where) for v in value]
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


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as resolved (overrides applied), credentials masked, for the parent run's artifacts."""
    def step(s: StepSpec) -> dict[str, Any]:
        return {"name": s.name, "config": str(s.config), "from": s.init_from, "init_key": s.init_key,
                "overrides": s.overrides}

    data = {"name": recipe.name, "out_dir": str(recipe.out_dir), "data_root": str(recipe.data_root),
            "experiment": recipe.experiment, "settings": recipe.settings,
            "stages": [step(s) for s in recipe.stages], "evals": [step(s) for s in recipe.evals]}
    return yaml.safe_dump(redact(data), sort_keys=False)
