"""The repository stands alone: no shipped file points at notes that do not ship with it, every `docs/*.md` a file
names exists, and every relative link in README.md and docs/ resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

# Folders a checkout may hold that are not part of it (used only where git cannot list the files).
_NOT_SHIPPED = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "outputs", "demo_out",
                "build", "dist", ".cache", ".whl"}
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".sh", ".toml", ".cfg", ".ini", ".json", ".in", ""}

# Notes that lived beside the repository while it was written; citing them leaves a reader with nothing to open.
_OUTSIDE_NOTES = ("videomamba.md", "stack.md", "gpu-baseline.md", "ecosystem.md", "DESIGN.md", "STYLE.md",
                  "KINDS.md")
_OUTSIDE = re.compile(r"\.\./shared\b|(?<![\w-])reference/[\w.-]+\.md|(?<![\w.])\.library\b|(?<![\w/.-])("
                      + "|".join(re.escape(n) for n in _OUTSIDE_NOTES) + r")(?![\w-])")
_DOCS_FILE = re.compile(r"(?<![\w/.-])docs/[\w./-]*?\.md(?![\w-])")
_LINK = re.compile(r"\[[^\]\n]+\]\(([^()\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _shipped_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        names = out.splitlines()
    except (OSError, subprocess.SubprocessError):
        names = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
                 if p.is_file() and not _NOT_SHIPPED & set(p.relative_to(REPO).parts)]
    return sorted(n for n in names if (REPO / n).is_file())


SHIPPED = _shipped_files()


def _text_files() -> list[str]:
    return [n for n in SHIPPED if Path(n).suffix in _TEXT_SUFFIXES and n != THIS
            and (REPO / n).stat().st_size < 2_000_000]


def _read(name: str) -> str | None:
    try:
        return (REPO / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def _hits(pattern: re.Pattern, keep=lambda match: True) -> list[str]:
    found = []
    for name in _text_files():
        text = _read(name)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            found += [f"{name}:{number}: {m.group(0)}" for m in pattern.finditer(line) if keep(m)]
    return found


def test_the_file_list_is_the_repository():
    assert {"README.md", "pyproject.toml", THIS} <= set(SHIPPED) and len(_text_files()) > 100


def test_no_file_points_at_notes_outside_the_repository():
    shipped_names = {Path(n).name for n in SHIPPED}
    # A bare note name is fine once a file of that name ships (then the mention has something to point at).
    hits = _hits(_OUTSIDE, keep=lambda m: m.group(1) is None or m.group(1) not in shipped_names)
    assert not hits, ("these mentions point at files that do not ship; state the fact in the comment or move it "
                      "into docs/ and point there:\n" + "\n".join(hits))


def test_every_docs_page_named_exists():
    hits = _hits(_DOCS_FILE, keep=lambda m: not (REPO / m.group(0)).is_file())
    assert not hits, "these name a docs/ page that does not exist:\n" + "\n".join(hits)


def _markdown_pages() -> list[str]:
    return [n for n in SHIPPED if n == "README.md" or (n.startswith("docs/") and n.endswith(".md"))]


@pytest.mark.parametrize("page", _markdown_pages())
def test_relative_links_resolve(page):
    text = _CODE_SPAN.sub("", _FENCE.sub("", (REPO / page).read_text(encoding="utf-8")))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not ((REPO / page).parent / path).exists():
            broken.append(target)
    assert not broken, f"{page}: links to missing files: {broken}"


def test_the_checks_catch_what_they_look_for():
    """Each pattern matches the kind of mention it exists for, and leaves alone what is legitimate."""
    note = "videomamba" + ".md"
    assert _OUTSIDE.search(f"(see {note} §4.2)").group(1) == note
    assert _OUTSIDE.search("in ../" + "shared/notes") and _OUTSIDE.search("reference/" + "stack.md §5")
    assert not _OUTSIDE.search("mounted at /shared/runs; benchmarks/results/model.md; docs/model.md")
    assert _DOCS_FILE.findall("see docs/install.md, docs/history/x-y.md.") == ["docs/install.md",
                                                                              "docs/history/x-y.md"]
    assert _LINK.findall("[a](docs/x.md) `[b](c.md)` [d](https://e.org/f.md)") == ["docs/x.md", "c.md",
                                                                                   "https://e.org/f.md"]
