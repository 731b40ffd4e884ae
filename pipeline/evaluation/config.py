"""Typed configuration of a zero-shot retrieval evaluation (`jobs/eval_retrieval.py --config configs/eval/...`).

Loaded with the same machinery as training configs (YAML `defaults`, `key.sub=value` overrides,
`${VAR:-default}` interpolation, `ConfigError` naming the key). `scaling` and `tracking` reuse the training
sections so an evaluation runs through the same launch path and nests under the same MLflow parent run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, ScalingConfig, TrackingConfig, load_typed_config, require_local_folder


@dataclass
class EvalModelConfig:
    checkpoint: str | None = None
    """The video-text model to evaluate: a stage export (`<stage output>/export/model.pt`) or a released
    multimodal checkpoint (`videomamba_m16_25M_f8_res224.pth`); required to run."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Feature extraction precision on GPU (bf16 autocast); CPU always runs fp32."""
    text_family: Literal["auto", "open_clip", "bert"] = "auto"
    """The checkpoint's text tower: `auto` reads it off the tensor names (`text_encoder.bert.*`: BERT with fusion
    layers, the released UMT layout; `text_encoder.tower.*`: open_clip); an explicit value must agree."""
    text_model: str = "bert-base-uncased"
    """BERT family: a folder, or a hub name in the local Hugging Face cache, holding the tokenizer (vocab.txt) and
    config.json (attention heads, LayerNorm eps); the release uses bert-base-uncased."""


@dataclass
class EvalDataConfig:
    name: str = "retrieval"
    """Data set label used in report file names and MLflow metric names (msrvtt, didemo, anet, ...)."""
    annotation: str | None = None
    """UMT-layout JSON: a list of {"video": path relative to root, "caption": str | [str]}; required to run."""
    root: str | None = None
    """Folder (local path or fsspec URL such as s3://bucket/videos) the annotation's video paths are relative to."""
    shards: str | list[str] | None = None
    """Instead of `root`: WebDataset shards holding the videos (matched by key or `video_id`)."""
    paragraph: bool = False
    """Join each video's captions with spaces into one query (DiDeMo and ActivityNet protocol)."""
    num_frames: int | None = None
    """Frames per video, each at the middle of one of `num_frames` equal segments (the released rule); None = the
    model's."""
    img_size: int | None = None
    """Frames are resized (bicubic, no antialiasing, as released) to img_size x img_size without cropping; None =
    the model's."""
    mean: list[float] | None = None
    """Normalisation mean; None = the one in the export's meta, else ImageNet's."""
    std: list[float] | None = None
    """Normalisation std; None = the one in the export's meta, else ImageNet's."""
    trim_seconds: float | None = None
    """Sample only the first N seconds of each video (DiDeMo protocol: 30); None = the whole video."""
    clean_captions: bool = True
    """Clean every query as UMT does before tokenising: lower-case, delete ,.'!?"()*#:;~, '-' and '/' to spaces."""
    max_text_tokens: int | None = None
    """Tokens per query including the special ones (UMT's max_txt_l: 32 MSR-VTT, 64 DiDeMo, 150 ActivityNet);
    None = 32 for BERT, the tower's context length for open_clip (which caps any value)."""
    skip_missing: bool = False
    """Evaluate without videos whose files are absent (counted in the report) instead of failing."""
    batch_size: int = 16
    """Videos per forward pass on each rank."""
    num_workers: int = 2
    """Decoding processes per rank (0 = decode in the main process)."""

    def __post_init__(self) -> None:
        if self.root is not None and self.shards is not None:
            raise ConfigError("data.root and data.shards: set only one of them (a video folder or shard URLs)")
        for key in ("num_frames", "img_size", "batch_size", "max_text_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.trim_seconds is not None and self.trim_seconds <= 0:
            raise ConfigError(f"data.trim_seconds: must be > 0 or null, got {self.trim_seconds}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ConfigError(f"data.{key}: expected 3 per-channel values (RGB), got {value}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.std: every value must be > 0, got {self.std}")


@dataclass
class ScoringConfig:
    rerank_top_k: int = 0
    """Re-score each query's top-k candidates with the model's matching (VTM) head; 0 = off (cosine only)."""
    rerank_batch_size: int = 32
    """Texts per matching-head forward pass (UMT: 32)."""
    cache_vision_tokens: bool = True
    """BERT family: keep each rank's vision tokens in host memory from feature extraction to the re-rank
    (videos / ranks x T*P x D floats: 3.6 GB for MSR-VTT's 1,000 videos at fp32 on one rank). False decodes and
    encodes each video once more for the re-rank instead."""
    dual_softmax: bool = False
    """Reweight each score by the softmax over the other modality (a transductive trick; off by default)."""
    dual_softmax_temperature: float = 0.01
    """Temperature of the dual-softmax prior."""

    def __post_init__(self) -> None:
        if self.rerank_top_k < 0:
            raise ConfigError(f"scoring.rerank_top_k: must be >= 0 (0 = off), got {self.rerank_top_k}")
        if self.rerank_batch_size < 1:
            raise ConfigError(f"scoring.rerank_batch_size: must be >= 1, got {self.rerank_batch_size}")
        if self.dual_softmax_temperature <= 0:
            raise ConfigError(f"scoring.dual_softmax_temperature: must be > 0, got {self.dual_softmax_temperature}")


@dataclass
class EvaluationOutputConfig:
    save_scores: bool = False
    """Write the score matrices to `<output_dir>/scores_<data.name>.npz`: the similarity (texts x videos) and,
    with re-ranking, the re-ranked ones per direction as the released code fills them (-100 off the top-k)."""


@dataclass
class CacheConfig:
    dir: str | None = ".cache/retrieval_features"
    """Where extracted features are kept between runs; None = no cache."""
    hash_checkpoint: bool = False
    """Key the cache by the checkpoint's content hash (slow for big files) instead of its size and mtime."""


@dataclass
class EvalRetrievalConfig:
    output_dir: str = "outputs/eval"
    """Local folder for the JSON and markdown reports (and score matrices); not a URL."""
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    evaluation: EvaluationOutputConfig = field(default_factory=EvaluationOutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scaling: ScalingConfig = field(default_factory=lambda: ScalingConfig(use_ray=False))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        require_local_folder("output_dir", self.output_dir)

    def check_runnable(self) -> None:
        """Raise ConfigError for settings that are optional in YAML but needed to evaluate."""
        if self.model.checkpoint is None:
            raise ConfigError("model.checkpoint: required; pass model.checkpoint=<stage output>/export/model.pt")
        if not Path(self.model.checkpoint).is_file():
            raise ConfigError(f"model.checkpoint: {self.model.checkpoint!r} is not a file")
        if self.data.annotation is None:
            raise ConfigError("data.annotation: required; pass data.annotation=<UMT-layout JSON>")
        if self.data.root is None and self.data.shards is None:
            raise ConfigError("data.root / data.shards: one is required (a video folder or shard URLs)")


def load_eval_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> EvalRetrievalConfig:
    """Load an eval YAML (with its `defaults`), apply `key.sub=value` overrides, validate."""
    return load_typed_config(EvalRetrievalConfig, path, overrides)
