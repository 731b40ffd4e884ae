"""Soak benchmark (not CI): CPU training through the real job path for `--minutes`, with a fault every few minutes.

    PYTHONPATH=. python benchmarks/soak.py --minutes 30          # ~35 min with the calibration and the checks
    PYTHONPATH=. python benchmarks/soak.py --minutes 5 --fault-every-s 60 --out /tmp/soak_debug

The run is `python jobs/train_toy.py --config configs/stages/toy.yaml ...` as a user starts it: a driver that
starts a private local Ray, one Ray Train worker (DeepSpeed ZeRO-2, gloo, 1 CPU), a sqlite MLflow store and
local checkpoints under `--work`, every checkpoint kept, `tracking.log_interval` from `--log-interval` (5: one
MLflow value every 5 steps expected) and `nonfinite=skip`. A short calibration run measures steps/s first;
`optim.max_steps` is what fits the requested minutes less the expected restarts. Every `--fault-every-s` seconds'
worth of steps (at the calibrated rate: faults come by progress, so each happens however fast the shared machine
runs) the next fault of the rotation:

- `worker_kill`: SIGKILL of the Ray Train worker process (`ray::RayTrainWorker`, found among the driver's
  descendants); Ray restarts the group from the latest committed checkpoint (`scaling.max_failures=-1`);
- `nan_loss`: a NaN loss at the batch position of that step (`task.nan_at_batches`, planned at
  launch; the toy task is the one that can inject it); `nonfinite=skip` drops the batch and counts it;
- `driver_stop`: SIGKILL of the driver's process group (the job and its Ray), then, `--resubmit-delay-s` later,
  the same command again, which resumes from storage.

A fault is injected only while the run is healthy (the previous fault recovered, progress in the last 10 s).
Recovery time: from the fault to the first progress line past the last step printed before it (so it includes
the steps redone since the checkpoint the restart resumed from). At the end the soak checks that the last driver
finished at `optim.max_steps`; that the MLflow run is the only one of its name, FINISHED, and holds exactly one
value of every training metric per step from 1 to max_steps (no duplicate after a resume, no gap); that
`train/skipped_batches` ends at the number of planned NaN batches; and that every checkpoint interval (and the
last step) has a complete checkpoint (`pipeline.checkpointing.layout.problems`). Results: `<out>/soak.json`
(provenance, machine, settings, checks; one row per fault) and `<out>/soak.md` from the same data; the drivers'
logs stay under `--work`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import REPO, RESULTS, run_meta, write_result_files  # noqa: E402

RUN = "soak"
ROTATION = ("worker_kill", "nan_loss", "driver_stop")
# The engine's lines (rank 0, forwarded by Ray) and the job's last line; {run} is the run name.
PATTERNS = {"step": r"\[{run}\] step (\d+)/\d+ loss", "skipped": r"\[{run}\] step (\d+): skipped a non-finite batch",
            "resumed": r"\[{run}\] resumed from step (\d+)", "done": r"^done: step (\d+)"}  # fmt: skip
WORKER_PID = re.compile(r"\(RayTrainWorker pid=(\d+)\)")
HEALTHY_WITHIN_S = 10.0


@dataclass(frozen=True)
class Event:
    t: float
    """Seconds since the soak started, when the line arrived."""
    kind: str
    step: int
    source: tuple[int, int | None]
    """(driver number, Ray Train worker pid) of the line."""


# ---------------------------------------------------------------------------------------------------- the driver


class Events:
    """Timestamped events parsed from the drivers' output (progress, resume, skipped batch, done), shared with
    the threads that read each driver's pipe. Each event names its source, (driver number, worker pid): Ray
    forwards a worker's lines with a lag, so lines of a killed worker still arrive after the kill."""

    def __init__(self, start: float, run: str) -> None:
        self.start, self.lock = start, threading.Lock()
        self.patterns = {kind: re.compile(p.format(run=re.escape(run))) for kind, p in PATTERNS.items()}
        self.items: list[Event] = []

    def pump(self, proc: subprocess.Popen, log: Path, driver_no: int) -> threading.Thread:
        def read() -> None:
            with open(log, "w") as out:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    self.parse(line, driver_no)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    def parse(self, line: str, driver_no: int) -> None:
        now = time.monotonic() - self.start
        for kind, pattern in self.patterns.items():
            found = pattern.search(line)
            if found:
                pid = WORKER_PID.search(line)
                event = Event(now, kind, int(found.group(1)), (driver_no, int(pid.group(1)) if pid else None))
                with self.lock:
                    self.items.append(event)
                return

    def of(self, kind: str, after: float = -1.0) -> list[Event]:
        with self.lock:
            return [e for e in self.items if e.kind == kind and e.t > after]

    def last_step(self) -> Event | None:
        steps = self.of("step")
        return steps[-1] if steps else None


