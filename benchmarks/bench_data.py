"""Data-path throughput: clips/s per core of each decoder on each kind of footage, raw and preprocessed for training,
the cores per GPU each stage needs at its measured GPU step rate, the full loader from local and S3 shards, and
(--gpu, on a GPU machine) NVDEC decoding and the data wait of a Stage 1 run fed from S3 shards.

    PYTHONPATH=.:benchmarks python benchmarks/bench_data.py             # -> benchmarks/results/data.{json,md}
    PYTHONPATH=.:benchmarks python benchmarks/bench_data.py --quick     # small footage, few clips: a smoke test
    PYTHONPATH=.:benchmarks python benchmarks/bench_data.py --gpu       # GPU machine -> data_gpu.{json,md}

Footage (pipeline/data/footage.py, rendered once into --work-dir): textured, moving, noisy clips in the formats real
data sets ship: 720p and 1080p H.264 with one keyframe and B-frames, 640x272 H.264 with B-frames, 720p 10-bit HEVC,
720p VP9 in WebM, and a VFR 480p clip with rotation metadata and audio. Each is also preprocessed as
jobs/make_shards.py --transcode would (variants in PREPROCESSING; audio dropped, rotation applied).

`decode` rows: one process, one core (torch and FFmpeg one thread each), `--clips` random 8-frame clips after one
warm-up: CPU ms of decoding and of the training transform (random resized crop to 224, flip, normalise), and clips/s
per core = 1000 / (decode + transform CPU ms). torchcodec rows run with PyAV's FFmpeg (the benchmark restarts itself
with it on LD_LIBRARY_PATH when the system has none). `cores_per_gpu` rows divide each stage's GPU clips/s (from
benchmarks/results/masked.json and video_text.json, H100) by a decoder's clips/s per core. `reader` rows: the whole
training loader over preprocessed shards. `data_wait` (--gpu): benchmarks/_data_wait.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from _results import RESULTS, run_meta, write_result_files

from pipeline.config import DataConfig
from pipeline.data.decode import DecodeOptions, decode_clip
from pipeline.data.encode import TranscodeOptions, transcode_h264
from pipeline.data.footage import FOOTAGE, FootageSpec, small, write_footage
from pipeline.data.transforms import train_transform

PREPROCESSING = {
    "p256_g8_bf0_fastdecode": TranscodeOptions(short_side=256, gop=8, bframes=0, tune="fastdecode"),
    "p256_g16_bf0_fastdecode": TranscodeOptions(short_side=256, gop=16, bframes=0, tune="fastdecode"),
    "p256_g16_bf0": TranscodeOptions(short_side=256, gop=16, bframes=0),
}
RECOMMENDED = "p256_g8_bf0_fastdecode"
"""The training preprocessing docs/data.md recommends; the other variants are measured on 720p_longgop only."""
TARGET_CLIPS_PER_CORE = 40.0  # issue 29: 8 frames at 224 from preprocessed shards of 720p long-GOP footage
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PACKAGES = ("torch", "av", "torchcodec", "numpy", "webdataset", "s3fs", "moto")
COLUMNS = ["footage", "variant", "decoder", "kbit_s", "size_vs_raw", "decode_cpu_ms", "decode_wall_ms",
           "transform_cpu_ms", "clips_per_s_per_core", "clips_per_s_wall", "cpu_fallback", "error"]  # fmt: skip
CORE_COLUMNS = ["stage", "gpu_clips_per_s", "footage", "variant", "decoder", "clips_per_s_per_core", "cores_per_gpu"]
READER_COLUMNS = ["source", "workers", "clips_per_s", "clips_per_s_per_worker"]


def pyav(options: DecodeOptions) -> Callable:
    return lambda data, rng, frames: decode_clip(data, frames, "rand", rng, options=options)


def torchcodec(device: str) -> Callable:
    from pipeline.data.decode_torchcodec import decode_clip_torchcodec

    return lambda data, rng, frames: decode_clip_torchcodec(data, frames, "rand", rng, device=device)


def decoders(gpu: bool) -> dict[str, Callable]:
    """The decoders to time here (torchcodec ones only where torchcodec can run)."""
    from pipeline.data.decode_torchcodec import torchcodec_problem

    found = {"pyav": pyav(DecodeOptions()), "pyav, no nonref skip": pyav(DecodeOptions(skip_nonref=False)),
             "pyav, ffmpeg threads": pyav(DecodeOptions(threads=0)),
             "pyav, decode short side 256": pyav(DecodeOptions(short_side=256))}  # fmt: skip
    for device in ("cpu", "cuda") if gpu else ("cpu",):
        problem = torchcodec_problem(device)
        if problem:
            print(f"torchcodec {device}: not measured: {problem}", flush=True)
        else:
            found[f"torchcodec {device}"] = torchcodec(device)
    return found


def nvdec_fallback(data: bytes) -> str:
    """torchcodec's word on whether NVDEC decoded this video or it fell back to the CPU."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, device="cuda")
    decoder.get_frame_at(0)
    return str(decoder.cpu_fallback)


