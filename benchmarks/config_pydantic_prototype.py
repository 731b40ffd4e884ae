"""A pydantic v2 version of part of `pipeline.config`, built only to compare the two (benchmarks/bench_config.py).

The subset: `data` (with `mask` and `augment`), `optim`, `scaling`, `tracking`, `checkpoint` (its storage options
hold the secrets), and `task` as a union discriminated on `task.name` over the toy, masked_alignment and video_text
task configs (with the CLIP teacher and the open_clip text tower). Field names, defaults, docstrings and checks are
those of the dataclasses; where today's message is domain-specific (betas, scale, RandAugment) the validator keeps
its text, where it is generic (>= N) a `Field` constraint states it.

What pydantic does not do, and this file reuses from `pipeline.config`: YAML with `defaults:` includes, dotted
`key=value` overrides, `${VAR:-default}`. What pydantic does differently and needed code here:
- `Text`: a `str` field takes a plain YAML number as written (`run_name=20241201`, `1.50`); strict `str` refuses it.
- `Number`: a float field takes YAML 1.1's `1e-3` (read as a string); strict `float` refuses it.
- `Literal["auto"] | bool` instead of `Literal["auto", True, False]`: pydantic's literal validator takes `1` for
  `True` (even in strict mode), which today's loader refuses.
- `pydantic_error_message`: pydantic's own message names the dotted key but no suggestion for a misspelt key, no
  allowed keys, and prints each input with its Python type and a URL; this turns the first error into today's
  one-line phrasing.
- `worker_dict`: `SecretStr` masks in repr and `model_dump_json`, so the dict handed to Ray workers must unwrap it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, model_validator

from pipeline.config import Config, ConfigError, _interpolate_env, apply_overrides, load_yaml_tree
from pipeline.config_yaml import SourcedFloat, SourcedInt, plain


def _as_written(value: Any) -> Any:
    return value.source if isinstance(value, SourcedInt | SourcedFloat) else value


def _number_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Text = Annotated[str, BeforeValidator(_as_written)]
Number = Annotated[float, BeforeValidator(_number_text)]
Probability = Annotated[Number, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    """Every section: unknown keys refused, no type conversion beyond the YAML rules above, docstrings kept."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------- data


class MaskConfig(Section):
    type: Literal["none", "random", "tube", "tube_row", "random_row", "attention"] = "none"
    """Which video tokens the student sees (`attention` needs a teacher that returns attention)."""
    ratio: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.8
    """Fraction of patch tokens masked (hidden from the student)."""


_RAND_AUGMENT = re.compile(r"rand(-(m\d+|n\d+|mstd\d+(\.\d+)?|inc[01]))*")


class AugmentConfig(Section):
    rand_augment: Text | None = None
    """RandAugment policy for training clips in timm's syntax (`rand-m7-n4-mstd0.5-inc1`); None = off."""
    random_erasing: Probability = 0.0
    """Probability of erasing one random box of a training clip after normalisation."""
    repeats: Positive = 1
    """Augmented copies of each decoded training video; `data.batch_size` counts the copies."""

    @model_validator(mode="after")
    def _policy(self) -> AugmentConfig:
        if self.rand_augment is not None and not _RAND_AUGMENT.fullmatch(self.rand_augment):
            raise ValueError(f"data.augment.rand_augment: must be a RandAugment policy rand-m<magnitude>-n<ops>"
                             f"[-mstd<std>][-inc<0|1>] (e.g. rand-m7-n4-mstd0.5-inc1) or null, got "
                             f"{self.rand_augment!r}")
        return self


Sampling = Literal["rand", "middle", "stride", "sparse_middle"]


