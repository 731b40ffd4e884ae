"""End-to-end retrieval evaluation on tiny real mp4s with a real (tiny, random) VideoTextModel export.

Covers: metrics equal a by-hand computation from the model's own encoders, the feature cache (no model
forward on a rerun), the report's time split, VTM re-ranking against a brute-force full VTM matrix, shard input,
missing videos, 2-rank gloo extraction equal to 1 rank, MLflow child run nesting, shipped eval YAMLs, the job's dry run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.data.encode import encode_h264
from pipeline.data.keys import make_key
from pipeline.evaluation import retrieval_metrics
from pipeline.evaluation.config import load_eval_config
from pipeline.evaluation.features import ClipSpec, FolderVideos, encode_texts, encode_videos
from pipeline.evaluation.run import evaluate_retrieval, load_video_text_model

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240),
           "yellow": (230, 220, 20)}  # fmt: skip
# Few distinct videos keep every test well under its time budget; paragraph mode is checked on 2 captions each.
VIDEOS = [f"clips/{name}.mp4" for name in COLOURS]


def _write_videos(root: Path) -> None:
    for rgb, rel in zip(COLOURS.values(), VIDEOS, strict=True):
        frames_THW3 = np.zeros((12, 48, 64, 3), dtype=np.uint8)
        frames_THW3[:] = rgb
        for t in range(12):  # a moving dark square, so frames differ in time
            frames_THW3[t, 10:26, 4 * t : 4 * t + 16] = 20
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode_h264(frames_THW3, fps=6.0))


def _tiny_export(path: Path) -> Path:
    from models.video_text import build_video_text_model

    torch.manual_seed(0)
    model = build_video_text_model(
        "videomamba_test", {"num_frames": 4, "scan_backend": "ref"},
        {"name": "ViT-B-16", "width": 32, "layers": 1, "heads": 2, "context_length": 24},
        embed_dim=16, vtm_layers=1,
    )
    meta = {"task": "video_text", **model.config, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    _write_videos(root / "videos")
    entries = [{"video": rel, "caption": [f"a {name} scene", f"the {name} video"]}
               for name, rel in zip(COLOURS, VIDEOS, strict=True)]
    (root / "anno.json").write_text(json.dumps(entries))
    return {"root": root, "checkpoint": _tiny_export(root / "model.pt")}


def _cfg(ws, tmp_path, *extra: str):
    return load_eval_config(None, [
        f"model.checkpoint={ws['checkpoint']}", f"data.annotation={ws['root'] / 'anno.json'}",
        f"data.root={ws['root'] / 'videos'}", "data.name=tiny", "data.num_workers=0", "data.batch_size=2",
        f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra,
    ])


SPEC = ClipSpec(4, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)
CAPTIONS = [t for n in COLOURS for t in (f"a {n} scene", f"the {n} video")]
PARAGRAPHS = [f"a {n} scene the {n} video" for n in COLOURS]


@pytest.fixture(scope="module")
def reference(workspace):
    """Features and VTM scores by hand: the model's own encoders on every clip and text, in single batches."""
    model = load_video_text_model(str(workspace["checkpoint"]), torch.device("cpu"))
    clips_VCTHW = torch.stack([SPEC.load(str(workspace["root"] / "videos" / v)) for v in VIDEOS])
    V, P = len(VIDEOS), len(PARAGRAPHS)
    with torch.no_grad():
        pairs_video = clips_VCTHW.repeat(P, 1, 1, 1, 1)  # row p * V + v = clip v
        pairs_text = [t for t in PARAGRAPHS for _ in range(V)]
        return {
            "model": model,
            "video_VE": model.encode_video(clips_VCTHW),
            "caption_TE": model.encode_text(CAPTIONS),
            "vtm_paragraph_TV": model.vtm_scores(pairs_video, pairs_text).view(P, V),
        }


