"""The shared command line of the jobs: `--config FILE [key=value ...] [--dry-run]`.

Every stage entry point calls `run_training_job`: it loads and validates the config (errors name the bad key
before any worker starts), checks that the weight files, shards and buckets it names exist (`pipeline.preflight`),
prints the resolved config and saves it to `<output_dir>/config.yaml`, prints the plan (model and parameter count,
data, workers, storage, tracking, what the checks found) and, unless `--dry-run`, launches training.
Printed and saved configs have their credentials masked (`pipeline.redaction`).
The evaluation jobs call `run_evaluation_job` (their config loader, plan and evaluation passed in). Every job
runs them through `pipeline.cli.exit_status`, which ends a ConfigError with one line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, load_config, to_yaml
from pipeline.engine import TrainResult
from pipeline.preflight import preflight
from pipeline.redaction import redact_text
from pipeline.writes import disk_full_named


def parse_job_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (configs/stages/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the config and the plan, exit")
    return parser.parse_args(argv)


def count_parameters(cfg: Config) -> tuple[str, int, int]:
    """(model name, total parameters, trainable parameters) of the task, built on the meta device (no memory)."""
    from pipeline.tasks import build_task

    with torch.device("meta"):
        task = build_task(cfg)
    total = sum(p.numel() for p in task.parameters())
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    name = task.export_metadata().get("model_name", cfg.model.name)
    return name, total, trainable


def describe_plan(cfg: Config) -> str:
    """What a launch would do, in a few lines."""
    from pipeline.checkpointing import run_storage
    from pipeline.tracking import tracking_uri

    name, total, trainable = count_parameters(cfg)
    s = cfg.scaling
    workers = f"{s.num_workers} Ray worker(s)" if s.use_ray else "1 local process (no Ray)"
    batch = cfg.data.batch_size * cfg.deepspeed.grad_accum_steps * (s.num_workers if s.use_ray else 1)
    train_data = cfg.data.train_shards or f"task {cfg.task.name!r} provides its own stream"
    resume = resume_line(cfg) if cfg.checkpoint.resume else "off (checkpoint.resume=false)"
    lines = [
        f"stage     {cfg.stage} (task {cfg.task.name}, run {cfg.run_name})",
        f"model     {name}: {total:,} parameters ({trainable:,} trainable)",
        f"data      train: {train_data}; eval: {cfg.data.eval_shards or '-'}",
        f"workers   {workers}, gpu={s.use_gpu}, {s.cpus_per_worker} CPU each; ZeRO-{cfg.deepspeed.zero_stage} "
        f"{cfg.deepspeed.precision}; global batch {batch}; {cfg.optim.max_steps} steps",
        f"storage   checkpoints {run_storage(cfg)} every {cfg.checkpoint.interval_steps} steps "
        f"(resume from: {resume}); outputs {cfg.output_dir}",
        f"tracking  {tracking_uri(cfg) if cfg.tracking.enabled else 'off'} experiment {cfg.tracking.experiment!r}"
        + (f" parent {cfg.tracking.parent_run_id}" if cfg.tracking.parent_run_id else ""),
    ]
    return "\n".join(lines)


def resume_line(cfg: Config) -> str:
    """Which checkpoint a launch would resume from, or why storage could not be checked from here."""
    from pipeline.checkpointing import latest_checkpoint

    try:
        return latest_checkpoint(cfg) or "nothing yet"
    except Exception as err:  # a dry run on a laptop may lack the cluster's credentials: say so, plan on
        return f"unknown, storage not readable from here ({type(err).__name__}: {err})"


def save_resolved_config(cfg: Config) -> Path:
    path = Path(cfg.output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_named(path, "resolved config", "output_dir"):
        path.write_text(to_yaml(cfg))
    return path


def run_training_job(description: str, argv: list[str] | None = None) -> TrainResult | None:
    """Parse, validate, print and save the config, print the plan; then launch unless --dry-run."""
    args = parse_job_args(description, argv)
    cfg = load_config(args.config, args.overrides)
    checks = "\n".join(f"checks    {note}" for note in preflight(cfg))
    print("# resolved config\n" + to_yaml(cfg), flush=True)
    print(f"# saved to {save_resolved_config(cfg)}\n# plan\n{redact_text(describe_plan(cfg))}\n{checks}", flush=True)
    if args.dry_run:
        return None
    from pipeline.launch import launch

    result = launch(cfg)
    print(
        f"done: step {result.step}, export {result.export_path}, MLflow run {result.mlflow_run_id}\n"
        f"final metrics: {result.metrics}",
        flush=True,
    )
    return result


def run_evaluation_job(description: str, argv: list[str] | None, load: Callable[..., Any],
                       plan: Callable[[Any], list[str]],
                       evaluate: Callable[[Any], dict[str, Any] | None]) -> dict[str, Any] | None:
    """`--config FILE key=value ... [--dry-run]` of an evaluation: `load(path, overrides)` the config; with
    --dry-run print `plan(cfg)` (which checks checkpoint and data), else `evaluate(cfg)` and print its result and
    markdown report (rank 0 of a torchrun group; the other ranks print nothing). Returns the result (None for a
    dry run and on the other ranks). Jobs call it through `pipeline.cli.exit_status`, as the training jobs call
    `run_training_job`, so a ConfigError ends them with one line."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="evaluation YAML (configs/eval/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, checkpoint and data without running the model; print the plan; stop")
    args = parser.parse_args(argv)
    cfg = load(args.config, args.overrides)
    if args.dry_run:
        print("\n".join(plan(cfg)))
        return None
    result = evaluate(cfg)
    if result:
        print(json.dumps(result, indent=2))
        print(Path(result["report"]).with_suffix(".md").read_text())
    return result
