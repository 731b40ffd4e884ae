"""Class labels of classification shards: the class-index file and the mapping of listed labels to indices.

The class-index file is UTF-8 text with one class name per line; line i (counting from 0) names class i. The shard
writer puts it beside the shards as `classes.txt` whenever its input list has a `label` column, and training and
evaluation read the class count and names from it (`task.class_index`, `data.class_index`).

A listed label is a class name or an integer index. With a class-index file, names must be in it and indices below
its length. Without one, the classes are derived from the list: its sorted distinct names, or, when every label is
an integer, `"0" .. str(max)`. Splits written separately should share one file: pass the train split's
`classes.txt` when writing the others, or a held-out split missing a class would number the rest differently.
"""

from __future__ import annotations

import contextlib

import fsspec

from pipeline.data.urls import split_protocol
from pipeline.writes import disk_full_named

CLASS_INDEX_FILE = "classes.txt"


def read_class_index(url: str) -> list[str]:
    """Class names in index order from a class-index file (local path or fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"class-index file {url!r} does not exist; it is the classes.txt that "
                                "jobs/make_shards.py writes beside labelled shards (one class name per line)")
    with fs.open(path, "r", encoding="utf-8") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"class-index file {url!r} is empty; it needs one class name per line")
    empty = [i for i, name in enumerate(names) if not name]
    if empty:
        raise ValueError(f"class-index file {url!r}: line {empty[0] + 1} is empty; every class needs a name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"class-index file {url!r} names {duplicates} more than once")
    return names


def write_class_index(url: str, names: list[str]) -> None:
    """Write `names` one per line (index order); a full local disk is named (`pipeline.writes`)."""
    protocol, path = split_protocol(url)
    guard = disk_full_named(path, "class-index file", "--output") if protocol == "file" else contextlib.nullcontext()
    with guard, fsspec.open(url, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in names))


def _as_index(value: str | int) -> int | None:
    """The integer a label is, or None when it is a name."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def derive_class_names(values: list[str | int]) -> list[str]:
    """The classes of a list without a class-index file (module docstring): sorted names, or "0".."max"."""
    indices = [_as_index(v) for v in values]
    if all(i is not None for i in indices):
        return [str(i) for i in range(max(indices) + 1)]
    if any(i is not None for i in indices):
        raise ValueError("the list mixes integer labels and class names; use one kind, or pass a class-index file")
    return sorted({str(v).strip() for v in values})


def sample_label(meta: dict) -> int:
    """The class index in a labelled sample's json; ValueError unless it is an integer >= 0 (the reader then skips and
    counts the sample like any other bad one)."""
    label = meta["label"]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"json 'label' must be a class index (an integer >= 0), got {label!r}")
    return label


def resolve_label(value: str | int, class_names: list[str], where: str) -> tuple[int, str]:
    """(index, name) of a listed label; ValueError naming `where` when the class is unknown."""
    index = _as_index(value)
    if index is not None:
        if not 0 <= index < len(class_names):
            raise ValueError(f"{where}: label {index} is outside the {len(class_names)} classes of the class index")
        return index, class_names[index]
    name = str(value).strip()
    try:
        return class_names.index(name), name
    except ValueError:
        raise ValueError(f"{where}: label {name!r} is not in the class index ({len(class_names)} classes, e.g. "
                         f"{class_names[:3]})") from None