class DataConfig(Section):
    train_shards: Text | list[Text] | None = None
    """Training shard URLs: brace patterns (`s3://b/train-{000000..000099}.tar`), a list, or a directory."""
    eval_shards: Text | list[Text] | None = None
    """Held-out shard URLs for periodic evaluation (exact single pass)."""
    num_frames: Positive = 8
    """Frames sampled per clip."""
    img_size: Positive = 224
    """Output resolution (square)."""
    sampling: Sampling = "rand"
    """Frame sampling: random offset per segment, segment middles, a dense stride, or `sparse_middle`."""
    frame_stride: Positive = 4
    """Frame step of the `stride` sampling mode."""
    batch_size: Positive = 8
    """Clips per worker (per GPU) per micro-step."""
    num_workers: Count = 2
    """Data-loader processes per training worker."""
    shuffle_buffer: Count = 500
    """Samples held in the streaming shuffle buffer."""
    samples_per_epoch: Positive | None = None
    """Nominal epoch length (samples over all ranks) of the resampled training stream; None = the manifests'."""
    mean: Annotated[list[Number], Field(min_length=3, max_length=3)] = [0.485, 0.456, 0.406]
    """Per-channel normalisation mean (ImageNet by default, as the released recipes)."""
    std: Annotated[list[Annotated[Number, Field(gt=0)]], Field(min_length=3, max_length=3)] = [0.229, 0.224, 0.225]
    """Per-channel normalisation std."""
    scale: list[Number] = [0.66, 1.0]
    """Random-resized-crop area range for training."""
    flip: bool = True
    """Random horizontal flip in training (turn off for direction-sensitive data such as SSv2)."""
    mask: MaskConfig = MaskConfig()
    """Data-side token masks (tube/random/row); attention masks are made in the task."""
    augment: AugmentConfig = AugmentConfig()
    """Extra training augmentation (RandAugment, random erasing, repeated augmentation) for fine-tuning."""
    max_bad_fraction: Probability = 0.01
    """Fail the run when more than this fraction of samples cannot be decoded."""
    bad_check_min_samples: Count = 100
    """Samples read before `max_bad_fraction` is enforced."""
    patch_size: Positive = 16
    """Model patch size in pixels."""
    eval_sampling: Sampling = "middle"
    """Frame sampling for the eval split."""
    eval_crop: Literal["none", "center"] = "none"
    """Eval frames: resize the whole frame (`none`) or the short side and take the central square (`center`)."""
    trim_seconds: Annotated[Number, Field(gt=0)] | None = None
    """Sample frames only from the first N seconds of each video; None = all."""
    caption_mode: Literal["auto", "random", "first", "join"] = "auto"
    """Which caption of a multi-caption sample."""
    eval_remainder: Literal["pad", "drop"] = "pad"
    """Eval batches are equal in size and count on every rank: pad or drop."""
    decoder: Literal["pyav", "torchcodec"] = "pyav"
    """Video decoder."""
    decode_device: Literal["cpu", "cuda"] = "cpu"
    """Where torchcodec decodes."""
    decode_threads: Count = 1
    """FFmpeg decoder threads per loader worker (0 = FFmpeg's choice)."""
    decode_skip_nonref: bool = True
    """PyAV: do not reconstruct non-reference frames that are not sampled."""
    decode_short_side: Annotated[int, Field(ge=2)] | None = None
    """PyAV: scale decoded frames to this short side while converting to RGB; None = decoded size."""

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.decode_device == "cuda" and (self.decoder != "torchcodec" or self.num_workers):
            raise ValueError(f"data.decode_device: 'cuda' needs data.decoder=torchcodec and data.num_workers=0 "
                             f"(got decoder={self.decoder!r}, num_workers={self.num_workers})")
        low, high = (self.scale + [0.0, 0.0])[:2]
        if not (len(self.scale) == 2 and 0 < low <= high <= 1):
            raise ValueError(f"data.scale: must be [min, max] crop-area fractions with 0 < min <= max <= 1, got "
                             f"{self.scale}")
        if self.img_size % self.patch_size:
            raise ValueError(f"data.img_size: {self.img_size} is not a multiple of data.patch_size={self.patch_size}")
        if self.batch_size % self.augment.repeats:
            raise ValueError(f"data.batch_size: must be a multiple of data.augment.repeats={self.augment.repeats} "
                             f"(each video brings that many copies), got {self.batch_size}")
        return self


# ----------------------------------------------------------------------------- optim, scaling, tracking, checkpoint


