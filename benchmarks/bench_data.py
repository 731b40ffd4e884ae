"""Data-loader throughput on CPU: decoded clips/s per core, for PyAV decoding alone and the full reader.

    PYTHONPATH=. python benchmarks/bench_data.py                                   # 64 px synthetic clips
    PYTHONPATH=. python benchmarks/bench_data.py --clip-size 320 --clip-frames 90 --clip-fps 30 --img-size 224
    PYTHONPATH=. python benchmarks/bench_data.py --shards s3://bucket/webvid/train --workers 4

Without --shards it writes synthetic shards (through the real writer) to a temp folder first.
`decode` = `decode_clip` (seek + decode the sampled frames) in this process; `reader` = the training
loader (shuffle, decode, random resized crop, normalise, collate) with N loader processes, one core each.
Per-core numbers divide by max(1, workers). Results are printed and written to benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.decode import decode_clip
from pipeline.data.manifest import iter_shard
from pipeline.data.reader import build_loader
from pipeline.data.synthetic import make_synthetic
from pipeline.data.urls import expand_shard_urls, register_fsspec_openers

RESULTS = Path(__file__).resolve().parent / "results"


def bench_decode(urls: list[str], num_frames: int, clips: int) -> float:
    """Clips/s of decode_clip alone on in-memory mp4 bytes (one core)."""
    videos = [s["mp4"] for url in urls for s in iter_shard(url)][:clips]
    rng = random.Random(0)
    start = time.perf_counter()
    for i in range(clips):
        decode_clip(videos[i % len(videos)], num_frames, "rand", rng)
    return clips / (time.perf_counter() - start)


def bench_reader(cfg: DataConfig, batches: int) -> float:
    """Clips/s of the training loader after its first batch (worker start-up excluded)."""
    iterator = iter(build_loader(cfg, "train", rank=0, world_size=1))
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="existing shards to read (default: write synthetic ones)")
    parser.add_argument("--clip-size", type=int, default=64, help="synthetic clip width/height in pixels")
    parser.add_argument("--clip-frames", type=int, default=16, help="frames per synthetic clip")
    parser.add_argument("--clip-fps", type=float, default=8.0, help="synthetic clip frame rate")
    parser.add_argument("--num-videos", type=int, default=64, help="synthetic clips to write")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled per clip")
    parser.add_argument("--img-size", type=int, default=224, help="output resolution")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per reader setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader processes to try")
    args = parser.parse_args()

    register_fsspec_openers()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            made = make_synthetic(
                tmp, args.num_videos, 0.75, num_frames=args.clip_frames, size=args.clip_size, fps=args.clip_fps
            )
            shards = made["train_shards"]
        urls = expand_shard_urls(shards)
        result = {
            "shards": args.shards or f"synthetic {args.clip_size}px {args.clip_frames} frames @ {args.clip_fps} fps",
            "num_frames": args.num_frames,
            "img_size": args.img_size,
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "decode_clips_per_s_per_core": round(bench_decode(urls, args.num_frames, 4 * args.batch_size), 1),
            "reader": [],
        }
        for workers in args.workers:
            cfg = DataConfig(
                train_shards=shards, num_frames=args.num_frames, img_size=args.img_size,
                batch_size=args.batch_size, num_workers=workers, shuffle_buffer=16,
            )  # fmt: skip
            clips_per_s = bench_reader(cfg, args.batches)
            per_core = clips_per_s / max(1, workers)
            result["reader"].append(
                {"workers": workers, "clips_per_s": round(clips_per_s, 1), "clips_per_s_per_core": round(per_core, 1)}
            )
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    name = "data.json" if args.shards is None and args.clip_size == 64 else f"data_{args.clip_size}px.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
