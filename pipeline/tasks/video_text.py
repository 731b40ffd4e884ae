"""Stage 3: video-text contrastive pretraining of VideoMamba with a CLIP text tower (UMT-style, videomamba.md §6).

Losses (each weighted in the config, each returned for logging):
- `vtc`: symmetric InfoNCE over the batch of every rank (features gathered with gradient), equal `index`
  values counted as positives;
- `vtm` (optional): video-text matching with one in-batch hard negative per video and per text, scored by
  the model's small cross-attention `vtm_head` (local batch, as UMT);
plus `temp` (the clamped temperature) and `vtc_acc` (local in-batch video->text top-1) as diagnostics.

Masking: with `data.mask` set, the loader's `keep` mask drops video tokens before the backbone (UMT trains
its first video-text stage with 80% of the tokens masked, then tunes unmasked; §6.3) and pooling runs over
the visible tokens. Image-text pairs are one-frame videos (T = 1), encoded as static clips by the model.

Legend: B batch, V video tokens (1 + kept), D video width, L text tokens, W text width, E joint width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.video_text import VideoTextModel, build_video_text_model
from pipeline.config import ConfigError, TaskConfig, register_task_config
from pipeline.losses import contrastive_loss, matching_loss, sample_hard_negatives
from pipeline.tasks import Task, register_task


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


@register_task_config("video_text")
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

    def __post_init__(self) -> None:
        if self.vtc_weight <= 0:
            raise ConfigError(f"task.vtc_weight: the contrastive loss is the stage's objective, must be > 0; "
                              f"got {self.vtc_weight}")
        if self.vtm_weight < 0:
            raise ConfigError(f"task.vtm_weight: must be >= 0, got {self.vtm_weight}")
        if self.vtm_weight > 0 and self.vtm_layers < 1:
            raise ConfigError(f"task.vtm_layers: must be >= 1 when task.vtm_weight > 0, got {self.vtm_layers}")


class VideoTextTask(Task):
    """Trains a `VideoTextModel`; `forward(batch)` -> {"loss", "vtc", ["vtm"], "temp", "vtc_acc"}."""

    def __init__(self, model: VideoTextModel, vtc_weight: float = 1.0, vtm_weight: float = 0.0) -> None:
        super().__init__()
        if vtm_weight > 0 and model.vtm_head is None:
            raise ValueError("vtm_weight > 0 needs a model with a matching head (vtm_layers > 0)")
        self.model = model
        self.vtc_weight, self.vtm_weight = vtc_weight, vtm_weight

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        model = self.model
        model.clamp_temperature_()
        index_B = batch["index"].to(model.temp.device)
        tokens_BL = model.tokenize(batch["text"])
        video_BVD, _ = model.video_tokens(batch["video"], keep_BL=batch.get("keep"))
        video_BE = model.pool_video(video_BVD)
        text_BE, text_BLW, valid_BL = model.text_tokens(tokens_BL)

        parts = {"vtc": contrastive_loss(video_BE, text_BE, index_B, model.temp)}
        with torch.no_grad():
            sim_v2t_BB = F.normalize(video_BE.float(), dim=-1) @ F.normalize(text_BE.float(), dim=-1).t()
        if self.vtm_weight > 0:
            parts["vtm"] = self._matching_loss(video_BVD, text_BLW, valid_BL, tokens_BL, sim_v2t_BB / model.temp,
                                               index_B)
        weights = {"vtc": self.vtc_weight, "vtm": self.vtm_weight}
        loss = sum(weights[name] * value for name, value in parts.items())
        out = {"loss": loss, **{name: value.detach() for name, value in parts.items()}}
        out["temp"] = model.temp.detach().clone()
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

    def trainable_module(self) -> nn.Module:
        return self.model

    def export_metadata(self) -> dict[str, Any]:
        return dict(self.model.config)


@register_task("video_text")
def build(cfg) -> VideoTextTask:
    task_cfg: VideoTextConfig = cfg.task
    model = build_video_text_model(
        cfg.model.name, cfg.model.build_kwargs(), task_cfg.text.spec(), text_pretrained=task_cfg.text.pretrained,
        embed_dim=task_cfg.embed_dim, vtm_layers=task_cfg.vtm_layers if task_cfg.vtm_weight > 0 else 0,
        temp_init=task_cfg.temp_init, vision_pretrained=cfg.model.pretrained)
    return VideoTextTask(model, task_cfg.vtc_weight, task_cfg.vtm_weight)
