"""Typed configuration of a multi-view classification test (`jobs/eval_cls.py --config configs/eval/...`).

Loaded with the training configs' machinery (YAML `defaults`, `key.sub=value` overrides, `${VAR:-default}`,
`ConfigError` naming the key); `scaling` and `tracking` are the training sections, so the run nests under a
recipe's MLflow parent run like the retrieval evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import (
    ConfigError,
    ScalingConfig,
    TrackingConfig,
    load_typed_config,
    require,
    require_local_folder,
)


@dataclass
class ClsModelConfig:
    checkpoint: str | None = None
    """The classifier: a fine-tuning stage export or a released fine-tuned VideoMamba file (raw state dict, any
    of the official wrappers); required to run."""
    name: str | None = None
    """Registered model (videomamba_small, ...); None = the export's `model_name` (released files need it)."""
    num_frames: int | None = None
    """Frames per view; None = the checkpoint's (read off its temporal embedding). Another value interpolates it."""
    img_size: int | None = None
    """View resolution; None = the checkpoint's (read off its position embedding). Another value interpolates it."""
    scan_backend: Literal["auto", "ref", "triton", "cuda"] = "auto"
    """Selective-scan kernel of the rebuilt model."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Forward precision on GPU (bf16 autocast); CPU always runs fp32."""

    def __post_init__(self) -> None:
        for key in ("num_frames", "img_size"):
            value = getattr(self, key)
            require(f"model.{key}", value, value is None or value >= 1, ">= 1 or null")


@dataclass
class ClsDataConfig:
    name: str = "classification"
    """Data set label in report file names and MLflow run names (k400, ssv2, ...)."""
    annotation: str | None = None
    """The labelled list (CSV `video,label` or JSONL, as `jobs/make_shards.py` reads it). None = read the labels
    from `shards` (their json members)."""
    root: str | None = None
    """Folder (local path or fsspec URL) the list's video paths are relative to; None = the list's own folder."""
    shards: str | list[str] | None = None
    """Instead of a folder: labelled WebDataset shards holding the videos (matched by key)."""
    class_index: str | None = None
    """Class-index file for names and for a list with class-name labels; None = the export's names, else the
    `classes.txt` beside `shards`, else class numbers."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel normalisation mean (ImageNet, as the released recipes)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel normalisation std."""
    skip_missing: bool = False
    """Test without listed videos that are absent (counted in the report) instead of failing."""
    batch_size: int = 4
    """Videos per forward pass on each rank (each brings num_clips x num_crops views)."""
    num_workers: int = 2
    """Decoding processes per rank (0 = decode in the main process)."""

    def __post_init__(self) -> None:
        if self.root is not None and self.annotation is None:
            raise ConfigError("data.root: set with data.annotation (the list its paths are relative to)")
        if self.root is not None and self.shards is not None:
            raise ConfigError("data.root and data.shards: set only one of them (a video folder or shard URLs)")
        require("data.batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        require("data.num_workers", self.num_workers, self.num_workers >= 0, ">= 0")
        for key in ("mean", "std"):
            require(f"data.{key}", getattr(self, key), len(getattr(self, key)) == 3, "3 per-channel values (RGB)")
        require("data.std", self.std, min(self.std) > 0, "> 0 in every channel")


@dataclass
class ViewsConfig:
    num_clips: int = 4
    """Temporal clips per video, evenly offset within the frame segments (K400 4, SSv2 2, COIN 10)."""
    num_crops: int = 3
    """Spatial crops per clip: short side resized to the view size, squares evenly spaced along the long side."""

    def __post_init__(self) -> None:
        require("views.num_clips", self.num_clips, self.num_clips >= 1, ">= 1")
        require("views.num_crops", self.num_crops, self.num_crops >= 1, ">= 1")


@dataclass
class EvalClassificationConfig:
    output_dir: str = "outputs/eval_cls"
    """Local folder for the JSON and markdown reports; not a URL."""
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    most_confused: int = 10
    """Class pairs listed in the confusion summary (the full matrix is in the JSON report)."""
    scaling: ScalingConfig = field(default_factory=lambda: ScalingConfig(use_ray=False))
    """use_gpu picks the device; several ranks come from torchrun (scaling.use_ray is not supported here)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        require_local_folder("output_dir", self.output_dir)
        require("most_confused", self.most_confused, self.most_confused >= 0, ">= 0 class pairs")
        if self.scaling.use_ray:
            raise ConfigError("scaling.use_ray: the classification test runs in this process or under torchrun "
                              "(torchrun --nproc_per_node N jobs/eval_cls.py ...); set scaling.use_ray=false")

    def check_runnable(self) -> None:
        """Raise ConfigError for settings that are optional in YAML but needed to evaluate."""
        if self.model.checkpoint is None:
            raise ConfigError("model.checkpoint: required; pass model.checkpoint=<finetune output>/export/model.pt "
                              "or a released fine-tuned file")
        if not Path(self.model.checkpoint).is_file():
            raise ConfigError(f"model.checkpoint: {self.model.checkpoint!r} is not a file")
        if self.data.annotation is None and self.data.shards is None:
            raise ConfigError("data.annotation / data.shards: one is required (a labelled list, or labelled shards)")


def load_cls_eval_config(path: str | Path | None,
                         overrides: list[str] | tuple[str, ...] = ()) -> EvalClassificationConfig:
    """Load a classification-test YAML (with its `defaults`), apply `key.sub=value` overrides, validate."""
    return load_typed_config(EvalClassificationConfig, path, overrides)
