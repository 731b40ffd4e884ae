"""VTC gather overhead on CPU: the video-text contrastive loss on 2 gloo ranks vs 1 rank at equal per-rank batch.

    PYTHONPATH=. python benchmarks/bench_vtc_gather.py          # writes benchmarks/results/vtc_gather.{json,md}

Times `pipeline.losses.contrastive_loss` forward + backward on fixed features (video and text (B, E) leaf tensors,
E = 512 as UMT's joint space), per-rank batch B:

- `1 rank, N=B`: no gather (what each rank would cost alone);
- `2 ranks, N=2B`: features gathered with gradient over gloo (`all_gather_with_grad`, forward all_gather +
  backward all_reduce), the (2B, 2B) similarity on every rank;
- `1 rank, N=2B`: the same global batch in one process, separating the bigger similarity matrix from the
  communication;
- `2 ranks gather only`: `all_gather_with_grad` of both features (and the ids) forward + backward, nothing else.

One thread per rank; both ranks on this 2-core machine (shared, loaded), so communication goes through loopback.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu import cpu_meta, write_cpu_results  # noqa: E402

EMBED_DIM = 512


def time_ms(fn, iters: int, warmup: int = 5) -> float:
    """Median ms per call over `iters` calls, ranks lined up by a barrier before each (when distributed)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def loss_step(batch: int, rank: int):
    """fn() = contrastive loss forward + backward on fixed (batch, E) features of this rank."""
    from pipeline.losses import contrastive_loss

    gen = torch.Generator().manual_seed(rank)
    video = torch.randn(batch, EMBED_DIM, generator=gen, requires_grad=True)
    text = torch.randn(batch, EMBED_DIM, generator=gen, requires_grad=True)
    index = torch.arange(batch) + rank * batch
    temp = torch.tensor(0.07)

    def fn() -> None:
        contrastive_loss(video, text, index, temp).backward()

    return fn


def gather_step(batch: int, rank: int):
    """fn() = all_gather_with_grad of video, text and ids forward, then backward through the feature gathers."""
    from pipeline.distributed import all_gather_with_grad

    video = torch.randn(batch, EMBED_DIM, requires_grad=True)
    text = torch.randn(batch, EMBED_DIM, requires_grad=True)
    index = torch.arange(batch) + rank * batch

    def fn() -> None:
        all_gather_with_grad(index)
        (all_gather_with_grad(video).sum() + all_gather_with_grad(text).sum()).backward()

    return fn


def two_rank_worker(rank: int, batches: list[int], iters: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = []
        for b in batches:
            rows.append({"setup": "2 ranks", "per_rank_batch": b, "global_batch": 2 * b,
                         "ms_per_step": time_ms(loss_step(b, rank), iters)})  # fmt: skip
            rows.append({"setup": "2 ranks gather only", "per_rank_batch": b, "global_batch": 2 * b,
                         "ms_per_step": time_ms(gather_step(b, rank), iters)})  # fmt: skip
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128], help="per-rank batch sizes")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per measurement (median)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = cpu_meta()
    rows = []
    for b in args.batches:
        rows.append({"setup": "1 rank", "per_rank_batch": b, "global_batch": b,
                     "ms_per_step": time_ms(loss_step(b, 0), args.iters)})  # fmt: skip
        rows.append({"setup": "1 rank", "per_rank_batch": 2 * b, "global_batch": 2 * b,
                     "ms_per_step": time_ms(loss_step(2 * b, 0), args.iters)})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        context = mp.start_processes(two_rank_worker, args=(args.batches, args.iters, free_port(), out), nprocs=2,
                                     join=False, start_method="spawn")  # fmt: skip
        try:
            while not context.join(timeout=600):
                pass
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        rows += torch.load(out)
    single = {r["per_rank_batch"]: r["ms_per_step"] for r in rows if r["setup"] == "1 rank"}
    for r in rows:
        r["ratio_vs_1rank_same_per_rank_batch"] = r["ms_per_step"] / single[r["per_rank_batch"]]
    rows.sort(key=lambda r: (r["global_batch"], r["setup"]))
    meta["load_avg_1min_end"] = os.getloadavg()[0]
    notes = [
        f"CPU: {meta['cores']} cores of {meta['cpu']!r}, shared with other jobs (1-min load average "
        f"{meta['load_avg_1min']:.2f} at start, {meta['load_avg_1min_end']:.2f} at end); torch {meta['torch']}, "
        f"1 thread per rank, gloo over loopback. E = {EMBED_DIM}; median of {args.iters} steps.",
        "`ratio` compares with one rank holding the same per-rank batch (no gather, N = B).",
    ]
    columns = ["setup", "per_rank_batch", "global_batch", "ms_per_step", "ratio_vs_1rank_same_per_rank_batch"]
    write_cpu_results("vtc_gather", meta, rows, columns, "VTC loss: gather over 2 gloo ranks vs 1 rank (CPU)", notes,
                      args.out)  # fmt: skip


if __name__ == "__main__":
    main()
