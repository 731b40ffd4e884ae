"""Whole model: VideoMamba-Ti on our Triton scan vs a joint-attention TimeSformer-Ti (fused SDPA), one GPU.

DESIGN.md "What fast means" / gpu-baseline.md: 224², bf16 autocast (fp32 weights), inference clips/s and peak
memory per clip at 8/16/32/64 frames, batch 128 (halved on OOM), and one training step (fwd + bwd + AdamW) at
8 frames, batch 64. TimeSformer-Ti is DeiT-Ti (width 192, 12 layers, 3 heads, MLP 4x) attending jointly over all
1 + T*196 tokens (videomamba.md §8.1), with PyTorch's fused scaled_dot_product_attention. Times are medians of
CUDA-event timed calls after warm-up; each row is measured alone, so an OOM or error in one is recorded in that
row and the others still run. The result files are rewritten after every row (partial results survive a kill).

    PYTHONPATH=.:benchmarks python benchmarks/bench_model.py [--frames 8 16 32 64] [--results-dir DIR]
    # CPU smoke test: --device cpu --model videomamba_test --frames 2 --batch 2 --train-batch 2 --img-size 32
    #                 --backend ref --ref-depth 2 --ref-width 32 --ref-heads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, write_results
from torch import Tensor, nn

from models import create_model

# gpu-baseline.md (one H100): VideoMamba-Ti on mamba-ssm's CUDA scan, TimeSformer-Ti with SDPA; clips/s.
BASELINE_INFER = {"videomamba": {8: 433, 16: 202, 32: 101, 64: 53},
                  "timesformer": {8: 3623, 16: 1566, 32: 579, 64: 192}}
BASELINE_TRAIN_8F = {"videomamba": 113, "timesformer": 1090}


class JointAttentionBlock(nn.Module):
    """Pre-norm ViT block (DeiT): joint multi-head self-attention over every token, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(self.norm1(x_BLD)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn_BLD = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x_BLD = x_BLD + self.proj(attn_BLD)
        return x_BLD + self.mlp(self.norm2(x_BLD))


class TimeSformerJoint(nn.Module):
    """TimeSformer-Ti, joint space-time attention: per-frame 16x16 patches + spatial and temporal position
    embeddings, CLS first, then DeiT blocks over all 1 + T*P tokens and a linear head on the CLS token."""

    def __init__(self, num_frames: int, img_size: int = 224, patch_size: int = 16, embed_dim: int = 192,
                 depth: int = 12, heads: int = 3, num_classes: int = 400) -> None:
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv3d(3, embed_dim, (1, patch_size, patch_size), (1, patch_size, patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.blocks = nn.ModuleList(JointAttentionBlock(embed_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, video_BCTHW: Tensor) -> Tensor:
        x_BTPD = self.patch_embed(video_BCTHW).flatten(3).permute(0, 2, 3, 1)
        x_BTPD = x_BTPD + self.pos_embed[:, None, 1:] + self.time_embed[:, :, None]
        cls_BLD = (self.cls_token + self.pos_embed[:, :1]).expand(x_BTPD.shape[0], -1, -1)
        x_BLD = torch.cat([cls_BLD, x_BTPD.flatten(1, 2)], dim=1)
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return self.head(self.norm(x_BLD[:, 0]))


def build(kind: str, frames: int, args: argparse.Namespace) -> nn.Module:
    if kind == "videomamba":
        return create_model(args.model, num_frames=frames, num_classes=400, img_size=args.img_size,
                            scan_backend=args.backend)
    return TimeSformerJoint(frames, args.img_size, embed_dim=args.ref_width, depth=args.ref_depth, heads=args.ref_heads)


def label(kind: str, frames: int, train: bool) -> dict:
    """The identifying columns of a row."""
    return {"model": "VideoMamba-Ti (Triton scan)" if kind == "videomamba" else "TimeSformer-Ti (SDPA)",
            "mode": "train step" if train else "inference", "frames": frames}


def timed_ms(fn: Callable[[], object], device: torch.device, max_calls: int, max_s: float) -> float:
    """Median ms of up to `max_calls` calls (at least 2), stopping once `max_s` seconds were spent; the caller
    warms up."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < 2 or time.perf_counter() - start < max_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(kind: str, frames: int, batch: int, train: bool, args: argparse.Namespace,
            device: torch.device) -> dict:
    """clips/s and the peak memory per clip of inference (no grad) or of an AdamW training step."""
    torch.manual_seed(0)
    model = build(kind, frames, args).to(device).train(train)
    video = torch.randn(batch, 3, frames, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 400, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda") if train else None
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def call() -> None:
        if optimizer is None:
            with torch.inference_mode(), autocast:
                model(video)
            return
        with autocast:
            loss = F.cross_entropy(model(video).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    call()  # warm-up: Triton compilation, cuBLAS/SDPA selection, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()  # weights, input, optimizer state
        torch.cuda.reset_peak_memory_stats()
    call()
    max_calls, max_s = (args.iters, args.seconds) if frames <= 16 else (max(2, args.iters // 2), args.seconds)
    ms = timed_ms(call, device, max_calls, max_s)
    row = {**label(kind, frames, train), "batch": batch, "ms": ms, "clips/s": batch / ms * 1e3}
    if device.type == "cuda":
        row["GiB/clip"] = (torch.cuda.max_memory_allocated() - resident) / 2**30 / batch
    baseline = BASELINE_TRAIN_8F[kind] if train and frames == 8 else None if train else BASELINE_INFER[kind].get(frames)
    if baseline:
        row["baseline clips/s (H100)"] = baseline
        row["vs baseline"] = row["clips/s"] / baseline
    return row


def measure_halving(kind: str, frames: int, batch: int, train: bool, args: argparse.Namespace,
                    device: torch.device) -> dict:
    """measure() at `batch`, halving it on out-of-memory; any other error is kept in the row."""
    while True:
        try:
            return measure(kind, frames, batch, train, args, device)
        except torch.OutOfMemoryError:
            if batch == 1:
                return {**label(kind, frames, train), "error": "out of memory at batch 1"}
            batch //= 2
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
            return {**label(kind, frames, train), "batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """VideoMamba rows get the TimeSformer / VideoMamba clips/s ratio of the same mode and frames."""
    speed = {(r["model"], r["mode"], r["frames"]): r.get("clips/s") for r in rows}
    for r in rows:
        ts = speed.get(("TimeSformer-Ti (SDPA)", r["mode"], r["frames"]))
        if r["model"].startswith("VideoMamba") and ts and r.get("clips/s"):
            r["TimeSformer / VideoMamba"] = ts / r["clips/s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batch", type=int, default=128, help="inference clips per call (halved on OOM)")
    parser.add_argument("--train-batch", type=int, default=64, help="clips per training step (8 frames)")
    parser.add_argument("--model", default="videomamba_tiny")
    parser.add_argument("--backend", default="triton", help="VideoMamba scan_backend")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--ref-width", type=int, default=192, help="TimeSformer width")
    parser.add_argument("--ref-depth", type=int, default=12, help="TimeSformer layers")
    parser.add_argument("--ref-heads", type=int, default=3, help="TimeSformer heads")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per row (half above 16 frames)")
    parser.add_argument("--seconds", type=float, default=4.0, help="stop timing a row after this long")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip the rows left after this long")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    # 8-frame inference and the training steps first: the rows that matter most survive a tight budget.
    plan = [(k, f, args.batch, False) for f in args.frames[:1] for k in ("videomamba", "timesformer")]
    train_frames = 8 if 8 in args.frames else args.frames[0]
    plan += [(k, train_frames, args.train_batch, True) for k in ("videomamba", "timesformer")]
    plan += [(k, f, args.batch, False) for f in args.frames[1:] for k in ("videomamba", "timesformer")]
    setup = {"precision": "bf16 autocast, fp32 weights", "img_size": args.img_size, "videomamba": args.model,
             "scan_backend": args.backend, "timesformer": f"joint attention, width {args.ref_width}, "
             f"{args.ref_depth} layers, {args.ref_heads} heads, torch SDPA", "optimizer": "torch AdamW (fused)",
             "timing": f"median of <= {args.iters} calls after 2 (CUDA events)"}
    columns = ["model", "mode", "frames", "batch", "ms", "clips/s", "GiB/clip", "baseline clips/s (H100)",
               "vs baseline", "TimeSformer / VideoMamba", "error"]
    notes = ["GiB/clip: peak allocated memory during the timed calls above what weights, input and optimizer state "
             "hold, per clip. Baseline: gpu-baseline.md, one H100 (VideoMamba-Ti on mamba-ssm's CUDA scan; "
             "TimeSformer-Ti with SDPA). vs baseline = our clips/s / baseline clips/s."]
    rows: list[dict] = []
    start = time.perf_counter()
    for kind, frames, batch, train in plan:
        if time.perf_counter() - start > args.budget_s:
            rows.append({**label(kind, frames, train), "error": f"skipped: the {args.budget_s:g} s budget was spent"})
        else:
            rows.append(measure_halving(kind, frames, batch, train, args, device))
        print(rows[-1], flush=True)
        add_ratios(rows)
        write_results("model", rows, columns, "Whole model: VideoMamba-Ti (Triton scan) vs TimeSformer-Ti (SDPA)",
                      setup=setup, results_dir=args.results_dir, notes=notes)


if __name__ == "__main__":
    main()
