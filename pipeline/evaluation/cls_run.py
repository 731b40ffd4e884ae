"""Run one multi-view classification test: labelled videos -> views -> merged scores -> metrics -> reports.

`evaluate_classification(cfg)` is what `jobs/eval_cls.py` calls. It runs in this process, which may be one of
several ranks of an initialised process group (torchrun): every rank scores its slice of the videos
(`evaluation.features.map_clips`), rank 0 gathers, computes the metrics, writes
`<output_dir>/classification_<name>.{json,md}` and logs an MLflow run.

The classifier is rebuilt from the checkpoint alone: its class count, frame count, tubelet and resolution are
read off the head and embedding shapes, so a stage export and a released fine-tuned file (e.g.
`videomamba_s16_k400_f8_res224.pth` with `model.name=videomamba_small`) load the same way, without key surgery.
"""

from __future__ import annotations

import json
import math
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models import create_model, load_pretrained
from models.checkpoints import read_state_dict
from pipeline.config import ConfigError, flatten
from pipeline.distributed import get_world_size, is_main_process
from pipeline.evaluation.cls_config import EvalClassificationConfig
from pipeline.evaluation.cls_metrics import aggregate_views, classification_summary
from pipeline.evaluation.cls_views import ViewSpec
from pipeline.evaluation.features import FolderVideos, ShardVideos, VideoSource, map_clips
from pipeline.evaluation.report import log_to_mlflow, write_report
from pipeline.evaluation.timing import PhaseTimer


def checkpoint_shapes(state: dict[str, Tensor]) -> dict[str, int]:
    """num_classes, num_frames, tubelet_size and img_size of a VideoMamba classifier's state dict."""
    try:
        proj = state["patch_embed.proj.weight"]  # (D, C, tubelet, patch, patch)
        temporal = state["temporal_pos_embedding"]  # (1, T / tubelet, D)
        spatial = state["pos_embed"]  # (1, 1 + patches per frame, D)
        head = state["head.weight"]  # (K, D)
    except KeyError as err:
        raise ValueError(f"no tensor {err} in the checkpoint: a video classifier (with a head) is needed; "
                         "a pretraining export has no head, fine-tune it first (jobs/finetune_cls.py)") from None
    return {"num_classes": head.shape[0], "num_frames": temporal.shape[1] * proj.shape[2],
            "tubelet_size": proj.shape[2], "img_size": math.isqrt(spatial.shape[1] - 1) * proj.shape[3]}


def load_classifier(cfg: EvalClassificationConfig, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier in eval mode on `device`, and the checkpoint's facts (shapes, model name, export meta)."""
    blob = torch.load(cfg.model.checkpoint, map_location="cpu", weights_only=True)
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    state, _ = read_state_dict(blob)
    name = cfg.model.name or meta.get("model_name")
    if name is None:
        raise ConfigError(f"model.name: {cfg.model.checkpoint} is not a stage export (no meta); name the released "
                          "model's size, e.g. model.name=videomamba_small")
    facts = {**checkpoint_shapes(state), "model_name": name, "meta": meta}
    build = {k: facts[k] for k in ("num_classes", "tubelet_size")}
    build["num_frames"] = cfg.model.num_frames or facts["num_frames"]
    build["img_size"] = cfg.model.img_size or facts["img_size"]
    model = create_model(name, **build, scan_backend=cfg.model.scan_backend)
    report = load_pretrained(model, state, strict_head=True)
    if report.missing:
        raise ValueError(f"model.checkpoint: {cfg.model.checkpoint} lacks {report.missing[:6]} of {name} "
                         f"({len(report.missing)} tensors); check model.name")
    facts.update(build=build, interpolated=report.interpolated)
    return model.to(device).eval(), facts


@dataclass
class LabelledVideos:
    videos: list[str]
    """Video paths as listed (relative to the root), or the shards' `source` names."""
    labels: list[int]
    class_names: list[str]
    missing: list[str] = field(default_factory=list)
    """Listed videos that were absent (dropped with data.skip_missing)."""


def class_names(cfg: EvalClassificationConfig, meta: dict[str, Any], num_classes: int) -> list[str] | None:
    """data.class_index, else the export's names, else the `classes.txt` beside the shards; None when unknown."""
    from pipeline.data.labels import CLASS_INDEX_FILE, read_class_index

    names = None
    if cfg.data.class_index is not None:
        names = read_class_index(cfg.data.class_index)
    elif meta.get("class_names"):
        names = list(meta["class_names"])
    elif cfg.data.shards is not None and isinstance(cfg.data.shards, str) and not cfg.data.shards.endswith(".tar"):
        from pipeline.data.urls import filesystem, join_url

        candidate = join_url(cfg.data.shards, CLASS_INDEX_FILE)
        names = read_class_index(candidate) if filesystem(candidate).exists(candidate) else None
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"data.class_index: {len(names)} class names for a checkpoint with {num_classes} classes")
    return names


