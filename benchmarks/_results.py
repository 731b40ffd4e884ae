"""Result files of every benchmark: `<stem>.json` (meta + rows, what the renderers read) and `<stem>.md`.

Every file's meta starts with the run's provenance: the UTC date and time, and the git commit of the code that ran
(`git rev-parse HEAD`, or BENCH_GIT_COMMIT where the tree runs from a copy without .git, as on the device machine).
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> dict[str, object]:
    """{"date", "git_commit", "git_dirty"} of this run; git_dirty is None where it cannot be told.

    BENCH_GIT_COMMIT wins over git: the device machine's copy of the tree carries the git data of the checkout its
    session started from, which can be older than the files that run there.
    """
    given = os.environ.get("BENCH_GIT_COMMIT")
    if given:
        return {"date": _now(), "git_commit": f"{given} (from BENCH_GIT_COMMIT)", "git_dirty": None}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"date": _now(), "git_commit": "unknown (no git, no BENCH_GIT_COMMIT)", "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"date": _now(), "git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_result_files(out_dir: Path, stem: str, meta: dict, rows: list[dict], columns: list[str],
                       header: list[str], footer: list[str] = ()) -> None:  # fmt: skip
    """Write `<stem>.json` (provenance, then `meta`, then rows) and `<stem>.md` (header lines, a table of
    `columns`, footer lines) and print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(), **meta}
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [*header, "", f"{meta['date']}, commit {meta['git_commit']}.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", *footer] if footer else []
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def run_meta(packages: tuple[str, ...] = ()) -> dict:
    """When and where a CPU benchmark ran: `provenance()`, host CPU, core count, Python, package versions."""
    import importlib.metadata
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())  # fmt: skip
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {**provenance(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": versions}


