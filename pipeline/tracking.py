"""MLflow tracking for training runs, used from rank 0 only.

`RunTracker.start` creates a run (nested under `tracking.parent_run_id` when set) or resumes one by id; it logs
the flattened config as params, the resolved config as an artifact (both with credentials masked), and tags
(git sha, stage, data manifest hash). Metrics are buffered and written in batches. A resumed run continues the
same MLflow run: steps that were already logged before the crash are not logged a second time (the run's
history keeps one value per step). While the run is open, MLflow's system metrics monitor samples the node
(`tracking.system_metrics_interval_s`) into system/* metrics, whose steps count samples, not training steps.
The default store is a sqlite file under the output directory, so nothing needs a server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, flatten, public_dict, to_yaml

# MLflow limits: 100 params / 1000 metrics per log_batch call and 6000 characters per param value.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000


def tracking_uri(cfg: Config) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<abs output_dir>/mlflow.db."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(cfg.output_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The checkout's commit, or None outside a git work tree (e.g. a Ray job's unpacked working dir)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def manifest_hash(data_cfg) -> str | None:
    """sha256 (first 16 hex) of the training shards' `manifest.json`, when the shards sit beside one."""
    shards = data_cfg.train_shards
    if not shards:
        return None
    first = shards[0] if isinstance(shards, list) else shards
    # A shard pattern or file names its folder's manifest; a bare folder holds it directly.
    is_file = first.endswith(".tar") or "{" in first
    folder = first.rsplit("/", 1)[0] if is_file else first.rstrip("/")
    import fsspec

    try:
        with fsspec.open(f"{folder}/manifest.json", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except FileNotFoundError:
        return None


class RunTracker:
    """One MLflow run of one stage. Create on rank 0 only; other ranks never import mlflow."""

    def __init__(self, cfg: Config) -> None:
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(self.uri)
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._last_logged_step = -1
        self._system_metrics = None  # MLflow's SystemMetricsMonitor while the run is open

    def start(self, resume_run_id: str | None = None, launch_id: str | None = None) -> str:
        """Create the run, or continue one: `resume_run_id` (a checkpoint's run), else the run an earlier attempt
        of the same launch created (`launch_id`, tagged on the run: Ray restarted the workers before any
        checkpoint was committed, so there is no checkpoint to name it). Returns the run id."""
        experiment_id = None if resume_run_id else self._experiment_id()
        if resume_run_id is None and launch_id is not None:
            earlier = self.client.search_runs([experiment_id], filter_string=f"tags.launch_id = '{launch_id}'",
                                              max_results=1)
            resume_run_id = earlier[0].info.run_id if earlier else None
        if resume_run_id is not None:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self._last_logged_step = self._max_logged_step()
            self.client.set_tag(resume_run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._start_system_metrics(resumed=True)
            return resume_run_id
        tags = {"stage": self.cfg.stage, "task": self.cfg.task.name}
        if launch_id is not None:
            tags["launch_id"] = launch_id
        if self.cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = self.cfg.tracking.parent_run_id
        if sha := git_sha(Path(__file__).parent):
            tags["git_sha"] = sha
        if digest := manifest_hash(self.cfg.data):
            tags["data_manifest_sha256"] = digest
        run = self.client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags)
        self.run_id = run.info.run_id
        self._log_params(flatten(public_dict(self.cfg)))  # credentials masked
        self.client.log_text(self.run_id, to_yaml(self.cfg), "config.yaml")
        self._start_system_metrics(resumed=False)
        return self.run_id

    def _start_system_metrics(self, resumed: bool) -> None:
        """Sample the node into the run in a daemon thread until `end` (resumed: continue its sample count)."""
        interval = self.cfg.tracking.system_metrics_interval_s
        if interval <= 0:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as err:  # optional: training goes on without it
            print(f"[tracking] system metrics off: {err}. Install psutil (requirements/lock.txt pins it) or set "
                  "tracking.system_metrics_interval_s=0", flush=True)
            return
        self._system_metrics = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                    resume_logging=resumed, tracking_uri=self.uri)
        self._system_metrics.start()

    def _experiment_id(self) -> str:
        """The configured experiment's id, created on first use."""
        experiment = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        return experiment.experiment_id if experiment else self.client.create_experiment(self.cfg.tracking.experiment)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()]
        items = [Param(p.key, p.value[:_MAX_PARAM_CHARS]) for p in items]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def _max_logged_step(self) -> int:
        """The last training step an earlier attempt logged (system/* metrics count samples: left out)."""
        run = self.client.get_run(self.run_id)
        steps = [-1]
        for key in run.data.metrics:
            if key.startswith("system/"):
                continue
            steps.extend(m.step for m in self.client.get_metric_history(self.run_id, key))
        return max(steps)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics of `step` (skipped when a previous attempt of this run already logged the step)."""
        from mlflow.entities import Metric

        if step <= self._last_logged_step:
            return
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        """Write the buffered metrics in as few requests as MLflow allows."""
        for i in range(0, len(self._pending), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=self._pending[i : i + _METRICS_PER_BATCH])
        self._pending.clear()

    def log_artifact(self, local_path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(local_path))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        """Flush and close the run with `status` (FINISHED, FAILED or KILLED)."""
        if self._system_metrics is not None:
            self._system_metrics.finish()  # wakes the sampler and writes its last samples
            self._system_metrics = None
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
