"""YAML reading for configs: plain numbers remember how they were written, and errors name the file and line.

The typing rule for `str` fields (`pipeline.config`): a string field takes the text of a plain scalar as it was
written. YAML resolves `run_name: 20241201` to an int and `tag: 1.50` to a float; the schema knows these fields
are strings, so they become `"20241201"` and `"1.50"` (not `"1.5"`, not the octal `010` = 8) both in YAML files
and in `key=value` overrides. That is only possible because the loader keeps the source text of every plain int
and float (`SourcedInt`, `SourcedFloat`; plain `int`/`float` for everything else). Dates are read as text (no
config field is a date, and `2024-12-01` is a typical run name). Booleans and null are not numbers: `yes`,
`off`, `null` in a string field stay errors (quote them), since reading `null` as the text "null" would turn an
intended "unset" into a name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class SourcedInt(int):
    """An int read from a plain YAML scalar; `source` is the text it was written as."""

    source: str


class SourcedFloat(float):
    """A float read from a plain YAML scalar; `source` is the text it was written as."""

    source: str


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader whose ints and floats keep their source text and whose dates stay strings."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _sourced(kind: type, construct):
    def constructor(loader: ConfigLoader, node: yaml.ScalarNode) -> Any:
        value = kind(construct(loader, node))
        value.source = node.value
        return value

    return constructor


ConfigLoader.add_constructor("tag:yaml.org,2002:int", _sourced(SourcedInt, yaml.SafeLoader.construct_yaml_int))
ConfigLoader.add_constructor("tag:yaml.org,2002:float", _sourced(SourcedFloat, yaml.SafeLoader.construct_yaml_float))
# A raw tree dumped again (a recipe's resolved overrides, its logged recipe.yaml) writes the numbers as they came.
yaml.add_representer(SourcedInt, lambda d, v: d.represent_scalar("tag:yaml.org,2002:int", v.source), yaml.SafeDumper)
yaml.add_representer(SourcedFloat, lambda d, v: d.represent_scalar("tag:yaml.org,2002:float", v.source),
                     yaml.SafeDumper)


class YamlSyntaxError(ValueError):
    """Text that is not valid YAML; the message names where (file, line, column) and what the parser expected."""


def _describe(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    parts = [getattr(err, "problem", None), getattr(err, "context", None)]
    return where + ("; ".join(p for p in parts if p) or str(err))


def load_yaml_file(path: Path) -> Any:
    """The YAML document in `path`; YamlSyntaxError naming the file and the line when it does not parse."""
    try:
        return yaml.load(path.read_text(), Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise YamlSyntaxError(f"{path}: not valid YAML ({_describe(err)})") from None


def parse_value(text: str) -> Any:
    """An override's value (`lr=1e-3`, `x=[1,2]`, `run_name=20241201`) read like a YAML file's scalar."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise YamlSyntaxError(f"not valid YAML ({_describe(err)}); quote the value if it is text") from None


def plain(value: Any) -> Any:
    """`value` with SourcedInt / SourcedFloat turned back into int / float, through nested mappings and lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, SourcedInt):
        return int(value)
    if isinstance(value, SourcedFloat):
        return float(value)
    return value
