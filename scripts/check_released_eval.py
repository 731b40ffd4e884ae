"""Check our zero-shot evaluation of a released-layout checkpoint against the released VideoMamba code.

    python scripts/check_released_eval.py --videomamba-repo CHECKOUT --released-site DIR \
        (--released-ext DIR | --build-kernels SDIST_DIR) [--size full|tiny] [--results DIR]
    python scripts/check_released_eval.py --videomamba-repo CHECKOUT --released-site DIR --dry-run   # no GPU
    python scripts/check_released_eval.py --videomamba-repo CHECKOUT --released-site DIR \
        --reference-kernels [--size tiny | --img-size 64 --videos 4 --k-test 5]                   # no GPU

scripts/gpu_check_released_eval.sh runs it on a bare GPU machine (packages from carried wheels, kernels built
there), scripts/check_released_eval_cpu.sh on a CPU (`--reference-kernels`). One command, on a CUDA machine:
1. writes a work folder: a few synthetic mp4s and a UMT-layout annotation (captions with capitals and
   punctuation), a tokenizer folder (generated vocab.txt of the tower's size + BERT config.json), and a
   random-weight checkpoint in the released layout (`{"model": ...}`, bf16; `--size full` = VideoMamba-M +
   bert-base, the 798 keys of tests/data/umt_videomamba_m16_released_keys.json, checked; `--img-size` other
   than 224 changes only `vision_encoder.pos_embed`'s patch grid, on both sides; `tiny` for a quick run);
2. with `--build-kernels`, starts building the released kernel fork's compiled modules for fp32 activations
   (scripts/build_released_kernels.py --dtype fp32) in the background: the released model run in fp32 calls
   the selective-scan and causal-conv1d kernels with fp32 inputs, which the benchmarks' bf16 build refuses;
3. our side: `jobs/eval_retrieval.py --config configs/eval/msrvtt.yaml` (fp32, top-`--k-test` re-rank,
   `evaluation.save_scores=true`, tracking off) in this interpreter, and the frames our pipeline decodes for
   each video (the job's own decode and transform);
4. the released side: scripts/released_eval_driver.py in a process whose PYTHONPATH is `--released-site` (the
   released code's package versions: transformers 4.36.1, timm 0.4.12, ...) then
   `<checkout>/videomamba/video_mm`, and nothing of this interpreter's path (the checkout's `models` package
   would meet ours): the released model class over the built kernels, checkpoint loading, caption cleaning,
   tokenizer, `evaluation()` and `itm_eval()`, fed the same frames;
5. compares the similarity and re-ranked matrices (max |ours - released| <= --atol + --rtol * max |released|)
   and R@1/5/10 both directions, re-ranked and similarity-only (equal), prints PASS or FAIL and exits 1 on
   any mismatch.

The re-rank depth must keep R@1/5/10 comparable: the released matrices tie at -100 past it, so each R@k needs
k <= --k-test or k >= the direction's candidates (10 for the default 16 videos; 5 for 4 videos and 8 texts).

`--results` (default `<work>/results`) receives check_released_eval.json (every number compared, the
tolerances, the verdict, the package versions and kernel builds of each side, date and machine), the same as
tables in check_released_eval.md, scores_ours.npz,
released_scores.npz, released.json, retrieval_msrvtt.json (our report) and check_released_eval.log.

`--dry-run` needs no GPU: step 1; the released side imported with the `--released-site` packages (its kernel
fork without the compiled modules), its model built and the checkpoint loaded on the CPU, the annotation read,
the queries tokenised and their text embeddings computed; our model loaded by the evaluator's loader and the
queries read by its annotation loader; then the queries, the load report and the text embeddings are
compared. No video is encoded on either side. `--reference-kernels` needs no GPU either: every step above runs
on the CPU, the released side with its kernel fork's own reference functions (selective_scan_ref,
causal_conv1d_ref, rms_norm_ref) in place of the CUDA and Triton kernels, ours with its reference scan
(models/ops/ref.py), both sides at once with half the cores each (OMP_NUM_THREADS, unless set). Slow, the
reference scans loop over the tokens in Python: `--size tiny`, or `--size full` at a small `--img-size` with
few videos (VideoMamba-M at 224 px takes minutes a video on 2 cores).

TF32 is off on both sides (NVIDIA_TF32_OVERRIDE=0): the comparison is fp32. The released side needs a
checkout of OpenGVLab/VideoMamba (the files benchmarks/_released.py and released_eval_driver.py name), the
packages of its requirements that the evaluation imports (videomamba/README.md; the ones this machine's
environment lacks or has at other versions go in `--released-site`) and its kernels: `--released-ext` (built
with `scripts/build_released_kernels.py --dtype fp32`) or `--build-kernels` (the two sdists, and nvcc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.bert import BertSpec  # noqa: E402
from models.umt import build_umt_model  # noqa: E402
from models.umt_checkpoint import released_layout, save_released_checkpoint  # noqa: E402
from pipeline.data.encode import encode_h264  # noqa: E402
from pipeline.evaluation.config import load_eval_config  # noqa: E402
from pipeline.evaluation.features import ClipSpec  # noqa: E402
from pipeline.evaluation.loading import load_eval_model  # noqa: E402
from pipeline.evaluation.run import prepare_annotations, video_source  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240),
           "yellow": (230, 220, 20), "black": (20, 20, 20), "purple": (140, 40, 160), "orange": (240, 140, 20)}
SHAPES = ("square", "circle")
WORDS = [*COLOURS, *SHAPES, "a", "the", "moves", "left", "right", "runs", "clip"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
EVAL_CONFIG = REPO / "configs/eval/msrvtt.yaml"
SIZES = {
    # (vision model kwargs, BERT spec, joint width, UTA output width, frames, pixels)
    "full": ({"num_frames": 8, "img_size": 224}, BertSpec(encoder_width=576), 512, 512, 8, 224),
    "tiny": ({"num_frames": 4, "img_size": 32, "embed_dim": 32, "depth": 2},
             BertSpec(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=40, fusion_layer=2, encoder_width=32),
             16, 24, 4, 32),
}
PATCH = 16  # VideoMamba-M's patch size
RERANK_FILL = -100.0  # the released re-ranked matrices' value outside each direction's top-k
# (name in the report, our scores_msrvtt.npz key, transpose ours, the driver's released_scores.npz key)
MATRICES = (("similarity t2v", "similarity_t2v_TV", False, "t2i_emb"),
            ("similarity v2t", "similarity_v2t_TV", True, "i2t_emb"),
            ("re-ranked t2v", "rerank_t2v_TV", False, "t2i_x"),
            ("re-ranked v2t", "rerank_v2t_TV", True, "i2t_x"))


def size_spec(args: argparse.Namespace) -> tuple:
    """SIZES[args.size], at `--img-size` pixels when given (the model's patch grid and the frames both)."""
    vision, spec, embed_dim, clip_dim, frames, pixels = SIZES[args.size]
    if args.img_size is not None:
        vision, pixels = {**vision, "img_size": args.img_size}, args.img_size
    return vision, spec, embed_dim, clip_dim, frames, pixels


def expected_released_layout(img_size: int) -> list[list]:
    """The 798 released keys and shapes; at another resolution only the spatial position embedding differs."""
    expected = json.loads((REPO / "tests/data/umt_videomamba_m16_released_keys.json").read_text())["keys"]
    layout = [[k, s] for k, s, _ in expected]
    for entry in layout:
        if entry[0] == "vision_encoder.pos_embed":
            entry[1] = [1, (img_size // PATCH) ** 2 + 1, entry[1][2]]
    return layout


def log(message: str) -> None:
    print(message, flush=True)


def write_videos(work: Path, num_videos: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(num_videos):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % 2]
        frames = np.zeros((24, 72, 96, 3), dtype=np.uint8)
        frames[:] = COLOURS[colour]
        frames += rng.integers(0, 40, size=frames.shape, dtype=np.uint8)
        side = 12 if shape == "square" else 24
        for t in range(24):
            frames[t, 20:20 + side, 3 * t:3 * t + side] = 128
        rel = f"clips/{i:02d}_{colour}_{shape}.mp4"
        (work / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "videos" / rel).write_bytes(encode_h264(frames, fps=8.0))
        entries.append({"video": rel, "caption": [f"A {colour.upper()} {shape}, moves left!",
                                                  f"the {colour} {shape}-clip: runs (right)"]})
    (work / "anno.json").write_text(json.dumps(entries))
    return entries


def write_tokenizer(work: Path, spec: BertSpec) -> Path:
    folder = work / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokens += [f"[unused{i}]" for i in range(spec.vocab_size - len(tokens))]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    config = spec.hf_config().to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    # The released builder reads its own config json: BERT's fields plus fusion_layer / encoder_width.
    (work / "bert_config.json").write_text(json.dumps({**config, "fusion_layer": spec.fusion_layer,
                                                       "encoder_width": spec.encoder_width, "cross_module": "ca"}))
    return folder


def write_checkpoint(work: Path, args: argparse.Namespace) -> Path:
    """A random model in the released layout, every weight moved off its init (no identity LayerNorm, no zero
    bias), so that any misplaced tensor changes the scores."""
    size, seed = args.size, args.seed
    vision, spec, embed_dim, clip_dim, _, pixels = size_spec(args)
    torch.manual_seed(seed)
    model = build_umt_model("videomamba_middle", vision, spec, embed_dim=embed_dim, clip_output_dim=clip_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "temp":
                param.add_((0.2 if param.dim() == 1 else 0.02) * torch.randn_like(param))
    if size == "full":
        ours = [[k, list(v.shape)] for k, v in released_layout(model.state_dict()).items()]
        if ours != expected_released_layout(pixels):
            raise SystemExit("the model's released layout differs from tests/data/"
                             f"umt_videomamba_m16_released_keys.json (pos_embed for {pixels} px)")
    path = work / f"umt_random_{size}_{pixels}px.pth"
    save_released_checkpoint(model, path)
    return path


def eval_overrides(args, work: Path, checkpoint: Path, tokenizer: Path) -> list[str]:
    """The job's config overrides: this work folder's data, fp32, the re-rank depth, scores saved, no tracking."""
    _, _, _, _, frames, pixels = size_spec(args)
    return [f"model.checkpoint={checkpoint}", f"model.text_model={tokenizer}", "model.precision=fp32",
            f"data.annotation={work / 'anno.json'}", f"data.root={work / 'videos'}", f"data.num_frames={frames}",
            f"data.img_size={pixels}", "data.num_workers=2", "data.batch_size=4",
            f"scoring.rerank_top_k={args.k_test}", "evaluation.save_scores=true", f"output_dir={work / 'ours'}",
            "cache.dir=null", "tracking.enabled=false"]


def start_logged(cmd: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start `cmd` with its output in `log_path`."""
    with log_path.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def finish_logged(process: subprocess.Popen, log_path: Path) -> None:
    """Wait for a start_logged process; on failure, show the end of its log and stop."""
    if process.wait() != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        raise SystemExit(f"FAIL: {Path(process.args[1]).name} exited {process.returncode}; the end of "
                         f"{log_path}:\n{tail}")


def run_logged(cmd: list[str], log_path: Path, **kwargs) -> None:
    finish_logged(start_logged(cmd, log_path, **kwargs), log_path)


def run_ours(args, work: Path, overrides: list[str], env: dict) -> dict:
    cmd = [sys.executable, str(REPO / "jobs/eval_retrieval.py"), "--config", str(EVAL_CONFIG), *overrides]
    run_logged(cmd, work / "ours.log", cwd=REPO, env=env)
    out = work / "ours"
    return {"scores": dict(np.load(out / "scores_msrvtt.npz")),
            "result": json.loads((out / "retrieval_msrvtt.json").read_text())}


def ours_text_side(overrides: list[str]) -> dict:
    """The queries as the job reads them and their unit text embeddings, from the evaluator's own loaders."""
    cfg = load_eval_config(EVAL_CONFIG, overrides)
    anno = prepare_annotations(cfg.data, video_source(cfg.data))
    model = load_eval_model(cfg.model, torch.device("cpu"))
    with torch.no_grad():
        text_TE, _, _ = model.encode_text_features(anno.texts, cfg.data.max_text_tokens)
    return {"texts": anno.texts, "text_emb": text_TE.float().numpy()}


def save_frames(work: Path, entries: list[dict], args: argparse.Namespace) -> Path:
    """The frames our pipeline feeds the model (the job decodes the same files with the same function)."""
    _, _, _, _, frames, pixels = size_spec(args)
    spec = ClipSpec(frames, pixels, *IMAGENET, None)
    clips = torch.stack([spec.load(str(work / "videos" / e["video"])) for e in entries])
    torch.save(clips, work / "frames.pt")
    return work / "frames.pt"


def start_kernel_build(args, work: Path) -> tuple[subprocess.Popen | None, Path | None]:
    """The fp32 kernels, built in the background while our side runs (`--build-kernels`)."""
    if not args.build_kernels:
        return None, Path(args.released_ext) if args.released_ext else None
    out = work / "kernels_fp32"
    cmd = [sys.executable, str(REPO / "scripts/build_released_kernels.py"), "--sdists", args.build_kernels,
           "--out", str(out), "--work", str(work / "kernel_build"), "--dtype", "fp32",
           "--jobs", str(args.build_jobs)]
    log_file = (work / "kernels_build.log").open("w")
    # A session of its own, so that a failed check can stop the build's compiler processes with it.
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True), out


def wait_kernel_build(build: subprocess.Popen | None, work: Path, started: float) -> None:
    if build is None:
        return
    if build.wait() != 0:
        tail = "\n".join((work / "kernels_build.log").read_text().splitlines()[-40:])
        raise SystemExit(f"FAIL: the fp32 kernel build exited {build.returncode}:\n{tail}")
    log(f"fp32 kernels built ({time.perf_counter() - started:.0f} s after the start)")


def released_env(args) -> dict:
    """The released side's environment: its packages first, then the checkout's video_mm, and nothing else."""
    video_mm = Path(args.videomamba_repo).resolve() / "videomamba" / "video_mm"
    path = [str(Path(args.released_site).resolve())] if args.released_site else []
    env = {k: v for k, v in side_env(args, os.environ).items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": os.pathsep.join([*path, str(video_mm)]), "NVIDIA_TF32_OVERRIDE": "0",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def side_env(args, env) -> dict:
    """With --reference-kernels both sides run at once on the CPU: each gets half the cores (OMP_NUM_THREADS,
    unless set), as two processes of 2 threads on 2 cores wait on each other's threads."""
    if args.reference_kernels and "OMP_NUM_THREADS" not in env:
        return {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    return dict(env)


def start_released(args, work: Path, checkpoint: Path, tokenizer: Path, frames: Path | None,
                   ext_dir: Path | None) -> subprocess.Popen:
    video_mm = Path(args.videomamba_repo).resolve() / "videomamba" / "video_mm"
    if not (video_mm / "tasks" / "retrieval_utils.py").is_file():
        raise SystemExit(f"{video_mm}: not a VideoMamba checkout (no videomamba/video_mm/tasks/retrieval_utils.py)")
    out = work / "released"
    modes = [flag for flag, on in (("--decode", args.decode), ("--dry-run", args.dry_run),
                                   ("--reference-kernels", args.reference_kernels)) if on]
    cmd = [args.released_python, str(REPO / "scripts/released_eval_driver.py"),
           "--videomamba-repo", str(Path(args.videomamba_repo).resolve()), "--checkpoint", str(checkpoint),
           "--tokenizer", str(tokenizer), "--annotation", str(work / "anno.json"), "--root", str(work / "videos"),
           "--out", str(out), "--size", args.size, "--img-size", str(size_spec(args)[5]),
           "--k-test", str(args.k_test),
           "--bert-config", str(work / "bert_config.json"),
           *(["--frames", str(frames)] if frames else []), *(["--released-ext", str(ext_dir)] if ext_dir else []),
           *modes]
    return start_logged(cmd, work / "released.log", cwd=video_mm, env=released_env(args))


def finish_released(process: subprocess.Popen, work: Path) -> dict:
    finish_logged(process, work / "released.log")
    out = work / "released"
    return {"scores": dict(np.load(out / "released_scores.npz")),
            "record": json.loads((out / "released.json").read_text())}


def max_diff(ours: np.ndarray, theirs: np.ndarray, atol: float, rtol: float) -> dict:
    """Largest |ours - released| against atol + rtol * the largest |released score|. The re-ranked matrices'
    -100 fill (outside each direction's top-k) is left out of that scale but not out of the difference: a
    candidate on one side only differs by ~100."""
    scores = theirs[theirs != RERANK_FILL]
    diff, scale = float(np.abs(ours - theirs).max()), float(np.abs(scores).max()) if scores.size else 0.0
    return {"max_abs_diff": diff, "max_abs_released": scale, "allowed": atol + rtol * scale,
            "ok": diff <= atol + rtol * scale}


def compare_common(texts: list[str], record: dict) -> dict:
    """The checks both modes make: the load report and the queries as scored."""
    load = record["load"]
    return {"released load: no missing key, only text_encoder.cls.* unexpected (unused at evaluation)": {
                "missing": load["missing"], "unexpected": len(load["unexpected"]),
                "ok": load["missing"] == [] and all(k.startswith("text_encoder.cls.") for k in load["unexpected"])},
            "cleaned queries identical": {"ok": list(texts) == record["texts"]}}


def compare_scores(ours: dict, released: dict, atol: float, rtol: float) -> dict:
    s, r, record = ours["scores"], released["scores"], released["record"]
    checks = compare_common(list(s["texts"]), record)
    for name, key, transpose, theirs in MATRICES:
        checks[name] = max_diff(s[key].T if transpose else s[key], r[theirs], atol, rtol)
    metrics, mismatches = ours["result"]["metrics"], []
    for prefix, theirs in (("", record["metrics"]), ("similarity/", record["metrics_emb"])):
        for name, direction in (("img", "t2v"), ("txt", "v2t")):
            for k in (1, 5, 10):
                mine, released_value = metrics[f"{prefix}{direction}_r{k}"], theirs[f"{name}_r{k}"]
                if round(mine, 2) != released_value:  # itm_eval rounds to 2 decimals
                    mismatches.append(f"{prefix}{direction}_r{k}: ours {mine:.2f}, released {released_value:.2f}")
    checks["R@1/5/10, re-ranked and similarity-only, both directions, equal"] = {
        "mismatches": mismatches, "ok": not mismatches}
    return checks


def compare_dry_run(ours: dict, released: dict, atol: float, rtol: float) -> dict:
    checks = compare_common(ours["texts"], released["record"])
    theirs = released["scores"]["text_emb"]
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    checks["unit text embeddings text_proj([CLS]) (CPU)"] = max_diff(ours["text_emb"], theirs, atol, rtol)
    return checks


def print_checks(checks: dict) -> bool:
    for name, check in checks.items():
        detail = ""
        if "max_abs_diff" in check:
            detail = (f": max |ours - released| = {check['max_abs_diff']:.2e} (allowed {check['allowed']:.1e}; "
                      f"|released scores| up to {check['max_abs_released']:.2f})")
        elif check.get("mismatches"):
            detail = ": " + "; ".join(check["mismatches"])
        log(f"{'ok  ' if check['ok'] else 'FAIL'} {name}{detail}")
    return all(c["ok"] for c in checks.values())


def markdown_report(summary: dict) -> str:
    """check_released_eval.json as tables: the matrix checks, then R@k of both sides."""
    lines = [f"# Zero-shot evaluation against the released code: {summary['verdict']}", "",
             f"{summary.get('date', '?')}, {summary.get('machine', '?')}; {summary['mode']}.",
             f"Size {summary['size']}, {summary.get('num_frames')} frames of {summary.get('img_size')} px, "
             f"{summary['videos']} videos, {summary.get('texts')} texts, re-rank depth {summary['k_test']}, "
             f"{summary.get('seconds', '?')} s.", "",
             "| check | max abs diff | allowed | largest abs released score | ok |", "|---|---:|---:|---:|---|"]
    for name, check in summary.get("checks", {}).items():
        if "max_abs_diff" in check:
            lines.append(f"| {name} | {check['max_abs_diff']:.2e} | {check['allowed']:.1e} | "
                         f"{check['max_abs_released']:.3f} | {'yes' if check['ok'] else 'NO'} |")
        else:
            lines.append(f"| {name} | | | | {'yes' if check['ok'] else 'NO'} |")
    ours, released = summary.get("ours", {}).get("metrics"), summary.get("released", {})
    if ours and "metrics" in released:
        lines += ["", "| R@k (%) | ours | released |", "|---|---:|---:|"]
        for prefix, theirs, label in (("", released["metrics"], "re-ranked"),
                                      ("similarity/", released["metrics_emb"], "similarity")):
            for direction, name in (("t2v", "img"), ("v2t", "txt")):
                for k in (1, 5, 10):
                    lines.append(f"| {label} {direction} R@{k} | {ours[f'{prefix}{direction}_r{k}']:.2f} | "
                                 f"{theirs[f'{name}_r{k}']:.2f} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?") if Path("/proc/cpuinfo").is_file() else "?"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}"


def write_results(results: Path, work: Path, summary: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "check_released_eval.json").write_text(json.dumps(summary, indent=1))
    (results / "check_released_eval.md").write_text(markdown_report(summary))
    copies = {"ours/scores_msrvtt.npz": "scores_ours.npz", "ours/retrieval_msrvtt.json": "retrieval_msrvtt.json",
              "released/released_scores.npz": "released_scores.npz", "released/released.json": "released.json"}
    for src, dst in copies.items():
        if (work / src).is_file():
            shutil.copy2(work / src, results / dst)
    with (results / "check_released_eval.log").open("w") as out:
        for name in ("kernels_build.log", "ours.log", "released.log"):
            if (work / name).is_file():
                out.write(f"===== {name}\n{(work / name).read_text()}\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videomamba-repo", help="a checkout of OpenGVLab/VideoMamba (required unless --ours-only)")
    parser.add_argument("--released-python", default=sys.executable,
                        help="the interpreter of the released side (default: this one)")
    parser.add_argument("--released-site", help="a folder of the released code's package versions (pip install "
                        "--target), first on the released side's PYTHONPATH only")
    kernels = parser.add_mutually_exclusive_group()
    kernels.add_argument("--released-ext", help="folder of the fp32 selective_scan_cuda / causal_conv1d_cuda builds")
    kernels.add_argument("--build-kernels", metavar="SDIST_DIR",
                         help="build them (fp32) from the two sdists in SDIST_DIR while our side runs")
    parser.add_argument("--build-jobs", type=int, default=os.cpu_count() or 1, help="compiler processes in all")
    parser.add_argument("--work", default=str(REPO / "outputs" / "check_released_eval"), help="work folder")
    parser.add_argument("--results", help="folder for the comparison's files (default: <work>/results)")
    parser.add_argument("--size", choices=tuple(SIZES), default="full",
                        help="full: VideoMamba-M + bert-base (the released 798-key layout); tiny: a quick run")
    parser.add_argument("--videos", type=int, default=16, help="synthetic videos (2 captions each)")
    parser.add_argument("--k-test", type=int, default=10,
                        help="re-rank depth (>= 10, or >= 5 for under 6 videos, so R@1/5/10 are comparable)")
    parser.add_argument("--img-size", type=int,
                        help="--size full at this many pixels (a multiple of 16; default 224): VideoMamba-M + "
                        "bert-base, only vision_encoder.pos_embed changes shape; a smaller one for the CPU")
    parser.add_argument("--atol", type=float, default=1e-5, help="allowed |score difference|, absolute part")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="allowed |score difference|, part relative to the matrix's largest |released score|")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videomamba-commit", help="the checkout's commit, recorded (for a copy that is no git "
                        "checkout)")
    parser.add_argument("--decode", action="store_true",
                        help="also decode with the released reader (decord) and report the frame difference")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--ours-only", action="store_true", help="prepare and run our side only")
    modes.add_argument("--dry-run", action="store_true",
                       help="no GPU: import and load both sides, compare queries, load report, text embeddings")
    modes.add_argument("--reference-kernels", action="store_true",
                       help="no GPU: the whole comparison on the CPU, the released kernels replaced by the fork's "
                       "reference functions, both sides at once (slow: --size tiny, or full with few videos)")
    args = parser.parse_args()
    incomparable = incomparable_recalls(args.k_test, args.videos)
    if incomparable:
        parser.error(f"--k-test {args.k_test} leaves {', '.join(incomparable)} incomparable with {args.videos} "
                     "videos: ranks past the re-rank depth tie at -100 in the released matrices")
    if args.img_size is not None and (args.size != "full" or args.img_size % PATCH or args.img_size <= 0):
        parser.error(f"--img-size takes a positive multiple of {PATCH}, with --size full; got {args.img_size}")
    if not args.ours_only and args.videomamba_repo is None:
        parser.error("--videomamba-repo is required (or --ours-only)")
    if args.dry_run and (args.build_kernels or args.released_ext or args.decode):
        parser.error("--dry-run uses no kernels and decodes nothing: drop --build-kernels / --released-ext / --decode")
    if args.reference_kernels and (args.build_kernels or args.released_ext):
        parser.error("--reference-kernels uses no built kernels: drop --build-kernels / --released-ext")
    return args


def incomparable_recalls(k_test: int, videos: int) -> list[str]:
    """The R@k that a re-rank depth of k_test leaves incomparable: k_test < k < the direction's candidates. Past
    the depth the released matrices tie at -100 (where its argsort breaks the tie) and ours keep the similarity
    order; at k >= the candidates every R@k is 100 on both sides."""
    candidates = {"t2v": videos, "v2t": 2 * videos}  # write_videos gives each video 2 captions
    return [f"{d}_r{k}" for d, n in candidates.items() for k in (1, 5, 10) if k_test < k < n]


def mode_name(args: argparse.Namespace) -> str:
    if args.dry_run:
        return "dry run (CPU: no video encoded)"
    if args.ours_only:
        return "ours only"
    if args.reference_kernels:
        return "fp32 on the CPU, the released kernels replaced by the fork's reference functions"
    return "fp32 on CUDA, the released kernels built for fp32"


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0", "HF_HUB_OFFLINE": "1"}
    no_kernels = args.dry_run or args.ours_only or args.reference_kernels
    build, ext_dir = (None, None) if no_kernels else start_kernel_build(args, work)
    entries = write_videos(work, args.videos, args.seed)
    tokenizer = write_tokenizer(work, SIZES[args.size][1])
    checkpoint = write_checkpoint(work, args)
    overrides = eval_overrides(args, work, checkpoint, tokenizer)
    _, _, _, _, num_frames, pixels = size_spec(args)
    log(f"work folder ready: {len(entries)} videos, size {args.size}, {num_frames} frames of {pixels} px "
        f"({time.perf_counter() - started:.0f} s)")
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "size": args.size, "num_frames": num_frames,
               "img_size": pixels, "videos": args.videos,
               "texts": 2 * args.videos, "k_test": args.k_test, "atol": args.atol, "rtol": args.rtol,
               "mode": mode_name(args), "threads_per_side": side_env(args, os.environ).get("OMP_NUM_THREADS"),
               "ours": {"torch": torch.__version__, "device": (torch.cuda.get_device_name()
                                                               if torch.cuda.is_available() else "cpu")}}
    released_run = None
    try:
        if args.dry_run:
            ours = ours_text_side(overrides)
            released = finish_released(start_released(args, work, checkpoint, tokenizer, None, None), work)
            checks = compare_dry_run(ours, released, args.atol, args.rtol)
        else:
            if args.reference_kernels:  # no kernel build to wait for: the released side runs beside ours
                frames = save_frames(work, entries, args)
                released_run = start_released(args, work, checkpoint, tokenizer, frames, None)
            ours = run_ours(args, work, overrides, side_env(args, env))
            summary["ours"]["metrics"] = ours["result"]["metrics"]
            log(f"ours done ({time.perf_counter() - started:.0f} s): "
                f"{json.dumps({k: round(v, 2) for k, v in ours['result']['metrics'].items() if k.endswith('_r1')})}")
            if args.ours_only:
                write_results(Path(args.results or work / "results"), work, summary)
                return 0
            if released_run is None:
                frames = save_frames(work, entries, args)
                wait_kernel_build(build, work, started)
                released_run = start_released(args, work, checkpoint, tokenizer, frames, ext_dir)
            released = finish_released(released_run, work)
            log(f"released done ({time.perf_counter() - started:.0f} s)")
            checks = compare_scores(ours, released, args.atol, args.rtol)
    except SystemExit:
        write_results(Path(args.results or work / "results"), work, {**summary, "verdict": "FAIL"})
        raise
    finally:
        if build is not None and build.poll() is None:
            os.killpg(build.pid, signal.SIGTERM)
        if released_run is not None and released_run.poll() is None:  # our side failed first
            released_run.terminate()
            released_run.wait()
    record = released["record"]
    summary["released"] = {k: record.get(k) for k in ("packages", "placeholders", "released", "device", "metrics",
                                                      "metrics_emb", "frames_max_abs_diff") if k in record}
    summary["released"]["checkout_commit"] = args.videomamba_commit
    ok = print_checks(checks)
    summary.update(checks=checks, verdict="PASS" if ok else "FAIL", seconds=round(time.perf_counter() - started, 1))
    write_results(Path(args.results or work / "results"), work, summary)
    log(f"{'PASS' if ok else 'FAIL'}: {args.size} size, {mode_name(args)}, {summary['seconds']:.0f} s; "
        f"results in {args.results or work / 'results'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
