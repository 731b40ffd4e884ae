"""Where the time of a 1k-video zero-shot retrieval evaluation goes: decoding vs forward passes vs scoring.

    PYTHONPATH=. python benchmarks/bench_eval.py                                  # CPU, 1000 synthetic clips
    PYTHONPATH=. python benchmarks/bench_eval.py --model videomamba_small --img-size 224 --device cuda --workers 8 \
        --precision bf16 --clip-size 320 --clip-frames 90 --clip-fps 30

Builds a synthetic held-out set (jobs/make_synthetic.py's generator: H.264 clips, by default 64 px and 16 frames,
one caption each) and a random VideoTextModel export of `--model` with a small open_clip text tower, then runs the real
evaluator (`pipeline.evaluation.run.evaluate_retrieval`, no feature cache, no MLflow) and writes the report's
time split to benchmarks/results/eval.json and eval.md. The recalls of a random model are near chance and beside
the point. With loader workers, `video_decode` is the time the encoder waited for decoded clips. `--runs 2`
reports the second evaluation (kernels compiled, files in the page cache) and the first one's total beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _results import provenance

from models.video_text import build_video_text_model
from pipeline.data.synthetic import make_synthetic
from pipeline.evaluation.config import load_eval_config
from pipeline.evaluation.report import timing_table
from pipeline.evaluation.run import evaluate_retrieval

RESULTS = Path(__file__).resolve().parent / "results"
# A small random text tower: the benchmark is about the video side; real towers are width 512, 12 layers.
TEXT_TOWER = {"name": "ViT-B-16", "width": 128, "layers": 2, "heads": 2, "context_length": 32}


def write_export(path: Path, model: str, num_frames: int, img_size: int) -> Path:
    """A random video-text model saved in the stage-export layout the evaluator loads."""
    torch.manual_seed(0)
    net = build_video_text_model(model, {"num_frames": num_frames, "img_size": img_size}, TEXT_TOWER,
                                 embed_dim=256)
    torch.save({"state_dict": net.state_dict(), "meta": {"task": "video_text", **net.config}}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-videos", type=int, default=1000, help="videos in the evaluated set")
    parser.add_argument("--model", default="videomamba_test", help="registered VideoMamba size (models.list_models)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames per clip the model sees")
    parser.add_argument("--img-size", type=int, default=64, help="model input size in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0 = in the main process)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast on cuda")
    parser.add_argument("--clip-size", type=int, default=64, help="synthetic clip width/height in pixels")
    parser.add_argument("--clip-frames", type=int, default=16, help="frames per synthetic clip")
    parser.add_argument("--clip-fps", type=float, default=8.0, help="synthetic clip frame rate")
    parser.add_argument("--runs", type=int, default=1, help="evaluate this many times, report the last")
    parser.add_argument("--work-dir", default=None, help="keep data and export here (default: a temp folder)")
    parser.add_argument("--out", default=str(RESULTS / "eval"), help="result stem (writes .json and .md)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        # 10 training clips (the generator needs a non-empty train split); the rest is the evaluated set.
        paths = make_synthetic(str(work / "data"), args.num_videos + 10, 10 / (args.num_videos + 10),
                               num_frames=args.clip_frames, size=args.clip_size, fps=args.clip_fps,
                               workers=max(1, os.cpu_count() or 1))
        data_s = time.perf_counter() - start
        export = write_export(work / "model.pt", args.model, args.num_frames, args.img_size)
        cfg = load_eval_config(None, [
            f"model.checkpoint={export}", f"model.precision={args.precision}",
            f"data.annotation={paths['eval_annotations']}", f"data.root={paths['eval_video_root']}",
            "data.name=bench", f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
            f"output_dir={work / 'report'}", "cache.dir=null", "tracking.enabled=false",
            "scaling.use_ray=false", f"scaling.use_gpu={args.device == 'cuda'}",
        ])
        totals = []
        for _ in range(args.runs):
            report = json.loads(Path(evaluate_retrieval(cfg)["report"]).read_text())
            totals.append(report["timing"]["total_s"])
    write_results(Path(args.out), args, report, data_s, totals)


def write_results(stem: Path, args: argparse.Namespace, report: dict, data_s: float, totals: list[float]) -> None:
    """<stem>.json: the setup and the time split (plus clips/s per phase); <stem>.md: a table."""
    timing, videos = report["timing"], report["counts"]["videos"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    setup = {**provenance(), "device": device, "torch": torch.__version__, "model": args.model,
             "num_frames": args.num_frames, "img_size": args.img_size, "batch_size": args.batch_size,
             "decode_workers": args.workers,
             "precision": args.precision, "videos": videos, "texts": report["counts"]["texts"],
             "clips": f"synthetic {args.clip_size} px, {args.clip_frames} frames @ {args.clip_fps:g} fps, H.264",
             "data_generation_s": round(data_s, 1), "runs_total_s": totals}
    rates = {f"{phase}_clips_per_s": round(videos / timing[f"{phase}_s"], 1)
             for phase in ("video_decode", "video_forward") if timing.get(f"{phase}_s")}
    bound = max(("video_decode", "video_forward", "text_forward", "scoring"), key=lambda p: timing.get(f"{p}_s", 0.0))
    data = {"setup": setup, "timing": timing, "rates": rates, "bounded_by": bound,
            "metrics": {k: report["metrics"][k] for k in ("t2v_r1", "v2t_r1")}}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Retrieval evaluation of {videos} videos: time split", "",
             f"{device}; {args.model} at {args.num_frames}x{args.img_size}px, batch {args.batch_size}, "
             f"{args.workers} decoding workers, {args.precision}; torch {torch.__version__}; "
             f"run {len(totals)} of {len(totals)} (totals {totals} s)."]
    lines += timing_table(timing, report["cache"])
    lines += ["", f"Bounded by: {bound}. "
              + ", ".join(f"{k.removesuffix('_clips_per_s')} {v} clips/s" for k, v in rates.items()) + "."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
