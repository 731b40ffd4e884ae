"""Run a training stage: through Ray Train (`TorchTrainer`, one worker per GPU or CPU slot) or in this process.

`launch(cfg)` resolves every path the workers need to absolute ones (Ray workers do not share the driver's
working directory), then either calls `pipeline.engine.train` directly (`scaling.use_ray: false`; no Ray import)
or runs Ray Train workers that each build the same `Trainer` with a Ray checkpoint store. Rerunning the same run
name with the same `checkpoint.path` continues from the latest checkpoint there; while a launch runs, it holds the
run's lock (`run.lock` in that folder), so a second launch of the same run stops instead of joining it.
`run_ray_workers` is the one place a `TorchTrainer` is built, for training and for the retrieval evaluation
(pipeline/evaluation/run.py).

Ray connection: inside `ray job submit` (RAY_ADDRESS set) or with a running `ray start` cluster the driver
attaches to it; otherwise it starts a private local Ray. Ray 2.60 clusters use token auth by default: clients
need `RAY_AUTH_MODE=token` (and the token) unless the cluster was started with `RAY_AUTH_MODE=disabled`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.checkpointing import latest_checkpoint, pop_run_record, run_storage, write_run_record
from pipeline.checkpointing.run_lock import run_lock
from pipeline.checkpointing.storage import RESULT_RECORD
from pipeline.config import Config, ScalingConfig, from_dict, to_dict
from pipeline.distributed import launcher_rank
from pipeline.engine import NonFiniteError, TrainResult
from pipeline.preflight import check_storage
from pipeline.redaction import redact_text


def resolve_paths(cfg: Config) -> Config:
    """A copy whose output dir, local checkpoint path, tracking URI and local artifact location are absolute (the
    same for every worker)."""
    from pipeline.tracking import tracking_uri
    from pipeline.tracking_artifacts import absolute_artifact_root

    output_dir = str(Path(cfg.output_dir).resolve())
    checkpoint_path = cfg.checkpoint.path if "://" in cfg.checkpoint.path else str(Path(cfg.checkpoint.path).resolve())
    cfg = dataclasses.replace(
        cfg, output_dir=output_dir, checkpoint=dataclasses.replace(cfg.checkpoint, path=checkpoint_path)
    )
    tracking = dataclasses.replace(cfg.tracking, uri=tracking_uri(cfg),
                                   artifact_location=absolute_artifact_root(cfg.tracking.artifact_location))
    return dataclasses.replace(cfg, tracking=tracking)


def ray_storage(cfg: Config) -> dict[str, Any]:
    """RunConfig storage arguments: the path alone, or with `checkpoint.storage_options` an fsspec filesystem
    wrapped for pyarrow (Ray writes checkpoints through pyarrow, which knows nothing of fsspec options)."""
    if not cfg.checkpoint.storage_options:
        return {"storage_path": cfg.checkpoint.path}
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(cfg.checkpoint.path, **cfg.checkpoint.storage_options)
    return {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(fs))}


def connect_ray(scaling: ScalingConfig) -> None:
    """Attach to the cluster of `ray job submit` / `ray start`, else start a local Ray sized for `scaling`."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or _local_cluster_running():
        ray.init(address="auto")
    else:
        cpus = scaling.num_workers * scaling.cpus_per_worker
        ray.init(num_cpus=max(cpus, os.cpu_count() or 1), include_dashboard=False)


def _local_cluster_running() -> bool:
    # `ray start` writes the GCS address here; a stale file (cluster gone) is removed by `ray stop`.
    return Path("/tmp/ray/ray_current_cluster").is_file()


def _use_gpu(setting: Any) -> bool:
    if setting != "auto":
        return bool(setting)
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def worker_env_vars() -> dict[str, str]:
    """Environment of the Ray Train workers.

    Ray Train 2.60 patches `print` in its workers to log through the root logger, whose console handler prints
    the line; and because a Ray worker always replaces `sys.stdout`, the patch also tees to the real `print`
    (ray-project/ray#61075): every progress line reached `ray job logs` twice. With the patch off, a print
    reaches the driver once, through Ray's stdout forwarding. A RAY_TRAIN_ENABLE_PRINT_PATCH set by the user wins.
    """
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}


