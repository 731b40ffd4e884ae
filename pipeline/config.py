"""Typed run configuration: the schema, YAML loading with includes, dotted overrides, validation.

A run is described by one `Config`. YAML files are data for it:

    defaults: [../model/videomamba_test.yaml]   # merged first, paths relative to this file
    model: {name: videomamba_test, num_frames: 4}
    optim: {lr: 1.0e-3}

and the command line adds `key.sub=value` overrides (values parsed as YAML). `${VAR}` and
`${VAR:-default}` in string values are read from the environment (for secrets and endpoints).
A `str` field takes a plain number as it was written (`run_name=20241201`, `tag: 1.50`; `pipeline.config_yaml`).
Every unknown key or ill-typed value raises `ConfigError` naming the key, the value and what is
allowed, before any worker starts.

Task sections are typed per stage: `task.name` selects the `config` dataclass of that task's `TaskSpec`
(pipeline/tasks/spec.py; each stage module registers its own).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.config_yaml import SourcedFloat, SourcedInt, YamlSyntaxError, load_yaml_file, parse_value, plain
from pipeline.tasks.spec import task_names, task_spec

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what is allowed."""


def require(key: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise `ConfigError("<key>: must be <allowed>, got <value>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


def require_local_folder(key: str, value: str) -> str:
    """`value`, unless it is a URL: every output folder is written with local file calls (the stage export that the
    next stage and the evaluations read with torch.load, reports, the resolved config, the default sqlite store),
    so `output_dir=s3://bucket/x` became a folder `./s3:/bucket/x` on rank 0's disk, lost with the node."""
    if "://" in value:
        from pipeline.redaction import redact_text

        raise ConfigError(
            f"{key}: {redact_text(value)!r} is a URL, but {key} must be a local folder (a shared mount such as "
            "/shared/runs/<name> on a cluster). Checkpoints go to object storage with checkpoint.path=s3://...; "
            "`python jobs/export_checkpoint.py <checkpoint.path>/<run name> s3://.../model.pt` writes an export there"
        )
    return value


def _at_least(key: str, value: float | None, low: float, optional: bool = False) -> None:
    """`value >= low` (or None when `optional`), named by `key` otherwise."""
    if value is None and optional:
        return
    require(key, value, value is not None and value >= low, f">= {low}" + (" or null" if optional else ""))


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name: str = "videomamba_test"
    """Registered model name (`models.list_models()`)."""
    num_frames: int | None = None
    """Frames per clip the model is built for; None = the registry default."""
    img_size: int | None = None
    """Square input resolution in pixels; None = the registry default."""
    tubelet_size: int | None = None
    """Frames per temporal patch (1 in every released config)."""
    drop_path_rate: float | None = None
    """Stochastic-depth rate of the last block (linear schedule)."""
    scan_backend: Literal["auto", "ref", "triton", "cuda"] = "auto"
    """Selective-scan kernel: auto = our Triton kernels on a GPU, the PyTorch reference on CPU; cuda = mamba-ssm's
    CUDA kernel (installed separately)."""
    use_checkpoint: bool = False
    """Recompute the mixers of the first `checkpoint_num` blocks in backward (saves activation memory)."""
    checkpoint_num: int = 0
    """How many leading blocks' mixers gradient checkpointing covers."""
    pretrained: str | None = None
    """Initial weights: a file (official VideoMamba layout or a stage export), or None for random init."""
    cuda_graph: Literal["auto", True, False] = "auto"
    """Replay the trainable VideoMamba's forward + backward from CUDA graphs, captured at the first step of each
    batch shape (pipeline/cuda_graph.py), and Stage 2's frozen teacher's forward: a masked student is bound by the
    host without them. auto = wherever they work and have been checked on a GPU: a task whose TaskSpec declares
    `cuda_graph` and `cuda_graph_auto` (masked_alignment, video_text) training on a GPU, below ZeRO-3; true =
    demand them (an error where they cannot work; the opt-in for self_distill, classification and video_text_bert,
    whose graphed steps have not yet run on a GPU); false = eager."""

    def __post_init__(self) -> None:
        for key in ("num_frames", "img_size", "tubelet_size"):
            _at_least(f"model.{key}", getattr(self, key), 1, optional=True)
        if self.drop_path_rate is not None:
            require("model.drop_path_rate", self.drop_path_rate, 0.0 <= self.drop_path_rate < 1.0, "in [0, 1) or null")
        _at_least("model.checkpoint_num", self.checkpoint_num, 0)

    def build_kwargs(self) -> dict[str, Any]:
        """The keyword overrides for `models.create_model`, leaving registry defaults where unset."""
        keys = ("num_frames", "img_size", "tubelet_size", "drop_path_rate")
        kwargs = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        kwargs["scan_backend"] = self.scan_backend
        if self.use_checkpoint:
            kwargs.update(use_checkpoint=True, checkpoint_num=self.checkpoint_num)
        return kwargs


@dataclass
class MaskConfig:
    type: Literal["none", "random", "tube", "tube_row", "random_row", "attention"] = "none"
    """Which video tokens the student sees (`attention` needs a teacher that returns attention)."""
    ratio: float = 0.8
    """Fraction of patch tokens masked (hidden from the student)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"data.mask.ratio: must be in [0, 1), got {self.ratio}")


# The policies pipeline.data.augment.parse_rand_augment reads (checked here, before any worker starts).
_RAND_AUGMENT = re.compile(r"rand(-(m\d+|n\d+|mstd\d+(\.\d+)?|inc[01]))*")


@dataclass
class AugmentConfig:
    rand_augment: str | None = None
    """RandAugment policy for training clips in timm's syntax, one draw per clip (every frame gets the same ops
    and magnitudes): `rand-m7-n4-mstd0.5-inc1` = 4 ops at magnitude 7 (noise std 0.5), the 'increasing' op set
    (the released fine-tuning default; Ti: rand-m5-n2-mstd0.25-inc1). None = off."""
    random_erasing: float = 0.0
    """Probability of erasing one random box of a training clip after normalisation (the same box on every frame,
    per-pixel Gaussian noise; 0.25 in the released fine-tuning)."""
    repeats: int = 1
    """Augmented copies of each decoded training video (repeated augmentation; 2 in the released fine-tuning).
    `data.batch_size` counts the copies, so it must be a multiple of this."""

    def __post_init__(self) -> None:
        require("data.augment.random_erasing", self.random_erasing, 0.0 <= self.random_erasing <= 1.0,
                "a probability in [0, 1]")
        _at_least("data.augment.repeats", self.repeats, 1)
        if self.rand_augment is not None:
            require("data.augment.rand_augment", self.rand_augment, bool(_RAND_AUGMENT.fullmatch(self.rand_augment)),
                    "a RandAugment policy rand-m<magnitude>-n<ops>[-mstd<std>][-inc<0|1>] "
                    "(e.g. rand-m7-n4-mstd0.5-inc1) or null")


@dataclass
class DataConfig:
    train_shards: str | list[str] | None = None
    """Training shard URLs: brace patterns (`s3://b/train-{000000..000099}.tar`), a list, or a directory."""
    eval_shards: str | list[str] | None = None
    """Held-out shard URLs for periodic evaluation (exact single pass)."""
    num_frames: int = 8
    """Frames sampled per clip."""
    img_size: int = 224
    """Output resolution (square)."""
    sampling: Literal["rand", "middle", "stride", "sparse_middle"] = "rand"
    """Frame sampling: random offset per segment (train), segment middles (eval: the released zero-shot rule),
    a dense stride, or `sparse_middle`, the released classification validation view (docs/finetune.md)."""
    frame_stride: int = 4
    """Frame step of the `stride` sampling mode."""
    batch_size: int = 8
    """Clips per worker (per GPU) per micro-step."""
    num_workers: int = 2
    """Data-loader processes per training worker."""
    shuffle_buffer: int = 500
    """Samples held in the streaming shuffle buffer."""
    samples_per_epoch: int | None = None
    """Nominal epoch length (samples over all ranks) of the resampled training stream: at each epoch boundary the
    shard and sample order is reseeded with the epoch number, which is logged as `data/epoch`. None = the
    manifests' sample count (one endless epoch when a shard has no manifest entry)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel normalisation mean (ImageNet by default, as the released recipes)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel normalisation std."""
    scale: list[float] = field(default_factory=lambda: [0.66, 1.0])
    """Random-resized-crop area range for training."""
    flip: bool = True
    """Random horizontal flip in training (turn off for direction-sensitive data such as SSv2)."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """Data-side token masks (tube/random/row); attention masks are made in the task."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Extra training augmentation (RandAugment, random erasing, repeated augmentation) for fine-tuning."""
    max_bad_fraction: float = 0.01
    """Fail the run when more than this fraction of samples cannot be decoded."""
    bad_check_min_samples: int = 100
    """Samples read before `max_bad_fraction` is enforced (a few early failures should not stop a run)."""
    patch_size: int = 16
    """Model patch size in pixels; data-side masks cover (img_size / patch_size)^2 patches per frame."""
    eval_sampling: Literal["rand", "middle", "stride", "sparse_middle"] = "middle"
    """Frame sampling for the eval split: `middle` for the retrieval protocol, `sparse_middle` for classification
    validation (each is the released rule of its task; they can pick frames one apart)."""
    eval_crop: Literal["none", "center"] = "none"
    """Eval frames: `none` resizes the whole frame to img_size x img_size (bicubic; the retrieval protocol),
    `center` resizes the short side to img_size and takes the central square (bilinear; classification
    validation)."""
    trim_seconds: float | None = None
    """Sample frames only from the first N seconds of each video (DiDeMo's protocol uses 30); None = all."""
    caption_mode: Literal["auto", "random", "first", "join"] = "auto"
    """Which caption of a multi-caption sample: auto = random for train, first for eval; join = paragraph."""
    eval_remainder: Literal["pad", "drop"] = "pad"
    """Eval batches are equal in size and count on every rank: pad (repeat samples, `valid`=False) or drop."""
    decoder: Literal["pyav", "torchcodec"] = "pyav"
    """Video decoder: pyav, or torchcodec (optional package; needs FFmpeg 4-9 libraries, docs/data.md)."""
    decode_device: Literal["cpu", "cuda"] = "cpu"
    """Where torchcodec decodes: cpu, or cuda (NVDEC, in the training process: needs data.num_workers=0)."""
    decode_threads: int = 1
    """FFmpeg decoder threads per loader worker (1 = one core each; 0 = FFmpeg's choice)."""
    decode_skip_nonref: bool = True
    """PyAV: do not reconstruct non-reference frames that are not sampled (single-threaded decoding)."""
    decode_short_side: int | None = None
    """PyAV: scale decoded frames to this short side while converting to RGB (cheaper crops of large raw
    footage); None = decoded size. Preprocessed shards (jobs/make_shards.py --short-side) need none."""

    def __post_init__(self) -> None:
        if self.decode_device == "cuda" and (self.decoder != "torchcodec" or self.num_workers):
            raise ConfigError(f"data.decode_device: 'cuda' needs data.decoder=torchcodec and data.num_workers=0 "
                              f"(got decoder={self.decoder!r}, num_workers={self.num_workers})")
        if self.decode_threads < 0:
            raise ConfigError(f"data.decode_threads: must be >= 0, got {self.decode_threads}")
        if self.decode_short_side is not None and self.decode_short_side < 2:
            raise ConfigError(f"data.decode_short_side: must be >= 2 (or null), got {self.decode_short_side}")
        for key in ("num_frames", "img_size", "patch_size", "frame_stride", "batch_size"):
            _at_least(f"data.{key}", getattr(self, key), 1)
        for key in ("num_workers", "shuffle_buffer", "bad_check_min_samples"):
            _at_least(f"data.{key}", getattr(self, key), 0)
        for key in ("mean", "std"):
            require(f"data.{key}", getattr(self, key), len(getattr(self, key)) == 3, "3 per-channel values (RGB)")
        require("data.std", self.std, min(self.std) > 0, "> 0 in every channel")
        low, high = (self.scale + [0.0, 0.0])[:2]
        require("data.scale", self.scale, len(self.scale) == 2 and 0 < low <= high <= 1,
                "[min, max] crop-area fractions with 0 < min <= max <= 1")
        if self.trim_seconds is not None:
            require("data.trim_seconds", self.trim_seconds, self.trim_seconds > 0, "> 0 seconds or null")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"data.img_size: {self.img_size} is not a multiple of data.patch_size={self.patch_size}"
            )
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch: must be >= 1 (or null for the manifests' count), "
                              f"got {self.samples_per_epoch}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        require("data.batch_size", self.batch_size, self.batch_size % self.augment.repeats == 0,
                f"a multiple of data.augment.repeats={self.augment.repeats} (each video brings that many copies)")


