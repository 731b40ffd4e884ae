"""Run one zero-shot retrieval evaluation: annotations -> features (cached) -> scores -> metrics -> reports.

`evaluate_retrieval(cfg)` is what `jobs/eval_retrieval.py` and the recipe runner call. With
`scaling.use_ray` it runs `evaluate_on_rank` on Ray Train workers; otherwise in this process, which may
be one of several ranks of an already-initialised process group (torchrun): every rank encodes its slice,
rank 0 scores, writes the reports and logs the MLflow run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.distributed import get_world_size, is_main_process
from pipeline.evaluation.annotations import RetrievalAnnotations, drop_missing, load_annotations
from pipeline.evaluation.cache import FeatureCache, cache_key, checkpoint_identity
from pipeline.evaluation.config import EvalDataConfig, EvalModelConfig, EvalRetrievalConfig
from pipeline.evaluation.features import ClipSpec, FolderVideos, ShardVideos, VideoSource
from pipeline.evaluation.loading import BERT, load_eval_model, model_facts
from pipeline.evaluation.metrics import rank_summary, t2v_ranks, v2t_ranks
from pipeline.evaluation.report import log_to_mlflow, write_report
from pipeline.evaluation.scoring import EvalContext, Scores, dual_encoder_scores, write_scores
from pipeline.evaluation.timing import PhaseTimer
from pipeline.evaluation.umt_scoring import DEFAULT_MAX_TEXT_TOKENS, umt_scores

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ModelLoader = Callable[[str, torch.device], Any]


def load_video_text_model(checkpoint: str, device: torch.device, model_cfg: EvalModelConfig | None = None):
    """The default model loader: a video-text stage export or a released multimodal checkpoint, in eval mode on
    `device` (`model_cfg` supplies the text family check and, for BERT, the tokenizer's `text_model`)."""
    return load_eval_model(dataclasses.replace(model_cfg or EvalModelConfig(), checkpoint=checkpoint), device)


def clip_spec(data: EvalDataConfig, facts: dict[str, Any]) -> ClipSpec:
    """Config values win; unset ones come from the export (what the model was built and trained with). The
    model takes only its own frame count and size, so a config value that differs is an error now, not later."""
    for key in ("num_frames", "img_size"):
        value = getattr(data, key)
        if value is not None and value != facts[key]:
            raise ConfigError(f"data.{key}={value}, but the checkpoint's model takes {facts[key]}; set "
                              f"data.{key}={facts[key]} or null (the model's own)")
    return ClipSpec(
        num_frames=data.num_frames or facts["num_frames"],
        img_size=data.img_size or facts["img_size"],
        mean=tuple(data.mean or facts.get("mean") or IMAGENET_MEAN),
        std=tuple(data.std or facts.get("std") or IMAGENET_STD),
        trim_seconds=data.trim_seconds,
    )


def max_text_tokens(data: EvalDataConfig, family: str) -> int | None:
    """Tokens per query: the config's, else 32 for BERT (UMT's MSR-VTT value), else the open_clip tower's own."""
    if data.max_text_tokens is not None:
        return data.max_text_tokens
    return DEFAULT_MAX_TEXT_TOKENS if family == BERT else None


def video_source(data: EvalDataConfig) -> VideoSource:
    return FolderVideos(data.root) if data.root is not None else ShardVideos(data.shards)


def prepare_annotations(data: EvalDataConfig, source: VideoSource) -> RetrievalAnnotations:
    anno = load_annotations(data.annotation, paragraph=data.paragraph, clean=data.clean_captions)
    return drop_missing(anno, source.exists, data.skip_missing, source.describe())


def protocol(cfg: EvalRetrievalConfig, spec: ClipSpec, family: str) -> dict[str, Any]:
    """Everything the numbers depend on besides the weights: recorded in the report and as MLflow params."""
    scoring = {"similarity": "frame-mean cosine" if family == BERT else "cosine",
               "dual_softmax": cfg.scoring.dual_softmax, "rerank_top_k": cfg.scoring.rerank_top_k}
    if cfg.scoring.rerank_top_k:
        scoring["rerank_score"] = "itm_head positive logit" if family == BERT else "vtm_head positive logit"
    if cfg.scoring.dual_softmax:
        scoring["dual_softmax_temperature"] = cfg.scoring.dual_softmax_temperature
    return {
        "annotation": str(cfg.data.annotation),
        "text_family": family,
        "text_mode": "paragraph" if cfg.data.paragraph else "caption",
        "text": {"clean_captions": cfg.data.clean_captions, "max_text_tokens": max_text_tokens(cfg.data, family)},
        "frames": {"num_frames": spec.num_frames, "sampling": "middle", "trim_seconds": spec.trim_seconds},
        "resize": {"img_size": spec.img_size, "interpolation": "bicubic", "antialias": False, "crop": "none"},
        "normalize": {"mean": list(spec.mean), "std": list(spec.std)},
        "scoring": scoring,
    }


def _device(cfg: EvalRetrievalConfig) -> torch.device:
    from pipeline.engine import device_for_worker

    return device_for_worker() if cfg.scaling.use_gpu is not False else torch.device("cpu")


class _LazyModel:
    """Loads the model on first use (timed as `model_load`), so a cache hit never reads the weights."""

    def __init__(self, loader: ModelLoader, checkpoint: str, device: torch.device, timer: PhaseTimer) -> None:
        self.loader, self.checkpoint, self.device, self.model = loader, checkpoint, device, None
        self.timer = timer

    def get(self):
        if self.model is None:
            with self.timer.phase("model_load", self.device):
                self.model = self.loader(self.checkpoint, self.device)
        return self.model


def ranked_metrics(t2v_TV: torch.Tensor, v2t_TV: torch.Tensor, anno: RetrievalAnnotations) -> dict[str, float]:
    return {**rank_summary("t2v", t2v_ranks(t2v_TV, anno.txt2vid)),
            **rank_summary("v2t", v2t_ranks(v2t_TV, anno.vid2txt))}


def evaluate_on_rank(cfg: EvalRetrievalConfig, model_loader: ModelLoader | None = None) -> dict | None:
    """The per-rank body: every rank extracts its share; rank 0 returns the flat result, others None.

    `model_loader(checkpoint, device)` defaults to `load_video_text_model` with this config's model section.
    The metrics are those of the re-ranked scores when re-ranking is on (UMT's reported `test/` numbers), and
    `similarity/<metric>` those of the first-stage similarity alone (UMT's `test_emb/`).
    The result's `timing` splits this rank's seconds into phases (see `PhaseTimer.report`): setup
    (annotations, video listing), model_load, video_decode, video_forward, text_forward, scoring
    (similarities, ranks, metrics) and, with re-ranking, vtm_rerank_decode / vtm_rerank_forward;
    total_s also covers the feature cache and the gathers between ranks.
    """
    cfg.check_runnable()
    loader = model_loader or functools.partial(load_video_text_model, model_cfg=cfg.model)
    timer = PhaseTimer()
    with timer.phase("setup"):
        source = video_source(cfg.data)
        anno = prepare_annotations(cfg.data, source)
        facts = model_facts(cfg.model)
        spec = clip_spec(cfg.data, facts)
    family = facts["family"]
    device = _device(cfg)
    model = _LazyModel(loader, cfg.model.checkpoint, device, timer)
    feature_key = cache_key({
        "checkpoint": checkpoint_identity(cfg.model.checkpoint, cfg.cache.hash_checkpoint),
        "annotation_sha256": anno.sha256, "paragraph": cfg.data.paragraph, "videos": anno.videos,
        "source": source.describe(), "clip": spec.__dict__, "family": family,
        "precision": cfg.model.precision if device.type == "cuda" else "fp32",  # CPU always runs fp32
        "text": {"clean": cfg.data.clean_captions, "max_tokens": max_text_tokens(cfg.data, family)},
    })
    ctx = EvalContext(cfg, anno, source, spec, device, model.get, FeatureCache(cfg.cache.dir, cfg.data.name),
                      feature_key, timer, max_text_tokens(cfg.data, family))
    scores: Scores = (umt_scores if family == BERT else dual_encoder_scores)(ctx)
    if not is_main_process():
        return None

    with timer.phase("scoring"):
        metrics = ranked_metrics(*scores.ranking(), anno)
        if scores.reranked:
            similarity = ranked_metrics(scores.sim_t2v_TV, scores.sim_v2t_TV, anno)
            metrics.update({f"similarity/{k}": v for k, v in similarity.items()})
    score_files = [write_scores(cfg.output_dir, cfg.data.name, scores, anno)] if cfg.evaluation.save_scores else []
    result = {
        "dataset": cfg.data.name,
        "checkpoint": str(cfg.model.checkpoint),
        "metrics": metrics,
        "protocol": protocol(cfg, spec, family),
        "counts": {"videos": len(anno.videos), "texts": len(anno.texts), "skipped_videos": len(anno.missing)},
        "skipped_videos": anno.missing,
        "cache": {"features_hit": scores.features_hit, "vtm_hit": scores.vtm_hit, "world_size": get_world_size()},
        "timing": timer.report(),
    }
    files = list(write_report(result, cfg.output_dir))
    run_id = log_to_mlflow(result, cfg, files + score_files) if cfg.tracking.enabled else None
    timing = {f"timing/{k}": v for k, v in result["timing"].items()}
    out = {**metrics, **result["counts"], **timing, "run_id": run_id, "report": str(files[0])}
    if score_files:
        out["scores"] = str(score_files[0])
    return out


def evaluate_retrieval(cfg: EvalRetrievalConfig, model_loader: ModelLoader | None = None) -> dict[str, Any]:
    """Evaluate and return `{t2v_r1, ..., v2t_meanr, [similarity/...], videos, texts, skipped_videos,
    timing/<phase>_s, run_id, report, [scores]}`.

    Without Ray this process evaluates (as one rank of a torchrun group, if one is initialised; other
    ranks get {}). With `scaling.use_ray` the default model loader runs on Ray Train workers.
    """
    cfg.check_runnable()
    if cfg.scaling.use_ray:
        return _evaluate_with_ray(_absolute_paths(cfg))
    result = evaluate_on_rank(cfg, model_loader)
    return result if result is not None else {}


def _absolute_paths(cfg: EvalRetrievalConfig) -> EvalRetrievalConfig:
    """Ray workers do not share the driver's working directory: make every local path absolute."""
    from pipeline.tracking import tracking_uri
    from pipeline.tracking_artifacts import absolute_artifact_root

    def local(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).resolve())

    shards = cfg.data.shards
    shards = [local(s) for s in shards] if isinstance(shards, list) else local(shards)
    data = dataclasses.replace(cfg.data, annotation=local(cfg.data.annotation), root=local(cfg.data.root),
                               shards=shards)
    return dataclasses.replace(
        cfg, output_dir=local(cfg.output_dir), data=data,
        model=dataclasses.replace(cfg.model, checkpoint=local(cfg.model.checkpoint)),
        cache=dataclasses.replace(cfg.cache, dir=local(cfg.cache.dir)),
        tracking=dataclasses.replace(cfg.tracking, uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
                                     artifact_location=absolute_artifact_root(cfg.tracking.artifact_location)),
    )


