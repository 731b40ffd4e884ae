"""Frozen CLIP image teacher for masked video pretraining: per-token targets and CLS attention.

The teacher is an open_clip `VisionTransformer` (CLIP ViT-B/16 by default) applied frame by frame, as in
UMT / VideoMamba's masked pretraining (docs/stages.md, "Stage 1"). For a clip it returns

- `targets_KBLC`: for each returned block k, the tokens `[CLS target, f0p0 … f(T-1)p(P-1)]` projected with the
  tower's `proj` (width -> output dim) and L2-normalised. The CLS target is the mean over frames of the
  per-frame CLS token. `ln_post` is skipped by default, as in the released code (its quirk; an option here).
- `cls_attn_BTP`: the last block's CLS -> patch attention, averaged over heads. It is a row of a softmax over
  the 1 + P keys (CLS included), so each frame's P values sum to 1 minus the CLS's attention to itself.

Legend: B batch, C channels, T frames, H/W pixels, P patches per frame, L = 1 + T*P tokens,
K returned blocks, E teacher width, C_out output dim.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TeacherOutput:
    targets_KBLC: Tensor
    """(K, B, 1 + T*P, C_out) float32, unit-norm rows; CLS target first, then patches frame-major."""
    cls_attn_BTP: Tensor
    """(B, T, P) float32: last block's head-averaged CLS -> patch attention per frame."""


class CLIPTeacher(nn.Module):
    """A frozen open_clip vision tower that stays in eval mode whatever its parent does."""

    def __init__(self, visual: nn.Module, return_layers: Sequence[int], apply_ln_post: bool = False):
        super().__init__()
        depth = len(visual.transformer.resblocks)
        layers = sorted(i % depth for i in return_layers)
        if not layers or any(not -depth <= i < depth for i in return_layers) or len(set(layers)) != len(layers):
            raise ValueError(f"teacher return layers {list(return_layers)} must be distinct block indices of a "
                             f"{depth}-block tower (negative counts from the end)")
        if not visual.transformer.batch_first:
            raise ValueError("the CLIP tower must be batch-first (open_clip's default)")
        if not isinstance(visual.transformer.resblocks[-1].attn, nn.MultiheadAttention):
            raise ValueError("CLS attention needs open_clip's default blocks (nn.MultiheadAttention); "
                             "choose a teacher model without custom attention blocks")
        self.visual = visual
        self.return_layers = layers
        self.apply_ln_post = apply_ln_post
        self.visual.requires_grad_(False)
        self.visual.eval()

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def output_dim(self) -> int:
        return self.visual.proj.shape[1]

    def train(self, mode: bool = True) -> CLIPTeacher:
        # A frozen teacher must never switch to train mode (dropout, patch dropout) when the task does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, video_BCTHW: Tensor) -> TeacherOutput:
        B, C, T, H, W = video_BCTHW.shape
        frames = video_BCTHW.transpose(1, 2).reshape(B * T, C, H, W)
        if (H, W) != self.image_size:
            frames = F.interpolate(frames, size=self.image_size, mode="bicubic", align_corners=False)
        device_type = frames.device.type
        # bf16 on GPU as released (autocast there); fp32 on CPU.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            with _capture_cls_attention(self.visual.transformer.resblocks[-1].attn) as attn:
                out = self.visual.forward_intermediates(
                    frames.to(self.visual.conv1.weight.dtype),
                    indices=self.return_layers,
                    stop_early=False,
                    intermediates_only=True,
                    output_fmt="NLC",
                    output_extra_tokens=True,
                )
            tokens = [
                torch.cat([cls, patches], dim=1)
                for cls, patches in zip(out["image_intermediates_prefix"], out["image_intermediates"], strict=True)
            ]
            x_K_BT_1P_E = torch.stack(tokens)
            if self.apply_ln_post:
                x_K_BT_1P_E = self.visual.ln_post(x_K_BT_1P_E)
            x_K_BT_1P_C = x_K_BT_1P_E @ self.visual.proj
        K, P = len(tokens), x_K_BT_1P_C.shape[2] - 1
        x = x_K_BT_1P_C.float().reshape(K, B, T, 1 + P, -1)
        cls_KB1C = x[:, :, :, :1].mean(dim=2)  # projection is linear, so projecting first is the same
        patches_KBLC = x[:, :, :, 1:].reshape(K, B, T * P, -1)
        targets = F.normalize(torch.cat([cls_KB1C, patches_KBLC], dim=2), dim=-1)
        cls_attn = attn["weights"][:, 0, 1:].float().reshape(B, T, P)
        return TeacherOutput(targets_KBLC=targets, cls_attn_BTP=cls_attn)


