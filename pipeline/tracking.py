"""MLflow tracking: the one way the pipeline opens a run, and the stage runs of training (rank 0 only).

`TrackingRun` is how every run is created or reopened: a stage's (`RunTracker`), a recipe's parent run
(pipeline/recipe/runner.py) and an evaluation's (pipeline/evaluation/report.py). A new run is tagged with the git
sha and nested under its parent; params are logged in batches (lists and dicts as JSON, long values cut to
MLflow's limit).

`RunTracker.start` creates a stage run (nested under `tracking.parent_run_id` when set) or resumes one by id; it logs
the flattened config as params, the resolved config as an artifact (both with credentials masked), and tags
(git sha, stage, data manifest hash). Metrics are buffered and written in batches. A resumed run continues the
same MLflow run: steps that were already logged before the crash are not logged a second time (the run's
history keeps one value per step). While the run is open, MLflow's system metrics monitor samples the node
(`tracking.system_metrics_interval_s`) into system/* metrics, whose steps count samples, not training steps.
The default store is a sqlite file under the output directory, so nothing needs a server. Every experiment is created
with an explicit artifact location (pipeline/tracking_artifacts.py): beside a sqlite store, or under
`tracking.artifact_location`, never in ./mlruns of whichever process happened to create it.
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
from pipeline.tracking_artifacts import absolute_tracking_uri, experiment_artifact_location, warn_if_elsewhere

# MLflow limits: 100 params / 1000 metrics per log_batch call and 6000 characters per param value.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"  # MlflowException.error_code of an unknown run id


def tracking_uri(cfg: Config) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<abs output_dir>/mlflow.db; local paths absolute."""
    if configured := cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_tracking_uri(configured)
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


