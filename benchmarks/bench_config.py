"""Configs: today's dataclasses + hand-written coercion against a pydantic v2 prototype of the same sections.

The prototype (benchmarks/config_pydantic_prototype.py) covers data (+ mask, augment), optim, scaling, tracking,
checkpoint and the task union (toy, masked_alignment, video_text). Both systems validate the same raw trees: every
stage config under configs/stages/ and every stage step of configs/recipes/ (the step's resolved overrides
applied), cut to those sections. Measured side by side:
- validation time per config (median over passes) and, for context, today's whole `load_config` and the shared
  YAML read (includes + overrides), which pydantic does not replace;
- import time in a fresh interpreter;
- that both produce the same values on every tree;
- code lines for the same fields (docstrings, blank and comment lines excluded), and for the machinery each needs;
- the outcome and message text of a fixed list of bad (and tricky good) inputs, for today's loader, pydantic's
  own message, and pydantic's errors put into today's phrasing by the prototype's adapter.

    PYTHONPATH=. python benchmarks/bench_config.py [--passes 20]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import config_pydantic_prototype as proto
from _results import RESULTS, run_meta, write_result_files
from pydantic import ValidationError

from pipeline import config as dc
from pipeline.config import ConfigError, from_dict, load_config, load_yaml_tree
from pipeline.recipe.resolve import init_key_of, step_overrides
from pipeline.recipe.spec import load_recipe
from pipeline.tasks import task_spec

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-hunter2-value"
DC_SECTIONS = {"data": dc.DataConfig, "optim": dc.OptimConfig, "scaling": dc.ScalingConfig,
               "tracking": dc.TrackingConfig, "checkpoint": dc.CheckpointConfig}

# (id, what it tests, overrides or {"file": yaml text}, accepted value to check or None = must be refused,
#  the key the message must name, whether a close-key suggestion is expected)
CASES: list[tuple[str, str, Any, Any, str, bool]] = [
    ("unknown key", "misspelt key, suggestion", ["optim.lrr=0.1"], None, "optim.lrr", True),
    ("nested unknown key", "misspelt key two levels down in a task section",
     ["task.name=masked_alignment", "task.teacher.model_nme=ViT-B-16"], None, "task.teacher.model_nme", True),
    ("nested unknown key (data.mask)", "misspelt key in a nested section", ["data.mask.typ=tube"], None,
     "data.mask.typ", True),
    ("wrong type", "text for an integer", ["data.batch_size=eight"], None, "data.batch_size", False),
    ("out of range (int)", "batch size 0", ["data.batch_size=0"], None, "data.batch_size", False),
    ("out of range (float)", "negative learning rate", ["optim.lr=-1e-3"], None, "optim.lr", False),
    ("cross-field range", "warmup longer than the run", ["optim.warmup_steps=200"], None, "optim.warmup_steps",
     False),
    ("betas=[0.9]", "one beta instead of two", ["optim.betas=[0.9]"], None, "optim.betas", False),
    ("run_name=20241201", "a number for a text field, kept as written", ["tracking.run_name=20241201"],
     ("tracking", "run_name", "20241201"), "tracking.run_name", False),
    ("run_name=010", "leading zero kept (not octal 8)", ["tracking.run_name=010"], ("tracking", "run_name", "010"),
     "tracking.run_name", False),
    ("run_name=yes", "YAML boolean for a text field", ["tracking.run_name=yes"], None, "tracking.run_name", False),
    ("lr=1e-3", "YAML 1.1 reads 1e-3 as text; a float field takes it", ["optim.lr=1e-3"], ("optim", "lr", 1e-3),
     "optim.lr", False),
    ("bool field given 1", "1 for true", ["data.flip=1"], None, "data.flip", False),
    ("int field given true", "true for an integer", ["data.batch_size=true"], None, "data.batch_size", False),
    ("literal auto/true/false given 1", "1 for true in a Literal['auto', True, False]", ["scaling.use_gpu=1"], None,
     "scaling.use_gpu", False),
    ("wrong literal", "a choice that does not exist", ["data.sampling=randm"], None, "data.sampling", False),
    ("unknown task", "task.name not registered", ["task.name=nope"], None, "task.name", False),
    ("misspelt section holding a secret", "the message must not print the credential",
     [f"checkpoint.storage_option.secret={SECRET}"], None, "checkpoint.storage_option", True),
    ("broken YAML file", "unclosed bracket in an included file",
     {"file": "optim:\n  lr: 0.1\n  betas: [0.9, 0.95\ndata: {batch_size: 4}\n"}, None, "line 4", False),
    ("broken override", "unclosed bracket on the command line", ["optim.betas=[0.9,"], None, "optim.betas", False),
]


# ----------------------------------------------------------------------------- the real configs


def real_trees() -> list[tuple[str, dict[str, Any]]]:
    """(name, raw tree) of every stage config and every recipe stage step, overrides applied."""
    trees = [(p.name, load_yaml_tree(p)) for p in sorted((REPO / "configs" / "stages").glob("*.yaml"))]
    with tempfile.TemporaryDirectory() as out:
        for path in sorted((REPO / "configs" / "recipes").glob("*.yaml")):
            recipe = load_recipe(path, [f"out_dir={out}"])
            for step in recipe.stages:
                overrides = step_overrides(recipe, step, f"sqlite:///{out}/mlflow.db", "bench", None,
                                           init_key_of(step))
                raw = load_yaml_tree(step.config)
                dc.apply_overrides(raw, overrides)
                trees.append((f"{path.stem}:{step.name}", dc._interpolate_env(raw)))
    return trees


def compared_part(tree: dict[str, Any]) -> dict[str, Any]:
    """The sections both systems validate; the task only when the prototype has its config."""
    part = {k: tree[k] for k in proto.SECTIONS if k in tree}
    if part.get("task", {}).get("name") not in proto.TASKS:
        part.pop("task", None)
    return part


def validate_dataclasses(part: dict[str, Any]) -> dict[str, Any]:
    out = {name: from_dict(cls, part.get(name) or {}, name) for name, cls in DC_SECTIONS.items()}
    if "task" in part:
        out["task"] = from_dict(dc.TaskConfig, part["task"], "task")
    return out


def validate_dataclasses_uncached(part: dict[str, Any]) -> dict[str, Any]:
    """As before the type-hint cache: every class's string annotations resolved again for each config."""
    dc._schema.cache_clear()
    return validate_dataclasses(part)