class OptimConfig(Section):
    lr: Annotated[Number, Field(gt=0)] = 1e-3
    """Peak learning rate; per `base_batch_size` clips when that is set."""
    base_batch_size: Positive | None = None
    """If set, `lr` and `min_lr` are per this many clips (linear scaling)."""
    min_lr: Annotated[Number, Field(ge=0)] = 1e-6
    """Learning rate at the end of the cosine schedule (scaled like `lr`)."""
    warmup_steps: Count = 0
    """Linear warmup steps from 0 to the peak LR."""
    max_steps: Positive = 100
    """Total optimizer steps of the stage."""
    weight_decay: Annotated[Number, Field(ge=0)] = 0.05
    """AdamW decoupled weight decay."""
    decay_ssm_a: bool = False
    """Also decay the 2-D SSM `A_log` / `A_b_log`, as the released optimizers do."""
    no_decay: Literal["names", "dims"] = "names"
    """Which parameters weight decay skips."""
    schedule: Literal["cosine", "cosine_floor"] = "cosine"
    """Warmup + cosine schedule variant."""
    betas: list[Number] = [0.9, 0.95]
    """AdamW betas."""
    eps: Annotated[Number, Field(gt=0)] = 1e-8
    """AdamW epsilon."""
    layer_decay: Annotated[Number, Field(gt=0, le=1)] | None = None
    """Layer-wise LR decay factor (e.g. 0.8 for fine-tuning); None = off."""
    layer_decay_scope: Literal["released", "all_layers"] = "released"
    """Which parameters layer decay scales."""

    @model_validator(mode="after")
    def _consistent(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr: must be <= optim.lr={self.lr}, got {self.min_lr}")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"optim.betas: must be two values [beta1, beta2], each in [0, 1), got {self.betas}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"optim.warmup_steps: must be in [0, optim.max_steps={self.max_steps}], got "
                             f"{self.warmup_steps}")
        return self


class ScalingConfig(Section):
    use_ray: bool = True
    """Run through Ray Train (False: one local process, for debugging and benchmarks)."""
    num_workers: Positive = 1
    """Training workers (one per GPU)."""
    use_gpu: Literal["auto"] | bool = "auto"
    """Give each worker a GPU; auto = when the cluster has GPUs."""
    cpus_per_worker: Count = 1
    """CPUs reserved per worker (data decoding runs there)."""
    max_failures: Annotated[int, Field(ge=-1)] = 2
    """Worker-group restarts Ray attempts before the run fails (-1 = no limit)."""
    peak_tflops: Annotated[Number, Field(gt=0)] | None = None
    """Peak dense TFLOP/s of one worker's device for MFU; None = looked up for known GPUs."""
    collective_timeout_s: Annotated[Number, Field(gt=0)] | None = 600.0
    """Every process group's collective timeout after the first step; None keeps the launcher's."""


class TrackingConfig(Section):
    enabled: bool = True
    """Log to MLflow."""
    uri: Text | None = None
    """MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    experiment: Text = "videomamba"
    """MLflow experiment name."""
    run_name: Text | None = None
    """Run name (also the checkpoint folder, so rerunning the same name resumes); None = the stage name."""
    parent_run_id: Text | None = None
    """Nest this run under a parent run (set by the recipe runner)."""
    log_interval: Positive = 10
    """Log metrics and print progress every N steps."""
    profile_start: Count = 0
    """Profile `profile_steps` steps from this step on rank 0; 0 = never."""
    profile_steps: Positive = 3
    """Length of the profiled window in steps."""
    system_metrics_interval_s: Annotated[Number, Field(ge=0)] = 10.0
    """Sample rank 0's node every N seconds as system/* metrics; 0 = off."""


class StorageOptions(BaseModel):
    """fsspec/s3fs options: the credentials s3fs takes are secrets, every other option passes through."""

    model_config = ConfigDict(extra="allow", strict=True)
    key: SecretStr | None = None
    secret: SecretStr | None = None
    token: SecretStr | None = None


class CheckpointConfig(Section):
    path: Text = "checkpoints"
    """Where Ray stores run state: a local directory or s3://bucket/prefix."""
    interval_steps: Positive = 100
    """Save every N optimizer steps (and at the end)."""
    keep: Positive = 2
    """Checkpoints kept (older ones are deleted)."""
    resume: bool = True
    """Continue from the latest checkpoint of this run when one exists."""
    storage_options: StorageOptions = StorageOptions()
    """fsspec/s3fs options for `path`; `key`, `secret` and `token` are SecretStr."""


# ----------------------------------------------------------------------------- tasks (discriminated on name)


class CLIPTeacherConfig(Section):
    model_name: Text = "ViT-B-16"
    """open_clip model config of the teacher."""
    pretrained: Text | None = "openai"
    """An open_clip tag, a checkpoint file, or null for random weights (tests only)."""
    image_size: Positive | None = None
    """Teacher input size; None = the student's token grid times the teacher's patch size."""
    quick_gelu: bool = True
    """QuickGELU activation, which OpenAI's CLIP weights were trained with."""
    apply_ln_post: bool = False
    """Apply the tower's ln_post before `proj`; False reproduces the released targets."""
    layers: list[int] | None = None
    """Teacher blocks whose tokens are targets, one per aligned student layer; None = the last K blocks."""
    vision_overrides: dict[str, Any] = {}
    """Replace open_clip vision-config entries (e.g. {layers: 2, width: 64} for a tiny random test teacher)."""