class RunNotFoundError(LookupError):
    """A run id the tracking store does not have."""


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created on first use with `artifact_location` (None: the store's choice); an
    existing experiment whose artifacts live elsewhere is warned about (`warn_if_elsewhere`)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    warn_if_elsewhere(name, client.tracking_uri, experiment.artifact_location, artifact_location)
    return experiment.experiment_id


def metric_entries(metrics: dict[str, float], step: int) -> list[Any]:
    """MLflow metric entities of `metrics` at `step`, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in metrics.items()]


class TrackingRun:
    """An open MLflow run; `create` and `reopen` are the only ways the pipeline starts one."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str],
               parent_run_id: str | None = None, artifact_root: str | None = None) -> TrackingRun:
        """A new run in `experiment` (created on first use, its artifacts beside a sqlite store or under
        `artifact_root`: `experiment_artifact_location`), nested under `parent_run_id`, tagged with the git sha."""
        from mlflow.tracking import MlflowClient

        location = experiment_artifact_location(uri, artifact_root, experiment)
        client = MlflowClient(uri)
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if sha := git_sha(Path(__file__).parent):
            tags["git_sha"] = sha
        run = client.create_run(experiment_id(client, experiment, location), run_name=run_name, tags=tags)
        return cls(client, run.info.run_id, uri)

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> TrackingRun:
        """Run `run_id`, marked RUNNING again; RunNotFoundError when the store does not have it."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        try:
            client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != _NOT_FOUND:
                raise
            raise RunNotFoundError(f"the tracking store {uri} has no run {run_id}") from err
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id, uri)

    @classmethod
    def find(cls, uri: str, experiment: str, tag: str, value: str) -> str | None:
        """The id of a run of `experiment` tagged `tag=value`, or None (also when there is no such experiment)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        found_experiment = client.get_experiment_by_name(experiment)
        if found_experiment is None:
            return None
        found = client.search_runs([found_experiment.experiment_id], filter_string=f"tags.{tag} = '{value}'",
                                   max_results=1)
        return found[0].info.run_id if found else None

    @classmethod
    def find_running(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str | None:
        """The id of the newest run of `experiment` named `run_name`, still RUNNING, with these tags; or None."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        found_experiment = client.get_experiment_by_name(experiment)  # a lookup: never creates the experiment
        if found_experiment is None:
            return None
        filters = [f"attributes.run_name = '{run_name}'", "attributes.status = 'RUNNING'",
                   *(f"tags.`{key}` = '{value}'" for key, value in tags.items())]  # fmt: skip
        found = client.search_runs([found_experiment.experiment_id], filter_string=" and ".join(filters),
                                   max_results=1, order_by=["attributes.start_time DESC"])  # fmt: skip
        return found[0].info.run_id if found else None

    def log_params(self, params: dict[str, Any]) -> None:
        """Params in batches (MLflow takes 100 a request); lists and dicts as JSON, values cut to 6000 characters."""
        from mlflow.entities import Param

        items = [Param(k, (json.dumps(v) if isinstance(v, list | dict) else str(v))[:_MAX_PARAM_CHARS])
                 for k, v in params.items()]  # fmt: skip
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, entries: list[Any]) -> None:
        """Metric entities (`metric_entries`) in as few requests as MLflow allows (1000 a request)."""
        for i in range(0, len(entries), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[i : i + _METRICS_PER_BATCH])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, local_path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(local_path))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with `status` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(self.run_id, status=status)


def run_status(uri: str, run_id: str) -> str:
    """The status of run `run_id` (FINISHED, RUNNING, ...), or "missing" when the store does not have it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except MlflowException as err:
        if err.error_code != _NOT_FOUND:
            raise
        return "missing"


class RunTracker:
    """One MLflow run of one stage. Create on rank 0 only; other ranks never import mlflow."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.run: TrackingRun | None = None
        self._pending: list[Any] = []
        self._last_logged_step = -1
        self._system_metrics = None  # MLflow's SystemMetricsMonitor while the run is open

    def start(self, resume_run_id: str | None = None, launch_id: str | None = None) -> str:
        """Create the run, or continue one: `resume_run_id` (a checkpoint's run), else the run an earlier attempt
        of the same launch created (`launch_id`, tagged on the run: Ray restarted the workers before any
        checkpoint was committed, so there is no checkpoint to name it), else a run of this name and stage left
        RUNNING (a lost driver's, resubmitted before any checkpoint). Returns the run id."""
        tracking = self.cfg.tracking
        if resume_run_id is None and launch_id is not None:
            resume_run_id = TrackingRun.find(self.uri, tracking.experiment, "launch_id", launch_id)
        if resume_run_id is None:
            # A driver lost before the first checkpoint leaves its run RUNNING, and its resubmission is a new
            # launch with nothing to resume: it continues that run (as a Ray restart does, each step logged once)
            # rather than open a second run of the same name beside an open one that never ends.
            tags = {"stage": self.cfg.stage, **({"mlflow.parentRunId": tracking.parent_run_id}
                                                if tracking.parent_run_id else {})}  # fmt: skip
            resume_run_id = TrackingRun.find_running(self.uri, tracking.experiment, self.cfg.run_name, tags)
        if resume_run_id is not None:
            self.run = TrackingRun.reopen(self.uri, resume_run_id)
            self._last_logged_step = self._max_logged_step()
            self.run.set_tag("resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._start_system_metrics(resumed=True)
            return resume_run_id
        tags = {"stage": self.cfg.stage, "task": self.cfg.task.name}
        if launch_id is not None:
            tags["launch_id"] = launch_id
        if digest := manifest_hash(self.cfg.data):
            tags["data_manifest_sha256"] = digest
        self.run = TrackingRun.create(self.uri, tracking.experiment, self.cfg.run_name, tags, tracking.parent_run_id,
                                      tracking.artifact_location)
        self.run.log_params(flatten(public_dict(self.cfg)))  # credentials masked
        self.run.log_text(to_yaml(self.cfg), "config.yaml")
        self._start_system_metrics(resumed=False)
        return self.run.run_id

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

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

    def _max_logged_step(self) -> int:
        """The last training step an earlier attempt logged (system/* metrics count samples: left out)."""
        client, run_id = self.run.client, self.run.run_id
        steps = [-1]
        for key in client.get_run(run_id).data.metrics:
            if key.startswith("system/"):
                continue
            steps.extend(m.step for m in client.get_metric_history(run_id, key))
        return max(steps)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics of `step` (skipped when a previous attempt of this run already logged the step)."""
        if step > self._last_logged_step:
            self._pending.extend(metric_entries(metrics, step))

    def flush(self) -> None:
        """Write the buffered metrics in as few requests as MLflow allows."""
        self.run.log_metrics(self._pending)
        self._pending.clear()

    def log_artifact(self, local_path: str | Path) -> None:
        self.run.log_artifact(local_path)

    def set_tag(self, key: str, value: str) -> None:
        self.run.set_tag(key, value)

    def end(self, status: str = "FINISHED") -> None:
        """Flush and close the run with `status` (FINISHED, FAILED or KILLED)."""
        if self._system_metrics is not None:
            self._system_metrics.finish()  # wakes the sampler and writes its last samples
            self._system_metrics = None
        self.flush()
        self.run.end(status)