def run_ray_workers(worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], scaling: ScalingConfig,
                    run_name: str, storage: dict[str, Any], max_failures: int = 0,
                    keep_checkpoints: int | None = None) -> None:
    """Run `worker(loop_config)` on `scaling.num_workers` Ray Train workers and wait for them to finish: the one
    place that starts a TorchTrainer (training stages and retrieval evaluations).

    One worker per GPU when `scaling.use_gpu` (auto: when the cluster has GPUs), each with `cpus_per_worker` CPUs;
    NCCL between GPU workers, gloo on CPU. `storage` are RunConfig's storage arguments (`ray_storage`, or a
    `storage_path`); Ray restarts the worker group up to `max_failures` times and keeps `keep_checkpoints`.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    connect_ray(scaling)
    use_gpu = _use_gpu(scaling.use_gpu)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    checkpoints = ray.train.CheckpointConfig(num_to_keep=keep_checkpoints) if keep_checkpoints else None
    TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name,
            **storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoints,
            worker_runtime_env={"env_vars": worker_env_vars()},
        ),
    ).fit()


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: rebuild the config, train, report the result (or a non-finite stop)."""
    from pipeline.checkpointing import RayCheckpointStore
    from pipeline.distributed import get_rank
    from pipeline.engine import Trainer

    cfg = from_dict(Config, loop_config["config"], "")
    try:
        store = RayCheckpointStore(loop_config["resume_from"], run_storage(cfg), cfg.checkpoint.storage_options)
        Trainer(cfg, store, loop_config["launch_id"]).fit()
    except NonFiniteError as err:
        # Every rank raises at the same step (the check is all-reduced). Returning instead of raising keeps Ray
        # from restarting the workers: a deterministic NaN would only recur from the same checkpoint.
        if get_rank() == 0:
            write_run_record(cfg, {"error": str(err)})


def launch(cfg: Config) -> TrainResult:
    """Train the stage `cfg` describes, on Ray Train or locally; returns the export path, metrics and run id.

    The launch holds the run's lock throughout (`pipeline.checkpointing.run_lock`; under torchrun rank 0 holds it):
    a second launch of the same run stops with `RunLockedError` instead of sharing its checkpoints and MLflow run.
    """
    cfg = resolve_paths(cfg)
    check_storage(cfg)  # the jobs' dry run checks this too; a recipe's stages come straight here
    with run_lock(cfg) if launcher_rank() == 0 else contextlib.nullcontext():
        return _launch(cfg)


def _launch(cfg: Config) -> TrainResult:
    if not cfg.scaling.use_ray:
        from pipeline.engine import train

        return train(cfg)
    if not cfg.checkpoint.resume and latest_checkpoint(cfg):
        raise ValueError(
            f"checkpoint.resume is false but {redact_text(run_storage(cfg))} already holds checkpoints of run "
            f"{cfg.run_name!r}; "
            "choose another tracking.run_name (or delete the folder) to start over"
        )
    latest = latest_checkpoint(cfg) if cfg.checkpoint.resume else None
    if latest:
        print(f"[{cfg.run_name}] resuming from {redact_text(latest)}", flush=True)
    pop_run_record(cfg)  # a record from an earlier launch of this run must not be mistaken for this one's
    # Ray Train V2 reloads its checkpoint list from <storage>/<name> by itself; the checkpoint found by scanning is
    # the workers' fallback when that list is missing (e.g. lost with a crashed driver). launch_id: a worker group
    # Ray restarts before the first committed checkpoint continues the MLflow run its first attempt created,
    # instead of starting a second one of the same name.
    loop_config = {"config": to_dict(cfg), "resume_from": latest, "launch_id": uuid.uuid4().hex}
    run_ray_workers(_ray_worker, loop_config, cfg.scaling, cfg.run_name, ray_storage(cfg),
                    max_failures=cfg.scaling.max_failures, keep_checkpoints=cfg.checkpoint.keep)
    record = pop_run_record(cfg)
    if record is None:
        raise RuntimeError(f"the workers finished without writing {run_storage(cfg)}/{RESULT_RECORD}")
    if "error" in record:
        raise NonFiniteError(record["error"])
    return TrainResult(**record)