@dataclass
class TaskConfig:
    """Base of the per-stage task sections; `name` selects the registered subclass."""

    name: str = ""
    """Stage task: one of the registered task names."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate; per `base_batch_size` clips when that is set."""
    base_batch_size: int | None = None
    """If set, `lr` and `min_lr` are per this many clips: the run uses `x * global_batch / base_batch_size` (the
    paper's linear scaling; the released scripts scale both)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine schedule (scaled like `lr`)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to the peak LR."""
    max_steps: int = 100
    """Total optimizer steps of the stage."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (not applied to biases, norms, embeddings, A_log and D)."""
    decay_ssm_a: bool = False
    """Also decay the 2-D SSM `A_log` / `A_b_log`, as the released optimizers do (the paper-scale configs set it)."""
    no_decay: Literal["names", "dims"] = "names"
    """Which parameters weight decay skips: `names` = 1-D parameters, biases, positional / class / temporal
    embeddings, SSM A / D (but see decay_ssm_a) and every module's `no_weight_decay()` names; `dims` = only 1-D
    parameters and biases, what the released video-text optimizer does (its DDP wrapper hides the model's
    `no_weight_decay()`, so the embeddings and A_log are decayed too)."""
    schedule: Literal["cosine", "cosine_floor"] = "cosine"
    """`cosine`: warmup (step + 1) / warmup_steps, then min_lr + (lr - min_lr) x half cosine; `cosine_floor`: the
    released video-text scheduler, warmup step / warmup_steps and a half cosine from lr to 0, both floored at
    min_lr."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    layer_decay: float | None = None
    """Layer-wise LR decay factor (e.g. 0.8 for fine-tuning); None = off."""
    layer_decay_scope: Literal["released", "all_layers"] = "released"
    """Which parameters layer decay scales (docs/finetune.md): `released` = what the released fine-tuning code
    does, only cls_token, pos_embed and patch_embed (at layer_decay ** (depth + 1), so nearly frozen), blocks and
    the rest at full LR; `all_layers` = BEiT-style, the embeddings at layer 0 and block i at layer i + 1."""

    def __post_init__(self) -> None:
        require("optim.lr", self.lr, self.lr > 0, "> 0")
        _at_least("optim.min_lr", self.min_lr, 0)
        require("optim.min_lr", self.min_lr, self.min_lr <= self.lr, f"<= optim.lr={self.lr}")
        _at_least("optim.base_batch_size", self.base_batch_size, 1, optional=True)
        _at_least("optim.weight_decay", self.weight_decay, 0)
        require("optim.betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "two values [beta1, beta2], each in [0, 1)")
        require("optim.eps", self.eps, self.eps > 0, "> 0")
        if self.max_steps < 1:
            raise ConfigError(f"optim.max_steps: must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(
                f"optim.warmup_steps: must be in [0, optim.max_steps={self.max_steps}], got {self.warmup_steps}"
            )
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay: must be in (0, 1] or null, got {self.layer_decay}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 0-3."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision (bf16 on GPU; CPU runs use fp32 automatically)."""
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 = off."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    offload_optimizer: bool = False
    """ZeRO offload of optimizer states to CPU memory."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: {self.zero_stage!r} is not allowed; choose 0, 1, 2 or 3")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"deepspeed.grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")
        require("deepspeed.grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0 (0 = off)")


@dataclass
class ScalingConfig:
    use_ray: bool = True
    """Run through Ray Train (False: one local process, for debugging and benchmarks)."""
    num_workers: int = 1
    """Training workers (one per GPU)."""
    use_gpu: Literal["auto", True, False] = "auto"
    """Give each worker a GPU; auto = when the cluster has GPUs."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker (data decoding runs there)."""
    max_failures: int = 2
    """Worker-group restarts Ray attempts before the run fails."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one worker's device for MFU; None = looked up for known GPUs (bf16), none on CPU."""
    collective_timeout_s: float | None = 600.0
    """After each worker's first training step, every process group's collective timeout (the launcher's is 30
    minutes): a rank that waits longer in a collective fails the group, which Ray restarts from the last
    checkpoint. Raise it if a rank can legitimately lag the others that long (a very slow data source); None
    keeps the launcher's."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers: must be >= 1, got {self.num_workers}")
        _at_least("scaling.cpus_per_worker", self.cpus_per_worker, 0)
        require("scaling.max_failures", self.max_failures, self.max_failures >= -1, ">= 0 restarts, or -1 (no limit)")
        if self.peak_tflops is not None:
            require("scaling.peak_tflops", self.peak_tflops, self.peak_tflops > 0, "> 0 or null")
        if self.collective_timeout_s is not None and self.collective_timeout_s <= 0:
            raise ConfigError(f"scaling.collective_timeout_s: must be > 0 seconds or null (the launcher's timeout), "
                              f"got {self.collective_timeout_s}")


@dataclass
class CheckpointConfig:
    path: str = "checkpoints"
    """Where Ray stores run state: a local directory or s3://bucket/prefix."""
    interval_steps: int = 100
    """Save every N optimizer steps (and at the end)."""
    keep: int = 2
    """Checkpoints kept (older ones are deleted)."""
    resume: bool = True
    """Continue from the latest checkpoint of this run (same run name and path) when one exists."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec/s3fs options for `path` (e.g. `{key: ${S3_KEY}, secret: ${S3_SECRET}, endpoint_url: ...}`); empty =
    the standard AWS variables. Redacted from logs and MLflow."""
    lock_stale_s: float = 300.0
    """A launch holds `<path>/<run name>/run.lock` and renews it every lock_stale_s / 5 s; another launch of the run
    takes over a lock whose renewal is older than this (or whose holder process on this host is gone)."""
    break_lock: bool = False
    """Take over the run's lock even when it looks held (its holder is known to be gone)."""

    def __post_init__(self) -> None:
        if self.interval_steps < 1 or self.keep < 1:
            raise ConfigError(
                f"checkpoint.interval_steps and checkpoint.keep: must be >= 1, got {self.interval_steps}, {self.keep}"
            )
        if not self.lock_stale_s > 0:
            raise ConfigError(f"checkpoint.lock_stale_s: must be > 0 seconds, got {self.lock_stale_s}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (off for benchmarks that must not touch a tracking store)."""
    uri: str | None = None
    """MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    experiment: str = "videomamba"
    """MLflow experiment name."""
    artifact_location: str | None = None
    """Where a new experiment keeps its runs' artifacts: `<artifact_location>/<experiment>`, a folder every node sees
    or `s3://bucket/prefix`; None = beside a sqlite store (`<its folder>/mlartifacts/<experiment>`), inside a file
    store, or where an MLflow server puts them. Needed for other database stores (postgresql, ...). An existing
    experiment keeps the location it was created with."""
    run_name: str | None = None
    """Run name (also the checkpoint folder, so rerunning the same name resumes); None = the stage name."""
    parent_run_id: str | None = None
    """Nest this run under a parent run (set by the recipe runner)."""
    log_interval: int = 10
    """Log metrics and print progress every N steps."""
    profile_start: int = 0
    """Profile `profile_steps` steps from this step on rank 0 and log the communication fractions
    (pipeline.profiling; a Chrome trace lands in <output_dir>/profile/); 0 = never."""
    profile_steps: int = 3
    """Length of the profiled window in steps."""
    system_metrics_interval_s: float = 10.0
    """Sample rank 0's node every N seconds into the run as system/* metrics (MLflow's system metrics monitor:
    CPU, memory, disk, network; GPUs too when nvidia-ml-py is installed); 0 = off."""

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"tracking.log_interval: must be >= 1, got {self.log_interval}")
        if self.system_metrics_interval_s < 0:
            raise ConfigError(f"tracking.system_metrics_interval_s: must be >= 0 (0 = off), got "
                              f"{self.system_metrics_interval_s}")
        if self.profile_start < 0 or self.profile_steps < 1:
            raise ConfigError(
                f"tracking.profile_start must be >= 0 (0 = off) and tracking.profile_steps >= 1, got "
                f"{self.profile_start} and {self.profile_steps}"
            )


@dataclass
class EvalConfig:
    interval_steps: int = 0
    """Evaluate on `data.eval_shards` every N steps; 0 = only at the end if eval shards are set."""
    max_batches: int | None = None
    """Cap on evaluation batches per evaluation (None = the whole eval set)."""

    def __post_init__(self) -> None:
        _at_least("eval.interval_steps", self.interval_steps, 0)
        _at_least("eval.max_batches", self.max_batches, 1, optional=True)


@dataclass
class Config:
    stage: str = "stage"
    """Short stage name used for run names and output folders."""
    seed: int = 0
    """Seed for model init, masks and data order (offset by rank)."""
    output_dir: str = "outputs"
    """Local (or shared, mounted) folder for the resolved config, the stage export and reports; not a URL."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient: stop with an error (keeping the last good checkpoint) or skip the step."""
    max_skipped_steps: int = 10
    """With nonfinite=skip: fail after this many skipped steps."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        require_local_folder("output_dir", self.output_dir)
        _at_least("max_skipped_steps", self.max_skipped_steps, 0)
        self._check_cuda_graph()
        last_profiled = self.tracking.profile_start + self.tracking.profile_steps - 1
        if self.tracking.profile_start and last_profiled > self.optim.max_steps:
            raise ConfigError(
                f"tracking.profile_start={self.tracking.profile_start} with profile_steps="
                f"{self.tracking.profile_steps} profiles up to step {last_profiled}, past optim.max_steps="
                f"{self.optim.max_steps}; start the window earlier"
            )

    def _check_cuda_graph(self) -> None:
        if self.model.cuda_graph is not True:  # auto falls back to eager steps where graphs cannot work
            return
        if not task_spec(self.task.name).cuda_graph:
            graphed = [name for name in task_names() if task_spec(name).cuda_graph]
            names = ", ".join(graphed[:-1]) + f" and {graphed[-1]}" if len(graphed) > 1 else graphed[0]
            raise ConfigError(f"model.cuda_graph: the {names} tasks replay their VideoMamba from CUDA "
                              f"graphs; task {self.task.name!r} runs eagerly: set model.cuda_graph=false")
        if self.scaling.use_gpu is False:
            raise ConfigError("model.cuda_graph=true with scaling.use_gpu=false: CUDA graphs need a GPU; set "
                              "model.cuda_graph=auto (eager on CPU) or false")
        if self.deepspeed.zero_stage == 3:
            raise ConfigError("model.cuda_graph with deepspeed.zero_stage=3: ZeRO-3 gathers and frees the parameters "
                              "with hooks around every module, which a captured graph would skip; use zero_stage "
                              "1 or 2")

    def cuda_graph_wanted(self) -> bool:
        """Whether the task should replay its student from CUDA graphs when it trains on a GPU."""
        if self.model.cuda_graph == "auto":
            spec = task_spec(self.task.name)
            return spec.cuda_graph and spec.cuda_graph_auto and self.deepspeed.zero_stage != 3
        return self.model.cuda_graph

    @property
    def run_name(self) -> str:
        """The run's name in MLflow and its checkpoint folder under `checkpoint.path`."""
        return self.tracking.run_name or self.stage


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (with its `defaults`), apply `key.sub=value` overrides, validate."""
    return load_typed_config(Config, path, overrides)


def load_typed_config(schema: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """A YAML file (with its `defaults`) plus `key.sub=value` overrides and `${VAR:-default}`, as the dataclass
    `schema` (a training Config, or an evaluation job's config), validated."""
    raw = load_yaml_tree(path) if path is not None else {}
    apply_overrides(raw, overrides)
    return from_dict(schema, _interpolate_env(raw), "")


def load_yaml_tree(path: str | Path) -> dict[str, Any]:
    """Read a YAML file and deep-merge the files its `defaults:` list names underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = load_yaml_file(path) or {}
    except YamlSyntaxError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    merged: dict[str, Any] = {}
    includes = data.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    for include in includes:
        merged = deep_merge(merged, load_yaml_tree(path.parent / include))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply `a.b.c=value` strings in place; values are parsed as YAML (`lr=1e-3`, `x=[1,2]`, `parse_value`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
            node = child
        try:
            node[keys[-1]] = parse_value(text) if text.strip() else None
        except YamlSyntaxError as err:
            raise ConfigError(f"override {item!r}: {err}") from None


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate_env(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_env(v) for v in value]
    if isinstance(value, str):

        def lookup(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is referenced in the config but not set")

        return _ENV_PATTERN.sub(lookup, value)
    return value


# ----------------------------------------------------------------------------- validation


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    if cls is TaskConfig and data:
        cls = _task_config_class(data.get("name", ""), f"{where}.name")
    fields, hints = _schema(cls)
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{_join(prefix, key)}: unknown key{suggestion}; allowed keys: {sorted(fields)}"
            )
    kwargs = {key: _coerce(value, hints[key], _join(prefix, key)) for key, value in data.items()}
    return cls(**kwargs)


@functools.cache
def _schema(cls: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """The fields and resolved type hints of config dataclass `cls`: resolving the string annotations on every call
    was three quarters of the validation time (benchmarks/results/config.md)."""
    return {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)


def _task_config_class(name: str, key: str) -> type[TaskConfig]:
    try:
        return task_spec(name).config
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key)
    if hint is Any:
        return plain(value)
    if origin is Literal:
        # bool is an int: `1` must not pass for True, nor `true` for a 1.
        allowed = [a for a in args if a == value and isinstance(a, bool) == isinstance(value, bool)]
        if not allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return allowed[0]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: the error is X's own
            return _coerce(value, options[0], key)
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of the allowed types: " + "; ".join(errors))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return plain(dict(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept it where a number is expected.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, SourcedInt | SourcedFloat):  # a plain number where text is expected: take it as written
            return value.source
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r} (YAML reads unquoted yes/no/on/off/true/false "
                              f"as booleans: quote the value, e.g. \"{key}='on'\" on a shell command line)")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {hint!r} for {key}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config, secrets included (for Ray workers; use `public_dict` for people)."""
    return dataclasses.asdict(cfg)


def public_dict(cfg: Any) -> dict[str, Any]:
    """`to_dict` with credentials masked (`pipeline.redaction`): what MLflow params and printed configs show."""
    from pipeline.redaction import redact

    return redact(to_dict(cfg))


def to_yaml(cfg: Any) -> str:
    """The config as YAML with credentials masked (printed, saved beside outputs and checkpoints, logged)."""
    return yaml.safe_dump(public_dict(cfg), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (MLflow params, run comparison)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _join(prefix, key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