@dataclass
class Driver:
    proc: subprocess.Popen
    log: Path
    reader: threading.Thread

    def descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def train_worker_pids(self) -> list[int]:
        import psutil

        pids = []
        for p in self.descendants():
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    pids.append(p.pid)
            except psutil.Error:
                continue
        return pids

    def stop_group(self) -> tuple[int, int]:
        """SIGKILL the driver's process group. Returns (its descendants still alive 20 s later, which are then
        killed by pid; those that ran in a process group of their own, out of reach of the group kill)."""
        import psutil

        family = self.descendants()
        with_own_session = [p for p in family if _pgid(p.pid) not in (None, self.proc.pid)]
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return len(alive), len(with_own_session)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def job_command(work: Path, run: str, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "jobs/train_toy.py", "--config", "configs/stages/toy.yaml",
        f"tracking.run_name={run}", "tracking.experiment=soak", f"output_dir={work}/out/{run}",
        f"checkpoint.path={work}/checkpoints", f"tracking.uri=sqlite:///{work}/mlflow.db",
        "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1", "scaling.max_failures=-1",
        "deepspeed.zero_stage=2", *overrides,
    ]  # fmt: skip


def start_driver(command: list[str], log: Path, events: Events, driver_no: int = 0) -> Driver:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)  # a private local Ray: the driver's process group holds the whole run
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)  # fmt: skip
    return Driver(proc, log, events.pump(proc, log, driver_no))


# ---------------------------------------------------------------------------------------------------- planning


