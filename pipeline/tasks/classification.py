"""Supervised fine-tuning of a video classifier: the released VideoMamba fine-tuning recipe (docs/finetune.md).

The classifier (`model.name` + `task.num_classes`) starts from `model.pretrained`: a stage export (any stage: the
backbone keys are the official ones), a released video checkpoint (K400/SSv2 fine-tuned, masked-pretrained or
multimodal) or an IN-1K image checkpoint, whose 2-D patch kernel is inflated to 3-D. Position embeddings are
interpolated to the model's frame count and resolution, a head of another class count is left at its init
(`models.load_pretrained`).

A training step mixes the batch (Mixup / CutMix, `pipeline/tasks/mixup.py`) and takes the cross-entropy against
the mixed, label-smoothed targets; drop path is the model's. With `model.cuda_graph` on a GPU the classifier's
forward and backward on the mixed clip replay from CUDA graphs (pipeline/cuda_graph.py; its drop-path draws come
from the CUDA generator on every replay); the mixing (host-side draws, device-side blending) and the loss run
eagerly. RandAugment, random erasing and repeated
augmentation are data-side (`data.augment`); AdamW, warmup + cosine and layer-wise LR decay are `optim.*`.
With `task.ema_decay` an fp32 moving average of the weights is kept (`pipeline/tasks/ema.py`), validated beside the
trained weights and exported in their place. Periodic validation (`eval.interval_steps` on `data.eval_shards`)
reports top-1 / top-5 (%) and the loss over every rank's valid clips.

Legend: B batch, C channels, T frames, H/W pixels, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import create_model, load_pretrained
from pipeline.config import ConfigError, TaskConfig, require
from pipeline.cuda_graph import ClassifierLogits, GraphedModule
from pipeline.distributed import all_reduce_sum, get_rank
from pipeline.flops import videomamba_flops
from pipeline.losses import soft_target_cross_entropy
from pipeline.redaction import redact_text
from pipeline.tasks.backbone import shapes_only
from pipeline.tasks.base import Task
from pipeline.tasks.ema import ParameterEMA
from pipeline.tasks.mixup import MixupCutmix, smoothed_targets
from pipeline.tasks.spec import TaskSpec, register_task

# Tensors a checkpoint may lack without the classifier starting from random backbone weights: the head (another
# class count, or none), and the temporal embedding (image checkpoints have none; the released code zero-inits it).
_MAY_BE_MISSING = ("head.weight", "head.bias", "temporal_pos_embedding")


@dataclass
class ClassificationConfig(TaskConfig):
    num_classes: int | None = None
    """Classes of the head (400 for K400, 174 for SSv2, ...); required."""
    class_index: str | None = None
    """The data set's class-index file (`classes.txt` beside labelled shards): checked against num_classes and
    exported with the weights, so evaluation reports class names; None = no names."""
    label_smoothing: float = 0.1
    """Label smoothing of the targets (0.1 as released)."""
    mixup_alpha: float = 0.8
    """Mixup's Beta(alpha, alpha) blend; 0 = no mixup."""
    cutmix_alpha: float = 1.0
    """CutMix's Beta(alpha, alpha) box area; 0 = no CutMix."""
    mixup_prob: float = 1.0
    """Probability that a batch is mixed at all."""
    mixup_switch_prob: float = 0.5
    """With both on: probability of CutMix rather than mixup for a batch."""
    ema_decay: float | None = None
    """Keep an EMA of the weights with this decay (0.9999 in the released option), validated as `ema_top1` and
    exported instead of the trained weights; None = off (as every released script)."""

    def __post_init__(self) -> None:
        require("task.num_classes", self.num_classes, self.num_classes is not None and self.num_classes >= 2,
                ">= 2 (400 for K400, 174 for SSv2); it is required")
        require("task.label_smoothing", self.label_smoothing, 0.0 <= self.label_smoothing < 1.0, "in [0, 1)")
        for key in ("mixup_alpha", "cutmix_alpha"):
            require(f"task.{key}", getattr(self, key), getattr(self, key) >= 0, ">= 0 (0 = off)")
        for key in ("mixup_prob", "mixup_switch_prob"):
            require(f"task.{key}", getattr(self, key), 0.0 <= getattr(self, key) <= 1.0, "a probability in [0, 1]")
        if self.ema_decay is not None:
            require("task.ema_decay", self.ema_decay, 0.0 < self.ema_decay < 1.0, "in (0, 1) or null")

    def preflight(self) -> list[str]:
        """The driver's check before any worker starts (`pipeline.preflight`): the class-index file is readable and
        names num_classes classes. Storage this machine cannot read is noted, not failed (as for shards)."""
        if self.class_index is None:
            return ["task.class_index: - (exports carry no class names)"]
        try:
            names = read_checked_class_names(self)
        except ConfigError:
            raise
        except Exception as err:  # no credentials here, access denied: the workers may have them
            return [f"task.class_index: not checked, {redact_text(self.class_index)} is not readable from here "
                    f"({type(err).__name__})"]
        return [f"task.class_index: {len(names)} classes"]


