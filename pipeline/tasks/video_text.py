"""Stage 3 with a CLIP text tower: our opt-in variant of UMT-style video-text pretraining (the released model, BERT
with fusion layers and MLM, is pipeline/tasks/video_text_bert.py).

Losses (each weighted in the config, each returned for logging):
- `vtc`: symmetric InfoNCE over the batch of every rank (features gathered with gradient), equal `index`
  values counted as positives;
- `vtm` (optional): video-text matching with one in-batch hard negative per video and per text, scored by
  the model's small cross-attention `vtm_head` (local batch, as UMT);
- `uta` (optional): unmasked-token alignment of the visible video tokens (final output) to a frozen CLIP
  teacher's tokens, stage 1's head and loss (pipeline/tasks/clip_alignment.py);
plus `temp` (the clamped temperature) and `vtc_acc` (local in-batch video->text top-1) as diagnostics.

Masking (`data.mask`): `attention` samples visible tokens from the CLIP teacher's CLS attention (the teacher
is built for it even when `uta_weight` is 0); data-side types arrive as the loader's `keep`. UMT trains its
first video-text phase with 80% of the tokens masked, then tunes unmasked for an epoch (docs/stages.md). Pooling runs
over the visible tokens. Image-text pairs are one-frame videos (T = 1), encoded as static clips.

Legend: B batch, V video tokens (1 + kept), D video width, L text tokens, W text width, E joint width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.teachers import CLIPTeacher
from models.video_text import VideoTextModel, build_video_text_model, load_video_text_export
from pipeline.config import ConfigError, TaskConfig
from pipeline.cuda_graph import GraphedBackbone
from pipeline.evaluation.metrics import retrieval_metrics
from pipeline.flops import clip_vision_flops, head_flops, matching_head_flops, text_tower_flops, videomamba_flops
from pipeline.losses import contrastive_loss, matching_loss, sample_hard_negatives
from pipeline.tasks.backbone import shapes_only
from pipeline.tasks.base import Task
from pipeline.tasks.clip_alignment import ClipTokenAlignment
from pipeline.tasks.clip_teacher import CLIPTeacherConfig, clip_teacher_for
from pipeline.tasks.spec import TaskSpec, register_task
from pipeline.tasks.token_masks import TokenMasks


@dataclass
class TextTowerConfig:
    name: str = "ViT-B-16"
    """open_clip model whose text transformer (and bundled tokenizer) is used."""
    pretrained: str | None = "openai"
    """CLIP weights: an open_clip tag (from the Hugging Face cache; set HF_HUB_OFFLINE=1 offline), a file, or null."""
    context_length: int | None = 32
    """Text tokens per caption (UMT: 32); shorter than CLIP's 77 keeps its first position embeddings."""
    width: int | None = None
    """Override of the tower width (random init only); None = the model's."""
    layers: int | None = None
    """Override of the tower depth (random init only)."""
    heads: int | None = None
    """Override of the attention heads (random init only)."""

    def spec(self) -> dict[str, Any]:
        """`{"name": ..., **overrides}` as `models.video_text.build_video_text_model` takes it."""
        overrides = {k: getattr(self, k) for k in ("context_length", "width", "layers", "heads")}
        return {"name": self.name, **{k: v for k, v in overrides.items() if v is not None}}


@dataclass
class VideoTextConfig(TaskConfig):
    embed_dim: int = 512
    """Joint embedding width of vision_proj / text_proj."""
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    """The text encoder."""
    temp_init: float = 0.07
    """Initial InfoNCE temperature (learnable, clamped to [0.001, 0.5])."""
    vtc_weight: float = 1.0
    """Weight of the contrastive loss."""
    vtm_weight: float = 1.0
    """Weight of the matching loss; 0 = no matching head."""
    vtm_layers: int = 2
    """Cross-attention layers of the matching head."""
    uta_weight: float = 0.0
    """Weight of unmasked-token alignment to the CLIP teacher (UMT: 1.0 in the masked phase, 0 unmasked)."""
    teacher: CLIPTeacherConfig = field(default_factory=CLIPTeacherConfig)
    """The frozen CLIP teacher, built when uta_weight > 0 or data.mask.type is `attention`."""
    init_checkpoint: str | None = None
    """A video-text export to start the whole model from (the unmasked tuning phase starts from the masked
    phase's export); it must match this config's model and text tower. `model.pretrained` loads a backbone only."""

    def __post_init__(self) -> None:
        if self.vtc_weight <= 0:
            raise ConfigError(f"task.vtc_weight: the contrastive loss is the stage's objective, must be > 0; "
                              f"got {self.vtc_weight}")
        if self.vtm_weight < 0:
            raise ConfigError(f"task.vtm_weight: must be >= 0, got {self.vtm_weight}")
        if self.uta_weight < 0:
            raise ConfigError(f"task.uta_weight: must be >= 0, got {self.uta_weight}")
        if self.vtm_weight > 0 and self.vtm_layers < 1:
            raise ConfigError(f"task.vtm_layers: must be >= 1 when task.vtm_weight > 0, got {self.vtm_layers}")


