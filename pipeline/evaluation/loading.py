"""Which video-text model a checkpoint holds, what its inputs are, and how the evaluator loads it.

Two families (`model.text_family`):
- `open_clip`: our video-text stage export (`models.video_text.VideoTextModel`: `text_encoder.tower.*`);
- `bert`: the UMT layout with a BERT tower and fusion layers (`models.umt.UMTVideoText`: `text_encoder.bert.*`):
  the released multimodal checkpoints (`{"model": state_dict}`) and stage exports of that model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from models.checkpoints import unwrap_state_dict
from pipeline.evaluation.config import EvalModelConfig

OPEN_CLIP, BERT = "open_clip", "bert"


def _read(checkpoint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta) with the weights memory-mapped, not read."""
    obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{checkpoint}: expected a checkpoint dict, got {type(obj).__name__}")
    meta = obj.get("meta", {}) if isinstance(obj.get("meta"), dict) else {}
    state, _ = unwrap_state_dict(obj)
    return state, meta


def text_family(state: dict[str, Any], checkpoint: str = "checkpoint") -> str:
    """`bert` or `open_clip`, from the text tower's tensor names."""
    if any(k.startswith("text_encoder.bert.") for k in state):
        return BERT
    if any(k.startswith("text_encoder.tower.") for k in state):
        return OPEN_CLIP
    raise ValueError(f"{checkpoint}: no text tower (text_encoder.bert.* or text_encoder.tower.*); is it a video-text "
                     "model? A backbone-only file cannot be evaluated for retrieval")


def resolve_family(model_cfg: EvalModelConfig, state: dict[str, Any]) -> str:
    found = text_family(state, str(model_cfg.checkpoint))
    if model_cfg.text_family not in ("auto", found):
        raise ValueError(f"model.text_family={model_cfg.text_family!r} but {model_cfg.checkpoint} has a {found} text "
                         "tower; set model.text_family=auto")
    return found


def model_facts(model_cfg: EvalModelConfig) -> dict[str, Any]:
    """What the checkpoint says about its inputs: `family`, `num_frames`, `img_size` (read off the vision
    encoder's embedding shapes) and `mean`/`std` when an export's meta records them."""
    state, meta = _read(model_cfg.checkpoint)
    family = resolve_family(model_cfg, state)
    try:
        proj = state["vision_encoder.patch_embed.proj.weight"]  # (D, C, tubelet, patch, patch)
        temporal = state["vision_encoder.temporal_pos_embedding"]  # (1, T / tubelet, D)
        spatial = state["vision_encoder.pos_embed"]  # (1, 1 + patches per frame, D)
    except KeyError as err:
        raise ValueError(f"{model_cfg.checkpoint}: no vision encoder tensor {err}; is it a video-text model?") from err
    facts = {"family": family, "num_frames": temporal.shape[1] * proj.shape[2],
             "img_size": math.isqrt(spatial.shape[1] - 1) * proj.shape[3]}
    facts.update({k: list(meta[k]) for k in ("mean", "std") if k in meta})
    return facts


def load_eval_model(model_cfg: EvalModelConfig, device: torch.device):
    """The checkpoint's model in eval mode on `device` (BERT family: tokenizer from `model.text_model`)."""
    state, _ = _read(model_cfg.checkpoint)
    if resolve_family(model_cfg, state) == BERT:
        from models.umt_checkpoint import load_umt_model

        model, _ = load_umt_model(model_cfg.checkpoint, text_model=model_cfg.text_model, map_location=device)
        return model.eval()
    from models.video_text import VideoTextModel

    return VideoTextModel.from_export(model_cfg.checkpoint, map_location=device).eval()
