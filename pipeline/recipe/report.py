"""What a recipe shows and leaves: the plan, the retrieval results file, the summary tables."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.recipe.resolve import init_key_of
from pipeline.recipe.spec import Recipe
from pipeline.recipe.state import RecipeResult


def plan_lines(recipe: Recipe, configs: dict[str, Any]) -> list[str]:
    """Human-readable plan: one block per step with its task, model, length and weights source."""
    lines = [f"recipe {recipe.name}: {len(recipe.stages)} stage(s), {len(recipe.evals)} evaluation(s)",
             f"  out_dir  {recipe.out_dir}"]
    for i, step in enumerate(recipe.steps, 1):
        cfg = configs[step.name]
        weights = f"{init_key_of(step)} <- {step.init_from}" if step.init_from else "as configured"
        if step.kind == "stage":
            what = (f"task={cfg.task.name} model={cfg.model.name} steps={cfg.optim.max_steps} "
                    f"batch={cfg.data.batch_size}x{cfg.scaling.num_workers} workers ray={cfg.scaling.use_ray}")
        else:
            what = f"data={cfg.data.name} frames={cfg.data.num_frames} rerank_top_k={cfg.scoring.rerank_top_k}"
        lines.append(f"  {i}. {step.kind:5s} {step.name:12s} {what}")
        lines.append(f"     config {step.config}; weights {weights}; output {recipe.out_dir / step.name}")
    return lines


def chance_recall(k: int, num_videos: float) -> float:
    """Chance R@k in percent: k / number of videos in both directions (for v2t with c captions per video among
    T texts, about c*k/T = k/videos)."""
    return min(100.0, 100.0 * k / num_videos)


def retrieval_results(recipe: Recipe, steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{eval name: recalls, ranks, num_videos, num_texts, chance_r1/5/10, run_id, checkpoint} of the recipe's
    finished evaluations, from their completion records."""
    results = {}
    for step in recipe.evals:
        record = steps.get(step.name)
        if not record or record.get("status") != "done":
            continue
        metrics = record["metrics"]
        entry: dict[str, Any] = {k: v for k, v in metrics.items() if re.fullmatch(r"(t2v|v2t)_\w+", k)}
        entry["num_videos"], entry["num_texts"] = int(metrics["videos"]), int(metrics["texts"])
        entry.update({f"chance_r{k}": chance_recall(k, entry["num_videos"]) for k in (1, 5, 10)})
        entry.update(run_id=record.get("run_id"), checkpoint=record.get("checkpoint"))
        results[step.name] = entry
    return results


def write_retrieval_results(recipe: Recipe, steps: dict[str, dict[str, Any]]) -> Path:
    """Write `retrieval_results` to the recipe's results file (atomically) and return its path."""
    path = recipe.results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(retrieval_results(recipe, steps), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def summary_tables(result: RecipeResult) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the steps run, then (header, rows) of retrieval recalls beside chance level.

    Chance R@k (`chance_recall`) is shown when the evaluation reports its video count.
    """
    step_rows = [[name, rec["kind"], str(rec.get("run_id") or "-")[:12], f"{rec.get('seconds', 0):.0f}",
                  _format_loss(rec["metrics"])] for name, rec in result.steps.items()]
    step_header = ["step", "kind", "mlflow run", "seconds", "final loss"]
    ret_header = ["eval", "direction", "R@1", "R@5", "R@10", "chance R@1/5/10"]
    ret_rows = []
    for name, rec in result.steps.items():
        metrics = {k.rsplit("/", 1)[-1]: v for k, v in rec["metrics"].items()}
        pool = metrics.get("videos")
        for direction in ("t2v", "v2t"):
            if f"{direction}_r1" not in metrics:
                continue
            chance = "/".join(f"{chance_recall(k, pool):.1f}" for k in (1, 5, 10)) if pool else "-"
            ret_rows.append([name, direction] + [f"{metrics.get(f'{direction}_r{k}', float('nan')):.1f}"
                                                 for k in (1, 5, 10)] + [chance])
    return step_header, step_rows, ret_header, ret_rows


def _format_loss(metrics: dict[str, float]) -> str:
    losses = [v for k, v in metrics.items() if k == "loss" or k.endswith("/loss")]
    return f"{losses[0]:.4f}" if losses else "-"