class VideoTextTask(Task):
    """Trains a `VideoTextModel`; `forward(batch)` -> {"loss", "vtc", ["vtm"], ["uta"], "temp", "vtc_acc"}."""

    def __init__(self, model: VideoTextModel, vtc_weight: float = 1.0, vtm_weight: float = 0.0,
                 uta_weight: float = 0.0, teacher: CLIPTeacher | None = None, mask_type: str = "none",
                 mask_ratio: float = 0.8, seed: int = 0, export_meta: dict[str, Any] | None = None,
                 cuda_graph: bool = False, cuda_graph_required: bool = False) -> None:
        super().__init__()
        if vtm_weight > 0 and model.vtm_head is None:
            raise ValueError("vtm_weight > 0 needs a model with a matching head (vtm_layers > 0)")
        if (uta_weight > 0 or mask_type == "attention") and teacher is None:
            raise ValueError("uta_weight > 0 and attention masks need the CLIP teacher")
        self.model = model
        self.vtc_weight, self.vtm_weight, self.uta_weight = vtc_weight, vtm_weight, uta_weight
        self.teacher = teacher
        self.masks = TokenMasks(mask_type, mask_ratio, seed)
        self.uta = ClipTokenAlignment(model.vision_encoder, teacher) if uta_weight > 0 else None
        self._export_meta = dict(export_meta or {})
        self._video_runner = GraphedBackbone(model.vision_encoder, (), "the video encoder", enabled=cuda_graph,
                                             required=cuda_graph_required)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        model = self.model
        model.clamp_temperature_()
        video_BCTHW = model.as_clip(batch["video"])
        index_B = batch["index"].to(model.temp.device)
        teacher_out = self.teacher(video_BCTHW) if self.teacher is not None else None
        keep_BL = self.masks(batch, teacher_out.cls_attn_BTP if teacher_out is not None else None, model.temp.device)
        tokens_BL = model.tokenize(batch["text"])
        index_BK = self.masks.visible_index(keep_BL, model.vision_encoder)
        video_BVD = self._video_runner(video_BCTHW, index_BK, self.training).tokens_BLD
        video_BE = model.pool_video(video_BVD)
        text_BE, text_BLW, valid_BL = model.text_tokens(tokens_BL)

        parts = {"vtc": contrastive_loss(video_BE, text_BE, index_B, model.temp)}
        with torch.no_grad():
            sim_v2t_BB = F.normalize(video_BE.float(), dim=-1) @ F.normalize(text_BE.float(), dim=-1).t()
        if self.vtm_weight > 0:
            parts["vtm"] = self._matching_loss(video_BVD, text_BLW, valid_BL, tokens_BL, sim_v2t_BB / model.temp,
                                               index_B)
        if self.uta is not None:
            parts["uta"] = self.uta(video_BVD, teacher_out.targets_KBLC[0], index_BK)
        weights = {"vtc": self.vtc_weight, "vtm": self.vtm_weight, "uta": self.uta_weight}
        loss = sum(weights[name] * value for name, value in parts.items())
        out = {"loss": loss, **{name: value.detach() for name, value in parts.items()}}
        out["temp"] = model.temp.detach().clone().squeeze()
        out["vtc_acc"] = (index_B[sim_v2t_BB.argmax(dim=1)] == index_B).float().mean()
        return out

    def _matching_loss(self, video_BVD: Tensor, text_BLW: Tensor, valid_BL: Tensor, tokens_BL: Tensor,
                       sim_v2t_BB: Tensor, index_B: Tensor) -> Tensor:
        """Positives (v_i, t_i), hard negatives (v_i, t_neg(i)) and (v_neg(i), t_i), through one head call."""
        text_for_video_B, video_for_text_B = sample_hard_negatives(sim_v2t_BB, index_B)
        video_3BVD = torch.cat([video_BVD, video_BVD, video_BVD[video_for_text_B]])
        text_order_3B = torch.cat([torch.arange(len(tokens_BL), device=tokens_BL.device), text_for_video_B,
                                   torch.arange(len(tokens_BL), device=tokens_BL.device)])
        logits_3B2 = self.model.vtm_logits(video_3BVD, text_BLW[text_order_3B], valid_BL[text_order_3B],
                                           tokens_BL[text_order_3B])
        B = len(tokens_BL)
        return matching_loss(logits_3B2[:B], logits_3B2[B:])

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Retrieval R@1/R@5 (%) both ways among this rank's eval clips (pad rows, `valid` False, left out)."""
        video, text = [], []
        for batch in batches:
            valid_B = batch.get("valid", torch.ones(len(batch["text"]), dtype=torch.bool)).cpu()
            video.append(self.model.encode_video(batch["video"]).cpu()[valid_B])
            text.append(self.model.encode_text(batch["text"]).cpu()[valid_B])
        if not video:
            return {}
        return paired_retrieval_metrics(torch.cat(text) @ torch.cat(video).t())

    def trainable_module(self) -> nn.Module:
        return self.model

    def flops_per_sample(self) -> float:
        """Video encoder over CLS + the visible tokens, text tower over its context, projections, the matching head
        on 3 pairs per sample, the UTA head (3x forward), and the teacher's forward (pipeline/flops.py)."""
        model, video = self.model, self.model.vision_encoder
        tokens, text = 1 + self.masks.visible_patches(*video.grid), model.text_encoder.context_length
        flops = videomamba_flops(video, tokens) + text_tower_flops(model.text_encoder.tower, text)
        flops += head_flops(model.vision_proj, 1) + head_flops(model.text_proj, 1)
        if self.vtm_weight > 0:
            flops += 3 * matching_head_flops(model.vtm_head, text, tokens)  # the positive and two hard negatives
        if self.uta is not None:
            flops += head_flops(self.uta.head.head, tokens)
        if self.teacher is not None:
            flops += clip_vision_flops(self.teacher, video.num_frames)
        return flops

    def export_metadata(self) -> dict[str, Any]:
        return {**self.model.config, **self._export_meta}

    def rng_state_dict(self) -> dict[str, Any]:
        return {"attention_masks": self.masks.state_dict()}

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["attention_masks"])


