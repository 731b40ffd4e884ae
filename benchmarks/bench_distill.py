"""Stage 2 (self-distillation) and Stage 4 (fine-tuning) training steps, eager and replayed from CUDA graphs
(`model.cuda_graph`), one GPU, one process, side by side.

- Stage 2, configs/stages/self_distill_s_to_m.yaml: a frozen VideoMamba-S teacher (random weights, written as a
  stage export) teaches VideoMamba-M, 8 frames at 224 px, every token (the config's `mask: none`), the config's
  gradient checkpointing of the first 8 mixers and drop path 0.5. graphs: the student's forward and backward and
  the teacher's forward (a forward-only graph).
- Stage 4, configs/stages/finetune_k400_s_f8.yaml: VideoMamba-S, 8 frames at 224 px, 400 classes, Mixup / CutMix
  with label smoothing, drop path 0.35. graphs: the classifier's forward and backward on the mixed clip.

Each task is built from its config with random weights, cast whole to bf16 as DeepSpeed's bf16 mode does, on the
Triton scan, with the pipeline's torch AdamW over the config's parameter groups (layer decay for Stage 4). Timed
(CUDA events, median of --steps after --warmup): the whole step (forward, loss, backward, AdamW) at --batch clips,
and Stage 2's teacher forward alone; peak memory of the first step (with graphs, the one that captures them); the
host syncs of one step (pipeline/host_syncs.py: torch's sync debug mode). The eager task is freed before the
graphed one is built. The engine's own per-step syncs (DeepSpeed included) are benchmarks/bench_syncs.py's.

    PYTHONPATH=.:benchmarks HF_HUB_OFFLINE=1 python benchmarks/bench_distill.py [--stages distill finetune]
    # CPU smoke test: --tiny --device cpu --backend ref --batch 2 --warmup 0 --steps 1 --results-dir /tmp/d
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, write_results
from bench_masked import median_ms, peak_gib

from models import create_model
from pipeline.config import load_config
from pipeline.host_syncs import count_host_syncs, print_summary
from pipeline.optim import build_optimizer, peak_lr
from pipeline.tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stages"
STAGES = {"distill": "self_distill_s_to_m.yaml", "finetune": "finetune_k400_s_f8.yaml"}
# --tiny: the CPU test models in the same configs (student, teacher, classifier).
TINY = {"student": "videomamba_test_wide", "teacher": "videomamba_test", "classifier": "videomamba_test"}
FULL = {"student": None, "teacher": "videomamba_small", "classifier": None}


def write_teacher(path: Path, args: argparse.Namespace) -> str:
    """A stage export of a randomly initialised teacher, as Stage 1 would leave it (speed does not depend on it)."""
    name = (TINY if args.tiny else FULL)["teacher"]
    kwargs = {"num_frames": args.frames, "img_size": args.img_size, "num_classes": 0, "scan_backend": args.backend}
    torch.manual_seed(0)
    torch.save({"state_dict": create_model(name, **kwargs).state_dict(),
                "meta": {"task": "masked_alignment", "model_name": name, "model_kwargs": kwargs}}, path)
    return str(path)


def build(stage: str, args: argparse.Namespace, device: torch.device, cuda_graph: bool, teacher: str):
    """The stage config's task (cast as the engine casts it), its optimizer and a batch on the device."""
    overrides = [f"model.scan_backend={args.backend}", f"data.batch_size={args.batch}",
                 f"model.img_size={args.img_size}", f"data.img_size={args.img_size}",
                 f"model.num_frames={args.frames}", f"data.num_frames={args.frames}",
                 f"model.cuda_graph={str(cuda_graph).lower()}"]
    names = TINY if args.tiny else FULL
    if args.tiny:
        overrides += ["model.use_checkpoint=false"]
    if stage == "distill":
        overrides += [f"task.teacher_checkpoint={teacher}", "task.teacher_model=null",
                      f"task.teacher_model_kwargs={{num_frames: {args.frames}, img_size: {args.img_size}}}"]
        if names["student"]:
            overrides.append(f"model.name={names['student']}")
    else:
        overrides += ["task.class_index=null"]
        if names["classifier"]:
            overrides.append(f"model.name={names['classifier']}")
    cfg = load_config(CONFIGS / STAGES[stage], overrides)
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the engine's rule
    task = build_task(cfg).to(device=device, dtype=dtype).train()
    optimizer, _ = build_optimizer(task, cfg.optim, peak_lr(cfg.optim, args.batch))
    generator = torch.Generator().manual_seed(0)
    batch = {"video": torch.randn(args.batch, 3, args.frames, args.img_size, args.img_size,
                                  generator=generator).to(device, dtype)}
    if stage == "finetune":
        batch["label"] = torch.randint(0, cfg.task.num_classes, (args.batch,), generator=generator).to(device)
    return task, optimizer, batch, cfg


