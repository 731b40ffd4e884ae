"""Data-parallel scaling of a training stage on one host: a Ray Job per (ZeRO stage, worker count).

    RAY_ADDRESS=http://127.0.0.1:8265 MLFLOW_TRACKING_URI=sqlite:////abs/mlflow.db \\
    PYTHONPATH=. python benchmarks/bench_scaling.py --config configs/stages/pretrain_mask_s.yaml \\
        --workers 1 2 4 --zero 1 2 3 --set task.teacher.pretrained=null data.train_shards=s3://bench/train

Each run is what a user submits, `ray job submit -- python jobs/pretrain_mask.py --config ... key=value ...`,
against the running cluster (`ray start --head` on the GPU host), with `scaling.num_workers` and
`deepspeed.zero_stage` set per run. The numbers come back from the run's MLflow metrics:

- `clips/s`: the median of the `train/clips_per_s` windows (`--log-interval` steps each) after `--skip` steps
  (start-up, kernel compilation and the loader's warm-up excluded) and before the profiled steps;
- `per worker` and `efficiency`: clips/s divided by the workers, and that over the 1-worker run's per-worker
  figure with the same ZeRO stage (per-worker batch fixed: weak scaling, as data-parallel training scales);
- `compute busy`: the fraction of a step some other GPU kernel ran (1 - this is host, loader and launch time);
- `comm busy` / `comm exposed`: the fraction of a step some NCCL kernel ran / ran with no compute kernel beside it
  (pipeline.profiling, rank 0, the last `--profile-steps` steps);
- `peak GiB`: rank 0's peak allocated GPU memory (`train/memory_gib`);
- `data wait`: the fraction of step time spent waiting for the loader (1 = data-bound, 0 = GPU-bound).

`--fault` instead runs one job of the largest worker count with checkpoints every `--fault-checkpoint` steps,
kills one training worker's process (SIGKILL) once Ray has committed the first checkpoint, and checks that Ray restarted
the worker group, that the run resumed from that checkpoint (MLflow tag `resumed_from_step`) and finished with
each step logged once. It reports when the kill happened and how long the restarted workers took to resume, and
stops the job (`ray job stop`) if the whole run outlasts `--fault-timeout`.

Results: `<out>/scaling.{json,md}` (or `scaling_fault.*`), merged with rows already there for other settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_result_files  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGE_JOBS = {
    "masked_alignment": "jobs/pretrain_mask.py",
    "video_text": "jobs/pretrain_vtc.py",
    "self_distill": "jobs/self_distill.py",
}
# Environment the jobs must see: tracking, the object store's endpoint, and the GPU host's NCCL settings (NVLink
# multicast stays off on shared hosts; passed on explicitly since a job can start with its own env). Credentials
# are not passed: they would land in the submit command line and Ray's job records; the cluster's env has them.
PASS_ENV = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "RAY_AUTH_MODE",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
    "NCCL_DEBUG",
)
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    ".gpu*",
    ".whl*",
    ".mg*",
    "demo_out",
    "outputs",
    "mlruns",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "benchmarks/results",
]
COLUMNS = [
    "zero",
    "workers",
    "global batch",
    "clips/s",
    "per worker",
    "efficiency",
    "comm busy",
    "comm exposed",
    "peak GiB",
    "data wait",
    "step s",
]


def job_for(cfg: Config) -> str:
    """The stage's entry point (all share pipeline.jobs_common; the name is what a user would submit)."""
    return STAGE_JOBS.get(cfg.task.name, "jobs/pretrain_mask.py")