def shard_labels(shards: str | list[str]) -> tuple[list[str], list[int]]:
    """(source video, label) of every sample of labelled shards, reading only their json members."""
    from pipeline.data.urls import expand_shard_urls, filesystem

    videos, labels = [], []
    for url in expand_shard_urls(shards):
        with filesystem(url).open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:  # a seekable tar: the mp4 payloads are skipped, not read
                if not member.name.endswith(".json"):
                    continue
                meta = json.load(tar.extractfile(member))
                if "label" not in meta:
                    raise ValueError(f"{url}: sample {member.name} has no label; write the shards from a "
                                     "`video,label` list (jobs/make_shards.py) or give data.annotation")
                videos.append(meta["source"])
                labels.append(int(meta["label"]))
    return videos, labels


def video_source(cfg: EvalClassificationConfig) -> VideoSource:
    if cfg.data.shards is not None:
        return ShardVideos(cfg.data.shards)
    # Relative paths resolve against the list's folder, as the shard writer resolves them.
    return FolderVideos(cfg.data.root or posixpath.dirname(cfg.data.annotation))


def labelled_videos(cfg: EvalClassificationConfig, source: VideoSource, names: list[str] | None,
                    num_classes: int) -> LabelledVideos:
    """The test videos and labels (from data.annotation, else from the shards), absent ones handled per
    data.skip_missing."""
    from pipeline.data.shards import read_input_list

    known = names or [str(k) for k in range(num_classes)]  # integer labels resolve against class numbers
    if cfg.data.annotation is not None:
        try:
            rows, _, listed = read_input_list(cfg.data.annotation, known)
        except ValueError as err:
            hint = "" if names else "; a list with class names needs data.class_index (the training class index)"
            raise ValueError(f"data.annotation: {err}{hint}") from err
        videos, labels = [r.video for r in rows], [r.label for r in rows]
    else:
        videos, labels = shard_labels(cfg.data.shards)
    out_of_range = [label for label in labels if not 0 <= label < num_classes]
    if out_of_range:
        raise ValueError(f"labels {sorted(set(out_of_range))[:5]} are outside the checkpoint's {num_classes} classes")
    missing = [v for v in videos if not source.exists(v)]
    if missing and not cfg.data.skip_missing:
        raise FileNotFoundError(f"{len(missing)} of {len(videos)} listed videos are not in {source.describe()}, e.g. "
                                f"{missing[:3]}; fix data.root / data.shards or set data.skip_missing=true")
    absent = set(missing)
    keep = [i for i, v in enumerate(videos) if v not in absent]
    return LabelledVideos([videos[i] for i in keep], [labels[i] for i in keep], known, missing)


def protocol(cfg: EvalClassificationConfig, spec: ViewSpec) -> dict[str, Any]:
    """What the numbers depend on besides the weights: recorded in the report and as MLflow params."""
    return {
        "views": {"temporal_clips": spec.num_clips, "spatial_crops": spec.num_crops,
                  "merge": "mean of per-view softmax"},
        "frames": {"num_frames": spec.num_frames, "sampling": "segment offsets (c + 1) / (clips + 1)"},
        "resize": {"short_side": spec.img_size, "interpolation": "bilinear", "crop": f"{spec.num_crops} along the "
                   "long side"},
        "normalize": {"mean": list(spec.mean), "std": list(spec.std)},
        "labels": str(cfg.data.annotation or cfg.data.shards),
    }


def _device(cfg: EvalClassificationConfig) -> torch.device:
    from pipeline.engine import device_for_worker

    return device_for_worker() if cfg.scaling.use_gpu is not False else torch.device("cpu")


