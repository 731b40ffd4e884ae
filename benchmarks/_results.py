"""Result files of every benchmark: `<stem>.json` (meta + rows, what the README renderer reads) and `<stem>.md`."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result_files(out_dir: Path, stem: str, meta: dict, rows: list[dict], columns: list[str],
                       header: list[str], footer: list[str] = ()) -> None:  # fmt: skip
    """Write `<stem>.json` and `<stem>.md` (header lines, a table of `columns`, footer lines) and print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
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
    """When and where a benchmark ran: UTC date, git commit (or $BENCH_COMMIT), host CPU, Python, package versions."""
    import datetime
    import importlib.metadata
    import os
    import platform
    import subprocess

    commit = os.environ.get("BENCH_COMMIT")  # a copy of the tree without .git (a GPU machine) is told it
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())  # fmt: skip
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}  # fmt: skip
