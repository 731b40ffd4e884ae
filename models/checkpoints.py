"""Load official VideoMamba checkpoints (and our own exports) into a VideoMamba; export in the same layout.

Handles what the released files actually look like (docs/model.md, "Checkpoints"): raw state dicts (video),
{"model": ...} (IN-1K image), {"module": ...} (DeepSpeed), `module.` (DDP) and `vision_encoder.` (multimodal)
prefixes, the masked-pretrain final norm named `norm`, 2-D patch kernels (inflated to 3-D), and position
embeddings for another frame count or resolution (interpolated as the released fine-tuning code does).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "module", "state_dict")
_BACKBONE_PREFIX = "vision_encoder."


@dataclass
class LoadReport:
    """What load_pretrained did. Empty `missing` and `unexpected` mean every tensor found its place."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    interpolated: dict[str, str] = field(default_factory=dict)  # key -> "old shape -> new shape (how)"
    dropped: dict[str, str] = field(default_factory=dict)  # key (or prefix*) -> why
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model key

    def __str__(self) -> str:
        parts = [f"{len(self.missing)} missing {self.missing}", f"{len(self.unexpected)} unexpected "
                 f"{self.unexpected}", f"interpolated {self.interpolated}", f"dropped {self.dropped}",
                 f"renamed {self.renamed}"]
        return "; ".join(parts)


def interpolate_pos_embed(pos_embed_1LD: Tensor, num_patches: int) -> Tensor:
    """Bicubic-resize the square patch grid of a (1, 1 + P0, D) spatial embedding to P patches; CLS row kept."""
    side0, side = math.isqrt(pos_embed_1LD.shape[1] - 1), math.isqrt(num_patches)
    if side0 * side0 != pos_embed_1LD.shape[1] - 1 or side * side != num_patches:
        raise ValueError(f"pos_embed interpolation needs square patch grids; got {pos_embed_1LD.shape[1] - 1}"
                         f" -> {num_patches} patches")
    grid_1Dhw = pos_embed_1LD[:, 1:].reshape(1, side0, side0, -1).permute(0, 3, 1, 2)
    grid_1Dhw = F.interpolate(grid_1Dhw.float(), size=(side, side), mode="bicubic", align_corners=False)
    patches_1PD = grid_1Dhw.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed_1LD.dtype)
    return torch.cat([pos_embed_1LD[:, :1], patches_1PD], dim=1)


def interpolate_temporal_embed(temporal_1TD: Tensor, num_steps: int) -> Tensor:
    """Linearly resize a (1, T0, D) temporal embedding to T steps (align_corners=False, as released)."""
    resized_1DT = F.interpolate(temporal_1TD.float().transpose(1, 2), size=num_steps, mode="linear",
                                align_corners=False)
    return resized_1DT.transpose(1, 2).to(temporal_1TD.dtype)