def time_clips(decode: Callable, data: bytes, frames: int, clips: int) -> dict[str, float]:
    """CPU and wall ms per clip of decoding and of the train transform, after one warm-up clip."""
    rng = random.Random(0)
    decode(data, rng, frames)
    decode_cpu = decode_wall = transform_cpu = 0.0
    for _ in range(clips):
        cpu, wall = time.process_time(), time.perf_counter()
        clip = decode(data, rng, frames)
        if isinstance(clip, torch.Tensor) and clip.is_cuda:
            torch.cuda.synchronize()
        decode_cpu += time.process_time() - cpu
        decode_wall += time.perf_counter() - wall
        cpu = time.process_time()
        video = train_transform(clip, 224, (0.66, 1.0), True, MEAN, STD, rng)
        if video.is_cuda:
            torch.cuda.synchronize()
        transform_cpu += time.process_time() - cpu
    ms = 1e3 / clips
    out = {"decode_cpu_ms": decode_cpu * ms, "decode_wall_ms": decode_wall * ms, "transform_cpu_ms": transform_cpu * ms}
    out["clips_per_s_per_core"] = 1e3 / (out["decode_cpu_ms"] + out["transform_cpu_ms"])
    out["clips_per_s_wall"] = 1e3 / (out["decode_wall_ms"] + out["transform_cpu_ms"])
    return out


def footage_set(work_dir: Path, quick: bool) -> dict[str, tuple[FootageSpec, bytes]]:
    """Every footage kind, rendered once into work_dir (in parallel, one process per kind; quick: 160 px, 2 s)."""
    specs = {name: small(spec, 160, 90, 2.0) if quick else spec for name, spec in FOOTAGE.items()}
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(min(len(specs), os.cpu_count() or 1)) as pool:
        folders = [work_dir / "footage"] * len(specs)
        paths = dict(zip(specs, pool.map(write_footage, specs.values(), folders), strict=True))
    out = {name: (spec, paths[name].read_bytes()) for name, spec in specs.items()}
    sizes = ", ".join(f"{name} {len(data) / 1e6:.2f} MB" for name, (_, data) in out.items())
    print(f"footage ({time.perf_counter() - start:.0f} s): {sizes}", flush=True)
    return out


def preprocessed(work_dir: Path, name: str, raw: bytes, variant: str, quick: bool) -> bytes:
    """`raw` transcoded with PREPROCESSING[variant] (cached beside the footage)."""
    options = PREPROCESSING[variant] if not quick else replace(PREPROCESSING[variant], short_side=64)
    digest = hashlib.sha1(raw + repr(options).encode()).hexdigest()[:10]
    path = work_dir / "preprocessed" / f"{name}-{variant}-{digest}.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(transcode_h264(raw, options))
    return path.read_bytes()


def decode_rows(work_dir: Path, footage: dict, frames: int, clips: int, gpu: bool, quick: bool) -> list[dict]:
    rows = []
    timed_decoders = decoders(gpu)
    for name, (spec, raw) in footage.items():
        variants = ["raw", *(PREPROCESSING if name == "720p_longgop" else [RECOMMENDED])]
        for variant in variants:
            data = raw if variant == "raw" else preprocessed(work_dir, name, raw, variant, quick)
            for decoder, decode in timed_decoders.items():
                if variant != "raw" and decoder in ("pyav, decode short side 256", "pyav, ffmpeg threads"):
                    continue  # levers for raw footage only (preprocessed frames are 256 px already)
                row = {"footage": name, "variant": variant, "decoder": decoder, "num_frames": frames,
                       "bytes": len(data), "kbit_s": len(data) * 8 / 1e3 / spec.seconds,
                       "size_vs_raw": len(data) / len(raw)}  # fmt: skip
                try:
                    row.update(time_clips(decode, data, frames, clips))
                except (ValueError, RuntimeError) as err:  # e.g. a codec NVDEC lacks: say so, measure the rest
                    row["error"] = repr(err)[:300]
                if decoder == "torchcodec cuda":
                    row["cpu_fallback"] = nvdec_fallback(data)
                print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                rows.append(row)
    return rows