def runtime_env() -> str:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    return json.dumps({"working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES, "env_vars": env})


@dataclass
class Job:
    proc: subprocess.Popen
    pump: threading.Thread
    log: Path

    def finish(self) -> None:
        self.proc.wait()
        self.pump.join()
        if self.proc.returncode:
            raise RuntimeError(f"the job failed (exit {self.proc.returncode}); its output is in {self.log}")


def submit(job: str, config: Path, overrides: list[str], log: Path, wait: bool = True, job_id: str = "") -> Job:
    """`ray job submit` of one run; its output goes to `log` and to this process's stdout, line by line."""
    ids = ["--submission-id", job_id] if job_id else []
    cmd = ["ray", "job", "submit", *ids, "--runtime-env-json", runtime_env(), "--", "python", job, "--config",
           str(config.resolve().relative_to(REPO)), *overrides]  # fmt: skip
    print("$ " + " ".join(shlex.quote(c) for c in cmd if not c.startswith("{")), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def pump() -> None:
        with log.open("w") as out:
            for line in proc.stdout:
                out.write(line)
                print(line, end="", flush=True)

    running = Job(proc, threading.Thread(target=pump, daemon=True), log)
    running.pump.start()
    if wait:
        running.finish()
    return running


def mlflow_run(run_name: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{run_name}'") if found else []
    )
    if len(runs) != 1:
        raise RuntimeError(f"expected one MLflow run named {run_name!r} in {experiment!r}, found {len(runs)}")
    return client, runs[0]


def summarize(run_name: str, experiment: str, measured_steps: set[int]) -> dict:
    """The run's throughput over `measured_steps` windows, peak memory, data wait and profile fractions."""
    client, run = mlflow_run(run_name, experiment)

    def window_values(key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run.info.run_id, key) if m.step in measured_steps]

    clips = window_values("train/clips_per_s")
    if not clips:
        raise RuntimeError(f"run {run_name!r} logged no train/clips_per_s at steps {sorted(measured_steps)}")
    memory = [m.value for m in client.get_metric_history(run.info.run_id, "train/memory_gib")]
    clips_per_s = statistics.median(clips)
    metrics = run.data.metrics
    return {
        "clips/s": clips_per_s,
        "clips/s windows": clips,
        "peak GiB": max(memory) if memory else None,
        "data wait": statistics.median(window_values("train/data_wait_fraction")),
        "comm busy": metrics.get("profile/comm_busy_fraction"),
        "comm exposed": metrics.get("profile/comm_exposed_fraction"),
        "compute busy": metrics.get("profile/compute_busy_fraction"),
        "step s": metrics.get("profile/step_s"),
        "mlflow_run_id": run.info.run_id,
    }


def timed_window_ends(skip: int, log_interval: int, profile_start: int) -> set[int]:
    """Steps whose logged window is timed: windows end at multiples of the log interval; keep those wholly after
    the first `skip` steps and wholly before the profiled steps."""
    return {end for end in range(log_interval, profile_start, log_interval) if end - log_interval >= skip}


def scaling_runs(args: argparse.Namespace, cfg: Config, stamp: str) -> list[dict]:
    job = job_for(cfg)
    profile_start = args.steps - args.profile_steps + 1
    measured = timed_window_ends(args.skip, args.log_interval, profile_start)
    if not measured:
        raise SystemExit(
            f"--steps {args.steps} leaves no timed window after --skip {args.skip} "
            f"before the {args.profile_steps} profiled steps"
        )
    per_worker_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum_steps
    rows = []
    for zero in args.zero:
        for workers in args.workers:
            name = f"scale_{stamp}_z{zero}_w{workers}"
            overrides = [
                f"scaling.num_workers={workers}",
                f"deepspeed.zero_stage={zero}",
                f"optim.max_steps={args.steps}",
                f"optim.warmup_steps={min(args.steps, 10)}",
                f"tracking.log_interval={args.log_interval}",
                f"tracking.profile_start={profile_start}",
                f"tracking.profile_steps={args.profile_steps}",
                f"tracking.run_name={name}",
                f"tracking.experiment={args.experiment}",
                f"checkpoint.interval_steps={10**6}",
                f"checkpoint.path={args.checkpoints}",
                f"output_dir={args.outputs}/{name}",
                *args.set,
            ]
            submit(job, args.config, overrides, args.logs / f"{name}.log")
            row = {
                "zero": zero,
                "workers": workers,
                "global batch": workers * per_worker_batch,
                "run": name,
                **summarize(name, args.experiment, measured),
            }
            row["per worker"] = row["clips/s"] / workers
            rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["zero"] == row["zero"] and r["workers"] == 1), None)
        row["efficiency"] = row["per worker"] / base["per worker"] if base else None
    return rows


def worker_pids() -> list[int]:
    """PIDs of the cluster's live Ray Train workers (Ray's state API, through the dashboard at RAY_ADDRESS)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    return sorted(actor.pid for actor in actors)


def _committed_checkpoint(run_name: str, experiment: str, every: int) -> bool:
    """True once Ray has committed checkpoint `every`. A checkpoint's files land in storage before Ray commits it,
    and a worker lost in between restarts from the previous committed checkpoint (here: from scratch). The
    engine's save returns only after the commit, so a step logged past the checkpoint's proves it."""
    try:
        client, run = mlflow_run(run_name, experiment)
    except RuntimeError:
        return False
    return any(m.step > every for m in client.get_metric_history(run.info.run_id, "train/loss"))


def _resumed_tag(run_name: str, experiment: str) -> str | None:
    """The run's `resumed_from_step` tag, or None (also while the run does not exist yet)."""
    try:
        return mlflow_run(run_name, experiment)[1].data.tags.get("resumed_from_step")
    except RuntimeError:
        return None


