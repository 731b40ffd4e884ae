"""Put MLflow runs side by side: a terminal table and a PNG of loss curves and retrieval bars.

The table has one column per run and one row per field: the parameters whose values differ between
the runs (identical ones say nothing), then the selected metrics (their final values). Metric
selection uses shell-style patterns (`*t2v_r1`, `loss`), so stage runs, evaluation runs and the
recipe's parent run can be compared with one command.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Final loss, retrieval recall at 1/5/10 (both directions, any dataset prefix), median/mean rank, throughput.
DEFAULT_METRICS = (
    "loss",
    "*/loss",
    "*t2v_r1",
    "*t2v_r5",
    "*t2v_r10",
    "*v2t_r1",
    "*v2t_r5",
    "*v2t_r10",
    "*clips_per_s*",
)
LOSS_PATTERNS = ("loss", "*/loss", "train/loss")
RETRIEVAL_PATTERNS = ("*t2v_r1", "*t2v_r5", "*t2v_r10", "*v2t_r1", "*v2t_r5", "*v2t_r10")


@dataclass
class RunSummary:
    """What the comparison needs from one MLflow run."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    parent_run_id: str | None


def select_runs(
    tracking_uri: str,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    parent_run_id: str | None = None,
    max_runs: int = 20,
) -> list[RunSummary]:
    """Runs by id (in the given order), or the newest runs of an experiment / children of a parent run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException as err:
                raise ValueError(f"--runs: no run {run_id!r} in the tracking store {tracking_uri}") from err
    else:
        if experiment is None:
            raise ValueError("give --experiment NAME or --runs ID ... to choose the runs to compare")
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"--experiment: no experiment {experiment!r} in {tracking_uri}; existing: {names}")
        filter_string = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
        runs = client.search_runs(
            [found.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"],
            max_results=max_runs,
        )
        runs = list(reversed(runs))  # oldest first reads like the recipe's stage order
    return [
        RunSummary(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id[:8],
            status=run.info.status,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            parent_run_id=run.data.tags.get("mlflow.parentRunId"),
        )
        for run in runs
    ]


def matching_metrics(runs: Sequence[RunSummary], patterns: Sequence[str]) -> list[str]:
    """Metric names present in any run that match a pattern, in pattern order, then name order."""
    present = sorted({name for run in runs for name in run.metrics})
    chosen: list[str] = []
    for pattern in patterns:
        for name in present:
            if fnmatch.fnmatchcase(name, pattern) and name not in chosen:
                chosen.append(name)
    return chosen


def differing_params(runs: Sequence[RunSummary]) -> list[str]:
    """Parameter names whose value is not the same in every run (a missing param counts as a value)."""
    names = sorted({name for run in runs for name in run.params})
    return [name for name in names if len({run.params.get(name) for run in runs}) > 1]


def comparison_rows(
    runs: Sequence[RunSummary], metric_patterns: Sequence[str] = DEFAULT_METRICS, max_params: int = 30
) -> tuple[list[str], list[list[str]]]:
    """Header (one column per run) and rows: run ids, status, differing params, selected metrics."""
    header = ["field"] + [run.name for run in runs]
    rows = [["run_id"] + [run.run_id[:12] for run in runs], ["status"] + [run.status for run in runs]]
    params = differing_params(runs)
    for name in params[:max_params]:
        rows.append([f"param {name}"] + [_short(run.params.get(name, "-")) for run in runs])
    if len(params) > max_params:
        rows.append([f"({len(params) - max_params} more differing params)"] + [""] * len(runs))
    for name in matching_metrics(runs, metric_patterns):
        rows.append([name] + [_format_number(run.metrics.get(name)) for run in runs])
    return header, rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain fixed-width text table (first column left-aligned, values right-aligned)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def plot_runs(runs: Sequence[RunSummary], tracking_uri: str, path: str | Path) -> Path:
    """Write a PNG: loss curves of every run that logged one (left), retrieval recalls as bars (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt
    import numpy as np
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    fig, (ax_loss, ax_ret) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run in runs:
        for name in matching_metrics([run], LOSS_PATTERNS)[:1]:
            history = sorted(client.get_metric_history(run.run_id, name), key=lambda m: m.step)
            ax_loss.plot([m.step for m in history], [m.value for m in history], label=f"{run.name} ({name})")
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss metric logged", ha="center", transform=ax_loss.transAxes)

    retrieval_runs = [run for run in runs if matching_metrics([run], RETRIEVAL_PATTERNS)]
    names = matching_metrics(retrieval_runs, RETRIEVAL_PATTERNS)
    if names:
        x = np.arange(len(names))
        width = 0.8 / len(retrieval_runs)
        for i, run in enumerate(retrieval_runs):
            values = [run.metrics.get(name, 0.0) for name in names]
            ax_ret.bar(x + i * width - 0.4 + width / 2, values, width, label=run.name)
        ax_ret.set_xticks(x, [n.split("/")[-1] for n in names], rotation=30, fontsize=8)
        ax_ret.legend(fontsize=8)
    else:
        ax_ret.text(0.5, 0.5, "no retrieval metrics logged", ha="center", transform=ax_ret.transAxes)
    ax_ret.set(title="zero-shot retrieval", ylabel="recall (%)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isfinite(value) and value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"
