"""Run one zero-shot retrieval evaluation: annotations -> features (cached) -> scores -> metrics -> reports.

`evaluate_retrieval(cfg)` is what `jobs/eval_retrieval.py` and the recipe runner call. With
`scaling.use_ray` it runs `evaluate_on_rank` on Ray Train workers; otherwise in this process, which may
be one of several ranks of an already-initialised process group (torchrun): every rank encodes its slice,
rank 0 scores, writes the reports and logs the MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import from_dict, to_dict
from pipeline.distributed import broadcast_object, get_world_size, is_main_process
from pipeline.evaluation.annotations import RetrievalAnnotations, drop_missing, load_annotations
from pipeline.evaluation.cache import FeatureCache, cache_key, checkpoint_identity
from pipeline.evaluation.config import EvalDataConfig, EvalRetrievalConfig
from pipeline.evaluation.features import (
    ClipSpec,
    FolderVideos,
    ShardVideos,
    VideoSource,
    encode_texts,
    encode_videos,
    map_clips,
)
from pipeline.evaluation.metrics import rank_summary, t2v_ranks, v2t_ranks
from pipeline.evaluation.report import log_to_mlflow, write_report
from pipeline.evaluation.similarity import apply_rerank, cosine_similarity, dual_softmax, top_k_pairs, vtm_rows
from pipeline.evaluation.timing import PhaseTimer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_BATCH_SIZE = 64

ModelLoader = Callable[[str, torch.device], Any]


def load_video_text_model(checkpoint: str, device: torch.device):
    """The default model loader: a video-text stage export, in eval mode on `device`."""
    from models.video_text import VideoTextModel

    return VideoTextModel.from_export(checkpoint, map_location=device).eval()


def model_facts(checkpoint: str) -> dict[str, Any]:
    """What the export says about its inputs: `num_frames`, `img_size` (read off the vision encoder's
    embedding shapes, so registry defaults need no lookup) and `mean`/`std` when its meta records them.
    The weights are memory-mapped, not read."""
    export = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(export, dict) or "state_dict" not in export:
        raise ValueError(f"{checkpoint}: not a stage export (a dict with 'state_dict' and 'meta')")
    state, meta = export["state_dict"], export.get("meta", {})
    try:
        proj = state["vision_encoder.patch_embed.proj.weight"]  # (D, C, tubelet, patch, patch)
        temporal = state["vision_encoder.temporal_pos_embedding"]  # (1, T / tubelet, D)
        spatial = state["vision_encoder.pos_embed"]  # (1, 1 + patches per frame, D)
    except KeyError as err:
        raise ValueError(f"{checkpoint}: no vision encoder tensor {err}; is it a video-text stage export?") from err
    facts = {"num_frames": temporal.shape[1] * proj.shape[2],
             "img_size": math.isqrt(spatial.shape[1] - 1) * proj.shape[3]}
    facts.update({k: list(meta[k]) for k in ("mean", "std") if k in meta})
    return facts


def clip_spec(data: EvalDataConfig, facts: dict[str, Any]) -> ClipSpec:
    """Config values win; unset ones come from the export (what the model was built and trained with)."""
    return ClipSpec(
        num_frames=data.num_frames or facts["num_frames"],
        img_size=data.img_size or facts["img_size"],
        mean=tuple(data.mean or facts.get("mean") or IMAGENET_MEAN),
        std=tuple(data.std or facts.get("std") or IMAGENET_STD),
        trim_seconds=data.trim_seconds,
    )


def video_source(data: EvalDataConfig) -> VideoSource:
    return FolderVideos(data.root) if data.root is not None else ShardVideos(data.shards)


def prepare_annotations(data: EvalDataConfig, source: VideoSource) -> RetrievalAnnotations:
    anno = load_annotations(data.annotation, paragraph=data.paragraph)
    return drop_missing(anno, source.exists, data.skip_missing, source.describe())


def protocol(cfg: EvalRetrievalConfig, spec: ClipSpec) -> dict[str, Any]:
    """Everything the numbers depend on besides the weights: recorded in the report and as MLflow params."""
    scoring = {"similarity": "cosine", "dual_softmax": cfg.scoring.dual_softmax,
               "rerank_top_k": cfg.scoring.rerank_top_k}
    if cfg.scoring.dual_softmax:
        scoring["dual_softmax_temperature"] = cfg.scoring.dual_softmax_temperature
    return {
        "annotation": str(cfg.data.annotation),
        "text_mode": "paragraph" if cfg.data.paragraph else "caption",
        "frames": {"num_frames": spec.num_frames, "sampling": "middle", "trim_seconds": spec.trim_seconds},
        "resize": {"img_size": spec.img_size, "interpolation": "bicubic", "crop": "none"},
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


def _cached_on_all_ranks(cache: FeatureCache, kind: str, key: str, compute: Callable[[], dict[str, Any]]) -> dict:
    """Rank 0 looks the entry up; on a miss every rank computes it (collectively) and rank 0 stores it."""
    entry = broadcast_object(cache.load(kind, key) if is_main_process() else None)
    hit = entry is not None
    if not hit:
        entry = compute()
        if is_main_process():
            cache.save(kind, key, entry)
    return {**entry, "hit": hit}


def evaluate_on_rank(cfg: EvalRetrievalConfig, model_loader: ModelLoader = load_video_text_model) -> dict | None:
    """The per-rank body: every rank extracts its share; rank 0 returns the flat result, others None.

    The result's `timing` splits this rank's seconds into phases (see `PhaseTimer.report`): setup
    (annotations, video listing), model_load, video_decode, video_forward, text_forward, scoring
    (similarities, ranks, metrics) and, with re-ranking, vtm_rerank_decode / vtm_rerank_forward;
    total_s also covers the feature cache and the gathers between ranks.
    """
    cfg.check_runnable()
    timer = PhaseTimer()
    with timer.phase("setup"):
        source = video_source(cfg.data)
        anno = prepare_annotations(cfg.data, source)
        spec = clip_spec(cfg.data, model_facts(cfg.model.checkpoint))
    device = _device(cfg)
    model = _LazyModel(model_loader, cfg.model.checkpoint, device, timer)
    cache = FeatureCache(cfg.cache.dir, cfg.data.name)
    feature_key = cache_key({
        "checkpoint": checkpoint_identity(cfg.model.checkpoint, cfg.cache.hash_checkpoint),
        "annotation_sha256": anno.sha256, "paragraph": cfg.data.paragraph, "videos": anno.videos,
        "source": source.describe(), "clip": spec.__dict__,
    })

    def extract() -> dict[str, torch.Tensor]:
        return {
            "video_VE": encode_videos(model.get(), anno.videos, source, spec, device, cfg.data.batch_size,
                                      cfg.data.num_workers, cfg.model.precision, timer),
            "text_TE": encode_texts(model.get(), anno.texts, device, TEXT_BATCH_SIZE, cfg.model.precision, timer),
        }

    features = _cached_on_all_ranks(cache, "features", feature_key, extract)
    with timer.phase("scoring"):
        sim_TV = cosine_similarity(features["text_TE"], features["video_VE"])
        if cfg.scoring.dual_softmax:
            sim_t2v_TV, sim_v2t_TV = dual_softmax(sim_TV, cfg.scoring.dual_softmax_temperature)
        else:
            sim_t2v_TV, sim_v2t_TV = sim_TV, sim_TV
        if cfg.scoring.rerank_top_k:
            t2v_TV, v2t_TV = top_k_pairs(sim_t2v_TV, sim_v2t_TV, cfg.scoring.rerank_top_k)
            pairs_VT = (t2v_TV | v2t_TV).T.contiguous()
    vtm_hit = None
    if cfg.scoring.rerank_top_k:

        def rerank() -> dict[str, torch.Tensor]:
            def rows(index_B: torch.Tensor, clip_BCTHW: torch.Tensor) -> torch.Tensor:
                return vtm_rows(model.get(), index_B, clip_BCTHW, anno.texts, pairs_VT,
                                cfg.scoring.rerank_batch_size)

            vtm_VT = map_clips(rows, anno.videos, source, spec, device, batch_size=1,
                               num_workers=cfg.data.num_workers, precision=cfg.model.precision, desc="vtm_rerank",
                               timer=timer)
            return {"vtm_TV": vtm_VT.T.contiguous()}

        vtm_key = cache_key({"features": feature_key, "pairs_sha": _tensor_digest(pairs_VT)})
        vtm = _cached_on_all_ranks(cache, "vtm", vtm_key, rerank)
        vtm_hit = vtm["hit"]
        with timer.phase("scoring"):
            sim_t2v_TV = apply_rerank(sim_t2v_TV, t2v_TV, vtm["vtm_TV"])
            sim_v2t_TV = apply_rerank(sim_v2t_TV, v2t_TV, vtm["vtm_TV"])
    if not is_main_process():
        return None

    with timer.phase("scoring"):
        metrics = {**rank_summary("t2v", t2v_ranks(sim_t2v_TV, anno.txt2vid)),
                   **rank_summary("v2t", v2t_ranks(sim_v2t_TV, anno.vid2txt))}
    result = {
        "dataset": cfg.data.name,
        "checkpoint": str(cfg.model.checkpoint),
        "metrics": metrics,
        "protocol": protocol(cfg, spec),
        "counts": {"videos": len(anno.videos), "texts": len(anno.texts), "skipped_videos": len(anno.missing)},
        "skipped_videos": anno.missing,
        "cache": {"features_hit": features["hit"], "vtm_hit": vtm_hit, "world_size": get_world_size()},
        "timing": timer.report(),
    }
    files = list(write_report(result, cfg.output_dir))
    run_id = log_to_mlflow(result, cfg, files) if cfg.tracking.enabled else None
    timing = {f"timing/{k}": v for k, v in result["timing"].items()}
    return {**metrics, **result["counts"], **timing, "run_id": run_id, "report": str(files[0])}


def _tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()


def evaluate_retrieval(cfg: EvalRetrievalConfig, model_loader: ModelLoader = load_video_text_model) -> dict[str, Any]:
    """Evaluate and return `{t2v_r1, ..., v2t_meanr, videos, texts, skipped_videos, timing/<phase>_s, run_id,
    report}`.

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
        tracking=dataclasses.replace(cfg.tracking, uri=tracking_uri(cfg) if cfg.tracking.enabled else None),
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
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.launch import _use_gpu, connect_ray

    connect_ray(cfg)
    use_gpu = _use_gpu(cfg.scaling.use_gpu)
    record = _record_path(cfg)
    record.unlink(missing_ok=True)  # a record of an earlier run must not be mistaken for this one's
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=f"eval-{cfg.data.name}", storage_path=str(Path(cfg.output_dir) / "ray")),
    )
    trainer.fit()
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
    spec = clip_spec(cfg.data, model_facts(cfg.model.checkpoint))
    lines = [
        f"data set {cfg.data.name}: {len(anno.videos)} videos, {len(anno.texts)} queries from {cfg.data.annotation}",
        f"videos from {source.describe()} (skipped as missing: {len(anno.missing)})",
        f"checkpoint {cfg.model.checkpoint}",
        f"protocol {protocol(cfg, spec)}",
        f"workers {cfg.scaling.num_workers} via {'Ray Train' if cfg.scaling.use_ray else 'this process'}",
        f"reports -> {Path(cfg.output_dir) / f'retrieval_{cfg.data.name}'}.{{json,md}}",
    ]
    return lines

