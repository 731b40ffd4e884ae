"""Fine-tuning step: VideoMamba-S vs a joint-attention TimeSformer-S of the same width at 8 / 32 / 64 frames, one GPU.

The step is the fine-tuning task's own (pipeline.tasks.classification.ClassificationTask): Mixup / CutMix with
label smoothing, soft-target cross-entropy, the model's drop path, backward, and a torch AdamW over the released
parameter groups (weight decay 0.05, layer decay 0.75 in the released scope); bf16 autocast over fp32 weights, as
the released fine-tuning runs. Both models get the same task and optimizer; VideoMamba-S runs on our Triton scan
(docs/model.md), TimeSformer-S is DeiT-S (width 384, 12 layers, 6 heads) attending jointly over all 1 + T*196
tokens with PyTorch's fused SDPA (benchmarks/bench_model.py's TimeSformerJoint, its S twin). Batches are the released
per-GPU clip counts (videos x 2 repeated-augmentation copies: 128 at 8 frames, 32 at 32, 16 at 64), halved on
out-of-memory. Inputs are random tensors already on the GPU: data loading is not part of the step.
Times are medians of CUDA-event timed steps after two warm-up steps; memory is the peak allocated during them.
Each row is measured alone; the result files are rewritten after every row (a killed run keeps its rows).
Needs torch, triton and this repository only (no Ray, DeepSpeed or PyAV).

    PYTHONPATH=.:benchmarks python benchmarks/bench_finetune.py [--frames 8 32 64] [--results-dir DIR]
    ... --device cpu --tiny --frames 2 4 --batches 2 2 --steps 2 --results-dir /tmp/ft   # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS, write_results
from bench_model import SIZES, TINY, TimeSformerJoint, timed_call_ms
from torch import nn

from models import create_model
from pipeline.optim import param_groups
from pipeline.tasks.classification import ClassificationTask
from pipeline.tasks.mixup import MixupCutmix

NUM_CLASSES = 400
KINDS = ("videomamba", "timesformer")
TITLE = "Fine-tuning step: VideoMamba-S vs TimeSformer-S (joint attention)"


def build_model(kind: str, frames: int, args: argparse.Namespace) -> nn.Module:
    if kind == "videomamba":
        return create_model(args.model, num_frames=frames, img_size=args.img_size, num_classes=NUM_CLASSES,
                            drop_path_rate=args.drop_path, scan_backend=args.backend)
    return TimeSformerJoint(frames, args.img_size, embed_dim=args.ref_width, depth=args.ref_depth,
                            heads=args.ref_heads, num_classes=NUM_CLASSES)


def label(kind: str, frames: int, args: argparse.Namespace) -> dict:
    name = (f"VideoMamba ({args.model}, {args.backend} scan)" if kind == "videomamba"
            else f"TimeSformer joint (width {args.ref_width}, {args.ref_depth} layers)")
    return {"model": name, "kind": kind, "frames": frames}


def measure(kind: str, frames: int, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """clips/s and peak memory of the fine-tuning step at `batch` clips."""
    torch.manual_seed(0)
    mixup = MixupCutmix(NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1, seed=0)
    task = ClassificationTask(build_model(kind, frames, args), NUM_CLASSES, label_smoothing=0.1, mixup=mixup)
    task = task.to(device).train()
    groups = param_groups(task, weight_decay=0.05, layer_decay=0.75, layer_decay_scope="released",
                          decay_ssm_a=True)
    for group in groups:
        group["lr"] = 8e-4 * group["lr_scale"]
        del group["names"]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=device.type == "cuda")
    video = torch.randn(batch, 3, frames, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = task({"video": video, "label": labels})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: Triton compilation, cuBLAS/SDPA selection, optimizer state
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = median_step_ms(step, device, args.steps, args.seconds)
    row = {**label(kind, frames, args), "batch": batch, "ms/step": ms, "clips/s": batch / ms * 1e3}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        row.update({"peak GiB": peak, "GiB/clip": peak / batch})
    return row


def median_step_ms(step: Callable[[], object], device: torch.device, max_steps: int, max_s: float) -> float:
    """Median ms of up to `max_steps` timed steps (at least 2), stopping once `max_s` seconds were spent."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_steps and (len(times) < 2 or time.perf_counter() - start < max_s):
        times.append(timed_call_ms(step, device))
    return statistics.median(times)


