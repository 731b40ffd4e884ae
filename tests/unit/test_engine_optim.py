"""Weight-decay groups, layer-wise LR decay and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import OptimConfig
from pipeline.optim import build_optimizer, cosine_factor, param_groups, peak_lr


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.A_log = nn.Parameter(torch.zeros(4, 2))  # 2-D, yet exempt by name (as in mamba)
        self.D = nn.Parameter(torch.ones(4))


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 3)
        self.extra = nn.Parameter(torch.zeros(3, 3))

    def no_weight_decay(self) -> set[str]:
        return {"extra"}


class Wrapper(nn.Module):
    """Tasks hold the backbone under a prefix; names listed by no_weight_decay() get that prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.student = TinyBackbone()
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def groups_by_name(groups) -> dict[str, dict]:
    return {name: g for g in groups for name in g["names"]}


def test_weight_decay_exemptions():
    named = groups_by_name(param_groups(Wrapper(), weight_decay=0.05))
    decayed = sorted(n for n, g in named.items() if g["weight_decay"] > 0)
    assert decayed == [
        "student.head.weight", "student.layers.0.proj.weight", "student.layers.1.proj.weight",
        "student.patch_embed.weight",
    ]  # fmt: skip
    assert "frozen.weight" not in named  # frozen parameters are not optimized
    assert named["student.extra"]["weight_decay"] == 0.0 and named["student.layers.1.A_log"]["weight_decay"] == 0.0


def test_released_optimizers_decay_the_ssm_a_matrices():
    named = groups_by_name(param_groups(Wrapper(), weight_decay=0.05, decay_ssm_a=True))
    decayed = sorted(n for n, g in named.items() if g["weight_decay"] > 0)
    assert decayed == [
        "student.head.weight", "student.layers.0.A_log", "student.layers.0.proj.weight", "student.layers.1.A_log",
        "student.layers.1.proj.weight", "student.patch_embed.weight",
    ]  # fmt: skip
    assert named["student.layers.0.D"]["weight_decay"] == 0.0 and named["student.extra"]["weight_decay"] == 0.0


def test_released_video_text_rule_decays_all_but_1d_parameters_and_biases():
    """`no_decay: dims`: the released video-text optimizer, whose DDP wrapper hides `no_weight_decay()`."""
    named = groups_by_name(param_groups(Wrapper(), weight_decay=0.05, no_decay="dims"))
    decayed = sorted(n for n, g in named.items() if g["weight_decay"] > 0)
    assert decayed == [
        "student.extra", "student.head.weight", "student.layers.0.A_log", "student.layers.0.proj.weight",
        "student.layers.1.A_log", "student.layers.1.proj.weight", "student.patch_embed.weight", "student.pos_embed",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no_decay rule 'all'"):
        param_groups(Wrapper(), weight_decay=0.05, no_decay="all")


def test_layer_decay_scales():
    named = groups_by_name(param_groups(Wrapper(), weight_decay=0.0, layer_decay=0.5))
    # 2 blocks: embeddings layer 0 -> 0.5**3, block i -> 0.5**(2 - i), head -> 1
    assert named["student.pos_embed"]["lr_scale"] == pytest.approx(0.125)
    assert named["student.patch_embed.bias"]["lr_scale"] == pytest.approx(0.125)
    assert named["student.layers.0.proj.weight"]["lr_scale"] == pytest.approx(0.25)
    assert named["student.layers.1.D"]["lr_scale"] == pytest.approx(0.5)
    assert named["student.head.weight"]["lr_scale"] == 1.0


def test_cosine_schedule_shape():
    assert cosine_factor(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert cosine_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    mid = 4 + (20 - 4) // 2
    assert cosine_factor(mid, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_released_video_text_schedule_floors_warmup_and_cosine_at_min_lr():
    """The released `get_cosine_schedule_with_warmup(min_lr_multi)`: max(min, step / warmup) in warmup, then
    max(min, half cosine to 0)."""
    ratio = 0.01
    assert cosine_factor(0, 4, 20, ratio, "cosine_floor") == ratio  # the first step runs at min_lr, not 0
    assert cosine_factor(2, 4, 20, ratio, "cosine_floor") == pytest.approx(0.5)
    assert cosine_factor(4, 4, 20, ratio, "cosine_floor") == pytest.approx(1.0)
    mid = 4 + (20 - 4) // 2
    assert cosine_factor(mid, 4, 20, ratio, "cosine_floor") == pytest.approx(0.5)  # not 0.01 + 0.99 * 0.5
    assert cosine_factor(18, 4, 20, ratio, "cosine_floor") == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 16)))
    assert cosine_factor(19, 4, 20, ratio, "cosine_floor") == ratio  # 0.0096 by the cosine: floored
    assert cosine_factor(20, 4, 20, ratio, "cosine_floor") == ratio
    cfg = OptimConfig(lr=1.0, min_lr=0.01, warmup_steps=4, max_steps=20, schedule="cosine_floor")
    optimizer, scheduler = build_optimizer(nn.Linear(2, 2), cfg, peak_lr=1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="schedule 'linear'"):
        cosine_factor(0, 4, 20, ratio, "linear")


def test_batch_scaling_scales_the_final_lr_too():
    cfg = OptimConfig(lr=1.5e-4, base_batch_size=256, min_lr=1e-5, warmup_steps=0, max_steps=4)
    peak = peak_lr(cfg, global_batch_size=2048)
    optimizer, scheduler = build_optimizer(nn.Linear(2, 2), cfg, peak)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert peak == pytest.approx(1.2e-3) and optimizer.param_groups[0]["lr"] == pytest.approx(8e-5)  # released values


def test_scheduler_drives_group_lrs_with_layer_scale():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=2, max_steps=10, weight_decay=0.1, layer_decay=0.5,
                      layer_decay_scope="all_layers")
    optimizer, scheduler = build_optimizer(Wrapper(), cfg, peak_lr=1.0)
    for _ in range(2):  # end of warmup: every group at peak x its scale
        optimizer.step()
        scheduler.step()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.125, 0.25, 0.5, 1.0])
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [None] * len(optimizer.param_groups)  # the schedule follows the config on resume


def test_released_layer_decay_scope_is_the_default():
    """The released fine-tuning decays only cls_token / pos_embed / patch_embed; blocks keep the full LR."""
    optimizer, _ = build_optimizer(Wrapper(), OptimConfig(lr=1.0, layer_decay=0.5), peak_lr=1.0)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.125, 1.0])
