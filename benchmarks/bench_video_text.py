"""Stage 3 training step, eager and with the video encoder replayed from CUDA graphs (`model.cuda_graph`), one GPU,
one process: the open_clip-text task (`--text clip`, VTC + VTM + UTA) or the released BERT-tower one (`--text bert`,
VTC + VTM + MLM + UTA).

The task is built from configs/stages/pretrain_vtc_m_5m.yaml or pretrain_vtc_bert_m_5m.yaml (VideoMamba-M, 8 frames
at 224 px, attention masks at 80% from a frozen CLIP ViT-B/16; its gradient checkpointing of the first 8 blocks'
mixers, and without) with random weights, cast whole to bf16 as DeepSpeed's bf16 mode does, the Triton scan and
the pipeline's torch AdamW. `--phase unmasked` is the unmasked tuning instead (no mask, no teacher, no UTA). The
BERT tower gets a generated 30,522-token vocabulary (bert-base-uncased's size), so no download is needed. Timed:
the full step (teacher, masks, both encoders, the losses, AdamW) at --batch clips, median of --steps after
--warmup (CUDA events), and its peak memory (first call: with graphs, the one that captures them).

    PYTHONPATH=.:benchmarks HF_HUB_OFFLINE=1 python benchmarks/bench_video_text.py [--batch 64] [--checkpointing on]
    PYTHONPATH=.:benchmarks HF_HUB_OFFLINE=1 python benchmarks/bench_video_text.py --text bert --batch 128
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, write_results
from bench_masked import median_ms, peak_gib

from pipeline.config import load_config
from pipeline.optim import build_optimizer, peak_lr
from pipeline.tasks import build_task

STAGES = Path(__file__).resolve().parents[1] / "configs" / "stages"
CONFIGS = {"clip": STAGES / "pretrain_vtc_m_5m.yaml", "bert": STAGES / "pretrain_vtc_bert_m_5m.yaml"}
BERT_VOCAB = 30522  # bert-base-uncased
WORDS = "a person dog car ball runs jumps throws walks park street kitchen red blue slowly quickly".split()


def captions(batch: int) -> list[str]:
    """Distinct captions of the config's length range, deterministic."""
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g).tolist()) for _ in range(batch)]


def bert_vocab_folder(root: Path) -> Path:
    """A folder with a vocab.txt of bert-base-uncased's size: the specials, WORDS, then unused fillers."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokens += [f"[unused{i}]" for i in range(BERT_VOCAB - len(tokens))]
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return root


def task_overrides(args: argparse.Namespace) -> list[str]:
    """Random weights for the text tower of `--text`, and the unmasked tuning's settings for `--phase unmasked`."""
    text = (["task.text.pretrained=null"] if args.text == "clip"
            else [f"task.text.model={args.vocab}", "task.text.load_weights=false"])
    phase = ["data.mask.type=none", "task.uta_weight=0.0"] if args.phase == "unmasked" else []
    return text + phase


def time_config(args: argparse.Namespace, checkpointing: bool, cuda_graph: bool) -> dict[str, float]:
    overrides = ["model.pretrained=null", "task.teacher.pretrained=null", *task_overrides(args),
                 f"model.scan_backend={args.backend}", f"data.batch_size={args.batch}",
                 f"model.use_checkpoint={str(checkpointing).lower()}", f"model.cuda_graph={str(cuda_graph).lower()}"]
    cfg = load_config(CONFIGS[args.text], overrides)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg).to(device="cuda", dtype=torch.bfloat16).train()
    optimizer, _ = build_optimizer(task, cfg.optim, peak_lr(cfg.optim, args.batch))
    batch = {"video": torch.randn(args.batch, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size,
                                  device="cuda", dtype=torch.bfloat16),
             "text": captions(args.batch), "index": torch.arange(args.batch)}

    def step() -> None:
        task(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = peak_gib(step, torch.device("cuda"))
    ms = median_ms(step, args.warmup, args.steps, torch.device("cuda"))
    return {"step ms": ms, "clips/s": args.batch / ms * 1e3, "peak GiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="clips per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="triton", help="model.scan_backend")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both",
                        help="the config's gradient checkpointing of the first 8 mixers, or none, or a row each")
    parser.add_argument("--text", choices=sorted(CONFIGS), default="clip",
                        help="clip: the open_clip-text task; bert: the released BERT-tower task")
    parser.add_argument("--phase", choices=["masked", "unmasked"], default="masked")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bert_vocab_") as vocab:
        args.vocab = bert_vocab_folder(Path(vocab))
        run(args)


def run(args: argparse.Namespace) -> None:
    rows = []
    model = {"clip": "videomamba_middle + CLIP text", "bert": "videomamba_middle + BERT-base"}[args.text]
    mask = "attention 0.8" if args.phase == "masked" else "none"
    for checkpointing in {"both": (True, False), "on": (True,), "off": (False,)}[args.checkpointing]:
        eager = time_config(args, checkpointing, cuda_graph=False)
        torch.cuda.empty_cache()  # the eager task is gone: hand its memory back before the graphs' pool
        graphs = time_config(args, checkpointing, cuda_graph=True)
        torch.cuda.empty_cache()
        rows.append({"model": model, "batch": args.batch, "mask": mask,
                     "checkpointing": "first 8 mixers" if checkpointing else "off",
                     **{f"eager {k}": v for k, v in eager.items()}, **{f"graphs {k}": v for k, v in graphs.items()},
                     "graphs speedup": eager["step ms"] / graphs["step ms"]})
        print(rows[-1], flush=True)
    columns = ["model", "batch", "mask", "checkpointing", "eager step ms", "eager clips/s", "eager peak GiB",
               "graphs step ms", "graphs clips/s", "graphs peak GiB", "graphs speedup"]
    setup = {"config": CONFIGS[args.text].name, "phase": args.phase, "precision": "bf16", "scan_backend": args.backend,
             "batch": args.batch,
             "warmup": args.warmup, "steps": args.steps,
             "weights": "random (model, text tower, CLIP teacher)", "optimizer": "torch AdamW (pipeline.optim)"}
    losses = {"clip": "VTC, VTM (hard negatives) and UTA", "bert": "VTC, VTM (hard negatives), MLM and UTA"}[args.text]
    notes = [f"Step = CLIP teacher forward + attention masks + video encoder on the visible tokens + text encoder + "
             f"{losses} losses + AdamW (unmasked phase: no teacher, no masks, no UTA). graphs: the video encoder's "
             "forward and backward replayed from CUDA graphs (model.cuda_graph), same process, same inputs. "
             "checkpointing: the config's gradient checkpointing (model.use_checkpoint, checkpoint_num 8) or none."]
    stem = "video_text" + ("_bert" if args.text == "bert" else "") + ("_unmasked" if args.phase == "unmasked" else "")
    write_results(stem, rows, columns, f"Stage 3 training step: {model} ({losses}, {args.phase} phase), eager and "
                  "CUDA-graphed", setup=setup, results_dir=args.results_dir, notes=notes)


if __name__ == "__main__":
    main()