def calibrate(work: Path, log_interval: int, steps: int = 1000) -> dict[str, float]:
    """A short run of the same job: its start-up seconds (to the first progress line) and steps/s after it."""
    events = Events(time.monotonic(), "calibration")
    command = job_command(work, "calibration", [f"optim.max_steps={steps}", f"tracking.log_interval={log_interval}",
                                                f"checkpoint.interval_steps={steps // 4}", "checkpoint.keep=1"])
    driver = start_driver(command, work / "calibration.log", events)
    if driver.proc.wait() != 0:
        raise RuntimeError(f"the calibration run failed (exit {driver.proc.returncode}); see {driver.log}")
    driver.reader.join(timeout=10)
    progress = events.of("step")
    if len(progress) < 4:
        raise RuntimeError(f"the calibration run printed {len(progress)} progress lines; see {driver.log}")
    first, last = progress[len(progress) // 4], progress[-1]
    return {"startup_s": progress[0].t, "steps_per_s": (last.step - first.step) / max(last.t - first.t, 1e-6)}


@dataclass
class Plan:
    max_steps: int
    checkpoint_interval: int
    fault_times_s: list[float]
    """When each fault would come at the calibrated rate (for the record)."""
    fault_steps: list[int]
    """The step at which each fault comes: by progress, not by the clock, so that every planned fault happens
    however fast the shared machine runs (its load changed 5-fold within one soak)."""
    fault_kinds: list[str]
    nan_positions: list[int]


def make_plan(minutes: float, fault_every_s: float, rate: dict[str, float], checkpoint_every_s: float,
              log_interval: int) -> Plan:  # fmt: skip
    """Fault times every `fault_every_s` (the last one at least a minute before the end), kinds in rotation; the
    steps that fit the minutes less the restarts (each about 0.6 start-ups: Ray stays up after a worker kill); the
    fault steps and NaN positions where the run is expected to be at the fault times."""
    total_s = minutes * 60
    times = [fault_every_s * k for k in range(1, int(total_s // fault_every_s) + 1)
             if fault_every_s * k <= total_s - 60]  # fmt: skip
    kinds = [ROTATION[i % len(ROTATION)] for i in range(len(times))]
    restarts = sum(kind != "nan_loss" for kind in kinds)
    training_s = max(total_s - rate["startup_s"] * (1 + 0.6 * restarts), total_s / 4)
    # a multiple of the log interval: a resumed run then logs the steps it logged before, once each
    interval = max(2, round(rate["steps_per_s"] * checkpoint_every_s / log_interval)) * log_interval
    max_steps = max(interval, round(rate["steps_per_s"] * training_s / interval) * interval)
    steps = [round(max_steps * t / total_s) for t in times]
    nan_positions = [step for step, kind in zip(steps, kinds, strict=True) if kind == "nan_loss"]
    return Plan(max_steps, interval, times, steps, kinds, nan_positions)


# ---------------------------------------------------------------------------------------------------- the soak


@dataclass
class Fault:
    kind: str
    at_s: float
    step_at_fault: int
    source: tuple[int, int | None] = (0, None)
    """Where the last progress line before the fault came from (Event.source): recovery is a line from elsewhere."""
    resumed_from_step: int | None = None
    recovered_at_s: float | None = None
    detail: dict = field(default_factory=dict)

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at_s is None else self.recovered_at_s - self.at_s

    def row(self) -> dict:
        steps_redone = None
        if self.resumed_from_step is not None:
            steps_redone = self.step_at_fault - self.resumed_from_step
        return {"kind": self.kind, "driver": self.source[0], "at s": round(self.at_s, 1), "step": self.step_at_fault,
                "resumed from": self.resumed_from_step, "steps redone": steps_redone,
                "recovery s": None if self.recovery_s is None else round(self.recovery_s, 1), **self.detail}


class Soak:
    def __init__(self, args: argparse.Namespace, plan: Plan, work: Path) -> None:
        self.args, self.plan, self.work = args, plan, work
        self.start = time.monotonic()
        self.events = Events(self.start, RUN)
        self.faults: list[Fault] = []
        self.drivers: list[Driver] = []
        self.unplanned_exits: list[dict] = []
        self.command = job_command(work, RUN, [
            f"optim.max_steps={plan.max_steps}", f"optim.warmup_steps={min(50, plan.max_steps // 10)}",
            f"tracking.log_interval={args.log_interval}", f"checkpoint.interval_steps={plan.checkpoint_interval}",
            f"checkpoint.keep={plan.max_steps // plan.checkpoint_interval + 1}",  # every checkpoint, for the check
            "nonfinite=skip", f"max_skipped_steps={len(plan.nan_positions)}",
            f"task.nan_at_batches=[{','.join(map(str, plan.nan_positions))}]",
        ])  # fmt: skip

    def now(self) -> float:
        return time.monotonic() - self.start

    def submit(self) -> Driver:
        number = len(self.drivers) + 1
        driver = start_driver(self.command, self.work / f"driver_{number}.log", self.events, number)
        self.drivers.append(driver)
        print(f"[soak] {self.now():.0f} s: driver {len(self.drivers)} started (pid {driver.proc.pid})", flush=True)
        return driver

    def healthy(self) -> bool:
        if self.faults and self.faults[-1].recovered_at_s is None:
            return False
        last = self.events.last_step()
        return last is not None and self.now() - last.t < HEALTHY_WITHIN_S

    def update_recoveries(self) -> None:
        """Per open fault, from the lines of the restarted worker (or new driver): the step it resumed from (0: it
        started over, no checkpoint yet) and when it passed the step of the fault."""
        for fault in self.faults:
            new_steps = [e for e in self.events.of("step", fault.at_s) if e.source != fault.source]
            if fault.resumed_from_step is None and new_steps:
                resumed = [e for e in self.events.of("resumed", fault.at_s) if e.source == new_steps[0].source]
                fault.resumed_from_step = resumed[0].step if resumed else 0
            if fault.recovered_at_s is None:
                past = [e for e in new_steps if e.step > fault.step_at_fault]
                if past:
                    fault.recovered_at_s = past[0].t

    def inject(self, kind: str, driver: Driver) -> Driver | None:
        """Inject `kind`; returns the driver that runs afterwards, or None when the fault could not be injected."""
        last = self.events.last_step()
        if kind == "worker_kill":
            pids = driver.train_worker_pids()
            if len(pids) != 1 or last.source[1] not in pids:
                return None  # not one worker, or not the one whose progress we read (a restart under way)
            os.kill(pids[0], signal.SIGKILL)
            self.faults.append(Fault(kind, self.now(), last.step, last.source))
            print(f"[soak] {self.now():.0f} s: SIGKILL training worker pid {pids[0]} at step {last.step}", flush=True)
            return driver
        fault = Fault(kind, self.now(), last.step, last.source)
        self.faults.append(fault)
        print(f"[soak] {self.now():.0f} s: SIGKILL driver pid {driver.proc.pid}'s group at step {last.step}",
              flush=True)  # fmt: skip
        fault.detail["orphans"], fault.detail["own group"] = driver.stop_group()
        time.sleep(self.args.resubmit_delay_s)
        return self.submit()

    def run(self) -> None:
        deadline_s = self.args.minutes * 60 * self.args.deadline_factor
        pending = [(step, k) for step, k in zip(self.plan.fault_steps, self.plan.fault_kinds, strict=True)
                   if k != "nan_loss"]  # fmt: skip
        driver = self.submit()
        try:
            while True:
                self.update_recoveries()
                rc = driver.proc.poll()
                if rc is not None:
                    driver.reader.join(timeout=10)
                    if rc == 0 and self.events.of("done"):
                        break
                    self.unplanned_exits.append({"at_s": round(self.now(), 1), "exit": rc, "log": str(driver.log)})
                    print(f"[soak] {self.now():.0f} s: driver exited {rc} unplanned; see {driver.log}", flush=True)
                    if len(self.unplanned_exits) > self.args.max_unplanned_exits:
                        break
                    driver = self.submit()
                    continue
                if self.now() > deadline_s:
                    print(f"[soak] past the deadline ({deadline_s:.0f} s): stopping", flush=True)
                    driver.stop_group()
                    break
                last = self.events.last_step()
                if pending and last and last.step >= pending[0][0] and self.healthy():
                    injected = self.inject(pending[0][1], driver)
                    if injected is not None:
                        driver = injected
                        pending.pop(0)
                time.sleep(0.5)
            self.update_recoveries()
        finally:
            if driver.proc.poll() is None:
                driver.stop_group()

    def nan_faults(self) -> list[Fault]:
        """One Fault per planned NaN batch, from the skip lines: the first time its step was skipped (a restart
        that redoes the step skips it again; counted as `seen`)."""
        by_step: dict[int, list[Event]] = collections.defaultdict(list)
        for event in self.events.of("skipped"):
            by_step[event.step].append(event)
        faults = []
        for step, seen in sorted(by_step.items(), key=lambda item: item[1][0].t):
            first = seen[0]
            after = [e for e in self.events.of("step", first.t) if e.step >= step and e.source == first.source]
            faults.append(Fault("nan_loss", first.t, step, first.source, resumed_from_step=None,
                                recovered_at_s=after[0].t if after else None, detail={"seen": len(seen)}))
        return faults


# ---------------------------------------------------------------------------------------------------- checks


def metric_steps_check(uri: str, experiment: str, run_name: str, max_steps: int, log_interval: int) -> dict:
    """The MLflow side: exactly one run named `run_name`, its status, and per training metric (system/* sample
    counts and the final eval/* left out) the steps logged twice and the expected steps never logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    out: dict = {"runs_of_this_name": len(runs)}
    if len(runs) != 1:
        return {**out, "ok": False}
    run = runs[0]
    expected = set(range(log_interval, max_steps + 1, log_interval)) | {max_steps}
    keys = {}
    for key in sorted(run.data.metrics):
        if key.startswith(("system/", "eval/")):
            continue
        counts = collections.Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
        duplicated = sorted(s for s, n in counts.items() if n > 1)
        missing = sorted(expected - set(counts))
        keys[key] = {"values": sum(counts.values()), "duplicated_steps": duplicated[:20], "duplicated": len(duplicated),
                     "missing_steps": missing[:20], "missing": len(missing)}  # fmt: skip
    loss = keys.get("train/loss", {"values": 0, "duplicated": 0, "missing": len(expected)})
    out.update({
        "run_id": run.info.run_id, "status": run.info.status, "expected_steps": len(expected),
        "loss_values": loss["values"], "loss_duplicated": loss["duplicated"], "loss_missing": loss["missing"],
        "keys_checked": len(keys),
        "keys_with_problems": {k: v for k, v in keys.items() if v["duplicated"] or v["missing"]},
        "skipped_batches_final": run.data.metrics.get("train/skipped_batches"),
    })  # fmt: skip
    out["ok"] = run.info.status == "FINISHED" and bool(keys) and not out["keys_with_problems"]
    return out


def checkpoints_check(run_storage: Path, max_steps: int, interval: int) -> dict:
    """Every `interval` step and the last step has a complete checkpoint folder (layout.problems)."""
    import fsspec

    from pipeline.checkpointing.layout import checkpoint_dir_name, checkpoint_dirs, problems

    fs = fsspec.filesystem("file")
    expected = sorted(set(range(interval, max_steps + 1, interval)) | {max_steps})
    # Ray keeps checkpoint_manager_snapshot.json beside the folders: a file, not a checkpoint
    present = {Path(p).name: problems(fs, p) for p in checkpoint_dirs(fs, str(run_storage)) if fs.isdir(p)}
    lost = [s for s in expected if checkpoint_dir_name(s) not in present]
    incomplete = {name: found for name, found in present.items() if found}
    return {"expected": len(expected), "complete": sum(not found for found in present.values()),
            "lost_steps": lost, "incomplete": incomplete, "ok": not lost and not incomplete}  # fmt: skip


def final_step(events: Events) -> int | None:
    done = events.of("done")
    return done[-1].step if done else None


# ---------------------------------------------------------------------------------------------------- report


def report(args: argparse.Namespace, soak: Soak, rate: dict, plan: Plan, wall_s: float) -> None:
    work = soak.work
    faults = sorted(soak.faults + soak.nan_faults(), key=lambda f: f.at_s)
    reached = final_step(soak.events)
    mlflow = metric_steps_check(f"sqlite:///{work}/mlflow.db", "soak", RUN, plan.max_steps, args.log_interval)
    checkpoints = checkpoints_check(work / "checkpoints" / RUN, plan.max_steps, plan.checkpoint_interval)
    recoveries = [f.recovery_s for f in faults if f.recovery_s is not None]
    checks = {
        "reached_max_steps": reached == plan.max_steps,
        "every_fault_recovered": all(f.recovered_at_s is not None for f in faults),
        "planned_faults_injected": len(soak.faults) == sum(k != "nan_loss" for k in plan.fault_kinds),
        "every_nan_batch_seen": len(soak.nan_faults()) == len(plan.nan_positions),
        "skipped_batches_match": mlflow.get("skipped_batches_final") == float(len(plan.nan_positions)),
        "mlflow_one_value_per_step": mlflow["ok"],
        "no_checkpoint_lost": checkpoints["ok"],
        "no_unplanned_driver_exit": not soak.unplanned_exits,
        "no_orphan_process": all(not f.detail.get("orphans") for f in faults),
    }
    meta = {
        **run_meta(("torch", "deepspeed", "ray", "mlflow")),
        "machine": f"{os.cpu_count()}-core CPU box, shared with other jobs",
        "minutes_requested": args.minutes, "fault_every_s": args.fault_every_s, "wall_s": round(wall_s, 1),
        "calibration": {k: round(v, 2) for k, v in rate.items()},
        "plan": asdict(plan), "final_step": reached, "drivers": len(soak.drivers),
        "faults_by_kind": dict(collections.Counter(f.kind for f in faults)),
        "recovery_s_total": round(sum(recoveries), 1),
        "recovery_fraction": round(sum(recoveries) / wall_s, 3) if wall_s else None,
        "unplanned_exits": soak.unplanned_exits, "mlflow": mlflow, "checkpoints": checkpoints,
        "checks": checks, "passed": all(checks.values()), "work": str(work),
    }  # fmt: skip
    columns = ["kind", "driver", "at s", "step", "resumed from", "steps redone", "recovery s", "seen", "orphans",
               "own group"]  # fmt: skip
    header = [
        "# Soak: CPU training with injected faults (benchmarks/soak.py)", "",
        f"jobs/train_toy.py through Ray Train (1 worker, DeepSpeed ZeRO-2), sqlite MLflow, local checkpoints; "
        f"{args.minutes:g} min requested, a fault every {args.fault_every_s:g} s; "
        f"{meta['cpu']}, {meta['cores']} cores (shared).",
    ]
    footer = [
        f"Steps: {reached} of {plan.max_steps} requested ({plan.max_steps // plan.checkpoint_interval} checkpoints "
        f"every {plan.checkpoint_interval} steps; calibrated {rate['steps_per_s']:.1f} steps/s, start-up "
        f"{rate['startup_s']:.0f} s); wall {wall_s / 60:.1f} min over {len(soak.drivers)} driver(s); recovering "
        f"{meta['recovery_s_total']:.0f} s ({meta['recovery_fraction']:.1%} of the wall time).",
        f"MLflow `train/loss`: {mlflow.get('loss_values')} values for {mlflow.get('expected_steps')} steps, "
        f"{mlflow.get('loss_duplicated')} duplicated, {mlflow.get('loss_missing')} missing; "
        f"{mlflow.get('keys_checked')} training metrics checked, "
        f"problems: {mlflow.get('keys_with_problems') or 'none'}; "
        f"run {mlflow.get('status')}, {mlflow['runs_of_this_name']} run(s) of this name.",
        f"Checkpoints: {checkpoints['complete']} complete of {checkpoints['expected']} expected, lost "
        f"{checkpoints['lost_steps'] or 'none'}, incomplete {list(checkpoints['incomplete']) or 'none'}.",
        "", "| check | passed |", "|---|---|", *[f"| {name} | {ok} |" for name, ok in checks.items()],
        "", "Recovery s: from the fault to the first progress line past the last step printed before it (includes the "
        "steps redone since the checkpoint resumed from, and for driver_stop the resubmit delay "
        f"of {args.resubmit_delay_s:g} s). seen: times the NaN batch was skipped (again after a restart that redid "
        "its step). orphans: the driver's processes still alive 20 s after its group was killed; own group: its "
        "descendants in a process group of their own (Ray's), which the group kill did not reach.",
    ]  # fmt: skip
    write_result_files(Path(args.out), "soak", meta, [f.row() for f in faults], columns, header, footer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time to aim for (faults included)")
    parser.add_argument("--fault-every-s", type=float, default=150.0, help="seconds between faults")
    parser.add_argument("--checkpoint-every-s", type=float, default=20.0, help="aimed seconds between checkpoints")
    parser.add_argument("--log-interval", type=int, default=5, help="tracking.log_interval (steps a value)")
    parser.add_argument("--resubmit-delay-s", type=float, default=5.0, help="pause between a driver stop and resubmit")
    parser.add_argument("--deadline-factor", type=float, default=2.5, help="stop after this many times --minutes")
    parser.add_argument("--max-unplanned-exits", type=int, default=2, help="resubmits after a driver failed by itself")
    parser.add_argument("--work", type=Path, default=None, help="run folder (default: a new folder under /tmp)")
    parser.add_argument("--out", default=str(RESULTS), help="where soak.json and soak.md go")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="soak_"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty; give a new folder (a soak must start from nothing)")
    work.mkdir(parents=True, exist_ok=True)
    print(f"[soak] work folder {work}", flush=True)
    rate = calibrate(work, args.log_interval)
    shutil.rmtree(work / "checkpoints" / "calibration", ignore_errors=True)
    plan = make_plan(args.minutes, args.fault_every_s, rate, args.checkpoint_every_s, args.log_interval)
    print(f"[soak] calibration {rate}; plan {plan}", flush=True)
    soak = Soak(args, plan, work)
    soak.run()
    report(args, soak, rate, plan, soak.now())
    return 0


if __name__ == "__main__":
    sys.exit(main())
