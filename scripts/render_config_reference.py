"""Regenerate docs/config.md, the reference of every config key, from the config dataclasses; never by hand.

    .venv/bin/python scripts/render_config_reference.py           # rewrite docs/config.md
    .venv/bin/python scripts/render_config_reference.py --check   # exit 1 when stale (tests/unit/test_config_docs.py)

Every key of a training stage (`pipeline.config.Config`, one section per registered task) and of the two evaluation
jobs, with its type as the code writes it, its default and its docstring. Defaults are read off a default instance,
so a section that an evaluation builds differently (`scaling.use_ray` is false there) shows its own default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from typing import Any

import yaml
from generated_page import page_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PAGE = REPO / "docs" / "config.md"
COMMAND = ".venv/bin/python scripts/render_config_reference.py"


@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the reference."""

    key: str
    type: str
    default: str
    doc: str


@cache
def _source_facts(cls: type) -> dict[str, tuple[str, str]]:
    """field -> (annotation as written, docstring) of dataclass `cls` and its dataclass bases."""
    facts: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    else ""
                facts[node.target.id] = (ast.unparse(node.annotation), " ".join(str(doc).split()))
    return facts


def _default_text(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def keys_of(schema: type, prefix: str = "", skip: tuple[str, ...] = (), defaults: Any = None) -> list[Key]:
    """The rows of config dataclass `schema`, nested sections flattened to dotted keys; `skip` keys left out.

    Defaults come from the fields (a section's from its default instance, `defaults`); the top-level class is not
    instantiated, since some of them have no valid default (a classification task needs `num_classes`).
    """
    rows = []
    facts = _source_facts(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        if key in skip:
            continue
        if defaults is not None:
            value = getattr(defaults, field.name)
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = field.default
        if dataclasses.is_dataclass(value):
            rows += keys_of(type(value), f"{key}.", skip, value)
            continue
        annotation, doc = facts[field.name]
        default = "required" if value is dataclasses.MISSING else _default_text(value)
        rows.append(Key(key, annotation, default, doc))
    return rows


def _table(rows: list[Key]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in rows:
        cells = [f"`{row.key}`", f"`{row.type}`", f"`{row.default}`", row.doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _sectioned(rows: list[Key]) -> list[str]:
    """Top-level keys first, then one `###` table per section (the first part of the dotted key)."""
    lines = _table([r for r in rows if "." not in r.key])
    for section in dict.fromkeys(r.key.split(".")[0] for r in rows if "." in r.key):
        lines += ["", f"### `{section}`", "", *_table([r for r in rows if r.key.startswith(f"{section}.")])]
    return lines


def reference() -> dict[str, list[Key]]:
    """Title -> rows of every documented config: the stage config, each task's section, the evaluation jobs."""
    from pipeline.config import Config
    from pipeline.evaluation.cls_config import EvalClassificationConfig
    from pipeline.evaluation.config import EvalRetrievalConfig
    from pipeline.tasks import task_names, task_spec

    pages = {"stage": keys_of(Config)}
    for name in task_names():
        pages[f"task:{name}"] = keys_of(task_spec(name).config, "task.", skip=("task.name",))
    pages["eval_retrieval"] = keys_of(EvalRetrievalConfig)
    pages["eval_cls"] = keys_of(EvalClassificationConfig)
    return pages


def render_page() -> str:
    pages = reference()
    from pipeline.tasks import task_spec

    lines = [
        "# Config reference",
        "",
        f"<!-- generated by `{COMMAND}` from the config dataclasses: edit their fields and docstrings -->",
        "",
        "Every key the jobs take, with its type, default and meaning. A job reads `--config FILE` (YAML; its "
        "`defaults: [other.yaml, ...]` are merged underneath it, paths relative to the file), then `key.sub=value` "
        "overrides from the command line (values read as YAML); `${VAR}` and `${VAR:-default}` in strings come from "
        "the environment. An unknown key or a value of the wrong type or range stops the job before any worker "
        "starts, with a message naming the key, the value and what is allowed. A `str` key takes a plain number as "
        "written (`tracking.run_name=20241201`, `010`); `1` is not `true`. How this works and why it is dataclasses: "
        "[architecture.md](architecture.md), \"Configs\".",
        "",
        "## Training stages (`jobs/pretrain_mask.py`, `jobs/self_distill.py`, `jobs/pretrain_vtc.py`, "
        "`jobs/finetune_cls.py`, `jobs/train_toy.py`)",
        "",
        "`task.name` picks the task, and with it the keys of the `task` section (one table per task below).",
        "",
        *_sectioned(pages["stage"]),
    ]
    for title, rows in pages.items():
        if title.startswith("task:"):
            name = title.removeprefix("task:")
            spec = task_spec(name)
            lines += ["", f"### `task` with `task.name: {name}`", "",
                      f"`{spec.config.__module__}.{spec.config.__name__}`.", "", *_table(rows)]
    lines += ["", "## Retrieval evaluation (`jobs/eval_retrieval.py`)", "", *_sectioned(pages["eval_retrieval"]),
              "", "## Classification test (`jobs/eval_cls.py`)", "", *_sectioned(pages["eval_cls"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return page_main(__doc__, PAGE, render_page, COMMAND, REPO, argv)


if __name__ == "__main__":
    sys.exit(main())