def gpu_stage_rates() -> list[tuple[str, float]]:
    """(stage, clips/s on one H100) from the GPU benchmarks' result files."""
    rates = []
    masked = json.loads((RESULTS / "masked.json").read_text())
    for row in masked["rows"]:
        short = {"videomamba_tiny": "Ti", "videomamba_small": "S"}.get(row["model"], row["model"])
        rates.append((f"Stage 1 {short}, CUDA graphs (masked.json)", row["clips/s, graphs"]))
    video_text = json.loads((RESULTS / "video_text.json").read_text())
    rates.append(("Stage 3 M, CUDA graphs (video_text.json)", max(r["graphs clips/s"] for r in video_text["rows"])))
    return rates


def core_rows(rows: list[dict]) -> list[dict]:
    """Cores per GPU = the stage's GPU clips/s / clips/s per core, for the footage a stage would be fed."""
    wanted = [("720p_longgop", "raw"), ("640x272_bframes", "raw"), ("720p_longgop", RECOMMENDED)]
    out = []
    for stage, gpu_rate in gpu_stage_rates():
        for footage, variant in wanted:
            for row in rows:
                chosen = row["decoder"] in ("pyav", "torchcodec cpu") and "error" not in row
                if chosen and (row["footage"], row["variant"]) == (footage, variant):
                    out.append({"stage": stage, "gpu_clips_per_s": gpu_rate, "footage": footage, "variant": variant,
                                "decoder": row["decoder"], "clips_per_s_per_core": row["clips_per_s_per_core"],
                                "cores_per_gpu": math.ceil(gpu_rate / row["clips_per_s_per_core"])})  # fmt: skip
    return out


def write_shards(work_dir: Path, data: bytes, copies: int, url: str) -> str:
    """`copies` samples of `data` (distinct keys) written through the real shard writer to `url`."""
    from pipeline.data.shards import make_shards

    videos = Path(tempfile.mkdtemp(dir=work_dir, prefix="videos-"))
    for i in range(copies):
        (videos / f"clip{i:04d}.mp4").write_bytes(data)
    rows = [json.dumps({"video": f"clip{i:04d}.mp4", "caption": f"clip {i}"}) for i in range(copies)]
    (videos / "list.jsonl").write_text("\n".join(rows) + "\n")
    make_shards(str(videos / "list.jsonl"), url, shard_size=4, progress=False)
    return url