class ToyTaskConfig(Section):
    name: Literal["toy"]
    in_dim: int = 16
    """Input features per sample."""
    hidden_dim: int = 32
    """Width of the MLP's hidden layer."""
    out_dim: int = 4
    """Regression targets per sample."""
    noise_std: Number = 0.01
    """Gaussian noise added to the targets."""
    eval_batches: int = 4
    """Batches in the (fixed) eval split."""
    nan_at_batches: list[int] = []
    """Training batch positions whose loss is NaN."""
    nan_grad_at_batches: list[int] = []
    """Training batch positions whose gradient is NaN."""
    exit_at_batch: int | None = None
    """Kill the process when rank `exit_rank` reaches this batch position, once per `exit_marker`."""
    exit_rank: int = 1
    """Rank that `exit_at_batch` kills."""
    exit_marker: Text | None = None
    """File created just before the injected exit."""


class MaskedAlignmentConfig(Section):
    name: Literal["masked_alignment"]
    teacher: CLIPTeacherConfig = CLIPTeacherConfig()
    """The frozen CLIP teacher."""
    num_align_layers: Positive = 1
    """Align the last K student blocks with the last K teacher blocks."""
    align_layers: list[int] | None = None
    """Explicit student block indices to align (negative counts from the end); overrides num_align_layers."""
    student_feature: Literal["final_norm", "residual_before_last_block"] = "final_norm"
    """Last-layer student feature."""
    head_pos_embed: bool = True
    """Add a fixed sinusoidal position table before the heads, as released."""

    @model_validator(mode="after")
    def _teacher_layers(self) -> MaskedAlignmentConfig:
        count = len(self.align_layers) if self.align_layers is not None else self.num_align_layers
        if self.teacher.layers is not None and len(self.teacher.layers) != count:
            raise ValueError(f"task.teacher.layers: {self.teacher.layers} must name one teacher block per aligned "
                             f"student layer ({count})")
        return self


class TextTowerConfig(Section):
    name: Text = "ViT-B-16"
    """open_clip model whose text transformer (and bundled tokenizer) is used."""
    pretrained: Text | None = "openai"
    """CLIP weights: an open_clip tag, a file, or null."""
    context_length: int | None = 32
    """Text tokens per caption."""
    width: int | None = None
    """Override of the tower width (random init only)."""
    layers: int | None = None
    """Override of the tower depth (random init only)."""
    heads: int | None = None
    """Override of the attention heads (random init only)."""


class VideoTextConfig(Section):
    name: Literal["video_text"]
    embed_dim: int = 512
    """Joint embedding width of vision_proj / text_proj."""
    text: TextTowerConfig = TextTowerConfig()
    """The text encoder."""
    temp_init: Number = 0.07
    """Initial InfoNCE temperature."""
    vtc_weight: Annotated[Number, Field(gt=0)] = 1.0
    """Weight of the contrastive loss."""
    vtm_weight: Annotated[Number, Field(ge=0)] = 1.0
    """Weight of the matching loss; 0 = no matching head."""
    vtm_layers: int = 2
    """Cross-attention layers of the matching head."""
    uta_weight: Annotated[Number, Field(ge=0)] = 0.0
    """Weight of unmasked-token alignment to the CLIP teacher."""
    teacher: CLIPTeacherConfig = CLIPTeacherConfig()
    """The frozen CLIP teacher."""
    init_checkpoint: Text | None = None
    """A video-text export to start the whole model from."""

    @model_validator(mode="after")
    def _matching_head(self) -> VideoTextConfig:
        if self.vtm_weight > 0 and self.vtm_layers < 1:
            raise ValueError(f"task.vtm_layers: must be >= 1 when task.vtm_weight > 0, got {self.vtm_layers}")
        return self


TaskConfig = Annotated[ToyTaskConfig | MaskedAlignmentConfig | VideoTextConfig, Field(discriminator="name")]
TASKS = ("toy", "masked_alignment", "video_text")
SECTIONS = ("data", "optim", "scaling", "tracking", "checkpoint", "task")


class SubsetConfig(Section):
    """The compared sections of a run config."""

    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    task: TaskConfig | None = None


