"""docs/config.md is what scripts/render_config_reference.py makes of the config dataclasses now, and documents
every key: a field added, renamed or re-defaulted without regenerating the page fails here."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_config_reference",
                                                  REPO / "scripts" / "render_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


render = _renderer()


def test_config_reference_is_up_to_date():
    assert render.render_page() == (REPO / "docs" / "config.md").read_text(), (
        f"docs/config.md differs from the config dataclasses; run `{render.COMMAND}`"
    )


def test_every_key_has_a_docstring_and_the_loader_accepts_it():
    """Each documented key exists for the loader (an override of it with its default loads) and has a meaning."""
    from pipeline.config import load_config

    pages = render.reference()
    undocumented = [(page, row.key) for page, rows in pages.items() for row in rows if not row.doc]
    assert undocumented == [], f"config fields without a docstring: {undocumented}"
    keys = {row.key: row for row in pages["stage"]}
    assert {"optim.lr", "data.mask.ratio", "checkpoint.storage_options", "task.name"} <= set(keys)
    assert (keys["optim.betas"].type, keys["optim.betas"].default) == ("list[float]", "[0.9, 0.95]")
    cfg = load_config(None, ["task.name=toy", f"optim.lr={keys['optim.lr'].default}",
                             f"data.mask.type={keys['data.mask.type'].default}"])
    assert cfg.optim.lr == 1e-3 and cfg.data.mask.type == "none"


def test_defaults_come_from_each_config_not_the_section_class():
    """The evaluations build `scaling` with use_ray=False; training keeps the class default (true)."""
    pages = render.reference()
    use_ray = {page: next(r.default for r in rows if r.key == "scaling.use_ray") for page, rows in pages.items()
               if page in ("stage", "eval_retrieval", "eval_cls")}
    assert use_ray == {"stage": "true", "eval_retrieval": "false", "eval_cls": "false"}


def test_a_required_field_is_shown_as_required():
    @dataclasses.dataclass
    class Needs:
        path: str
        """Where it is."""
        level: int = 3
        """How much."""

    rows = render.keys_of(Needs)
    assert [(r.key, r.type, r.default, r.doc) for r in rows] == [("path", "str", "required", "Where it is."),
                                                                ("level", "int", "3", "How much.")]