def paired_retrieval_metrics(sim_TV: Tensor) -> dict[str, float]:
    """R@1/R@5 (%) both ways of a (texts, clips) similarity in which text i describes clip i: the zero-shot
    evaluator's metric (pessimistic ties), among one rank's eval clips."""
    clips = range(sim_TV.shape[1])
    metrics = retrieval_metrics(sim_TV, list(clips), [[j] for j in clips])
    return {name: metrics[name] for name in ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5")}


def build(cfg) -> VideoTextTask:
    task_cfg: VideoTextConfig = cfg.task
    load = not shapes_only()
    model = build_video_text_model(
        cfg.model.name, cfg.model.build_kwargs(), task_cfg.text.spec(),
        text_pretrained=task_cfg.text.pretrained if load else None, embed_dim=task_cfg.embed_dim,
        vtm_layers=task_cfg.vtm_layers if task_cfg.vtm_weight > 0 else 0, temp_init=task_cfg.temp_init,
        vision_pretrained=cfg.model.pretrained if load else None)
    if task_cfg.init_checkpoint and load:
        load_video_text_export(model, task_cfg.init_checkpoint)
    teacher = None
    if task_cfg.uta_weight > 0 or cfg.data.mask.type == "attention":
        teacher = clip_teacher_for(task_cfg.teacher, model.vision_encoder, num_layers=1)
    # The evaluator normalises clips as training did.
    meta = {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    return VideoTextTask(model, task_cfg.vtc_weight, task_cfg.vtm_weight, task_cfg.uta_weight, teacher,
                         mask_type=cfg.data.mask.type, mask_ratio=cfg.data.mask.ratio, seed=cfg.seed,
                         export_meta=meta, cuda_graph=cfg.cuda_graph_wanted(),
                         cuda_graph_required=cfg.model.cuda_graph is True)


# `from:` loads a backbone into the vision encoder (`task.init_checkpoint` takes a whole video-text export).
register_task(TaskSpec(name="video_text", config=VideoTextConfig, build=build, init_key="model.pretrained",
                       cuda_graph=True, evaluates=True))
