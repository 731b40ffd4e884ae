"""The training loop every worker runs: task + DeepSpeed engine + loader, checkpoints, metrics, export.

`train(cfg)` is the plain local entry (one process, or torchrun); `pipeline.launch` runs the same `Trainer` inside
Ray Train workers with a Ray checkpoint store. A step is `gradient_accumulation_steps` micro-batches; step numbers
start at 1 and count optimizer updates. Precision: bf16/fp16 from config on GPU, fp32 on CPU (DeepSpeed's CPU
accelerator with gloo).

Non-finite policy (`cfg.nonfinite`): every micro-batch's loss is checked on all ranks before the optimizer update.
"stop" raises `NonFiniteError` naming the step and the loss parts (the last good checkpoint stays the latest one);
"skip" drops the micro-batch, counts it (`train/skipped_batches`) and fails after `max_skipped_steps`. A finite
loss with a non-finite gradient: without ZeRO the engine checks the gradients before the update; ZeRO 1-3 skip
such an update themselves (DeepSpeed's overflow check). Either way the same policy applies.

Host syncs (reads of GPU values, which stall the host until the GPU has caught up; docs/operations.md, "Failure
policy", and benchmarks/bench_syncs.py count them): the step keeps its losses, flags and gradient norm on the
device and reads them where the semantics need them. Loss parts are summed on the device and read once per log
interval, with the last gradient norm. Under "stop" the micro-batches' finite flags are read once per step, in one
all-reduce and one read, just before the update (after the last micro-batch's backward): that read cannot move
later, or a non-finite step would update the weights. Under "skip" a micro-batch must be known good before its
backward adds its gradients to the accumulated ones, so the flag is read once per micro-batch (once per step at one
micro-batch a step). The check without ZeRO is fused into the same read as the loss flags (stop) or is one read at
the update (skip). Under ZeRO 1-3 DeepSpeed reports a skipped update as a host-side inf gradient norm, which costs
the engine no read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpointing import CheckpointStore, LocalCheckpointStore, run_storage, write_run_record
from pipeline.checkpointing.export import stage_export
from pipeline.checkpointing.layout import FROZEN_STUDENT, stage_export_path
from pipeline.checkpointing.state import WorkerState, restore_worker_state, save_worker_state
from pipeline.config import Config, to_yaml
from pipeline.distributed import (
    all_reduce_mean,
    ensure_process_group,
    get_rank,
    get_world_size,
    local_rank,
    set_collective_timeout,
)
from pipeline.optim import build_optimizer, peak_lr
from pipeline.profiling import StepProfiler
from pipeline.tasks import build_task, task_spec
from pipeline.writes import torch_save_file

# Dense bf16 peak TFLOP/s per GPU for MFU (NVIDIA datasheets, SXM parts, without sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class NonFiniteError(RuntimeError):
    """A loss or gradient norm was NaN/inf under `nonfinite: stop`, or too many steps were skipped."""


@dataclass
class TrainResult:
    step: int
    """Optimizer steps completed."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Last logged training metrics and the final evaluation."""
    mlflow_run_id: str | None = None
    export_path: str | None = None
    """`<output_dir>/export/model.pt` written by rank 0."""
    resumed_from_step: int | None = None
    """Step of the checkpoint this (last) attempt started from; None for a fresh start."""


def device_for_worker() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (CPU runs are fp32 whatever `deepspeed.precision` says)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * ds.grad_accum_steps * world_size,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu and ds.precision == "bf16"},
        "fp16": {"enabled": on_gpu and ds.precision == "fp16"},
        # A torch AdamW: DeepSpeed's own Adam JIT-compiles a C++/CUDA op (~40 s on CPU) for no gain here.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # our own progress line replaces DeepSpeed's
    }


def _skip_shm_comm_build() -> None:
    # On CPU, DeepSpeed's comm backend JIT-compiles `deepspeed_shm_comm` (~25 s, g++) at init. That op only
    # serves `inference_all_reduce`; training collectives go through gloo. Marking it incompatible skips the
    # build (DeepSpeed caches this dict on first access, and documents that edits to it persist).
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    if cfg.scaling.peak_tflops is not None:
        return cfg.scaling.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def dense_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all `p.grad` of `module`, a 0-dim fp32 tensor on their device (read it where it is needed: a host
    sync); meaningful when gradients are not ZeRO-partitioned."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in module.parameters() if p.grad is not None]
    if not norms:
        return torch.zeros((), device=next(module.parameters()).device)
    return torch.linalg.vector_norm(torch.stack(norms))


