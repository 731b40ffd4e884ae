"""The video-text dual encoder of stage 3 (UMT-style; docs/stages.md) and its small matching head.

`VideoTextModel` = VideoMamba `vision_encoder` (official keys under `vision_encoder.`, as the released
multimodal checkpoints) -> `pool_norm`(CLS + mean of patch tokens) -> `vision_proj`, and an open_clip text
tower -> `text_proj`, with a learnable temperature. Optionally a `vtm_head` scores (video, text) pairs.

Differences from the released model, on purpose:
- Text tower: open_clip's CLIP text transformer (bundled BPE tokenizer, loads offline) instead of BERT.
- Matching head: a few fresh cross-attention layers over the text tokens (`MatchingHead`) instead of BERT
  layers 9-11 with cross-attention; no MLM loss (the CLIP tower is causal, not a masked LM).
- Pooling is over all (visible) tokens of the clip, in training and at test time, so `encode_video` gives
  one vector per clip (UMT's eval pools per frame and averages the per-frame cosines).
- Images (T = 1) are encoded as static clips: the frame is repeated to the backbone's frame count.

Legend: B batch, C channels, T frames, H/W pixels, V video tokens (1 + kept patches), D video width,
L text tokens, W text width, E joint embedding width.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints import load_pretrained
from models.registry import create_model
from models.text import TextEncoder, create_text_encoder
from models.videomamba import as_static_clip

TEMP_MIN, TEMP_MAX = 0.001, 0.5


class MatchingHead(nn.Module):
    """Text tokens attend to themselves and to the video tokens; the EOT token's feature -> 2 logits."""

    def __init__(self, video_width: int, text_width: int, num_layers: int = 2) -> None:
        super().__init__()
        num_heads = max(1, text_width // 64)
        self.video_in = nn.Linear(video_width, text_width)
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(text_width, num_heads, dim_feedforward=4 * text_width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(text_width)
        self.classifier = nn.Linear(text_width, 2)

    def forward(self, video_BVD: Tensor, text_BLW: Tensor, text_valid_BL: Tensor, eot_B: Tensor) -> Tensor:
        memory_BVW = self.video_in(video_BVD)
        x_BLW = text_BLW
        for block in self.blocks:
            x_BLW = block(x_BLW, memory_BVW, tgt_key_padding_mask=~text_valid_BL)
        pooled_BW = self.norm(x_BLW[torch.arange(len(x_BLW), device=x_BLW.device), eot_B])
        return self.classifier(pooled_BW)


class VideoTextModel(nn.Module):
    """Dual encoder: `encode_video(video_BCTHW)` and `encode_text(list[str])` give L2-normalised (B, E)."""

    def __init__(self, vision_encoder: nn.Module, text_encoder: TextEncoder, embed_dim: int = 512,
                 vtm_layers: int = 0, temp_init: float = 0.07, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not TEMP_MIN <= temp_init <= TEMP_MAX:
            raise ValueError(f"temp_init={temp_init} must be in [{TEMP_MIN}, {TEMP_MAX}]")
        width = vision_encoder.embed_dim
        self.vision_encoder = vision_encoder
        self.pool_norm = nn.LayerNorm(width)
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_encoder = text_encoder
        self.text_proj = nn.Linear(text_encoder.width, embed_dim)
        # Shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
        self.temp = nn.Parameter(torch.full((1,), float(temp_init)))
        self.vtm_head = MatchingHead(width, text_encoder.width, vtm_layers) if vtm_layers > 0 else None
        self.config = dict(config or {})  # what `build_video_text_model` needs to rebuild this model

    # ------------------------------------------------------------------ video side

    def as_clip(self, video_BCTHW: Tensor) -> Tensor:
        """An image batch (T = 1) as static clips of the backbone's frame count (a view, no copy)."""
        return as_static_clip(video_BCTHW, self.vision_encoder.num_frames)

    def video_tokens(self, video_BCTHW: Tensor, keep_BL: Tensor | None = None,
                     return_residuals: tuple[int, ...] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """Backbone tokens after norm_f (B, V, D), CLS first, plus any requested residual streams."""
        features = self.vision_encoder.forward_features(self.as_clip(video_BCTHW), keep_BL=keep_BL,
                                                        return_residuals=return_residuals)
        return features.tokens_BLD, features.residuals

    def pool_video(self, tokens_BVD: Tensor) -> Tensor:
        """pool_norm(CLS + mean of the patch tokens) -> vision_proj: unnormalised (B, E)."""
        return self.vision_proj(self.pool_norm(tokens_BVD[:, 0] + tokens_BVD[:, 1:].mean(dim=1)))

    def encode_video(self, video_BCTHW: Tensor) -> Tensor:
        """L2-normalised clip embeddings (B, E), all tokens visible."""
        tokens_BVD, _ = self.video_tokens(video_BCTHW)
        return F.normalize(self.pool_video(tokens_BVD).float(), dim=-1)

    # ------------------------------------------------------------------ text side

    def tokenize(self, texts: list[str], max_tokens: int | None = None) -> Tensor:
        return self.text_encoder.tokenize(texts, device=self.temp.device, max_tokens=max_tokens)

    def text_tokens(self, tokens_BL: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(projected unnormalised (B, E), token features (B, L, W), non-pad mask (B, L))."""
        pooled_BW, tokens_BLW, valid_BL = self.text_encoder(tokens_BL)
        return self.text_proj(pooled_BW), tokens_BLW, valid_BL

    def encode_text(self, texts: list[str], max_tokens: int | None = None) -> Tensor:
        """L2-normalised text embeddings (B, E); each text truncated to `max_tokens` tokens when given."""
        text_BE, _, _ = self.text_tokens(self.tokenize(texts, max_tokens))
        return F.normalize(text_BE.float(), dim=-1)

    # ------------------------------------------------------------------ temperature and matching

    def clamp_temperature_(self) -> None:
        """Keep the learnable temperature in [0.001, 0.5] (UMT clamps it in place at every forward)."""
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)

    def vtm_logits(self, video_BVD: Tensor, text_BLW: Tensor, text_valid_BL: Tensor, tokens_BL: Tensor) -> Tensor:
        """(B, 2) matching logits of aligned pairs (row i of the video side with row i of the text side)."""
        if self.vtm_head is None:
            raise RuntimeError("this model has no matching head; build it with vtm_layers > 0")
        return self.vtm_head(video_BVD, text_BLW, text_valid_BL, TextEncoder.eot_index(tokens_BL))

    @torch.no_grad()
    def vtm_scores(self, video_BCTHW: Tensor, texts: list[str]) -> Tensor:
        """Positive-class matching logit of each (video i, text i) pair, (B,)."""
        video_BVD, _ = self.video_tokens(video_BCTHW)
        return self._positive_logits(video_BVD, texts)

    @torch.no_grad()
    def vtm_scores_for_clip(self, video_1CTHW: Tensor, texts: list[str], batch_size: int = 32,
                            max_tokens: int | None = None) -> Tensor:
        """Matching logit of one clip with each of `texts`, (len(texts),): for re-ranking a clip's top-k
        candidates. The backbone runs once; its tokens are shared (expanded, not copied) by every batch of
        `batch_size` texts, instead of re-encoding the clip once per pair."""
        if video_1CTHW.shape[0] != 1:
            raise ValueError(f"vtm_scores_for_clip takes one clip (1, C, T, H, W); got {tuple(video_1CTHW.shape)}")
        video_1VD, _ = self.video_tokens(video_1CTHW)
        scores = [self._positive_logits(video_1VD.expand(len(chunk), -1, -1), chunk, max_tokens)
                  for chunk in (texts[i:i + batch_size] for i in range(0, len(texts), batch_size))]
        return torch.cat(scores) if scores else video_1VD.new_zeros(0, dtype=torch.float32)

    def _positive_logits(self, video_BVD: Tensor, texts: list[str], max_tokens: int | None = None) -> Tensor:
        tokens_BL = self.tokenize(texts, max_tokens)
        _, text_BLW, valid_BL = self.text_tokens(tokens_BL)
        return self.vtm_logits(video_BVD, text_BLW, valid_BL, tokens_BL)[:, 1].float()

    # ------------------------------------------------------------------ export

    @classmethod
    def from_export(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VideoTextModel:
        """Rebuild from a stage export `{"state_dict", "meta"}` written by the video-text stage."""
        export = torch.load(path, map_location=map_location, weights_only=True)
        meta = export.get("meta", {}) if isinstance(export, dict) else {}
        if "text_encoder" not in meta or "state_dict" not in export:
            raise ValueError(f"{path}: not a video-text stage export (needs 'state_dict' and meta.text_encoder); "
                             "a backbone-only export loads with models.load_pretrained instead")
        model = build_video_text_model(meta["model_name"], meta["model_kwargs"], meta["text_encoder"],
                                       text_pretrained=None, embed_dim=meta["embed_dim"],
                                       vtm_layers=meta["vtm_layers"])
        model.load_state_dict(export["state_dict"], strict=True)
        return model.to(map_location)


def load_video_text_export(model: VideoTextModel, path: str | os.PathLike) -> None:
    """Load every weight of a video-text export into `model` (same architecture), e.g. to continue training."""
    export = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(export, dict) or "state_dict" not in export:
        raise ValueError(f"{path}: not a stage export (a dict with 'state_dict' and 'meta')")
    meta = export.get("meta", {})
    # model_kwargs may differ harmlessly (drop path, scan backend); a shape difference fails in load_state_dict.
    keys = ("model_name", "text_encoder", "embed_dim", "vtm_layers")
    differing = {k: (meta.get(k), model.config[k]) for k in keys if k in meta and meta[k] != model.config[k]}
    if differing:
        raise ValueError(f"{path}: the export was trained with other settings {{key: (export, config)}} = "
                         f"{differing}; make the config match it")
    model.load_state_dict(export["state_dict"], strict=True)


def build_video_text_model(model_name: str, model_kwargs: dict[str, Any], text_encoder: dict[str, Any],
                           text_pretrained: str | None = None, embed_dim: int = 512, vtm_layers: int = 0,
                           temp_init: float = 0.07, vision_pretrained: str | None = None) -> VideoTextModel:
    """Build the dual encoder: `create_model(model_name, num_classes=0, **model_kwargs)` + open_clip text tower.

    `text_encoder` = {"name": open_clip model name, **text_cfg overrides}; `text_pretrained` a tag/file for
    its CLIP weights; `vision_pretrained` a VideoMamba checkpoint or earlier stage export for the backbone.
    """
    text_spec = dict(text_encoder)
    text_name = text_spec.pop("name")
    vision = create_model(model_name, **{**model_kwargs, "num_classes": 0})
    if vision_pretrained is not None:
        report = load_pretrained(vision, vision_pretrained)
        if report.missing:
            raise ValueError(f"{vision_pretrained}: the checkpoint lacks backbone tensors {report.missing[:8]}...; "
                             f"is it a {model_name} checkpoint?")
    text = create_text_encoder(text_name, pretrained=text_pretrained, **text_spec)
    config = {"model_name": model_name, "model_kwargs": {**model_kwargs, "num_classes": 0},
              "text_encoder": dict(text_encoder), "embed_dim": embed_dim, "vtm_layers": vtm_layers}
    return VideoTextModel(vision, text, embed_dim=embed_dim, vtm_layers=vtm_layers, temp_init=temp_init,
                          config=config)