def reader_rate(shards: str, frames: int, workers: int, batch_size: int, batches: int) -> float:
    """Clips/s of the training loader after two warm-up batches (worker start-up excluded)."""
    from pipeline.data.reader import build_loader

    cfg = DataConfig(train_shards=shards, num_frames=frames, img_size=224, batch_size=batch_size, num_workers=workers,
                     shuffle_buffer=16, samples_per_epoch=None)  # fmt: skip
    iterator = iter(build_loader(cfg, "train", rank=0, world_size=1))
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def reader_rows(shards: dict[str, str], frames: int, workers: list[int], batch_size: int, batches: int) -> list[dict]:
    rows = []
    for source, url in shards.items():
        for count in workers:
            rate = reader_rate(url, frames, count, batch_size, batches)
            rows.append({"source": source, "workers": count, "clips_per_s": rate,
                         "clips_per_s_per_worker": rate / count})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def restart_with_pyav_ffmpeg() -> None:
    """torchcodec reads the library path only at process start: restart once with PyAV's FFmpeg on it."""
    try:
        import torchcodec
    except ImportError:
        return
    if torchcodec.ffmpeg_major_version is None and "BENCH_DATA_RESTARTED" not in os.environ:
        from pipeline.data.ffmpeg_libs import pyav_ffmpeg_dir

        path = os.pathsep.join(filter(None, [str(pyav_ffmpeg_dir()), os.environ.get("LD_LIBRARY_PATH")]))
        env = dict(os.environ, LD_LIBRARY_PATH=path, BENCH_DATA_RESTARTED="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench_data"), help="footage cache")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    parser.add_argument("--clips", type=int, default=10, help="timed clips per decode row")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader processes to try")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per reader setting")
    parser.add_argument("--quick", action="store_true", help="small footage and few clips (a smoke test)")
    parser.add_argument("--gpu", action="store_true", help="also NVDEC and the Stage 1 data wait (GPU machine)")
    parser.add_argument("--data-wait-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="results stem (default results/data or data_gpu)")
    args = parser.parse_args()
    restart_with_pyav_ffmpeg()
    torch.set_num_threads(1)  # one core, like a loader worker
    args.work_dir.mkdir(parents=True, exist_ok=True)
    meta = {**run_meta(PACKAGES), "load_avg_start": os.getloadavg()[0], "num_frames": args.frames,
            "clips_per_row": args.clips, "quick": args.quick}  # fmt: skip
    footage = footage_set(args.work_dir, args.quick)  # forks: before CUDA starts in this process
    meta["device"] = torch.cuda.get_device_name() if args.gpu else "CPU only"
    rows = decode_rows(args.work_dir, footage, args.frames, args.clips, args.gpu, args.quick)
    cores = core_rows(rows)
    recommended = preprocessed(args.work_dir, "720p_longgop", footage["720p_longgop"][1], RECOMMENDED, args.quick)
    from _data_wait import moto_s3

    with moto_s3():
        shards = {"local": str(args.work_dir / "shards-local"), "s3": "s3://bench/shards"}
        for url in shards.values():
            write_shards(args.work_dir, recommended, 16, url)
        readers = reader_rows(shards, args.frames, args.workers, args.batch_size, args.batches)
        waits = []
        if args.gpu:
            from _data_wait import stage1_data_wait

            waits = [stage1_data_wait(shards["s3"], workers=max(1, (os.cpu_count() or 2) - 1), batch=32,
                                      steps=args.data_wait_steps)]  # fmt: skip
    meta["load_avg_end"] = os.getloadavg()[0]
    write_results(args.out or RESULTS / ("data_gpu" if args.gpu else "data"), meta, rows, cores, readers, waits)


def write_results(out: Path, meta: dict, rows: list[dict], cores: list[dict], readers: list[dict],
                  waits: list[dict]) -> None:  # fmt: skip
    target = [r for r in rows if (r["footage"], r["variant"], r["decoder"]) == ("720p_longgop", RECOMMENDED, "pyav")
              and "error" not in r]  # fmt: skip
    verdict = (f"Target >= {TARGET_CLIPS_PER_CORE:g} clips/s per core (8 frames at 224, preprocessed 720p long-GOP, "
               f"{RECOMMENDED}, pyav): {target[0]['clips_per_s_per_core']:.1f}" if target else "")  # fmt: skip
    header = [f"# Data path throughput ({meta['device']})", "",
              f"{meta['date']}, commit {meta['git_commit']}, {meta['cores']} cores of '{meta['cpu']}' (1-min load "
              f"average {meta['load_avg_start']:.2f} at start, {meta['load_avg_end']:.2f} at end); "
              + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
              f"{meta['num_frames']} frames per clip, {meta['clips_per_row']} timed clips per row; CPU ms are the "
              "process's CPU time (what the step costs one core). " + verdict]  # fmt: skip
    extra = ["## Cores per GPU", "", "| " + " | ".join(CORE_COLUMNS) + " |", "|" + "---|" * len(CORE_COLUMNS)]
    extra += ["| " + " | ".join(_cell(r.get(c)) for c in CORE_COLUMNS) + " |" for r in cores]
    extra += ["", "## Training loader (preprocessed 720p long-GOP shards)", "",
              "| " + " | ".join(READER_COLUMNS) + " |", "|" + "---|" * len(READER_COLUMNS)]  # fmt: skip
    extra += ["| " + " | ".join(_cell(r.get(c)) for c in READER_COLUMNS) + " |" for r in readers]
    if waits:
        names = list(waits[0])
        extra += ["", "## Data wait of a Stage 1 run fed from S3 shards", "", "| " + " | ".join(names) + " |",
                  "|" + "---|" * len(names)] + ["| " + " | ".join(_cell(r[c]) for c in names) + " |" for r in waits]
    write_result_files(out.parent, out.name, meta, rows, COLUMNS, header, extra)
    # The JSON also keeps the other tables (the README renderer shows each list of rows as a table).
    everything = {"meta": meta, "rows": rows, "cores_per_gpu": cores, "reader": readers, "data_wait": waits}
    (out.parent / f"{out.name}.json").write_text(json.dumps(everything, indent=1) + "\n")


def _cell(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