def fault_run(args: argparse.Namespace, cfg: Config, stamp: str) -> list[dict]:
    """One run of the largest worker count; SIGKILL one worker after the first checkpoint; check the recovery."""
    workers, every = max(args.workers), args.fault_checkpoint
    name = f"fault_{stamp}_w{workers}"
    overrides = [
        f"scaling.num_workers={workers}",
        f"deepspeed.zero_stage={args.zero[0]}",
        f"optim.max_steps={args.steps}",
        f"tracking.log_interval={args.log_interval}",
        f"tracking.run_name={name}",
        f"optim.warmup_steps={min(args.steps, 10)}",
        "scaling.max_failures=1",
        f"tracking.experiment={args.experiment}",
        f"checkpoint.interval_steps={every}",
        f"checkpoint.path={args.checkpoints}",
        f"output_dir={args.outputs}/{name}",
        *args.set,
    ]
    log = args.logs / f"{name}.log"
    running = submit(job_for(cfg), args.config, overrides, log, wait=False, job_id=name)
    start = time.time()
    killed = killed_at = resumed_at = None
    while running.proc.poll() is None:
        if time.time() - start > args.fault_timeout:
            subprocess.run(["ray", "job", "stop", name], check=False)
            running.proc.wait()
            when = f"at {killed_at - start:.0f} s" if killed_at else "never"
            raise RuntimeError(
                f"the fault run did not finish in {args.fault_timeout} s (worker killed {when}); stopped it; see {log}"
            )
        if killed is None and _committed_checkpoint(name, args.experiment, every):
            pids = worker_pids()
            if len(pids) != workers:
                raise RuntimeError(f"expected {workers} RayTrainWorker processes, found {pids}")
            killed, killed_at = pids[-1], time.time()
            print(f"\n>>> checkpoint {every} is committed; SIGKILL worker pid {killed} at {killed_at - start:.0f} s\n",
                  flush=True)  # fmt: skip
            os.kill(killed, signal.SIGKILL)
        elif killed is not None and resumed_at is None and _resumed_tag(name, args.experiment) is not None:
            resumed_at = time.time()  # the restarted group's rank 0 has restored and reopened the MLflow run
            print(f"\n>>> the restarted workers resumed {resumed_at - killed_at:.0f} s after the kill\n", flush=True)
        time.sleep(2)
    running.finish()
    if killed is None:
        raise RuntimeError(f"the run ended before its first checkpoint (every {every} steps): nothing was killed")
    client, run = mlflow_run(name, args.experiment)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    resumed = int(run.data.tags.get("resumed_from_step", -1))
    ok = resumed >= every and resumed % every == 0 and len(steps) == len(set(steps)) and max(steps) == args.steps
    row = {
        "workers": workers,
        "zero": args.zero[0],
        "killed at s": round(killed_at - start),
        "resumed after kill s": round(resumed_at - killed_at) if resumed_at else None,
        "resumed from": resumed,
        "final step": max(steps),
        "logged steps": len(steps),
        "steps unique": len(steps) == len(set(steps)),
        "recovered": ok,
        "wall s": round(time.time() - start),
        "run": name,
    }
    if not ok:
        raise RuntimeError(f"the run did not recover as expected: {row}")
    return [row]


def merge_rows(path: Path, rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Rows already in `path` for other settings (by `keys`), then these."""
    if not path.exists():
        return rows
    new = {tuple(r[k] for k in keys) for r in rows}
    old = [r for r in json.loads(path.read_text())["rows"] if tuple(r.get(k) for k in keys) not in new]
    return sorted(old + rows, key=lambda r: tuple(r[k] for k in keys))


def gpu_meta() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    return {
        "device": torch.cuda.get_device_name(0),
        "gpus_on_host": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--zero", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="steps before the first timed window")
    parser.add_argument("--log-interval", type=int, default=5, help="steps per timed window")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides for every run")
    parser.add_argument("--experiment", default="scaling")
    parser.add_argument("--checkpoints", default="/tmp/bench_scaling/checkpoints")
    parser.add_argument("--outputs", default="/tmp/bench_scaling/outputs")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/bench_scaling/logs"))
    parser.add_argument("--fault", action="store_true", help="the worker-kill recovery run instead")
    parser.add_argument("--fault-checkpoint", type=int, default=10, help="checkpoint interval of the fault run")
    parser.add_argument("--fault-timeout", type=float, default=900, help="stop the fault run after this many s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="a label for this set of runs in the results")
    args = parser.parse_args()
    if "MLFLOW_TRACKING_URI" not in os.environ:
        raise SystemExit("set MLFLOW_TRACKING_URI (the jobs log there and this script reads their metrics back)")
    args.logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    cfg = load_config(str(args.config), args.set)  # checked here, before any job is submitted
    meta = {
        **gpu_meta(),
        "config": str(args.config),
        "overrides": args.set,
        "steps": args.steps,
        "skip": args.skip,
        "log_interval": args.log_interval,
        "date": time.strftime("%Y-%m-%d"),
        "tag": args.tag,
    }
    if args.fault:
        rows = fault_run(args, cfg, stamp)
        write_result_files(
            args.out,
            "scaling_fault",
            meta,
            rows,
            list(rows[0])[:-1],
            [f"# Worker loss at scale ({meta['device']}, {args.config.name})"],
        )
        return
    rows = scaling_runs(args, cfg, stamp)
    rows = merge_rows(args.out / "scaling.json", [{**r, "tag": args.tag} for r in rows], ("tag", "zero", "workers"))
    header = [
        f"# Data-parallel scaling ({meta['device']}, {args.config.name}, {' '.join(args.set)})",
        "",
        "Weak scaling (fixed per-worker batch); efficiency = per-worker clips/s over the 1-worker run's.",
    ]
    write_result_files(args.out, "scaling", meta, rows, ["tag", *COLUMNS], header)


if __name__ == "__main__":
    main()