def evaluate_classification(cfg: EvalClassificationConfig) -> dict[str, Any]:
    """Test and return `{top1, top5, mean_class_top1, videos, classes, views, timing/<phase>_s, run_id, report}` on
    rank 0 ({} on the other ranks of a torchrun group)."""
    cfg.check_runnable()
    timer = PhaseTimer()
    device = _device(cfg)
    with timer.phase("model_load", device):
        model, facts = load_classifier(cfg, device)
    with timer.phase("setup"):
        source = video_source(cfg)
        num_classes = facts["num_classes"]
        data = labelled_videos(cfg, source, class_names(cfg, facts["meta"], num_classes), num_classes)
        spec = ViewSpec(facts["build"]["num_frames"], facts["build"]["img_size"], cfg.views.num_clips,
                        cfg.views.num_crops, tuple(cfg.data.mean), tuple(cfg.data.std))

    def score(_: Tensor, views_BVCTHW: Tensor) -> Tensor:
        B, V = views_BVCTHW.shape[:2]
        return aggregate_views(model(views_BVCTHW.flatten(0, 1)).view(B, V, -1))

    probs_NK = map_clips(score, data.videos, source, spec, device, cfg.data.batch_size, cfg.data.num_workers,
                         cfg.model.precision, desc="views", timer=timer)
    if not is_main_process():
        return {}
    with timer.phase("scoring"):
        summary = classification_summary(probs_NK, torch.tensor(data.labels), data.class_names, cfg.most_confused)
    result = {
        "dataset": cfg.data.name,
        "checkpoint": str(cfg.model.checkpoint),
        **summary,
        "protocol": protocol(cfg, spec),
        "counts": {"videos": len(data.videos), "classes": num_classes, "views_per_video": spec.num_views,
                   "skipped_videos": len(data.missing)},
        "model": {"name": facts["model_name"], **facts["build"], "interpolated": facts["interpolated"]},
        "skipped_videos": data.missing,
        "world_size": get_world_size(),
        "timing": timer.report(),
    }
    files = list(write_report(result, cfg.output_dir, "classification", markdown_report))
    run_id = log_to_mlflow(result, cfg, files, stage="eval_classification") if cfg.tracking.enabled else None
    timing = {f"timing/{k}": v for k, v in result["timing"].items()}
    return {**result["metrics"], **{k: result["counts"][k] for k in ("videos", "classes")},
            "views": spec.num_views, **timing, "run_id": run_id, "report": str(files[0])}


def markdown_report(result: dict[str, Any], worst: int = 10) -> str:
    """The metrics, the worst classes, the most confused pairs and the protocol, as a small markdown page."""
    m, counts = result["metrics"], result["counts"]
    lines = [f"## Classification: {result['dataset']}", "", f"Checkpoint: `{result['checkpoint']}`  ",
             f"Videos: {counts['videos']} ({counts['skipped_videos']} skipped as missing), classes: "
             f"{counts['classes']}, views per video: {counts['views_per_video']}", "",
             "| top-1 | top-5 | mean class top-1 | chance top-1 |", "|---:|---:|---:|---:|",
             f"| {m['top1']:.1f} | {m['top5']:.1f} | {m['mean_class_top1']:.1f} | {100 / counts['classes']:.1f} |"]
    tested = sorted((row for row in result["per_class"] if row["top1"] is not None), key=lambda row: row["top1"])
    lines += ["", f"Lowest per-class top-1 ({min(worst, len(tested))} of {len(tested)} classes):", "",
              "| class | videos | top-1 |", "|---|---:|---:|"]
    lines += [f"| {row['name']} | {row['videos']} | {row['top1']:.1f} |" for row in tested[:worst]]
    pairs = result["confusion"]["most_confused"]
    lines += ["", "Most confused (true -> predicted):", "", "| true | predicted | videos | share of true |",
              "|---|---|---:|---:|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['videos']} | {p['share_of_true']:.1f}% |" for p in pairs]
    lines += ["", "Protocol:", ""] + [f"- {key}: `{value}`" for key, value in flatten(result["protocol"]).items()]
    return "\n".join(lines) + "\n"


def describe_plan(cfg: EvalClassificationConfig) -> list[str]:
    """What a run would do (for --dry-run): loads the checkpoint, lists the labelled videos, checks they exist."""
    cfg.check_runnable()
    model, facts = load_classifier(cfg, torch.device("cpu"))
    del model
    source = video_source(cfg)
    data = labelled_videos(cfg, source, class_names(cfg, facts["meta"], facts["num_classes"]), facts["num_classes"])
    views = cfg.views.num_clips * cfg.views.num_crops
    return [
        f"checkpoint {cfg.model.checkpoint}: {facts['model_name']} {facts['build']} (interpolated: "
        f"{facts['interpolated'] or 'nothing'})",
        f"data set {cfg.data.name}: {len(data.videos)} videos, {facts['num_classes']} classes, from "
        f"{source.describe()} (skipped as missing: {len(data.missing)})",
        f"views {cfg.views.num_clips} clips x {cfg.views.num_crops} crops = {views} per video",
        f"reports -> {Path(cfg.output_dir) / f'classification_{cfg.data.name}'}.{{json,md}}",
    ]
