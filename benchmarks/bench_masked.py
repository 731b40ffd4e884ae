"""Stage 1 training step (masked alignment: frozen CLIP ViT-B/16 teacher + VideoMamba student), one GPU.

The task is built from the shipped stage configs (configs/stages/pretrain_mask_{ti,s}.yaml), cast whole to
bf16 as DeepSpeed's bf16 mode does (the teacher frozen), with the Triton scan and the pipeline's torch AdamW
(pipeline.optim.build_optimizer). The teacher has random weights: speed does not depend on them. Timed:
- full step: teacher forward + attention-mask sampling + student fwd/bwd at the config's 80% masking + AdamW;
- the teacher forward alone;
- the student step (the same step on cached teacher outputs) at 80% masking and unmasked (all 1 + T*P tokens).
CUDA events, median of --steps after --warmup steps; peak memory of a full step and of an unmasked one. On a GPU,
all of it again with `model.cuda_graph=true` (the student replayed from CUDA graphs), in the same process.

    PYTHONPATH=.:benchmarks HF_HUB_OFFLINE=1 python benchmarks/bench_masked.py [--configs ti s]
    # CPU smoke test: --model videomamba_test --img-size 32 --batch 2 --steps 2 --device cpu --backend ref
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from _common import RESULTS, write_results
from torch import nn

from pipeline.config import load_config
from pipeline.optim import build_optimizer, peak_lr
from pipeline.tasks import build_task
from pipeline.tasks.attention_mask import num_visible
from pipeline.tasks.masked_alignment import MaskedAlignmentTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stages"
TARGET_SPEEDUP = 3.0  # issue 7: the 80%-masked student must train >= 3x the clips/s of the unmasked one


class CachedTeacher(nn.Module):
    """Returns one precomputed teacher output, so a step costs only the student side."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, video_BCTHW: torch.Tensor):
        return self.output


@contextmanager
def cached_teacher(task: MaskedAlignmentTask, video_BCTHW: torch.Tensor) -> Iterator[None]:
    teacher = task.teacher
    task.teacher = CachedTeacher(teacher(video_BCTHW))
    try:
        yield
    finally:
        task.teacher = teacher


