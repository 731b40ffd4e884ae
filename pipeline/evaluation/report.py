"""Evaluation results on disk and in MLflow: a JSON file and a markdown page per data set, an MLflow child run
(retrieval here; the classification test renders its own page, `cls_run.markdown_report`, through the same writer).

A result is a plain dict: `{"dataset", "checkpoint", "metrics": {t2v_r1, ..., [similarity/t2v_r1, ...]},
"protocol": {...}, "counts": {"videos", "texts", "skipped_videos"}, "skipped_videos": [...], "cache": {...},
"timing": {"<phase>_s": seconds, ..., "total_s"}}` (phases: `pipeline.evaluation.run.evaluate_on_rank`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import flatten

_COLUMNS = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("MdR", "medr"), ("MnR", "meanr"))
# Phases in the order an evaluation runs them (the JSON report sorts its keys by name).
_PHASE_ORDER = ("setup", "model_load", "video_decode", "video_forward", "text_forward", "vtm_rerank_decode",
                "vtm_rerank_forward", "scoring")


def markdown_table(result: dict[str, Any]) -> str:
    """A small markdown page: the metrics table for both directions, then the protocol it was measured with."""
    metrics, protocol, counts = result["metrics"], result["protocol"], result["counts"]
    lines = [
        f"## Zero-shot retrieval: {result['dataset']}",
        "",
        f"Checkpoint: `{result['checkpoint']}`  ",
        f"Videos: {counts['videos']}, queries: {counts['texts']}, skipped (missing) videos: {counts['skipped_videos']}",
        "",
    ]
    lines += metrics_table(metrics)
    if "similarity/t2v_r1" in metrics:
        lines += ["", "Similarity alone, before re-ranking:", ""]
        lines += metrics_table(metrics, "similarity/")
    lines += timing_table(result.get("timing", {}), result.get("cache", {}))
    lines += ["", "Protocol:", ""]
    lines += [f"- {key}: `{value}`" for key, value in flatten(protocol).items()]
    return "\n".join(lines) + "\n"


def metrics_table(metrics: dict[str, float], prefix: str = "") -> list[str]:
    """Markdown lines: R@1/5/10, MdR, MnR for both directions, from `<prefix>t2v_r1` ... `<prefix>v2t_meanr`."""
    lines = ["| direction | " + " | ".join(name for name, _ in _COLUMNS) + " |", "|---|" + "---:|" * len(_COLUMNS)]
    for direction, label in (("t2v", "text → video"), ("v2t", "video → text")):
        cells = [f"{metrics[f'{prefix}{direction}_{key}']:.1f}" for _, key in _COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def timing_table(timing: dict[str, float], cache: dict[str, Any]) -> list[str]:
    """Markdown lines: seconds and share of the total per phase, the unaccounted rest as `other`."""
    if not timing:
        return []
    total = timing["total_s"]
    phases = {k.removesuffix("_s"): v for k, v in timing.items() if k != "total_s"}
    phases = dict(sorted(phases.items(), key=lambda kv: _PHASE_ORDER.index(kv[0]) if kv[0] in _PHASE_ORDER else 99))
    phases["other (cache, gathers)"] = max(0.0, total - sum(phases.values()))
    note = " (features from the cache: nothing decoded)" if cache.get("features_hit") else ""
    lines = ["", f"Time split{note}:", "", "| phase | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.2f} | {100 * sec / total if total else 0:.0f}% |" for name, sec in phases.items()]
    lines.append(f"| total | {total:.2f} | 100% |")
    return lines


def write_report(result: dict[str, Any], output_dir: str | Path, kind: str = "retrieval",
                 render: Callable[[dict[str, Any]], str] = markdown_table) -> tuple[Path, Path]:
    """Write `<output_dir>/<kind>_<dataset>.json` and the `.md` page `render` makes of it; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = output_dir / f"{kind}_{result['dataset']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    md_path.write_text(render(result))
    return json_path, md_path


def log_to_mlflow(result: dict[str, Any], cfg, files: list[Path], stage: str = "eval_retrieval") -> str:
    """One MLflow run per data set (nested under `cfg.tracking.parent_run_id` when set): metrics, protocol
    as params, the report files as artifacts, tagged `stage`. `cfg` is an evaluation config with `tracking` (the
    retrieval one, or the classification test's). Returns the run id."""
    from pipeline.tracking import TrackingRun, metric_entries, tracking_uri

    tracking_cfg = cfg.tracking
    tags = {"stage": stage, "dataset": result["dataset"], "checkpoint": result["checkpoint"]}
    run_name = tracking_cfg.run_name or f"eval-{result['dataset']}"
    # tracking_uri: tracking.uri, $MLFLOW_TRACKING_URI, or <output_dir>/mlflow.db
    run = TrackingRun.create(tracking_uri(cfg), tracking_cfg.experiment, run_name, tags, tracking_cfg.parent_run_id,
                             tracking_cfg.artifact_location)
    params = {**flatten(result["protocol"]), **{f"counts.{k}": v for k, v in result["counts"].items()}}
    metrics = {**result["metrics"], **{f"timing/{k}": v for k, v in result.get("timing", {}).items()}}
    run.log_params(params)
    run.log_metrics(metric_entries(metrics, step=0))
    for path in files:
        run.log_artifact(path)
    run.end("FINISHED")
    return run.run_id