def nonfinite_flag(value: torch.Tensor) -> torch.Tensor:
    """1.0 where `value` holds a NaN or inf anywhere, else 0.0: a 0-dim fp32 tensor on its device (no host sync)."""
    return (~torch.isfinite(value.detach())).any().float()


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """One worker's view of a training run. Build, then `fit()`. `launch_id` is the same for every attempt of
    one launch (Ray restarts the worker group after a failure): they all log into one MLflow run."""

    def __init__(self, cfg: Config, store: CheckpointStore, launch_id: str | None = None) -> None:
        import deepspeed

        self.cfg, self.store, self.launch_id = cfg, store, launch_id
        self.device = device_for_worker()
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.set_device(self.device)
        else:
            _skip_shm_comm_build()
        ensure_process_group("nccl" if on_gpu else "gloo")
        self.rank, self.world = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        _seed_everything(cfg.seed)  # identical initial weights on every rank (DeepSpeed also broadcasts rank 0's)
        self.spec = task_spec(cfg.task.name)
        self.task = build_task(cfg)
        self.flops_per_sample = self.task.flops_per_sample()  # from the module shapes, before ZeRO-3 partitions them
        _seed_everything(cfg.seed + self.rank)  # from here on: per-rank masks, dropout and augmentation
        self.global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum_steps * self.world
        optimizer, scheduler = build_optimizer(self.task, cfg.optim, peak_lr(cfg.optim, self.global_batch))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.task, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world, on_gpu),
        )  # fmt: skip
        gpu_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
        self.dtype = gpu_dtype if on_gpu else torch.float32
        self.peak_tflops = peak_tflops(cfg, self.device)

        self.step = 0
        self.skipped_batches = 0
        self.resumed_from_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.profile_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.evaluated_at: int | None = None
        self.loader_state: dict[str, Any] | None = None
        self.dense_grad_norm: torch.Tensor | None = None
        # This step's micro-batches under nonfinite=stop: (finite flag, loss parts), both on the device, read once
        # before the update (check_before_update).
        self.unchecked: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self.collective_timeout_set = False
        run_id = self.restore() if cfg.checkpoint.resume else None
        self.train_loader = self.build_loader("train")
        if self.loader_state is not None:
            self.train_loader.load_state_dict(self.loader_state)
        self.batches: Iterator[dict[str, Any]] = iter(self.train_loader)
        self.tracker = self.start_tracking(run_id) if self.is_main and cfg.tracking.enabled else None
        t = cfg.tracking
        self.profiler = StepProfiler(t.profile_start if self.is_main else 0, t.profile_steps, self.device,
                                     Path(cfg.output_dir) / "profile")  # fmt: skip
        self._reset_window()

    # ------------------------------------------------------------------ building

    def build_loader(self, split: str):
        """This rank's loader of `split`: the task's own (`TaskSpec.own_loader`) or `pipeline.data`'s."""
        return self.task.build_loader(self.cfg, split, self.rank, self.world)

    def start_tracking(self, run_id: str | None):
        from pipeline.tracking import RunTracker

        tracker = RunTracker(self.cfg)
        tracker.start(resume_run_id=run_id, launch_id=self.launch_id)
        if self.resumed_from_step is not None:  # the latest attempt's start, e.g. after Ray restarted the workers
            tracker.set_tag("resumed_from_step", str(self.resumed_from_step))
        return tracker

    @property
    def mlflow_run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker else None

    # ------------------------------------------------------------------ checkpoints

    def restore(self) -> str | None:
        """Load the latest checkpoint if the store has one; returns the MLflow run id it recorded."""
        with self.store.restore() as directory:
            if directory is None:
                return None
            state = restore_worker_state(directory, self.engine, self.rank, self.world)
            if state.frozen_student:
                self._load_frozen_student(state.frozen_student, directory / FROZEN_STUDENT)
        self.task.load_rng_state_dict(state.task_rng)
        self.loader_state = state.loader
        self.step = self.resumed_from_step = state.step
        self.skipped_batches = state.skipped_batches
        if self.is_main:
            print(f"[{self.cfg.run_name}] resumed from step {self.step} ({directory.name})", flush=True)
        return state.mlflow_run_id

    def write_checkpoint(self, directory: Path) -> None:
        """Every rank's part of a checkpoint (pipeline/checkpointing/state.py), into `directory`."""
        loader_state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        # The exported module's frozen parameters belong in its export, and a resume keeps the ones the run started
        # with (a small file: 9 MB fp32 for VideoMamba-M's last block). Gathered on every rank under ZeRO-3.
        frozen = self.frozen_student_state()
        state = WorkerState(step=self.step, skipped_batches=self.skipped_batches, mlflow_run_id=self.mlflow_run_id,
                            task_rng=self.task.rng_state_dict(), loader=loader_state, frozen_student=frozen)
        save_worker_state(directory, self.engine, state, self.rank, self.world, to_yaml(self.cfg),
                          self.cfg.deepspeed.zero_stage)

    def frozen_student_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable module's frozen parameters as the module holds them (training dtype).

        Under ZeRO-3 they are partitioned and gathered first: a collective, so every rank calls this.
        """
        module = self.engine.module.trainable_module()
        frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}
        with self._gathered(list(frozen.values())):
            return {name: p.detach().cpu().clone() for name, p in frozen.items()}

    def _load_frozen_student(self, saved: dict[str, torch.Tensor], path: Path) -> None:
        """Put the run's own frozen student parameters (`frozen_student.pt`) back on resume, rather than keep what
        `build_task` re-created from the seed: the two agree only while the model code and torch do."""
        module = self.engine.module.trainable_module()
        frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}
        if set(saved) != set(frozen):
            raise RuntimeError(f"{path} holds frozen parameters {sorted(saved)[:4]}... but this task freezes "
                               f"{sorted(frozen)[:4]}...; resume with the config the run was started with")
        with self._gathered(list(frozen.values()), modifier_rank=0), torch.no_grad():
            for name, param in frozen.items():
                param.copy_(saved[name].to(param.dtype))

    @contextlib.contextmanager
    def _gathered(self, params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
        """Under ZeRO-3, `params` gathered whole for the block (a collective: every rank enters; with a
        modifier_rank, that rank's changes are scattered back on exit); else as is."""
        if self.cfg.deepspeed.zero_stage != 3 or not params:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield

    def maybe_checkpoint(self, force: bool = False) -> None:
        if not force and self.step % self.cfg.checkpoint.interval_steps:
            return
        if self.tracker:
            self.tracker.flush()  # metrics up to this checkpoint are durable with it
        self.store.save(self.step, self.write_checkpoint, {"step": self.step, **self.last_metrics})

    # ------------------------------------------------------------------ one step

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors to the worker's device; floating tensors in the training dtype (integers and masks unchanged)."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                if self.device.type == "cuda" and value.device.type == "cpu" and not value.is_pinned():
                    # From pageable memory the driver stages the copy and may wait for the stream to get there (a
                    # hidden host sync that torch's sync debug mode does not report); from pinned memory it is a
                    # queued DMA. Pinning goes through torch's caching host allocator.
                    value = value.pin_memory()
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def next_batch(self) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            raise RuntimeError("the training loader ended; training streams must be endless (resampled)") from None
        self.window["data_wait_s"] += time.perf_counter() - start
        return self.to_device(batch)

    def any_rank_flags(self, flags: list[torch.Tensor]) -> list[bool]:
        """Which of these device flags (1.0 = bad) is set on any rank: one all-reduce, one host read."""
        flags_N = torch.stack(flags).float()
        if self.world > 1:
            torch.distributed.all_reduce(flags_N, op=torch.distributed.ReduceOp.MAX)
        return [bad != 0.0 for bad in flags_N.tolist()]  # the read: a host sync on a GPU

    @staticmethod
    def describe(parts: dict[str, torch.Tensor]) -> str:
        """`{loss: nan, <part>: ...}` of one micro-batch (host reads: only on the way to an error or a skip)."""
        return "{" + ", ".join(f"{k}: {float(v):.4g}" for k, v in parts.items()) + "}"

    def forward_backward(self, batch: dict[str, Any]) -> bool:
        """Forward and backward of one micro-batch, then DeepSpeed's step (an update at the accumulation boundary);
        False when the micro-batch was dropped under `nonfinite: skip`. See the module docstring for which values
        it reads back from the device, and when."""
        out = self.engine(batch)
        loss = out["loss"]
        parts = {k: v.detach() for k, v in out.items()}
        if self.cfg.nonfinite == "skip":
            if self.any_rank_flags([nonfinite_flag(loss)])[0]:
                self.on_nonfinite(f"loss parts {self.describe(parts)}")
                return False
        else:
            self.unchecked.append((nonfinite_flag(loss), parts))
        self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary() and not self.check_before_update(loss):
            return False
        self.engine.step()  # DeepSpeed only updates at the accumulation boundary
        self.add_to_window(parts)
        return True

    def check_before_update(self, loss: torch.Tensor) -> bool:
        """At the accumulation boundary, before the update: apply the policy to this step's unread loss flags
        (nonfinite=stop) and, without ZeRO, to the gradient norm, in one read. False: the update is dropped."""
        flags = [flag for flag, _ in self.unchecked]
        if self.cfg.deepspeed.zero_stage == 0:
            # Without ZeRO, DeepSpeed neither reports a gradient norm nor skips a non-finite update. The
            # gradients are all-reduced in p.grad at this point, so check them here, before the update.
            self.dense_grad_norm = dense_grad_norm(self.engine.module)
            flags.append(nonfinite_flag(self.dense_grad_norm))
        if not flags:
            return True
        bad = self.any_rank_flags(flags)
        unchecked, self.unchecked = self.unchecked, []
        for (_, parts), is_bad in zip(unchecked, bad, strict=False):
            if is_bad:
                self.on_nonfinite(f"loss parts {self.describe(parts)}")  # nonfinite=stop: raises
        if self.cfg.deepspeed.zero_stage == 0 and bad[-1]:
            self.engine.zero_grad()
            self.on_nonfinite(f"gradient norm {float(self.dense_grad_norm)} (loss {float(loss.detach()):.4g})")
            return False
        return True

    def on_nonfinite(self, what: str) -> None:
        step = self.step + 1
        if self.cfg.nonfinite == "stop":
            raise NonFiniteError(
                f"step {step}: non-finite {what} (rank {self.rank}); stopping with nonfinite=stop. The latest "
                "checkpoint is the last good state; lower the LR / enable grad clipping, or set nonfinite=skip."
            )
        self.skipped_batches += 1
        if self.is_main:
            print(f"[{self.cfg.run_name}] step {step}: skipped a non-finite batch ({what})", flush=True)
        if self.skipped_batches > self.cfg.max_skipped_steps:
            raise NonFiniteError(
                f"step {step}: {self.skipped_batches} non-finite batches skipped, more than "
                f"max_skipped_steps={self.cfg.max_skipped_steps}; last: {what}"
            )

    def add_to_window(self, parts: dict[str, torch.Tensor]) -> None:
        """Sum a kept micro-batch's loss parts into the log window, on the device (read at the next log)."""
        sums = self.window["sums"]
        for key, value in parts.items():
            value = value.double()  # fp64 sums: the same arithmetic as Python floats
            sums[key] = sums[key] + value if key in sums else value
        self.window["micro_batches"] += 1

    def train_step(self) -> None:
        """One optimizer update: `grad_accum_steps` finite micro-batches (dropped ones are replaced)."""
        start = time.perf_counter()
        done = 0
        while done < self.cfg.deepspeed.grad_accum_steps:
            if self.forward_backward(self.next_batch()):
                done += 1
        # ZeRO 1-3: a device tensor, or a host-side inf where DeepSpeed's overflow check skipped the update; without
        # ZeRO: None (the engine's own norm, checked before the update) or DeepSpeed's bf16 optimizer's.
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.dense_grad_norm
        elif not isinstance(grad_norm, torch.Tensor) and not math.isfinite(grad_norm):
            # ZeRO skipped this update itself (its overflow check); apply the policy on top.
            self.on_nonfinite(f"gradient norm {grad_norm}")
        self.task.after_optimizer_step()  # e.g. the classification task's weight EMA
        self.step += 1
        self.window["steps"] += 1
        self.window["grad_norm"] = grad_norm if grad_norm is not None else float("nan")
        if self.device.type == "cuda" and self.log_due():
            # Host time is GPU time only once the GPU has caught up: at log steps, so that step_s (and clips/s)
            # covers the work the earlier steps of the window queued.
            torch.cuda.synchronize(self.device)
        self.window["step_s"] += time.perf_counter() - start
        if not self.collective_timeout_set:
            self.shorten_collective_timeout()

    def shorten_collective_timeout(self) -> None:
        """After this process's first step, every process group gets `scaling.collective_timeout_s`. Not before:
        that step builds the NCCL communicators and compiles the kernels, which may take any rank minutes."""
        self.collective_timeout_set = True
        seconds = self.cfg.scaling.collective_timeout_s
        if seconds is None or self.world == 1:
            return
        groups = set_collective_timeout(seconds)
        if self.is_main:
            print(f"[{self.cfg.run_name}] collective timeout now {seconds:g} s on {groups} process groups "
                  "(scaling.collective_timeout_s): a rank that waits longer in a collective fails the group",
                  flush=True)

    # ------------------------------------------------------------------ metrics

    def _reset_window(self) -> None:
        # sums: {loss part: fp64 device tensor}; grad_norm: the last step's (a device tensor or a float)
        self.window: dict[str, Any] = {"sums": {}, "micro_batches": 0, "steps": 0,
                                       "data_wait_s": 0.0, "step_s": 0.0, "grad_norm": float("nan")}  # fmt: skip

    def log_due(self, force: bool = False) -> bool:
        """Whether `log_metrics` logs after the step just counted."""
        return bool(self.window["steps"]) and (force or self.step % self.cfg.tracking.log_interval == 0)

    def window_metrics(self) -> dict[str, float]:
        """Averages over the steps since the last log (loss parts averaged over ranks too); the window's one read
        of device values."""
        w = self.window
        keys = sorted(w["sums"])
        means = [w["sums"][k] / max(1, w["micro_batches"]) for k in keys]
        grad_norm = torch.as_tensor(w["grad_norm"], dtype=torch.float64, device=self.device).reshape(1)
        if keys:
            values = torch.cat([all_reduce_mean(torch.stack(means).to(self.device)), grad_norm])
        else:
            values = grad_norm
        *means, grad_norm = values.tolist()  # the one read (one device-to-host copy)
        metrics = {f"train/{k}": v for k, v in zip(keys, means, strict=True)}
        samples = w["steps"] * self.global_batch
        clips_per_s = samples / w["step_s"] if w["step_s"] > 0 else 0.0
        metrics.update({
            "train/lr": max(group["lr"] for group in self.optimizer.param_groups),
            "train/grad_norm": grad_norm,
            "train/clips_per_s": clips_per_s,
            "train/data_wait_fraction": w["data_wait_s"] / w["step_s"] if w["step_s"] > 0 else 0.0,
            "train/skipped_batches": float(self.skipped_batches),
            "train/memory_gib": memory_gib(self.device),
        })  # fmt: skip
        stats = getattr(self.train_loader, "stats", None)  # pipeline.data's decode and shard counters (this rank)
        if stats is not None:
            metrics.update(stats.as_metrics())
        epoch = getattr(self.train_loader, "epoch", None)  # pipeline.data's nominal epoch (with its fraction)
        if epoch is not None:
            metrics["data/epoch"] = float(epoch)
        if self.flops_per_sample is not None:
            tflops = self.flops_per_sample * clips_per_s / self.world / 1e12
            metrics["train/tflops_per_worker"] = tflops
            if self.peak_tflops:
                metrics["train/mfu"] = tflops / self.peak_tflops
        return metrics

    def log_profile(self, metrics: dict[str, float]) -> None:
        """Log and print a closed profiling window's communication fractions (rank 0 only has any)."""
        if not metrics:
            return
        self.profile_metrics = metrics
        if self.tracker:
            self.tracker.log_metrics(metrics, self.step)
        print(f"[{self.cfg.run_name}] profile at step {self.step}: "
              + " ".join(f"{k.removeprefix('profile/')} {v:.3g}" for k, v in metrics.items()), flush=True)

    def log_metrics(self, force: bool = False) -> None:
        """Every `log_interval` steps: reduce the window's metrics, log them from rank 0, print progress."""
        if not self.log_due(force):
            return
        metrics = self.window_metrics()
        step_s = self.window["step_s"] / self.window["steps"]
        self._reset_window()
        self.last_metrics = metrics
        if not self.is_main:
            return
        if self.tracker:
            self.tracker.log_metrics(metrics, self.step)
            self.tracker.flush()
        eta = _format_eta((self.cfg.optim.max_steps - self.step) * step_s)
        print(
            f"[{self.cfg.run_name}] step {self.step}/{self.cfg.optim.max_steps} loss {metrics['train/loss']:.4f} "
            f"lr {metrics['train/lr']:.2e} clips/s {metrics['train/clips_per_s']:.1f} "
            f"data-wait {metrics['train/data_wait_fraction']:.0%} eta {eta}",
            flush=True,
        )

    # ------------------------------------------------------------------ evaluation and export

    @property
    def can_evaluate(self) -> bool:
        """The task evaluates (`TaskSpec.evaluates`) and has eval data: its own, or `data.eval_shards`."""
        return self.spec.evaluates and (self.spec.own_loader or self.cfg.data.eval_shards is not None)

    def maybe_eval(self, force: bool = False) -> dict[str, float]:
        interval = self.cfg.eval.interval_steps
        if not self.can_evaluate or not (force or (interval and self.step % interval == 0)):
            return {}
        loader = self.build_loader("eval")
        batches = (self.to_device(b) for b in itertools.islice(loader, self.cfg.eval.max_batches))
        self.engine.eval()
        with torch.no_grad():
            local = self.engine.module.evaluate(batches)
        self.engine.train()
        keys = sorted(local)
        values = all_reduce_mean(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=self.device))
        metrics = {f"eval/{k}": v for k, v in zip(keys, values.cpu().tolist(), strict=True)}
        if self.tracker:
            self.tracker.log_metrics(metrics, self.step)
            self.tracker.flush()
        if self.is_main:
            print(f"[{self.cfg.run_name}] eval at step {self.step}: {metrics}", flush=True)
        self.eval_metrics, self.evaluated_at = metrics, self.step
        return metrics

    def export(self) -> str:
        """Rank 0 writes `<output_dir>/export/model.pt` (ZeRO-3 parameters gathered first; weights as fp32)."""
        module = self.engine.module.trainable_module()
        with self._gathered(list(module.parameters())):
            # Cloned: gathered ZeRO-3 storage is released when the block ends.
            state = {k: (v.detach().float() if v.is_floating_point() else v).cpu().clone()
                     for k, v in module.state_dict().items()}  # fmt: skip
        state = self.task.export_state_dict(state)  # e.g. the classification task's EMA weights in their place
        path = stage_export_path(self.cfg.output_dir)
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch_save_file(stage_export(self.cfg, self.engine.module, state, self.step), path, "stage export",
                            "output_dir")
            if self.tracker:
                self.tracker.set_tag("export_path", str(path.resolve()))
        return str(path.resolve())

    # ------------------------------------------------------------------ loop

    def fit(self) -> TrainResult:
        """Train to `optim.max_steps`, checkpointing, logging and evaluating on the way; then export."""
        try:
            start_step = self.step
            while self.step < self.cfg.optim.max_steps:
                self.profiler.before_step(self.step + 1)
                self.train_step()
                self.log_profile(self.profiler.after_step(self.step))
                self.log_metrics()
                self.maybe_eval()
                self.maybe_checkpoint()
            self.log_metrics(force=True)
            if self.step != start_step and self.step % self.cfg.checkpoint.interval_steps:
                self.maybe_checkpoint(force=True)
            if self.evaluated_at != self.step:
                self.maybe_eval(force=True)
            export_path = self.export()
        except BaseException:
            if self.tracker:
                self.tracker.end("FAILED")
            raise
        if self.tracker:
            self.tracker.end("FINISHED")
        result = TrainResult(
            step=self.step,
            metrics={**self.last_metrics, **self.profile_metrics, **self.eval_metrics},
            mlflow_run_id=self.mlflow_run_id,
            export_path=export_path,
            resumed_from_step=self.resumed_from_step,
        )
        if self.is_main:
            write_run_record(self.cfg, dataclasses.asdict(result))
        return result


def train(cfg: Config) -> TrainResult:
    """Local (no Ray) training in this process; under torchrun every rank calls it."""
    store = LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep)
    return Trainer(cfg, store).fit()