# ----------------------------------------------------------------------------- loading and messages


def load_subset(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                translate: bool = True) -> SubsetConfig:  # fmt: skip
    """Like `pipeline.config.load_config` for the subset: ConfigError with today's phrasing when `translate`, else
    pydantic's own ValidationError."""
    raw = load_yaml_tree(path) if path is not None else {}
    apply_overrides(raw, overrides)
    try:
        return SubsetConfig.model_validate(subset_tree(_interpolate_env(raw)))
    except ValidationError as err:
        if not translate:
            raise
        raise ConfigError(pydantic_error_message(err, SubsetConfig)) from None


def subset_tree(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without the sections of `pipeline.config.Config` this prototype leaves out (model, eval, ...)."""
    left_out = {f.name for f in dataclasses.fields(Config)} - set(SECTIONS)
    return {key: value for key, value in raw.items() if key not in left_out}


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "bool_type": "true or false",
             "float_type": "a number", "float_parsing": "a number", "string_type": "a string", "list_type": "a list",
             "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping"}
_MEMBERS = {"toy": ToyTaskConfig, "masked_alignment": MaskedAlignmentConfig, "video_text": VideoTextConfig}


def pydantic_error_message(err: ValidationError, model: type[BaseModel]) -> str:
    """The first error of `err` as `key: what was wrong, got <value>` (today's messages), suggestions included."""
    errors = err.errors(include_url=False)
    first = errors[0]
    kind, loc, value, ctx = first["type"], first["loc"], plain(first.get("input")), first.get("ctx", {})
    if kind == "extra_forbidden":  # the last step is the unknown key itself
        section, section_model, _ = _key_of(model, loc[:-1])
        fields = sorted(section_model.model_fields)
        hint = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        key = f"{section}.{loc[-1]}" if section else str(loc[-1])
        return f"{key}: unknown key{suggestion}; allowed keys: {fields}"
    key, _, in_union = _key_of(model, loc)
    if in_union:  # a value that fits no member of a union such as `Literal["auto"] | bool`: pydantic lists each
        tried = [_expected(e) for e in errors if _key_of(model, e["loc"])[0] == key]
        return f"{key}: {value!r} is not allowed; {' or '.join(tried)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"{key}.name: unknown task {ctx.get('tag', '')!r}; allowed: {sorted(_MEMBERS)}"
    if kind == "value_error":
        return str(ctx["error"])  # a model validator's own `key: ...` text
    if kind == "literal_error":
        return f"{key}: {value!r} is not allowed; choose one of {ctx['expected']}"
    if kind in _BOUNDS:
        symbol, name = _BOUNDS[kind]
        return f"{key}: must be {symbol} {ctx[name]}, got {value!r}"
    if kind in ("too_short", "too_long"):
        return f"{key}: must have {ctx.get('min_length', ctx.get('max_length'))} values, got {value!r}"
    hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value)" \
        if kind == "string_type" and isinstance(value, bool) else ""
    return f"{key}: {_expected(first)}, got {value!r}{hint}"


def _expected(error: dict[str, Any]) -> str:
    if error["type"] == "literal_error":
        return f"choose one of {error['ctx']['expected']}"
    return f"expected {_EXPECTED[error['type']]}" if error["type"] in _EXPECTED else error["msg"]


def _key_of(model: type[BaseModel], loc: tuple) -> tuple[str, type[BaseModel] | None, bool]:
    """(dotted key, the model at that key or None for a value, whether the location ends inside a union's member)
    of a pydantic location, whose steps are field names, list indices, discriminator tags and union member labels."""
    path: list[str] = []
    current, in_union = model, False
    for step in loc:
        if isinstance(step, int):
            path[-1] += f"[{step}]"
        elif current is not None and step in current.model_fields:
            path.append(step)
            annotation = current.model_fields[step].annotation
            current = next((a for a in (annotation, *getattr(annotation, "__args__", ()))
                            if isinstance(a, type) and issubclass(a, BaseModel)), None)
        elif step in _MEMBERS:
            current = _MEMBERS[step]
        else:
            in_union = True  # `literal['auto']`, `bool`, `list[...]`: which member pydantic tried
    return ".".join(path), current, in_union


def worker_dict(cfg: BaseModel) -> dict[str, Any]:
    """`cfg.model_dump()` with SecretStr unwrapped: what Ray workers need (they open the storage with it)."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [reveal(v) for v in value]
        return value

    return reveal(cfg.model_dump())