@contextmanager
def _capture_cls_attention(attn: nn.MultiheadAttention) -> Iterator[dict[str, Tensor]]:
    """Make `attn` also return its head-averaged weights during the block's normal forward, and keep them.

    open_clip's block calls the attention with `need_weights=False`; a kwargs pre-hook flips that for this
    one module, so the weights come out of the same forward instead of a second attention pass.
    """
    captured: dict[str, Tensor] = {}

    def want_weights(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

    def keep_weights(module, args, output):
        captured["weights"] = output[1]

    handles = [attn.register_forward_pre_hook(want_weights, with_kwargs=True), attn.register_forward_hook(keep_weights)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def teacher_patch_size(model_name: str, vision_overrides: dict[str, Any] | None = None) -> int:
    """The square patch size of an open_clip vision config (after overrides)."""
    import open_clip

    vision_cfg = {**_model_config(open_clip, model_name)["vision_cfg"], **(vision_overrides or {})}
    patch = vision_cfg["patch_size"]
    return patch if isinstance(patch, int) else patch[0]


def build_clip_teacher(
    model_name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    image_size: int = 224,
    return_layers: Sequence[int] = (-1,),
    apply_ln_post: bool = False,
    quick_gelu: bool = True,
    vision_overrides: dict[str, Any] | None = None,
) -> CLIPTeacher:
    """Build the frozen teacher from an open_clip model name.

    pretrained: an open_clip tag (`"openai"`, loaded from the local Hugging Face cache; with
    `HF_HUB_OFFLINE=1` nothing is downloaded), a local file (a full open_clip/OpenAI CLIP checkpoint, or a
    vision-tower state dict such as UMT's `vit_b16.pth`), or None for random weights (tests).
    image_size: the teacher's input size; a pretrained position embedding is interpolated (bicubic) to it.
    quick_gelu: OpenAI's CLIP weights were trained with QuickGELU; keep True for them.
    vision_overrides: replace entries of the open_clip vision config (e.g. `{"layers": 2, "width": 64}` for
    a tiny test teacher); not with a pretrained tag, whose weights fix the architecture.
    """
    import open_clip

    if vision_overrides and pretrained is not None and not os.path.isfile(pretrained):
        raise ValueError(f"teacher vision_overrides {vision_overrides} change the architecture, so they cannot be "
                         f"combined with the pretrained tag {pretrained!r}; use random weights or a matching file")
    config = _model_config(open_clip, model_name)
    vision_cfg = {**config["vision_cfg"], **(vision_overrides or {}), "image_size": image_size}
    device = torch.get_default_device()
    if device.type == "meta" and pretrained is not None:
        # Dry runs build on the meta device to count parameters: the architecture only, no weights read
        # (a tag is checked against open_clip's list, a path for existence).
        _check_pretrained_name(open_clip, model_name, pretrained)
        pretrained = None
    visual_state = _read_visual_state_dict(pretrained) if pretrained is not None else None
    kwargs: dict[str, Any] = {"force_quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "device": device}
    if pretrained is None or visual_state is not None:
        # Only the vision tower is kept: build a one-layer text tower instead of CLIP's full one.
        kwargs.update(text_cfg={"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1})
        clip = open_clip.create_model(model_name, pretrained=None, **kwargs)
    else:
        clip = _create_pretrained(open_clip, model_name, pretrained, kwargs)
    if visual_state is not None:
        _load_visual_state_dict(clip, visual_state, pretrained)
    return CLIPTeacher(clip.visual, return_layers=return_layers, apply_ln_post=apply_ln_post)


def _model_config(open_clip, model_name: str) -> dict[str, Any]:
    config = open_clip.get_model_config(model_name)
    if config is None or "timm_model_name" in config.get("vision_cfg", {}):
        raise ValueError(f"teacher model_name {model_name!r} is not an open_clip ViT config; "
                         f"use one of open_clip.list_models() such as 'ViT-B-16'")
    return config


def _create_pretrained(open_clip, model_name: str, pretrained: str, kwargs: dict[str, Any]) -> nn.Module:
    _check_pretrained_name(open_clip, model_name, pretrained)
    if os.path.isfile(pretrained):
        return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    hub = (open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub") or "").rstrip("/")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        raise RuntimeError(
            f"could not load CLIP weights {model_name}/{pretrained!r} (HF_HUB_OFFLINE={int(offline)}): put them in "
            f"the Hugging Face cache first (on a machine with internet: `huggingface-cli download {hub}`, then copy "
            f"~/.cache/huggingface), or set task.teacher.pretrained to a local checkpoint file "
            f"(or to null for a random teacher in tests)"
        ) from err


def _check_pretrained_name(open_clip, model_name: str, pretrained: str) -> None:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not os.path.isfile(pretrained) and pretrained not in tags:
        raise ValueError(f"teacher pretrained={pretrained!r} is neither a file nor a pretrained tag of {model_name} "
                         f"(tags: {tags})")


def _read_visual_state_dict(path: str) -> dict[str, Tensor] | None:
    """The state dict of a file holding only a vision tower (keys `conv1.weight`, ...), as UMT's extracted
    teachers; None for anything else (a full CLIP checkpoint or a tag, left to open_clip)."""
    if not os.path.isfile(path):
        return None
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(path)
    except RuntimeError:  # an OpenAI TorchScript archive: a full CLIP model
        return None
    return state if "conv1.weight" in state else None


def _load_visual_state_dict(clip: nn.Module, state: dict[str, Tensor], path: str) -> None:
    from open_clip.model import resize_pos_embed

    conv = state["conv1.weight"]
    if conv.dim() == 5:  # UMT stores conv1 as a Conv3d with a temporal kernel of 1
        if conv.shape[2] != 1:
            raise ValueError(f"{path}: conv1.weight has a temporal kernel of {conv.shape[2]}; the teacher needs 1")
        state = {**state, "conv1.weight": conv.squeeze(2)}
    prefixed = {f"visual.{k}": v for k, v in state.items()}
    resize_pos_embed(prefixed, clip)  # interpolates the patch grid when image_size differs from the file's
    clip.visual.load_state_dict({k[len("visual."):]: v for k, v in prefixed.items()}, strict=True)