def validate_pydantic(part: dict[str, Any]) -> proto.SubsetConfig:
    return proto.SubsetConfig.model_validate(part)


def same_values(part: dict[str, Any]) -> bool:
    ours = {k: dataclasses.asdict(v) for k, v in validate_dataclasses(part).items()}
    theirs = proto.worker_dict(validate_pydantic(part))
    if theirs["task"] is None:
        del theirs["task"]
    theirs["checkpoint"]["storage_options"] = {k: v for k, v in theirs["checkpoint"]["storage_options"].items()
                                               if v is not None}  # the typed secret slots default to None
    return ours == theirs


def per_item_us(jobs: dict[str, tuple[Callable[[Any], Any], list[Any]]], passes: int) -> dict[str, float]:
    """name -> median over `passes` of one pass of `fn` over its items, per item, in microseconds. The jobs take
    turns within each pass, so a busy shared machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(passes):
        for name, (fn, items) in jobs.items():
            start = time.perf_counter()
            for item in items:
                fn(item)
            times[name].append((time.perf_counter() - start) / len(items) * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def import_ms(codes: dict[str, str], runs: int = 7) -> dict[str, float]:
    """name -> median wall time of its code in a fresh interpreter, measured inside it (interpreter start excluded);
    the codes take turns."""
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'benchmarks'}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    samples: dict[str, list[float]] = {name: [] for name in codes}
    for _ in range(runs):
        for name, code in codes.items():
            timed = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
            done = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, check=True, env=env)
            samples[name].append(float(done.stdout.strip().splitlines()[-1]) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


# ----------------------------------------------------------------------------- lines of code


def code_lines(objects: list[Any]) -> int:
    """Lines of the definitions of `objects` that are code: not blank, not comments, not docstrings."""
    total = 0
    for obj in objects:
        source = textwrap.dedent(inspect.getsource(obj))
        doc_lines = {n for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Expr)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for n in range(node.lineno, node.end_lineno + 1)}
        total += sum(1 for i, line in enumerate(source.splitlines(), 1)
                     if line.strip() and not line.strip().startswith("#") and i not in doc_lines)
    return total


def assignment_lines(module: Any, names: set[str]) -> int:
    """Lines of the module-level assignments of `names` (type aliases, tables, patterns)."""
    tree = ast.parse(inspect.getsource(module))
    return sum(node.end_lineno - node.lineno + 1 for node in tree.body if isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id in names for t in node.targets))


def dataclass_validation_lines(classes: list[type]) -> int:
    """Field declarations and `__post_init__` checks of `classes` (their other methods build things, not checks)."""
    total = 0
    for cls in classes:
        node = ast.parse(inspect.getsource(cls)).body[0]
        methods = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name != "__post_init__"]
        total += code_lines([cls]) - sum(code_lines([getattr(cls, m.name)]) for m in methods)
    return total


def line_counts() -> dict[str, Any]:
    task_classes = [task_spec(name).config for name in proto.TASKS]
    from pipeline.tasks.clip_teacher import CLIPTeacherConfig
    from pipeline.tasks.video_text import TextTowerConfig

    dc_classes = [dc.MaskConfig, dc.AugmentConfig, *DC_SECTIONS.values(), CLIPTeacherConfig, TextTowerConfig,
                  *task_classes]
    proto_classes = [proto.MaskConfig, proto.AugmentConfig, proto.DataConfig, proto.OptimConfig, proto.ScalingConfig,
                     proto.TrackingConfig, proto.CheckpointConfig, proto.StorageOptions, proto.CLIPTeacherConfig,
                     proto.TextTowerConfig, proto.ToyTaskConfig, proto.MaskedAlignmentConfig, proto.VideoTextConfig,
                     proto.Section, proto.SubsetConfig]
    dc_fields = sum(len(dataclasses.fields(c)) for c in dc_classes) - len(task_classes)  # `name` is inherited
    proto_fields = sum(len(c.model_fields) for c in proto_classes if c not in (proto.Section, proto.SubsetConfig))
    proto_fields -= len(proto.StorageOptions.model_fields) + len(task_classes)  # secret slots, the `name` tags
    return {
        "fields": (dc_fields, proto_fields),
        "declarations": (dataclass_validation_lines(dc_classes) + code_lines([dc.require, dc._at_least])
                         + assignment_lines(dc, {"_RAND_AUGMENT"}),
                         code_lines(proto_classes) + assignment_lines(proto, {
                             "_RAND_AUGMENT", "Probability", "Count", "Positive", "Sampling", "TaskConfig"})),
        "coercion": code_lines([dc.from_dict, dc._schema, dc._task_config_class, dc._join, dc._coerce]),
        "custom_types": code_lines([proto._as_written, proto._number_text, proto.worker_dict])
        + assignment_lines(proto, {"Text", "Number"}),
        "adapter": code_lines([proto.pydantic_error_message, proto._expected, proto._key_of])
        + assignment_lines(proto, {"_BOUNDS", "_EXPECTED", "_MEMBERS"}),
    }


# ----------------------------------------------------------------------------- bad inputs


def outcome(load: Callable[[Path | None, list[str]], Any], overrides: Any, tmp: Path) -> tuple[Any, str | None]:
    """(the loaded config, None) or (None, the error message)."""
    path = None
    if isinstance(overrides, dict):
        (tmp / "base.yaml").write_text(overrides["file"])
        path = tmp / "stage.yaml"
        path.write_text("defaults: [base.yaml]\n")
        overrides = []
    try:
        return load(path, overrides), None
    except (ConfigError, ValidationError) as err:
        return None, str(err).replace(str(tmp), "<tmp>")


def value_at(cfg: Any, section: str, key: str) -> Any:
    return getattr(getattr(cfg, section), key)


def judge(case: tuple, cfg: Any, message: str | None) -> dict[str, Any]:
    _, _, _, accepted, key, suggest = case
    if accepted is not None:
        ok = cfg is not None and value_at(cfg, accepted[0], accepted[1]) == accepted[2]
        return {"as_today": ok, "message": message, "accepted": repr(value_at(cfg, *accepted[:2])) if cfg else None}
    return {"as_today": cfg is None, "message": message, "names_key": message is not None and key in message,
            "one_line": message is not None and "\n" not in message,
            "suggests": (message is not None and "did you mean" in message) if suggest else None,
            "prints_secret": message is not None and SECRET in message}


def run_cases() -> list[dict[str, Any]]:
    systems = {
        "dataclasses": load_config,
        "pydantic": lambda path, ov: proto.load_subset(path, ov, translate=False),
        "pydantic_adapter": lambda path, ov: proto.load_subset(path, ov, translate=True),
    }
    rows = []
    for case in CASES:
        row = {"case": case[0], "what": case[1], "input": case[2] if not isinstance(case[2], dict) else case[2]}
        for system, load in systems.items():
            with tempfile.TemporaryDirectory() as tmp:
                row[system] = judge(case, *outcome(load, case[2], Path(tmp)))
        rows.append(row)
    return rows


def tally(cases: list[dict[str, Any]], system: str, check: str) -> str:
    values = [c[system][check] for c in cases if c[system].get(check) is not None]
    good = sum(bool(v) for v in values)
    return f"{good}/{len(values)}"


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    trees = real_trees()
    parts = [compared_part(tree) for _, tree in trees]
    with_task = sum("task" in p for p in parts)
    equal = sum(same_values(p) for p in parts)
    stage_files = sorted((REPO / "configs" / "stages").glob("*.yaml"))
    times = per_item_us({"dataclasses": (validate_dataclasses, parts), "pydantic": (validate_pydantic, parts),
                         "uncached": (validate_dataclasses_uncached, parts),
                         "yaml": (load_yaml_tree, stage_files), "load_config": (load_config, stage_files)}, args.passes)
    imports = import_ms({
        "pipeline.config": "import pipeline.config",
        "pydantic": "import pydantic",
        "prototype_after_pipeline_config":
            "import pipeline.config; t = time.perf_counter(); import config_pydantic_prototype",
    })
    lines = line_counts()
    cases = run_cases()

    def row(measure: str, today: Any, pydantic: Any, adapted: Any) -> dict[str, Any]:
        return {"measure": measure, "dataclasses (today)": today, "pydantic v2": pydantic,
                "pydantic v2 + message adapter": adapted}

    rows = [
        row(f"validate the compared sections, µs per config ({len(parts)} configs, {with_task} with a task)",
            times["dataclasses"], times["pydantic"], times["pydantic"]),
        row("the same, type hints resolved per config (the dataclasses before their cache)", times["uncached"], "-",
            "-"),
        row("same values as the dataclasses on every config", "-", f"{equal}/{len(parts)}", f"{equal}/{len(parts)}"),
        row("shared by both: YAML + includes, µs per stage file", times["yaml"], times["yaml"], times["yaml"]),
        row("today's whole load_config (all sections), µs per stage file", times["load_config"], "-", "-"),
        row("import in a fresh interpreter, ms (pydantic: the prototype after pipeline.config)",
            imports["pipeline.config"], imports["prototype_after_pipeline_config"],
            imports["prototype_after_pipeline_config"]),
        row("fields expressed", lines["fields"][0], lines["fields"][1], lines["fields"][1]),
        row("code lines: fields + checks (docstrings excluded)", lines["declarations"][0], lines["declarations"][1],
            lines["declarations"][1]),
        row("code lines: machinery (coercion; YAML-rule types + secret unwrap; + message adapter)",
            lines["coercion"], lines["custom_types"], lines["custom_types"] + lines["adapter"]),
        row("inputs handled as today (accepted/refused)", tally(cases, "dataclasses", "as_today"),
            tally(cases, "pydantic", "as_today"), tally(cases, "pydantic_adapter", "as_today")),
        row("refusals naming the key as written", tally(cases, "dataclasses", "names_key"),
            tally(cases, "pydantic", "names_key"), tally(cases, "pydantic_adapter", "names_key")),
        row("refusals in one line", tally(cases, "dataclasses", "one_line"), tally(cases, "pydantic", "one_line"),
            tally(cases, "pydantic_adapter", "one_line")),
        row("unknown keys with a suggestion", tally(cases, "dataclasses", "suggests"),
            tally(cases, "pydantic", "suggests"), tally(cases, "pydantic_adapter", "suggests")),
        row("refusals printing the secret", tally(cases, "dataclasses", "prints_secret"),
            tally(cases, "pydantic", "prints_secret"), tally(cases, "pydantic_adapter", "prints_secret")),
    ]
    meta = {**run_meta(("pydantic", "pydantic_core", "PyYAML")), "passes": args.passes, "configs": len(parts),
            "imports_ms": imports, "pydantic_import_alone_ms": imports["pydantic"], "cases": cases}
    columns = list(rows[0])
    header = ["# Configs: dataclasses + hand-written coercion vs a pydantic v2 prototype",
              "", "`benchmarks/bench_config.py` (prototype: `benchmarks/config_pydantic_prototype.py`). Sections "
              "compared: data (+ mask, augment), optim, scaling, tracking, checkpoint, task (toy, masked_alignment, "
              "video_text). "
              f"Machine: {meta['cpu']}, {meta['cores']} cores (shared), Python {meta['python']}, pydantic "
              f"{meta['versions']['pydantic']}. `import pydantic` alone: {imports['pydantic']:.0f} ms (Ray and "
              "DeepSpeed import it in every worker anyway)."]
    footer = ["## The messages, as each system prints them", "",
              "| case | input | dataclasses (today) | pydantic v2 | pydantic v2 + adapter |", "|---|---|---|---|---|"]
    for case in cases:
        cells = [_message_cell(case[s]) for s in ("dataclasses", "pydantic", "pydantic_adapter")]
        footer.append(f"| {case['case']} | `{_input_text(case['input'])}` | " + " | ".join(cells) + " |")
    write_result_files(args.out, "config", meta, rows, columns, header, footer)


def _input_text(value: Any) -> str:
    return ("file: " + value["file"].replace("\n", " ⏎ ")) if isinstance(value, dict) else " ".join(value)


def _message_cell(result: dict[str, Any]) -> str:
    if result["message"] is None:
        return f"accepted: {result.get('accepted')}"
    return result["message"].replace("|", "\\|").replace("\n", " ⏎ ")


if __name__ == "__main__":
    main()