def inflate_patch_kernel(weight_DC_hw: Tensor, tubelet_size: int) -> Tensor:
    """Conv2d (D, C, p, p) -> Conv3d (D, C, k, p, p): the 2-D kernel in the middle time slice, zeros elsewhere."""
    D, C, p, q = weight_DC_hw.shape
    weight_DCkpq = weight_DC_hw.new_zeros(D, C, tubelet_size, p, q)
    weight_DCkpq[:, :, tubelet_size // 2] = weight_DC_hw
    return weight_DCkpq


def unwrap_state_dict(path_or_state_dict: str | os.PathLike | Mapping, mmap: bool = False
                      ) -> tuple[dict[str, Tensor], LoadReport]:
    """Load a file (weights_only; memory-mapped with `mmap`) or take a mapping; unwrap
    {"model"/"module"/"state_dict": ...} and a DDP `module.` prefix. Non-tensor entries are reported as dropped."""
    report = LoadReport()
    if isinstance(path_or_state_dict, Mapping):
        obj = path_or_state_dict
    else:
        obj = torch.load(path_or_state_dict, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path_or_state_dict}: expected a state dict, got {type(obj).__name__}")
    while (wrapper := next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)) is not None:
        obj = obj[wrapper]
    state = {}
    for key, value in obj.items():
        if isinstance(value, Tensor):
            state[key] = value
        else:
            report.dropped[key] = f"not a tensor ({type(value).__name__})"
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, report


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], LoadReport]:
    """`unwrap_state_dict`, then keep only the video backbone of a multimodal file (`vision_encoder.*`)."""
    state, report = unwrap_state_dict(path_or_state_dict)
    if any(k.startswith(_BACKBONE_PREFIX) for k in state):  # multimodal file: keep the video backbone only
        others: dict[str, int] = {}
        for k in state:
            if not k.startswith(_BACKBONE_PREFIX):
                others[k.split(".")[0]] = others.get(k.split(".")[0], 0) + 1
        for prefix, n in others.items():
            report.dropped[f"{prefix}*"] = f"not part of the video backbone ({n} tensors)"
        state = {k.removeprefix(_BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(_BACKBONE_PREFIX)}
    return state, report


def _fit_to_model(state: dict[str, Tensor], own: dict[str, Tensor], strict_head: bool,
                  report: LoadReport) -> dict[str, Tensor]:
    """Rename, inflate, interpolate or drop checkpoint tensors so that their shapes match the model's."""
    if "norm.weight" in state and "norm_f.weight" in own and "norm_f.weight" not in state:
        state["norm_f.weight"] = state.pop("norm.weight")  # masked-pretrain / multimodal name of norm_f
        report.renamed["norm.weight"] = "norm_f.weight"
    fitted = {}
    for key, value in state.items():
        target = own.get(key)
        if key.startswith("head."):
            if target is None or target.shape != value.shape:
                why = (f"checkpoint head {tuple(value.shape)} does not fit the model's "
                       f"{'missing head (num_classes=0)' if target is None else tuple(target.shape)}")
                if strict_head:
                    raise ValueError(f"{key}: {why}; build the model with the checkpoint's num_classes")
                report.dropped[key] = why
                continue
        elif target is not None and target.shape != value.shape:
            old = tuple(value.shape)
            if key == "patch_embed.proj.weight" and value.dim() == 4 and target.dim() == 5:
                value, how = inflate_patch_kernel(value, target.shape[2]), "2-D kernel inflated"
            elif key == "pos_embed" and value.shape[2] == target.shape[2]:
                value, how = interpolate_pos_embed(value, target.shape[1] - 1), "bicubic, CLS row kept"
            elif key == "temporal_pos_embedding" and value.shape[2] == target.shape[2]:
                value, how = interpolate_temporal_embed(value, target.shape[1]), "linear"
            else:
                raise ValueError(f"checkpoint tensor {key!r} has shape {old} but the model expects "
                                 f"{tuple(target.shape)}; check the model size (embed_dim/depth)")
            report.interpolated[key] = f"{old} -> {tuple(value.shape)} ({how})"
        fitted[key] = value
    return fitted


def load_pretrained(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping,
                    strict_head: bool = False) -> LoadReport:
    """Load an official or exported VideoMamba checkpoint into `model` (in place); return and log a report.

    A head that does not fit (other class count, or num_classes=0) is dropped with a warning unless
    strict_head; any other shape mismatch raises ValueError.
    """
    state, report = read_state_dict(path_or_state_dict)
    own = model.state_dict()
    fitted = _fit_to_model(state, own, strict_head, report)
    result = model.load_state_dict(fitted, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    for key, why in report.dropped.items():
        if key.startswith("head."):
            log.warning("dropped %s: %s", key, why)
    log.info("loaded checkpoint: %s", report)
    return report


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """CPU state dict in the official key layout (ours is identical); unwraps DDP/DeepSpeed `.module`."""
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Write export_state_dict(model) as a raw state dict, loadable by load_pretrained and the official code."""
    torch.save(export_state_dict(model), path)