def median_ms(fn: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    """Median wall time of `steps` calls after `warmup` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated memory during one call (weights, optimizer state and batch included); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def build(stem: str, args: argparse.Namespace, device: torch.device, cuda_graph: bool):
    """The stage config's task (cast as the engine casts it), its optimizer and the config."""
    overrides = [f"model.scan_backend={args.backend}", "task.teacher.pretrained=null",
                 f"data.batch_size={args.batch}", f"model.img_size={args.img_size}", f"data.img_size={args.img_size}",
                 f"model.cuda_graph={str(cuda_graph).lower()}"]
    if args.model:
        overrides.append(f"model.name={args.model}")
    cfg = load_config(CONFIGS / f"pretrain_mask_{stem}.yaml", overrides)
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the engine's rule
    task = build_task(cfg).to(device=device, dtype=dtype).train()
    optimizer, _ = build_optimizer(task, cfg.optim, peak_lr(cfg.optim, args.batch))
    return task, optimizer, cfg


def time_steps(task: MaskedAlignmentTask, optimizer, video: torch.Tensor, args: argparse.Namespace,
               device: torch.device) -> dict[str, float | None]:
    """The full step, the teacher forward, and the student step masked and unmasked (on cached teacher outputs)."""
    batch = {"video": video}

    def step() -> None:
        task(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn: Callable[[], object]) -> float:
        return median_ms(fn, args.warmup, args.steps, device)

    # Peaks from each kind of step's first call: with model.cuda_graph that call captures the graphs, whose memory
    # pool then holds the activations across replays, which allocate nothing new.
    times = {"peak GiB": peak_gib(step, device), "step ms": timed(step)}
    with torch.no_grad():
        times["teacher fwd ms"] = timed(lambda: task.teacher(video))
    mask_type = task.masks.mask_type
    with cached_teacher(task, video):
        times["student step ms (masked)"] = timed(step)
        task.masks.mask_type = "none"
        times["peak GiB (no mask)"] = peak_gib(step, device)
        times["student step ms (no mask)"] = timed(step)
        task.masks.mask_type = mask_type
    return times


def bench_config(stem: str, args: argparse.Namespace, device: torch.device) -> dict:
    task, optimizer, cfg = build(stem, args, device, cuda_graph=False)
    video = torch.randn(args.batch, 3, cfg.data.num_frames, args.img_size, args.img_size, device=device,
                        dtype=next(task.parameters()).dtype)
    T, P = task.student.num_frames, task.student.num_patches
    row = {"model": cfg.model.name, "batch": args.batch, "mask ratio": cfg.data.mask.ratio,
           "tokens (masked / all)": f"{1 + T * num_visible(P, cfg.data.mask.ratio)} / {1 + T * P}"}
    row.update(time_steps(task, optimizer, video, args, device))
    row["clips/s"] = args.batch / row["step ms"] * 1e3
    row["teacher share"] = row["teacher fwd ms"] / row["step ms"]
    row["student share"] = row["student step ms (masked)"] / row["step ms"]
    row["student clips/s (masked)"] = args.batch / row["student step ms (masked)"] * 1e3
    row["student clips/s (no mask)"] = args.batch / row["student step ms (no mask)"] * 1e3
    row["masked / unmasked clips/s"] = row["student clips/s (masked)"] / row["student clips/s (no mask)"]
    if device.type == "cuda":  # the same steps with the student replayed from CUDA graphs (model.cuda_graph)
        del task, optimizer
        torch.cuda.empty_cache()
        task, optimizer, _ = build(stem, args, device, cuda_graph=True)
        graphs = time_steps(task, optimizer, video, args, device)
        row.update({f"{key}, graphs": value for key, value in graphs.items()})
        row["clips/s, graphs"] = args.batch / graphs["step ms"] * 1e3
        row["graphs speedup (step)"] = row["step ms"] / graphs["step ms"]
        row["graphs speedup (student, masked)"] = row["student step ms (masked)"] / graphs["student step ms (masked)"]
        row["masked / unmasked clips/s, graphs"] = (graphs["student step ms (no mask)"]
                                                    / graphs["student step ms (masked)"])
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ti", "s"], help="stage configs pretrain_mask_<name>.yaml")
    parser.add_argument("--model", help="replace the configs' model.name (e.g. videomamba_test for a CPU check)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="clips per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton", help="model.scan_backend")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench_config(stem, args, device) for stem in args.configs]
    setup = {"precision": "bf16" if device.type == "cuda" else "fp32", "scan_backend": args.backend,
             "img_size": args.img_size, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
             "teacher": "CLIP ViT-B/16, random weights, frozen", "optimizer": "torch AdamW (pipeline.optim)"}
    columns = ["model", "batch", "tokens (masked / all)", "step ms", "clips/s", "peak GiB", "teacher share",
               "student share", "student clips/s (masked)", "student clips/s (no mask)",
               "masked / unmasked clips/s", "peak GiB (no mask)"]
    notes = [f"Step = teacher forward + mask sampling + student fwd/bwd + AdamW, {args.batch} clips. Shares are "
             "the teacher forward and the student step (on cached teacher outputs) over the full step. "
             f"Target: masked / unmasked student clips/s >= {TARGET_SPEEDUP:g}."]
    if device.type == "cuda":
        columns += ["step ms, graphs", "clips/s, graphs", "graphs speedup (step)", "graphs speedup (student, masked)",
                    "masked / unmasked clips/s, graphs", "peak GiB, graphs"]
        notes.append("graphs: the same steps with model.cuda_graph=true, the student's forward and backward "
                     "replayed from CUDA graphs (pipeline/cuda_graph.py); same process, same inputs.")
    write_results("masked", rows, columns, "Stage 1 training step: CLIP teacher + masked VideoMamba student",
                  setup=setup, results_dir=args.results_dir, notes=notes)


if __name__ == "__main__":
    main()
