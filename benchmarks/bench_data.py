"""Data-loader throughput on CPU: decoded clips/s per loader worker, from local shards and from S3.

    PYTHONPATH=. python benchmarks/bench_data.py                       # writes benchmarks/results/data.{json,md}
    PYTHONPATH=. python benchmarks/bench_data.py --num-videos 8 --batches 4 --out /tmp/quick

Inputs: `--num-videos` realistic clips, 10 s of 320x240 at 30 fps, H.264 (libx264 veryfast, crf 23, a keyframe
every second), showing a fine-grained texture that pans plus a moving square, written through the real shard
writer to a local folder and to an in-process moto S3 server (reached only through AWS_ENDPOINT_URL, like a
real endpoint).

Rows (one per measurement):
- `profile`: wall and CPU milliseconds per clip of each step in this process on one core: `tar` (reading
  samples out of the local shards), `decode` (`decode_clip`, seek + decode the sampled frames), `transform`
  (random resized crop to 224², flip, normalise);
- `reader`: the full training loader (shards -> shuffle -> decode -> transform -> collate -> main process) with
  1 and 2 loader processes (one core each), after two warm-up batches; `clips_per_s_per_worker` divides by the
  number of workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data.decode import decode_clip
from pipeline.data.encode import encode_h264
from pipeline.data.manifest import iter_shard
from pipeline.data.reader import build_loader
from pipeline.data.shards import make_shards
from pipeline.data.transforms import train_transform
from pipeline.data.urls import expand_shard_urls, register_fsspec_openers

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [
    "source", "stage", "step", "num_frames", "workers",
    "ms_per_clip", "cpu_ms_per_clip", "clips_per_s", "clips_per_s_per_worker",
]  # fmt: skip
_FPS, _SECONDS, _H, _W = 30, 10, 240, 320


def render_clip(seed: int) -> np.ndarray:
    """uint8 (300, 240, 320, 3): a smooth colour field with fine grain panning diagonally, and a moving square.

    The grain makes keyframes cost what they cost in camera footage (flat synthetic shapes decode far faster).
    """
    g = torch.Generator().manual_seed(seed)
    margin = 64
    coarse = torch.rand(1, 3, (_H + margin) // 8, (_W + margin) // 8, generator=g)
    field_3HW = F.interpolate(coarse, size=(_H + margin, _W + margin), mode="bicubic")[0]
    grain_3HW = torch.rand(field_3HW.shape, generator=g) * 0.15
    texture_HW3 = ((field_3HW * 0.85 + grain_3HW).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    frames = np.empty((_FPS * _SECONDS, _H, _W, 3), np.uint8)
    for t in range(len(frames)):
        dy, dx = int(t * 0.13) % margin, int(t * 0.21) % margin
        frames[t] = texture_HW3[dy : dy + _H, dx : dx + _W]
        x = int(t * (_W - 40) / len(frames))
        frames[t, 100:140, x : x + 40] = (230, 60, 40)
    return frames


def write_inputs(root: Path, num_videos: int) -> str:
    """The clips and the writer's input list; returns the list's path."""
    (root / "videos").mkdir(parents=True)
    rows = []
    for i in range(num_videos):
        (root / "videos" / f"clip{i:04d}.mp4").write_bytes(encode_h264(render_clip(i), _FPS, gop=_FPS))
        rows.append(json.dumps({"video": f"clip{i:04d}.mp4", "caption": f"clip {i}"}))
    (root / "videos" / "list.jsonl").write_text("\n".join(rows) + "\n")
    return str(root / "videos" / "list.jsonl")


def profile_steps(urls: list[str], num_frames: int, clips: int) -> list[dict]:
    """Wall and CPU ms per clip of tar reading, decoding and transforming, one after the other in this process.

    CPU time (process_time) is what a step would take on an idle core; wall time includes waiting for the
    core on a loaded machine.
    """
    rng = random.Random(0)
    clock = {"tar": [0.0, 0.0], "decode": [0.0, 0.0], "transform": [0.0, 0.0]}

    def timed(step: str, fn, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        clock[step][0] += time.perf_counter() - wall
        clock[step][1] += time.process_time() - cpu
        return out

    videos = timed("tar", lambda: [s["mp4"] for url in urls for s in iter_shard(url)])
    scale = {"tar": 1e3 / len(videos), "decode": 1e3 / clips, "transform": 1e3 / clips}
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for i in range(clips):
        frames = timed("decode", decode_clip, videos[i % len(videos)], num_frames, "rand", rng)
        timed("transform", train_transform, frames, 224, (0.66, 1.0), True, mean, std, rng)
    return [
        {"source": "local", "stage": "profile", "step": step, "num_frames": num_frames, "workers": 0,
         "ms_per_clip": round(wall * scale[step], 2), "cpu_ms_per_clip": round(cpu * scale[step], 2)}
        for step, (wall, cpu) in clock.items()
    ]  # fmt: skip


def reader_rate(shards: str, num_frames: int, workers: int, batch_size: int, batches: int) -> float:
    """Clips/s of the training loader after two warm-up batches (worker start-up excluded)."""
    cfg = DataConfig(
        train_shards=shards, num_frames=num_frames, img_size=224,
        batch_size=batch_size, num_workers=workers, shuffle_buffer=16,
    )  # fmt: skip
    iterator = iter(build_loader(cfg, "train", rank=0, world_size=1))
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def start_s3() -> object:
    """An in-process moto S3 server; s3fs finds it through AWS_ENDPOINT_URL (inherited by loader workers)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    return server


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "machine": f"CPU only: {os.cpu_count()} cores of '{cpu}', shared with other jobs running at the same time "
        "(load average below); numbers are lower bounds for an idle machine",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "av": av.__version__,
        "torch_threads_per_worker": 1,
    }


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    """<out>.json ({"meta": {...}, "rows": [...]}) and <out>.md (a table)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Data loader throughput (CPU)", "", meta["machine"] + ".", "", f"Input: {meta['input']}.", "",
             f"Load average (1 min) at start / end: {meta['load_avg_start']} / {meta['load_avg_end']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in COLUMNS) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-videos", type=int, default=16, help="clips to write (4 per shard)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16], help="frames sampled per clip")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader processes to try")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per reader setting")
    parser.add_argument("--out", type=Path, default=RESULTS / "data", help="results stem (.json and .md)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the profile runs on one core, like a loader worker

    import s3fs

    register_fsspec_openers()
    meta = {**machine(), "input": f"{args.num_videos} clips, {_SECONDS} s of {_W}x{_H} H.264 at {_FPS} fps, "
            "keyframe every 1 s, crf 23; output 224x224, batch " + str(args.batch_size),
            "load_avg_start": round(os.getloadavg()[0], 2)}  # fmt: skip
    server = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            listing = write_inputs(Path(tmp), args.num_videos)
            sources = {"local": os.path.join(tmp, "shards"), "s3": "s3://bench/shards"}
            s3fs.S3FileSystem().mkdir("bench")
            for shards in sources.values():
                make_shards(listing, shards, shard_size=4, progress=False)
            rows = []
            for num_frames in args.frames:
                rows += profile_steps(expand_shard_urls(sources["local"]), num_frames, 2 * args.num_videos)
            for source, shards in sources.items():
                for num_frames in args.frames:
                    for workers in args.workers:
                        rate = reader_rate(shards, num_frames, workers, args.batch_size, args.batches)
                        rows.append({"source": source, "stage": "reader", "num_frames": num_frames,
                                     "workers": workers, "clips_per_s": round(rate, 1),
                                     "clips_per_s_per_worker": round(rate / workers, 1)})  # fmt: skip
                        print(rows[-1], flush=True)
    finally:
        server.stop()
    meta["load_avg_end"] = round(os.getloadavg()[0], 2)
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
