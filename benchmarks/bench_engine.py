"""Engine overhead on CPU: the real `Trainer` (DeepSpeed + MLflow tracking) vs a bare PyTorch loop, same work.

    PYTHONPATH=. python benchmarks/bench_engine.py            # writes benchmarks/results/engine.{json,md}
    PYTHONPATH=. python benchmarks/bench_engine.py --steps 5 --rounds 1 --out /tmp/quick

Both sides train the same masked-alignment task (configs/stages/pretrain_mask_test.yaml: VideoMamba student,
random tiny CLIP teacher, attention masks) from the same seed on the same in-memory batches (no data loading):

- `bare`: `task(batch)["loss"].backward()`, torch AdamW with the engine's parameter groups and LR schedule,
  `step()`, `zero_grad()`;
- `engine ZeRO-z`: `Trainer(cfg, store)` on the local path (no Ray) with its batches replaced by the same list,
  running `fit()`'s loop body (`train_step`, `log_metrics`, `maybe_eval`, `maybe_checkpoint`) with MLflow
  logging every `log_interval` steps into a sqlite store and no checkpoint inside the timed window.

Ray is not measured: its workers run this same Trainer loop (per-step cost identical), and Ray's own costs are
per run (start-up, ~30-60 s on this machine) and per checkpoint (`ray.train.report`), not per step.
Two sizes: videomamba_test as shipped (4 frames, 32 px) and a larger CPU size (8 frames, 64 px, batch 4).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu import cpu_meta, interleaved_ms_per_step, write_cpu_results  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "videomamba_test 4f 32px b4": [],
    "videomamba_test 8f 64px b4": ["model.num_frames=8", "model.img_size=64", "data.num_frames=8",
                                   "data.img_size=64"],  # fmt: skip
}


def make_batches(cfg: Config, count: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    d = cfg.data
    shape = (d.batch_size, 3, d.num_frames, d.img_size, d.img_size)
    return [{"video": torch.randn(shape, generator=gen), "index": torch.arange(d.batch_size) + i * d.batch_size,
             "text": ["a clip"] * d.batch_size} for i in range(count)]  # fmt: skip


def bare_loop(cfg: Config, batches: list[dict]):
    """A plain PyTorch training loop over `batches` (cycled); returns run(steps)."""
    from pipeline.optim import build_optimizer, peak_lr
    from pipeline.tasks import build_task

    torch.manual_seed(cfg.seed)  # as the Trainer seeds before building the task: the same initial weights
    task = build_task(cfg).train()
    optimizer, scheduler = build_optimizer(task, cfg.optim, peak_lr(cfg.optim, cfg.data.batch_size))
    stream = itertools.cycle(batches)

    def run(steps: int) -> None:
        for _ in range(steps):
            loss = task(next(stream))["loss"]
            loss.backward()
            if cfg.deepspeed.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.deepspeed.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def engine_loop(cfg: Config, batches: list[dict]):
    """The engine's Trainer (local store, MLflow on) over `batches` (cycled); returns run(steps)."""
    from pipeline.checkpointing import LocalCheckpointStore, run_storage
    from pipeline.engine import Trainer

    trainer = Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))
    trainer.batches = itertools.cycle(batches)

    def run(steps: int) -> None:
        for _ in range(steps):
            trainer.train_step()
            trainer.log_metrics()
            trainer.maybe_eval()
            trainer.maybe_checkpoint()

    return run, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2], help="ZeRO stages to measure")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = {**cpu_meta(), "steps_per_round": args.steps, "rounds": args.rounds}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        for size, overrides in SIZES.items():
            variants = {}
            for stage in args.zero:
                cfg = load_config(REPO / "configs/stages/pretrain_mask_test.yaml", [
                    "scaling.use_ray=false", f"output_dir={tmp}/out", f"checkpoint.path={tmp}/ckpt",
                    f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.run_name={size}-z{stage}".replace(" ", "_"),
                    "tracking.log_interval=10", "checkpoint.interval_steps=1000000", "optim.max_steps=1000000",
                    "optim.warmup_steps=0", "data.batch_size=4", f"deepspeed.zero_stage={stage}", *overrides,
                ])  # fmt: skip
                batches = make_batches(cfg, 8)
                variants[f"engine ZeRO-{stage}"], _ = engine_loop(cfg, batches)
            variants = {"bare": bare_loop(cfg, batches), **variants}
            timings = interleaved_ms_per_step(variants, args.steps, args.rounds, warmup=3)
            bare = timings["bare"]["ms_median"]
            for name, t in timings.items():
                rows.append({"size": size, "loop": name, **t, "ratio_vs_bare": t["ms_median"] / bare,
                             "overhead_pct": 100 * (t["ms_median"] / bare - 1)})  # fmt: skip
            print(rows[-len(timings):], flush=True)
    meta["load_avg_1min_end"] = os.getloadavg()[0]
    notes = [
        f"CPU: {meta['cores']} cores of {meta['cpu']!r}, shared with other jobs (1-min load average "
        f"{meta['load_avg_1min']:.2f} at start, {meta['load_avg_1min_end']:.2f} at end); torch {meta['torch']}, "
        f"{args.threads} thread(s). Median of {args.rounds} interleaved rounds of {args.steps} steps (fp32).",
        "Same task, seed and in-memory batches on both sides; the engine logs to MLflow (sqlite) every 10 steps.",
    ]
    columns = ["size", "loop", "ms_median", "ms_min", "ratio_vs_bare", "overhead_pct"]
    write_cpu_results("engine", meta, rows, columns, "Engine overhead vs a bare PyTorch loop (CPU)", notes, args.out)


if __name__ == "__main__":
    main()