class CountingLoader:
    """Loads the real model and counts its video/text forward calls (instrumentation, not a stand-in)."""

    def __init__(self) -> None:
        self.loads, self.video_calls, self.text_calls = 0, 0, 0

    def __call__(self, checkpoint: str, device: torch.device):
        self.loads += 1
        model = load_video_text_model(checkpoint, device)
        encode_video, encode_text = model.encode_video, model.encode_text

        def counted_video(video_BCTHW):
            self.video_calls += 1
            return encode_video(video_BCTHW)

        def counted_text(texts, **kwargs):
            self.text_calls += 1
            return encode_text(texts, **kwargs)

        model.encode_video, model.encode_text = counted_video, counted_text
        return model


@pytest.mark.timeout(120)
def test_end_to_end_metrics_cache_and_mlflow(workspace, reference, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    experiment_id = client.create_experiment("videomamba")
    parent = client.create_run(experiment_id, run_name="recipe").info.run_id

    cfg = _cfg(workspace, tmp_path, f"tracking.parent_run_id={parent}")
    loader = CountingLoader()
    first = evaluate_retrieval(cfg, loader)
    assert loader.loads == 1 and loader.video_calls == 3  # 5 videos in batches of 2

    txt2vid = [j for j in range(len(VIDEOS)) for _ in range(2)]
    vid2txt = [[2 * j, 2 * j + 1] for j in range(len(VIDEOS))]
    expected = retrieval_metrics(reference["caption_TE"] @ reference["video_VE"].T, txt2vid, vid2txt)
    assert {k: first[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert (first["videos"], first["texts"], first["skipped_videos"]) == (5, 10, 0)

    report = json.loads(Path(first["report"]).read_text())
    assert report["protocol"]["normalize"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # from the export
    assert report["protocol"]["frames"] == {"num_frames": 4, "sampling": "middle", "trim_seconds": None}
    assert report["cache"]["features_hit"] is False
    table = Path(first["report"]).with_suffix(".md").read_text()
    assert f"| text → video | {first['t2v_r1']:.1f} |" in table

    run = client.get_run(first["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics["t2v_r1"] == pytest.approx(first["t2v_r1"])
    assert run.data.params["text_mode"] == "caption" and run.data.params["resize.interpolation"] == "bicubic"
    assert {a.path for a in client.list_artifacts(first["run_id"])} == {"retrieval_tiny.json", "retrieval_tiny.md"}

    # Rerun: the cache answers, the model is never even loaded, the numbers are identical.
    again = CountingLoader()
    second = evaluate_retrieval(cfg, again)
    assert again.loads == 0 and again.video_calls == 0 and again.text_calls == 0
    assert {k: second[k] for k in expected} == {k: first[k] for k in expected}
    assert json.loads(Path(second["report"]).read_text())["cache"]["features_hit"] is True

    # Changing the protocol (here: paragraph mode) changes the key: the model runs again.
    para = CountingLoader()
    result = evaluate_retrieval(_cfg(workspace, tmp_path, "data.paragraph=true", "data.batch_size=8"), para)
    assert para.video_calls == 1 and result["texts"] == 5


class SlowLoader(CountingLoader):
    """The real model with a known extra delay per video / text forward call, to check where time is booked."""

    VIDEO_DELAY_S, TEXT_DELAY_S = 0.3, 0.2

    def __call__(self, checkpoint: str, device: torch.device):
        import time

        model = super().__call__(checkpoint, device)
        encode_video, encode_text = model.encode_video, model.encode_text

        def slow_video(video_BCTHW):
            time.sleep(self.VIDEO_DELAY_S)
            return encode_video(video_BCTHW)

        def slow_text(texts, **kwargs):
            time.sleep(self.TEXT_DELAY_S)
            return encode_text(texts, **kwargs)

        model.encode_video, model.encode_text = slow_video, slow_text
        return model


@pytest.mark.timeout(120)
def test_report_splits_time_into_decode_forward_and_scoring(workspace, tmp_path):
    loader = SlowLoader()
    result = evaluate_retrieval(_cfg(workspace, tmp_path), loader)
    report = json.loads(Path(result["report"]).read_text())
    timing = report["timing"]
    phases = {"setup_s", "model_load_s", "video_decode_s", "video_forward_s", "text_forward_s", "scoring_s"}
    assert set(timing) == phases | {"total_s"}
    # The delays land in their own phase and nowhere else: 3 video batches, 1 text batch.
    video_delay, text_delay = loader.video_calls * SlowLoader.VIDEO_DELAY_S, loader.text_calls * SlowLoader.TEXT_DELAY_S
    assert (loader.video_calls, loader.text_calls) == (3, 1)
    assert video_delay <= timing["video_forward_s"] < video_delay + 5
    assert text_delay <= timing["text_forward_s"] < text_delay + 5
    assert 0 < timing["video_decode_s"] < video_delay  # decoding 5 tiny clips takes far less than the delay
    assert sum(timing[p] for p in phases) <= timing["total_s"]
    assert {f"timing/{k}": v for k, v in timing.items()} == {k: v for k, v in result.items() if k.startswith("timing/")}
    table = Path(result["report"]).with_suffix(".md").read_text()
    assert f"| video_forward | {timing['video_forward_s']:.2f} |" in table and "| total |" in table
    import mlflow

    run = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["run_id"])
    assert run.data.metrics["timing/video_decode_s"] == pytest.approx(timing["video_decode_s"])
    # A cache hit decodes nothing: its split has no decode or forward phase.
    cached = json.loads(Path(evaluate_retrieval(_cfg(workspace, tmp_path), SlowLoader())["report"]).read_text())
    assert set(cached["timing"]) == {"setup_s", "scoring_s", "total_s"}


@pytest.mark.timeout(120)
def test_vtm_rerank_of_all_pairs_equals_full_vtm_ranking(workspace, reference, tmp_path):
    vtm_TV = reference["vtm_paragraph_TV"]
    identity = [[j] for j in range(len(VIDEOS))]
    expected = retrieval_metrics(vtm_TV, list(range(len(VIDEOS))), identity)
    # top-k >= number of candidates: every pair is re-scored, so the ranking is the VTM head's alone.
    result = evaluate_retrieval(_cfg(workspace, tmp_path, "data.paragraph=true", "scoring.rerank_top_k=8",
                                     "scoring.rerank_batch_size=5", "data.batch_size=8"))
    assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    report = json.loads(Path(result["report"]).read_text())
    assert report["protocol"]["scoring"]["rerank_top_k"] == 8 and report["cache"]["vtm_hit"] is False


@pytest.mark.timeout(120)
def test_shards_match_folder_and_missing_videos(workspace, tmp_path):
    shard = tmp_path / "shards" / "eval-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for rel in VIDEOS[:4]:  # the last video is absent from the shard
            key = make_key(rel)
            tar.add(workspace["root"] / "videos" / rel, arcname=f"{key}.mp4")
            info_bytes = json.dumps({"video_id": rel, "caption": "x", "duration": 2.0}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(info_bytes)
            tar.addfile(info, io.BytesIO(info_bytes))

    sharded = ["data.root=null", f"data.shards={shard.parent}", "tracking.enabled=false"]
    with pytest.raises(FileNotFoundError, match=r"1 of 5 videos .*\n  clips/yellow.mp4\n.*skip_missing=true"):
        evaluate_retrieval(_cfg(workspace, tmp_path, *sharded))
    from_shards = evaluate_retrieval(_cfg(workspace, tmp_path, *sharded, "data.skip_missing=true"))
    assert (from_shards["videos"], from_shards["skipped_videos"]) == (4, 1)
    assert json.loads(Path(from_shards["report"]).read_text())["skipped_videos"] == ["clips/yellow.mp4"]

    # The same four videos read from the folder give the same numbers.
    (tmp_path / "four" / "clips").mkdir(parents=True)
    for rel in VIDEOS[:4]:
        os.symlink(workspace["root"] / "videos" / rel, tmp_path / "four" / rel)
    from_folder = evaluate_retrieval(_cfg(workspace, tmp_path, f"data.root={tmp_path / 'four'}",
                                          "data.skip_missing=true", "tracking.enabled=false",
                                          f"output_dir={tmp_path / 'out2'}"))
    keys = [k for k in from_shards if k.startswith(("t2v", "v2t"))]
    assert {k: from_folder[k] for k in keys} == pytest.approx({k: from_shards[k] for k in keys})


def _extract_on_rank(rank: int, world_size: int, port: int, ws: dict, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = load_video_text_model(str(ws["checkpoint"]), torch.device("cpu"))
        source = FolderVideos(str(ws["root"] / "videos"))
        # 5 videos / 10 texts over 2 ranks: uneven slices (2 + 3) and several batches per rank.
        video_VE = encode_videos(model, VIDEOS, source, SPEC, torch.device("cpu"), batch_size=2, num_workers=0)
        text_TE = encode_texts(model, CAPTIONS, torch.device("cpu"), batch_size=3)
        torch.save({"video_VE": video_VE, "text_TE": text_TE}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_rank_extraction_equals_one_rank(workspace, reference, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "feats")
    mp.spawn(_extract_on_rank, args=(2, port, dict(workspace), out), nprocs=2, join=True)
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    torch.testing.assert_close(rank0["video_VE"], rank1["video_VE"])  # every rank holds the gathered result
    torch.testing.assert_close(rank0["video_VE"], reference["video_VE"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rank0["text_TE"], reference["caption_TE"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["msrvtt", "didemo", "anet", "synthetic"])
def test_shipped_eval_configs_load(name):
    cfg = load_eval_config(REPO / "configs" / "eval" / f"{name}.yaml", ["model.checkpoint=/x/model.pt"])
    assert cfg.data.name == name
    assert cfg.scoring.dual_softmax is False  # transductive tricks off by default
    # The paper's sets use the released protocol: top-128 re-rank, max_txt_l 32 / 64 / 150, cleaned captions.
    assert cfg.scoring.rerank_top_k == (0 if name == "synthetic" else 128)
    assert cfg.data.max_text_tokens == {"msrvtt": 32, "didemo": 64, "anet": 150, "synthetic": None}[name]
    assert cfg.data.clean_captions and cfg.model.text_family == "auto"
    if name in ("didemo", "anet"):
        assert cfg.data.paragraph
    assert cfg.data.trim_seconds == (30.0 if name == "didemo" else None)


def test_config_errors_name_the_key():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="data.trim_seconds"):
        load_eval_config(None, ["data.trim_seconds=-1"])
    with pytest.raises(ConfigError, match=r"scoring.rerank_topk: unknown key \(did you mean 'rerank_top_k'"):
        load_eval_config(None, ["scoring.rerank_topk=5"])
    with pytest.raises(ConfigError, match="model.checkpoint: required"):
        load_eval_config(None, ["data.root=/x", "data.annotation=/y"]).check_runnable()


@pytest.mark.timeout(60)
def test_job_dry_run(workspace, tmp_path):
    cmd = [sys.executable, "jobs/eval_retrieval.py", "--config", "configs/eval/didemo.yaml",
           f"model.checkpoint={workspace['checkpoint']}", f"data.annotation={workspace['root'] / 'anno.json'}",
           f"data.root={workspace['root'] / 'videos'}", "--dry-run"]
    # didemo.yaml asks for 8 frames of 224 px; the tiny export takes 4 of 32: refused before any decoding.
    wrong = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "data.num_frames=8, but the checkpoint's model takes 4" in wrong.stderr
    cmd[-2:-2] = ["data.num_frames=null", "data.img_size=null"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "data set didemo: 5 videos, 5 queries" in out.stdout
    assert "'trim_seconds': 30.0" in out.stdout
    missing = subprocess.run(cmd[:-2] + [f"data.root={tmp_path}", "--dry-run"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode != 0 and "5 of 5 videos" in missing.stderr and "clips/red.mp4" in missing.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_train_workers_give_the_local_numbers(workspace, reference, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    txt2vid = [j for j in range(len(VIDEOS)) for _ in range(2)]
    vid2txt = [[2 * j, 2 * j + 1] for j in range(len(VIDEOS))]
    expected = retrieval_metrics(reference["caption_TE"] @ reference["video_VE"].T, txt2vid, vid2txt)
    try:
        result = evaluate_retrieval(_cfg(workspace, tmp_path, "scaling.use_ray=true", "scaling.num_workers=2",
                                         "scaling.use_gpu=false", "cache.dir=null"))
    finally:
        ray.shutdown()
    assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    report = json.loads(Path(result["report"]).read_text())
    assert report["cache"] == {"features_hit": False, "vtm_hit": None, "world_size": 2}
