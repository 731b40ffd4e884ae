"""Builders shared by the stage tasks: the stage's VideoMamba backbone, its export metadata, and the dry-run check."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models import create_model, load_pretrained


def shapes_only() -> bool:
    """True while building on the meta device (a job's dry run counts parameters): no weight files are read."""
    return torch.empty(()).device.type == "meta"


def build_student(cfg) -> nn.Module:
    """The stage's backbone: `cfg.model` without a classifier head, from `cfg.model.pretrained` if set."""
    model = create_model(cfg.model.name, **cfg.model.build_kwargs(), num_classes=0)
    if cfg.model.pretrained and not shapes_only():
        load_pretrained(model, cfg.model.pretrained)
    return model


def backbone_export_meta(cfg) -> dict[str, Any]:
    """What a backbone stage's export records to rebuild its student: `create_model(model_name, **model_kwargs)`."""
    return {"model_name": cfg.model.name, "model_kwargs": {**cfg.model.build_kwargs(), "num_classes": 0}}