def _record_path(cfg: EvalRetrievalConfig) -> Path:
    return Path(cfg.output_dir) / f"retrieval_{cfg.data.name}.result.json"


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker; rank 0 leaves the flat result where the driver reads it."""
    cfg = from_dict(EvalRetrievalConfig, loop_config["config"], "")
    result = evaluate_on_rank(cfg)
    if result is not None:
        _record_path(cfg).write_text(json.dumps(result))


def _evaluate_with_ray(cfg: EvalRetrievalConfig) -> dict[str, Any]:
    """Run `evaluate_on_rank` on `scaling.num_workers` Ray Train workers (the output dir must be shared)."""
    from pipeline.launch import run_ray_workers

    record = _record_path(cfg)
    record.unlink(missing_ok=True)  # a record of an earlier run must not be mistaken for this one's
    run_ray_workers(_ray_worker, {"config": to_dict(cfg)}, cfg.scaling, f"eval-{cfg.data.name}",
                    {"storage_path": str(Path(cfg.output_dir) / "ray")})
    if not record.is_file():
        raise RuntimeError(f"the Ray workers finished without writing {record}")
    result = json.loads(record.read_text())
    record.unlink()
    return result


def describe_plan(cfg: EvalRetrievalConfig) -> list[str]:
    """What a run would do (for --dry-run): checks the config, the checkpoint, the annotation and the videos."""
    cfg.check_runnable()
    source = video_source(cfg.data)
    anno = prepare_annotations(cfg.data, source)
    facts = model_facts(cfg.model)
    spec = clip_spec(cfg.data, facts)
    lines = [
        f"data set {cfg.data.name}: {len(anno.videos)} videos, {len(anno.texts)} queries from {cfg.data.annotation}",
        f"videos from {source.describe()} (skipped as missing: {len(anno.missing)})",
        f"checkpoint {cfg.model.checkpoint}",
        f"protocol {protocol(cfg, spec, facts['family'])}",
        f"workers {cfg.scaling.num_workers} via {'Ray Train' if cfg.scaling.use_ray else 'this process'}",
        f"reports -> {Path(cfg.output_dir) / f'retrieval_{cfg.data.name}'}.{{json,md}}",
    ]
    return lines