def measure_halving(kind: str, frames: int, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """measure() at `batch`, halving it on out-of-memory; any other error is kept in the row."""
    while True:
        try:
            return measure(kind, frames, batch, args, device)
        except torch.OutOfMemoryError:
            if batch == 1:
                return {**label(kind, frames, args), "error": "out of memory at batch 1"}
            batch //= 2
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
            return {**label(kind, frames, args), "batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """VideoMamba rows get its clips/s over TimeSformer's and TimeSformer's memory per clip over its own."""
    by = {(r["kind"], r["frames"]): r for r in rows}
    for r in rows:
        other = by.get(("timesformer", r["frames"]))
        if r["kind"] != "videomamba" or not other or "clips/s" not in r or "clips/s" not in other:
            continue
        r["speed vs TimeSformer"] = r["clips/s"] / other["clips/s"]
        if "GiB/clip" in r and "GiB/clip" in other:
            r["memory/clip: TimeSformer / VideoMamba"] = other["GiB/clip"] / r["GiB/clip"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 32, 16],
                        help="clips per step for each --frames entry (halved on OOM)")
    small = SIZES["S"]
    ref_width, ref_depth, ref_heads = small.timesformer  # bench_model's matched TimeSformer: DeiT-S
    parser.add_argument("--model", default=small.registry)
    parser.add_argument("--backend", default="triton", help="VideoMamba scan_backend")
    parser.add_argument("--drop-path", type=float, default=0.35, help="VideoMamba drop path (S on K400)")
    parser.add_argument("--img-size", type=int, default=small.img_size)
    parser.add_argument("--ref-width", type=int, default=ref_width, help="TimeSformer width (DeiT-S)")
    parser.add_argument("--ref-depth", type=int, default=ref_depth, help="TimeSformer layers")
    parser.add_argument("--ref-heads", type=int, default=ref_heads, help="TimeSformer heads")
    parser.add_argument("--tiny", action="store_true",
                        help="bench_model's tiny pair (videomamba_test at 32 px, reference scan) for a CPU smoke test")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--seconds", type=float, default=6.0, help="stop timing a row after this long")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the rows left after this long")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.tiny:
        args.model, args.img_size, args.backend = TINY.registry, TINY.img_size, "ref"
        args.ref_width, args.ref_depth, args.ref_heads = TINY.timesformer
    if len(args.batches) != len(args.frames):
        parser.error("--batches needs one clip count per --frames entry")
    device = torch.device(args.device)
    setup = {"step": "ClassificationTask: Mixup 0.8 / CutMix 1.0, label smoothing 0.1, soft-target CE, backward, "
             "torch AdamW (fused) over the released groups (wd 0.05 incl. A_log, layer decay 0.75 released scope)",
             "precision": "bf16 autocast, fp32 weights", "img_size": args.img_size, "videomamba": args.model,
             "scan_backend": args.backend, "drop_path": args.drop_path,
             "timesformer": f"joint attention, width {args.ref_width}, {args.ref_depth} layers, {args.ref_heads} "
             "heads, torch SDPA, no drop path", "timing": f"median of <= {args.steps} steps after 2 (CUDA events)",
             "date": time.strftime("%Y-%m-%d")}
    columns = ["model", "frames", "batch", "ms/step", "clips/s", "peak GiB", "GiB/clip", "speed vs TimeSformer",
               "memory/clip: TimeSformer / VideoMamba", "error"]
    notes = ["peak GiB: the most memory allocated during the timed steps (weights, optimizer state, activations); "
             "ratios compare the two models at the same frame count, in this run."]
    rows: list[dict] = []
    start = time.perf_counter()
    for frames, batch in zip(args.frames, args.batches, strict=True):
        for kind in KINDS:
            if time.perf_counter() - start > args.budget_s:
                skipped = f"skipped: the {args.budget_s:g} s budget was spent"
                rows.append({**label(kind, frames, args), "error": skipped})
            else:
                rows.append(measure_halving(kind, frames, batch, args, device))
            print(rows[-1], flush=True)
            add_ratios(rows)
            write_results("finetune", rows, columns, TITLE, setup=setup, results_dir=args.results_dir, notes=notes)


if __name__ == "__main__":
    main()