def time_task(stage: str, args: argparse.Namespace, device: torch.device, cuda_graph: bool,
              teacher: str) -> tuple[dict[str, float | None], dict]:
    task, optimizer, batch, cfg = build(stage, args, device, cuda_graph, teacher)

    def step() -> None:
        task(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, float | None] = {"peak GiB": peak_gib(step, device)}  # with graphs: the capture's call
    times["step ms"] = median_ms(step, args.warmup, args.steps, device)
    times["clips/s"] = args.batch / times["step ms"] * 1e3
    with count_host_syncs(device) as log:
        step()
    times["syncs/step"] = float(len(log.sites))
    times["our syncs/step"] = float(len(log.ours))  # pipeline/ and models/ (the rest: torch.optim, on a GPU none)
    print_summary(f"{stage}, {'graphs' if cuda_graph else 'eager'}: one step", log)
    if stage == "distill":
        times["teacher fwd ms"] = median_ms(lambda: task._teacher_runner(batch["video"], training=True),
                                            args.warmup, args.steps, device)
    model = task.trainable_module()
    info = {"model": cfg.model.name, "tokens": 1 + model.grid[0] * model.num_patches}
    if stage == "distill":
        info["model"] = f"{(TINY if args.tiny else FULL)['teacher']} -> {cfg.model.name}"
    return times, info


def bench_stage(stage: str, args: argparse.Namespace, device: torch.device, teacher: str) -> dict:
    eager, info = time_task(stage, args, device, cuda_graph=False, teacher=teacher)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the eager task is gone: hand its memory back before the graphs' pools
    row = {"stage": {"distill": "2 self-distillation", "finetune": "4 fine-tuning"}[stage], **info,
           "frames": args.frames, "batch": args.batch, **{f"eager {k}": v for k, v in eager.items()}}
    if device.type == "cuda":
        graphs, _ = time_task(stage, args, device, cuda_graph=True, teacher=teacher)
        torch.cuda.empty_cache()
        row.update({f"graphs {k}": v for k, v in graphs.items()})
        row["graphs speedup"] = eager["step ms"] / graphs["step ms"]
        if stage == "distill":
            row["teacher graph speedup"] = eager["teacher fwd ms"] / graphs["teacher fwd ms"]
    print(row, flush=True)
    return row


def write_rows(rows: list[dict], args: argparse.Namespace, device: torch.device) -> None:
    columns = ["stage", "model", "frames", "tokens", "batch", "eager step ms", "eager clips/s", "eager peak GiB",
               "eager syncs/step", "eager our syncs/step"]
    if device.type == "cuda":
        columns += ["graphs step ms", "graphs clips/s", "graphs peak GiB", "graphs syncs/step",
                    "graphs our syncs/step", "graphs speedup",
                    "eager teacher fwd ms", "graphs teacher fwd ms", "teacher graph speedup"]
    setup = {"precision": "bf16" if device.type == "cuda" else "fp32", "scan_backend": args.backend,
             "img_size": args.img_size, "frames": args.frames, "batch": args.batch, "warmup": args.warmup,
             "steps": args.steps, "configs": [STAGES[s] for s in args.stages],
             "weights": "random (student, teacher, classifier)", "optimizer": "torch AdamW (pipeline.optim)"}
    notes = ["Step = forward + loss + backward + AdamW of the task as the stage config builds it (Stage 2: teacher "
             "forward on every token, student on every token with the config's checkpointing of 8 mixers, distill "
             "head; Stage 4: Mixup / CutMix, classifier, soft-target cross-entropy). graphs: model.cuda_graph=true, "
             "same process, same inputs (Stage 2: student forward + backward and teacher forward; Stage 4: the "
             "classifier's forward + backward). syncs/step: host syncs of one step (torch's sync debug mode; on a "
             "CPU, the Python-level reads of tensor values instead, torch.optim's own included); our: those made "
             "in pipeline/ and models/."]
    write_results("distill", rows, columns, "Stage 2 and Stage 4 training steps, eager and CUDA-graphed",
                  setup=setup, results_dir=args.results_dir, notes=notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=["distill", "finetune"])
    parser.add_argument("--batch", type=int, default=16, help="clips per step")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton", help="model.scan_backend")
    parser.add_argument("--tiny", action="store_true", help="the CPU test models (videomamba_test[_wide]), 32 px")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.tiny:
        args.img_size = 32
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        teacher = write_teacher(Path(tmp) / "teacher.pt", args)
        rows = []
        for stage in args.stages:  # the result files are rewritten after every stage: a killed run keeps its rows
            rows.append(bench_stage(stage, args, device, teacher))
            write_rows(rows, args, device)


if __name__ == "__main__":
    main()
