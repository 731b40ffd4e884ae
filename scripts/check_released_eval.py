"""Check our zero-shot evaluation of a released-layout checkpoint against the released VideoMamba code.

    python scripts/check_released_eval.py --videomamba-repo ~/src/VideoMamba \
        --released-python ~/envs/videomamba-release/bin/python [--size full|tiny] [--decode]

One command, on a CUDA machine:
1. writes a work folder: a few synthetic mp4s and a UMT-layout annotation (captions with capitals and
   punctuation), a tokenizer folder (generated vocab.txt of the tower's size + BERT config.json), and a
   random-weight checkpoint in the released layout (`{"model": ...}`, bf16; `--size full` = VideoMamba-M +
   bert-base, the 798 keys of tests/data/umt_videomamba_m16_released_keys.json, checked; `tiny` for a quick run);
2. our side: `jobs/eval_retrieval.py --config configs/eval/msrvtt.yaml` (fp32, top-`--k-test` re-rank,
   `evaluation.save_scores=true`) in this interpreter, and the frames our pipeline decodes for each video;
3. the released side: scripts/released_eval_driver.py with `--released-python`, inside
   `<checkout>/videomamba/video_mm`: the released model class, checkpoint loading, caption cleaning, tokenizer,
   `evaluation()` and `itm_eval()`, fed the same frames;
4. compares the similarity and re-ranked matrices (max |difference| <= --atol) and R@1/5/10 both directions,
   re-ranked and similarity-only (equal), and exits 1 on any mismatch.

TF32 is off on both sides (NVIDIA_TF32_OVERRIDE=0): the comparison is fp32. What the released side needs: a
checkout of OpenGVLab/VideoMamba (never copied into this project) and a Python environment with its
requirements (videomamba/README.md: torch 2.1.1+cu118, transformers 4.36.1, timm 0.4.12, einops, decord, av,
opencv-python, imageio, pandas, wandb) and its kernel fork built with CUDA (`pip install -e causal-conv1d`,
`pip install -e mamba` in the checkout). Our side needs this project's environment and the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.bert import BertSpec  # noqa: E402
from models.umt import build_umt_model  # noqa: E402
from models.umt_checkpoint import released_layout, save_released_checkpoint  # noqa: E402
from pipeline.data.encode import encode_h264  # noqa: E402
from pipeline.evaluation.features import ClipSpec  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240),
           "yellow": (230, 220, 20), "black": (20, 20, 20), "purple": (140, 40, 160), "orange": (240, 140, 20)}
SHAPES = ("square", "circle")
WORDS = [*COLOURS, *SHAPES, "a", "the", "moves", "left", "right", "runs", "clip"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SIZES = {
    # (vision model kwargs, BERT spec, joint width, UTA output width, frames, pixels)
    "full": ({"num_frames": 8, "img_size": 224}, BertSpec(encoder_width=576), 512, 512, 8, 224),
    "tiny": ({"num_frames": 4, "img_size": 32, "embed_dim": 32, "depth": 2},
             BertSpec(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=40, fusion_layer=2, encoder_width=32),
             16, 24, 4, 32),
}


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


def write_checkpoint(work: Path, size: str, seed: int) -> Path:
    """A random model in the released layout, every weight moved off its init (no identity LayerNorm, no zero
    bias), so that any misplaced tensor changes the scores."""
    vision, spec, embed_dim, clip_dim, _, _ = SIZES[size]
    torch.manual_seed(seed)
    model = build_umt_model("videomamba_middle", vision, spec, embed_dim=embed_dim, clip_output_dim=clip_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "temp":
                param.add_((0.2 if param.dim() == 1 else 0.02) * torch.randn_like(param))
    if size == "full":
        expected = json.loads((REPO / "tests/data/umt_videomamba_m16_released_keys.json").read_text())["keys"]
        ours = [[k, list(v.shape)] for k, v in released_layout(model.state_dict()).items()]
        if ours != [[k, s] for k, s, _ in expected]:
            raise SystemExit("the model's released layout differs from tests/data/"
                             "umt_videomamba_m16_released_keys.json")
    path = work / f"umt_random_{size}.pth"
    save_released_checkpoint(model, path)
    return path


def run_ours(args, work: Path, checkpoint: Path, tokenizer: Path, env: dict) -> dict:
    _, _, _, _, frames, pixels = SIZES[args.size]
    out = work / "ours"
    cmd = [sys.executable, str(REPO / "jobs/eval_retrieval.py"), "--config", str(REPO / "configs/eval/msrvtt.yaml"),
           f"model.checkpoint={checkpoint}", f"model.text_model={tokenizer}", "model.precision=fp32",
           f"data.annotation={work / 'anno.json'}", f"data.root={work / 'videos'}", f"data.num_frames={frames}",
           f"data.img_size={pixels}", "data.num_workers=2", "data.batch_size=4",
           f"scoring.rerank_top_k={args.k_test}", "evaluation.save_scores=true", f"output_dir={out}",
           "cache.dir=null", "tracking.enabled=false"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return {"scores": np.load(out / "scores_msrvtt.npz"),
            "result": json.loads((out / "retrieval_msrvtt.json").read_text())}


def save_frames(work: Path, entries: list[dict], size: str) -> Path:
    """The frames our pipeline feeds the model (the job decodes the same files with the same function)."""
    _, _, _, _, frames, pixels = SIZES[size]
    spec = ClipSpec(frames, pixels, *IMAGENET, None)
    clips = torch.stack([spec.load(str(work / "videos" / e["video"])) for e in entries])
    torch.save(clips, work / "frames.pt")
    return work / "frames.pt"


def run_released(args, work: Path, checkpoint: Path, tokenizer: Path, frames: Path, env: dict) -> dict:
    video_mm = Path(args.videomamba_repo).resolve() / "videomamba" / "video_mm"
    if not (video_mm / "tasks" / "retrieval_utils.py").is_file():
        raise SystemExit(f"{video_mm}: not a VideoMamba checkout (no videomamba/video_mm/tasks/retrieval_utils.py)")
    out = work / "released"
    cmd = [args.released_python, str(REPO / "scripts/released_eval_driver.py"), "--checkpoint", str(checkpoint),
           "--tokenizer", str(tokenizer), "--frames", str(frames), "--annotation", str(work / "anno.json"),
           "--root", str(work / "videos"), "--out", str(out), "--size", args.size, "--k-test", str(args.k_test),
           "--bert-config", str(work / "bert_config.json"), *(["--decode"] if args.decode else [])]
    released_env = {**env, "PYTHONPATH": str(video_mm)}
    subprocess.run(cmd, cwd=video_mm, env=released_env, check=True)
    return {"scores": np.load(out / "released_scores.npz"), "record": json.loads((out / "released.json").read_text())}


def compare(ours: dict, released: dict, atol: float) -> bool:
    record, s, r = released["record"], ours["scores"], released["scores"]
    ok = True
    print(f"released load: missing {record['load']['missing']}, unexpected {len(record['load']['unexpected'])} "
          "(text_encoder.cls.*, unused at evaluation)")
    load = record["load"]
    ok &= load["missing"] == [] and all(k.startswith("text_encoder.cls.") for k in load["unexpected"])
    same_texts = list(s["texts"]) == record["texts"]
    print(f"cleaned queries identical: {same_texts}")
    ok &= same_texts
    pairs = (("similarity t2v", s["similarity_t2v_TV"], r["t2i_emb"]),
             ("similarity v2t", s["similarity_v2t_TV"].T, r["i2t_emb"]),
             ("re-ranked t2v", s["rerank_t2v_TV"], r["t2i_x"]),
             ("re-ranked v2t", s["rerank_v2t_TV"].T, r["i2t_x"]))
    for name, a, b in pairs:
        diff = float(np.abs(a - b).max())
        print(f"{name:15s} max |ours - released| = {diff:.2e}  (|scores| up to {float(np.abs(b).max()):.2f})")
        ok &= diff <= atol
    metrics, recall_ok = ours["result"]["metrics"], True
    for prefix, theirs in (("", record["metrics"]), ("similarity/", record["metrics_emb"])):
        for name, direction in (("img", "t2v"), ("txt", "v2t")):
            for k in (1, 5, 10):
                mine, released_value = metrics[f"{prefix}{direction}_r{k}"], theirs[f"{name}_r{k}"]
                if round(mine, 2) != released_value:  # itm_eval rounds to 2 decimals
                    print(f"MISMATCH {prefix}{direction}_r{k}: ours {mine:.2f}, released {released_value:.2f}")
                    recall_ok = False
    print(f"R@1/5/10, re-ranked and similarity-only, both directions, equal: {recall_ok}")
    ok &= recall_ok
    if "frames_max_abs_diff" in record:
        print(f"frames, released decord decode vs ours (PyAV), max |difference| after normalising: "
              f"{record['frames_max_abs_diff']:.3f} (informational)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videomamba-repo", help="a checkout of OpenGVLab/VideoMamba (required unless --ours-only)")
    parser.add_argument("--released-python", default=sys.executable,
                        help="the interpreter of the released code's environment (default: this one)")
    parser.add_argument("--work", default=str(REPO / "outputs" / "check_released_eval"), help="work folder")
    parser.add_argument("--size", choices=tuple(SIZES), default="full",
                        help="full: VideoMamba-M + bert-base (the released 798-key layout); tiny: a quick run")
    parser.add_argument("--videos", type=int, default=16, help="synthetic videos (2 captions each)")
    parser.add_argument("--k-test", type=int, default=10, help="re-rank depth (>= 10 so R@1/5/10 are comparable)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |score difference|")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", action="store_true",
                        help="also decode with the released reader (decord) and report the frame difference")
    parser.add_argument("--ours-only", action="store_true", help="prepare and run our side only (no GPU needed)")
    args = parser.parse_args()
    if args.k_test < 10:
        parser.error("--k-test must be >= 10: ranks past the re-rank depth tie at -100 in the released matrices")
    if not args.ours_only and args.videomamba_repo is None:
        parser.error("--videomamba-repo is required (or --ours-only)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0", "HF_HUB_OFFLINE": "1"}
    entries = write_videos(work, args.videos, args.seed)
    tokenizer = write_tokenizer(work, SIZES[args.size][1])
    checkpoint = write_checkpoint(work, args.size, args.seed)
    frames = save_frames(work, entries, args.size)
    ours = run_ours(args, work, checkpoint, tokenizer, env)
    print(f"ours: {json.dumps({k: round(v, 2) for k, v in ours['result']['metrics'].items() if k.endswith('_r1')})}")
    if args.ours_only:
        return 0
    released = run_released(args, work, checkpoint, tokenizer, frames, env)
    ok = compare(ours, released, args.atol)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
