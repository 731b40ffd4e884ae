"""Optimizer pieces: AdamW parameter groups (weight-decay and layer-wise LR decay) and the LR schedule.

Weight decay is not applied to 1-D parameters (norm weights, biases, `D`), to positional / class / temporal
embeddings, to the SSM's `A_log` (and the backward branch's `A_b_log`, `D_b`), to parameters that carry
mamba-ssm's `_no_weight_decay` attribute, or to names a module lists in its `no_weight_decay()`. With
`decay_ssm_a` the 2-D `A_log` / `A_b_log` are decayed like any other matrix, as the released optimizers do
(they exempt only 1-D parameters, biases and the model's `no_weight_decay()` names). `no_decay="dims"` keeps only
the first rule (1-D parameters and biases), as the released video-text optimizer does: its model is wrapped in DDP
when the optimizer is built, so the model's `no_weight_decay()` is never consulted.

The schedule is a linear warmup then a half cosine (`cosine`), or the released video-text scheduler's variant
(`cosine_floor`, see `cosine_factor`).

Layer-wise LR decay scales each group's LR by `layer_decay ** (num_layers + 1 - layer_id)`. Which parameters get
which layer depends on `optim.layer_decay_scope`:
- `all_layers` (BEiT style): embeddings (patch, position, class, temporal) are layer 0, `layers.<i>.` is layer
  i + 1 and everything after the last block (final norm, heads, projections) keeps the full LR;
- `released` (what the released VideoMamba fine-tuning does; its layer lookup has the `layers.` branch commented
  out and knows no `temporal_pos_embedding`): only `cls_token`, `pos_embed` and `patch_embed.*` are layer 0, every
  other parameter keeps the full LR.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

_NO_DECAY_NAME = re.compile(r"(^|\.)(pos_embed|cls_token|temporal_pos_embedding|A_log|A_b_log|D|D_b)$")
_SSM_A_NAME = re.compile(r"(^|\.)(A_log|A_b_log)$")
_EMBEDDING_NAME = re.compile(r"(^|\.)(patch_embed|pos_embed|cls_token|temporal_pos_embedding)(\.|$)")
_RELEASED_LAYER0_NAME = re.compile(r"(^|\.)(patch_embed|pos_embed|cls_token)(\.|$)")
LAYER_DECAY_SCOPES = ("released", "all_layers")
NO_DECAY_RULES = ("names", "dims")
SCHEDULES = ("cosine", "cosine_floor")
_BLOCK_INDEX = re.compile(r"(^|\.)layers\.(\d+)\.")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names listed by `no_weight_decay()` of `model` or any submodule (names are module-relative)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{prefix}.{n}" if prefix else n for n in listed())
    return names


def wants_weight_decay(name: str, param: nn.Parameter, exempt: set[str], decay_ssm_a: bool = False,
                       no_decay: str = "names") -> bool:
    """Whether AdamW's decoupled weight decay applies to this parameter (`no_decay`: see the module docstring)."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    if no_decay == "dims":
        return True
    if no_decay != "names":
        raise ValueError(f"no_decay rule {no_decay!r} is not one of {NO_DECAY_RULES}")
    if name in exempt:
        return False
    if decay_ssm_a and _SSM_A_NAME.search(name):
        return True
    if getattr(param, "_no_weight_decay", False):  # mamba-ssm marks A_log / D this way
        return False
    return not _NO_DECAY_NAME.search(name)


def layer_id(name: str, num_layers: int, scope: str = "all_layers") -> int:
    """all_layers: 0 for embeddings, i + 1 for parameters of block `layers.<i>`, num_layers + 1 for everything after;
    released: 0 for cls_token, pos_embed and patch_embed, num_layers + 1 for everything else (module docstring)."""
    if scope == "released":
        return 0 if _RELEASED_LAYER0_NAME.search(name) else num_layers + 1
    if scope != "all_layers":
        raise ValueError(f"layer decay scope {scope!r} is not one of {LAYER_DECAY_SCOPES}")
    if _EMBEDDING_NAME.search(name):
        return 0
    match = _BLOCK_INDEX.search(name)
    return int(match.group(2)) + 1 if match else num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 layer_decay_scope: str = "all_layers", decay_ssm_a: bool = False,
                 no_decay: str = "names") -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters; each group carries `lr_scale` (1.0 without layer decay)."""
    exempt = no_weight_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the task has no trainable parameters (did it freeze everything?)")
    blocks = [int(m.group(2)) for n, _ in named if (m := _BLOCK_INDEX.search(n))]
    num_layers = max(blocks) + 1 if blocks else 0
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in named:
        decay = wants_weight_decay(name, param, exempt, decay_ssm_a, no_decay)
        layer = layer_id(name, num_layers, layer_decay_scope) if layer_decay is not None else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (decay, layer),
            {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale},
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def cosine_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float, schedule: str = "cosine") -> float:
    """LR multiplier at `step` (0 for the first optimizer step). `cosine`: linear warmup to 1 reached at the
    last warmup step, then cosine 1 -> `min_ratio`. `cosine_floor` (the released video-text scheduler): warmup
    step / warmup_steps, then a cosine 1 -> 0, both floored at `min_ratio`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
    floor = schedule == "cosine_floor"
    if step < warmup_steps:
        return max(min_ratio, step / warmup_steps) if floor else (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if floor:
        return max(min_ratio, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, optim_cfg, peak_lr: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Torch AdamW over `param_groups` and its warmup + cosine schedule (group LR = schedule x lr_scale).

    A torch optimizer (not DeepSpeed's fused/CPU Adam) avoids a JIT compile on CPU; DeepSpeed needs
    `zero_allow_untested_optimizer` for it.
    """
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.layer_decay, optim_cfg.layer_decay_scope,
                          optim_cfg.decay_ssm_a, optim_cfg.no_decay)
    for group in groups:
        group["lr"] = peak_lr * group["lr_scale"]
        del group["names"]  # torch keeps unknown keys, but names are only for inspection
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    min_ratio = optim_cfg.min_lr / optim_cfg.lr  # batch scaling scales both ends alike
    warmup, total, shape = optim_cfg.warmup_steps, optim_cfg.max_steps, optim_cfg.schedule

    # A plain function, not a callable object: LambdaLR then saves only its step counter, so a resumed run
    # follows the schedule of its current config.
    def schedule(step: int) -> float:
        return cosine_factor(step, warmup, total, min_ratio, shape)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def peak_lr(optim_cfg, global_batch_size: int) -> float:
    """`optim.lr`, linearly scaled by `global_batch / base_batch_size` when `base_batch_size` is set."""
    if optim_cfg.base_batch_size is None:
        return optim_cfg.lr
    return optim_cfg.lr * global_batch_size / optim_cfg.base_batch_size