def topk_correct(logits_BK: Tensor, label_B: Tensor, ks: tuple[int, ...]) -> list[Tensor]:
    """Per k: a (B,) bool, True where the label is among the k highest logits."""
    top_BM = logits_BK.topk(max(ks), dim=-1).indices
    hit_BM = top_BM == label_B[:, None]
    return [hit_BM[:, :k].any(dim=-1) for k in ks]


class ClassificationTask(Task):
    """Classifier + batch mixing + soft-target cross-entropy [+ weight EMA]; see the module docstring."""

    def __init__(self, model: nn.Module, num_classes: int, label_smoothing: float = 0.1,
                 mixup: MixupCutmix | None = None, ema_decay: float | None = None,
                 export_meta: dict[str, Any] | None = None, cuda_graph: bool = False,
                 cuda_graph_required: bool = False) -> None:
        super().__init__()
        self.model = model
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup = mixup
        self.ema = ParameterEMA(model, ema_decay) if ema_decay is not None else None
        self._export_meta = dict(export_meta or {})
        self._model_runner = GraphedModule(ClassifierLogits(model), "the classifier", enabled=cuda_graph,
                                           required=cuda_graph_required)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        video_BCTHW, label_B = batch["video"], self._labels(batch)
        if self.training and self.mixup is not None:
            video_BCTHW, target_BK = self.mixup(video_BCTHW, label_B)
        else:
            target_BK = smoothed_targets(label_B, self.num_classes, self.label_smoothing)
        (logits_BK,) = self._model_runner(video_BCTHW, training=self.training)
        loss = soft_target_cross_entropy(logits_BK, target_BK)
        # Against the mixed target's larger part: the label of most of the clip.
        acc = (logits_BK.argmax(-1) == target_BK.argmax(-1)).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    @staticmethod
    def _labels(batch: dict[str, Any]) -> Tensor:
        if "label" not in batch:
            raise ValueError("the batch has no 'label': fine-tuning reads labelled shards; write them with "
                             "jobs/make_shards.py from a `video,label` list (docs/data.md)")
        return batch["label"]

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Top-1 / top-5 (%) and the unsmoothed cross-entropy over the valid clips of every rank (summed across
        ranks here, so every rank returns the global numbers); `ema_top1` / `ema_top5` with an EMA."""
        ks = (1, min(5, self.num_classes))
        sums = torch.zeros(6, dtype=torch.float64)  # clips, top-1 hits, top-5 hits, nll, EMA top-1, EMA top-5
        for batch in batches:
            label_B = self._labels(batch)
            valid_B = batch.get("valid", torch.ones_like(label_B, dtype=torch.bool)).to(label_B.device)
            label_V = label_B[valid_B]
            logits_VK = self.model(batch["video"]).float()[valid_B]
            top1_V, top5_V = topk_correct(logits_VK, label_V, ks)
            sums[:4] += torch.tensor([len(label_V), float(top1_V.sum()), float(top5_V.sum()),
                                      float(F.cross_entropy(logits_VK, label_V, reduction="sum"))])
            if self.ema is not None:
                ema_top1_V, ema_top5_V = topk_correct(self.ema.run(self.model, batch["video"]).float()[valid_B],
                                                      label_V, ks)
                sums[4:] += torch.tensor([float(ema_top1_V.sum()), float(ema_top5_V.sum())])
        device = next(self.model.parameters()).device
        clips, top1, top5, nll, ema_top1, ema_top5 = all_reduce_sum(sums.to(device)).cpu().tolist()
        if clips == 0:
            return {}
        metrics = {"top1": 100 * top1 / clips, "top5": 100 * top5 / clips, "loss": nll / clips}
        if self.ema is not None:
            metrics.update(ema_top1=100 * ema_top1 / clips, ema_top5=100 * ema_top5 / clips)
        return metrics

    def after_optimizer_step(self) -> None:
        """Trainer hook: fold the updated weights into the EMA."""
        if self.ema is not None:
            self.ema.update(self.model)

    def export_state_dict(self, state: dict[str, Tensor],
                          task_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """With an EMA, an export (the end of the stage's, or one made offline from a checkpoint's `task_state`)
        holds the averaged weights; the trained ones stay in the checkpoints."""
        if self.ema is None:
            return state
        averages = self.ema.averages() if task_state is None else self.ema.averages_in(task_state, "ema.")
        return {**state, **{name: avg.detach().float().cpu().clone() for name, avg in averages.items()}}

    def trainable_module(self) -> nn.Module:
        return self.model

    def flops_per_sample(self) -> float:
        """The classifier over CLS + every patch token, head included (3x forward; pipeline/flops.py). Mixup,
        the loss and the EMA update are elementwise."""
        return videomamba_flops(self.model, 1 + self.model.grid[0] * self.model.num_patches)

    def export_metadata(self) -> dict[str, Any]:
        return dict(self._export_meta)

    def rng_state_dict(self) -> dict[str, Any]:
        return {"mixup": self.mixup.state_dict()} if self.mixup is not None else {}

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:
        if self.mixup is not None and "mixup" in state:
            self.mixup.load_state_dict(state["mixup"])


def load_initial_weights(model: nn.Module, path: str) -> None:
    """`models.load_pretrained`, refusing a file that leaves backbone tensors at their random init."""
    report = load_pretrained(model, path)
    missing = [key for key in report.missing if not key.startswith(_MAY_BE_MISSING)]
    if missing:
        raise ValueError(f"model.pretrained: {path} lacks {len(missing)} tensors of the model, e.g. {missing[:6]}; "
                         "is it a VideoMamba checkpoint of this size (model.name)?")
    if get_rank() == 0:
        print(f"[classification] initial weights from {path}: interpolated {report.interpolated or 'nothing'}; "
              f"left at init {report.missing or 'nothing'}; dropped {sorted(report.dropped) or 'nothing'}",
              flush=True)


def read_checked_class_names(task_cfg: ClassificationConfig) -> list[str]:
    """The names in `task.class_index`; ConfigError when the file is absent, malformed or names another number of
    classes than task.num_classes."""
    from pipeline.data.labels import read_class_index

    try:
        names = read_class_index(task_cfg.class_index)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"task.class_index: {err}") from None
    if len(names) != task_cfg.num_classes:
        raise ConfigError(f"task.class_index: {task_cfg.class_index} names {len(names)} classes but "
                          f"task.num_classes is {task_cfg.num_classes}")
    return names


def class_names(task_cfg: ClassificationConfig) -> list[str] | None:
    """The class-index file's names, checked against task.num_classes; None without one (or in a dry run, where
    `ClassificationConfig.preflight` has checked it)."""
    if task_cfg.class_index is None or shapes_only():
        return None
    return read_checked_class_names(task_cfg)


def build(cfg) -> ClassificationTask:
    task_cfg: ClassificationConfig = cfg.task
    if task_cfg.ema_decay is not None and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("task.ema_decay with deepspeed.zero_stage=3: the EMA reads whole weights after every step, "
                          "which ZeRO-3 partitions; use zero_stage 1 or 2")
    kwargs = {**cfg.model.build_kwargs(), "num_classes": task_cfg.num_classes}
    model = create_model(cfg.model.name, **kwargs)
    if (cfg.data.num_frames, cfg.data.img_size) != (model.num_frames, model.img_size):
        raise ConfigError(f"data.num_frames/img_size ({cfg.data.num_frames}, {cfg.data.img_size}) must match the "
                          f"model's ({model.num_frames}, {model.img_size}); set model.num_frames/img_size")
    if cfg.model.pretrained and not shapes_only():
        load_initial_weights(model, cfg.model.pretrained)
    mixup = None
    if task_cfg.mixup_prob > 0 and (task_cfg.mixup_alpha > 0 or task_cfg.cutmix_alpha > 0):
        mixup = MixupCutmix(task_cfg.num_classes, task_cfg.mixup_alpha, task_cfg.cutmix_alpha, task_cfg.mixup_prob,
                            task_cfg.mixup_switch_prob, task_cfg.label_smoothing, seed=cfg.seed, rank=get_rank())
    meta = {"model_name": cfg.model.name, "model_kwargs": kwargs, "num_classes": task_cfg.num_classes,
            "class_names": class_names(task_cfg), "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "ema": task_cfg.ema_decay is not None}
    return ClassificationTask(model, task_cfg.num_classes, task_cfg.label_smoothing, mixup, task_cfg.ema_decay,
                              export_meta=meta, cuda_graph=cfg.cuda_graph_wanted(),
                              cuda_graph_required=cfg.model.cuda_graph is True)


# Graphed steps are opt-in (`model.cuda_graph=true`) until they have run on a GPU.
register_task(TaskSpec(name="classification", config=ClassificationConfig, build=build, init_key="model.pretrained",
                       cuda_graph=True, cuda_graph_auto=False, evaluates=True))
